"""Tests for vdit.schedule: shift, t sampling, noising, targets, conversions, weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit import schedule as sch
from vdit.schedule import Schedule

ALL_SCHEDULES = [
    Schedule("flow"),
    Schedule("flow", prediction="x0", shift=3.0),
    Schedule("vp", prediction="eps", vp="cosine"),
    Schedule("vp", prediction="v", vp="cosine"),
    Schedule("vp", prediction="eps", vp="linear"),
    Schedule("vp", prediction="v", vp="linear"),
    Schedule("vp", prediction="x0", vp="linear"),
]


def test_schedule_defaults_and_hashing():
    assert Schedule() == Schedule("flow", "velocity", None, 1)
    assert Schedule("vp") == Schedule("vp", prediction="eps", vp="cosine")
    assert hash(Schedule("vp")) == hash(Schedule("vp", prediction="eps", vp="cosine"))
    assert isinstance(Schedule(shift=3).shift, float)
    traces = []

    def scaled(x, schedule):
        traces.append(schedule)
        return x * schedule.shift

    scaled = jax.jit(scaled, static_argnames="schedule")
    scaled(jnp.ones(2), schedule=Schedule(shift=3.0))
    scaled(jnp.ones(2), schedule=Schedule("flow", "velocity", shift=3))  # equal, new instance: cache hit
    assert len(traces) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="ddpm"), "unknown schedule kind 'ddpm'; valid: flow, vp"),
        (dict(kind="flow", prediction="eps"), "valid: velocity, x0"),
        (dict(kind="vp", prediction="velocity"), "valid: eps, v, x0"),
        (dict(kind="vp", vp="sigmoid"), "valid: cosine, linear"),
        (dict(kind="flow", vp="cosine"), "only applies to kind 'vp'"),
        (dict(shift=0.0), "shift must be > 0"),
    ],
)
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_shift_time():
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(sch.shift_time(t, 3.0), 3 * t / (1 + 2 * t))
    assert sch.shift_time(0.0, 5.0) == 0.0 and sch.shift_time(1.0, 5.0) == 1.0
    assert sch.shift_time(t, 1.0) is t
    assert np.all(sch.shift_time(t[1:-1], 3.0) > t[1:-1])  # towards noise
    # For flow, shifting t divides the SNR ((1 - t) / t)^2 by shift^2.
    snr = lambda u: ((1 - u) / u) ** 2
    np.testing.assert_allclose(snr(sch.shift_time(t[1:], 4.0)), snr(t[1:]) / 16, rtol=1e-12)
    # Works on jax arrays under jit.
    np.testing.assert_allclose(jax.jit(sch.shift_time, static_argnums=1)(jnp.asarray(t, jnp.float32), 3.0),
                               3 * t / (1 + 2 * t), rtol=1e-6)
    for bad in (0.0, -2):  # every t would map to 0 (or out of [0, 1])
        with pytest.raises(ValueError, match=f"shift must be > 0, got {bad}"):
            sch.sample_t(jax.random.key(0), 4, shift=bad)


def test_shift_for_seq_len():
    # Defaults are Flux's dynamic shifting: mu = log(shift) from 0.5 at 256 tokens to 1.15 at 4096.
    assert sch.shift_for_seq_len(256) == pytest.approx(math.exp(0.5))
    assert sch.shift_for_seq_len(4096) == pytest.approx(math.exp(1.15))
    mid = sch.shift_for_seq_len((256 + 4096) / 2)
    assert mid == pytest.approx(math.exp((0.5 + 1.15) / 2))  # geometric mean: log-linear
    for seq_len in (300, 1000, 3000):
        mu = 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256)
        assert sch.shift_for_seq_len(seq_len) == pytest.approx(math.exp(mu))
    # Clipped by default; Flux-style extrapolation on request.
    assert sch.shift_for_seq_len(32760) == pytest.approx(math.exp(1.15))
    assert sch.shift_for_seq_len(8192, clip=False) == pytest.approx(math.exp(0.5 + 0.65 * (8192 - 256) / 3840))
    # Open-Sora 2.0 style: the shift itself is linear, 1 at 256 tokens to 3 at 4096.
    lin = dict(min_shift=1.0, max_shift=3.0, interpolate="linear")
    assert sch.shift_for_seq_len(2176, **lin) == pytest.approx(2.0)
    assert sch.shift_for_seq_len(100, **lin) == pytest.approx(1.0)
    assert isinstance(sch.shift_for_seq_len(1000), float)
    with pytest.raises(ValueError, match="valid: log, linear"):
        sch.shift_for_seq_len(1000, interpolate="cubic")


def test_shift_matches_diffusers_dynamic_shifting():
    """Our exp(mu) shift equals diffusers' exponential time shift with the same mu."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    base = np.linspace(1.0, 0.0, 9)[:-1]
    mu = 0.5 + 0.65 * (2048 - 256) / 3840
    scheduler.set_timesteps(sigmas=base.copy(), mu=mu)
    ours = sch.shift_time(base, sch.shift_for_seq_len(2048))
    np.testing.assert_allclose(scheduler.sigmas.numpy()[:-1], ours, rtol=1e-6)


def test_sample_t_uniform():
    t = sch.sample_t(jax.random.key(0), 20000)
    assert t.shape == (20000,) and t.dtype == jnp.float32
    assert float(t.min()) >= 0 and float(t.max()) < 1
    assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float(t.var()) - 1 / 12) < 0.003
    np.testing.assert_array_equal(t, sch.sample_t(jax.random.key(0), 20000))  # explicit key: reproducible
    assert not np.array_equal(t, sch.sample_t(jax.random.key(1), 20000))


def test_sample_t_logit_normal_and_shift():
    key = jax.random.key(3)
    t = sch.sample_t(key, 20000, distribution="logit_normal", mean=0.3, std=0.8)
    logit = np.log(t) - np.log1p(-t)
    assert abs(logit.mean() - 0.3) < 0.03 and abs(logit.std() - 0.8) < 0.03
    assert abs(np.median(t) - 1 / (1 + math.exp(-0.3))) < 0.01
    shifted = sch.sample_t(key, 20000, distribution="logit_normal", mean=0.3, std=0.8, shift=3.0)
    np.testing.assert_allclose(shifted, sch.shift_time(t, 3.0), rtol=1e-6)
    t_jit = jax.jit(sch.sample_t, static_argnums=1, static_argnames=("distribution",))(key, 8, distribution="uniform")
    assert t_jit.shape == (8,)
    with pytest.raises(ValueError, match="valid: uniform, logit_normal"):
        sch.sample_t(key, 4, distribution="beta")


def test_alpha_sigma_flow_and_vp():
    t = jnp.linspace(0, 1, 101)
    a, s = sch.alpha_sigma(t, Schedule())
    np.testing.assert_allclose(a, 1 - t, atol=1e-7)
    np.testing.assert_allclose(s, t)
    for vp in ("cosine", "linear"):
        a, s = sch.alpha_sigma(t, Schedule("vp", vp=vp))
        assert a.dtype == s.dtype == jnp.float32
        np.testing.assert_allclose(a**2 + s**2, 1, atol=2e-6)
        assert float(a[0]) == 1 and float(s[0]) == 0
        assert np.all(np.diff(np.asarray(a)) < 0) and np.all(np.diff(np.asarray(s)) > 0)
        assert 0 < float(a[-1]) < 1e-2  # nearly pure noise, yet eps -> x0 stays finite
    # Accurate sigma near t = 0, where 1 - alpha^2 would cancel in f32.
    t_small = jnp.array([1e-5, 1e-4])
    _, s = sch.alpha_sigma(t_small, Schedule("vp", vp="linear"))
    integral = 0.1 * 1e-5 * np.array([1, 10]) + 9.95 * np.array([1e-10, 1e-8])  # of beta(t) from 0 to t
    np.testing.assert_allclose(s, np.sqrt(-np.expm1(-integral)), rtol=1e-5)


def test_vp_schedules_match_diffusers_discrete_ones():
    """Continuous cosine equals iDDPM's telescoped alphas_cumprod; linear approximates DDPM's."""
    diffusers = pytest.importorskip("diffusers")
    k = np.arange(999)
    t = (k + 1) / 1000.0
    cos = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double().numpy()[:999]
    a, _ = sch.alpha_sigma(jnp.asarray(t, jnp.float32), Schedule("vp", vp="cosine"))
    keep = cos > 1e-5  # the 1000-step version caps beta at 0.999 at its very end
    np.testing.assert_allclose(np.asarray(a, np.float64)[keep] ** 2, cos[keep], rtol=2e-4)
    lin = diffusers.DDPMScheduler(beta_schedule="linear").alphas_cumprod.double().numpy()[:999]
    a, _ = sch.alpha_sigma(jnp.asarray(t, jnp.float32), Schedule("vp", vp="linear"))
    np.testing.assert_allclose(np.log(np.asarray(a, np.float64) ** 2), np.log(lin), rtol=0.02, atol=5e-4)


def test_add_noise_and_targets():
    kx, ke = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(kx, (3, 2, 4, 4, 5), jnp.bfloat16)  # (B, T, H, W, C)
    eps = jax.random.normal(ke, x0.shape, jnp.bfloat16)
    t = jnp.array([0.0, 0.3, 1.0])
    x0f, epsf = np.asarray(x0, np.float32), np.asarray(eps, np.float32)
    tb = np.asarray(t)[:, None, None, None, None]
    flow = Schedule()
    xt = sch.add_noise(x0, eps, t, flow)
    assert xt.dtype == jnp.float32 and xt.shape == x0.shape
    np.testing.assert_allclose(xt, (1 - tb) * x0f + tb * epsf, atol=1e-6)
    np.testing.assert_array_equal(xt[0], x0f[0])
    np.testing.assert_array_equal(xt[2], epsf[2])
    np.testing.assert_allclose(sch.loss_target(x0, eps, t, flow), epsf - x0f)
    vp = Schedule("vp", prediction="v")
    a, s = (np.asarray(u)[:, None, None, None, None] for u in sch.alpha_sigma(t, vp))
    np.testing.assert_allclose(sch.add_noise(x0, eps, t, vp), a * x0f + s * epsf, atol=1e-6)
    np.testing.assert_allclose(sch.loss_target(x0, eps, t, vp), a * epsf - s * x0f, atol=1e-6)
    np.testing.assert_allclose(sch.loss_target(x0, eps, t, Schedule("vp")), epsf)
    np.testing.assert_allclose(sch.loss_target(x0, eps, t, Schedule("vp", prediction="x0")), x0f)


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=str)
def test_prediction_round_trip(schedule):
    kx, ke = jax.random.split(jax.random.key(1))
    x0 = jax.random.normal(kx, (5, 3, 4))
    eps = jax.random.normal(ke, x0.shape)
    t = jnp.array([0.02, 0.25, 0.5, 0.75, 0.98])
    pred = sch.loss_target(x0, eps, t, schedule)
    x0_hat, eps_hat = sch.prediction_to_x0_eps(pred, sch.add_noise(x0, eps, t, schedule), t, schedule)
    # eps from x0 near t = 0 (and x0 from eps near t = 1) amplify f32 rounding.
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-4)


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=str)
def test_min_snr_weight(schedule):
    t = jnp.linspace(0.05, 0.95, 19)
    a, s = (np.asarray(u, np.float64) for u in sch.alpha_sigma(t, schedule))
    snr = a**2 / s**2
    # The x0-space weight min(SNR, gamma), divided by |pred err|^2 / |x0 err|^2.
    per_x0 = {"eps": snr, "x0": np.ones_like(snr), "v": 1 / s**2, "velocity": 1 / s**2}[schedule.prediction]
    want = np.minimum(snr, 5.0) / per_x0
    got = sch.loss_weight(t, schedule, weighting="min_snr", gamma=5.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    ends = sch.loss_weight(jnp.array([0.0, 1.0]), schedule, weighting="min_snr")
    assert np.all(np.isfinite(ends)) and np.all(np.asarray(ends) >= 0)


def test_uniform_and_cosmap_weights():
    t = jnp.linspace(0, 1, 11)
    np.testing.assert_array_equal(sch.loss_weight(t, Schedule()), np.ones(11))
    w = sch.loss_weight(t, Schedule(), weighting="cosmap")
    np.testing.assert_allclose(w, 2 / (np.pi * (1 - 2 * t + 2 * t**2)), rtol=1e-6)
    # CosMap is a density on [0, 1]: it integrates to 1.
    fine = np.linspace(0, 1, 100001)
    assert np.trapezoid(np.asarray(sch.loss_weight(jnp.asarray(fine), Schedule(), weighting="cosmap")), fine) == (
        pytest.approx(1.0, rel=1e-4)
    )
    with pytest.raises(ValueError, match="valid: uniform, min_snr, cosmap"):
        sch.loss_weight(t, Schedule(), weighting="p2")


def test_times_that_do_not_match_the_batch_are_named():
    x = jnp.zeros((2, 3, 4))
    for t in (jnp.full(3, 0.5), jnp.full((2, 1), 0.5)):
        with pytest.raises(ValueError, match=r"t must be a scalar or one time per sample, shape \(2,\), for x of "
                                             r"shape \(2, 3, 4\); got shape \("):
            sch.add_noise(x, x, t, Schedule())
    assert sch.add_noise(x, x + 1, jnp.float32(1.0), Schedule()).shape == x.shape  # a scalar t broadcasts


@pytest.mark.parametrize("t", [np.array([0.5, 1.5]), jnp.array([-0.1, 0.2]), np.array([np.nan, 0.5]), 2.0])
def test_times_outside_0_1_are_named(t):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\] \(0 clean, 1 noise\); got 1 of \d outside it"):
        sch.add_noise(x, x, t, Schedule())
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        sch.alpha_sigma(t, Schedule(kind="vp"))
    # Traced times cannot be read: jit passes them through rather than fail to trace.
    assert jax.jit(lambda t: sch.alpha_sigma(t, Schedule())[0])(jnp.asarray(t)).shape == jnp.shape(t)
