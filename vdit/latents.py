"""Latents cached once to disk, so the DiT phase skips the VAE encoder every step, and
the per-channel latent statistics the DiT's latents are normalised with.

``measure_latent_stats`` encodes the first clips of a dataset and returns the
per-channel mean and standard deviation of the posterior means: a VAE trained from
scratch has no published statistics (Wan2.1's are in ``configs/_base.py``), and a
DiT learns far faster on unit-variance latents.

``build_latent_cache`` encodes a dataset's clips (posterior means, normalised) with a
frozen VAE and writes ``latents.npy``, ``text_ids.npy`` and ``text_mask.npy`` into a
folder, atomically (a temporary folder renamed at the end), so an interrupted build is
never mistaken for a finished one. ``LatentCache`` reads them back as a random-access
source for ``vdit.data.pipeline.make_loader``.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

FILES = ("latents", "text_ids", "text_mask")


class LatentCache:
    """Random-access records ``{"latents", "text_ids", "text_mask"}`` from memory-mapped arrays."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        if not (self.path / "meta.json").exists():
            raise FileNotFoundError(f"no latent cache in {self.path}")
        self.meta = json.loads((self.path / "meta.json").read_text())
        self._arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r") for name in FILES}

    def __len__(self) -> int:
        return len(self._arrays["latents"])

    def __getitem__(self, index: int) -> dict:
        return {name: np.array(a[index]) for name, a in self._arrays.items()}

    def __repr__(self) -> str:  # Grain checks the source's repr when restoring iterator state
        return f"LatentCache({str(self.path)!r}, n={len(self)})"


def measure_latent_stats(dataset, *, models, vae_params, mesh, batch_size: int, frames: int | None,
                         num_clips: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` (float64 ``(z_dim,)``) of the raw posterior means of ``num_clips`` clips.

    The first ``num_clips`` clips of ``dataset`` (rounded down to whole global batches,
    at least one) are encoded sharded over ``mesh``; every process gets the same numbers.
    ``models.vae`` must not normalise (its ``latents_mean``/``latents_std`` are None).
    """
    from vdit.data.pipeline import make_loader, to_global
    from vdit.sharding import replicated
    from vdit.train import encode_latents

    if models.vae.latents_mean is not None or models.vae.latents_std is not None:
        raise ValueError("measure_latent_stats needs a VAE without latents_mean/latents_std (raw latents)")
    batches = max(1, min(num_clips, len(dataset)) // batch_size)
    if len(dataset) < batch_size:
        raise ValueError(f"{len(dataset)} clips are fewer than one global batch of {batch_size}")
    loader = make_loader(dataset, batch_size=batch_size // jax.process_count(), shuffle=False, num_epochs=1,
                         frames=frames, tokenizer=models.text.tokenizer, max_text_length=models.text.max_length)

    def batch_moments(params, video):  # per-channel E[z] and E[z^2] of one global batch
        z = encode_latents(models.vae, params, video)
        axes = tuple(range(z.ndim - 1))
        return jnp.mean(z, axis=axes), jnp.mean(jnp.square(z), axis=axes)

    moments = jax.jit(batch_moments, out_shardings=replicated(mesh))  # readable on every process

    first, second = [], []
    bar = tqdm(total=batches, desc="latent statistics", disable=not progress or jax.process_index())
    for i, host_batch in enumerate(loader):
        if i == batches:
            break
        m1, m2 = moments(vae_params, to_global(host_batch, mesh, normalize=False)["video"])
        first.append(np.asarray(m1, np.float64))
        second.append(np.asarray(m2, np.float64))
        bar.update(1)
    bar.close()
    mean = np.mean(first, axis=0)
    std = np.sqrt(np.maximum(np.mean(second, axis=0) - np.square(mean), 0.0))
    return mean, np.maximum(std, 1e-6)


def build_latent_cache(path: str | pathlib.Path, dataset, *, models, vae_params, mesh, batch_size: int,
                       frames: int | None, meta: dict | None = None, progress: bool = True) -> LatentCache:
    """Encodes every full global batch of ``dataset`` once and returns the cache (reused if present).

    All processes encode their share of each global batch; process 0 gathers and writes.
    A final partial batch is dropped, as in training.
    """
    from jax.experimental import multihost_utils

    from vdit.data.pipeline import make_loader, to_global
    from vdit.train import encode_latents

    path = pathlib.Path(path)
    if (path / "meta.json").exists():
        cache = LatentCache(path)
        # The cache holds token ids too: one written for another dataset or tokenizer would train on wrong captions.
        stale = {k: (cache.meta[k], v) for k, v in (meta or {}).items() if k in cache.meta and cache.meta[k] != v}
        if stale:
            k, (was, now) = next(iter(stale.items()))
            raise ValueError(f"the latent cache {path} was built with {k}={was!r}, this run has {k}={now!r}; "
                             f"delete {path} to rebuild it, or use another workdir")
        return cache
    loader = make_loader(dataset, batch_size=batch_size // jax.process_count(), shuffle=False, num_epochs=1,
                         frames=frames, tokenizer=models.text.tokenizer, max_text_length=models.text.max_length)
    encode = jax.jit(lambda p, v: encode_latents(models.vae, p, v))
    parts = {name: [] for name in FILES}
    total = len(dataset) // batch_size
    for host_batch in tqdm(loader, total=total, desc="cache latents", disable=not progress or jax.process_index()):
        batch = to_global(host_batch, mesh, normalize=False)
        out = {"latents": encode(vae_params, batch["video"]), "text_ids": batch["text_ids"],
               "text_mask": batch["text_mask"]}
        if jax.process_count() > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
        for name in FILES:
            parts[name].append(np.asarray(out[name]))
    if not parts["latents"]:
        raise ValueError(f"{len(dataset)} clips are fewer than one global batch of {batch_size}; nothing to cache")
    if jax.process_index() == 0:
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in FILES:
            np.save(tmp / f"{name}.npy", np.concatenate(parts[name]))
        (tmp / "meta.json").write_text(json.dumps(dict(meta or {}, count=sum(len(p) for p in parts["latents"]))))
        tmp.rename(path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("vdit latent cache written")
    return LatentCache(path)
