"""Samplers and classifier-free guidance; the whole loop compiles once.

``sample(denoise_fn, noise, schedule=..., sampler=..., num_steps=...)``
integrates from ``t = 1`` (noise) to ``t = 0`` on the grid
``shift_time(linspace(1, 0, num_steps + 1), schedule.shift)``, as Wan2.1 and
diffusers' flow-matching schedulers do. The last step always lands on the
model's x0 estimate (diffusers' ``final_sigmas_type="zero"``).

Design: every schedule-dependent coefficient depends only on static data
(``num_steps``, the schedule), so it is computed once in float64 numpy and
fed to one ``lax.scan`` as per-iteration rows. Each scan iteration calls the
model exactly once (Heun alternates predictor and corrector iterations), so
the model is traced once and appears once in the compiled program, whatever
the sampler and step count. Multistep solvers carry their history in the scan
state.

Samplers (all work in x0-space via ``prediction_to_x0_eps``):

* ``euler``, ``heun``: the flow ODE ``dx/dt = v``; Heun costs
  ``2 * num_steps - 1`` model calls (its last step is Euler, to t = 0).
* ``dpmpp_2m``: DPM-Solver++(2M), midpoint form (Lu et al. 2022).
* ``unipc``: UniPC, order 2, B(h) = expm1(h) ("bh2"), x0-prediction, with the
  UniC corrector reusing each model call (Zhao et al. 2023); matches diffusers'
  ``UniPCMultistepScheduler`` defaults, which Wan2.1 samples with.
* ``ddim``: DDIM for VP schedules, ``eta = 0`` deterministic, ``eta > 0``
  stochastic with an explicit key. (For flow, DDIM and Euler coincide.)

The two exponential-integrator solvers work for flow and VP schedules alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdit.schedule import Schedule, _alpha_sigma, _x0_eps_of, shift_time

# Sampler name -> schedule kinds it applies to.
SAMPLERS = {
    "euler": ("flow",),
    "heun": ("flow",),
    "dpmpp_2m": ("flow", "vp"),
    "unipc": ("flow", "vp"),
    "ddim": ("vp",),
}

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

# Flow has alpha(1) = 0, so log-SNR(1) = -inf; like diffusers' UniPC (which
# moves sigma_0 to 1 - 1e-6) we floor alpha at 1e-6 inside lambda only.
_MIN_ALPHA_FOR_LAMBDA = 1e-6


def time_grid(num_steps: int, schedule: Schedule) -> np.ndarray:
    """The sampling times ``t_0 = 1 > ... > t_num_steps = 0``, float64 numpy."""
    return shift_time(np.linspace(1.0, 0.0, num_steps + 1), schedule.shift)


def num_model_calls(sampler: str, num_steps: int) -> int:
    """How many times ``sample`` evaluates the model (NFE) for ``num_steps``."""
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def check_options(sampler: str, schedule: Schedule, num_steps: int, eta: float, key) -> None:
    """Raises a one-line ``ValueError`` for options ``sample`` cannot run (callers check before compiling)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if schedule.kind not in SAMPLERS[sampler]:
        fits = [name for name, kinds in SAMPLERS.items() if schedule.kind in kinds]
        raise ValueError(
            f"sampler {sampler!r} does not fit a {schedule.kind!r} schedule; "
            f"valid for {schedule.kind}: {', '.join(fits)}"
        )
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta only applies to sampler 'ddim', got eta={eta} with {sampler!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta > 0 and key is None:
        raise ValueError("ddim with eta > 0 draws noise: pass key=jax.random.key(...)")


def _row_keys(key, batch: int) -> jax.Array:
    """One typed PRNG key per batch row: ``key`` folded with each row index, or a batch of keys as given.

    Per-row keys make a row's noise independent of the batch it is sampled in.
    """
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # raw uint32 keys: (2,) or (B, 2)
    if key.shape == ():
        return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch))
    if key.shape != (batch,):
        raise ValueError(f"key must be one PRNG key or one per row ({batch},), got keys of shape {key.shape}")
    return key


def _step_rows(t, alpha, sigma) -> dict[str, np.ndarray]:
    """Model-input rows for one model call per grid step ``i < n``."""
    return {"t": t[:-1], "alpha": alpha[:-1], "sigma": sigma[:-1]}


def _euler_rows(t, alpha, sigma):
    return {**_step_rows(t, alpha, sigma), "dt": np.diff(t)}


def _heun_rows(t, alpha, sigma):
    n = len(t) - 1
    j = np.arange(2 * n - 1)
    i, is_pred = j // 2, j % 2 == 0
    t_idx = np.where(is_pred, i, i + 1)  # the corrector evaluates at the step's end
    return {
        "t": t[t_idx],
        "alpha": alpha[t_idx],
        "sigma": sigma[t_idx],
        "dt": t[i + 1] - t[i],
        "is_pred": is_pred,
        "is_final": j == 2 * n - 2,
    }


def _multistep_rows(t, alpha, sigma, corrector: bool):
    """Coefficients of DPM-Solver++(2M) (predictor only) and UniPC-2 bh2.

    With ``m_i`` the x0 estimate at ``(x_i, t_i)``, ``h = lambda_{i+1} -
    lambda_i`` (lambda = log(alpha / sigma)) and ``r`` the previous step's ``h``
    over this one's, the predictor is the exponential-integrator step
    ``x_{i+1} = sigma_{i+1}/sigma_i x_i + alpha_{i+1}(1 - e^-h)(m_i + (m_i - m_{i-1}) / (2r))``,
    first order on the first step (no history) and the last (onto ``m_i``).
    UniC then corrects ``x_i``, once ``m_i`` is known, from ``x_{i-1}``, ``m_{i-1}``
    and ``m_{i-2}``, at the order the predictor of step ``i - 1`` used.
    Row layout: ``x_c = K x + A x_prev + B m_prev + C (m_prev2 - m_prev) + E (m - m_prev)``,
    then ``x_next = P x_c + Q m + S (m_prev - m)``.
    """
    n = len(t) - 1
    lam = np.log(np.maximum(alpha[:n], _MIN_ALPHA_FOR_LAMBDA)) - np.log(sigma[:n])
    rows = {k: np.zeros(n) for k in "KABCEPQS"}
    for i in range(n):
        if i == n - 1:  # onto t = 0: x_n = m_{n-1}
            rows["Q"][i] = 1.0
        else:
            h = lam[i + 1] - lam[i]
            rows["P"][i] = sigma[i + 1] / sigma[i]
            rows["Q"][i] = q = -alpha[i + 1] * np.expm1(-h)
            if i > 0:
                r_k = (lam[i - 1] - lam[i]) / h  # = -r
                rows["S"][i] = 0.5 * q / r_k
        if not corrector or i == 0:
            rows["K"][i] = 1.0
            continue
        h = lam[i] - lam[i - 1]
        phi = np.expm1(-h)
        rows["A"][i] = sigma[i] / sigma[i - 1]
        rows["B"][i] = b = -alpha[i] * phi
        if i == 1:  # the predictor of step 0 was first order: UniC-1, rho = 1/2
            rows["E"][i] = 0.5 * b
            continue
        # UniC-2: solve [[1, 1], [r_k, 1]] rho = (b1, b2), with b_k from the
        # phi-function recursion of the bh2 variant (B(h) = phi).
        r_k = (lam[i - 2] - lam[i - 1]) / h
        hh = -h
        phi_1 = phi / hh - 1
        b1 = phi_1 / phi
        b2 = 2 * (phi_1 / hh - 0.5) / phi
        rho0 = (b1 - b2) / (1 - r_k)
        rows["C"][i] = b * rho0 / r_k
        rows["E"][i] = b * (b1 - rho0)
    return {**_step_rows(t, alpha, sigma), **rows}


def _ddim_rows(t, alpha, sigma, eta):
    a, s, a_next, s_next = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
    # DDIM's sigma_eta = eta * sqrt((1 - abar') / (1 - abar)) * sqrt(1 - abar / abar'),
    # in alpha/sigma terms; eta = 1 is ancestral (DDPM) sampling.
    c_noise = eta * (s_next / s) * np.sqrt(np.maximum(1 - (a / a_next) ** 2, 0.0))
    return {
        **_step_rows(t, alpha, sigma),
        "a_next": a_next,
        "c_eps": np.sqrt(np.maximum(s_next**2 - c_noise**2, 0.0)),
        "c_noise": c_noise,
        "step": np.arange(len(a)),
    }


def sample(
    denoise_fn: DenoiseFn,
    noise: jax.Array,
    *,
    schedule: Schedule = Schedule(),
    sampler: str = "euler",
    num_steps: int = 50,
    key: jax.Array | None = None,
    eta: float = 0.0,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Generates clean latents from ``noise`` by integrating t = 1 -> 0.

    Jit the caller (with ``schedule``, ``sampler``, ``num_steps``, ``eta``
    static); the loop inside is one ``lax.scan`` that calls ``denoise_fn`` once
    per iteration and traces it once.

    Args:
      denoise_fn: ``(x (B, ...) f32, t (B,) f32 in [0, 1]) -> prediction`` of
        type ``schedule.prediction``; see ``classifier_free_guidance``.
      noise: standard normal latents (B, ...), the state at t = 1.
      schedule: the schedule the model was trained with.
      sampler: one of ``SAMPLERS`` that fits ``schedule.kind``.
      num_steps: grid steps; Heun calls the model ``2 * num_steps - 1`` times.
      key: only for ``ddim`` with ``eta > 0``: one PRNG key, folded with each row's
        index, or a batch ``(B,)`` of keys, one per row, for noise that does not
        depend on the row's place in the batch.
      eta: DDIM stochasticity in [0, 1].
      return_trajectory: also return the state after every step.

    Returns:
      x0 (B, ...) with the dtype of ``noise``; with ``return_trajectory``,
      ``(x0, trajectory)`` where trajectory is (num_steps, B, ...) f32 and its
      last entry is x0.

    Raises:
      ValueError: unknown sampler, one that does not fit the schedule,
        ``num_steps < 1``, or a bad ``eta``/``key``.
    """
    check_options(sampler, schedule, num_steps, eta, key)
    t = time_grid(num_steps, schedule)
    alpha, sigma = _alpha_sigma(t, schedule, np)
    if sampler == "euler":
        rows = _euler_rows(t, alpha, sigma)
    elif sampler == "heun":
        rows = _heun_rows(t, alpha, sigma)
    elif sampler == "ddim":
        rows = _ddim_rows(t, alpha, sigma, eta)
    else:
        rows = _multistep_rows(t, alpha, sigma, corrector=sampler == "unipc")
    # Float64 coefficients go in as f32; flags and step indices keep their type.
    rows = {k: jnp.asarray(v, jnp.float32) if v.dtype == np.float64 else jnp.asarray(v) for k, v in rows.items()}

    if jnp.ndim(noise) < 1:
        raise ValueError(f"noise must be latents (B, ...) with a leading batch axis, got shape {jnp.shape(noise)}")
    x = noise.astype(jnp.float32)
    batch = x.shape[0]
    row_keys = _row_keys(key, batch) if eta > 0 else None

    def x0_eps(x_in, row):
        pred = denoise_fn(x_in, jnp.full((batch,), row["t"], jnp.float32))
        if jnp.shape(pred) != x_in.shape:  # checked once, while the scan traces
            raise ValueError(f"denoise_fn returned shape {jnp.shape(pred)} for x of shape {x_in.shape}; expected "
                             f"a prediction of the same shape")
        pred = pred.astype(jnp.float32)
        return _x0_eps_of(pred, x_in, row["alpha"], row["sigma"], schedule.prediction)

    # Each body maps a carry whose first entry is the current state x to the next carry.
    if sampler == "euler":

        def body(carry, row):
            (x,) = carry
            x0, eps = x0_eps(x, row)
            return (x + row["dt"] * (eps - x0),)  # velocity = eps - x0

        carry = (x,)
    elif sampler == "heun":

        def body(carry, row):
            x, x_euler, v_prev = carry
            # Predictor iterations evaluate at x, corrector ones at the Euler guess.
            x_in = jnp.where(row["is_pred"], x, x_euler)
            x0, eps = x0_eps(x_in, row)
            v = eps - x0
            x_euler = x + row["dt"] * v
            x_heun = x + 0.5 * row["dt"] * (v_prev + v)
            x = jnp.where(row["is_pred"], jnp.where(row["is_final"], x_euler, x), x_heun)
            return x, x_euler, v

        carry = (x, x, jnp.zeros_like(x))
    elif sampler == "ddim":

        def body(carry, row):
            (x,) = carry
            x0, eps = x0_eps(x, row)
            x = row["a_next"] * x0 + row["c_eps"] * eps
            if eta > 0:
                draw = lambda k: jax.random.normal(jax.random.fold_in(k, row["step"]), x.shape[1:], jnp.float32)  # noqa: E731
                z = jax.vmap(draw)(row_keys)
                x = x + row["c_noise"] * z
            return (x,)

        carry = (x,)
    else:
        corrector = sampler == "unipc"

        def body(carry, row):
            x, x_prev, m_prev, m_prev2 = carry
            m, _ = x0_eps(x, row)
            if corrector:  # UniC: refine x_i with the model call just made at it
                x = (row["K"] * x + row["A"] * x_prev + row["B"] * m_prev
                     + row["C"] * (m_prev2 - m_prev) + row["E"] * (m - m_prev))
            x_next = row["P"] * x + row["Q"] * m + row["S"] * (m_prev - m)
            return x_next, x, m, m_prev

        zeros = jnp.zeros_like(x)
        carry = (x, zeros, zeros, zeros)

    def scan_body(carry, row):
        carry = body(carry, row)
        return carry, carry[0] if return_trajectory else None

    carry, states = jax.lax.scan(scan_body, carry, rows)
    x = carry[0].astype(noise.dtype)
    if not return_trajectory:
        return x
    if sampler == "heun":  # keep the states that complete a step
        states = states[np.append(np.arange(1, 2 * num_steps - 2, 2), 2 * num_steps - 2)]
    return x, states


def classifier_free_guidance(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    context: Any,
    uncond_context: Any,
    scale: float | jax.Array,
) -> DenoiseFn:
    """Wraps a conditional model into a guided ``denoise_fn(x, t)``.

    The conditional and unconditional passes run as ONE model call on a
    doubled batch ``[cond; uncond]``, which keeps the accelerator busy and
    the model traced once; the result is ``uncond + scale * (cond - uncond)``
    in f32. A Python ``scale == 1`` skips the unconditional pass.

    Args:
      model_fn: ``(x (B, ...), t (B,), context) -> prediction (B, ...)``.
      context: pytree whose leaves have a leading batch axis B, e.g.
        ``(text_emb (B, L, D), text_mask (B, L))``.
      uncond_context: same structure: the empty or negative prompt. Leaves
        with batch 1 are broadcast to B; other axes must match ``context``
        (pad negative prompts to the same length).
      scale: guidance scale; an array scale is allowed (no recompile when it
        changes) and always takes the doubled batch.

    Returns:
      ``denoise_fn(x, t) -> prediction`` for ``sample``.
    """
    if isinstance(scale, (int, float)) and not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale}")
    if isinstance(scale, (int, float)) and scale == 1:
        return lambda x, t: model_fn(x, t, context).astype(jnp.float32)
    if jax.tree.structure(context) != jax.tree.structure(uncond_context):
        raise ValueError(f"uncond_context must have the structure of context: {jax.tree.structure(context)}, "
                         f"got {jax.tree.structure(uncond_context)}")
    for c, u in zip(jax.tree.leaves(context), jax.tree.leaves(uncond_context)):
        cs, us = jnp.shape(c), jnp.shape(u)
        if len(us) != len(cs) or not us or us[0] not in (1, cs[0]) or us[1:] != cs[1:]:
            raise ValueError(f"an uncond_context leaf of shape {jnp.shape(u)} does not fit its context leaf of shape "
                             f"{jnp.shape(c)}: expected batch 1 or {jnp.shape(c)[0]} and the same other axes "
                             f"(pad a negative prompt to the context's length)")

    def denoise_fn(x, t):
        batch = x.shape[0]
        both = jax.tree.map(
            lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, c.shape).astype(c.dtype)]), context, uncond_context
        )
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both).astype(jnp.float32)
        cond, uncond = out[:batch], out[batch:]
        return uncond + scale * (cond - uncond)

    return denoise_fn
