"""Your own videos: a folder of captioned videos converted once into a TFDS dataset.

``prepare_folder(src, name)`` finds ``.mp4 .webm .gif .mov`` files under ``src``
(recursively), takes each one's caption from a sidecar ``<video stem>.txt`` or from
one ``captions.jsonl`` (``{"file": "clip.mp4", "caption": "..."}`` per line) or
``captions.csv`` (columns ``file,caption``) in ``src``, samples frames at a target
``fps`` or ``stride``, resizes the short side and center-crops every frame to
``H x W``, and writes clips of ``T = 1 + 4k`` frames as the ``array_record``
dataset ``folder:NAME`` (same ``video``/``caption`` features as moving_shapes, plus
the source ``file``). Training then reads it fast through ``open_dataset``.

A corrupt, too-short or uncaptioned file is skipped and counted in one warning at
the end; it never stops the run. Videos are decoded with mediapy, using the ffmpeg
binary of imageio-ffmpeg when none is on ``PATH``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from vdit.media import ensure_ffmpeg
from vdit.data.common import (
    LocalBuilder,
    as_hw,
    check_frames,
    make_builder,
    prefetched,
    prepared_dir,
    resize_crop,
    resolve_data_dir,
    run_builder,
)

BUILDER_NAME = "video_folder"
VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".mov")
_FILE_KEYS = ("file", "path", "video", "filename", "name")
_CAPTION_KEYS = ("caption", "text", "prompt")


class SkippedVideoWarning(UserWarning):
    """Some videos of a folder were skipped (corrupt, too short or without caption)."""


# ----------------------------------------------------------------------------- captions


def _read_caption_table(src: Path) -> dict[str, str]:
    """File name -> caption from ``captions.jsonl`` or ``captions.csv`` in ``src`` (if any)."""
    table: dict[str, str] = {}
    jsonl, csv_path = src / "captions.jsonl", src / "captions.csv"
    if jsonl.exists():
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            key = next((row[k] for k in _FILE_KEYS if k in row), None)
            text = next((row[k] for k in _CAPTION_KEYS if k in row), None)
            if key is None or text is None:
                raise ValueError(f"{jsonl}:{n}: expected keys 'file' and 'caption', got {sorted(row)}")
            table[str(key)] = str(text)
    if csv_path.exists():
        with csv_path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if rows and rows[0] and rows[0][0].strip().lower() in _FILE_KEYS:
            rows = rows[1:]  # header
        for n, row in enumerate(rows, 1):
            if len(row) < 2:
                if row:
                    raise ValueError(f"{csv_path}: row {n} needs two columns file,caption, got {row}")
                continue
            table.setdefault(row[0].strip(), row[1].strip())
    return table


def _not_a_folder(src: Path) -> OSError:
    if src.exists():
        return NotADirectoryError(f"video folder {src} is a file, expected a folder of videos")
    return FileNotFoundError(f"video folder {src} does not exist")


def find_videos(src: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """Videos under ``src`` (sorted) with their caption, or ``None`` where there is none.

    A sidecar ``<stem>.txt`` wins over ``captions.jsonl``/``captions.csv``, whose
    file names may be relative to ``src`` or bare file names.
    """
    src = Path(src)
    if not src.is_dir():
        raise _not_a_folder(src)
    table = _read_caption_table(src)
    out = []
    for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()):
        sidecar = path.with_suffix(".txt")
        if sidecar.exists():
            text = sidecar.read_text(encoding="utf-8").strip()
        else:
            rel = path.relative_to(src).as_posix()
            text = table.get(rel, table.get(path.name))
        out.append((path, text))
    return out


# ----------------------------------------------------------------------------- frames


def frame_indices(num: int, *, src_fps: float, fps: float | None, stride: int | None) -> Iterator[int]:
    """Source frame indices of the first ``num`` sampled frames (non-decreasing).

    At a target ``fps``, sample ``k`` is the source frame shown at time ``k / fps``;
    with ``stride``, it is frame ``k * stride``; with neither, every frame.
    """
    for k in range(num):
        if fps is not None:
            yield int(math.floor(k * src_fps / fps + 1e-6))
        else:
            yield k * (stride or 1)


def read_clips(
    path: str | os.PathLike,
    *,
    frames: int,
    resolution: tuple[int, int],
    fps: float | None = None,
    stride: int | None = None,
    max_clips: int = 1,
) -> np.ndarray:
    """Decodes up to ``max_clips`` consecutive clips of ``frames`` sampled frames.

    Decoding stops as soon as the last frame needed has been read.

    Returns:
      uint8 ``(N, frames, H, W, 3)``, ``N <= max_clips`` (0 if the video is too short).

    Raises:
      RuntimeError, ValueError, OSError: the file cannot be decoded.
    """
    import mediapy

    ensure_ffmpeg()
    need = frames * max_clips
    kept: list[np.ndarray] = []
    with mediapy.VideoReader(str(path)) as reader:
        wanted = frame_indices(need, src_fps=float(reader.fps or 0) or 30.0, fps=fps, stride=stride)
        target = next(wanted, None)
        for i, image in enumerate(reader):
            while target is not None and target == i:  # a frame may be sampled twice (fps > source fps)
                kept.append(resize_crop(image, resolution))
                target = next(wanted, None)
            if target is None:
                break
    n = len(kept) // frames
    if n == 0:
        return np.zeros((0, frames, *resolution, 3), np.uint8)
    return np.stack(kept[: n * frames]).reshape(n, frames, *resolution, 3)


# ----------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass(eq=False)
class VideoFolderConfig(tfds.core.BuilderConfig):
    """A folder dataset; ``name`` is the ``NAME`` of ``folder:NAME``."""

    src: str = ""
    frames: int = 17
    resolution: tuple[int, int] = (32, 32)
    fps: float | None = None
    stride: int | None = None
    clips_per_video: int = 1


def _settings(cfg: VideoFolderConfig) -> dict:
    """The settings a folder dataset was prepared with, as stored in its metadata.json."""
    keys = ("src", "frames", "resolution", "fps", "stride", "clips_per_video")
    return {k: list(getattr(cfg, k)) if k == "resolution" else getattr(cfg, k) for k in keys}


class VideoFolder(LocalBuilder):
    """TFDS builder of ``folder:NAME`` datasets (stored under ``data_dir/video_folder/NAME``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        h, w = cfg.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Captioned videos from {cfg.src}.",
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(cfg.frames, h, w, 3), dtype=np.uint8, encoding="zlib"),
                "caption": tfds.features.Text(),
                "file": tfds.features.Text(),  # source video, relative to src
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(_settings(cfg)),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict]]:
        cfg = self.builder_config
        src = Path(cfg.src)
        stats = self._vdit_stats = {"corrupt": [], "too short": [], "without caption": []}
        videos = find_videos(src)
        jobs = []
        for path, text in videos:
            if text is None:
                stats["without caption"].append(path.relative_to(src).as_posix())
            else:
                jobs.append((path, text))
        bar = getattr(self, "_vdit_bar", None)
        if bar is not None:
            bar.total = len(videos)
            bar.update(len(videos) - len(jobs))

        def decode(job):  # -> (clips, None) or (None, error)
            path, _ = job
            try:
                return read_clips(
                    path, frames=cfg.frames, resolution=cfg.resolution, fps=cfg.fps, stride=cfg.stride,
                    max_clips=cfg.clips_per_video,
                ), None
            except Exception as e:  # pylint: disable=broad-except  # any undecodable file is skipped
                return None, e

        decoded = prefetched(decode, jobs, getattr(self, "_vdit_num_threads", 0))
        for (path, text), (clips, error) in zip(jobs, decoded):
            rel = path.relative_to(src).as_posix()
            if error is not None:
                stats["corrupt"].append(rel)
            elif clips.shape[0] == 0:
                stats["too short"].append(rel)
            else:
                for c, clip in enumerate(clips):
                    yield f"{rel}#{c}", {"video": clip, "caption": text, "file": rel}
            if bar is not None:
                bar.update(1)
        self._vdit_kept = len(jobs) - len(stats["corrupt"]) - len(stats["too short"])


_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def prepare_folder(
    src: str | os.PathLike,
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    frames: int = 17,
    resolution: int | tuple[int, int] = 32,
    fps: float | None = None,
    stride: int | None = None,
    clips_per_video: int = 1,
    num_threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Converts a folder of captioned videos into the dataset ``folder:NAME``, once.

    Args:
      src: folder of ``.mp4 .webm .gif .mov`` files with captions (see module docstring).
      name: dataset name (letters, digits, ``_ . -``); read it as ``folder:NAME``.
      data_dir: dataset root; ``None`` means ``$VDIT_DATA_DIR`` or ``~/vdit_data``.
      frames: frames per clip, ``1 + 4k``.
      resolution: ``H`` (square) or ``(H, W)``; short side resized, then center-cropped.
      fps: sample frames at this rate (from each video's own frame rate); or
      stride: keep every ``stride``-th frame. Neither: every frame.
      clips_per_video: up to this many consecutive clips per video.
      num_threads: videos decoded concurrently (``None``: one per CPU core).
      overwrite: rebuild even if already prepared.
      progress: show a tqdm progress bar.

    Returns:
      ``"folder:NAME"``, for ``open_dataset``.

    Raises:
      ValueError: bad arguments, no usable video, or already prepared with other settings.
    """
    frames = check_frames(frames)
    hw = as_hw(resolution)
    if not _NAME_OK.match(name):
        raise ValueError(f"dataset name must be letters, digits, '_', '.', '-', got {name!r}")
    if fps is not None and stride is not None:
        raise ValueError("pass fps or stride, not both")
    if fps is not None and fps <= 0 or stride is not None and stride < 1 or clips_per_video < 1:
        raise ValueError(f"need fps > 0, stride >= 1, clips_per_video >= 1; got {fps}, {stride}, {clips_per_video}")
    src = Path(src).expanduser().absolute()
    if not src.is_dir():
        raise _not_a_folder(src)
    cfg = VideoFolderConfig(
        name=name, src=str(src), frames=frames, resolution=hw, fps=fps, stride=stride, clips_per_video=clips_per_video
    )
    root = resolve_data_dir(data_dir)
    builder = make_builder(VideoFolder, cfg, root)
    done = prepared_dir(builder)
    if done is not None and not overwrite:
        meta = json.loads((done / "metadata.json").read_text()) if (done / "metadata.json").exists() else {}
        if any(meta.get(k) != v for k, v in _settings(cfg).items()):
            raise ValueError(
                f"folder:{name} is already prepared in {root} with {meta}; pass overwrite=True (--overwrite) to rebuild"
            )
        return f"folder:{name}"
    if done is not None:
        shutil.rmtree(done)
    # pylint: disable-next=protected-access
    builder._vdit_num_threads = (os.cpu_count() or 1) if num_threads is None else num_threads
    try:
        run_builder(builder, total=None, desc=f"prepare folder:{name}", progress=progress, unit="video")
    except Exception:
        if getattr(builder, "_vdit_kept", None) == 0:  # TFDS refuses an empty split
            shutil.rmtree(root / BUILDER_NAME / name, ignore_errors=True)  # only TFDS's empty dirs
            raise ValueError(f"no usable video in {src}: {_skip_summary(builder._vdit_stats)}") from None
        raise
    stats = builder._vdit_stats  # pylint: disable=protected-access
    skipped = sum(len(v) for v in stats.values())
    if skipped:
        warnings.warn(
            f"folder:{name}: skipped {skipped} of {skipped + builder._vdit_kept} videos ({_skip_summary(stats)})",
            SkippedVideoWarning,
            stacklevel=2,
        )
    return f"folder:{name}"


def _skip_summary(stats: dict[str, list[str]]) -> str:
    """``"1 corrupt: a.mp4; 2 too short: b.gif, c.mp4"`` (at most 5 names each)."""
    parts = []
    for reason, names in stats.items():
        if names:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            parts.append(f"{len(names)} {reason}: {shown}")
    return "; ".join(parts) or "none skipped"
