"""``generate``: a sample's noise follows its seed, prompt and number, not its place in the batch."""

import dataclasses

import jax
import numpy as np
import pytest

from vdit.config import load_config
from vdit.models import build_models
from vdit.sample import (Pipeline, config_from_workdir, generate, init_params, latent_shape, sample_key,
                         sample_mesh)

RED, BLUE = "a red circle moving left", "a blue square moving up"


@pytest.fixture(scope="module")
def pipe():
    config = load_config("tiny")
    models = build_models(config)
    return Pipeline(models, init_params(models, config, jax.random.key(0)), config)


def _close(a, b):
    # uint8 frames from batches of different sizes: XLA may round a value to the other side of .5
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_a_prompt_gives_the_same_videos_alone_or_in_any_batch(pipe):
    both = generate(pipe, [RED, BLUE], num_per_prompt=2, steps=2, seed=3)
    assert both.shape[0] == 4 and both.dtype == np.uint8
    _close(generate(pipe, [BLUE], steps=2, seed=3)[0], both[2])
    _close(generate(pipe, [BLUE, RED], num_per_prompt=2, steps=2, seed=3), both[[2, 3, 0, 1]])
    more = generate(pipe, RED, num_per_prompt=3, steps=2, seed=3)  # more samples only add videos
    _close(more[:2], both[:2])
    assert np.abs(more[2].astype(int) - more[0]).max() > 10  # ... that differ
    assert np.abs(generate(pipe, RED, steps=2, seed=4)[0].astype(int) - both[0]).max() > 10


def test_sample_key_depends_on_seed_prompt_and_index():
    keys = [sample_key(0, RED, 0), sample_key(1, RED, 0), sample_key(0, BLUE, 0), sample_key(0, RED, 1)]
    data = {tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys}
    assert len(data) == 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), r"generate: steps must be a positive integer, got 0"),
    (dict(num_per_prompt=0), r"generate: num_per_prompt must be a positive integer, got 0"),
    (dict(steps=2.5), r"generate: steps must be a positive integer, got 2.5"),
    (dict(prompts=[]), r"generate: prompts is empty"),
    (dict(seed="abc"), r"generate: seed must be a 64-bit integer, got 'abc'"),
    (dict(seed=10**23), r"generate: seed must be a 64-bit integer, got 100000000000000000000000"),
    (dict(cfg=float("nan")), r"generate: cfg \(the guidance scale\) must be a finite number, got nan"),
    (dict(frames=5.0), r"frames=5.0: expected a positive integer"),
    (dict(frames=6), r"expected T = 1 \+ 4k frames, got 6; nearest valid: 5 or 9"),
    (dict(resolution=(16,)), r"resolution=\(16,\): expected a positive int or an \(H, W\) pair"),
    # tiny: a 4x VAE under 2x2 patches, so 8 pixels a token; 20 would make a latent the DiT cannot patch
    (dict(resolution=20), r"resolution H=20: expected a multiple of 8 .*; nearest: 16 or 24"),
    (dict(resolution=(16, 12)), r"resolution W=12: expected a multiple of 8 .*; nearest: 8 or 16"),
])
def test_bad_options_are_named(pipe, kwargs, match):
    kwargs = {"prompts": RED, "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(pipe, **kwargs)


def test_a_workdir_without_a_dit_says_what_to_train(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has trained only its vae so far; train the dit with `vdit train "
                                                r"--config .*vae/config.json --workdir .* --phase dit`"):
        config_from_workdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"is .* a workdir trained with `vdit train`\?"):
        config_from_workdir(tmp_path / "nothing")


@pytest.fixture(scope="module")
def vp_pipe():
    from vdit.config import override

    # v-prediction: the untrained (zero-output, adaLN-zero) DiT then predicts x0 = alpha x, which
    # keeps what DDIM's step noise adds visible (with eps, x0 = x / alpha drowns it at t = 1).
    config = override(load_config("tiny"), ["schedule.kind=vp", "schedule.prediction=v", "sample.sampler=ddim"])
    models = build_models(config)
    return Pipeline(models, init_params(models, config, jax.random.key(0)), config)


def test_stochastic_ddim_noise_follows_each_sample_too(vp_pipe):
    both = generate(vp_pipe, [RED, BLUE], num_per_prompt=2, steps=3, seed=3, eta=1.0)
    _close(generate(vp_pipe, [BLUE], steps=3, seed=3, eta=1.0)[0], both[2])  # the step noise is per sample
    _close(generate(vp_pipe, [RED, BLUE], num_per_prompt=2, steps=3, seed=3, eta=1.0), both)  # and reproducible
    deterministic = generate(vp_pipe, [RED, BLUE], num_per_prompt=2, steps=3, seed=3)  # sample.eta = 0
    assert np.abs(deterministic.astype(int) - both).max() > 10  # eta > 0 did draw noise


def test_eta_is_checked_before_compiling(pipe, vp_pipe):
    with pytest.raises(ValueError, match=r"eta only applies to sampler 'ddim', got eta=0.5 with 'unipc'"):
        generate(pipe, RED, steps=2, eta=0.5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\], got 1.5"):
        generate(vp_pipe, RED, steps=2, eta=1.5)


def test_frames_must_fill_the_dits_temporal_patches(pipe):
    models = dataclasses.replace(pipe.models, dit=pipe.models.dit.clone(patch_size=(2, 2, 2)))
    two = Pipeline(models, None, pipe.config)
    assert latent_shape(two, 5, 16)[0] == 2 and latent_shape(two, 13, 16)[0] == 4
    with pytest.raises(ValueError, match=r"frames=9: the DiT's temporal patch 2 needs .*; nearest: 5 or 13"):
        latent_shape(two, 9, 16)
    with pytest.raises(ValueError, match=r"frames=1: .*; nearest: 5$"):
        latent_shape(two, 1, 16)


@pytest.mark.parametrize("spec, match", [
    ("data=3", r"mesh data=3 x fsdp=1 x context=1 x tensor=1 uses 3 devices but 8 are available"),
    ("dat=8", r"--mesh dat=8: expected 'config' or AXIS=SIZE pairs joined by commas, AXIS one of data, fsdp"),
    ("data=two", r"--mesh data=two: expected 'config' or AXIS=SIZE pairs"),
    ("data=-1,fsdp=-1", r"use positive sizes and at most one -1"),
])
def test_sample_mesh_names_a_bad_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        sample_mesh(load_config("tiny"), spec)


def test_sample_mesh_from_the_config_or_axes():
    assert dict(sample_mesh(load_config("tiny"), "config").shape) == {"data": 8, "fsdp": 1, "context": 1, "tensor": 1}
    assert dict(sample_mesh(None, "fsdp=4, data=-1").shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert sample_mesh(None, None).devices.size == 1


def test_parameters_already_on_the_mesh_sample_as_replicated_ones(pipe):
    from vdit.sharding import make_mesh, replicated

    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    placed = Pipeline(pipe.models, jax.device_put(pipe.params, replicated(mesh)), pipe.config, mesh)
    np.testing.assert_array_equal(generate(placed, [RED, BLUE], steps=2), generate(pipe, [RED, BLUE], steps=2))
