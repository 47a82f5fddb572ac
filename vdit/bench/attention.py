"""Attention benchmark: backends (``chunked`` against ``xla``) over sequence lengths,
forward and forward + backward: time, FLOP/s and compiled memory.

Heads and head width come from the config's DiT, so the numbers are those of its
self-attention. Memory is read from the compiled program without running it, so
lengths whose working set would not fit (``mem_limit``) are reported untimed.
``memory_exponent`` is the slope of log(temp bytes) against log(length): 1 for
memory linear in the sequence, 2 for a materialised score matrix.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdit.attention import attention, backend_unavailable_reason
from vdit.bench.flops import TRAIN_FACTOR
from vdit.bench.memory import memory_stats
from vdit.bench.timing import compile_timed, measure
from vdit.models import build_models

MODES = ("forward", "train")


def attention_flops(batch: int, seq: int, heads: int, head_dim: int, mode: str) -> float:
    """Model FLOPs of self-attention over ``seq`` tokens: ``4 B H S^2 D`` forward, ``x3`` for training."""
    return 4.0 * batch * heads * seq * seq * head_dim * (TRAIN_FACTOR if mode == "train" else 1)


def memory_exponent(seqs: list[int], temp_bytes: list[int]) -> float | None:
    """Least-squares slope of log(temp bytes) against log(sequence length); None with < 2 points."""
    pairs = [(s, b) for s, b in zip(seqs, temp_bytes) if b > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def default_mem_limit() -> int:
    """Bytes a timed run may need: half the accelerator's memory, or half the host's RAM on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) // 2
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _fn(impl: str, mode: str):
    def forward(q, k, v):
        return attention(q, k, v, impl=impl)

    if mode == "forward":
        return forward
    return jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))


def bench_attention(config: ml_collections.ConfigDict, *, seqs: list[int], impls: list[str] | None = None,
                    batch: int = 1, warmup: int = 1, repeats: int = 5, mem_limit: int | None = None,
                    log: Callable[[str], Any] = print) -> dict:
    """Times and measures ``vdit.attention.attention`` per backend, sequence length and mode.

    Args:
      config: its DiT sets heads, head width and compute dtype.
      seqs: sequence lengths (tokens per example).
      impls: backends (default ``xla`` and ``chunked``); an unavailable one is a ValueError.
      batch: examples.
      warmup, repeats: untimed and timed calls; 0 repeats compiles only (memory, no time).
      mem_limit: bytes a timed run may need (default ``default_mem_limit()``); bigger ones are not run.
      log: receives one progress line per measurement.

    Returns:
      The result dict (``kind="attention"``): ``rows`` per (impl, mode, seq) and
      ``setup["memory_exponent"][impl][mode]``.
    """
    impls = impls or ["xla", "chunked"]
    for impl in impls:
        reason = backend_unavailable_reason(impl)
        if reason:
            raise ValueError(reason)
    dit = build_models(config).dit
    heads, head_dim, dtype = dit.num_heads, dit.width // dit.num_heads, jnp.dtype(dit.dtype)
    mem_limit = int(mem_limit or default_mem_limit())
    rows = []
    for impl in impls:
        for mode in MODES:
            for seq in seqs:
                shape = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), dtype)
                compiled, compile_s = compile_timed(jax.jit(_fn(impl, mode)), shape, shape, shape)
                mem = memory_stats(compiled)
                flops = attention_flops(batch, seq, heads, head_dim, mode)
                timing, skipped = None, None
                if repeats and mem["peak_bytes"] > mem_limit:
                    skipped = f"needs {mem['peak_bytes'] / 2**30:.1f} GiB > limit {mem_limit / 2**30:.1f} GiB"
                elif repeats:
                    key = jax.random.split(jax.random.PRNGKey(seq), 3)
                    q, k, v = (jax.random.normal(kk, shape.shape, dtype) for kk in key)
                    timing = measure(lambda: compiled(q, k, v), warmup=warmup, repeats=repeats)
                    del q, k, v
                row = {"impl": impl, "mode": mode, "seq": seq, "compile_s": compile_s, "memory": mem,
                       "flops": flops, "timing": timing.as_dict() if timing else None,
                       "time_s": timing.median if timing else None,
                       "flops_per_s": flops / timing.median if timing else None, "skipped": skipped}
                rows.append(row)
                log(f"[attention] {impl} {mode} S={seq}: temp {mem['temp_bytes'] / 2**20:.1f} MiB"
                    + (f", {timing.median * 1e3:.1f} ms" if timing else f", not timed ({skipped})" if skipped else ""))
    exponents = {impl: {mode: memory_exponent(
        [r["seq"] for r in rows if r["impl"] == impl and r["mode"] == mode],
        [r["memory"]["temp_bytes"] for r in rows if r["impl"] == impl and r["mode"] == mode]) for mode in MODES}
        for impl in impls}
    setup = {"batch": batch, "heads": heads, "head_dim": head_dim, "dtype": str(dtype), "seqs": list(seqs),
             "mem_limit_bytes": mem_limit, "memory_exponent": exponents, "warmup": warmup, "repeats": repeats}
    return {"kind": "attention", "setup": setup, "rows": rows}
