"""Tests of vdit.vae: shapes, chunked == whole clip, tiling, input checks, posterior, axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import traverse_util

from vdit.vae import CausalVAE, DiagonalGaussian, check_latents, check_video

# 4x temporal, 4x spatial, 4 latent channels: small enough for CPU.
SMALL = dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True))


def random_params(model, seed=0):
    """Random parameters of the right structure without compiling ``init`` (slow on CPU).

    Norm scales and biases are random too, so every parameter matters in the checks.
    """
    video = jax.ShapeDtypeStruct((1, 1, model.spatial_factor, model.spatial_factor, model.in_channels), jnp.float32)
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), video)["params"])
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        if path[-1] == "kernel":
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif path[-1] == "scale":
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = rng.normal(scale=0.1, size=leaf.shape)
        out[path] = jnp.asarray(value, leaf.dtype)
    return traverse_util.unflatten_dict(out)


# Tests run tiny programs: XLA's backend optimisations cost more compile time than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_compiled = {}


def compile_fast(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with ``FAST_COMPILE``."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def run(model, params, method, x, **kwargs):
    """``model.apply(..., method=method, **kwargs)`` jitted, compiled once per signature."""
    key = (model, method, tuple(sorted(kwargs.items())), x.shape, x.dtype)
    if key not in _compiled:
        _compiled[key] = compile_fast(lambda p, v: model.apply({"params": p}, v, method=method, **kwargs), params, x)
    return _compiled[key](params, x)


@pytest.fixture(scope="module")
def vae():
    model = CausalVAE(**SMALL)
    return model, random_params(model)


def video(shape, seed=1):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def test_shapes_image_and_video(vae):
    model, params = vae
    assert (model.temporal_factor, model.spatial_factor) == (4, 4)
    for shape in [(2, 1, 16, 16, 3), (1, 9, 16, 24, 3)]:
        post = run(model, params, "encode", video(shape))
        latent = model.latent_shape(shape)
        assert latent == (shape[0], 1 + (shape[1] - 1) // 4, shape[2] // 4, shape[3] // 4, 4)
        assert post.mean.shape == post.logvar.shape == latent and post.mean.dtype == jnp.float32
        out = run(model, params, "decode", post.mean)
        assert out.shape == shape == model.video_shape(latent)
        assert float(jnp.abs(out).max()) <= 1.0  # clamped


def test_chunked_equals_whole_clip(vae):
    model, params = vae
    x = video((1, 9, 16, 24, 3))
    whole = run(model, params, "encode", x)
    chunked = run(model, params, "encode", x, chunked=True)
    np.testing.assert_allclose(chunked.mean, whole.mean, atol=1e-4, rtol=0)
    np.testing.assert_allclose(chunked.logvar, whole.logvar, atol=1e-4, rtol=0)
    z = whole.mean
    whole_px = run(model, params, "decode", z, clamp=False)
    chunked_px = run(model, params, "decode", z, chunked=True, clamp=False)
    assert whole_px.shape == x.shape
    np.testing.assert_allclose(chunked_px, whole_px, atol=1e-4, rtol=0)
    assert float(jnp.abs(whole_px).mean()) > 0.05  # not trivially zero


def test_chunk_loop_is_a_scan_traced_once(vae):
    # The traced program does not grow with the number of chunks: one scan body.
    model, params = vae

    def convs(frames, method, **kw):
        x = jnp.zeros((1, frames, 16, 16, 3)) if method == "encode" else jnp.zeros((1, frames, 4, 4, 4))
        jaxpr = str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, method=method, **kw))(params, x))
        return jaxpr.count("conv_general_dilated"), "scan" in jaxpr

    # first frame + one scan body: at most twice the convs of the whole-clip program
    count, has_scan = convs(9, "encode", chunked=True)
    assert has_scan and count <= 2 * convs(9, "encode")[0]
    assert convs(25, "encode", chunked=True) == (count, True)
    assert convs(3, "decode", chunked=True) == convs(7, "decode", chunked=True)


def test_tiling_reduces_exactly_when_one_tile_covers_the_frame(vae):
    model, params = vae
    x = video((1, 9, 16, 24, 3))
    post = run(model, params, "encode", x)
    tiled = run(model, params, "encode", x, tile_size=(16, 24))
    np.testing.assert_array_equal(tiled.mean, post.mean)
    out = run(model, params, "decode", post.mean)
    np.testing.assert_array_equal(run(model, params, "decode", post.mean, tile_size=32), out)


def test_tiled_is_close_to_untiled(vae):
    # Tiles see zero padding at their borders, so results differ near seams; with random
    # weights (no learned locality) the blend still keeps them close on average.
    model, params = vae
    x = video((1, 5, 48, 48, 3))
    post = run(model, params, "encode", x)
    tiled = run(model, params, "encode", x, tile_size=32, tile_stride=16)
    err = float(jnp.abs(tiled.mean - post.mean).mean())
    assert 0 < err < 0.3 * float(jnp.abs(post.mean).mean())
    out = run(model, params, "decode", post.mean, clamp=False)
    tiled_out = run(model, params, "decode", post.mean, clamp=False, tile_size=32, tile_stride=16)
    assert tiled_out.shape == out.shape
    assert 0 < float(jnp.abs(tiled_out - out).mean()) < 0.35 * float(jnp.abs(out).mean())
    # Tiling composes with the causal chunk loop.
    both = run(model, params, "decode", post.mean, clamp=False, tile_size=32, tile_stride=16, chunked=True)
    np.testing.assert_allclose(both, tiled_out, atol=1e-4, rtol=0)


def test_tile_blend_weights_sum_to_one(vae):
    # A pixel-local function must come out of the tiler unchanged, in both directions
    # (encode-like 2x downscale, decode-like 2x upscale) and with a shifted last tile.
    model, params = vae
    x = video((1, 3, 20, 28, 2))

    def pool(mdl, t):
        return t.reshape(*t.shape[:2], t.shape[2] // 2, 2, t.shape[3] // 2, 2, t.shape[4]).mean((3, 5))

    def upsample(mdl, t):
        return jnp.repeat(jnp.repeat(jnp.sin(3 * t), 2, 2), 2, 3)

    def tiled(fn, out_shape, up, down):
        return model.apply(
            {"params": params}, fn, x, out_shape, (8, 12), (6, 8), up, down, method=CausalVAE._tiled
        )

    np.testing.assert_allclose(tiled(pool, (1, 3, 10, 14, 2), 1, 2), pool(None, x), atol=1e-6)
    np.testing.assert_allclose(tiled(upsample, (1, 3, 40, 56, 2), 2, 1), upsample(None, x), atol=1e-6)


def test_bad_input_messages(vae):
    model, params = vae
    cases = [
        ((2, 15, 32, 32, 3), "expected T = 1 + 4k frames, got 15; nearest valid: 13 or 17"),
        ((2, 3, 9, 32, 32), "looks channels-first (B, C, T, H, W)"),
        ((2, 32, 32, 3), "is a 1-frame video: use x[:, None]"),
        ((2, 9, 30, 32, 3), "expected H divisible by 4, got 30; nearest valid: 28 or 32"),
        ((2, 9, 32, 2, 3), "expected W divisible by 4, got 2; nearest valid: 4"),
        ((2, 9, 32, 32, 4), "with 3 channels last, got 4"),
    ]
    for shape, text in cases:
        with pytest.raises(ValueError) as err:
            model.check_video(shape)
        assert text in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(ValueError, match=r"expected T = 1 \+ 4k frames, got 0; nearest valid: 1$"):
        check_video((1, 0, 8, 8, 3))
    with pytest.raises(ValueError, match="expected H divisible by 8, got 30; nearest valid: 24 or 32"):
        check_video((1, 17, 30, 32, 3))  # the Wan2.1 defaults
    with pytest.raises(ValueError, match="looks channels-first"):
        run(model, params, "encode", jnp.zeros((1, 3, 9, 16, 16)))
    with pytest.raises(ValueError, match=r"expected channels-last \(B, t, h, w, 4\)"):
        run(model, params, "decode", jnp.zeros((1, 4, 3, 4, 4 + 1)))
    with pytest.raises(ValueError, match="rank-5"):
        check_latents((1, 4, 4, 16), channels=16)
    with pytest.raises(ValueError, match="tile_size must be positive multiples of spatial_factor 4"):
        run(model, params, "encode", jnp.zeros((1, 1, 16, 16, 3)), tile_size=6)
    with pytest.raises(ValueError, match=r"expected a size or an \(h, w\) pair of pixels, got \(8,\)"):
        run(model, params, "encode", jnp.zeros((1, 1, 16, 16, 3)), tile_size=(8,))
    with pytest.raises(ValueError, match=r"video of dtype uint8: expected floats in \[-1, 1\]"):
        run(model, params, "encode", jnp.zeros((1, 1, 16, 16, 3), jnp.uint8))


def test_posterior_sample_kl_and_normalisation(vae):
    model, params = vae
    x = video((2, 1, 16, 16, 3))
    post = run(model, params, "encode", x)
    key = jax.random.key(3)
    z = post.sample(key)
    assert z.shape == post.mean.shape == (2, 1, 4, 4, 4)
    np.testing.assert_array_equal(z, post.sample(key))
    assert not np.allclose(z, post.sample(jax.random.key(4)))
    kl = post.kl()
    assert kl.shape == (2,) and bool(jnp.all(kl > 0))
    zero = DiagonalGaussian(jnp.zeros((1, 1, 2, 2, 4)), jnp.zeros((1, 1, 2, 2, 4)))
    np.testing.assert_allclose(zero.kl(), [0.0], atol=1e-7)

    mean, std = (0.5, -1.0, 0.0, 2.0), (2.0, 0.5, 1.0, 4.0)
    normed = CausalVAE(**SMALL, latents_mean=mean, latents_std=std)
    npost = run(normed, params, "encode", x)  # normalize=True is the default
    np.testing.assert_allclose(npost.mean, (post.mean - np.array(mean)) / np.array(std), atol=1e-6)
    np.testing.assert_allclose(npost.std, post.std / np.array(std), rtol=1e-5)
    np.testing.assert_allclose(
        run(normed, params, "decode", npost.mean), run(model, params, "decode", post.mean), atol=1e-5
    )


def test_training_forward_and_gradients():
    model = CausalVAE(base_dim=4, z_dim=4, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,))
    params = random_params(model)
    x = video((1, 5, 8, 8, 3))

    def loss(p):
        recon, post = model.apply({"params": p}, x, jax.random.key(0))
        return jnp.mean(jnp.square(recon - x)) + 1e-6 * post.kl().mean()

    value, grads = compile_fast(jax.value_and_grad(loss), params)(params)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) == len(leaves)  # every parameter is used


def test_bf16_compute_keeps_f32_params_and_streams(vae):
    _, params = vae
    model = CausalVAE(**SMALL, dtype=jnp.bfloat16)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1, 4, 4, 3)))
    assert {leaf.dtype for leaf in jax.tree.leaves(nn.meta.unbox(abstract))} == {jnp.dtype(jnp.float32)}
    x = video((1, 9, 16, 24, 3))
    ref = run(CausalVAE(**SMALL), params, "encode", x).mean
    post = run(model, params, "encode", x, chunked=True)
    assert post.mean.dtype == jnp.float32
    assert float(jnp.abs(post.mean - ref).max()) < 0.1 * float(jnp.abs(ref).max())
    out = run(model, params, "decode", post.mean, chunked=True)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


def test_parameters_have_logical_axes():
    model = CausalVAE(**SMALL)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1, 4, 4, 3)))
    specs = traverse_util.flatten_dict(nn.get_partition_spec(abstract)["params"])
    assert len(specs) > 50
    for path, spec in specs.items():
        assert len(spec) > 0, path
        assert set(spec) & {"conv_in", "conv_out", "norm"}, (path, spec)
    kernel = specs[("encoder", "conv_in", "conv", "kernel")]
    assert tuple(kernel) == (None, None, None, "conv_in", "conv_out")


def test_temporal_resamplers_start_as_frame_identity():
    # Wan's init: the downsampler keeps one frame of each pair, the upsampler repeats each frame.
    model = CausalVAE(**SMALL)
    key, x = jax.random.key(0), jnp.zeros((1, 5, 8, 8, 3))
    params = nn.meta.unbox(compile_fast(model.init, key, x)(key, x)["params"])
    kernels = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()
               if "time_conv" in k and k[-1] == "kernel"}
    assert sorted({k[0] for k in kernels}) == ["decoder", "encoder"] and len(kernels) == 4
    for path, kernel in kernels.items():
        c = kernel.shape[3]
        expected = np.zeros_like(kernel)
        if path[0] == "encoder":
            expected[1, 0, 0] = np.eye(c)
        else:
            expected[2, 0, 0] = np.concatenate([np.eye(c), np.eye(c)], axis=1)
        np.testing.assert_array_equal(kernel, expected, err_msg=str(path))
