"""Train steps: sharded == single device, weights really split, traced once, loss falls."""

import functools

import jax
import numpy as np
import pytest

from vdit import train as T
from vdit.config import load_config, override
from vdit.models import build_models
from vdit.sharding import make_mesh, rules_from_config

MESHES = {
    "data8": {"data": 8},
    "data2_fsdp4": {"data": 2, "fsdp": 4},
    "fsdp2_context2_tensor2": {"fsdp": 2, "context": 2, "tensor": 2},
    "data4_context2": {"data": 4, "context": 2},
}


def _setup(overrides=()):
    config = override(load_config("tiny"), list(overrides))
    return config, build_models(config)


def _dit_batch(models, config, b=8, seed=0):
    rng = np.random.default_rng(seed)
    length = models.text.max_length
    ids = rng.integers(4, 200, size=(b, length)).astype(np.int32)
    mask = np.arange(length)[None] < rng.integers(3, length, size=(b, 1))
    return {"latents": rng.normal(size=(b, 2, 4, 4, models.vae.z_dim)).astype(np.float32),
            "text_ids": np.where(mask, ids, 0).astype(np.int32), "text_mask": mask}


def _dit_run(config, models, mesh, batch, steps=3):
    rules = rules_from_config(config.sharding_rules)
    tx = T.make_optimizer(config.optim, 100, config.train.on_nonfinite)
    state, shardings = T.init_state(T.init_dit_params(models), tx, jax.random.PRNGKey(0), mesh, rules, ema=True)
    loss = functools.partial(T.dit_loss, models=models, train=config.train, schedule_cfg=config.schedule,
                             uncond=T.uncond_tokens(models.text.max_length))
    traces = []

    def counted(*args):
        traces.append(1)
        return loss(*args)

    step_fn = T.make_train_step(counted, tx, T.learning_rate(config.optim, 100), ema_decay=0.9)
    step = T.jit_train_step(step_fn, mesh, rules, shardings, {k: v.ndim for k, v in batch.items()})
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses, len(traces)


@pytest.fixture(scope="module")
def reference():
    config, models = _setup()
    batch = _dit_batch(models, config)
    state, losses, _ = _dit_run(config, models, make_mesh({"data": 1}, jax.devices()[:1]), batch)
    return config, models, batch, jax.device_get(state), losses


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_dit_step_equals_single_device(reference, mesh_name):
    config, models, batch, ref_state, ref_losses = reference
    state, losses, traces = _dit_run(config, models, make_mesh(MESHES[mesh_name]), batch)
    assert traces == 1  # jitted once, reused every step
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.ema)), jax.tree.leaves(ref_state.ema)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_large_weights_and_optimizer_state_are_split():
    config, models = _setup(["dit.width=64", "dit.mlp_dim=256", "dit.num_heads=4"])
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tx = T.make_optimizer(config.optim, 10)
    state, _ = T.init_state(T.init_dit_params(models), tx, jax.random.PRNGKey(0), mesh,
                            rules_from_config(config.sharding_rules), ema=False)
    kernel = state.params["dit"]["blocks_0"]["mlp"]["fc1"]["linear"]["kernel"]  # (embed 64, mlp 256)
    assert kernel.shape == (64, 256)
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 128)}  # fsdp=2 x tensor=2
    mu = state.opt_state[1][0].mu["dit"]["blocks_0"]["mlp"]["fc1"]["linear"]["kernel"]
    assert mu.sharding == kernel.sharding


def test_dit_loss_falls_over_50_steps():
    config, models = _setup(["optim.lr=3e-3", "optim.warmup_steps=5", "train.text_dropout=0.0"])
    batch = _dit_batch(models, config)
    # Clean latents with a strong shared structure: the part of the velocity a model can learn
    # quickly, so 50 steps show a clear fall above the irreducible noise term.
    pattern = np.random.default_rng(1).normal(size=batch["latents"].shape[1:]).astype(np.float32)
    batch["latents"] = 3.0 * pattern[None] + 0.1 * batch["latents"]
    _, losses, _ = _dit_run(config, models, make_mesh({"data": 8}), batch, steps=50)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)


def test_vae_step_reduces_reconstruction_error():
    config, models = _setup(["vae_optim.lr=3e-3", "vae_optim.warmup_steps=2"])
    mesh = make_mesh({"data": 2, "fsdp": 4})
    rules = rules_from_config(config.sharding_rules)
    tx = T.make_optimizer(config.vae_optim, 40)
    state, shardings = T.init_state(T.init_vae_params(models), tx, jax.random.PRNGKey(0), mesh, rules, ema=False)
    loss = functools.partial(T.vae_loss, vae=models.vae, kl_weight=1e-6)
    step = T.jit_train_step(T.make_train_step(loss, tx, T.learning_rate(config.vae_optim, 40), ema_decay=0.0),
                            mesh, rules, shardings, {"video": 5})
    rng = np.random.default_rng(0)
    video = np.zeros((8, 5, 16, 16, 3), np.uint8)
    for i in range(8):  # a bright square per clip: structure a VAE can learn quickly
        y, x = rng.integers(0, 8, 2)
        video[i, :, y : y + 8, x : x + 8] = rng.integers(100, 255, 3)
    recon = []
    for _ in range(40):
        state, metrics = step(state, {"video": video})
        recon.append(float(metrics["recon"]))
    assert np.mean(recon[-5:]) < 0.5 * np.mean(recon[:5]), recon


def test_skip_nonfinite_updates_leave_params_unchanged():
    config, models = _setup(["train.on_nonfinite=skip"])
    batch = _dit_batch(models, config)
    batch["latents"][0, 0, 0, 0, 0] = np.nan
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    rules = rules_from_config(config.sharding_rules)
    tx = T.make_optimizer(config.optim, 10, "skip")
    state, shardings = T.init_state(T.init_dit_params(models), tx, jax.random.PRNGKey(0), mesh, rules, ema=False)
    before = jax.device_get(state.params)
    loss = functools.partial(T.dit_loss, models=models, train=config.train, schedule_cfg=config.schedule,
                             uncond=T.uncond_tokens(models.text.max_length))
    step = T.jit_train_step(T.make_train_step(loss, tx, T.learning_rate(config.optim, 10), ema_decay=0.0),
                            mesh, rules, shardings, {k: v.ndim for k, v in batch.items()})
    state, metrics = step(state, batch)
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown on_nonfinite 'ignore'"):
        T.make_optimizer(config.optim, 10, "ignore")
