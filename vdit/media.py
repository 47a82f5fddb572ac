"""Writing and reading videos through mediapy, with the ffmpeg of imageio-ffmpeg as fallback."""

from __future__ import annotations

import functools
import pathlib
import shutil
from typing import Sequence

import numpy as np


@functools.cache
def ensure_ffmpeg() -> str:
    """Points mediapy at an ffmpeg binary (PATH first, else imageio-ffmpeg's) and returns it."""
    import mediapy

    path = shutil.which("ffmpeg")
    if path is None:
        import imageio_ffmpeg

        path = imageio_ffmpeg.get_ffmpeg_exe()
    mediapy.set_ffmpeg(path)
    return path


def to_uint8(video: np.ndarray) -> np.ndarray:
    """Frames in [-1, 1] (float) to uint8 [0, 255]; uint8 input passes through."""
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video
    return np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def write_video(path: str | pathlib.Path, video: np.ndarray, fps: int = 8) -> pathlib.Path:
    """Writes ``(T, H, W, 3)`` frames as .mp4 or .gif (by suffix); returns the path."""
    import mediapy

    ensure_ffmpeg()
    path = pathlib.Path(path)
    frames = to_uint8(video)
    if path.suffix == ".gif":
        mediapy.write_video(path, frames, fps=fps, codec="gif")
    else:
        # H.264 wants even sizes; pad with black rather than distort tiny frames.
        h, w = frames.shape[1:3]
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        mediapy.write_video(path, frames, fps=fps)
    return path


def read_video(path: str | pathlib.Path) -> np.ndarray:
    """Reads a video file into uint8 ``(T, H, W, 3)``; an unreadable file is a one-line ValueError."""
    import mediapy

    ensure_ffmpeg()
    try:
        return np.asarray(mediapy.read_video(path))
    except RuntimeError as e:  # mediapy passes on ffmpeg's whole stderr; its last line says why
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"{path} is not a readable video (ffmpeg: {lines[-1] if lines else 'no reason given'})") \
            from None


def grid(videos: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """Tiles ``(N, T, H, W, 3)`` uint8 videos into one ``(T, rows*H', columns*W', 3)`` video."""
    videos = to_uint8(videos)
    n, t, h, w, c = videos.shape
    rows = -(-n // columns)
    canvas = np.zeros((t, rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
    for i, v in enumerate(videos):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y : y + h, x : x + w] = v
    return canvas


def contact_sheet(videos: np.ndarray, max_frames: int = 9) -> np.ndarray:
    """One PNG-able image: a row of evenly spaced frames per video, ``(N*H', F*W', 3)``."""
    videos = to_uint8(videos)
    n, t = videos.shape[:2]
    idx = np.unique(np.linspace(0, t - 1, min(max_frames, t)).round().astype(int))
    # Each video becomes a 1-frame "video" row of its frames side by side.
    rows = [grid(videos[i, idx][:, None], columns=len(idx))[0] for i in range(n)]
    return np.concatenate(rows, axis=0)


def write_image(path: str | pathlib.Path, image: np.ndarray) -> pathlib.Path:
    """Writes a uint8 image (PNG by suffix)."""
    import mediapy

    mediapy.write_image(path, to_uint8(image))
    return pathlib.Path(path)


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe version of a prompt."""
    keep = "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")
    while "__" in keep:
        keep = keep.replace("__", "_")
    return keep[:limit] or "empty"


def sample_names(prompts: str | Sequence[str], num_per_prompt: int = 1) -> list[str]:
    """File stems of ``vdit.sample.save_samples``: ``{prompt index:03d}_{slug}_s{sample}``."""
    from vdit.text import as_prompt_list

    return [f"{i:03d}_{slug(p)}_s{j}" for i, p in enumerate(as_prompt_list(prompts)) for j in range(num_per_prompt)]


def output_names(names: Sequence[str]) -> list[str]:
    """The file names ``write_all`` writes for ``names``: an .mp4 and a .gif each, a grid and a contact sheet."""
    return [f"{n}.{ext}" for n in names for ext in ("mp4", "gif")] + ["grid.gif", "contact_sheet.png"]


def check_can_write(out_dir: str | pathlib.Path, files: Sequence[str], *,
                    hint: str = "pass another out_dir or overwrite=True") -> None:
    """Raises a one-line error if ``out_dir`` is not a folder or already holds any of ``files``."""
    out = pathlib.Path(out_dir)
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        where = "is" if parent == out else f"is inside {parent}, which is"
        raise NotADirectoryError(f"output folder {out} {where} a file, expected a folder")
    existing = [f for f in files if (out / f).exists()]
    if existing:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise FileExistsError(f"{out} already holds {shown}; not overwriting them: {hint}")


def write_all(out_dir: str | pathlib.Path, videos: np.ndarray, names: Sequence[str], fps: int = 8, *,
              overwrite: bool = False) -> dict:
    """Writes each video as .mp4 and .gif, a GIF grid and a PNG contact sheet; returns the paths.

    Refuses (``FileExistsError``) to replace any existing file unless ``overwrite``.
    """
    out = pathlib.Path(out_dir)
    if len(names) != len(videos):
        raise ValueError(f"write_all: {len(videos)} videos but {len(names)} names")
    check_can_write(out, [] if overwrite else output_names(names))
    out.mkdir(parents=True, exist_ok=True)
    paths = {"mp4": [], "gif": []}
    for video, name in zip(videos, names):
        paths["mp4"].append(str(write_video(out / f"{name}.mp4", video, fps)))
        paths["gif"].append(str(write_video(out / f"{name}.gif", video, fps)))
    columns = int(np.ceil(np.sqrt(len(videos))))
    paths["grid"] = str(write_video(out / "grid.gif", grid(videos, columns), fps))
    paths["contact_sheet"] = str(write_image(out / "contact_sheet.png", contact_sheet(videos)))
    return paths
