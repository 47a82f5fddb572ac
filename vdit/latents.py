"""Latents cached once to disk, so the DiT phase skips the VAE encoder every step.

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
        return LatentCache(path)
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
