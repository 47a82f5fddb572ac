"""Evaluation of text-to-video samples on ``moving_shapes``: caption adherence, temporal
consistency, VAE reconstruction PSNR and a Fréchet distance in a fixed feature space.

Everything reads pixels with the analyzer of ``vdit.analyzer`` (no downloaded
networks), so scores are reproducible anywhere::

    results = evaluate_samples(videos, prompts, real_videos=val_clips, vae=vae, vae_params=p["vae"])
    print(format_table(results))
    save_results(results, workdir / "eval.json")

**``eval.json`` schema** (``SCHEMA_VERSION`` 1); rates are fractions in [0, 1],
``null`` where undefined (no videos in a group, metric not computed):

* ``schema_version``: int; ``num_videos``: int, generated videos scored.
* ``train``, ``heldout``, ``overall``: caption adherence of the videos whose prompt
  is a training combination, a ``HELDOUT_COMBOS`` one, or any -- each
  ``{"count", "color", "shape", "direction", "all_correct", "status": {"ok",
  "none", "several", "unclear"}}``: per-attribute accuracy, the rate of all three
  right, and how many videos the analyzer found one object in (``ok``), none,
  several, or could not read (``unclear``). A video that is not ``ok`` counts as
  wrong on every attribute.
* ``confusion``: ``{attribute: {asked: {read: count}}}`` over all videos, for the
  values some prompt asked for; ``read`` is every value of the attribute (directions
  add ``"static"``) and ``"unread"`` (status not ``ok``). Shows, e.g., squares drawn
  round enough to read as circles.
* ``temporal_consistency``: mean over videos of the fraction of frames showing
  exactly one object whose hue class is the video's majority.
* ``frechet_distance``: between generated and real clips' ``clip_features``
  (``null`` without real clips); ``num_real_videos``: their number.
* ``vae_psnr_db``: mean per-clip PSNR of VAE reconstructions, dB (``null`` without a VAE).
* any ``extra`` keys the caller adds (step, config name, sampler ...).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdit.analyzer import DIRECTION_NAMES, STATUSES, Analysis, AnalyzerConfig, analyze_videos, chroma
from vdit.data.moving_shapes import ATTRIBUTES, COLORS, DIRECTIONS, HELDOUT_COMBOS, SHAPES
from vdit.media import to_uint8

SCHEMA_VERSION = 1
_UNREAD = "unread"  # confusion column of videos whose status is not "ok"
_PROMPT = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+moving\s+(\w+)\s*\.?\s*$", re.IGNORECASE)


# ----------------------------------------------------------------------------- caption adherence


def parse_prompt(prompt: str | Sequence[str]) -> tuple[str, str, str]:
    """``"a {color} {shape} moving {direction}"`` (or a triple) -> ``(color, shape, direction)``.

    Raises:
      ValueError: the prompt does not have that form or names an unknown value.
    """
    if isinstance(prompt, (bytes, str)):
        text = prompt.decode() if isinstance(prompt, bytes) else prompt
        m = _PROMPT.match(text)
        if not m:
            raise ValueError(f"prompt {text!r} is not of the form 'a {{color}} {{shape}} moving {{direction}}'")
        triple = tuple(g.lower() for g in m.groups())
    else:
        triple = tuple(str(x) for x in prompt)
    if len(triple) != 3:
        raise ValueError(f"expected a (color, shape, direction) triple, got {prompt!r}")
    for value, vocab, name in zip(triple, (COLORS, SHAPES, DIRECTIONS), ("color", "shape", "direction")):
        if value not in vocab:
            raise ValueError(f"unknown {name} {value!r} in {prompt!r}; expected one of {', '.join(vocab)}")
    return triple  # type: ignore[return-value]


def _analysis(videos: np.ndarray | Analysis, config: AnalyzerConfig | None) -> Analysis:
    """Videos analysed, or an ``Analysis`` as it is (callers analyse once, score many ways)."""
    return videos if isinstance(videos, Analysis) else analyze_videos(videos, config)


def _rate(hits: np.ndarray) -> float | None:
    """Mean of booleans; None for an empty group (JSON null, not NaN)."""
    return float(hits.mean()) if hits.size else None


def caption_adherence(
    videos: np.ndarray | Analysis,
    prompts: Sequence[str | Sequence[str]],
    *,
    heldout: Sequence[tuple[str, str, str]] = HELDOUT_COMBOS,
    config: AnalyzerConfig | None = None,
) -> dict[str, Any]:
    """How often the analyzer reads from each video the attributes its prompt asked for.

    Args:
      videos: ``(N, T, H, W, 3)`` uint8 (or floats in [-1, 1]), or their ``Analysis``.
      prompts: ``N`` prompts ``"a {color} {shape} moving {direction}"`` or triples.
      heldout: the combinations counted as ``heldout`` (all others: ``train``).
      config: analyzer thresholds.

    Returns:
      ``{"num_videos", "train", "heldout", "overall"}``, each group as in the module's
      schema: ``count``, accuracies ``color``, ``shape``, ``direction``,
      ``all_correct`` (None when the group is empty) and ``status`` counts; and
      ``"confusion"``: per attribute, what was asked -> what the analyzer read -> count.
    """
    a = _analysis(videos, config)
    targets = [parse_prompt(p) for p in prompts]
    if len(targets) != len(a):
        raise ValueError(f"got {len(a)} videos but {len(targets)} prompts")
    held = set(map(tuple, heldout))
    is_held = np.array([t in held for t in targets], bool)
    want = np.array([(COLORS.index(c), SHAPES.index(s), DIRECTIONS.index(d)) for c, s, d in targets],
                    np.int64).reshape(-1, 3)
    hits = np.stack([a.color == want[:, 0], a.shape == want[:, 1], a.direction == want[:, 2]], 1)  # (N, 3)

    def group(sel: np.ndarray) -> dict[str, Any]:
        h = hits[sel]
        return {
            "count": int(sel.sum()),
            **{k: _rate(h[:, i]) for i, k in enumerate(("color", "shape", "direction"))},
            "all_correct": _rate(h.all(1)),
            "status": {s: int((a.status[sel] == s).sum()) for s in STATUSES},
        }

    read_names = {**ATTRIBUTES, "direction": DIRECTION_NAMES}  # the analyzer may also read "static"
    confusion = {}
    for i, (attr, names) in enumerate(read_names.items()):
        got = getattr(a, attr)
        confusion[attr] = {
            asked: {**{read: int(((want[:, i] == ai) & (got == ri)).sum()) for ri, read in enumerate(names)},
                    _UNREAD: int(((want[:, i] == ai) & (got < 0)).sum())}
            for ai, asked in enumerate(ATTRIBUTES[attr]) if (want[:, i] == ai).any()
        }
    return {"num_videos": len(a), "train": group(~is_held), "heldout": group(is_held),
            "overall": group(np.ones(len(a), bool)), "confusion": confusion}


# ----------------------------------------------------------------------------- temporal consistency


def temporal_consistency(
    videos: np.ndarray | Analysis, *, per_video: bool = False, config: AnalyzerConfig | None = None
) -> float | np.ndarray:
    """Fraction of frames with exactly one object of the video's majority hue class, averaged.

    The majority is over the frames with an object; a video without any scores 0.
    Real clips score 1; flicker, objects that split, vanish or change colour score less.

    Returns:
      The mean over videos, or the ``(N,)`` per-video scores with ``per_video=True``.
    """
    a = _analysis(videos, config)
    fc = a.frame_color  # (N, T), -1 where empty
    counts = np.stack([(fc == c).sum(1) for c in range(len(COLORS))], 1)  # (N, 6)
    majority = np.where(counts.max(1) > 0, counts.argmax(1), -2)  # -2 never matches
    good = (a.frame_objects == 1) & (fc == majority[:, None])
    scores = good.mean(1) if good.size else np.zeros(len(a))
    if per_video:
        return scores
    return float(scores.mean()) if len(scores) else float("nan")


# ----------------------------------------------------------------------------- VAE reconstruction


def _db(mse: np.ndarray, max_db: float) -> np.ndarray:
    """PSNR of per-clip MSEs of [-1, 1] signals (peak-to-peak 2), capped at ``max_db``."""
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(4.0 / np.asarray(mse, np.float64)), max_db)


def psnr(x: np.ndarray, y: np.ndarray, *, max_db: float = 100.0) -> np.ndarray:
    """Per-clip PSNR in dB of videos in [-1, 1] (peak-to-peak 2, i.e. 255 on uint8 pixels).

    ``10 log10(2^2 / MSE)`` with the MSE over all pixels and channels of each clip;
    capped at ``max_db``, which identical clips get.

    Args:
      x, y: ``(N, ...)`` float arrays in [-1, 1].

    Returns:
      ``(N,)`` float64.
    """
    diff = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    return _db(np.square(diff).reshape(len(diff), -1).mean(1), max_db)


def reconstruction_psnr(
    vae: Any,
    vae_params: Any,
    videos: np.ndarray,
    *,
    batch_size: int = 8,
    chunked: bool = False,
    max_db: float = 100.0,
) -> float:
    """Mean per-clip PSNR (dB) of ``decode(encode(video).mode())`` against the video.

    Encode -> decode -> per-clip MSE is jitted once for a fixed batch shape (the last
    batch is padded by repeating its last clip), so any number of clips costs one
    compilation, and only uint8 goes in and one number per clip comes out. The VAE's
    clamped float output is compared with the input in [-1, 1] with peak-to-peak 2
    (equivalently 255 on uint8 pixels); see ``psnr``.

    Args:
      vae: a ``CausalVAE`` (anything with ``encode``/``decode`` methods of that form).
      vae_params: its parameter tree (the ``"params"`` collection).
      videos: ``(N, T, H, W, 3)`` uint8, or floats in [-1, 1].
      batch_size: clips per call.
      chunked: use the VAE's causal chunked encode/decode.
      max_db: cap of each clip's PSNR.
    """
    import flax.linen as nn

    from vdit.train import to_pixels  # here: vdit.train may one day evaluate

    videos = np.asarray(videos)
    n = len(videos)
    if n == 0:
        raise ValueError("reconstruction_psnr needs at least one video")
    bs = max(1, min(batch_size, n))
    params = nn.meta.unbox(vae_params)

    def roundtrip(module, x):
        return module.decode(module.encode(x, chunked=chunked).mode(), chunked=chunked)

    @jax.jit
    def clip_mse(p, v):
        x = to_pixels(v)
        rec = vae.apply({"params": p}, x, method=roundtrip)
        return jnp.mean(jnp.square(rec.astype(jnp.float32) - x), axis=tuple(range(1, x.ndim)))

    mse = []
    for i in range(0, n, bs):
        batch = videos[i : i + bs]
        real = len(batch)
        if real < bs:  # pad to the compiled shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], bs - real, axis=0)])
        mse.append(np.asarray(clip_mse(params, batch))[:real])
    return float(_db(np.concatenate(mse), max_db).mean())


# ----------------------------------------------------------------------------- Fréchet distance

FEATURE_FRAMES = 5  # frames sampled evenly for the random projection
FEATURE_GRID = 8  # frames are area-averaged to FEATURE_GRID x FEATURE_GRID
FEATURE_PROJ = 32  # dimensions of the fixed random projection
HUE_BINS = 12  # 30 degrees each; palette hues sit on bin centres


def _pool_matrix(n: int, g: int) -> np.ndarray:
    """``(g, n)`` matrix averaging ``n`` pixels into ``g`` cells (nearest pixel when ``n < g``)."""
    m = np.zeros((g, n), np.float32)
    if n >= g:
        m[(np.arange(n) * g) // n, np.arange(n)] = 1
    else:
        m[np.arange(g), ((np.arange(g) + 0.5) * n / g).astype(int)] = 1
    return m / m.sum(1, keepdims=True)


def _pixel_features(x: np.ndarray, floor: float, pool: tuple[np.ndarray, np.ndarray], proj: np.ndarray) -> np.ndarray:
    """Hue histogram, brightness, sharpness and projected layout of uint8 clips ``(m, T, H, W, 3)``."""
    m, t, h, w, _ = x.shape
    v = np.maximum(np.maximum(x[..., 0], x[..., 1]), x[..., 2])  # (m, T, H, W) uint8 brightness
    fg = v > 255 * floor
    n_fg = fg.reshape(m, -1).sum(1)

    # Hue histogram of the foreground, chroma-weighted, split linearly between bins.
    ca, cb = chroma(x[fg].astype(np.float32) / 255)  # foreground pixels, clip by clip
    clip = np.repeat(np.arange(m), n_fg)  # the clip of each
    weight = np.hypot(ca, cb)
    pos = (np.degrees(np.arctan2(cb, ca)) % 360) / (360 / HUE_BINS)
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    hist = sum(np.bincount(clip * HUE_BINS + (lo + j) % HUE_BINS, weight * wj, minlength=m * HUE_BINS)
               for j, wj in ((0, 1 - frac), (1, frac))).reshape(m, HUE_BINS)
    total = hist.sum(1, keepdims=True)

    # Sharpness: blur spreads brightness into half-lit rims and flattens gradients.
    vf = v.astype(np.float32) / 255
    half_lit = (fg & (v < 0.8 * 255)).reshape(m, -1).sum(1) / np.maximum(n_fg, 1)
    grad = sum(np.square(np.diff(vf, axis=ax)).reshape(m, -1).sum(1) for ax in (2, 3))
    grad /= np.maximum(np.square(vf).reshape(m, -1).sum(1), 1e-6)
    fg_frame = fg.reshape(m, t, -1).mean(-1)  # (m, T)

    frames = np.round(np.linspace(0, t - 1, FEATURE_FRAMES)).astype(int)
    u = x[:, frames].astype(np.float32) / 255
    pooled = np.einsum("ih,nthwc,jw->ntijc", pool[0], u, pool[1], optimize=True).reshape(m, -1)
    return np.concatenate([
        hist / np.maximum(total, 1e-9), total / (t * h * w),
        np.stack([vf.reshape(m, -1).mean(1), fg_frame.mean(1), fg_frame.std(1), half_lit, grad], 1),
        pooled.astype(np.float64) @ proj,
    ], 1)


def _analysis_features(a: Analysis, t: int, h: int, w: int) -> np.ndarray:
    """Shape, status and motion statistics from the analyzer, scaled to about [-1, 1]."""
    status = np.stack([a.status == s for s in STATUSES], 1)
    shape_stats = np.stack([a.fill_ratio, np.clip(a.skew, -2, 2), np.clip(a.corner, -2, 2), a.saturation,
                            a.frame_objects.mean(1), (a.frame_objects == 1).mean(1)], 1)
    size = np.array([w, h], np.float64)
    track = a.track / size  # (N, T, 2) as fractions of the frame, NaN where empty
    has = np.isfinite(track[..., 0])
    k = np.maximum(has.sum(1), 1)[:, None]
    mean_pos = np.nan_to_num(track).sum(1) / k
    s = np.arange(t) - (np.arange(t) * has).sum(1, keepdims=True) / k  # frame index, centred on the fit's
    line = mean_pos[:, None] + (a.travel / size)[:, None] * (s / max(t - 1, 1))[..., None]
    resid = np.sqrt((np.nan_to_num(track - line) ** 2).sum((1, 2)) / k[:, 0])  # off the least-squares line
    travel = a.speed * max(t - 1, 1) / min(h, w)
    motion = np.concatenate([a.travel / size, mean_pos, travel[:, None], resid[:, None]], 1)
    return np.concatenate([np.nan_to_num(shape_stats), status, np.nan_to_num(motion)], 1)


def clip_features(
    videos: np.ndarray, analysis: Analysis | None = None, *, seed: int = 0, config: AnalyzerConfig | None = None
) -> np.ndarray:
    """A fixed, hand-designed feature vector per clip, for ``frechet_distance``.

    No learned weights, and the same dimensions for any clip size:

    * hue: a 12-bin histogram of the foreground's hue weighted by chroma (split
      linearly between bins), normalised to sum 1, and the coloured fraction;
    * brightness and sharpness: mean brightness, foreground fraction and its flicker
      (std over frames), the half-lit fraction of the foreground and the gradient
      energy (both move with blur, which the moment-based shape measures ignore);
    * shape and status from the analyzer: fill ratio, skew, corner, saturation, mean
      objects per frame, frames with exactly one object, a one-hot status;
    * motion: displacement and mean position as fractions of the frame, path length,
      and the RMS deviation of the centroid track from its least-squares line;
    * layout: 5 evenly spaced frames area-pooled to 8x8x3 (960 values in [0, 1]),
      projected to 32 dims by a Gaussian matrix drawn from ``seed`` (scaled by 1/sqrt(960)).

    Args:
      videos: ``(N, T, H, W, 3)`` uint8, or floats in [-1, 1].
      analysis: ``analyze_videos(videos)`` if already computed.
      seed: seed of the random projection; compare only features of the same seed.
      config: analyzer thresholds.

    Returns:
      ``(N, 66)`` float64.
    """
    cfg = config or AnalyzerConfig()
    x = to_uint8(videos)
    n, t, h, w, _ = x.shape
    a = analysis if analysis is not None else analyze_videos(x, cfg)
    proj = np.random.default_rng(seed).standard_normal((FEATURE_FRAMES * FEATURE_GRID**2 * 3, FEATURE_PROJ))
    proj /= math.sqrt(len(proj))
    pool = (_pool_matrix(h, FEATURE_GRID), _pool_matrix(w, FEATURE_GRID))
    # Chunks bound the float copies of the clips.
    pixel = [_pixel_features(x[i : i + cfg.chunk], cfg.abs_floor, pool, proj) for i in range(0, n, cfg.chunk)]
    return np.concatenate([np.concatenate(pixel), _analysis_features(a, t, h, w)], 1).astype(np.float64)


def fit_gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased; zeros for one sample) of ``(N, D)`` features."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) == 0:
        raise ValueError(f"expected features (N, D) with N >= 1, got shape {f.shape}")
    cov = np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]) if len(f) > 1 else np.zeros((f.shape[1],) * 2)
    return f.mean(0), cov


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding eigenvalues -> 0)."""
    vals, vecs = np.linalg.eigh(0.5 * (m + m.T))
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def gaussian_frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``.

    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1^1/2 cov2 cov1^1/2)^1/2)``; the
    trace term uses eigendecompositions of symmetric PSD matrices only (no scipy),
    so it is symmetric and exact for singular covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    s1 = _sqrt_psd(cov1)
    cross = np.linalg.eigvalsh(0.5 * ((s1 @ cov2 @ s1) + (s1 @ cov2 @ s1).T))
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)
    return max(d, 0.0)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets."""
    return gaussian_frechet_distance(*fit_gaussian(features_a), *fit_gaussian(features_b))


def video_frechet_distance(generated: np.ndarray, real: np.ndarray, *, seed: int = 0) -> float:
    """Fréchet distance between generated and real clips in the ``clip_features`` space."""
    return frechet_distance(clip_features(generated, seed=seed), clip_features(real, seed=seed))


# ----------------------------------------------------------------------------- reports


def _jsonable(x: Any) -> Any:
    """numpy scalars -> Python, non-finite floats -> None, recursively."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


def summarize(
    adherence: Mapping[str, Any],
    *,
    temporal_consistency: float | None = None,
    frechet_distance: float | None = None,
    num_real_videos: int | None = None,
    vae_psnr_db: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assembles the ``eval.json`` dict (module docstring) from computed metrics; JSON-safe."""
    out = {
        "schema_version": SCHEMA_VERSION,
        "num_videos": adherence["num_videos"],
        "train": adherence["train"],
        "heldout": adherence["heldout"],
        "overall": adherence["overall"],
        "confusion": adherence.get("confusion"),
        "temporal_consistency": temporal_consistency,
        "frechet_distance": frechet_distance,
        "num_real_videos": num_real_videos,
        "vae_psnr_db": vae_psnr_db,
    }
    for k, v in (extra or {}).items():
        if k in out:
            raise ValueError(f"extra key {k!r} would overwrite a metric")
        out[k] = v
    return _jsonable(out)


def evaluate_samples(
    videos: np.ndarray,
    prompts: Sequence[str | Sequence[str]],
    *,
    real_videos: np.ndarray | None = None,
    vae: Any = None,
    vae_params: Any = None,
    vae_videos: np.ndarray | None = None,
    psnr_batch_size: int = 8,
    feature_seed: int = 0,
    config: AnalyzerConfig | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """All metrics of generated ``videos`` for ``prompts``, as the ``eval.json`` dict.

    Args:
      videos: generated ``(N, T, H, W, 3)`` uint8, or floats in [-1, 1].
      prompts: their prompts (strings or triples).
      real_videos: reference clips (e.g. the validation split) for the Fréchet distance.
      vae, vae_params: a VAE for ``reconstruction_psnr`` (skipped when None).
      vae_videos: clips to reconstruct (default ``real_videos``).
      psnr_batch_size: batch size of the VAE round trip.
      feature_seed: seed of ``clip_features``' random projection.
      config: analyzer thresholds.
      extra: keys to add (step, config name ...).
    """
    a = analyze_videos(videos, config)
    fd = None
    if real_videos is not None and len(real_videos):
        fd = frechet_distance(clip_features(videos, a, seed=feature_seed, config=config),
                              clip_features(real_videos, seed=feature_seed, config=config))
    vae_psnr = None
    if vae is not None:
        recon = vae_videos if vae_videos is not None else real_videos
        if recon is None:
            raise ValueError("reconstruction PSNR needs vae_videos or real_videos")
        vae_psnr = reconstruction_psnr(vae, vae_params, recon, batch_size=psnr_batch_size)
    return summarize(
        caption_adherence(a, prompts, config=config),
        temporal_consistency=temporal_consistency(a),
        frechet_distance=fd,
        num_real_videos=None if real_videos is None else len(real_videos),
        vae_psnr_db=vae_psnr,
        extra=extra,
    )


def save_results(results: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes ``results`` as indented strict JSON (no NaN), creating parent directories."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(results), f, indent=2, allow_nan=False)
        f.write("\n")


def format_table(results: Mapping[str, Any]) -> str:
    """A short text table of an ``eval.json`` dict: adherence per split, then the other metrics."""

    def num(x: Any, fmt: str = "{:.3f}") -> str:
        return "-" if x is None else fmt.format(x)

    lines = [f"{'split':<8} {'n':>5} {'color':>6} {'shape':>6} {'dir':>6} {'all3':>6}  not ok (none/several/unclear)"]
    for split in ("train", "heldout", "overall"):
        g = results.get(split) or {}
        st = g.get("status", {})
        lines.append(
            f"{split:<8} {g.get('count', 0):>5} "
            + " ".join(f"{num(g.get(k)):>6}" for k in ("color", "shape", "direction", "all_correct"))
            + f"  {st.get('none', 0)}/{st.get('several', 0)}/{st.get('unclear', 0)}"
        )
    misread = sorted(((f"{asked}->{read}", n) for rows in (results.get("confusion") or {}).values()
                      for asked, row in rows.items() for read, n in row.items() if read != asked and n),
                     key=lambda pair: -pair[1])  # stable: ties keep color, shape, direction order
    if misread:
        lines.append("most misread: " + ", ".join(f"{k} {n}" for k, n in misread[:4]))
    lines.append(
        f"temporal consistency {num(results.get('temporal_consistency'))}"
        f" | Fréchet distance {num(results.get('frechet_distance'), '{:.2f}')}"
        f" | VAE PSNR {num(results.get('vae_psnr_db'), '{:.2f}')} dB"
    )
    return "\n".join(lines)
