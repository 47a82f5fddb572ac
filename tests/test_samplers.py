"""Tests for vdit.samplers, driven by the exact denoiser of Gaussian data.

For data x0 ~ N(mu, diag(s^2)), x_t = alpha x0 + sigma eps is Gaussian and
E[x0 | x_t], E[eps | x_t] follow from Gaussian conditioning, so every
prediction type has a closed-form exact model. Its probability-flow ODE maps
noise z at t = 1 to x0 = mu + s * (z - alpha_1 mu) / std_1, per dimension.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit import samplers as smp
from vdit.schedule import Schedule, alpha_sigma, loss_target

DIM = 8
MU = np.linspace(-2.0, 2.0, DIM)
STD = np.linspace(0.3, 1.5, DIM)


def exact_denoiser(schedule):
    """The Bayes-optimal prediction of ``schedule.prediction`` for the Gaussian data."""
    mu, var0 = jnp.asarray(MU, jnp.float32), jnp.asarray(STD**2, jnp.float32)

    def denoise_fn(x, t):
        a, s = (u[:, None] for u in alpha_sigma(t, schedule))
        var_t = a * a * var0 + s * s
        resid = x - a * mu
        x0 = mu + a * var0 / var_t * resid
        eps = s / var_t * resid
        return loss_target(x0, eps, t, schedule)  # linear in (x0, eps): exact for its expectation

    return denoise_fn


def exact_solution(noise, schedule):
    """Where the exact probability-flow ODE takes ``noise`` (the state at t = 1)."""
    a, s = (float(u[0]) for u in alpha_sigma(jnp.ones(1), schedule))
    return MU + STD * (np.asarray(noise, np.float64) - a * MU) / np.sqrt(a * a * STD**2 + s * s)


@functools.partial(jax.jit, static_argnames=("schedule", "sampler", "num_steps", "eta"))
def run(noise, key=None, *, schedule, sampler, num_steps, eta=0.0):
    return smp.sample(exact_denoiser(schedule), noise, schedule=schedule, sampler=sampler, num_steps=num_steps,
                      key=key, eta=eta)


FLOW = Schedule()
FLOW_SHIFTED = Schedule(shift=3.0)
VP_EPS_COS = Schedule("vp", prediction="eps", vp="cosine")
VP_V_LIN = Schedule("vp", prediction="v", vp="linear")


@pytest.mark.parametrize(
    "schedule, sampler, num_steps, eta",
    [
        (FLOW, "euler", 300, 0.0),
        (FLOW, "heun", 30, 0.0),
        (FLOW, "dpmpp_2m", 30, 0.0),
        (FLOW, "unipc", 30, 0.0),
        (FLOW_SHIFTED, "unipc", 40, 0.0),
        (Schedule(prediction="x0", shift=3.0), "heun", 40, 0.0),
        (VP_EPS_COS, "ddim", 300, 0.0),
        (VP_EPS_COS, "unipc", 30, 0.0),
        (VP_V_LIN, "ddim", 300, 0.0),
        (VP_V_LIN, "dpmpp_2m", 100, 0.0),  # the last step from t = 1/n to x0 is first order
        (Schedule("vp", prediction="x0", vp="cosine"), "unipc", 40, 0.0),
        (VP_EPS_COS, "ddim", 1000, 1.0),  # ancestral (DDPM-like) sampling
    ],
    ids=str,
)
def test_samples_reproduce_data_distribution(schedule, sampler, num_steps, eta):
    n = 20000
    noise = jax.random.normal(jax.random.key(0), (n, DIM))
    x = np.asarray(run(noise, jax.random.key(1), schedule=schedule, sampler=sampler, num_steps=num_steps, eta=eta))
    assert np.all(np.isfinite(x))
    # Four standard errors of the estimates, plus room for discretisation and for
    # the linear VP schedule not reaching pure noise (alpha(1) = 6.6e-3).
    mean_tol = 4 * STD / np.sqrt(n) + 0.03
    var_tol = 4 * np.sqrt(2 / n) + 0.03
    np.testing.assert_array_less(np.abs(x.mean(0) - MU), mean_tol)
    np.testing.assert_array_less(np.abs(x.var(0) / STD**2 - 1), var_tol)


@pytest.mark.parametrize(
    "schedule, base, higher",
    [
        (FLOW, "euler", ("heun", "dpmpp_2m", "unipc")),
        (FLOW_SHIFTED, "euler", ("heun", "dpmpp_2m", "unipc")),
        (VP_EPS_COS, "ddim", ("dpmpp_2m", "unipc")),
        (VP_V_LIN, "ddim", ("dpmpp_2m", "unipc")),
    ],
    ids=str,
)
def test_higher_order_samplers_beat_first_order(schedule, base, higher):
    """Mean |x - exact ODE solution| from the same noise, at 10 steps each."""
    noise = jax.random.normal(jax.random.key(2), (2048, DIM))
    ref = exact_solution(noise, schedule)
    err = {name: float(np.mean(np.abs(np.asarray(run(noise, schedule=schedule, sampler=name, num_steps=10)) - ref)))
           for name in (base, *higher)}
    ratios = {name: err[name] / err[base] for name in higher}
    print(f"\n{schedule}: {base} error {err[base]:.3e}; ratios at 10 steps: "
          + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    for name, ratio in ratios.items():
        assert ratio < 0.5, (name, ratio)


def _diffusers_run(scheduler, noise, num_steps, shift):
    """Runs a diffusers flow scheduler with the exact velocity, in torch."""
    torch = pytest.importorskip("torch")
    velocity = exact_denoiser(Schedule(shift=shift))
    scheduler.set_begin_index(0)
    x = torch.tensor(np.asarray(noise))
    for i in range(num_steps):
        t = jnp.full((x.shape[0],), float(scheduler.sigmas[i]), jnp.float32)
        v = torch.tensor(np.asarray(velocity(jnp.asarray(x.numpy()), t)))
        x = scheduler.step(v, scheduler.timesteps[i], x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "unipc"])
@pytest.mark.parametrize("num_steps, shift", [(4, 1.0), (12, 3.0)])
def test_parity_with_diffusers(sampler, num_steps, shift):
    """Same grid and same final samples as diffusers' flow schedulers (what Wan2.1 uses)."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    schedule = Schedule(shift=shift)
    base = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
    if sampler == "euler":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(sigmas=base.copy())
    elif sampler == "unipc":
        scheduler = diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
            solver_order=2, solver_type="bh2", final_sigmas_type="zero")
        scheduler.set_timesteps(sigmas=base.copy())
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
            solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero")
        scheduler.set_timesteps(num_steps)
        # Its built-in flow grid stops short of t = 1; give it ours, with the 1e-6
        # offset from t = 1 that its UniPC sibling applies.
        grid = smp.time_grid(num_steps, schedule)
        grid[0] -= 1e-6
        scheduler.sigmas = torch.tensor(grid, dtype=torch.float32)
    # The grid is shift(linspace(1, 0, n + 1)) (UniPC moves t_0 = 1 to 1 - 1e-6).
    np.testing.assert_allclose(scheduler.sigmas.double().numpy(), smp.time_grid(num_steps, schedule), atol=2e-6)
    noise = jax.random.normal(jax.random.key(3), (64, DIM))
    theirs = _diffusers_run(scheduler, noise, num_steps, shift)
    ours = np.asarray(run(noise, schedule=schedule, sampler=sampler, num_steps=num_steps))
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)


@pytest.mark.parametrize("sampler, schedule", [(s, FLOW) for s in ("euler", "heun", "dpmpp_2m", "unipc")]
                         + [(s, VP_EPS_COS) for s in ("ddim", "dpmpp_2m", "unipc")])
def test_loop_traced_once(sampler, schedule):
    """The model is traced once per compile, whatever num_steps (Heun included)."""
    model = exact_denoiser(schedule)
    for num_steps in (3, 12):
        calls = []

        def denoise_fn(x, t):
            calls.append(x.shape)
            return model(x, t)

        jitted = jax.jit(functools.partial(smp.sample, denoise_fn, schedule=schedule, sampler=sampler,
                                           num_steps=num_steps))
        jitted(jnp.zeros((2, DIM)))
        jitted(jnp.ones((2, DIM)))  # cached: no retrace
        assert calls == [(2, DIM)], (num_steps, calls)


def test_one_step_returns_x0_estimate_and_dtype():
    noise = jax.random.normal(jax.random.key(4), (16, DIM), jnp.bfloat16)
    for schedule, names in ((FLOW, ("euler", "heun", "dpmpp_2m", "unipc")), (VP_V_LIN, ("ddim", "unipc"))):
        model = exact_denoiser(schedule)
        t1 = jnp.ones((16,))
        a, s = alpha_sigma(t1, schedule)
        x0_hat = MU + (a[:, None] * STD**2 / (a[:, None] ** 2 * STD**2 + s[:, None] ** 2)) * (
            noise.astype(jnp.float32) - a[:, None] * MU)
        for name in names:
            out = smp.sample(model, noise, schedule=schedule, sampler=name, num_steps=1)
            assert out.dtype == jnp.bfloat16 and out.shape == noise.shape
            np.testing.assert_allclose(out.astype(jnp.float32), x0_hat, atol=0.05, err_msg=name)


def test_trajectory():
    noise = jax.random.normal(jax.random.key(5), (4, 2, 3, DIM))  # (B, T, H, C): any latent shape
    model = lambda x, t: exact_denoiser(FLOW)(x.reshape(-1, DIM), jnp.repeat(t, 6)).reshape(x.shape)
    for name in ("heun", "unipc"):

        @jax.jit
        def both(noise):
            kw = dict(schedule=FLOW, sampler=name, num_steps=5)
            return smp.sample(model, noise, **kw), smp.sample(model, noise, return_trajectory=True, **kw)

        plain, (x0, traj) = both(noise)
        assert traj.shape == (5, *noise.shape)
        np.testing.assert_array_equal(traj[-1], x0)
        np.testing.assert_array_equal(x0, plain)
    assert smp.num_model_calls("heun", 5) == 9 and smp.num_model_calls("unipc", 5) == 5


def test_ddim_eta_uses_explicit_key():
    noise = jax.random.normal(jax.random.key(6), (8, DIM))
    kw = dict(schedule=VP_EPS_COS, sampler="ddim", num_steps=10)
    a = run(noise, jax.random.key(0), eta=1.0, **kw)
    np.testing.assert_array_equal(a, run(noise, jax.random.key(0), eta=1.0, **kw))
    assert not np.allclose(a, run(noise, jax.random.key(1), eta=1.0, **kw))
    np.testing.assert_array_equal(run(noise, jax.random.key(0), **kw), run(noise, jax.random.key(1), **kw))


def test_ddim_eta_noise_of_a_row_does_not_depend_on_the_batch():
    noise = jax.random.normal(jax.random.key(6), (3, DIM))
    kw = dict(schedule=VP_EPS_COS, sampler="ddim", num_steps=5, eta=1.0)
    keys = jax.random.split(jax.random.key(0), 3)
    full = run(noise, keys, **kw)
    np.testing.assert_allclose(run(noise[1:], keys[1:], **kw), full[1:], atol=1e-6)
    np.testing.assert_allclose(run(noise[2:], keys[2:], **kw), full[2:], atol=1e-6)
    # One key stands for the keys folded with each row's index; raw uint32 keys work too.
    folded = jnp.stack([jax.random.fold_in(jax.random.key(0), i) for i in range(3)])
    np.testing.assert_array_equal(run(noise, jax.random.key(0), **kw), run(noise, folded, **kw))
    np.testing.assert_array_equal(run(noise, jax.random.PRNGKey(0), **kw), run(noise, jax.random.key(0), **kw))
    with pytest.raises(ValueError, match=r"key must be one PRNG key or one per row \(3,\), got keys of shape \(2,\)"):
        run(noise, keys[:2], **kw)


def _context_model(x, t, context):
    """A toy conditional model whose output depends on x, t and both context leaves."""
    emb, mask = context
    pooled = jnp.sum(emb * mask[..., None], axis=(1, 2))  # (B,)
    return x * (1 + t[:, None]) + pooled[:, None]


def test_cfg_batches_cond_and_uncond_in_one_call():
    calls = []

    def model_fn(x, t, context):
        calls.append((x.shape, t.shape, jax.tree.map(jnp.shape, context)))
        return _context_model(x, t, context)

    b, length, width = 3, 5, 4
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(k1, (b, DIM))
    t = jnp.array([0.9, 0.5, 0.1])
    cond = (jax.random.normal(k2, (b, length, width)), jnp.ones((b, length), bool))
    uncond = (jax.random.normal(k3, (1, length, width)), jnp.zeros((1, length), bool).at[:, 0].set(True))
    guided = smp.classifier_free_guidance(model_fn, cond, uncond, 4.0)
    out = guided(x, t)
    assert calls == [((2 * b, DIM), (2 * b,), ((2 * b, length, width), (2 * b, length)))]
    uncond_b = jax.tree.map(lambda u: jnp.broadcast_to(u, (b, *u.shape[1:])), uncond)
    c, u = _context_model(x, t, cond), _context_model(x, t, uncond_b)
    np.testing.assert_allclose(out, u + 4.0 * (c - u), rtol=1e-5, atol=1e-5)

    # scale == 1 skips the unconditional pass.
    calls.clear()
    np.testing.assert_allclose(smp.classifier_free_guidance(model_fn, cond, uncond, 1.0)(x, t), c, rtol=1e-6)
    assert calls == [((b, DIM), (b,), ((b, length, width), (b, length)))]
    bf16_model = lambda x, t, context: model_fn(x, t, context).astype(jnp.bfloat16)  # noqa: E731
    assert smp.classifier_free_guidance(bf16_model, cond, uncond, 1.0)(x, t).dtype == jnp.float32  # as any scale

    # An array scale works under jit (no recompile per scale) and in the sampler, traced once.
    calls.clear()

    @jax.jit
    def generate(noise, scale):
        return smp.sample(smp.classifier_free_guidance(model_fn, cond, uncond, scale), noise,
                          schedule=FLOW, sampler="unipc", num_steps=6)

    generate(x, 4.0)
    generate(x, 7.5)
    assert len(calls) == 1 and calls[0][0] == (2 * b, DIM)

    # A mismatched unconditional context is named when the guidance is built, not deep in JAX.
    for bad in ((uncond[0][:, :3], uncond[1]), (jnp.concatenate([uncond[0]] * 2), jnp.concatenate([uncond[1]] * 2))):
        with pytest.raises(ValueError, match=r"an uncond_context leaf of shape \(.*\) does not fit its context leaf"):
            smp.classifier_free_guidance(model_fn, cond, bad, 4.0)
    with pytest.raises(ValueError, match=r"uncond_context must have the structure of context"):
        smp.classifier_free_guidance(model_fn, cond, uncond[0], 4.0)
    with pytest.raises(ValueError, match=r"guidance scale must be finite, got nan"):
        smp.classifier_free_guidance(model_fn, cond, uncond, float("nan"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="dpm"), r"unknown sampler 'dpm'; valid: euler, heun, dpmpp_2m, unipc, ddim"),
        (dict(sampler="ddim"), r"sampler 'ddim' does not fit a 'flow' schedule; valid for flow: euler, heun, "),
        (dict(sampler="euler", schedule=VP_EPS_COS), r"valid for vp: dpmpp_2m, unipc, ddim"),
        (dict(num_steps=0), r"num_steps must be an int >= 1, got 0"),
        (dict(num_steps=2.5), r"num_steps must be an int >= 1"),
        (dict(eta=0.5), r"eta only applies to sampler 'ddim'"),
        (dict(sampler="ddim", schedule=VP_EPS_COS, eta=1.5, key=jax.random.key(0)), r"eta must be in \[0, 1\]"),
        (dict(sampler="ddim", schedule=VP_EPS_COS, eta=0.5), r"pass key="),
    ],
)
def test_errors(kwargs, match):
    kwargs = {"schedule": FLOW, "sampler": "euler", "num_steps": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        smp.sample(lambda x, t: x, jnp.zeros((1, DIM)), **kwargs)


def test_a_misshapen_prediction_or_noise_is_named():
    kwargs = {"schedule": FLOW, "sampler": "euler", "num_steps": 2}
    with pytest.raises(ValueError, match=r"denoise_fn returned shape \(1, 3\) for x of shape \(1, 6\)"):
        smp.sample(lambda x, t: x[:, :3], jnp.zeros((1, 6)), **kwargs)
    with pytest.raises(ValueError, match=r"noise must be latents \(B, ...\) with a leading batch axis, got shape"):
        smp.sample(lambda x, t: x, jnp.float32(0), **kwargs)
