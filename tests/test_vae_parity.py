"""Numerical parity of vdit.vae.CausalVAE with diffusers' AutoencoderKLWan (Wan2.1 VAE).

diffusers runs its own chunked loop (first frame, then 4 frames per chunk to encode,
one latent frame at a time to decode); vdit's whole-clip and chunked paths must both
reproduce it. Weights are random, with the RMS-norm gammas (ones at init) randomised
so that a dropped or misplaced scale fails the test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # installed with the test extras, so this runs in CI
diffusers = pytest.importorskip("diffusers")

from vdit.convert.wan_vae import convert_wan_vae, wan_vae_kwargs  # noqa: E402
from vdit.vae import CausalVAE  # noqa: E402

FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tiny programs: compile time dominates

# diffusers' own AutoencoderKLWan test config, and one of ours: non-square frames, 13
# frames, 4x spatial / 4x temporal, separate decoder width, 2 res blocks, latent stats.
DIFFUSERS_TEST = dict(
    base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
)
OURS = dict(
    base_dim=8,
    decoder_base_dim=12,
    z_dim=4,
    dim_mult=[1, 2, 2],
    num_res_blocks=2,
    temperal_downsample=[True, True],
    scale_factor_spatial=4,
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[1.5, 0.5, 2.0, 1.0],
)
CASES = {"diffusers_test": (DIFFUSERS_TEST, (2, 3, 9, 16, 16)), "ours_13x16x24": (OURS, (1, 3, 13, 16, 24))}


def torch_vae(config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLWan(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
        # Keep most decoded pixels inside [-1, 1] so the final clamp hides nothing.
        model.decoder.conv_out.weight.mul_(0.3)
    return model


def to_jax(x):  # (B, C, T, H, W) torch -> (B, T, H, W, C)
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1))


def to_torch_layout(x):
    return np.asarray(x).transpose(0, 4, 1, 2, 3)


def vdit_fn(model, method, params, x, **kwargs):
    fn = jax.jit(lambda p, v: model.apply({"params": p}, v, method=method, **kwargs))
    return fn.lower(params, x).compile(compiler_options=FAST_COMPILE)(params, x)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    config, shape = CASES[request.param]
    model = torch_vae(config)
    torch.manual_seed(1)
    x = torch.rand(shape) * 2 - 1
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        decoded = model.decode(dist.mean).sample
    kwargs, params = convert_wan_vae(model)
    vae = CausalVAE(**kwargs)
    return dict(name=request.param, torch=model, x=x, dist=dist, decoded=decoded, vae=vae, params=params)


@pytest.mark.parametrize("chunked", [False, True])
def test_encode_matches_diffusers(case, chunked):
    post = vdit_fn(case["vae"], "encode", case["params"], to_jax(case["x"]), normalize=False, chunked=chunked)
    mean_err = np.abs(to_torch_layout(post.mean) - case["dist"].mean.numpy()).max()
    logvar_err = np.abs(to_torch_layout(post.logvar) - case["dist"].logvar.numpy()).max()
    print(f"{case['name']} chunked={chunked}: encode mean {mean_err:.2e} logvar {logvar_err:.2e}")
    assert mean_err <= 1e-3 and logvar_err <= 1e-3
    assert np.abs(case["dist"].mean.numpy()).mean() > 0.05  # a meaningful comparison


@pytest.mark.parametrize("chunked", [False, True])
def test_decode_matches_diffusers(case, chunked):
    z = to_jax(case["dist"].mean)
    out = vdit_fn(case["vae"], "decode", case["params"], z, normalize=False, chunked=chunked)
    ref = case["decoded"].numpy()
    err = np.abs(to_torch_layout(out) - ref).max()
    print(f"{case['name']} chunked={chunked}: decode {err:.2e}")
    assert out.shape == to_jax(case["x"]).shape
    assert err <= 1e-3
    assert np.mean(np.abs(ref) < 0.99) > 0.9 and np.abs(ref).mean() > 0.02  # unclamped, nonzero


def test_latent_statistics_are_carried(case):
    config = dict(case["torch"].config)
    post = vdit_fn(case["vae"], "encode", case["params"], to_jax(case["x"]))  # normalize=True
    mean, std = np.array(config["latents_mean"]), np.array(config["latents_std"])
    expected = (case["dist"].mean.numpy() - mean[:, None, None, None]) / std[:, None, None, None]
    np.testing.assert_allclose(to_torch_layout(post.mean), expected, atol=1e-3)


def test_convert_from_numpy_state_dict():
    model = torch_vae(OURS)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    kwargs, params = convert_wan_vae(state, dict(model.config))
    ref_kwargs, ref_params = convert_wan_vae(model)
    assert kwargs == ref_kwargs and kwargs["temporal_downsample"] == (True, True)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    kernel = params["encoder"]["down_blocks_3"]["conv1"]["conv"]["kernel"]
    assert kernel.shape == (3, 3, 3, 8, 16) and kernel.dtype == np.float32


def test_convert_reports_bad_keys_and_configs():
    model = torch_vae(DIFFUSERS_TEST)
    config = dict(model.config)
    state = dict(model.state_dict())
    with pytest.raises(ValueError, match=r"1 unexpected keys \[encoder\.extra\.weight\]; 0 missing"):
        convert_wan_vae({**state, "encoder.extra.weight": torch.zeros(1)}, config)
    del state["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match=r"0 unexpected keys \[\]; 1 missing vdit parameters \[decoder/conv_out/conv/"):
        convert_wan_vae(state, config)
    state["decoder.conv_out.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"wrong shape: decoder/conv_out/conv/bias: \(4,\) vs \(3,\)"):
        convert_wan_vae(state, config)
    with pytest.raises(ValueError, match="needs the AutoencoderKLWan config"):
        convert_wan_vae(state)
    with pytest.raises(ValueError, match="Wan2.2"):
        wan_vae_kwargs({**config, "is_residual": True})
    with pytest.raises(ValueError, match="unknown AutoencoderKLWan config keys"):
        wan_vae_kwargs({**config, "base_dimm": 3})


@pytest.mark.slow
def test_full_wan21_architecture_matches_diffusers():
    # The real Wan2.1 VAE layout (base_dim 96, 8x spatial, 4x temporal, z 16), random weights.
    model = torch_vae({})
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        decoded = model.decode(dist.mean).sample
    kwargs, params = convert_wan_vae(model)
    assert kwargs["latents_mean"][0] == pytest.approx(-0.7571)
    vae = CausalVAE(**kwargs)
    assert (vae.temporal_factor, vae.spatial_factor) == (4, 8)
    post = vdit_fn(vae, "encode", params, to_jax(x), normalize=False)
    assert np.abs(to_torch_layout(post.mean) - dist.mean.numpy()).max() <= 1e-3
    out = vdit_fn(vae, "decode", params, to_jax(dist.mean), normalize=False, chunked=True)
    assert np.abs(to_torch_layout(out) - decoded.numpy()).max() <= 1e-3
