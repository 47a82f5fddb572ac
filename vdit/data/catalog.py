"""TFDS catalog datasets (``tfds:NAME``), mapped to vdit's ``(video, caption)`` records.

Catalog video datasets (ucf101, ...) store ``Video`` features, which TFDS can
only build and decode with TensorFlow, so this path needs it (``pip install
'vdit[tf]'``); vdit's own datasets never do. Without TensorFlow, asking for a
catalog dataset is a one-line ``MissingTensorFlowError``.

With TensorFlow, ``prepare_catalog("ucf101")`` downloads and prepares the dataset
in ``array_record`` format (for random access); ``open_dataset("tfds:ucf101")``
then serves records ``{"video": uint8 (T, H, W, 3), "caption": str}``: the first
video feature cut to its central ``T`` frames (the last frame repeated if it is
shorter) and resized/center-cropped to ``H x W``, and a caption from the text
feature -- or, for classification datasets like ucf101, the label name
(``ApplyEyeMakeup`` -> ``"apply eye makeup"``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from vdit.data.common import (
    DatasetNotPreparedError,
    MissingTensorFlowError,
    SplitNotFoundError,
    decode_text,
    resize_crop_video,
    resolve_data_dir,
)

TF_EXTRA = "tf"  # pip install 'vdit[tf]'
# Known datasets: (video feature, caption feature). Others are inferred from their features.
CATALOG_FIELDS: dict[str, tuple[str, str]] = {"ucf101": ("video", "label")}
_TEXT_KEYS = ("caption", "text", "description", "prompt")


def has_tensorflow() -> bool:
    """Whether TensorFlow is importable (checked without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def require_tensorflow(what: str) -> None:
    """Raises a one-line ``MissingTensorFlowError`` naming the extra, if TF is missing."""
    if not has_tensorflow():
        raise MissingTensorFlowError(
            f"{what} needs TensorFlow (TFDS builds and decodes catalog videos with it); "
            f"install it with: pip install 'vdit[{TF_EXTRA}]'"
        )


def caption_from_label(label: str) -> str:
    """A class name as a caption: ``ApplyEyeMakeup`` -> ``apply eye makeup``, ``yo_yo`` -> ``yo yo``."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", label).replace("_", " ")
    return " ".join(words.split()).lower()


def fit_clip(video: np.ndarray, frames: int, hw: tuple[int, int]) -> np.ndarray:
    """The central ``frames`` frames of ``video`` (last frame repeated if shorter), resized to ``hw``.

    Args:
      video: uint8 ``(t, h, w, 3)`` (a grey ``(t, h, w, 1)`` is made RGB).

    Returns:
      uint8 ``(frames, H, W, 3)``.
    """
    video = np.asarray(video, np.uint8)
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    t = video.shape[0]
    if t >= frames:
        start = (t - frames) // 2
        video = video[start : start + frames]
    else:
        video = np.concatenate([video, np.repeat(video[-1:], frames - t, axis=0)])
    return resize_crop_video(video, hw)


def infer_fields(name: str, features: Any) -> tuple[str, str]:
    """The (video, caption) feature keys of catalog dataset ``name``."""
    import tensorflow_datasets as tfds

    if name in CATALOG_FIELDS:
        return CATALOG_FIELDS[name]
    keys = list(features.keys())
    video = next((k for k in keys if isinstance(features[k], tfds.features.Video)), None)
    text = next((k for k in _TEXT_KEYS if k in keys), None)
    text = text or next((k for k in keys if isinstance(features[k], tfds.features.ClassLabel)), None)
    if video is None or text is None:
        raise ValueError(f"tfds:{name}: cannot tell which features are video and caption among {keys}")
    return video, text


class CatalogSource:
    """Random-access records ``{"video", "caption"}`` over a TFDS catalog data source."""

    def __init__(self, source: Any, name: str, fields: tuple[str, str], label_names: list[str] | None,
                 frames: int, resolution: tuple[int, int]):
        self._source = source
        self._name = name
        self._video_key, self._caption_key = fields
        self._label_names = label_names
        self._frames = frames
        self._hw = tuple(resolution)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        value = record[self._caption_key]
        if self._label_names is not None:
            text = caption_from_label(self._label_names[int(value)])
        else:
            text = decode_text(value)
        return {"video": fit_clip(record[self._video_key], self._frames, self._hw), "caption": text}

    def __repr__(self) -> str:  # stable across runs: Grain compares it when restoring state
        return f"CatalogSource({self._name!r}, frames={self._frames}, resolution={self._hw})"


def _builder(name: str, data_dir: Path) -> Any:
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=str(data_dir), file_format="array_record")


def _is_prepared(builder: Any) -> bool:
    return (Path(str(builder.data_path)) / "dataset_info.json").exists()


def open_catalog_dataset(name: str, data_dir: str | os.PathLike | None, split: str, *, frames: int,
                         resolution: tuple[int, int]) -> Any:
    """``open_dataset("tfds:NAME")``: a prepared catalog dataset as a ``VideoDataset``."""
    from vdit.data.pipeline import VideoDataset

    require_tensorflow(f"tfds:{name}")
    import tensorflow_datasets as tfds

    root = resolve_data_dir(data_dir)
    builder = _builder(name, root)
    if not _is_prepared(builder):
        raise DatasetNotPreparedError(
            f"tfds:{name} is not prepared in {root}; prepare it with: vdit prepare tfds:{name} --data_dir {root}"
        )
    known = builder.info.splits  # (empty under tfds.testing.mock_data)
    if known and split.split("[")[0] not in known:  # "train[:10%]" slices are TFDS's to check
        raise SplitNotFoundError(f"tfds:{name} has no split {split!r}; it has {', '.join(sorted(known))}")
    features = builder.info.features
    fields = infer_fields(name.split("/")[0], features)
    caption_feature = features[fields[1]]
    label_names = list(caption_feature.names) if isinstance(caption_feature, tfds.features.ClassLabel) else None
    source = CatalogSource(builder.as_data_source(split=split), f"tfds:{name}/{split}", fields, label_names,
                           frames, resolution)
    return VideoDataset(name=f"tfds:{name}", split=split, source=source, frames=frames, resolution=tuple(resolution))


def prepare_catalog(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Downloads and prepares TFDS catalog dataset ``name`` as ``array_record`` (needs TensorFlow).

    This is the one vdit path that downloads, and only when asked explicitly.

    Returns:
      ``"tfds:NAME"``, for ``open_dataset``.
    """
    require_tensorflow(f"tfds:{name}")
    builder = _builder(name, resolve_data_dir(data_dir))
    builder.download_and_prepare()
    return f"tfds:{name}"
