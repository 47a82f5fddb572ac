"""Timing: median of N runs after warm-up, compile time, and the device's measured GEMM peak."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# Square GEMM sizes tried per backend; the peak is the best of them. CPUs saturate
# at ~1-2k, accelerators need ~8k to fill their matrix units.
GEMM_SIZES = {"cpu": (1024, 2048), "gpu": (4096, 8192), "tpu": (4096, 8192)}
# GEMMs chained per call on accelerators, so launch overhead does not dilute the peak.
_GEMM_CHAIN = {"cpu": 1, "gpu": 16, "tpu": 16}


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: the median (the figure reported) and the spread of the timed calls."""

    median: float
    min: float
    max: float
    times: tuple[float, ...]

    def as_dict(self) -> dict:
        """The JSON form benchmark results store (seconds)."""
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "times_s": list(self.times)}


def measure(run: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Times ``run()`` (blocking on its result) ``repeats`` times after ``warmup`` untimed calls.

    Args:
      run: a zero-argument callable doing one unit of work; it may carry state across
        calls itself (a train step threading its state). Its result is waited for with
        ``jax.block_until_ready``, so asynchronous dispatch cannot hide work.
      warmup: untimed calls first (caches, allocator, thread pools).
      repeats: timed calls; the median is robust to a stray slow one.
    """
    return measure_interleaved({"run": run}, warmup=warmup, repeats=repeats)["run"]


def measure_interleaved(runs: dict[str, Callable[[], Any]], *, warmup: int = 1,
                        repeats: int = 5) -> dict[str, Timing]:
    """Times several ``runs`` round-robin: ``warmup`` untimed rounds, then ``repeats`` timed
    rounds, each calling every run once in turn (blocking on its result).

    A shared machine's speed drifts from minute to minute (the same CPU train step has
    measured 20-50% apart within an hour); timing one run after another lets that drift
    fall between them and skew their ratio. Interleaved, every run sees the same drift,
    so the ratios hold even when the absolute times move.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if not runs:
        raise ValueError("measure_interleaved needs at least one run")
    times = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(t), min(t), max(t), tuple(t)) for name, t in times.items()}


def compile_timed(jitted, *args, **kwargs):
    """``(compiled, seconds)``: traces, lowers and compiles ``jitted`` for these arguments, timed.

    Arguments may be ``jax.ShapeDtypeStruct``s: nothing runs.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def gemm_peak(dtype: str = "float32", *, repeats: int = 5, sizes: tuple[int, ...] | None = None) -> dict:
    """The best square-GEMM FLOP/s of JAX on the default device, measured now.

    This is the denominator of "fraction of peak": what this device reaches on the
    one kernel that should run closest to its limit, in the same run and process as
    the model it judges (so clocks, thermal state and other load are shared).

    Returns:
      ``{"dtype", "flops_per_s", "n", "by_size": {n: FLOP/s}}``.
    """
    backend = jax.default_backend()
    sizes = sizes or GEMM_SIZES.get(backend, GEMM_SIZES["gpu"])
    chain = _GEMM_CHAIN.get(backend, 1)

    # Products accumulate in f32 and are rounded back to ``dtype``, as vdit's model matmuls
    # run (``layers.einsum``): XLA:CPU widens a bf16-result GEMM to f32, and only a bf16 x
    # bf16 -> f32 one reaches the CPU's bf16 units.
    def product(c, b):
        return jnp.dot(c, b, preferred_element_type=jnp.float32).astype(c.dtype)

    def gemms(a, b):  # a chain, so no product can be skipped; b ~ N(0, 1/n) keeps the scale
        return jax.lax.fori_loop(0, chain, lambda i, c: product(c, b), a)

    by_size = {}
    for n in sizes:
        rng = np.random.default_rng(0)
        a = jnp.asarray(rng.standard_normal((n, n)), dtype)
        b = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n), dtype)
        f = jax.jit(gemms)
        timing = measure(lambda: f(a, b), warmup=1, repeats=repeats)
        by_size[n] = 2.0 * n**3 * chain / timing.median
    best = max(by_size, key=by_size.get)
    return {"dtype": dtype, "flops_per_s": by_size[best], "n": best, "by_size": by_size}
