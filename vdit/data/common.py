"""Helpers shared by the vdit datasets: where data lives, errors, building, resizing.

Every vdit dataset is a TFDS dataset stored as ``array_record`` files under
``data_dir/<builder>/<config>/<version>/`` and read back with
``builder.as_data_source()`` -- random access, no TensorFlow.

TFDS without TensorFlow (tensorflow-datasets 4.9.10, checked with TF absent and
present): the standard ``GeneratorBasedBuilder.download_and_prepare`` path works
as is for ``file_format="array_record"`` and features ``Tensor`` (zlib),
``Text``, ``ClassLabel`` and scalars -- examples are serialized with TFDS's own
protobuf copy and written by array_record, no Beam. Reading with
``as_data_source()`` / ``tfds.builder_from_directory`` / ``tfds.builder`` needs no
TF either. Two snags, handled in ``LocalBuilder``/``make_builder``: a builder
defined in an installed package trips over the undeclared ``importlib_resources``
dependency (tensorflow/datasets#11212), and ``DatasetInfo`` must be built
directly, since ``dataset_info_from_configs`` looks for metadata files next to
the code. ``Video``/``Image`` features and the catalog's video datasets do need TF.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils.py_utils import classproperty

DATA_DIR_ENV = "VDIT_DATA_DIR"


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset was opened before it was prepared; the message names the command."""


class SplitNotFoundError(FileNotFoundError, ValueError):
    """A prepared dataset has no such split (e.g. ``validation`` of a folder dataset)."""


class MissingTensorFlowError(ImportError):
    """A TFDS catalog dataset was asked for but TensorFlow is not installed."""


def default_data_dir() -> Path:
    """Where vdit keeps prepared datasets: ``$VDIT_DATA_DIR`` or ``~/vdit_data``.

    Deliberately not ``~/tensorflow_datasets``, so vdit never collides with a
    user's TensorFlow datasets.
    """
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / "vdit_data"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` as an absolute ``Path``; ``None`` means ``default_data_dir()``."""
    return (Path(data_dir).expanduser() if data_dir is not None else default_data_dir()).absolute()


def as_hw(resolution: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``resolution`` (an int for square frames, or ``(H, W)``) as ``(H, W)``."""
    if isinstance(resolution, (int, np.integer)):
        h = w = int(resolution)
    else:
        h, w = (int(r) for r in resolution)
    if h < 1 or w < 1:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return h, w


def check_frames(frames: int) -> int:
    """Checks that a clip has ``T = 1 + 4k`` frames (the causal VAE's time stride)."""
    if not isinstance(frames, (int, np.integer)) or frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 1 + 4k (1, 5, 9, 13, 17, ...), got {frames!r}")
    return int(frames)


def resize_crop(frame: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resizes the short side of an RGB frame to fit ``hw`` and center-crops it.

    One anti-aliased PIL resample from the crop box straight to ``(H, W)``, so a
    large frame is never resized at full size first.

    Args:
      frame: uint8 ``(h, w, 3)``.
      hw: target ``(H, W)``.

    Returns:
      uint8 ``(H, W, 3)``.
    """
    import PIL.Image  # mediapy's dependency; imported here to keep `import vdit.data` light.

    th, tw = hw
    h, w = frame.shape[:2]
    if (h, w) == (th, tw):
        return np.asarray(frame, np.uint8)
    scale = max(th / h, tw / w)  # short side fits, the long side is cropped
    ch, cw = th / scale, tw / scale  # crop box in source pixels
    top, left = (h - ch) / 2, (w - cw) / 2
    img = PIL.Image.fromarray(np.ascontiguousarray(frame, np.uint8))
    out = img.resize((tw, th), PIL.Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    return np.asarray(out, np.uint8)


def resize_crop_video(video: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``resize_crop`` on every frame of a uint8 ``(T, h, w, 3)`` video -> ``(T, H, W, 3)``."""
    if video.shape[1:3] == tuple(hw):
        return np.asarray(video, np.uint8)
    return np.stack([resize_crop(f, hw) for f in video])


def prepared_dir(builder: Any) -> Path | None:
    """The directory of a prepared TFDS builder's data, or ``None`` if not prepared."""
    path = Path(str(builder.data_path))
    return path if (path / "dataset_info.json").exists() else None


def decode_text(value: Any) -> str:
    """A TFDS ``Text`` value (``bytes`` from a data source, or ``str``) as ``str``."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of vdit's TFDS builders: generated locally, nothing to download.

    Works around a TFDS 4.9 bug (tensorflow/datasets#11212): the default
    ``code_path`` of a builder defined in an installed package touches the
    undeclared dependency ``importlib_resources``; we point it at the module file.
    """

    @classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # pylint: disable=invalid-overridden-method
        """The file that defines the builder class."""
        return epath.Path(inspect.getfile(cls))

    # TFDS prints "Downloading and preparing ..."; nothing is downloaded, and
    # ``run_builder``'s progress bar says what happens.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


def make_builder(cls: type, config: Any, data_dir: Path) -> Any:
    """``cls(config=config, data_dir=...)`` writing ``array_record``, without TFDS's
    "Using custom data configuration" warning (every vdit variant is a custom config)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return cls(config=config, data_dir=str(data_dir), file_format="array_record")
    finally:
        logger.setLevel(level)


def prefetched(fn: Callable[[Any], Any], jobs: list, num_threads: int) -> Iterator[Any]:
    """``map(fn, jobs)`` in order, computed up to ``2 * num_threads`` jobs ahead in threads.

    Threads suffice for dataset preparation: numpy array ops, ffmpeg pipe reads and
    TFDS's zlib compression all release the GIL, so producing the next clips
    overlaps encoding the current ones -- and no process is spawned, which would
    need a ``__main__`` guard in every user script.
    """
    if num_threads < 1 or len(jobs) < 2:
        yield from map(fn, jobs)
        return
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        pending = collections.deque(pool.submit(fn, job) for job in jobs[: 2 * num_threads])
        nxt = len(pending)
        while pending:
            result = pending.popleft().result()
            if nxt < len(jobs):
                pending.append(pool.submit(fn, jobs[nxt]))
                nxt += 1
            yield result


def run_builder(
    builder: tfds.core.DatasetBuilder, *, total: int | None, desc: str, progress: bool, unit: str = "clip"
) -> None:
    """Runs ``download_and_prepare`` with one vdit tqdm bar instead of TFDS's per-split bars.

    The builder's generators call ``self._vdit_bar.update(n)``. TFDS's (empty)
    download directory goes to a temporary directory, not into ``data_dir``.
    """
    from tqdm.auto import tqdm
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = tqdm_utils._active  # pylint: disable=protected-access
    tfds.disable_progress_bar()
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)
    builder._vdit_bar = bar  # pylint: disable=protected-access
    try:
        with tempfile.TemporaryDirectory(prefix="vdit_tfds_") as tmp:
            builder.download_and_prepare(download_dir=tmp)
    finally:
        bar.close()
        builder._vdit_bar = None  # pylint: disable=protected-access
        tqdm_utils.display_progress_bar(was_active)
