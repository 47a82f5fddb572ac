"""DiT behaviour: shapes, adaLN-Zero init, options that must not change the maths, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit.dit import DiT, count_params, timestep_embedding

TINY = dict(in_channels=4, patch_size=(1, 2, 2), width=32, depth=2, num_heads=2, mlp_dim=64, text_dim=16, freq_dim=32)


def _inputs(b=2, t=3, h=8, w=12, c=4, text_len=5, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(ks[0], (b, t, h, w, c))
    text = jax.random.normal(ks[1], (b, text_len, 16))
    mask = jnp.arange(text_len)[None] < jnp.array([[3], [text_len]])[:b]
    return x, jax.random.uniform(ks[2], (b,)), text, mask


def _randomised_params(model, *args, seed=1):
    # adaLN-Zero makes a fresh model output zeros; perturb so comparisons can fail.
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *args)["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def test_shapes_and_zero_init():
    model = DiT(**TINY)
    x, t, text, mask = _inputs()
    variables = model.init(jax.random.PRNGKey(0), x, t, text, mask)
    out = model.apply(variables, x, t, text, mask)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # Zero-initialised output projection: an untrained DiT predicts exactly zero.
    assert float(jnp.abs(out).max()) == 0.0


def test_every_param_has_logical_axes():
    x, t, text, mask = _inputs()
    variables = DiT(**TINY).init(jax.random.PRNGKey(0), x, t, text, mask)
    specs = nn.get_partition_spec(variables)["params"]
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0]
    assert flat and all(isinstance(s, jax.sharding.PartitionSpec) and len(s) > 0 for _, s in flat)
    names = {n for _, s in flat for n in s if n}
    assert {"embed", "mlp", "heads"} <= names


@pytest.mark.parametrize("option", [dict(remat="full"), dict(remat="dots"), dict(attention_impl="chunked")])
def test_options_preserve_outputs_and_grads(option):
    x, t, text, mask = _inputs()
    base = DiT(**TINY)
    params = _randomised_params(base, x, t, text, mask)
    other = DiT(**TINY, **option)

    def loss(model):
        return lambda p: jnp.mean(model.apply({"params": p}, x, t, text, mask) ** 2)

    l0, g0 = jax.value_and_grad(loss(base))(params)
    l1, g1 = jax.value_and_grad(loss(other))(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g0)


def test_unrolled_remat_saves_memory():
    # Unrolled blocks recompute only once their output's cotangent exists
    # (layers.remat_after_cotangent); with jax.checkpoint alone XLA:CPU ran every block's
    # recomputation right after the forward pass, and remat saved nothing (81-85 MiB each here).
    model = dict(TINY, width=256, num_heads=4, mlp_dim=1024, depth=4, text_dim=16)
    args = [jax.ShapeDtypeStruct(s, d) for s, d in [((2, 4, 16, 16, 4), jnp.float32), ((2,), jnp.float32),
                                                     ((2, 8, 16), jnp.float32), ((2, 8), jnp.bool_)]]
    temp = {}
    for remat in ("none", "dots", "full"):
        dit = DiT(**model, remat=remat)
        params = jax.eval_shape(dit.init, jax.random.PRNGKey(0), *args)
        grad = jax.jit(jax.grad(lambda p, *a, dit=dit: jnp.mean(dit.apply(p, *a) ** 2)))
        temp[remat] = grad.lower(params, *args).compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.5 * temp["none"] and temp["dots"] < 0.6 * temp["none"], temp


def test_scan_layers_equals_unrolled():
    from vdit.convert.common import stack_layers

    x, t, text, mask = _inputs()
    params = _randomised_params(DiT(**TINY), x, t, text, mask)
    blocks = [params.pop(f"blocks_{i}") for i in range(TINY["depth"])]
    scanned = dict(params, blocks={"block": stack_layers(blocks)})
    params.update({f"blocks_{i}": b for i, b in enumerate(blocks)})
    ref = DiT(**TINY).apply({"params": params}, x, t, text, mask)
    out = DiT(**TINY, scan_layers=True, remat="full").apply({"params": scanned}, x, t, text, mask)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    specs = nn.get_partition_spec(DiT(**TINY, scan_layers=True).init(jax.random.PRNGKey(0), x, t, text, mask))
    assert specs["params"]["blocks"]["block"]["mlp"]["fc1"]["linear"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "mlp"
    )


def test_dots_remat_saves_the_same_matmuls_in_bf16_as_in_f32():
    # A matmul is a custom-VJP call (layers.einsum); the "dots" policy must still save it,
    # or the backward pass recomputes every matmul, as "full" does. (Attention's batched
    # matmuls are recomputed under "dots" in every dtype, by the policy's design.)
    x, t, text, mask = _inputs()
    params = _randomised_params(DiT(**TINY), x, t, text, mask)

    def matmuls_in_gradient(remat, dtype):
        model = DiT(**TINY, remat=remat, dtype=dtype, activation_dtype="float32")
        grad = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, text, mask)))
        return str(jax.make_jaxpr(grad)(params)).count("dot_general")

    f32, bf16 = ({r: matmuls_in_gradient(r, d) for r in ("none", "dots", "full")} for d in ("float32", "bfloat16"))
    assert f32["none"] < f32["dots"] < f32["full"]
    assert bf16["dots"] - bf16["none"] == f32["dots"] - f32["none"]  # the same matmuls recomputed
    assert bf16["full"] - bf16["none"] == f32["full"] - f32["none"]


def test_text_mask_hides_padding_and_text_matters():
    x, t, text, mask = _inputs()
    model = DiT(**TINY)
    params = _randomised_params(model, x, t, text, mask)
    out = model.apply({"params": params}, x, t, text, mask)
    noisy_pad = text.at[0, 3:].set(100.0)  # sample 0 has 3 real tokens
    np.testing.assert_allclose(model.apply({"params": params}, x, t, noisy_pad, mask), out, atol=1e-6)
    changed = model.apply({"params": params}, x, t, text.at[0, 0].add(1.0), mask)
    assert float(jnp.abs(changed[0] - out[0]).max()) > 1e-3
    np.testing.assert_allclose(changed[1], out[1], atol=1e-6)  # samples do not leak into each other


def test_bf16_compute_keeps_f32_params_and_is_close():
    x, t, text, mask = _inputs()
    params = _randomised_params(DiT(**TINY), x, t, text, mask)
    ref = DiT(**TINY).apply({"params": params}, x, t, text, mask)
    low = DiT(**TINY, dtype=jnp.bfloat16).apply({"params": params}, x, t, text, mask)
    assert low.dtype == jnp.float32
    assert float(jnp.abs(low - ref).max()) < 0.05 * float(jnp.abs(ref).max())
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))


def test_bf16_params_keep_conditioning_and_norms_in_f32():
    # As diffusers keeps Wan's time embedder, scale_shift_tables and norms in f32.
    x, t, text, mask = _inputs()
    model = DiT(**TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, pooled_text=True, cross_attn_norm=True)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, text, mask)["params"])
    f32 = {jax.tree_util.keystr(path) for path, a in jax.tree_util.tree_leaves_with_path(params)
           if a.dtype == jnp.float32}
    kept = ("time_embed", "time_proj", "text_pool_embed", "modulation", "out_modulation", "norm2")
    assert f32 and all(any(f"'{k}'" in name for k in kept) for name in f32), f32
    assert {"['out_modulation']", "['blocks_0']['modulation']", "['blocks_1']['norm2']['scale']"} <= f32
    assert "['blocks_0']['self_attn']['q']['linear']['kernel']" not in f32 and len(f32) < len(jax.tree.leaves(params))


def test_bf16_matmul_operands_with_f32_activations_are_close_in_outputs_and_grads():
    x, t, text, mask = _inputs()
    params = _randomised_params(DiT(**TINY), x, t, text, mask)
    low_model = DiT(**TINY, dtype=jnp.bfloat16, activation_dtype=jnp.float32)

    def loss(model, p):
        return jnp.mean(model.apply({"params": p}, x, t, text, mask) ** 2)

    ref, g_ref = jax.value_and_grad(lambda p: loss(DiT(**TINY), p))(params)
    low, g_low = jax.value_and_grad(lambda p: loss(low_model, p))(params)
    assert abs(float(low - ref)) < 0.02 * float(ref)
    for a, b in zip(jax.tree.leaves(g_low), jax.tree.leaves(g_ref)):
        assert a.dtype == jnp.float32
        assert float(jnp.linalg.norm(a - b)) < 0.05 * float(jnp.linalg.norm(b)) + 1e-6


def test_cudnn_attention_trains_like_xla():
    """On a GPU: a bf16 DiT with cuDNN attention has xla's loss and gradients (odd text length included)."""
    from vdit.attention import backend_unavailable_reason

    reason = backend_unavailable_reason("cudnn")
    if reason:
        pytest.skip(reason)
    x, t, text, mask = _inputs(text_len=5)
    params = _randomised_params(DiT(**TINY), x, t, text, mask)

    def loss(impl):
        model = DiT(**TINY, dtype=jnp.bfloat16, attention_impl=impl)
        return jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, x, t, text, mask) ** 2))(params)

    ref, g_ref = loss("xla")
    got, g_got = loss("cudnn")
    assert abs(float(got - ref)) < 0.02 * float(ref)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
        assert float(jnp.linalg.norm(a - b)) < 0.05 * float(jnp.linalg.norm(b)) + 1e-6


def test_bad_inputs():
    model = DiT(**TINY)
    x, t, text, mask = _inputs()
    init = lambda x_, text_=text: model.init(jax.random.PRNGKey(0), x_, t, text_, mask)  # noqa: E731
    with pytest.raises(ValueError, match=r"nearest valid W: 10 or 12"):
        init(x[:, :, :, :11])
    with pytest.raises(ValueError, match=r"channels-first\?"):
        init(jnp.moveaxis(x, -1, 1))
    with pytest.raises(ValueError, match="rank 4"):
        init(x[0])
    with pytest.raises(ValueError, match=r"text \(B=2, L, text_dim=16\)"):
        init(x, text[..., :8])
    with pytest.raises(ValueError, match="remat policy 'some'"):
        DiT(**TINY, remat="some").init(jax.random.PRNGKey(0), x, t, text, mask)
    with pytest.raises(ValueError, match=r"DiT sizes must be positive integers, got \{'width': 0, 'depth': -1\}"):
        DiT(**{**TINY, "width": 0, "depth": -1}).init(jax.random.PRNGKey(0), x, t, text, mask)
    for patch in ((1, 0, 2), (2, 2)):  # a 0 divided by zero; two entries patched T by H
        with pytest.raises(ValueError, match=r"DiT patch_size must be three positive integers \(t, h, w\), got \("):
            DiT(**{**TINY, "patch_size": patch}).init(jax.random.PRNGKey(0), x, t, text, mask)
    for bad_t in (jnp.zeros(3), jnp.zeros((2, 1))):
        with pytest.raises(ValueError, match=r"DiT expects t of shape \(B=2,\) or a scalar, got shape \("):
            model.init(jax.random.PRNGKey(0), x, bad_t, text, mask)
    with pytest.raises(ValueError, match=r"DiT expects t as float times in \[0, 1\] .*=1000\), got int32"):
        model.init(jax.random.PRNGKey(0), x, jnp.array([500, 20], jnp.int32), text, mask)  # diffusers' timesteps
    with pytest.raises(ValueError, match=r"timestep_embedding expects timesteps of shape \(B,\), got shape \(2, 1\)"):
        timestep_embedding(jnp.zeros((2, 1)), 8)


def test_param_count_matches_formula():
    x, t, text, mask = _inputs()
    d, m, p, c = 32, 64, 4, 4
    attn = 4 * (d * d + d) + 2 * d
    block = 6 * d + 2 * attn + 2 * d + (d * m + m + m * d + d)
    embed = (p * c * d + d) + (32 * d + d) + (d * d + d) + (d * 6 * d + 6 * d) + (16 * d + d) + (d * d + d)
    head = 2 * d + d * p * c + p * c
    params = DiT(**TINY).init(jax.random.PRNGKey(0), x, t, text, mask)["params"]
    assert count_params(params) == embed + 2 * block + head


def test_pooled_text_conditions_on_the_masked_mean_only():
    model = DiT(**TINY, pooled_text=True)
    x, t, text, mask = _inputs()
    params = _randomised_params(model, x, t, text, mask)
    assert "text_pool_embed" in params and "text_pool_embed" not in DiT(**TINY).init(
        jax.random.PRNGKey(0), x, t, text, mask)["params"]
    apply = jax.jit(lambda p, txt: model.apply({"params": p}, x, t, txt, mask))
    out = apply(params, text)
    # Padded text positions change nothing; real ones change the output through both paths.
    padded = text.at[0, 3:].set(100.0)
    np.testing.assert_allclose(apply(params, padded), out, atol=1e-5)
    # With cross-attention cancelled (zero values), the pooled vector alone still conditions.
    no_cross = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if "cross_attn" in jax.tree_util.keystr(path) and "'out'" in
        jax.tree_util.keystr(path) else a, params)
    shifted = text.at[0, :3].add(1.0)
    assert float(jnp.abs(apply(no_cross, shifted)[0] - apply(no_cross, text)[0]).max()) > 1e-3
    assert float(jnp.abs(apply(no_cross, shifted)[1] - apply(no_cross, text)[1]).max()) == 0.0
