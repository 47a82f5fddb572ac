"""Sampling benchmark: per-step latency of the compiled sampler loop, classifier-free
guidance as one batched call against two passes, and compile time.

Text is encoded once outside the timed function, so ``seconds / model calls`` is the
latency of one denoising step (DiT call(s) plus the sampler's update).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from vdit import train as T
from vdit.bench.timing import compile_timed, measure
from vdit.bench.train import bench_geometry
from vdit.models import build_models
from vdit.samplers import classifier_free_guidance, num_model_calls, sample
from vdit.sharding import unbox

GUIDANCE = ("none", "batched", "two_pass")


def two_pass_guidance(model_fn: Callable, context: Any, uncond_context: Any, scale: float) -> Callable:
    """Classifier-free guidance as two model calls per step (the baseline ``classifier_free_guidance`` batches)."""

    def denoise_fn(x, t):
        cond = model_fn(x, t, context).astype(jnp.float32)
        uncond_b = jax.tree.map(lambda u, c: jnp.broadcast_to(u, c.shape).astype(c.dtype), uncond_context, context)
        uncond = model_fn(x, t, uncond_b).astype(jnp.float32)
        return uncond + scale * (cond - uncond)

    return denoise_fn


def bench_sample(config: ml_collections.ConfigDict, *, batch: int = 1, steps: int | None = None,
                 sampler: str | None = None, cfg: float | None = None, warmup: int = 1, repeats: int = 5,
                 log: Callable[[str], Any] = print) -> dict:
    """Times the whole sampler loop for each guidance mode (``GUIDANCE``).

    Args:
      config: a vdit config (untrained models of its sizes; timing does not depend on weights).
      batch: videos sampled at once.
      steps, sampler, cfg: default to the config's ``sample`` section.
      warmup, repeats: untimed and timed runs of the whole loop; 0 repeats compiles only.
      log: receives one progress line per measurement.

    Returns:
      The result dict (``kind="sample"``); each row has ``compile_s``, ``loop_s``,
      ``model_calls``, ``step_s`` (per model call) and ``dit_calls_per_step``.
    """
    models = build_models(config)
    s = config.sample
    steps, sampler = int(steps or s.steps), sampler or s.sampler
    scale = float(s.cfg if cfg is None else cfg)
    latent_shape, _ = bench_geometry(config, models)
    params = unbox(jax.jit(T.init_dit_params(models))(jax.random.PRNGKey(config.seed)))
    ids, mask = models.text.tokenize(["a red circle moving left"] * batch)
    u_ids, u_mask = models.text.tokenize([""])
    context = (models.text.apply(params["text"], ids, mask), jnp.asarray(mask))
    uncond = (models.text.apply(params["text"], u_ids, u_mask), jnp.asarray(u_mask))
    noise = jax.random.normal(jax.random.PRNGKey(1), (batch, *latent_shape))
    nfe = num_model_calls(sampler, steps)

    def model_fn(dit_params, x, t, ctx):
        return models.dit.apply({"params": dit_params}, x, t, *ctx)

    rows = []
    for mode in GUIDANCE:
        def run(dit_params, context, uncond, noise, mode=mode):
            fn = lambda x, t, ctx: model_fn(dit_params, x, t, ctx)  # noqa: E731
            if mode == "none":
                denoise = classifier_free_guidance(fn, context, uncond, 1.0)
            elif mode == "batched":
                denoise = classifier_free_guidance(fn, context, uncond, scale)
            else:
                denoise = two_pass_guidance(fn, context, uncond, scale)
            return sample(denoise, noise, schedule=models.schedule, sampler=sampler, num_steps=steps)

        log(f"[sample] guidance={mode}: compiling and timing {repeats} runs of {steps} {sampler} steps")
        compiled, compile_s = compile_timed(jax.jit(run), params["dit"], context, uncond, noise)
        timing = measure(lambda: compiled(params["dit"], context, uncond, noise), warmup=warmup,
                         repeats=repeats) if repeats else None
        loop_s = timing.median if timing else None
        rows.append({"guidance": mode, "cfg": 1.0 if mode == "none" else scale, "compile_s": compile_s,
                     "timing": timing.as_dict() if timing else None, "loop_s": loop_s, "model_calls": nfe,
                     "dit_calls_per_step": {"none": 1, "batched": 1, "two_pass": 2}[mode],
                     "dit_batch": 2 * batch if mode == "batched" else batch,
                     "step_s": loop_s / nfe if loop_s else None})
        log(f"[sample] guidance={mode}: compile {compile_s:.1f} s"
            + (f", {rows[-1]['step_s'] * 1e3:.2f} ms per step" if loop_s else ""))
    two, batched = rows[2]["step_s"], rows[1]["step_s"]
    setup = {"batch": batch, "steps": steps, "sampler": sampler, "cfg": scale, "latent_shape": list(latent_shape),
             "text_len": int(models.text.max_length), "dit_dtype": str(config.dit.dtype),
             "attention_impl": models.dit.attention_impl, "warmup": warmup, "repeats": repeats,
             "batched_over_two_pass": batched / two if (two and batched) else None}
    return {"kind": "sample", "setup": setup, "rows": rows}
