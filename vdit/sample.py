"""Generation: prompts -> text tokens -> sampled latents -> decoded frames -> files.

``generate`` runs one compiled function per (sampler, steps, shapes): text encoding,
the whole sampler loop with the conditional and unconditional passes batched
together, and the VAE decode. A sample's noise is a function of the seed, its prompt's
text and its number among that prompt's samples (``sample_key``), so a prompt gives the
same videos alone or in any batch, and raising ``num_per_prompt`` only adds videos.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from vdit import media
from vdit.models import Models
from vdit.samplers import check_options, classifier_free_guidance, sample
from vdit.sharding import (MESH_AXES, activation_sharding, batch_divisor, batch_sharding, make_mesh, replicated,
                           request_cpu_devices, rules_from_config)
from vdit.vae import CausalVAE


@dataclasses.dataclass
class Pipeline:
    """Everything ``generate`` needs: models, their parameters and the run's config.

    ``mesh``: where ``params`` live (``load_pipeline`` sets it); ``generate`` samples on it by
    default. None: one device.
    """

    models: Models
    params: dict  # {"vae": ..., "text": ..., "dit": ...}
    config: ml_collections.ConfigDict
    mesh: Mesh | None = None


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def latent_shape(pipe: Pipeline, frames: int, resolution: int | tuple[int, int]) -> tuple[int, ...]:
    """Latent shape ``(t, h, w, c)`` of a clip of ``frames`` at ``resolution`` (checked).

    The clip must suit both models: the VAE's compression and the DiT's patches. A bad
    size is a one-line ValueError naming the nearest sizes that work.
    """
    pair = (resolution, resolution) if _is_int(resolution) else resolution
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_int(v) and v > 0 for v in pair)):
        raise ValueError(f"resolution={resolution!r}: expected a positive int or an (H, W) pair of them")
    if not _is_int(frames) or frames < 1:
        raise ValueError(f"frames={frames!r}: expected a positive integer")
    vae, dit = pipe.models.vae, pipe.models.dit
    # Pixels per DiT patch along (T, H, W): the first latent frame is one frame, the rest tf each.
    pt, ph, pw = dit.patch_size
    tf, sf = vae.temporal_factor, vae.spatial_factor
    for name, n, step in (("H", pair[0], sf * ph), ("W", pair[1], sf * pw)):
        if n % step:
            low = step * (n // step)
            near = " or ".join(str(v) for v in (low, low + step) if v > 0)
            raise ValueError(f"resolution {name}={n}: expected a multiple of {step} (the VAE's {sf}x times the "
                             f"DiT's patch {dit.patch_size}); nearest: {near}")
    if (frames - 1) % tf == 0 and (1 + (frames - 1) // tf) % pt:
        low = 1 + tf * (pt * ((1 + (frames - 1) // tf) // pt) - 1)
        near = " or ".join(str(v) for v in (low, low + tf * pt) if v > 0)
        raise ValueError(f"frames={frames}: the DiT's temporal patch {pt} needs a multiple of {pt} latent frames "
                         f"(1 + (frames - 1) / {tf}); nearest: {near}")
    return vae.latent_shape((1, frames, pair[0], pair[1], vae.in_channels))[1:]


@functools.partial(jax.jit, static_argnames=("models", "sampler", "steps", "guided", "eta"))
def _generate(params, ids, mask, uncond_ids, uncond_mask, noise, keys, scale, *, models, sampler, steps, guided, eta):
    emb = models.text.apply(params["text"], ids, mask)
    uncond = (models.text.apply(params["text"], uncond_ids, uncond_mask), uncond_mask)

    def model_fn(x, t, context):
        return models.dit.apply({"params": params["dit"]}, x, t, *context)

    denoise = classifier_free_guidance(model_fn, (emb, mask), uncond, scale if guided else 1.0)
    z = sample(denoise, noise, schedule=models.schedule, sampler=sampler, num_steps=steps, key=keys, eta=eta)
    return models.vae.apply({"params": params["vae"]}, z, method=CausalVAE.decode)


def sample_key(seed: int, prompt: str, index: int) -> jax.Array:
    """The PRNG key of the ``index``-th sample of ``prompt`` under ``seed``.

    The prompt enters through its CRC-32, a hash that, unlike Python's ``hash``, is
    the same in every process and on every run.
    """
    prompt_id = np.uint32(zlib.crc32(prompt.encode("utf-8")))
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), prompt_id), index)


def generate(
    pipe: Pipeline,
    prompts: str | Sequence[str],
    *,
    num_per_prompt: int = 1,
    steps: int | None = None,
    sampler: str | None = None,
    cfg: float | None = None,
    seed: int | None = None,
    negative_prompt: str | None = None,
    eta: float | None = None,
    frames: int | None = None,
    resolution: int | tuple[int, int] | None = None,
    mesh=None,
) -> np.ndarray:
    """Samples videos for ``prompts``; returns uint8 ``(len(prompts) * num_per_prompt, T, H, W, 3)``.

    Unset options (``None``) come from the config's ``sample`` and ``data`` sections.
    Video ``j`` of a prompt starts from the noise of ``sample_key(seed, prompt, j)``; with
    ``sampler="ddim"`` and ``eta > 0`` (VP schedules) that key also draws its noise at each
    step, so stochastic sampling is as independent of the batch as the start. The batch is
    split over the mesh's data axes (padded to a multiple of them); ``mesh`` defaults to the
    pipeline's (``load_pipeline(..., mesh=)``), else one device. Parameters already laid out on
    that mesh (FSDP shards, say) stay as they are; others are replicated onto it. On a mesh
    over several processes (``jax.distributed``) every process calls this with the same
    arguments and gets all the videos.
    """
    from vdit.text import as_prompt_list

    s = pipe.config.sample
    pick = lambda value, default: default if value is None else value  # noqa: E731
    steps, sampler, cfg, seed = pick(steps, s.steps), pick(sampler, s.sampler), pick(cfg, s.cfg), pick(seed, s.seed)
    negative_prompt = pick(negative_prompt, s.negative_prompt)
    eta = float(pick(eta, s.get("eta", 0.0)))  # workdirs from before sample.eta lack the key
    for name, value in (("num_per_prompt", num_per_prompt), ("steps", steps)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"generate: {name} must be a positive integer, got {value!r}")
    if not _is_int(seed) or not -2**63 <= seed < 2**63:
        raise ValueError(f"generate: seed must be a 64-bit integer, got {seed!r}")
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float, np.number)) or not np.isfinite(cfg):
        raise ValueError(f"generate: cfg (the guidance scale) must be a finite number, got {cfg!r}")
    shape = latent_shape(pipe, pick(frames, pipe.config.data.frames), pick(resolution, pipe.config.data.resolution))

    prompts = as_prompt_list(prompts)
    if not prompts:
        raise ValueError("generate: prompts is empty; pass a str or a non-empty list of str")
    keys = [sample_key(seed, p, j) for p in prompts for j in range(num_per_prompt)]
    # Before tokenizing and compiling: the sampler's own one-line errors (name, schedule, eta).
    check_options(sampler, pipe.models.schedule, steps, eta, keys[0])
    prompts = [p for p in prompts for _ in range(num_per_prompt)]
    n = len(prompts)
    mesh = mesh or pipe.mesh or _one_device()
    padded = -(-n // batch_divisor(mesh)) * batch_divisor(mesh)
    ids, mask = pipe.models.text.tokenize(prompts + [""] * (padded - n))
    uncond_ids, uncond_mask = pipe.models.text.tokenize([negative_prompt])
    keys += keys[:1] * (padded - n)  # padding rows are dropped; any noise will do
    noise = jax.vmap(lambda k: jax.random.normal(k, shape))(jnp.stack(keys))

    put = lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x)))  # noqa: E731
    params = pipe.params if _lives_on(pipe.params, mesh) else jax.device_put(pipe.params, replicated(mesh))
    # Activations are laid out by the run's rules, as in training (sequence over `context`, ...).
    layout = (activation_sharding(mesh, rules_from_config(pipe.config.sharding_rules)) if mesh.size > 1
              else contextlib.nullcontext())
    with layout:
        video = _generate(
            params, put(ids), put(mask), uncond_ids, uncond_mask, put(noise),
            # The start noise is normal(key); DDIM's step noise is normal(fold_in(key, step)).
            put(jnp.stack(keys)) if eta > 0 else None, jnp.float32(cfg),
            models=pipe.models, sampler=sampler, steps=int(steps), guided=cfg != 1.0, eta=eta,
        )
    if not video.is_fully_addressable:  # a mesh over several processes: every process gets every video
        from jax.experimental import multihost_utils

        video = multihost_utils.process_allgather(video, tiled=True)
    return media.to_uint8(np.asarray(jax.device_get(video))[:n])


def _one_device() -> Mesh:
    # This process's first device: in a multi-process run jax.devices()[0] may belong to another.
    return make_mesh({"data": 1}, jax.local_devices()[:1])


def _lives_on(tree: Any, mesh: Mesh) -> bool:
    """Whether every leaf of ``tree`` is an array laid out on ``mesh``."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
                                and x.sharding.mesh == mesh for x in leaves)


def sample_mesh(config: ml_collections.ConfigDict, spec: str | None) -> Mesh:
    """The mesh ``vdit sample --mesh SPEC`` samples on.

    ``None``: one device of this process. ``"config"``: the run's ``mesh`` over all devices
    (of all processes), as in training (with its ``cpu_devices`` on a CPU). ``"data=4,fsdp=2"``:
    those axes, the others 1, at most one of them -1 (the remaining devices). Call it before
    JAX starts, for the CPU count.
    """
    if spec is None:
        return _one_device()
    if spec == "config":
        request_cpu_devices(int(config.get("cpu_devices", 0)))
        return make_mesh(dict(config.mesh))
    shape = {}
    for item in spec.split(","):
        axis, eq, size = item.strip().partition("=")
        if not eq or axis not in MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {spec}: expected 'config' or AXIS=SIZE pairs joined by commas, "
                             f"AXIS one of {', '.join(MESH_AXES)} (e.g. data=4,fsdp=2; -1 for the rest)")
        shape[axis] = int(size)
    return make_mesh(shape)


def save_samples(videos: np.ndarray, prompts: Sequence[str], out_dir: str | pathlib.Path, *, num_per_prompt: int = 1,
                 fps: int = 8, overwrite: bool = False) -> dict:
    """Writes ``generate``'s output as mp4/gif per sample, a GIF grid and a PNG contact sheet.

    Refuses (``FileExistsError``) to replace files already in ``out_dir`` unless ``overwrite``
    (``vdit sample`` checks before sampling, with ``media.check_can_write``).
    """
    names = media.sample_names(prompts, num_per_prompt)
    return media.write_all(out_dir, videos, names, fps=fps, overwrite=overwrite)


def init_params(models: Models, config: ml_collections.ConfigDict, key: jax.Array) -> dict[str, Any]:
    """Fresh (untrained) parameters of all three models, unboxed; for tests and notebooks."""
    import flax.linen as nn

    from vdit.train import init_dit_params, init_vae_params

    k_vae, k_rest = jax.random.split(key)
    return nn.meta.unbox({"vae": init_vae_params(models, config)(k_vae), **init_dit_params(models, config)(k_rest)})


def config_from_workdir(workdir: str | pathlib.Path, phase: str = "dit") -> ml_collections.ConfigDict:
    """The config a workdir's phase was trained with (saved as ``W/<phase>/config.json``), locked."""
    from vdit.config import load_config

    path = pathlib.Path(workdir) / phase / "config.json"
    if not path.exists():
        trained = [p for p in ("vae", "dit") if (pathlib.Path(workdir) / p / "config.json").exists()]
        if trained:  # a run that has not reached this phase yet
            from vdit.loop import train_command

            raise FileNotFoundError(f"{path} not found: {workdir} has trained only its {' and '.join(trained)} "
                                    f"so far; train the {phase} with `{train_command(workdir, phase)}`")
        raise FileNotFoundError(f"{path} not found; is {workdir} a workdir trained with `vdit train`?")
    return load_config(str(path))


def load_pipeline(workdir: str | pathlib.Path, *, ema: bool = True, mesh=None) -> Pipeline:
    """Models and trained parameters of a workdir (DiT and text encoder EMA weights by default).

    ``mesh`` (default: one device) is where the parameters are laid out, by the run's sharding
    rules (FSDP shards on an ``fsdp`` axis); ``generate`` then samples on it.
    """
    from vdit.loop import load_params
    from vdit.models import build_models
    from vdit.sharding import rules_from_config

    config = config_from_workdir(workdir)
    models = build_models(config)
    mesh = mesh or _one_device()
    rules = rules_from_config(config.sharding_rules)
    params = dict(load_params(workdir, "dit", config, models, mesh, rules, ema=ema))
    params["vae"] = load_params(workdir, "vae", config, models, mesh, rules)
    return Pipeline(models, params, config, mesh)
