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
* ``vae_agreement``: how often the analyzer reads the same color, shape and direction
  in a VAE reconstruction as in its input (``attribute_agreement``), ``{"color",
  "shape", "direction", "all_correct", "count"}``; ``null`` without a VAE. Roughly
  the best a DiT trained on this VAE's latents can score.
* ``shape_measures``: ``shape_measures`` of the generated videos by the shape asked
  (``generated``), of the real clips and of the VAE's reconstructions by the shape
  the analyzer reads in the real clip (``real``, ``vae``; absent without them).
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

from vdit.analyzer import DIRECTION_NAMES, STATUSES, Analysis, AnalyzerConfig, analyze_videos
from vdit.data.moving_shapes import ATTRIBUTES, COLORS, DIRECTIONS, HELDOUT_COMBOS, SHAPES
from vdit.frechet import clip_features, frechet_distance

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


def shape_measures(videos: np.ndarray | Analysis, shapes: Sequence[str | int],
                   *, config: AnalyzerConfig | None = None) -> dict[str, dict[str, Any]]:
    """Medians of the analyzer's shape measures per shape, over the videos it reads.

    ``shapes`` is the shape each video should show (asked for, or the truth). Where the
    confusion matrix says *that* squares are read as circles, this says *how*: a square
    drawn round has a ``corner`` between a circle's 0 and a square's 0.6 (module
    docstring of ``vdit.analyzer``); circles and squares with the same medians were
    drawn alike, whatever the prompt.

    Returns:
      ``{shape: {"count", "fill_ratio", "skew", "corner"}}`` for each shape present.
    """
    a = _analysis(videos, config)
    idx = np.array([SHAPES.index(s) if isinstance(s, str) else int(s) for s in shapes], np.int64)
    if len(idx) != len(a):
        raise ValueError(f"got {len(a)} videos but {len(idx)} shapes")
    out = {}
    for k, name in enumerate(SHAPES):
        sel = (idx == k) & (a.status == "ok")
        if (idx == k).any():
            out[name] = {"count": int(sel.sum()), **{m: float(np.median(getattr(a, m)[sel])) if sel.any() else None
                                                     for m in ("fill_ratio", "skew", "corner")}}
    return out


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


def vae_roundtrip(
    vae: Any,
    vae_params: Any,
    videos: np.ndarray,
    *,
    batch_size: int = 8,
    chunked: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``decode(encode(video).mode())`` of every clip, and each clip's MSE against its input.

    Jitted once for a fixed batch shape (the last batch is padded by repeating its
    last clip), so any number of clips costs one compilation. The MSE compares the
    VAE's clamped float output with the input in [-1, 1].

    Args:
      vae: a ``CausalVAE`` (anything with ``encode``/``decode`` methods of that form).
      vae_params: its parameter tree (the ``"params"`` collection).
      videos: ``(N, T, H, W, 3)`` uint8, or floats in [-1, 1].
      batch_size: clips per call.
      chunked: use the VAE's causal chunked encode/decode.

    Returns:
      The reconstructions ``(N, T, H, W, 3)`` uint8 and the per-clip MSE ``(N,)``.
    """
    import flax.linen as nn

    from vdit.train import to_pixels  # here: vdit.train may one day evaluate

    videos = np.asarray(videos)
    n = len(videos)
    if n == 0:
        raise ValueError("a VAE round trip needs at least one video")
    bs = max(1, min(batch_size, n))
    params = nn.meta.unbox(vae_params)

    def roundtrip(module, x):
        return module.decode(module.encode(x, chunked=chunked).mode(), chunked=chunked)

    @jax.jit
    def run(p, v):
        x = to_pixels(v)
        rec = jnp.clip(vae.apply({"params": p}, x, method=roundtrip).astype(jnp.float32), -1, 1)
        mse = jnp.mean(jnp.square(rec - x), axis=tuple(range(1, x.ndim)))
        return jnp.round((rec + 1) * 127.5).astype(jnp.uint8), mse

    recs, mse = [], []
    for i in range(0, n, bs):
        batch = videos[i : i + bs]
        real = len(batch)
        if real < bs:  # pad to the compiled shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], bs - real, axis=0)])
        r, m = run(params, batch)
        recs.append(np.asarray(r)[:real])
        mse.append(np.asarray(m)[:real])
    return np.concatenate(recs), np.concatenate(mse)


def reconstruction_psnr(
    vae: Any,
    vae_params: Any,
    videos: np.ndarray,
    *,
    batch_size: int = 8,
    chunked: bool = False,
    max_db: float = 100.0,
) -> float:
    """Mean per-clip PSNR (dB) of ``vae_roundtrip``'s reconstructions against the clips.

    Peak-to-peak 2 on [-1, 1] (equivalently 255 on uint8 pixels); see ``psnr``.
    ``max_db`` caps each clip's PSNR. The other arguments are ``vae_roundtrip``'s.
    """
    _, mse = vae_roundtrip(vae, vae_params, videos, batch_size=batch_size, chunked=chunked)
    return float(_db(mse, max_db).mean())


def attribute_agreement(
    videos: np.ndarray | Analysis, reference: np.ndarray | Analysis, *, config: AnalyzerConfig | None = None
) -> dict[str, float | None]:
    """How often the analyzer reads the same attributes in ``videos`` as in ``reference``.

    For VAE reconstructions against their inputs: a VAE that rounds a square's corners
    off loses ``shape`` here, whatever its PSNR, and no DiT trained on its latents can
    draw what it cannot decode. Counted over the reference clips the analyzer reads
    (status ``ok``); a reconstruction it cannot read disagrees on every attribute.

    Returns:
      ``{"color", "shape", "direction", "all_correct", "count"}``: agreement rates
      (``None`` when no reference clip is read) and the number of clips counted.
    """
    a, ref = _analysis(videos, config), _analysis(reference, config)
    if len(a) != len(ref):
        raise ValueError(f"attribute agreement needs as many videos as references, got {len(a)} and {len(ref)}")
    keep = ref.status == "ok"
    same = {k: (getattr(a, k) == getattr(ref, k))[keep] & (a.status[keep] == "ok") for k in ATTRIBUTES}
    out = {k: _rate(v) for k, v in same.items()}
    out["all_correct"] = _rate(np.logical_and.reduce([same[k] for k in ATTRIBUTES])) if keep.any() else None
    out["count"] = int(keep.sum())
    return out


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
    vae_agreement: Mapping[str, Any] | None = None,
    shape_measures: Mapping[str, Any] | None = None,
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
        "vae_agreement": vae_agreement,
        "shape_measures": shape_measures,
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
      vae, vae_params: a VAE for ``vae_psnr_db`` and ``vae_agreement`` (skipped when None).
      vae_videos: clips to reconstruct (default ``real_videos``).
      psnr_batch_size: batch size of the VAE round trip.
      feature_seed: seed of ``clip_features``' random projection.
      config: analyzer thresholds.
      extra: keys to add (step, config name ...).
    """
    a = analyze_videos(videos, config)
    measures = {"generated": shape_measures(a, [parse_prompt(p)[1] for p in prompts], config=config)}
    fd = None
    if real_videos is not None and len(real_videos):
        ra = analyze_videos(real_videos, config)
        measures["real"] = shape_measures(ra, ra.shape, config=config)
        fd = frechet_distance(clip_features(videos, a, seed=feature_seed, config=config),
                              clip_features(real_videos, ra, seed=feature_seed, config=config))
    vae_psnr = agreement = None
    if vae is not None:
        clips = vae_videos if vae_videos is not None else real_videos
        if clips is None:
            raise ValueError("reconstruction PSNR needs vae_videos or real_videos")
        recon, mse = vae_roundtrip(vae, vae_params, clips, batch_size=psnr_batch_size)
        vae_psnr = float(_db(mse, 100.0).mean())
        recon_a, clips_a = analyze_videos(recon, config), analyze_videos(clips, config)
        agreement = attribute_agreement(recon_a, clips_a, config=config)
        measures["vae"] = shape_measures(recon_a, clips_a.shape, config=config)
    return summarize(
        caption_adherence(a, prompts, config=config),
        temporal_consistency=temporal_consistency(a),
        frechet_distance=fd,
        num_real_videos=None if real_videos is None else len(real_videos),
        vae_psnr_db=vae_psnr,
        vae_agreement=agreement,
        shape_measures=measures,
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
    agree = results.get("vae_agreement")
    if agree and agree.get("count"):
        lines.append("VAE reconstructions keep color/shape/direction in "
                     + "/".join(num(agree.get(k), "{:.0%}") for k in ("color", "shape", "direction"))
                     + f" of {agree['count']} validation clips")
    corners = [(src, {s: m["corner"] for s, m in (results.get("shape_measures") or {}).get(src, {}).items()
                      if s in ("circle", "square")}) for src in ("generated", "vae", "real")]
    corners = [(src, c) for src, c in corners if c]
    if corners:
        lines.append(f"median corner (square above {AnalyzerConfig().corner_bound:g}): " + " | ".join(
            f"{src} " + ", ".join(f"{s} {num(v, '{:.2f}')}" for s, v in c.items()) for src, c in corners))
    return "\n".join(lines)
