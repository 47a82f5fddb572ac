"""Train steps: sharded == single device, weights really split, traced once, loss falls."""

import functools

import jax
import numpy as np
import pytest
from flax import serialization

from vdit import train as T
from vdit.config import load_config, override
from vdit.dit import relayout
from vdit.models import build_models
from vdit.sharding import make_mesh, rules_from_config, unbox

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


def _dit_run(config, models, mesh, batch, steps=3, start=None):
    rules = rules_from_config(config.sharding_rules)
    tx = T.make_optimizer(config.optim, 100, config.train.on_nonfinite)
    state, shardings = T.init_state(T.init_dit_params(models), tx, jax.random.PRNGKey(0), mesh, rules, ema=True)
    if start is not None:  # a given state (as a state dict), in this model's layer layout
        start = serialization.from_state_dict(state, relayout(start, serialization.to_state_dict(state)))
        state = jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding), start, state)
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


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_sharded_unrolled_remat_step_equals_single_device(reference, remat):
    # Unrolled remat ties each block's recomputation to its output's cotangent
    # (layers.remat_after_cotangent); the tie must keep sequence and tensor sharding intact.
    _, _, batch, ref_state, ref_losses = reference
    config, models = _setup([f"dit.remat={remat}", "dit.scan_layers=false"])
    state, losses, _ = _dit_run(config, models, make_mesh(MESHES["fsdp2_context2_tensor2"]), batch)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_scanned_dit_trains_like_the_unrolled_one():
    # scan_layers stacks the blocks' params on a leading axis; training must not notice: the same
    # updates, and weight decay on the same matrices (not on the stacked biases and norm scales).
    extra = ["optim.lr=1e-2", "optim.warmup_steps=0", "optim.weight_decay=1.0"]
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    config, models = _setup([*extra, "dit.scan_layers=false"])
    batch = _dit_batch(models, config)
    start, _, _ = _dit_run(config, models, mesh, batch, steps=0)
    start = serialization.to_state_dict(jax.device_get(start))
    unrolled, ref_losses, _ = _dit_run(config, models, mesh, batch, steps=2, start=start)
    config, models = _setup([*extra, "dit.scan_layers=true"])
    scanned, losses, _ = _dit_run(config, models, mesh, batch, steps=2, start=start)
    assert "blocks" in scanned.params["dit"] and "blocks_0" not in scanned.params["dit"]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    ref = serialization.to_state_dict(jax.device_get(unrolled))
    got = relayout(serialization.to_state_dict(jax.device_get(scanned)), ref)
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_init_state_compiled_fast_on_cpu_equals_a_plain_jitted_init():
    # init_state compiles a small init at LLVM -O0 on CPU (much faster to build): same numbers.
    config, models = _setup()
    tx = T.make_optimizer(config.optim, 10)
    init = T.init_dit_params(models)
    mesh = make_mesh({"data": 2, "fsdp": 4})
    state, _ = T.init_state(init, tx, jax.random.PRNGKey(3), mesh, rules_from_config(config.sharding_rules), ema=True)
    ref = unbox(jax.jit(T.state_initializer(init, tx, ema=True))(jax.random.PRNGKey(3)))
    assert jax.tree.structure(state) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


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


def _vae_steps(config, models, compiler_options, steps=2):
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    rules = rules_from_config(config.sharding_rules)
    tx = T.make_optimizer(config.vae_optim, 10)
    state, shardings = T.init_state(T.init_vae_params(models), tx, jax.random.PRNGKey(0), mesh, rules, ema=False)
    loss = functools.partial(T.vae_loss, vae=models.vae, kl_weight=1e-6)
    step = T.jit_train_step(T.make_train_step(loss, tx, T.learning_rate(config.vae_optim, 10), ema_decay=0.0),
                            mesh, rules, shardings, {"video": 5},
                            compiler_options=T.xla_options(mesh, compiler_options))
    video = np.random.default_rng(0).integers(0, 255, (2, 5, 16, 16, 3)).astype(np.uint8)
    for _ in range(steps):
        state, metrics = step(state, {"video": video})
    return jax.device_get(state.params), float(metrics["loss"])


VAE_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def test_vae_cpu_compile_options_keep_the_numbers():
    # The default VAE options move convolutions from YNNPACK to XLA's own kernels: same math.
    config, models = _setup()
    assert config.vae_train.xla_cpu_options.to_dict() == VAE_CPU_OPTIONS
    params, loss = _vae_steps(config, models, config.vae_train.xla_cpu_options)
    ref_params, ref_loss = _vae_steps(config, models, None)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


class _Lowered:
    """Stands in for ``jax.stages.Lowered``: records compile options, rejects some by name."""

    def __init__(self, rejects=(), error=None):
        self.rejects, self.error, self.calls = set(rejects), error, []

    def compile(self, compiler_options=None):
        self.calls.append(dict(compiler_options or {}))
        if self.error is not None:
            raise self.error
        for name in (compiler_options or {}):
            if name in self.rejects:
                raise RuntimeError(f"INVALID_ARGUMENT: No such compile option: '{name}'")
        return "compiled"


def test_compile_drops_options_this_jaxlib_rejects_with_a_warning():
    lowered = jax.jit(lambda x: x + 1).lower(np.ones(3, np.float32))
    with pytest.warns(RuntimeWarning, match="xla_cpu_no_such_option"):
        compiled = T.compile_with_options(lowered, {"xla_cpu_no_such_option": "1", **VAE_CPU_OPTIONS})
    np.testing.assert_array_equal(compiled(np.ones(3, np.float32)), 2.0)
    lowered = _Lowered(rejects={"xla_cpu_gone"})
    with pytest.warns(RuntimeWarning, match="xla_cpu_gone"):
        assert T.compile_with_options(lowered, {"xla_cpu_gone": "1", "xla_cpu_kept": "2"}) == "compiled"
    assert lowered.calls == [{"xla_cpu_gone": "1", "xla_cpu_kept": "2"}, {"xla_cpu_kept": "2"}]
    other = _Lowered(error=RuntimeError("RESOURCE_EXHAUSTED: out of memory"))
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        T.compile_with_options(other, {"xla_cpu_kept": "2"})


def test_xla_cpu_options_apply_only_to_cpu_meshes():
    class Device:
        def __init__(self, platform):
            self.platform = platform

    class Mesh:
        def __init__(self, platform):
            self.devices = np.array([Device(platform)] * 2)

    assert T.xla_options(Mesh("cpu"), VAE_CPU_OPTIONS) == VAE_CPU_OPTIONS
    assert T.xla_options(Mesh("tpu"), VAE_CPU_OPTIONS) == {}
    assert T.xla_options(Mesh("gpu"), VAE_CPU_OPTIONS) == {}
    assert T.xla_options(Mesh("cpu"), None) == {}
