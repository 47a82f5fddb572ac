"""Building blocks shared by every vdit model.

Each layer takes a compute ``dtype`` and a ``param_dtype`` and gives every parameter
logical axis names, so one rules table (in the config) decides how it is sharded.

Logical parameter axes used across vdit:

================  ===========================================================
``embed``         model width of a transformer (DiT, text encoder)
``mlp``           hidden width of an MLP
``heads``         flattened ``heads * head_dim`` of q/k/v and attention output
``vocab``         token vocabulary of the text encoder
``conv_in``       input channels of a convolution (VAE, patch embedding)
``conv_out``      output channels of a convolution
``norm``          scale/bias of a normalisation (never sharded)
``layers``        the stacked leading axis when layers are scanned
================  ===========================================================

Normalisations always compute in float32 (mixed-precision rule of DESIGN.md) and
return the input dtype. Matmuls in a 16-bit compute dtype go through ``einsum``, which
accumulates in float32 on every backend.
"""

from __future__ import annotations

import functools
import string
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.lecun_normal()
# Logical names of a transformer's (batch, sequence, width) activations at block boundaries.
ACT = ("act_batch", "act_seq", "act_embed")


def partitioned(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    """Wraps an initializer so the parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype: Dtype, out_dtype: Dtype | None = None) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` on operands cast to ``dtype``, returning ``out_dtype`` (default ``dtype``).

    Products accumulate in float32, forward and backward, and the backward pass is written
    out (a custom VJP) as two einsums of the same form. In a 16-bit dtype the cotangent is
    rounded to ``dtype`` and both gradient matmuls take 16-bit operands too, as a GPU's
    bf16 GEMMs do. In float32 the maths is the plain einsum's; the written-out backward
    is there for XLA:CPU, which hands its weight gradient ``zi,zo->io`` to YNNPACK with one
    plain transpose, where JAX's own transpose rule of the same matmul got an Eigen GEMM
    behind a fusion that recomputes the cotangent while transposing it (the f32 ``bench_cpu``
    step 2-5% faster on a 2-core Xeon; docs/performance.md, "f32 weight gradients").

    XLA:CPU runs 16-bit matmuls (16-bit in, float32 out) on the CPU's bf16 units (AMX on recent Xeons:
    1.06 against 0.23 TFLOP/s for a 2048 GEMM on a 2-core Xeon), while a matmul with a
    bf16 result, or with one float32 operand, is widened to a float32 GEMM
    (docs/performance.md, "bf16 matmul operands on XLA:CPU").

    ``spec`` names every axis explicitly (no ``...``) and each operand's axes appear in
    the other operand or the output, so the gradients are einsums of the same form.

    XLA:CPU has no fallback kernel for a 16-bit matmul that YNNPACK declines; it declines
    a few operand layouts (e.g. the gradient ``zi,zno->ino``). The contractions vdit's
    layers emit are swept over sizes in tests/test_layers.py.
    """
    dtype = jnp.dtype(dtype)
    out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    if dtype.itemsize > 4 or not jnp.issubdtype(dtype, jnp.floating):
        return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)
    _check_spec(spec)
    return _f32_accumulating_einsum(spec, out_dtype, a, b)


@functools.lru_cache(maxsize=None)
def _check_spec(spec: str) -> None:
    ins, _, out = spec.partition("->")
    sa, _, sb = ins.partition(",")
    ok = all(set(x) <= set(string.ascii_letters) and len(set(x)) == len(x) for x in (sa, sb, out))
    if not (ok and out and set(sa) <= set(sb + out) and set(sb) <= set(sa + out) and set(out) <= set(sa + sb)):
        raise ValueError(
            f"einsum spec {spec!r} must be 'A,B->C' with distinct letters per operand, each operand's axes in the "
            f"other operand or the output (e.g. 'bsi,io->bso')"
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _f32_accumulating_einsum(spec, out_dtype, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _f32_accumulating_einsum_fwd(spec, out_dtype, a, b):
    return _f32_accumulating_einsum(spec, out_dtype, a, b), (a, b)


def _f32_accumulating_einsum_bwd(spec, out_dtype, res, g):
    a, b = res
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    g = g.astype(a.dtype)
    da = jnp.einsum(f"{out},{sb}->{sa}", g, b, preferred_element_type=jnp.float32).astype(a.dtype)
    db = jnp.einsum(f"{sa},{out}->{sb}", a, g, preferred_element_type=jnp.float32).astype(b.dtype)
    return da, db


_f32_accumulating_einsum.defvjp(_f32_accumulating_einsum_fwd, _f32_accumulating_einsum_bwd)


def see_through_matmuls(policy: Callable[..., bool]) -> Callable[..., bool]:
    """A remat ``policy`` that also judges a custom-VJP call wrapping a single matmul (every
    float ``einsum`` is one) by that matmul.

    ``jax.checkpoint`` shows a policy only the ``custom_vjp_call``, never the
    ``dot_general`` inside it, so ``dots_with_no_batch_dims_saveable`` alone would save
    none of vdit's matmuls and the backward pass would recompute every one.
    """

    def judged(prim, *avals, **params):
        if prim.name == "custom_vjp_call":
            eqns = params["call_jaxpr"].jaxpr.eqns
            dots = [e for e in eqns if e.primitive.name == "dot_general"]
            if len(dots) == 1 and all(e.primitive.name in ("dot_general", "convert_element_type") for e in eqns):
                dot = dots[0]
                return policy(dot.primitive, *(v.aval for v in dot.invars), **dot.params)
        return policy(prim, *avals, **params)

    return judged


def remat_after_cotangent(block: nn.Module, *args):
    """``block(*args)`` for an ``nn.remat``-wrapped ``block``, whose backward pass then
    recomputes only once the cotangent of the block's output exists.

    ``jax.checkpoint`` ties its recomputation to the saved values alone (its optimization
    barrier is gone before XLA schedules), so across unrolled blocks XLA:CPU ran every
    block's recomputation right after the forward pass and kept the lot: remat saved no
    memory (f32 ``bench_cpu``, unrolled: 533 MiB of temp buffers with remat ``dots``,
    564 with ``full``, 533 with none). Here each saved activation (a float residual whose
    leading axes are the output's) gets ``0 * ct[..., :1]`` added first, a data dependency
    that no compiler drops, that keeps the activation's sharding and that XLA fuses into
    its first use. Gradients are unchanged, except that a non-finite cotangent (whose
    gradients are lost anyway) now spreads to every gradient of the block.
    """

    def f(mdl, *a):
        return mdl(*a)

    def fwd(mdl, *a):
        return nn.vjp(f, mdl, *a)

    def bwd(vjp_fn, ct):
        lead = ct.shape[:2]
        gate = jnp.zeros((), ct.dtype) * ct[..., :1]  # (B, S, 1): a zero that needs ct

        def tie(r):
            if not (jnp.issubdtype(r.dtype, jnp.floating) and r.shape[:2] == lead):
                return r
            return r + gate.reshape(lead + (1,) * (r.ndim - 2)).astype(r.dtype)

        return jax.tree.map(tie, vjp_fn)(ct)

    return nn.custom_vjp(f, forward_fn=fwd, backward_fn=bwd)(block, *args)


def _batch_letters(n: int) -> str:
    return string.ascii_letters[26 - n : 26] if n else ""  # ..., x, y, z: clear of i, n, o


class Dense(nn.Module):
    """A linear layer ``y = x W + b`` whose kernel has logical axes ``axes``.

    Attributes:
      features: output width.
      axes: logical names of the kernel's (input, output) axes.
      use_bias: add a bias (named ``axes[1]``).
      kernel_init: initializer of the kernel, e.g. zeros for adaLN-Zero.
      dtype: dtype of the matmul's operands.
      out_dtype: dtype of the output and of the bias add (default ``dtype``). A 16-bit
        ``dtype`` with a float32 ``out_dtype`` keeps only the matmul operands in 16 bits.
    """

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.out_dtype or self.dtype
        kernel, bias = _LinearWeights(self.features, self.axes, self.param_dtype, self.use_bias, self.kernel_init,
                                      self.bias_init, name="linear")(x.shape[-1])
        lead = _batch_letters(x.ndim - 1)
        y = einsum(f"{lead}i,io->{lead}o", x, kernel, self.dtype, out_dtype)
        return y if bias is None else y + bias.astype(out_dtype)


class DenseWeights(nn.Module):
    """The kernel and bias a ``Dense`` of the same name would hold, returned unapplied.

    Lets a caller fuse several projections of one input into a single matmul (q/k/v)
    while the parameter tree stays ``NAME/linear/{kernel,bias}``, as ``Dense`` has it,
    so checkpoints and converters see no difference. Initial values match ``Dense``'s.
    """

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        return _LinearWeights(self.features, self.axes, self.param_dtype, name="linear")(in_features)


class _LinearWeights(nn.Module):
    # The parameters of flax.linen.Dense, named and initialised as it names and initialises them.
    features: int
    axes: tuple[str | None, str | None]
    param_dtype: Dtype
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", partitioned(self.kernel_init, self.axes), (in_features, self.features),
                            self.param_dtype)
        if not self.use_bias:
            return kernel, None
        bias = self.param("bias", partitioned(self.bias_init, (self.axes[1],)), (self.features,), self.param_dtype)
        return kernel, bias


def fused_dense(x: jax.Array, weights: Sequence[tuple[jax.Array, jax.Array]], dtype: Dtype,
                out_dtype: Dtype | None = None) -> list[jax.Array]:
    """``[x W_i + b_i for each i]`` as one matmul over the kernels stacked on a new axis.

    Operands are cast to ``dtype``; outputs and the bias add are in ``out_dtype``
    (default ``dtype``), as in ``Dense``.

    Stacking (not concatenating) keeps every kernel's own sharding: the new axis is
    never sharded, so no device needs another's slice.
    """
    kernel = jnp.stack([k for k, _ in weights], axis=1).astype(dtype)  # (in, n, out)
    out_dtype = out_dtype or dtype
    bias = jnp.stack([b for _, b in weights]).astype(out_dtype)  # (n, out)
    # XLA:CPU cannot run the kernel gradient of a bf16 (M, K) x (K, n, out) product
    # (YNNPACK declines its layout and the fallback GEMM has no bf16-in, f32-out
    # kernel); with a leading axis of 1 it can (tests/test_layers.py sweeps both).
    x2 = x[None] if x.ndim == 2 else x
    lead = _batch_letters(x2.ndim - 1)
    y = einsum(f"{lead}i,ino->{lead}no", x2, kernel, dtype, out_dtype) + bias
    y = y[0] if x.ndim == 2 else y
    return [y[..., i, :] for i in range(len(weights))]


class Conv(nn.Module):
    """An N-d convolution on channels-last input with logical axes on the kernel.

    Spatial kernel axes are never sharded; channels are named ``conv_in``/``conv_out``.
    ``padding`` is ``"VALID"``, ``"SAME"`` or explicit pairs, as in ``flax.linen.Conv``
    (parameters are laid out as there too: ``conv/kernel (*k, in, out)``, ``conv/bias``).

    A 3-D convolution with temporal stride 1 and no temporal padding (the causal convs
    of the VAE pad time themselves) runs as ONE 2-D convolution over frames whose
    channels stack the ``kt`` temporal taps: the same sum, but on XLA:CPU it takes the
    fast 2-D path (3-4x faster than its 3-D convolution, forward and backward).
    """

    features: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: Any = "VALID"
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _ConvKernel(self.features, tuple(self.kernel_size), self.strides, self.padding, self.use_bias,
                           self.kernel_init, self.dtype, self.param_dtype, name="conv")(x)


class _ConvKernel(nn.Module):
    features: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...] | None
    padding: Any
    use_bias: bool
    kernel_init: Initializer
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nd = len(self.kernel_size)
        axes = (None,) * nd + ("conv_in", "conv_out")
        kernel = self.param("kernel", partitioned(self.kernel_init, axes),
                            (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
        strides = tuple(self.strides or (1,) * nd)
        padding = self.padding if isinstance(self.padding, str) else tuple(tuple(p) for p in self.padding)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        time_unpadded = padding == "VALID" or (not isinstance(padding, str) and padding[0] == (0, 0))
        if nd == 3 and strides[0] == 1 and time_unpadded:
            y = _conv3d_as_2d(x, kernel, strides[1:], padding if isinstance(padding, str) else padding[1:])
        else:
            lead = x.shape[: x.ndim - nd - 1]  # extra leading axes, e.g. frames under a 2-D conv
            x = x.reshape(-1, *x.shape[len(lead):])
            spatial = "THW"[-nd:]
            dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
            y = jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dn)
            y = y.reshape(*lead, *y.shape[1:])
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros_init(), ("conv_out",)), (self.features,),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _conv3d_as_2d(x, kernel, strides, padding):
    # x (B, T, H, W, C), kernel (kt, kh, kw, C, O) -> (B, T - kt + 1, H', W', O)
    b, t, _, _, c = x.shape
    kt, kh, kw, _, o = kernel.shape
    t_out = t - kt + 1
    taps = jnp.concatenate([x[:, i : i + t_out] for i in range(kt)], axis=-1) if kt > 1 else x
    taps = taps.reshape(b * t_out, *x.shape[2:4], kt * c)
    k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * c, o)
    y = jax.lax.conv_general_dilated(taps, k2, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, t_out, *y.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def normalize(x: jax.Array, eps: float, center: bool) -> jax.Array:
    """``x`` (centred over the last axis when ``center``) divided by its root mean square
    plus ``eps``: LayerNorm's core when centred, RMSNorm's when not.

    The backward pass is written out, ``(g - mean(g) - y mean(g y)) / rms`` from the saved
    output ``y`` and ``1 / rms``: two row reductions where JAX's derivative of the
    mean/variance/rsqrt chain takes several passes. On a 2-core Xeon this made the DiT
    step 7% faster (f32 ``bench_cpu``) and 5.6% (bf16 ``shapes_cpu``; docs/performance.md).
    """
    return _normalize_fwd(x, eps, center)[0]


def _normalize_fwd(x, eps, center):
    if center:
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    y = x * inv_rms
    return y, (y, inv_rms)


def _normalize_bwd(eps, center, res, g):
    y, inv_rms = res
    dx = g - y * jnp.mean(g * y, axis=-1, keepdims=True)
    if center:
        dx = dx - jnp.mean(g, axis=-1, keepdims=True)
    return (dx * inv_rms,)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis, computed in float32.

    Attributes:
      eps: added to the mean square.
      use_scale: learn a per-channel scale (initialised to one).
      axis_name: logical name of the scale parameter.
    """

    eps: float = 1e-6
    use_scale: bool = True
    axis_name: str | None = "norm"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = normalize(x, self.eps, False)
        if self.use_scale:
            scale = self.param(
                "scale",
                partitioned(nn.initializers.ones_init(), (self.axis_name,)),
                (x.shape[-1],),
                self.param_dtype,
            )
            x = x * scale.astype(jnp.float32)
        return x.astype(dtype)


class LayerNorm(nn.Module):
    """Layer normalisation over the last axis, computed in float32.

    ``use_affine=False`` is the parameter-free norm that adaLN modulates.
    """

    eps: float = 1e-6
    use_affine: bool = True
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = normalize(x, self.eps, True)
        if self.use_affine:
            d = x.shape[-1]
            scale = self.param("scale", partitioned(nn.initializers.ones_init(), ("norm",)), (d,), self.param_dtype)
            bias = self.param("bias", partitioned(nn.initializers.zeros_init(), ("norm",)), (d,), self.param_dtype)
            x = x * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return x.astype(dtype)


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (``jax.nn.gelu(x, approximate=True)``), keeping only ``x`` for
    its backward pass.

    Autodiff of the tanh formula keeps five tensors of ``x``'s size for the backward pass
    (products, the tanh, sums). Inside a scan over layers each is stacked per layer and
    written out by the forward loop, where an unrolled step lets XLA recompute them in the
    backward fusions; here the derivative is recomputed from ``x`` alone.
    """
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x, g):
    dtype = x.dtype
    compute = jnp.promote_types(dtype, jnp.float32)  # a 16-bit input's derivative in f32, rounded once
    x, g = x.astype(compute), g.astype(compute)
    c = jnp.sqrt(2.0 / jnp.pi).astype(compute)
    x2 = x * x
    t = jnp.tanh(c * x * (1 + 0.044715 * x2))
    return ((g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x2))).astype(dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_tanh": gelu_tanh,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


class MLP(nn.Module):
    """Two-layer MLP ``fc2(act(fc1(x)))`` with ``(embed, mlp)``/``(mlp, embed)`` kernels.

    Attributes:
      hidden: hidden width.
      out: output width (defaults to the input width).
      activation: a key of ``ACTIVATIONS``.
      in_axes: logical name of the input/output width (``embed`` in a transformer).
    """

    hidden: int
    out: int | None = None
    activation: str = "gelu_tanh"
    in_axes: str = "embed"
    zero_out: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None  # of both layers' outputs, and so of the activation; see Dense

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.out or x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, out_dtype=self.out_dtype)
        h = Dense(self.hidden, axes=(self.in_axes, "mlp"), name="fc1", **kw)(x)
        h = ACTIVATIONS[self.activation](h)
        init = nn.initializers.zeros_init() if self.zero_out else default_kernel_init
        return Dense(out, axes=("mlp", self.in_axes), kernel_init=init, name="fc2", **kw)(h)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical axis names.

    Outside a mesh/rules context (plain CPU use, tests) this is the identity, so model
    code can call it unconditionally.
    """
    return nn.with_logical_constraint(x, tuple(names))
