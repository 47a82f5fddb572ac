"""Up-front checks of a training run's settings, and of them against its dataset.

``vdit.loop.build_run`` calls them before any model is built, restored or written, so a
bad setting is one line naming its config key rather than a failure minutes into a run.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from vdit.data.common import as_hw

# (key, lowest value, what it means) of the settings both train sections may have.
_TRAIN_INTS = (("steps", 1, "the step to train to"), ("log_every", 1, "steps between logged metrics"),
               ("checkpoint_every", 1, "steps between checkpoints"), ("keep_checkpoints", 1, "checkpoints kept"),
               ("eval_every", 0, "steps between evaluations; 0 turns them off"))


def check_config(config: ml_collections.ConfigDict) -> None:
    """One-line errors, naming the key, for training settings out of range.

    Both phases' sections are checked, so ``vdit train`` (both phases) stops before
    training the VAE rather than after it.
    """
    for section in ("vae_train", "train"):
        cfg = config[section]
        for key, low, what in _TRAIN_INTS:
            if key not in cfg:
                continue
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{section}.{key}={value!r}: expected an integer >= {low} ({what})")
        if cfg.on_nonfinite not in ("abort", "skip"):
            raise ValueError(f"{section}.on_nonfinite={cfg.on_nonfinite!r}: expected 'abort' or 'skip'")
    for key, value, unset in (("data.frames", config.data.frames, False),
                              ("vae_train.frames", config.vae_train.get("frames", 0), True),
                              ("vae_train.short_frames", config.vae_train.get("short_frames", 0), True)):
        is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if not (is_int and ((unset and value == 0) or (value >= 1 and (value - 1) % 4 == 0))):
            raise ValueError(f"{key}={value!r}: expected 1 + 4k frames (1, 5, 9, 13, 17, ...)"
                             f"{', or 0 for data.frames' if unset else ''}")
    _check_short_clips(config.vae_train, config.data.frames)
    res = config.data.resolution
    try:
        as_hw(res)
    except (TypeError, ValueError):
        raise ValueError(f"data.resolution={res!r}: expected a positive frame size, an int or (H, W)") from None
    batch = config.data.batch_size
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"data.batch_size={batch!r}: expected an integer >= 1")
    vae_batch = config.vae_train.get("batch_size", 0)
    if isinstance(vae_batch, bool) or not isinstance(vae_batch, (int, np.integer)) or vae_batch < 0:
        raise ValueError(f"vae_train.batch_size={vae_batch!r}: expected an integer >= 1, or 0 for data.batch_size")
    if config.train.latents not in ("online", "cached"):
        raise ValueError(f"train.latents={config.train.latents!r}: expected 'online' (encode every step) or 'cached'")
    for section in ("vae_optim", "optim"):
        cfg = config[section]
        if cfg.decay not in ("cosine", "constant"):
            raise ValueError(f"{section}.decay={cfg.decay!r}: expected 'cosine' or 'constant'")
        for key, low in (("lr", 0.0), ("clip_norm", 0.0), ("weight_decay", 0.0), ("end_lr_factor", 0.0)):
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < low:
                raise ValueError(f"{section}.{key}={value!r}: expected a finite number >= {low:g}")
        grad_accum = cfg.get("grad_accum", 1)
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, (int, np.integer)) or grad_accum < 1:
            raise ValueError(f"{section}.grad_accum={grad_accum!r}: expected an integer >= 1 (micro-batches per step)")


def check_models(config: ml_collections.ConfigDict, models) -> None:
    """The VAE's architecture must be whole, and the DiT's patches must tile its latents of the data's clips.

    (``build_models`` has checked that the DiT takes the VAE's latent channels.)

    Checked before either phase trains, so a DiT that cannot take the latents fails before
    the VAE's hours rather than after them.
    """
    vae, dit = models.vae, models.dit
    if not vae.dim_mult:
        raise ValueError("vae.dim_mult=(): expected one channel multiplier per resolution level, e.g. (1, 2, 4, 4)")
    if len(vae.temporal_downsample) != len(vae.dim_mult) - 1:
        raise ValueError(f"vae.temporal_downsample={tuple(vae.temporal_downsample)}: expected one entry per "
                         f"downsampling, len(vae.dim_mult) - 1 = {len(vae.dim_mult) - 1}")
    patch = tuple(dit.patch_size)
    if len(patch) != 3 or any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1 for p in patch):
        raise ValueError(f"dit.patch_size={dit.patch_size!r}: expected three positive integers (t, h, w)")
    frames, res = config.data.frames, config.data.resolution
    (h, w), sf, tf = as_hw(res), vae.spatial_factor, vae.temporal_factor
    if h % sf or w % sf:
        raise ValueError(f"data.resolution={res!r}: the VAE downsamples {sf}x, so the frame size must be a "
                         f"multiple of {sf} pixels")
    latent = (1 + (frames - 1) // tf, h // sf, w // sf)
    for axis, n, p, key in zip("THW", latent, patch, (f"data.frames={frames!r}", *[f"data.resolution={res!r}"] * 2)):
        if n % p:
            raise ValueError(f"{key} gives latents of {axis}={n}, which dit.patch_size={patch} does not divide into "
                             f"whole patches")


def check_eval_split(config: ml_collections.ConfigDict, global_batch: int) -> None:
    """The DiT's eval loss needs one whole batch of validation clips (a partial batch is dropped)."""
    from vdit.data.pipeline import open_dataset

    try:
        split = open_dataset(config.data.name, config.data.data_dir or None, "validation")
    except FileNotFoundError:
        return  # no validation split: the eval loss is not computed
    if len(split) < global_batch:
        raise ValueError(f"train.eval_every={config.train.eval_every} evaluates on one batch of {global_batch} "
                         f"validation clips, but {split.name} has {len(split)}: set train.eval_every=0, or prepare "
                         f"at least {global_batch} validation clips")


def _check_short_clips(vae_train: ml_collections.ConfigDict, data_frames: int) -> None:
    short_steps, short_frames = vae_train.get("short_steps", 0), vae_train.get("short_frames", 0)
    if isinstance(short_steps, bool) or not isinstance(short_steps, (int, np.integer)) or short_steps < 0:
        raise ValueError(f"vae_train.short_steps={short_steps!r}: expected an integer >= 0 (steps on "
                         f"vae_train.short_frames-frame clips first; 0 turns them off)")
    if not short_steps:
        return
    frames = vae_train.get("frames") or data_frames
    if not short_frames:
        raise ValueError(f"vae_train.short_steps={short_steps} needs vae_train.short_frames, the length of those "
                         f"first clips (1 + 4k frames, fewer than the {frames} trained on after)")
    if short_frames >= frames:
        raise ValueError(f"vae_train.short_frames={short_frames}: expected fewer than the {frames} frames the VAE "
                         f"trains on after its first {short_steps} steps")


def check_dataset(config: ml_collections.ConfigDict, dataset, phase: str) -> None:
    """One-line errors for clip sizes the dataset does not store: nothing resizes or pads its clips."""
    h, w = dataset.resolution
    want = as_hw(config.data.resolution)
    if want != (h, w):
        fix = str(h) if h == w else f"'({h}, {w})'"
        # A VAE may train on smaller windows than stored, but data.resolution is what the DiT
        # trains on and `vdit sample` generates: it must be the stored size.
        crop = (f"; vae_train.crop={want[0]} trains the VAE on {want[0]}x{want[0]} windows"
                if phase == "vae" and want[0] == want[1] and want[0] < min(h, w) else "")
        raise ValueError(f"data.resolution={config.data.resolution!r} but {dataset.name} stores {h}x{w} frames and "
                         f"clips are never resized: set data.resolution={fix}, or prepare the dataset at "
                         f"{want[0]}x{want[1]} (vdit prepare ... --resolution){crop}")
    keys = [("data.frames", config.data.frames)]
    if phase == "vae" and config.vae_train.get("frames"):
        keys.append(("vae_train.frames", config.vae_train.frames))
    for key, frames in keys:
        if frames > dataset.frames:
            raise ValueError(f"{key}={frames} but {dataset.name} stores {dataset.frames}-frame clips: set {key} "
                             f"to at most {dataset.frames} (shorter clips are random windows of the stored ones)")
