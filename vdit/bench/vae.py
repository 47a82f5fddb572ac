"""VAE decode benchmark: chunked causal decode against whole-clip decode, in bytes per
output pixel-frame (``memory_analysis`` of the compiled decode) and in time.

A pixel-frame is one output pixel of one frame (``B x T x H x W`` of them per clip).
``temp`` is the decoder's working memory; ``peak`` adds its arguments (weights and
latents) and its output video.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections

from vdit import train as T
from vdit.bench.memory import memory_stats
from vdit.bench.timing import compile_timed, measure
from vdit.models import build_models
from vdit.sharding import unbox
from vdit.vae import CausalVAE


def bench_vae(config: ml_collections.ConfigDict, *, batch: int = 1, frames: int | None = None,
              resolution: int | None = None, warmup: int = 1, repeats: int = 5,
              log: Callable[[str], Any] = print) -> dict:
    """Compiles (and times) the config's VAE decode, whole and chunked, for one clip size.

    Args:
      config: a vdit config (its ``vae`` section; untrained weights).
      batch: clips decoded at once.
      frames, resolution: the decoded clip (default the config's ``data``).
      warmup, repeats: untimed and timed decodes; 0 repeats compiles only (memory, no time).
      log: receives one progress line per measurement.

    Returns:
      The result dict (``kind="vae"``); each row has ``mode``, memory byte counts and
      ``temp_per_pixel_frame``/``peak_per_pixel_frame``, ``compile_s`` and ``decode_s``.
    """
    models = build_models(config)
    vae = models.vae
    frames, res = int(frames or config.data.frames), int(resolution or config.data.resolution)
    video_shape = (batch, frames, res, res, vae.out_channels)
    latent_shape = vae.latent_shape((batch, frames, res, res, vae.in_channels))
    pixel_frames = batch * frames * res * res
    params = unbox(jax.jit(T.init_vae_params(models))(jax.random.PRNGKey(config.seed)))
    z = jax.random.normal(jax.random.PRNGKey(1), latent_shape)

    rows = []
    for mode in ("whole", "chunked"):
        decode = jax.jit(lambda p, z, chunked=mode == "chunked": vae.apply(
            {"params": p}, z, method=CausalVAE.decode, chunked=chunked))
        log(f"[vae] {mode} decode of {video_shape}: compiling" + (f" and timing {repeats} runs" if repeats else ""))
        compiled, compile_s = compile_timed(decode, params, z)
        mem = memory_stats(compiled)
        timing = measure(lambda: compiled(params, z), warmup=warmup, repeats=repeats) if repeats else None
        rows.append({"mode": mode, "compile_s": compile_s, "memory": mem,
                     "temp_per_pixel_frame": mem["temp_bytes"] / pixel_frames,
                     "peak_per_pixel_frame": mem["peak_bytes"] / pixel_frames,
                     "timing": timing.as_dict() if timing else None, "decode_s": timing.median if timing else None})
        log(f"[vae] {mode}: {rows[-1]['temp_per_pixel_frame']:.0f} temp B per pixel-frame"
            + (f", {timing.median:.3f} s" if timing else ""))
    whole, chunked = rows
    setup = {"video_shape": list(video_shape), "latent_shape": list(latent_shape), "pixel_frames": pixel_frames,
             "dtype": str(config.vae.dtype), "base_dim": vae.base_dim, "z_dim": vae.z_dim,
             "params_bytes": sum(x.nbytes for x in jax.tree.leaves(params)), "warmup": warmup, "repeats": repeats,
             "chunked_over_whole_time": (chunked["decode_s"] / whole["decode_s"]) if whole["decode_s"] else None,
             "chunked_over_whole_temp": chunked["memory"]["temp_bytes"] / max(whole["memory"]["temp_bytes"], 1)}
    return {"kind": "vae", "setup": setup, "rows": rows}
