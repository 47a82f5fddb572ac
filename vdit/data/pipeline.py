"""Loading vdit datasets: ``open_dataset`` -> ``make_loader`` (Grain) -> ``to_global``.

::

    ds = open_dataset("moving_shapes", data_dir, "train")      # or "folder:NAME", "tfds:ucf101"
    loader = make_loader(ds, batch_size=8, seed=0, worker_count=2)
    it = iter(loader)                       # grain DataLoaderIterator: get_state() / set_state()
    batch = to_global(next(it), mesh)       # global jax.Arrays, video float32 in [-1, 1]

**Batches.** ``make_loader`` yields host-local numpy dicts for this process:
``video`` uint8 ``(B, T, H, W, 3)``, ``text_ids`` int32 ``(B, L)``, ``text_mask``
bool ``(B, L)``, plus the integer labels a dataset has (``color``, ``shape``,
``direction`` int32 ``(B,)`` for moving_shapes). Video stays **uint8 on the host**:
4x less data through the worker processes' shared memory and host-to-device
transfer; ``to_global`` converts it on device to float32 in ``[-1, 1]`` (what the
train step expects), keeping its sharding.

**Sharding and order.** Each process reads its own contiguous shard of the
records (``ShardByJaxProcess``, or an explicit ``shard_index``/``shard_count``)
with the remainder dropped, so every process sees the same number of batches.
Order is a seeded global shuffle per epoch; random choices (which frames) come
from Grain's per-record RNG, itself a function of the seed and the position in
the stream. Everything is therefore a pure function of the arguments, and the
iterator's ``get_state()`` (a few bytes of JSON) restores it exactly -- with or
without worker processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import grain.python as grain
import numpy as np

from vdit.data.common import (
    DatasetNotPreparedError,
    SplitNotFoundError,
    as_hw,
    check_frames,
    decode_text,
    resolve_data_dir,
)

VIDEO_KEY = "video"
CAPTION_KEY = "caption"


@dataclasses.dataclass(frozen=True)
class VideoDataset:
    """One split of a prepared dataset, ready for ``make_loader``.

    Attributes:
      name: canonical name, e.g. ``"moving_shapes/f17_r32"`` or ``"folder:pets"``.
      split: split name.
      source: random-access records (``len``, ``[i]``): dicts with ``video`` uint8
        ``(T, H, W, 3)``, ``caption`` (str or UTF-8 bytes) and optional int labels.
      frames: frames per stored clip ``T``.
      resolution: ``(H, W)``.
      labels: vocabulary of each integer label field, e.g. ``{"color": ("red", ...)}``.
      metadata: builder metadata (e.g. moving_shapes' ``heldout_combos``).
    """

    name: str
    split: str
    source: Any
    frames: int
    resolution: tuple[int, int]
    labels: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source)


# ----------------------------------------------------------------------------- opening


def _latest_version_dir(path: Path) -> Path | None:
    """The newest ``X.Y.Z`` subdirectory of ``path`` holding a prepared dataset."""
    versions = []
    for d in path.glob("*"):
        if re.fullmatch(r"\d+\.\d+\.\d+", d.name) and (d / "dataset_info.json").exists():
            versions.append((tuple(int(x) for x in d.name.split(".")), d))
    return max(versions)[1] if versions else None


def _prepared_configs(root: Path) -> list[str]:
    """Config names prepared under ``root`` (``data_dir/<builder>``)."""
    return sorted(d.name for d in root.glob("*") if d.is_dir() and _latest_version_dir(d) is not None)


def _from_directory(path: Path, name: str, split: str) -> VideoDataset:
    """Opens split ``split`` of the prepared TFDS dataset in ``path`` (no TensorFlow)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(path))
    splits = list(builder.info.splits)
    if split not in splits:
        raise SplitNotFoundError(f"{name} has no split {split!r}; it has {', '.join(sorted(splits))}")
    features = builder.info.features
    video = features[VIDEO_KEY]
    labels = {
        k: tuple(f.names) for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)
    }
    return VideoDataset(
        name=name,
        split=split,
        source=builder.as_data_source(split=split),
        frames=int(video.shape[0]),
        resolution=(int(video.shape[1]), int(video.shape[2])),
        labels=labels,
        metadata=dict(builder.info.metadata or {}),
    )


def open_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    *,
    frames: int | None = None,
    resolution: int | tuple[int, int] | None = None,
) -> VideoDataset:
    """Opens a prepared dataset by name; never downloads or builds anything.

    Args:
      name: ``moving_shapes`` (the default variant ``f17_r32``), ``moving_shapes/<config>``
        (e.g. ``moving_shapes/f5_r16_n40-8-8``, as ``prepare_moving_shapes`` returns),
        ``folder:NAME`` (from ``prepare_folder``) or ``tfds:NAME[/CONFIG]`` (a TFDS
        catalog dataset; needs TensorFlow).
      data_dir: dataset root; ``None`` means ``$VDIT_DATA_DIR`` or ``~/vdit_data``.
      split: e.g. ``train``, ``validation``, ``heldout``.
      frames, resolution: clip size for ``tfds:`` datasets, which are cut and resized
        on the fly (prepared vdit datasets have theirs fixed at preparation).

    Raises:
      DatasetNotPreparedError: one line naming the command that prepares it.
    """
    root = resolve_data_dir(data_dir)
    if name.startswith("tfds:"):
        from vdit.data.catalog import open_catalog_dataset

        return open_catalog_dataset(
            name[len("tfds:"):], root, split, frames=check_frames(frames or 17), resolution=as_hw(resolution or 32)
        )
    if name.startswith("folder:"):
        from vdit.data.folder import BUILDER_NAME

        ds_name = name[len("folder:"):]
        path = _latest_version_dir(root / BUILDER_NAME / ds_name)
        if path is None:
            raise DatasetNotPreparedError(
                f"{name} is not prepared in {root}; prepare it with: "
                f"vdit prepare folder --src DIR --name {ds_name} --data_dir {root}"
            )
        return _from_directory(path, name, split)
    if name == "moving_shapes" or name.startswith("moving_shapes/"):
        from vdit.data import moving_shapes as ms

        config = name.partition("/")[2] or ms.MovingShapes.DEFAULT_CONFIG_NAME
        kwargs = ms.parse_config_name(config)  # validates the name
        full = f"moving_shapes/{config}"
        path = _latest_version_dir(root / "moving_shapes" / config)
        if path is None:
            flags = "".join(f" --{k} {_flag(v)}" for k, v in kwargs.items() if _flag(v) != _flag(ms.DEFAULTS[k]))
            others = [c for c in _prepared_configs(root / "moving_shapes") if c != config]
            have = f" (prepared there: {', '.join('moving_shapes/' + c for c in others)})" if others else ""
            raise DatasetNotPreparedError(
                f"{full} is not prepared in {root}{have}; prepare it with: "
                f"vdit prepare moving_shapes --data_dir {root}{flags}"
            )
        return _from_directory(path, full, split)
    raise ValueError(f"unknown dataset {name!r}; expected 'moving_shapes[/CONFIG]', 'folder:NAME' or 'tfds:NAME'")


def _flag(value: Any) -> str:
    """A CLI flag value: ``(16, 16)`` -> ``16``, ``(16, 24)`` -> ``16,24``."""
    if isinstance(value, (tuple, list)):
        return str(value[0]) if len(set(value)) == 1 and isinstance(value[0], int) else ",".join(map(str, value))
    return str(value)


# ----------------------------------------------------------------------------- loading


class ToExample(grain.RandomMapTransform):
    """Record -> model example: frame window, tokenized caption, int labels.

    A record is a dict with ``video`` uint8 ``(T, H, W, 3)``, ``caption`` and any
    number of integer labels; strings other than the caption are dropped.
    """

    def __init__(self, tokenizer: Any, frames: int | None, crop: tuple[int, int] | None = None,
                 crop_multiple: int = 1):
        self.tokenizer = tokenizer
        self.frames = frames
        self.crop = crop
        self.crop_multiple = crop_multiple

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        """Maps one record; ``rng`` is Grain's per-record generator (picks the frame and crop windows)."""
        if "latents" in record:  # a vdit.latents.LatentCache record: encoded and tokenized already
            return {k: np.asarray(v) for k, v in record.items()}
        video = np.asarray(record[VIDEO_KEY])
        t = video.shape[0]
        if self.frames is not None and self.frames < t:
            start = int(rng.integers(0, t - self.frames + 1))  # frames=1: a random frame = an image
            video = video[start : start + self.frames]
        elif self.frames is not None and self.frames > t:
            raise ValueError(f"asked for {self.frames} frames but the dataset's clips have {t}")
        if self.crop is not None:
            video = self._crop(video, rng)
        ids, mask = self.tokenizer.tokenize_one(decode_text(record[CAPTION_KEY]))
        out = {VIDEO_KEY: np.ascontiguousarray(video, np.uint8), "text_ids": ids, "text_mask": mask}
        for k, v in record.items():
            if k in (VIDEO_KEY, CAPTION_KEY):
                continue
            v = np.asarray(v)
            if v.dtype.kind in "biu":  # labels; strings and other payload are not batched
                out[k] = v.astype(np.int32)
        return out

    def _crop(self, video: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        (ch, cw), m = self.crop, self.crop_multiple
        h, w = video.shape[1:3]
        if ch > h or cw > w:
            raise ValueError(f"asked for {ch}x{cw} crops but the dataset's frames are {h}x{w}")
        # Corners on a grid of m pixels: a VAE that downsamples m times sees its stored frames'
        # latent grid, not a shifted one.
        y = m * int(rng.integers(0, (h - ch) // m + 1))
        x = m * int(rng.integers(0, (w - cw) // m + 1))
        return video[:, y : y + ch, x : x + cw]


class _NamedSource:
    """A random-access source with a stable ``repr`` (Grain checks it on ``set_state``)."""

    def __init__(self, source: Any, name: str):
        self._source = source
        self._name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Any:
        return self._source[index]

    def __repr__(self) -> str:
        return f"VideoSource({self._name!r}, n={len(self._source)})"


def make_loader(
    dataset: VideoDataset | Sequence[dict],
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    frames: int | None = None,
    crop: int | tuple[int, int] | None = None,
    crop_multiple: int = 1,
    tokenizer: Any = None,
    max_text_length: int = 64,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.DataLoader:
    """A Grain ``DataLoader`` of per-process batches; ``iter()`` it for a checkpointable iterator.

    Args:
      dataset: from ``open_dataset``, or any random-access sequence of records.
      batch_size: examples per batch *in this process* (global batch = this x processes).
      seed: shuffling and frame-window seed.
      shuffle: reshuffle globally every epoch.
      num_epochs: passes over the data; ``None`` repeats forever. Batches may span
        epochs; a last partial batch is dropped.
      frames: clip length served: ``None`` = as stored, ``1`` = images (a random frame;
        the causal VAE treats an image as a 1-frame video), otherwise a random window
        of ``1 + 4k`` consecutive frames.
      crop: frame size served, ``(H, W)`` or an int for squares: a random window of every
        clip (the same for all its frames); ``None`` = whole frames.
      crop_multiple: the window's corner lies on a grid of this many pixels.
      tokenizer: has ``tokenize_one(str) -> (ids, mask)``; default
        ``vdit.text.ByteTokenizer(max_text_length)``. Must be picklable for workers.
      max_text_length: tokens per caption for the default tokenizer.
      worker_count: Grain worker processes; ``0`` reads in this process.
      worker_buffer_size: batches buffered per worker.
      shard_index, shard_count: this process's shard; default ``jax.process_index()``
        of ``jax.process_count()``. Shards are disjoint and equal-sized.

    Returns:
      A ``grain.DataLoader``; its iterator has ``get_state()``/``set_state()``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if frames is not None:
        check_frames(frames)
    if crop is not None:
        crop = as_hw(crop)
        if crop_multiple < 1 or crop[0] % crop_multiple or crop[1] % crop_multiple:
            raise ValueError(f"crop {crop[0]}x{crop[1]} must be a multiple of crop_multiple={crop_multiple}")
    if tokenizer is None:
        from vdit.text import ByteTokenizer

        tokenizer = ByteTokenizer(max_text_length)
    if isinstance(dataset, VideoDataset):
        source = _NamedSource(dataset.source, f"{dataset.name}[{dataset.split}]")
        if frames is not None and frames > dataset.frames:
            raise ValueError(f"asked for {frames} frames but {dataset.name} stores {dataset.frames}")
        if crop is not None and (crop[0] > dataset.resolution[0] or crop[1] > dataset.resolution[1]):
            raise ValueError(f"asked for {crop[0]}x{crop[1]} crops but {dataset.name} stores "
                             f"{dataset.resolution[0]}x{dataset.resolution[1]} frames")
    else:
        source = _NamedSource(dataset, type(dataset).__name__)
    if (shard_index is None) != (shard_count is None):
        raise ValueError("pass both shard_index and shard_count, or neither")
    if shard_count is None:
        shard_options = grain.ShardByJaxProcess(drop_remainder=True)
    else:
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
        shard_options = grain.ShardOptions(shard_index, shard_count, drop_remainder=True)
    if len(source) < shard_options.shard_count:
        raise ValueError(f"{len(source)} records cannot feed {shard_options.shard_count} shards")
    global_batch = batch_size * shard_options.shard_count
    if num_epochs is not None and len(source) * num_epochs < global_batch:
        # The last partial batch is dropped, so this loader would yield nothing at all.
        most = len(source) * num_epochs // shard_options.shard_count
        raise ValueError(f"{len(source)} records x {num_epochs} epochs cannot fill one global batch of "
                         f"{global_batch}; use a batch of at most {most} per process, or more epochs")
    if worker_count > 0:
        _mark_absl_flags_parsed()
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.NoSharding(),  # one global stream; _GlobalBatchOrder splits it per process
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=_GlobalBatchOrder(sampler, batch_size, shard_options.shard_count),
        operations=[ToExample(tokenizer, frames, crop, crop_multiple), grain.Batch(batch_size, drop_remainder=True)],
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard_options,
        # Read ahead two batches, not Grain's default 500 records (GBs of large clips).
        read_options=grain.ReadOptions(num_threads=8, prefetch_buffer_size=min(500, max(16, 2 * batch_size))),
    )


class _GlobalBatchOrder:
    """Makes each process's batch a contiguous slice of one global batch.

    Grain's DataLoader gives process ``p`` of ``n`` the records ``p, p + n, ...`` of
    the sampler's stream, so a global batch would hold the right records in an order
    that depends on ``n``. This wrapper permutes the stream so that, concatenated in
    process order, the local batches equal the single-process batch exactly: training
    on 1 or 2 hosts then sees identical batches (and per-position noise).
    """

    def __init__(self, sampler: Any, local_batch: int, shard_count: int):
        self._sampler, self._b, self._n = sampler, local_batch, shard_count
        global_batch = local_batch * shard_count
        self._len = len(sampler) // global_batch * global_batch

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        # Grain compares reprs to check that a checkpoint belongs to this loader.
        return f"_GlobalBatchOrder({self._sampler!r}, local_batch={self._b}, processes={self._n})"

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self._len:
            raise IndexError(index)
        i, p = divmod(index, self._n)  # the i-th record of process p
        step, j = divmod(i, self._b)
        meta = self._sampler[(step * self._n + p) * self._b + j]
        return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)


def _mark_absl_flags_parsed() -> None:
    """Lets Grain's worker processes start in scripts that do not use ``absl.app``.

    Grain 0.2.x reads an absl flag when it starts workers, which raises
    ``UnparsedFlagAccessError`` unless flags were parsed (google/grain#1355, fixed
    upstream later). Marking them parsed keeps every flag at its default, and a
    later ``absl.app.run`` still parses the command line as usual.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------- to device


def _mesh_batch_sharding(mesh: Any, ndim: int) -> Any:
    """Batch sharding on ``mesh``: ``vdit.sharding.batch_sharding`` (axis 0 over ``data x fsdp``).

    A mesh without vdit's axes (built by hand) splits axis 0 over the batch axes it
    has, or over all its axes if it has none.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from vdit.sharding import BATCH_AXES, batch_sharding

    if all(a in mesh.axis_names for a in BATCH_AXES):
        return batch_sharding(mesh, ndim)
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or tuple(mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes))


@functools.cache
def _normalize_fn():
    import jax
    import jax.numpy as jnp

    # Elementwise, so the output keeps the input's sharding.
    # (x - 127.5) / 127.5 maps 0 and 255 to exactly -1 and 1, also when XLA turns the
    # division into a multiplication (x / 127.5 - 1 gives 1.0000001 then).
    return jax.jit(lambda v: (v.astype(jnp.float32) - 127.5) / 127.5)


def normalize_video(video: Any) -> Any:
    """uint8 ``[0, 255]`` -> float32 ``[-1, 1]`` (numpy in, numpy out; jax in, jax out)."""
    if isinstance(video, np.ndarray):
        return (video.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
    return _normalize_fn()(video)


def to_global(batch: Mapping[str, Any], sharding_or_mesh: Any, *, normalize: bool = True) -> dict[str, Any]:
    """Assembles host-local batches of all processes into global sharded ``jax.Array``s.

    Each process passes its own batch (``make_loader`` output); the global batch
    concatenates them along the leading axis (``jax.make_array_from_process_local_data``).

    Args:
      batch: dict of numpy arrays with a common leading (batch) axis; non-numeric
        leaves are dropped.
      sharding_or_mesh: a ``jax.sharding.Sharding`` for every leaf, a dict of them
        per key, or a ``Mesh``: leading axis over its ``data x fsdp`` axes
        (``vdit.sharding.batch_sharding``), the rest replicated.
      normalize: convert ``video`` from uint8 to float32 in ``[-1, 1]`` on device.

    Returns:
      dict of global ``jax.Array``s.
    """
    import jax

    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            continue
        if isinstance(sharding_or_mesh, jax.sharding.Mesh):
            sharding = _mesh_batch_sharding(sharding_or_mesh, value.ndim)
        elif isinstance(sharding_or_mesh, Mapping):
            sharding = sharding_or_mesh[key]
        else:
            sharding = sharding_or_mesh
        global_b, shards = value.shape[0] * jax.process_count(), _leading_shards(sharding)
        if global_b % shards:
            raise ValueError(
                f"global batch {global_b} of {key!r} does not divide into {shards} batch shards; "
                f"use a per-process batch size that makes it a multiple"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    if normalize and VIDEO_KEY in out and out[VIDEO_KEY].dtype == np.uint8:
        out[VIDEO_KEY] = normalize_video(out[VIDEO_KEY])
    return out


def _leading_shards(sharding: Any) -> int:
    """How many ways a ``NamedSharding`` splits the leading axis (1 for other shardings)."""
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return 1
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def describe(dataset: VideoDataset) -> str:
    """One line about a dataset: name, split, size and clip shape (for logs and the CLI)."""
    h, w = dataset.resolution
    labels = f", labels {json.dumps({k: len(v) for k, v in dataset.labels.items()})}" if dataset.labels else ""
    return f"{dataset.name} [{dataset.split}]: {len(dataset)} clips of {dataset.frames}x{h}x{w}{labels}"
