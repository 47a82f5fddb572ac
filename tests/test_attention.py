"""Attention backends agree with the XLA reference; 3-D RoPE matches Wan2.1's."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit.attention import (
    BACKENDS,
    apply_rope,
    attention,
    backend_unavailable_reason,
    resolve_impl,
    rope_angles_3d,
    rope_cos_sin,
    rope_split,
)


def _qkv(b=2, sq=37, sk=45, h=3, d=16, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, sq, h, d), dtype)
    k = jax.random.normal(ks[1], (b, sk, h, d), dtype)
    v = jax.random.normal(ks[2], (b, sk, h, d), dtype)
    return q, k, v


def _mask(b, sk):
    lengths = jnp.array([sk * 2 // 3] + [sk] * (b - 1))
    return jnp.arange(sk)[None] < lengths[:, None]


def _naive(q, k, v, mask):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(np.asarray(mask)[:, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("masked", [False, True])
def test_xla_matches_float64_reference(masked):
    q, k, v = _qkv()
    mask = _mask(2, 45) if masked else None
    np.testing.assert_allclose(attention(q, k, v, mask, impl="xla"), _naive(q, k, v, mask), atol=2e-6)


def _autodiff_reference(q, k, v, mask):
    # Plain jnp attention whose gradients come from JAX's autodiff (float32 throughout).
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = jnp.where(mask[:, None, None, :], s, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 6e-2)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_custom_vjp_matches_autodiff(impl, dtype, atol, masked):
    # A backend's hand-written backward pass against autodiff of the plain formula,
    # including an all-padded example (its scores are constants: its keys get no gradient,
    # its values the uniform average's) and cross-attention lengths (Sq != Sk); chunked
    # in blocks of 16 over 45 keys (three blocks, the last one padded).
    q, k, v = (x.astype(dtype) for x in _qkv(b=3))
    mask = jnp.concatenate([_mask(2, 45), jnp.zeros((1, 45), bool)]) if masked else None
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    got = jax.grad(loss(lambda q, k, v: attention(q, k, v, mask, impl=impl, block_kv=16)), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: _autodiff_reference(q, k, v, mask)), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for g, r, name in zip(got, want, "qkv"):
        assert g.dtype == dtype, name
        scale = float(jnp.abs(r).max())
        np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(r) / scale, atol=atol, err_msg=name)
    if masked:
        assert not jnp.any(got[1][2]) and jnp.any(got[2][2])  # the all-padded example


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", [8, 16, 512])
def test_chunked_matches_xla_forward_and_grads(masked, block):
    q, k, v = _qkv()
    mask = _mask(2, 45) if masked else None
    out = {impl: attention(q, k, v, mask, impl=impl, block_kv=block) for impl in ("xla", "chunked")}
    np.testing.assert_allclose(out["chunked"], out["xla"], atol=1e-5)

    def loss(impl):
        w = jax.random.normal(jax.random.PRNGKey(9), q.shape)
        return lambda q, k, v: jnp.sum(attention(q, k, v, mask, impl=impl, block_kv=block) * w)

    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g_chk = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_chk, g_ref):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_chunked_bf16_close_to_f32():
    q, k, v = _qkv()
    ref = attention(q, k, v, impl="xla")
    low = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), impl="chunked", block_kv=16)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), ref, atol=5e-2)


def test_chunked_never_materialises_scores():
    # The largest intermediate of the chunked forward+backward must scale with
    # Sq * block, not Sq * Sk: compare the compiled temp memory at two lengths.
    def temp_bytes(s):
        q, k, v = _qkv(b=1, sq=s, sk=s, h=2, d=16)
        f = jax.jit(jax.grad(lambda q, k, v: attention(q, k, v, impl="chunked", block_kv=128).sum(), argnums=(0, 1, 2)))
        return f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(4096)
    assert large < 6 * small, (small, large)  # quadratic growth would be 16x


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
@pytest.mark.parametrize("sq,sk,masked", [(256, 256, False), (256, 128, True), (255, 77, True)])
def test_hardware_backends_match_xla_in_outputs_and_grads(impl, sq, sk, masked):
    reason = backend_unavailable_reason(impl)
    if reason:
        pytest.skip(reason)
    if impl == "splash" and (sq % 128 or sk % 128):
        pytest.skip("splash blocks need lengths in multiples of 128")
    q, k, v = _qkv(b=2, sq=sq, sk=sk, h=2, d=64, dtype=jnp.bfloat16, seed=sq + sk)
    mask = _mask(2, sk) if masked else None
    cot = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32)

    def loss(impl_, *qkv):
        return jnp.sum(attention(*qkv, mask, impl=impl_).astype(jnp.float32) * cot)

    # Reference: the xla backend on float32 copies of the same bf16 inputs.
    ref_out = attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask, impl="xla")
    ref_grads = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
    out = attention(q, k, v, mask, impl=impl)
    grads = jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2))(q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    assert _rel(out, ref_out) < 1e-2
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape and _rel(g, r) < 2e-2, name
    if impl == "cudnn":
        with pytest.raises(ValueError, match="needs bfloat16 or float16"):
            attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask, impl="cudnn")


def test_bad_inputs_are_one_line_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match=r"q \(B, Sq, H, D\)"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="mask must be"):
        attention(q, k, v, jnp.ones((2, 3), bool))
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            attention(q, k, v, impl="cudnn")
    assert set(BACKENDS) == {"xla", "chunked", "cudnn", "splash", "auto"}


def test_auto_is_cudnn_on_gpus_in_half_precision_else_chunked():
    assert resolve_impl("auto", jnp.bfloat16, "gpu") == resolve_impl("auto", jnp.float16, "gpu") == "cudnn"
    assert resolve_impl("auto", jnp.float32, "gpu") == "chunked"
    assert resolve_impl("auto", jnp.bfloat16, "cpu") == resolve_impl("auto", jnp.bfloat16, "tpu") == "chunked"
    assert resolve_impl("auto", jnp.bfloat16, "gpu", head_dim=12) == "chunked"  # not a multiple of 8
    assert resolve_impl("auto", jnp.bfloat16, "gpu", head_dim=256) == "chunked"  # Hopper-only width
    assert resolve_impl("xla", jnp.bfloat16, "gpu") == "xla"
    q, k, v = _qkv()
    mask = _mask(2, 45)
    want = "cudnn" if jax.default_backend() == "gpu" else "chunked"
    np.testing.assert_array_equal(attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                            mask, impl="auto"),
                                  attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                            mask, impl=want))


def test_rope_matches_diffusers_wan():
    torch = pytest.importorskip("torch")
    transformer_wan = pytest.importorskip("diffusers.models.transformers.transformer_wan")
    head_dim, grid = 24, (3, 4, 5)
    rope = transformer_wan.WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=32)
    cos, sin = rope(torch.zeros(1, 4, grid[0], grid[1] * 2, grid[2] * 2))  # (1, S, 1, D)
    ours_cos, ours_sin = rope_cos_sin(rope_angles_3d(grid, head_dim))
    assert ours_cos.dtype == ours_sin.dtype == np.float32
    np.testing.assert_allclose(ours_cos, cos[0, :, 0, 0::2].numpy(), atol=1e-6)
    np.testing.assert_allclose(ours_sin, sin[0, :, 0, 1::2].numpy(), atol=1e-6)
    assert sum(rope_split(head_dim)) == head_dim


def test_rope_is_relative():
    # <rot(q, i), rot(k, j)> depends on i - j only: shift the whole grid in time.
    head_dim = 12
    angles = rope_angles_3d((6, 1, 1), head_dim)
    q, k = (jax.random.normal(jax.random.PRNGKey(s), (1, 1, 1, head_dim)) for s in (1, 2))
    rot = lambda x, i: apply_rope(x, rope_cos_sin(angles[i : i + 1]))  # noqa: E731
    dot = lambda i, j: float(jnp.sum(rot(q, i) * rot(k, j)))  # noqa: E731
    assert dot(3, 1) == pytest.approx(dot(4, 2), abs=1e-5)
    assert dot(3, 1) != pytest.approx(dot(3, 2), abs=1e-3)


@pytest.mark.parametrize("cross", [False, True])
def test_fused_qkv_projection_matches_separate_dense(cross):
    # q/k/v run as one stacked matmul; the parameter tree and the numbers must stay those
    # of three separate Dense layers (checkpoints and the Wan converter rely on the tree).
    from vdit import layers
    from vdit.attention import MultiHeadAttention

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 16))
    ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 12)) if cross else None
    mha = MultiHeadAttention(num_heads=2)
    params = flax.core.unfreeze(nn.meta.unbox(mha.init(jax.random.PRNGKey(2), x, ctx)))["params"]
    assert set(params) == {"q", "k", "v", "out"}
    for name in ("q", "k", "v"):
        assert set(params[name]["linear"]) == {"kernel", "bias"}
        params[name]["linear"]["bias"] = jax.random.normal(jax.random.PRNGKey(3), (16,))

    def dense(name, inp):
        return layers.Dense(16).apply({"params": params[name]}, inp)

    src = x if ctx is None else ctx
    q, k, v = dense("q", x), dense("k", src), dense("v", src)
    split = lambda a: a.reshape(*a.shape[:2], 2, 8)  # noqa: E731
    want = dense("out", attention(split(q), split(k), split(v), None).reshape(2, 6, 16))
    got = mha.apply({"params": params}, x, ctx)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
