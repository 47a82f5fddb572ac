"""layers.einsum and Dense in 16-bit compute: float32 accumulation forward and backward."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit import layers

SPECS = [("yzi,io->yzo", (2, 5, 8), (8, 6)), ("bhqd,bhkd->bhqk", (2, 3, 5, 4), (2, 3, 7, 4)),
         ("bhqk,bhkd->bhqd", (2, 3, 5, 7), (2, 3, 7, 4)), ("yzi,ino->yzno", (2, 5, 8), (8, 3, 6))]


def _operands(sa, sb, seed=0):
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(ka, sa), jax.random.normal(kb, sb)


@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_bf16_einsum_matches_f32_on_rounded_operands_forward_and_backward(spec, sa, sb):
    a, b = _operands(sa, sb)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.PRNGKey(2), jnp.einsum(spec, a, b).shape)

    def ref(a, b):  # the same products in f32, on operands already rounded to bf16
        return jnp.einsum(spec, a.astype(jnp.bfloat16).astype(jnp.float32), b.astype(jnp.bfloat16).astype(jnp.float32))

    y, vjp = jax.vjp(lambda a, b: layers.einsum(spec, a, b, jnp.bfloat16, jnp.float32), a16, b16)
    y_ref, vjp_ref = jax.vjp(ref, a16.astype(jnp.float32), b16.astype(jnp.float32))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)  # f32 accumulation: no bf16 rounding of sums
    # The backward pass rounds the cotangent to bf16, as a bf16 GEMM's input is.
    da, db = vjp(g)
    da_ref, db_ref = vjp_ref(g.astype(jnp.bfloat16).astype(jnp.float32))
    assert da.dtype == db.dtype == jnp.bfloat16
    np.testing.assert_allclose(da.astype(jnp.float32), da_ref, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(db.astype(jnp.float32), db_ref, rtol=1e-2, atol=1e-2)


def test_bf16_einsum_gradient_matmuls_take_bf16_operands():
    # XLA:CPU widens a matmul with a float32 operand to a float32 GEMM; none may remain.
    a, b = _operands((4, 8), (8, 6))
    f = lambda a, b: jnp.sum(layers.einsum("zi,io->zo", a, b, jnp.bfloat16, jnp.float32) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(a, b)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    dots += [e for eq in jaxpr.eqns for sub in jax.core.jaxprs_in_params(eq.params) for e in sub.eqns
             if e.primitive.name == "dot_general"]
    assert len(dots) >= 3  # forward and both gradients
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    assert all(e.params["preferred_element_type"] == jnp.float32 for e in dots)


def test_f32_einsum_is_the_plain_einsum_forward_and_backward():
    a, b = _operands((2, 5, 8), (8, 6))
    np.testing.assert_array_equal(layers.einsum("yzi,io->yzo", a, b, jnp.float32), jnp.einsum("yzi,io->yzo", a, b))
    mine = jax.grad(lambda a, b: jnp.sum(jnp.sin(layers.einsum("yzi,io->yzo", a, b, jnp.float32))), (0, 1))(a, b)
    ref = jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.einsum("yzi,io->yzo", a, b))), (0, 1))(a, b)
    for x, y in zip(mine, ref):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_bad_spec_is_a_clear_error():
    a, b = _operands((4, 8), (8, 6))
    with pytest.raises(ValueError, match="each operand's axes"):
        layers.einsum("zi,io->z", a, b, jnp.bfloat16)  # 'o' summed inside one operand
    with pytest.raises(ValueError, match="distinct letters"):
        layers.einsum("...i,io->...o", a, b, jnp.bfloat16)


def test_dense_out_dtype_keeps_param_tree_and_returns_f32():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    ref = layers.Dense(6, axes=("embed", "mlp"))
    low = layers.Dense(6, axes=("embed", "mlp"), dtype=jnp.bfloat16, out_dtype=jnp.float32)
    params = nn.meta.unbox(ref.init(jax.random.PRNGKey(1), x))
    params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
    assert jax.tree.structure(params) == jax.tree.structure(nn.meta.unbox(low.init(jax.random.PRNGKey(1), x)))
    y = low.apply(params, x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref.apply(params, x), rtol=3e-2, atol=3e-2)
    assert layers.Dense(6, dtype=jnp.bfloat16).apply(params, x).dtype == jnp.bfloat16
    # With f32 outputs the bias is added in f32, not rounded to bf16 first.
    zero = jax.tree.map(jnp.zeros_like, params)
    zero["params"]["linear"]["bias"] = jnp.full((6,), 1 + 2**-12)
    assert bool(jnp.all(low.apply(zero, x) == 1 + 2**-12))


def _grid(n_axes, sizes=(1, 3, 8, 17), every=7):
    # A deterministic spread of the size grid: the all-1 and all-17 corners and every 7th point.
    grid = list(itertools.product(sizes, repeat=n_axes))
    return grid[::every] + [grid[-1]]


@pytest.mark.parametrize("lead", [1, 2])
def test_bf16_layers_run_forward_and_backward_at_every_size(lead):
    # XLA:CPU has no fallback kernel for bf16 x bf16 -> f32 matmuls that YNNPACK declines
    # (it declines some layouts), so the contractions vdit's layers emit must all run.
    bf16, f32 = jnp.bfloat16, jnp.float32
    cases = []  # (function, argument shapes): compiled together, as one program (one compile, not ~100)

    for sizes in _grid(lead + 2):
        *m, k, n = sizes
        cases.append((lambda x, w: layers.einsum(f"{'yz'[-lead:]}i,io->{'yz'[-lead:]}o", x, w, bf16, f32),
                      [(*m, k), (k, n)]))
        cases.append((lambda x, w, b: jnp.stack(layers.fused_dense(x, [(w[:, i], b[i]) for i in range(3)], bf16, f32)),
                      [(*m, k), (k, 3, n), (3, n)]))
    for b, h, q, kv in _grid(4, every=11):
        cases.append((lambda q_, k_: layers.einsum("bhqd,bhkd->bhqk", q_, k_, bf16, f32),
                      [(b, h, q, 8), (b, h, kv, 8)]))
        cases.append((lambda p, v: layers.einsum("bhqk,bhkd->bhqd", p, v, bf16, f32),
                      [(b, h, q, kv), (b, h, kv, 8)]))

    def all_grads(args):
        return [jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(a))))(*a)
                for (f, _), a in zip(cases, args)]

    args = [[jnp.ones(s, bf16) for s in shapes] for _, shapes in cases]
    for (_, shapes), grads in zip(cases, jax.jit(all_grads)(args)):
        assert all(bool(jnp.all(jnp.isfinite(g.astype(f32)))) for g in grads), shapes


@pytest.mark.parametrize("use_bias", [True, False])
def test_f32_dense_equals_flax_dense_in_params_init_and_outputs(use_bias):
    # Checkpoints and converters rely on Dense holding what flax.linen.Dense would, under `linear`.
    class Reference(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6, use_bias=use_bias, name="linear")(x)

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    ours = layers.Dense(6, use_bias=use_bias)
    params = nn.meta.unbox(ours.init(jax.random.PRNGKey(3), x))
    ref_params = Reference().init(jax.random.PRNGKey(3), x)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    np.testing.assert_allclose(ours.apply(params, x), Reference().apply(ref_params, x), rtol=1e-6, atol=1e-6)


def test_gelu_tanh_matches_autodiff_and_keeps_only_its_input(capsys):
    x = 4.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 257))
    g = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    ref = lambda x: jax.nn.gelu(x, approximate=True)  # noqa: E731
    np.testing.assert_array_equal(layers.gelu_tanh(x), ref(x))
    np.testing.assert_allclose(jax.vjp(layers.gelu_tanh, x)[1](g)[0], jax.vjp(ref, x)[1](g)[0], rtol=1e-5, atol=1e-5)
    # bf16: the derivative is computed in f32 and rounded once, so it is within one bf16 step of the f32 truth.
    xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    truth = jax.vjp(ref, xb.astype(jnp.float32))[1](gb.astype(jnp.float32))[0]
    ours = jax.vjp(layers.gelu_tanh, xb)[1](gb)[0]
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(ours.astype(jnp.float32), truth, rtol=2**-8, atol=2e-5)
    with jax.enable_x64(True):  # wider inputs keep their precision
        x64 = jnp.linspace(-5.0, 5.0, 101, dtype=jnp.float64)
        ours64 = jax.grad(lambda x: jnp.sum(layers.gelu_tanh(x)))(x64)
        assert ours64.dtype == jnp.float64
        np.testing.assert_allclose(ours64, jax.grad(lambda x: jnp.sum(ref(x)))(x64), rtol=1e-12, atol=1e-12)
    # What the backward pass keeps: autodiff of the formula keeps four x-sized tensors besides x.
    from jax import ad_checkpoint
    for f, kept in ((layers.gelu_tanh, 1), (ref, 5)):
        ad_checkpoint.print_saved_residuals(lambda x: jnp.sum(f(x)), x)
        assert capsys.readouterr().out.count("f32[3,257]") == kept


@pytest.mark.parametrize("norm", ["layer", "layer_no_affine", "rms"])
def test_norms_match_flax_forward_and_backward(norm):
    # vdit's norms have a written-out backward pass (layers.normalize); flax's are autodiff.
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 7, 48)) + 1.0
    g = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    if norm == "rms":
        ours, ref = layers.RMSNorm(eps=1e-6), nn.RMSNorm(epsilon=1e-6)
    else:
        affine = norm == "layer"
        ours = layers.LayerNorm(eps=1e-6, use_affine=affine)
        ref = nn.LayerNorm(epsilon=1e-6, use_bias=affine, use_scale=affine, use_fast_variance=False)
    params = ref.init(jax.random.PRNGKey(2), x)
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
    results = []
    for module in (ours, ref):
        y, vjp = jax.vjp(lambda x, p: module.apply(p, x), x, params)
        results.append((y, *vjp(g)))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
