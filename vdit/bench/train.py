"""DiT train-step benchmark: step time, model FLOP/s against the measured GEMM peak,
compile time and memory per remat policy and scan setting, and the diffusers peer.

The step is vdit's own (``vdit.train.make_train_step`` over ``dit_loss``, jitted by
``jit_train_step``: flow-matching loss, AdamW with clipping, EMA) on random latents,
with the text embeddings given as input (``PrecomputedText``): the DiT alone, which
is exactly what the diffusers peer runs. Parameters are f32; matmuls run in the
config's ``dit.dtype``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from vdit import train as T
from vdit.attention import backend_unavailable_reason
from vdit.bench import flops as F
from vdit.bench.floor import add_torch_floor, matmul_floor
from vdit.bench.machine import cpu_cores, spec_peak
from vdit.bench.memory import memory_stats, train_memory_estimate
from vdit.bench.profile import format_split, profile_step
from vdit.bench.timing import compile_timed, gemm_peak, measure_interleaved
from vdit.config import override
from vdit.dit import REMAT_POLICIES, count_params
from vdit.models import Models, build_models
from vdit.sharding import activation_sharding, batch_sharding, make_mesh, rules_from_config, unbox


@dataclasses.dataclass(frozen=True)
class PrecomputedText:
    """A text "encoder" whose input already is the embedding ``(B, L, width)``: the DiT-only step.

    It stands in for ``Models.text`` so ``vdit.train.dit_loss`` runs unchanged while
    the batch's ``text_ids`` carry embeddings, as diffusers' transformer takes them.
    """

    width: int
    max_length: int

    def apply(self, params, emb, mask):
        """The embedding as given (no parameters, no mask applied)."""
        del params, mask
        return emb


def bench_geometry(config: ml_collections.ConfigDict, models: Models) -> tuple[tuple[int, ...], int]:
    """``(latent shape (t, h, w, c) of one example, text length)`` of a config's data and models."""
    res = config.data.resolution
    shape = models.vae.latent_shape((1, config.data.frames, res, res, models.vae.in_channels))[1:]
    return tuple(int(s) for s in shape), int(models.text.max_length)


def random_batch(dit, batch: int, latent_shape: tuple[int, ...], text_len: int, seed: int = 0) -> dict:
    """Random latents, text embeddings and an all-true mask (a step's cost does not depend on values)."""
    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((batch, *latent_shape)).astype(np.float32),
            "text_ids": rng.standard_normal((batch, text_len, dit.text_dim)).astype(np.float32),
            "text_mask": np.ones((batch, text_len), bool)}


def _variant(config, models: Models, batch_np: dict, devices: int = 1) -> dict:
    """Compiles vdit's DiT train step for ``models.dit``'s remat/scan setting, data-parallel
    over the first ``devices`` devices.

    Returns ``{"compile_s", "memory", "num_params", "compiled", "step", "traceable"}``;
    ``step()`` runs one step on the same batch, threading the train state through;
    ``traceable`` is the jitted step and abstract arguments to trace it with.
    """
    dit = models.dit
    mesh = make_mesh({"data": devices}, jax.devices()[:devices])
    rules = rules_from_config(config.sharding_rules)
    tx = T.make_optimizer(config.optim, config.train.steps)
    latents, emb, mask = batch_np["latents"][:1], batch_np["text_ids"][:1], batch_np["text_mask"][:1]

    def init(key):  # the DiT's params; PrecomputedText has none
        return {"dit": dit.init(key, latents, np.zeros(1, np.float32), emb, mask)["params"], "text": {}}

    state, shardings = T.init_state(init, tx, jax.random.PRNGKey(config.seed), mesh, rules, ema=True)
    num_params = count_params(unbox(state.params["dit"]))
    loss = functools.partial(T.dit_loss, models=models, train=config.train, schedule_cfg=config.schedule,
                             uncond=None)
    step_fn = T.make_train_step(loss, tx, T.learning_rate(config.optim, config.train.steps),
                                ema_decay=config.train.ema_decay)
    run = T.jit_train_step(step_fn, mesh, rules, shardings, {k: v.ndim for k, v in batch_np.items()})
    batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch_np.items()}
    with activation_sharding(mesh, rules):
        compiled, compile_s = compile_timed(run.jitted, state, batch, None)
    holder = [state]

    def one_step():  # returns the new state too, so the timer waits for all of the step
        holder[0], metrics = compiled(holder[0], batch, None)
        return holder[0], metrics

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
    return {"compile_s": compile_s, "memory": memory_stats(compiled), "num_params": num_params,
            "compiled": compiled, "step": one_step, "traceable": (run.jitted, (*abstract, None))}


def _throughput(step_s: float | None, train_flops: float, tokens: int, peak: float, spec: float | None) -> dict:
    if step_s is None:
        return {"step_s": None, "tokens_per_s": None, "model_flops_per_s": None, "frac_gemm_peak": None,
                "mfu_spec": None}
    achieved = train_flops / step_s
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "model_flops_per_s": achieved,
            "frac_gemm_peak": achieved / peak, "mfu_spec": achieved / spec if spec else None}


def bench_train(config: ml_collections.ConfigDict, *, batch: int | None = None, remats: list[str] | None = None,
                scans: list[bool] | None = None, devices: list[int] | None = None, warmup: int = 1,
                repeats: int = 5, peer: bool = False, xcheck: bool = True, profile: str | None = None,
                floor: bool = False, log: Callable[[str], Any] = print) -> dict:
    """Benchmarks the DiT train step of ``config`` for each remat policy x scan setting.

    Args:
      config: a vdit config; its ``data.frames``/``data.resolution`` and VAE set the
        latent shape, ``text.max_length`` the text length, ``dit.*`` the model.
      batch: examples per step (default ``data.batch_size``).
      remats: remat policies to compare (default: the config's).
      scans: scan-over-layers settings to compare (default: the config's).
      devices: device counts to compare (default ``[1]``): the step runs data-parallel over
        the first N devices, as ``cpu_devices=N`` with a ``data`` mesh trains; on a CPU,
        ``vdit bench`` splits the host into that many XLA devices before JAX starts.
      warmup: untimed steps before timing.
      repeats: timed steps (the median is reported); 0 compiles only (memory, no time).
      peer: also time diffusers' WanTransformer3DModel doing the same step in torch.
      xcheck: cross-check the analytic FLOPs against XLA's cost analysis of the unrolled model.
      profile: a directory: also trace each variant's step with ``jax.profiler`` there and
        write ``ops_<remat>_scan<scan>.json``, its op time per phase and kind and its top ops.
      floor: also measure each variant's matmul floor (``vdit.bench.floor``): its
        matmuls, each timed alone, summed; needs ``repeats >= 1``. With ``peer``, torch
        runs the same matmuls too (``floor.add_torch_floor``).
      log: receives one progress line per measurement.

    Returns:
      The result dict (``kind="train"``): ``setup``, ``flop_check``, ``rows`` (one per
      variant) and ``peer`` (None without ``peer``).
    """
    config = override(copy.deepcopy(config), ["train.text_dropout=0.0"])  # embeddings are inputs: no dropout
    reason = backend_unavailable_reason(config.dit.attention_impl)
    if reason:
        raise ValueError(reason)
    if floor and not repeats:
        raise ValueError("--floor times each matmul of the step: it needs --repeats >= 1")
    devices = list(devices or [1])
    batch = int(batch or config.data.batch_size)
    for n in devices:
        if n > jax.device_count():
            raise ValueError(f"--cpu_devices {n}: this process has {jax.device_count()} device(s); on a CPU `vdit "
                             f"bench` splits the host before JAX starts (JAX_NUM_CPU_DEVICES, if set, wins)")
        if batch % n:
            raise ValueError(f"--cpu_devices {n} does not divide the batch of {batch}: pass --batch a multiple of {n}")
    if floor and max(devices) > 1:
        raise ValueError("--floor times each matmul alone on one device: use it with --cpu_devices 1")
    unknown = sorted(set(remats or []) - set(REMAT_POLICIES))
    if unknown:
        raise ValueError(f"unknown remat policies {unknown}; expected some of {sorted(REMAT_POLICIES)}")
    models = build_models(config)
    models = dataclasses.replace(models, text=PrecomputedText(models.text.width, models.text.max_length))
    latent_shape, text_len = bench_geometry(config, models)
    dit = models.dit
    dtype = str(config.dit.dtype)
    tokens = batch * F.tokens_per_example(dit, latent_shape)
    breakdown = F.dit_forward_flops(dit, latent_shape, text_len, batch)
    train_flops = F.TRAIN_FACTOR * sum(breakdown.values())
    log(f"[train] {tokens} tokens/step ({batch} x {latent_shape}), {train_flops / 1e9:.1f} GFLOP/step")

    flop_check = []
    if xcheck:
        for train_mode in (False, True):
            check = F.cross_check(dit, latent_shape, text_len, batch, train=train_mode)
            log(f"[train] FLOP check ({check['mode']}, unrolled): XLA/analytic = {check['ratio']:.4f}")
            flop_check.append(check)

    batch_np = random_batch(dit, batch, latent_shape, text_len, config.seed)
    variants = []
    for n in devices:
        for remat in remats or [dit.remat]:
            for scan in scans if scans is not None else [dit.scan_layers]:
                variant = dataclasses.replace(models, dit=dit.clone(remat=remat, scan_layers=scan))
                label = _label(variant.dit, n)
                log(f"[train] {label}: compiling")
                out = _variant(config, variant, batch_np, n)
                out["devices"] = n
                log(f"[train] {label}: compile {out['compile_s']:.1f} s")
                variants.append((variant.dit, out))
    num_params = variants[0][1]["num_params"]

    # The GEMM peaks (XLA's here, torch's in the peer's setup) are measured just before the
    # steps, so that they share the machine's state with them; untimed, there is nothing to divide.
    if repeats:
        log(f"[train] measuring the {dtype} GEMM peak")
    gemm = {"xla": gemm_peak(dtype, repeats=max(repeats, 3))} if repeats else {}
    peer_out = None
    with contextlib.ExitStack() as stack:
        runs = {_label(d, out["devices"]): out["step"] for d, out in variants}
        if peer:
            peer_out = _peer_setup(config, dit, batch_np, repeats=repeats, stack=stack, log=log)
            runs["peer"] = peer_out.pop("step")
            torch_gemm = peer_out.pop("gemm")
            if torch_gemm:
                gemm["torch"] = torch_gemm
        timings = {}
        if repeats:
            log(f"[train] timing {repeats} rounds of {', '.join(runs)}, interleaved (after {warmup} untimed)")
            timings = measure_interleaved(runs, warmup=warmup, repeats=repeats)
    for d, out in variants:
        label = _label(d, out["devices"])
        out["timing"] = timings.get(label)
        if out["timing"]:
            log(f"[train] {label}: step {out['timing'].median:.4f} s")
        if profile is not None:
            if not repeats:
                jax.block_until_ready(out["step"]())  # the traced steps must not include the first run's setup
            name = f"{d.remat}_scan{d.scan_layers}" + (f"_devices{out['devices']}" if out["devices"] > 1 else "")
            prof = profile_step(out["step"], out["compiled"].as_text(), f"{profile}/{name}")
            path = pathlib.Path(profile) / f"ops_{name}.json"
            path.write_text(json.dumps(prof, indent=1) + "\n")
            log(f"[train] {label}: op time per step by phase and kind ({path}; trace {prof['trace']}):\n"
                f"{format_split(prof)}")
        if floor:
            fn, args = out["traceable"]
            out["floor"] = matmul_floor(fn, *args, warmup=max(warmup, 1), repeats=repeats)
            log(f"[train] {_label(d)}: matmul floor {out['floor']['seconds']:.4f} s ({out['floor']['count']} "
                f"matmuls, {out['floor']['flops'] / 1e9:.1f} GFLOP, each timed alone)")
    if floor and peer_out is not None:  # torch's floors after all of XLA's (add_torch_floor says why)
        for d, out in variants:
            fn, args = out["traceable"]
            add_torch_floor(out["floor"], fn, *args, threads=peer_out["threads"], warmup=max(warmup, 1),
                            repeats=repeats)
            log(f"[train] {_label(d)}: the same matmuls in torch {out['floor']['torch_seconds']:.4f} s")
    if peer_out is not None:
        timing = timings.get("peer")
        peer_out.update(timing=timing.as_dict() if timing else None, step_s=timing.median if timing else None)
        log(f"[train] peer: step {timing.median:.4f} s" if timing else "[train] peer: not timed")
    peak = max(g["flops_per_s"] for g in gemm.values()) if gemm else None
    spec = spec_peak(jax.devices()[0].device_kind, dtype)

    rows = []
    for vdit_dit, out in variants:
        step_s = out["timing"].median if out["timing"] else None
        n = out["devices"]
        # Memory is per device: the state on each, the activations of its share of the batch.
        estimate = train_memory_estimate(vdit_dit, num_params, batch // n, F.tokens_per_example(dit, latent_shape),
                                         text_len)
        batch_bytes = sum(v.nbytes for v in batch_np.values()) // n
        rows.append({
            "remat": vdit_dit.remat, "scan_layers": vdit_dit.scan_layers, "devices": n, "compile_s": out["compile_s"],
            "timing": out["timing"].as_dict() if out["timing"] else None,
            **_throughput(step_s, train_flops, tokens, peak, spec),
            "vs_peer": step_s / peer_out["step_s"] if (peer_out and peer_out["step_s"] and step_s) else None,
            "memory": out["memory"], "estimate": estimate,
            "temp_ratio": out["memory"]["temp_bytes"] / estimate["temp_bytes"],
            "state_ratio": (out["memory"]["argument_bytes"] - batch_bytes) / estimate["state_bytes"],
            **({"matmul_floor": out["floor"]} if "floor" in out else {}),
        })
    if peer_out:
        peer_out.update(_throughput(peer_out["step_s"], train_flops, tokens, peak, spec))

    arch = ("width", "depth", "num_heads", "mlp_dim", "text_dim", "freq_dim", "in_channels", "attention_impl")
    setup = {
        "dit": {k: getattr(dit, k) for k in arch} | {"patch_size": list(dit.patch_size), "dtype": dtype},
        "params": num_params, "batch": batch, "latent_shape": list(latent_shape), "text_len": text_len,
        "tokens_per_example": F.tokens_per_example(dit, latent_shape), "tokens_per_step": tokens,
        "forward_flops": breakdown, "train_flops_per_step": train_flops, "gemm": gemm, "gemm_peak": peak,
        "spec_peak": spec, "cores": cpu_cores(), "warmup": warmup, "repeats": repeats,
    }
    return {"kind": "train", "setup": setup, "flop_check": flop_check, "rows": rows, "peer": peer_out}


def _label(dit, devices: int = 1) -> str:
    return f"remat={dit.remat} scan_layers={dit.scan_layers}" + (f" devices={devices}" if devices > 1 else "")


def _peer_setup(config, dit, batch_np: dict, *, repeats: int, stack: contextlib.ExitStack, log) -> dict:
    """diffusers' WanTransformer3DModel set up to do vdit's train step, after proving it is the same
    network; torch keeps XLA's thread count until ``stack`` closes. Returns the result fields
    plus ``step`` (one train step) and ``gemm`` (torch's GEMM peak, None untimed)."""
    from vdit.bench import peer as P

    threads = cpu_cores()
    stack.enter_context(P.torch_threads(threads))
    model = P.build_peer(dit, seed=config.seed)
    parity = P.peer_parity(dit, model)
    log(f"[train] peer: {parity['params_peer']:,} params (vdit {parity['params_vdit']:,}), converted outputs "
        f"differ by {parity['max_abs_diff']:.1e}" + ("; measuring torch's GEMM peak" if repeats else ""))
    dtype = str(config.dit.dtype)
    gemm = P.torch_gemm_peak(dtype, repeats=max(repeats, 3)) if repeats else None
    step = P.peer_train_step(model, batch_np["latents"], batch_np["text_ids"], optim=config.optim,
                             ema_decay=config.train.ema_decay, dtype=dtype)
    return {"library": "diffusers WanTransformer3DModel (torch eager)", "threads": threads, "parity": parity,
            "timing": None, "step_s": None, "gemm": gemm, "step": step}
