"""A Fréchet distance between sets of ``moving_shapes``-like clips in a fixed feature space.

FID-style, but with no downloaded network: ``clip_features`` are hand-designed
statistics of hue, brightness, sharpness, layout, shape and motion (from the pixel
analyzer of ``vdit.analyzer``), the same anywhere and for any clip size::

    fd = frechet_distance(clip_features(generated), clip_features(real_clips))
"""

from __future__ import annotations

import math

import numpy as np

from vdit.analyzer import STATUSES, Analysis, AnalyzerConfig, analyze_videos, chroma
from vdit.media import to_uint8

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
