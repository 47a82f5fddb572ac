"""Noise schedules for training and sampling: pure functions, f32 math.

Two families share one interface, ``x_t = alpha(t) * x0 + sigma(t) * eps`` with
``t`` in [0, 1] and ``t = 1`` (almost) pure noise:

* ``"flow"``: rectified flow / flow matching (SD3, Wan2.1): ``alpha = 1 - t``,
  ``sigma = t``; the model predicts the velocity ``eps - x0``. The DiT sees
  ``1000 * t``; that scaling is the caller's business, not this module's.
* ``"vp"``: variance-preserving diffusion, ``alpha^2 + sigma^2 = 1``, with the
  continuous-time versions of the DDPM ``"linear"`` and the iDDPM ``"cosine"``
  schedules; the model predicts ``eps`` or ``v = alpha * eps - sigma * x0``.

Every model output kind also has an ``"x0"`` option. Latents may have any shape
with a leading batch axis; ``t`` has shape ``(B,)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("flow", "vp")
VP_SCHEDULES = ("cosine", "linear")
PREDICTIONS = {"flow": ("velocity", "x0"), "vp": ("eps", "v", "x0")}
WEIGHTINGS = ("uniform", "min_snr", "cosmap")
T_DISTRIBUTIONS = ("uniform", "logit_normal")

# DDPM's betas 1e-4..2e-2 over 1000 steps, as rates per unit of continuous time
# (the VP-SDE of Song et al. 2021): log alpha_bar(t) = -(b0 t + (b1 - b0) t^2 / 2).
_LINEAR_BETA0, _LINEAR_BETA1 = 0.1, 20.0
# iDDPM's offset s keeps beta small near t = 0.
_COSINE_S = 0.008
# The cosine schedule reaches alpha = 0 at t = 1, where eps-prediction cannot give
# x0; flooring alpha at 1e-4 (log-SNR ~ -18) changes only t > 1 - 6e-5, and is
# close to where the 1000-step discrete cosine schedule ends.
_COSINE_MIN_ALPHA = 1e-4


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What a denoiser was trained with; hashable, so it can be a static jit arg.

    Attributes:
      kind: ``"flow"`` or ``"vp"``.
      prediction: the model's output: ``"velocity"`` or ``"x0"`` for flow;
        ``"eps"``, ``"v"`` or ``"x0"`` for vp. ``None`` picks ``"velocity"``
        (flow) or ``"eps"`` (vp).
      vp: ``"cosine"`` or ``"linear"`` for vp (``None`` picks ``"cosine"``);
        must be ``None`` for flow.
      shift: time shift ``s * t / (1 + (s - 1) * t)`` applied to training ``t``
        and to the sampling grid; ``> 1`` spends more time at high noise
        (Wan2.1 uses 3 to 5 for video, SD3 uses 3).
    """

    kind: str = "flow"
    prediction: str | None = None
    vp: str | None = None
    shift: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; valid: {', '.join(KINDS)}")
        valid = PREDICTIONS[self.kind]
        prediction = valid[0] if self.prediction is None else self.prediction
        if prediction not in valid:
            raise ValueError(f"prediction {prediction!r} does not fit kind {self.kind!r}; valid: {', '.join(valid)}")
        vp = self.vp
        if self.kind == "vp":
            vp = VP_SCHEDULES[0] if vp is None else vp
            if vp not in VP_SCHEDULES:
                raise ValueError(f"unknown vp schedule {vp!r}; valid: {', '.join(VP_SCHEDULES)}")
        elif vp is not None:
            raise ValueError(f"vp={vp!r} only applies to kind 'vp'; leave it None for 'flow'")
        shift = float(self.shift)
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        # Resolve defaults in place so equal schedules hash equally.
        object.__setattr__(self, "prediction", prediction)
        object.__setattr__(self, "vp", vp)
        object.__setattr__(self, "shift", shift)


def shift_time(t: Any, shift: float) -> Any:
    """Time shift ``shift * t / (1 + (shift - 1) * t)`` (SD3, Wan2.1, Flux).

    It keeps 0 and 1 fixed and, for ``shift > 1``, moves every other ``t``
    towards noise. For flow it divides the SNR ``((1 - t) / t)^2`` by
    ``shift^2``, the shift that keeps the noise level per image constant when
    the number of tokens grows.

    Args:
      t: times in [0, 1]: a float, numpy or jax array.
      shift: the shift factor, > 0; 1 is the identity.

    Returns:
      The shifted times, same type and shape as ``t``.
    """
    if isinstance(shift, (int, float)) and not shift > 0:  # a traced shift is the caller's to check
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1:
        return t
    return shift * t / (1 + (shift - 1) * t)


def shift_for_seq_len(
    seq_len: float,
    *,
    min_len: float = 256,
    max_len: float = 4096,
    min_shift: float = math.exp(0.5),
    max_shift: float = math.exp(1.15),
    interpolate: str = "log",
    clip: bool = True,
) -> float:
    """Resolution-dependent time shift from the number of latent tokens.

    More tokens carry more redundant signal at a given noise level, so larger
    videos want a larger shift. The shift goes through ``(min_len, min_shift)``
    and ``(max_len, max_shift)``:

    * ``interpolate="log"``: ``log(shift)`` is linear in ``seq_len``. This is
      Flux/SD3 "dynamic shifting", where ``mu = log(shift)`` runs from 0.5 to
      1.15 over 256..4096 tokens (the defaults here).
    * ``interpolate="linear"``: ``shift`` itself is linear in ``seq_len``, as
      Open-Sora 2.0 does (e.g. shift 1 at 256 tokens to 3 at 4096).

    Args:
      seq_len: tokens per sample, e.g. ``(T/pt) * (H/ph) * (W/pw)`` in latents.
      min_len: token count of the first anchor point.
      max_len: token count of the second anchor point.
      min_shift: shift at ``min_len``.
      max_shift: shift at ``max_len``.
      interpolate: ``"log"`` or ``"linear"``.
      clip: hold the shift at the anchors outside ``[min_len, max_len]``.
        Flux extrapolates, which for video token counts (tens of thousands)
        gives absurd shifts, hence the clip by default.

    Returns:
      The shift as a Python float, ready for ``Schedule(shift=...)``.
    """
    if interpolate not in ("log", "linear"):
        raise ValueError(f"unknown interpolate {interpolate!r}; valid: log, linear")
    if not (max_len > min_len and min_shift > 0 and max_shift > 0):
        raise ValueError("need max_len > min_len and positive shifts")
    frac = (seq_len - min_len) / (max_len - min_len)
    if clip:
        frac = min(max(frac, 0.0), 1.0)
    if interpolate == "log":
        return float(math.exp(math.log(min_shift) + frac * (math.log(max_shift) - math.log(min_shift))))
    shift = min_shift + frac * (max_shift - min_shift)
    if shift <= 0:
        raise ValueError(f"linear extrapolation gave shift {shift} <= 0 at seq_len={seq_len}")
    return float(shift)


def sample_t(
    key: jax.Array,
    batch_size: int,
    *,
    distribution: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> jax.Array:
    """Draws training times ``t`` of shape ``(batch_size,)``, f32 in [0, 1].

    Args:
      key: PRNG key; the only source of randomness.
      batch_size: number of times to draw.
      distribution: ``"uniform"``, or ``"logit_normal"`` (SD3:
        ``t = sigmoid(mean + std * n)``, ``n ~ N(0, 1)``; mean 0, std 1
        favours the middle of the path, where the velocity is hardest).
      mean: logit-normal location.
      std: logit-normal scale.
      shift: time shift applied after drawing (``shift_time``); pass
        ``schedule.shift`` to train on the times the sampler will visit.

    Returns:
      ``t`` with shape ``(batch_size,)``.
    """
    if distribution == "uniform":
        t = jax.random.uniform(key, (batch_size,), jnp.float32)
    elif distribution == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch_size,), jnp.float32))
    else:
        raise ValueError(f"unknown t distribution {distribution!r}; valid: {', '.join(T_DISTRIBUTIONS)}")
    return shift_time(t, shift)


def _alpha_sigma(t, schedule: Schedule, xp):
    """``(alpha, sigma)`` in the precision of ``t``; ``xp`` is numpy or jax.numpy."""
    if schedule.kind == "flow":
        return 1 - t, t
    if schedule.vp == "linear":
        log_alpha2 = -(_LINEAR_BETA0 * t + 0.5 * (_LINEAR_BETA1 - _LINEAR_BETA0) * t * t)
        # expm1 keeps sigma accurate near t = 0, where 1 - alpha^2 would cancel.
        return xp.exp(0.5 * log_alpha2), xp.sqrt(-xp.expm1(log_alpha2))
    # iDDPM cosine: alpha = cos(a) / cos(b), a = pi/2 (t+s)/(1+s), b = a(t=0).
    b = 0.5 * math.pi * _COSINE_S / (1 + _COSINE_S)
    a_max = math.acos(_COSINE_MIN_ALPHA * math.cos(b))
    a_minus_b = xp.minimum(0.5 * math.pi * t / (1 + _COSINE_S), a_max - b)  # exact 0 at t = 0
    # cos^2 b - cos^2 a = sin(a + b) sin(a - b): sigma without cancellation near t = 0.
    sigma = xp.sqrt(xp.sin(a_minus_b + 2 * b) * xp.sin(a_minus_b)) / math.cos(b)
    return xp.cos(a_minus_b + b) / math.cos(b), sigma


def check_t(t: Any) -> None:
    """Raises a ValueError naming the values when concrete times fall outside [0, 1] (or are NaN).

    Times traced under jit cannot be read, so they pass unchecked: the samplers and the
    train step build theirs from this module's functions.
    """
    if isinstance(t, jax.core.Tracer) or (isinstance(t, jax.Array) and not t.is_fully_addressable):
        return
    t = np.asarray(t, np.float32)
    bad = t[~((t >= 0) & (t <= 1))]
    if bad.size:
        raise ValueError(f"t must lie in [0, 1] (0 clean, 1 noise); got {bad.size} of {t.size} outside it, "
                         f"e.g. {bad.flat[0]:g}")


def alpha_sigma(t: jax.Array, schedule: Schedule) -> tuple[jax.Array, jax.Array]:
    """Signal and noise scales ``(alpha(t), sigma(t))`` in f32, shapes of ``t``; ``t`` in [0, 1]."""
    check_t(t)
    return _alpha_sigma(jnp.asarray(t, jnp.float32), schedule, jnp)


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-sample ``(B,)`` array (a function of ``t``) to broadcast against ``x`` (B, ...)."""
    if a.ndim > 1 or (a.ndim == 1 and a.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"t must be a scalar or one time per sample, shape ({x.shape[0]},), "
                         f"for x of shape {tuple(x.shape)}; got shape {tuple(a.shape)}")
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def add_noise(x0: jax.Array, eps: jax.Array, t: jax.Array, schedule: Schedule) -> jax.Array:
    """Noised latents ``x_t = alpha(t) * x0 + sigma(t) * eps`` in f32.

    Args:
      x0: clean latents (B, ...).
      eps: standard normal noise, shape of ``x0``.
      t: times (B,).
      schedule: the schedule.

    Returns:
      ``x_t`` (B, ...) in f32; cast to the model's dtype at the call site.
    """
    alpha, sigma = alpha_sigma(t, schedule)
    x0, eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


def _prediction_of(x0, eps, alpha, sigma, prediction):
    if prediction == "velocity":
        return eps - x0
    if prediction == "eps":
        return eps
    if prediction == "v":
        return alpha * eps - sigma * x0
    return x0


def loss_target(x0: jax.Array, eps: jax.Array, t: jax.Array, schedule: Schedule) -> jax.Array:
    """The regression target for ``schedule.prediction``, in f32.

    ``velocity = eps - x0`` (flow), ``eps``, ``v = alpha * eps - sigma * x0``
    (vp), or ``x0``. It is also what an exact denoiser outputs, given the true
    ``x0`` and ``eps``.
    """
    x0, eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
    alpha, sigma = alpha_sigma(t, schedule)
    return _prediction_of(x0, eps, _bcast(alpha, x0), _bcast(sigma, x0), schedule.prediction)


def _x0_eps_of(pred, x_t, alpha, sigma, prediction):
    """Inverts ``_prediction_of`` given ``x_t``; alpha/sigma broadcast to ``x_t``."""
    if prediction == "velocity":
        # Flow: x_t = x0 + t * v and alpha + sigma = 1.
        return x_t - sigma * pred, x_t + alpha * pred
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if prediction == "v":
        # VP only (alpha^2 + sigma^2 = 1): rotate (x_t, v) back to (x0, eps).
        return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
    return pred, (x_t - alpha * pred) / sigma


def prediction_to_x0_eps(
    pred: jax.Array, x_t: jax.Array, t: jax.Array, schedule: Schedule
) -> tuple[jax.Array, jax.Array]:
    """Converts a model output into ``(x0, eps)`` estimates, in f32.

    Samplers work in x0-space through this. Ill-posed ends are the caller's
    care: ``eps`` from an ``x0`` prediction at ``t = 0`` divides by zero.

    Args:
      pred: model output of type ``schedule.prediction`` (B, ...).
      x_t: the model's input (B, ...).
      t: times (B,).
      schedule: the schedule.

    Returns:
      ``(x0, eps)``, each (B, ...) f32.
    """
    alpha, sigma = alpha_sigma(t, schedule)
    x_t, pred = x_t.astype(jnp.float32), pred.astype(jnp.float32)
    return _x0_eps_of(pred, x_t, _bcast(alpha, x_t), _bcast(sigma, x_t), schedule.prediction)


def loss_weight(t: jax.Array, schedule: Schedule, *, weighting: str = "uniform", gamma: float = 5.0) -> jax.Array:
    """Per-sample weights (B,) for the squared error on ``loss_target``, f32.

    Args:
      t: times (B,).
      schedule: the schedule; min-SNR depends on its prediction type.
      weighting: ``"uniform"`` (ones); ``"min_snr"`` (Hang et al. 2023: the
        x0-space weight ``min(SNR, gamma)``, converted to this prediction
        type, e.g. ``min(SNR, gamma) / SNR`` for eps); ``"cosmap"`` (SD3's
        CosMap density ``2 / (pi (1 - 2t + 2t^2))``, meant for flow).
      gamma: the min-SNR clip.

    Returns:
      Weights (B,) in f32.
    """
    t = jnp.asarray(t, jnp.float32)
    if weighting == "uniform":
        return jnp.ones_like(t)
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * t + 2 * t * t))
    if weighting != "min_snr":
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    alpha, sigma = alpha_sigma(t, schedule)
    a2, s2 = alpha * alpha, sigma * sigma
    # Written without SNR = a2 / s2 itself so t = 0 (s2 = 0) and alpha = 0 stay finite.
    if schedule.prediction == "eps":  # |eps err|^2 = SNR |x0 err|^2
        return jnp.minimum(1.0, gamma * s2 / a2)
    if schedule.prediction == "x0":
        return jnp.minimum(a2 / s2, gamma)
    # v and velocity: |x0 err| = sigma |pred err|, so weight = min(SNR, gamma) * sigma^2.
    return jnp.minimum(a2, gamma * s2)
