"""``moving_shapes``: vdit's built-in text-to-video benchmark, a TFDS dataset built locally.

Each clip is one saturated-colour shape on a black background, moving steadily in
one direction and staying fully in frame; its caption is
``"a {color} {shape} moving {direction}"``. A few attribute combinations
(``HELDOUT_COMBOS``) never appear in ``train`` and form the split ``heldout``, which
measures compositional generalisation; ``validation`` holds fresh clips of the
combinations ``train`` has.

Every clip is a pure function of ``(seed, split, index)``: rendering is vectorised
with numpy over chunks of clips, and the result does not depend on chunking or
worker scheduling. Videos are stored as zlib-compressed uint8 ``Tensor`` features
in ``array_record`` files, which TFDS writes and reads without TensorFlow::

    prepare_moving_shapes("~/vdit_data", num_train=20000)   # or `vdit prepare moving_shapes`
    ds = open_dataset("moving_shapes", "~/vdit_data", "train")  # vdit.data.pipeline
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from vdit.data.common import (LocalBuilder, as_hw, check_frames, make_builder, prefetched, prepared_dir,
                              resolve_data_dir, run_builder)

COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
ATTRIBUTES = {"color": COLORS, "shape": SHAPES, "direction": DIRECTIONS}

# Saturated RGB of each colour, in the order of COLORS.
COLOR_RGB = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]], np.uint8
)
# Unit motion (dx, dy) in image coordinates (y grows downwards), in the order of DIRECTIONS.
DIRECTION_XY = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], np.float32)

# Combinations never seen in training. Every colour, shape and direction -- and every
# pair of values -- still appears in train; only these triples are new.
HELDOUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "left"),
    ("green", "square", "up"),
    ("blue", "triangle", "right"),
    ("yellow", "circle", "down"),
    ("magenta", "square", "left"),
    ("cyan", "triangle", "up"),
    ("red", "square", "right"),
    ("blue", "circle", "down"),
)
ALL_COMBOS: tuple[tuple[str, str, str], ...] = tuple(itertools.product(COLORS, SHAPES, DIRECTIONS))
TRAIN_COMBOS: tuple[tuple[str, str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELDOUT_COMBOS)
SPLIT_COMBOS = {"train": TRAIN_COMBOS, "validation": TRAIN_COMBOS, "heldout": HELDOUT_COMBOS}
_SPLIT_IDS = {"train": 0, "validation": 1, "heldout": 2}

DEFAULT_FRAMES = 17
DEFAULT_RESOLUTION = 32
DEFAULT_OBJECT_SIZE = (0.25, 0.45)  # side / diameter as a fraction of min(H, W)
DEFAULT_COUNTS = (20000, 1000, 1000)  # train, validation, heldout
DEFAULT_SEED = 0
DEFAULTS = dict(
    frames=DEFAULT_FRAMES, resolution=(DEFAULT_RESOLUTION, DEFAULT_RESOLUTION), object_size=DEFAULT_OBJECT_SIZE,
    num_train=DEFAULT_COUNTS[0], num_validation=DEFAULT_COUNTS[1], num_heldout=DEFAULT_COUNTS[2], seed=DEFAULT_SEED,
)  # the parameters of a variant, as ``prepare_moving_shapes`` takes them
_MARGIN = 1.0  # px kept free between the object and the frame border
_TRAVEL = (0.5, 1.0)  # distance covered over the clip, as a fraction of the room available


def caption(color: str, shape: str, direction: str) -> str:
    """The caption of a clip: ``"a {color} {shape} moving {direction}"``."""
    return f"a {color} {shape} moving {direction}"


def combo_indices(combos: Sequence[tuple[str, str, str]]) -> np.ndarray:
    """Attribute-name triples as an int ``(N, 3)`` array of (color, shape, direction) indices."""
    return np.array(
        [(COLORS.index(c), SHAPES.index(s), DIRECTIONS.index(d)) for c, s, d in combos], np.int64
    ).reshape(-1, 3)


# ----------------------------------------------------------------------------- rendering


def sample_params(
    split: str,
    indices: np.ndarray,
    *,
    frames: int,
    resolution: tuple[int, int],
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
    seed: int = DEFAULT_SEED,
) -> dict[str, np.ndarray]:
    """Draws the attributes and the track of clips ``indices`` of ``split``.

    Clip ``i`` takes combination ``i`` of a per-split permutation of the split's
    combinations (cycled), so any run of ``len(combos)`` consecutive clips holds each
    combination once; its size, speed and position come from an RNG seeded with
    ``(seed, split, i)`` alone.

    Returns:
      ``color``, ``shape``, ``direction`` int64 ``(N,)``, ``size`` float32 ``(N,)``
      (px) and the object centre ``cx``, ``cy`` float32 ``(N, T)`` (px).
    """
    h, w = resolution
    combos = combo_indices(SPLIT_COMBOS[split])
    sid = _SPLIT_IDS[split]
    order = np.random.default_rng([seed, sid, 0, 0]).permutation(len(combos))  # stream 0: combo order
    attrs = combos[order[np.asarray(indices) % len(combos)]]  # (N, 3)
    u = np.stack([np.random.default_rng([seed, sid, 1, int(i)]).random(4) for i in indices])  # stream 1: clip i
    u = u.astype(np.float32).reshape(-1, 4)  # size, travel, start, cross position

    short = min(h, w)
    lo, hi = object_size
    size = np.maximum(3.0, short * (lo + (hi - lo) * u[:, 0]))  # (N,)
    move = DIRECTION_XY[attrs[:, 2]]  # (N, 2)
    horizontal = move[:, 0] != 0
    along_len = np.where(horizontal, w, h).astype(np.float32)
    cross_len = np.where(horizontal, h, w).astype(np.float32)
    room = np.maximum(along_len - size - 2 * _MARGIN, 0.0)
    travel = room * (_TRAVEL[0] + (_TRAVEL[1] - _TRAVEL[0]) * u[:, 1]) if frames > 1 else 0 * room
    lo_c = _MARGIN + size / 2  # lowest legal centre coordinate
    start = lo_c + (room - travel) * u[:, 2]  # lowest coordinate of the track
    cross = lo_c + np.maximum(cross_len - size - 2 * _MARGIN, 0.0) * u[:, 3]
    t = np.linspace(0.0, 1.0, frames, dtype=np.float32)[None] if frames > 1 else np.zeros((1, 1), np.float32)
    sign = move.sum(-1)[:, None]  # +1 towards larger coordinates, -1 towards smaller
    along = np.where(sign > 0, start[:, None] + travel[:, None] * t, start[:, None] + travel[:, None] * (1 - t))
    cx = np.where(horizontal[:, None], along, cross[:, None])
    cy = np.where(horizontal[:, None], cross[:, None], along)
    return dict(
        color=attrs[:, 0], shape=attrs[:, 1], direction=attrs[:, 2], size=size.astype(np.float32),
        cx=cx.astype(np.float32), cy=cy.astype(np.float32),
    )


def _signed_distance(shape: int, dx: np.ndarray, dy: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Signed distance (px, < 0 inside) of pixel offsets from a shape of half-size ``half``."""
    if shape == 0:  # circle
        return np.sqrt(dx * dx + dy * dy) - half
    if shape == 1:  # axis-aligned square
        return np.maximum(np.abs(dx), np.abs(dy)) - half
    # Isosceles triangle, apex up, filling half its bounding box: apex (0, -half),
    # base corners (+-half, +half). Max of the three edge half-plane distances.
    base = dy - half
    sides = (2 * np.abs(dx) - dy - half) * (1 / math.sqrt(5.0))
    return np.maximum(base, sides)


def render(params: dict[str, np.ndarray], resolution: tuple[int, int]) -> np.ndarray:
    """Renders clips from ``sample_params`` output; vectorised over clips and frames.

    Edges are anti-aliased (pixel coverage from the signed distance), so sub-pixel
    motion is smooth while colour stays fully saturated inside the shape.

    Returns:
      uint8 ``(N, T, H, W, 3)``.
    """
    h, w = resolution
    n, t = params["cx"].shape
    ys = np.arange(h, dtype=np.float32) + 0.5  # pixel centres
    xs = np.arange(w, dtype=np.float32) + 0.5
    cover = np.empty((n, t, h, w), np.uint8)
    for s in range(len(SHAPES)):
        sel = np.flatnonzero(params["shape"] == s)
        if not sel.size:
            continue
        dx = xs[None, None, None, :] - params["cx"][sel][:, :, None, None]  # (n_s, T, 1, W)
        dy = ys[None, None, :, None] - params["cy"][sel][:, :, None, None]  # (n_s, T, H, 1)
        half = (params["size"][sel] / 2)[:, None, None, None]
        sd = _signed_distance(s, dx, dy, half)  # (n_s, T, H, W)
        # coverage = clip(0.5 - sd, 0, 1), as uint8; in place, this is the hot loop.
        np.subtract(0.5, sd, out=sd)
        np.clip(sd, 0.0, 1.0, out=sd)
        sd *= 255.0
        sd += 0.5
        cover[sel] = sd  # truncating cast = round half up
    on = (COLOR_RGB[params["color"]] > 0).astype(np.uint8)  # (N, 3) channel on/off
    return cover[..., None] * on[:, None, None, None, :]  # (N, T, H, W, 3)


def render_clips(
    split: str,
    indices: Sequence[int] | np.ndarray,
    *,
    frames: int = DEFAULT_FRAMES,
    resolution: int | tuple[int, int] = DEFAULT_RESOLUTION,
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
    seed: int = DEFAULT_SEED,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Renders clips ``indices`` of ``split`` exactly as the dataset stores them.

    Returns:
      ``video`` uint8 ``(N, T, H, W, 3)`` and the ``sample_params`` dict.
    """
    hw = as_hw(resolution)
    params = sample_params(
        split, np.asarray(indices), frames=check_frames(frames), resolution=hw, object_size=object_size, seed=seed
    )
    return render(params, hw), params


def _render_chunk(args):
    split, start, stop, kw = args
    video, params = render_clips(split, np.arange(start, stop), **kw)
    return start, video, params


# ----------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass(eq=False)
class MovingShapesConfig(tfds.core.BuilderConfig):
    """One ``moving_shapes`` variant; ``moving_shapes_config`` builds it with its name."""

    frames: int = DEFAULT_FRAMES
    resolution: tuple[int, int] = (DEFAULT_RESOLUTION, DEFAULT_RESOLUTION)
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE
    num_train: int = DEFAULT_COUNTS[0]
    num_validation: int = DEFAULT_COUNTS[1]
    num_heldout: int = DEFAULT_COUNTS[2]
    seed: int = DEFAULT_SEED


def config_name(**kw) -> str:
    """The config name of a variant: ``f17_r32``, plus ``_o..``/``_n..``/``_s..`` for non-defaults.

    Args:
      **kw: any of ``DEFAULTS``' keys (the keyword arguments of ``prepare_moving_shapes``).

    E.g. 5 frames at 16x16 with 40/8/8 clips is ``f5_r16_n40-8-8``.
    """
    unknown = set(kw) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown moving_shapes parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **kw}
    h, w = as_hw(p["resolution"])
    name = f"f{check_frames(p['frames'])}_r{h}" + (f"x{w}" if w != h else "")
    lo, hi = (round(100 * float(x)) for x in p["object_size"])
    if (lo, hi) != tuple(round(100 * x) for x in DEFAULT_OBJECT_SIZE):
        name += f"_o{lo}-{hi}"
    counts = (p["num_train"], p["num_validation"], p["num_heldout"])
    if counts != DEFAULT_COUNTS:
        name += "_n{}-{}-{}".format(*counts)
    if p["seed"] != DEFAULT_SEED:
        name += f"_s{p['seed']}"
    return name


_NAME_RE = re.compile(r"^f(\d+)_r(\d+)(?:x(\d+))?(?:_o(\d+)-(\d+))?(?:_n(\d+)-(\d+)-(\d+))?(?:_s(\d+))?$")


def parse_config_name(name: str) -> dict:
    """Inverse of ``config_name``: the keyword arguments of a variant name."""
    m = _NAME_RE.match(name)
    if not m:
        raise ValueError(
            f"bad moving_shapes config {name!r}; expected e.g. 'f17_r32' or 'f5_r16x24_o20-40_n40-8-8_s1'"
        )
    f, h, w, olo, ohi, ntr, nva, nho, seed = m.groups()
    kw = dict(frames=int(f), resolution=(int(h), int(w or h)))
    if olo is not None:
        kw["object_size"] = (int(olo) / 100, int(ohi) / 100)
    if ntr is not None:
        kw.update(num_train=int(ntr), num_validation=int(nva), num_heldout=int(nho))
    if seed is not None:
        kw["seed"] = int(seed)
    return kw


def moving_shapes_config(**kw) -> MovingShapesConfig | str:
    """The ``MovingShapesConfig`` named after its parameters (see ``config_name``).

    For the registered default variant this is its name (TFDS refuses a second
    config object of the same name).
    """
    kw["resolution"] = as_hw(kw.get("resolution", DEFAULT_RESOLUTION))
    kw["object_size"] = tuple(float(x) for x in kw.get("object_size", DEFAULT_OBJECT_SIZE))
    lo, hi = kw["object_size"]
    if not 0 < lo <= hi < 1:
        raise ValueError(f"object_size must satisfy 0 < min <= max < 1, got {kw['object_size']}")
    for k, low in (("num_train", 1), ("num_validation", 0), ("num_heldout", 0)):  # training needs clips
        if k in kw and kw[k] < low:
            raise ValueError(f"{k} must be >= {low}, got {kw[k]}")
    if "seed" in kw and (isinstance(kw["seed"], bool) or not isinstance(kw["seed"], (int, np.integer))
                         or kw["seed"] < 0):
        raise ValueError(f"seed must be an integer >= 0, got {kw['seed']!r}")
    name = config_name(**kw)
    if name == MovingShapes.DEFAULT_CONFIG_NAME:
        return name
    return MovingShapesConfig(name=name, **kw)


class MovingShapes(LocalBuilder):
    """TFDS builder of ``moving_shapes`` (registered as ``moving_shapes``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [MovingShapesConfig(name="f17_r32")]
    DEFAULT_CONFIG_NAME = "f17_r32"

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        h, w = cfg.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description="One coloured shape on black moving steadily; captions 'a {color} {shape} moving {direction}'.",
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(cfg.frames, h, w, 3), dtype=np.uint8, encoding="zlib"),
                "caption": tfds.features.Text(),
                "color": tfds.features.ClassLabel(names=COLORS),
                "shape": tfds.features.ClassLabel(names=SHAPES),
                "direction": tfds.features.ClassLabel(names=DIRECTIONS),
            }),
            # Record i of a split is clip i: reproducible, and the loader shuffles anyway.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                heldout_combos=[list(c) for c in HELDOUT_COMBOS], frames=cfg.frames, resolution=list(cfg.resolution),
                object_size=list(cfg.object_size), seed=cfg.seed,
            ),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        counts = {"train": cfg.num_train, "validation": cfg.num_validation, "heldout": cfg.num_heldout}
        # TFDS cannot write an empty split; a split asked with 0 clips is left out.
        return {split: self._generate_examples(split, n) for split, n in counts.items() if n > 0}

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        kw = dict(frames=cfg.frames, resolution=cfg.resolution, object_size=cfg.object_size, seed=cfg.seed)
        chunk = max(1, min(256, 2**22 // (cfg.frames * cfg.resolution[0] * cfg.resolution[1])))
        jobs = [(split, s, min(s + chunk, num), kw) for s in range(0, num, chunk)]
        bar = getattr(self, "_vdit_bar", None)
        for start, video, params in prefetched(_render_chunk, jobs, getattr(self, "_vdit_num_threads", 0)):
            for j in range(video.shape[0]):
                c, s, d = (int(params[k][j]) for k in ("color", "shape", "direction"))
                yield start + j, {
                    "video": video[j], "caption": caption(COLORS[c], SHAPES[s], DIRECTIONS[d]),
                    "color": c, "shape": s, "direction": d,
                }
            if bar is not None:
                bar.update(video.shape[0])


def prepare_moving_shapes(
    data_dir: str | os.PathLike | None = None,
    *,
    frames: int = DEFAULT_FRAMES,
    resolution: int | tuple[int, int] = DEFAULT_RESOLUTION,
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
    num_train: int = DEFAULT_COUNTS[0],
    num_validation: int = DEFAULT_COUNTS[1],
    num_heldout: int = DEFAULT_COUNTS[2],
    seed: int = DEFAULT_SEED,
    num_threads: int | None = None,
    progress: bool = True,
) -> str:
    """Builds ``moving_shapes`` into ``data_dir`` (no TensorFlow, no download); a no-op if built.

    Args:
      data_dir: dataset root; ``None`` means ``$VDIT_DATA_DIR`` or ``~/vdit_data``.
      frames: frames per clip, ``1 + 4k``.
      resolution: ``H`` (square) or ``(H, W)``.
      object_size: (min, max) side/diameter of the shape as a fraction of ``min(H, W)``.
      num_train, num_validation, num_heldout: clips per split.
      seed: base seed; clip ``i`` of a split depends only on ``(seed, split, i)``.
      num_threads: background rendering threads (``None``: one per CPU core, ``0``: none);
        the data does not depend on it.
      progress: show a tqdm progress bar.

    Returns:
      The dataset name to pass to ``open_dataset``, e.g. ``"moving_shapes/f17_r32"``.
    """
    if num_threads is None:
        num_threads = os.cpu_count() or 1
    cfg = moving_shapes_config(
        frames=frames, resolution=resolution, object_size=object_size,
        num_train=num_train, num_validation=num_validation, num_heldout=num_heldout, seed=seed,
    )
    builder = make_builder(MovingShapes, cfg, resolve_data_dir(data_dir))
    name = f"moving_shapes/{builder.builder_config.name}"
    if prepared_dir(builder) is not None:
        return name
    builder._vdit_num_threads = num_threads  # pylint: disable=protected-access
    run_builder(builder, total=num_train + num_validation + num_heldout, desc=f"prepare {name}", progress=progress)
    return name
