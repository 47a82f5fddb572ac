"""Multi-head attention with interchangeable backends, and 3-D rotary embeddings.

Every backend takes ``q (B, Sq, H, D)``, ``k, v (B, Sk, H, D)`` and an optional key
padding ``mask (B, Sk)`` (True = attend), scales by ``1/sqrt(D)`` and returns
``(B, Sq, H, D)`` in the dtype of ``q``. Softmax statistics are always float32.

Backends:
  ``xla``      the reference: materialises the ``(B, H, Sq, Sk)`` scores.
  ``chunked``  blockwise online softmax with a flash-style custom VJP: neither the
               forward nor the backward pass builds the ``Sq x Sk`` matrix, so memory
               grows linearly with sequence length. Pure JAX; runs anywhere.
  ``cudnn``    ``jax.nn.dot_product_attention(implementation="cudnn")``; GPU only.
  ``splash``   Pallas splash attention; TPU only.
  ``auto``     ``cudnn`` on a GPU with bfloat16/float16 inputs (and heads cuDNN takes),
               else ``chunked``: the fastest backend verified on each platform
               (docs/performance.md).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit import layers

BACKENDS = ("xla", "chunked", "cudnn", "splash", "auto")
_PLATFORM_OF = {"cudnn": "gpu", "splash": "tpu"}
# Finite, so a fully padded row yields a uniform average instead of NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def backend_unavailable_reason(impl: str) -> str | None:
    """Why ``impl`` cannot run on the default JAX backend, or None when it can."""
    if impl not in BACKENDS:
        return f"unknown attention impl {impl!r}; expected one of {BACKENDS}"
    need = _PLATFORM_OF.get(impl)
    have = jax.default_backend()
    if need is not None and have != need:
        return f"attention impl {impl!r} needs a {need.upper()}, but JAX runs on {have!r}; use 'xla' or 'chunked'"
    return None


def resolve_impl(impl: str, dtype: Any, backend: str | None = None, head_dim: int = 64) -> str:
    """The backend ``impl`` runs as for inputs of ``dtype`` on ``backend`` (default: JAX's):
    ``auto`` becomes ``cudnn`` on a GPU with bfloat16/float16 inputs and heads cuDNN's
    flash kernels take on any GPU (a multiple of 8, at most 128 wide), and ``chunked``
    elsewhere; any other name is itself."""
    if impl != "auto":
        return impl
    on_gpu = (backend or jax.default_backend()) == "gpu"
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if on_gpu and half and head_dim % 8 == 0 and head_dim <= 128 else "chunked"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    impl: str = "xla",
    block_kv: int = 512,
) -> jax.Array:
    """Scaled dot-product attention through the backend ``impl``.

    Args:
      q: queries ``(B, Sq, H, D)``.
      k: keys ``(B, Sk, H, D)``.
      v: values ``(B, Sk, H, D)``.
      mask: optional key padding mask ``(B, Sk)``, True where a key may be attended.
      impl: one of ``BACKENDS``.
      block_kv: key/value block length of the ``chunked`` backend.

    Returns:
      ``(B, Sq, H, D)`` in ``q.dtype``.
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[::2] != k.shape[::2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention expects q (B, Sq, H, D) and k, v (B, Sk, H, D) with equal B, H, D; "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if mask is not None and mask.shape != k.shape[:2]:
        raise ValueError(f"attention mask must be (B, Sk) = {k.shape[:2]}, got {mask.shape}")
    reason = backend_unavailable_reason(impl)
    if reason:
        raise ValueError(reason)
    impl = resolve_impl(impl, q.dtype, head_dim=q.shape[-1])
    if impl == "xla":
        return _xla_attention(q, k, v, mask)
    if impl == "chunked":
        return chunked_attention(q, k, v, mask, block_kv=block_kv)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, mask)
    return _splash_attention(q, k, v, mask)


def _cudnn_attention(q, k, v, mask):
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 q, k, v (e.g. dit.dtype=bfloat16); "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    # cuDNN takes a key mask only as an additive bias of full (Sq, Sk) extent, and its
    # biased backward pass needs even Sq and Sk: pad both (padded keys masked out) and
    # broadcast. The bias costs Sq x Sk per example (4 MiB at 16k queries x 128 text
    # tokens in bf16) and keeps any mask exact, where key_value_seq_lengths would
    # assume right padding.
    sq, sk = q.shape[1], k.shape[1]
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n % 2)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    q, k, v, mask = pad(q, sq), pad(k, sk), pad(v, sk), pad(mask, sk)
    bias_mask = jnp.broadcast_to(mask[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation="cudnn")[:, :sq]


@jax.custom_vjp
def _xla_attention(q, k, v, mask):
    return _xla_attention_fwd(q, k, v, mask)[0]


def _xla_attention_fwd(q, k, v, mask):
    # Heads move next to batch first: XLA:CPU runs (B, H)-batched matmuls on contiguous
    # (S, D) operands several times faster than einsums that stride over heads.
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, H, S, D)
    s = layers.einsum("bhqd,bhkd->bhqk", q, k, dtype, jnp.float32) * scale
    if mask is not None:
        s = jnp.where(mask[:, None, None, :], s, _MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1).astype(dtype)  # the operand of P V, kept for the backward pass
    o = layers.einsum("bhqk,bhkd->bhqd", p, v, dtype)  # accumulates in float32
    return jnp.swapaxes(o, 1, 2), (q, k, v, p, o, mask)


def _xla_attention_bwd(res, do):
    q, k, v, p, o, mask = res
    do = jnp.swapaxes(do, 1, 2)  # (B, H, Sq, D)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # rowsum(dP * P)
    dq, dk_t, dv_t = _block_grads(q, jnp.swapaxes(q, 2, 3), do, jnp.swapaxes(do, 2, 3), k, v, p, delta, mask)
    to_bshd = lambda x_t, like: jnp.transpose(x_t, (0, 3, 1, 2)).astype(like.dtype)  # noqa: E731
    return jnp.swapaxes(dq, 1, 2).astype(q.dtype), to_bshd(dk_t, k), to_bshd(dv_t, v), None


def _block_grads(q, q_t, do, do_t, k, v, p, delta, mask):
    """dQ ``(B, H, Sq, D)`` and dK^T, dV^T ``(B, H, D, Sk)`` of attention to keys ``k, v``
    ``(B, H, Sk, D)`` with probabilities ``p``; ``q_t``, ``do_t`` are ``(B, H, D, Sq)``.

    Every matmul is in "NN" or "NT" form: dV = P^T dO and dK = dS^T Q would contract the
    first axis of an (Sq, Sk) operand, which XLA:CPU runs 4-7x slower in bf16 than one
    contracting the last axis, so the small (D, Sq) operands come transposed instead and
    dK, dV come out transposed.
    """
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1])
    dv_t = layers.einsum("bhdq,bhqk->bhdk", do_t, p, dtype, jnp.float32)
    dp = layers.einsum("bhqd,bhkd->bhqk", do, v, dtype, jnp.float32)
    ds = p.astype(jnp.float32) * (dp - delta[..., None]) * scale
    if mask is not None:  # masked scores are constants: no gradient, even in an all-masked row
        ds = jnp.where(mask[:, None, None, :], ds, 0.0)
    dq = layers.einsum("bhqk,bhkd->bhqd", ds, k, dtype, jnp.float32)
    dk_t = layers.einsum("bhdq,bhqk->bhdk", q_t, ds, dtype, jnp.float32)
    return dq, dk_t, dv_t


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention layer with optional q/k RMSNorm and RoPE.

    q/k/v kernels are ``(embed, heads)`` and the output kernel ``(heads, embed)``,
    ``heads`` being the flattened ``num_heads * head_dim``.

    Attributes:
      num_heads: attention heads; the width must divide evenly.
      qk_norm: RMSNorm on q and k across all heads (Wan2.1's ``rms_norm_across_heads``).
      eps: epsilon of the q/k norms.
      impl: backend of ``attention``.
      dtype: dtype of every matmul's operands, attention's included.
      out_dtype: dtype of the projections' outputs (q/k/v and the layer's output;
        default ``dtype``), see ``layers.Dense``.
    """

    num_heads: int
    qk_norm: bool = False
    eps: float = 1e-6
    impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    out_dtype: Any = None

    @nn.compact
    def __call__(self, x, context=None, mask=None, rope=None):
        """Attends from ``x (B, S, D)`` to ``context (B, L, D')`` (``x`` itself when None).

        ``mask (B, L)`` marks the keys that may be attended; ``rope``, the ``(cos, sin)``
        of ``rope_cos_sin``, applies RoPE to q and k (self-attention only).
        """
        b, s, d = x.shape
        head_dim = d // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, out_dtype=self.out_dtype)
        src = x if context is None else context
        # One matmul per input (q/k/v of x, or q of x and k/v of the context): fewer,
        # wider GEMMs, and the backward pass sums one input gradient instead of three.
        in_dim = {"q": x.shape[-1], "k": src.shape[-1], "v": src.shape[-1]}
        w = {n: layers.DenseWeights(d, ("embed", "heads"), self.param_dtype, name=n)(in_dim[n]) for n in in_dim}
        if context is None:
            q, k, v = layers.fused_dense(x, [w["q"], w["k"], w["v"]], self.dtype, self.out_dtype)
        else:
            (q,) = layers.fused_dense(x, [w["q"]], self.dtype, self.out_dtype)
            k, v = layers.fused_dense(src, [w["k"], w["v"]], self.dtype, self.out_dtype)
        if self.qk_norm:
            q = layers.RMSNorm(self.eps, axis_name="heads", param_dtype=self.param_dtype, name="q_norm")(q)
            k = layers.RMSNorm(self.eps, axis_name="heads", param_dtype=self.param_dtype, name="k_norm")(k)
        q = q.reshape(b, s, self.num_heads, head_dim)
        k = k.reshape(b, src.shape[1], self.num_heads, head_dim)
        v = v.reshape(b, src.shape[1], self.num_heads, head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.astype(self.dtype) for t in (q, k, v))
        o = attention(q, k, v, mask, impl=self.impl).reshape(b, s, d)
        return layers.Dense(d, axes=("heads", "embed"), name="out", **kw)(o)


# ----------------------------------------------------------------------------- chunked


def chunked_attention(q, k, v, mask=None, *, block_kv: int = 512):
    """Blockwise attention (online softmax) in linear memory; see module docstring."""
    b, sk = k.shape[:2]
    if mask is None:
        mask = jnp.ones((b, sk), bool)
    block = min(block_kv, sk)
    pad = (-sk) % block
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    # (B, H, S, D) inside, as in `_xla_attention_fwd`: batched matmuls over contiguous (S, D).
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    return jnp.swapaxes(_flash(q, k, v, mask, block, sk), 1, 2)


def _kv_blocks(k, v, mask, block, n_keys):
    # Per key block, scan axis first: k, v (nk, B, H, block, D), mask (nk, B, block), and
    # (nk, block) whether a key is real rather than padding up to a whole block.
    split = lambda x, axis: jnp.moveaxis(  # noqa: E731
        x.reshape(x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]), axis, 0)
    real = jnp.arange(k.shape[2]).reshape(-1, block) < n_keys
    return split(k, 2), split(v, 2), split(mask, 1), real


def _masked_scores(s, mb, real):
    # Masked keys score _MASK_VALUE (an all-masked row averages its real keys); padding
    # keys -inf, so that they never count, even in such a row.
    s = jnp.where(mb[:, None, None, :], s, _MASK_VALUE)
    return jnp.where(real, s, -jnp.inf)


def _flash_forward(q, k, v, mask, block, n_keys):
    b, h, sq, d = q.shape
    dtype = q.dtype
    scale = 1.0 / math.sqrt(d)

    def step(carry, blk):
        o, m, l = carry  # (B, H, Sq, D), (B, H, Sq), (B, H, Sq)
        kb, vb, mb, real = blk
        s = _masked_scores(layers.einsum("bhqd,bhkd->bhqk", q, kb, dtype, jnp.float32) * scale, mb, real)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = layers.einsum("bhqk,bhkd->bhqd", p, vb, dtype, jnp.float32)
        return (o * corr[..., None] + pv, m_new, l), None

    init = (
        jnp.zeros((b, h, sq, d), jnp.float32),
        jnp.full((b, h, sq), -jnp.inf, jnp.float32),
        jnp.zeros((b, h, sq), jnp.float32),
    )
    (o, m, l), _ = jax.lax.scan(step, init, _kv_blocks(k, v, mask, block, n_keys))
    # The backward pass recomputes P as exp(s - m) / l. A log-sum-exp m + log(l) would lose
    # log(l) next to an all-masked row's m = _MASK_VALUE in float32.
    inv_l = 1.0 / l  # (B, H, Sq)
    return (o * inv_l[..., None]).astype(dtype), (m, inv_l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, mask, block, n_keys):
    return _flash_forward(q, k, v, mask, block, n_keys)[0]


def _flash_fwd(q, k, v, mask, block, n_keys):
    o, stats = _flash_forward(q, k, v, mask, block, n_keys)
    return o, (q, k, v, mask, o, stats)


def _flash_bwd(block, n_keys, res, do):
    # Per key block, `_block_grads` with P recomputed from the saved row maxima and
    # normalizers; the (D, Sq) operands it needs are transposed once, outside the loop.
    q, k, v, mask, o, (m, inv_l) = res
    dtype = q.dtype
    b, h, sk, d = k.shape
    scale = 1.0 / math.sqrt(d)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # (B, H, Sq)
    q_t, do_t = jnp.swapaxes(q, 2, 3), jnp.swapaxes(do, 2, 3)  # (B, H, D, Sq)

    def step(dq, blk):
        kb, vb, mb, real = blk
        s = _masked_scores(layers.einsum("bhqd,bhkd->bhqk", q, kb, dtype, jnp.float32) * scale, mb, real)
        p = jnp.exp(s - m[..., None]) * inv_l[..., None]  # (B, H, Sq, block)
        dq_b, dk_t, dv_t = _block_grads(q, q_t, do, do_t, kb, vb, p, delta, mb)
        return dq + dq_b, (dk_t, dv_t)

    dq, (dk_t, dv_t) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), _kv_blocks(k, v, mask, block, n_keys))
    merge = lambda x_t, like: jnp.transpose(x_t, (1, 2, 0, 4, 3)).reshape(b, h, sk, d).astype(like.dtype)  # noqa: E731
    return dq.astype(dtype), merge(dk_t, k), merge(dv_t, v), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- splash (TPU)


def _splash_attention(q, k, v, mask):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, sq, h, d = q.shape
    skv = k.shape[1]
    heads_mask = sm.MultiHeadMask([sm.FullMask((sq, skv)) for _ in range(h)])
    kernel = sk.make_splash_mha(heads_mask, head_shards=1, q_seq_shards=1)
    q = q * (1.0 / math.sqrt(d))
    to_hsd = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  (B, S, H, D) -> (B, H, S, D)
    if mask is None:
        out = jax.vmap(kernel)(to_hsd(q), to_hsd(k), to_hsd(v))
    else:
        # Key padding as segment ids: padded keys (0) never match a query (1).
        seg = jax.vmap(lambda m: sk.SegmentIds(q=jnp.ones((sq,), jnp.int32), kv=m.astype(jnp.int32)))(mask)
        out = jax.vmap(lambda a, b_, c, s: kernel(a, b_, c, segment_ids=s))(to_hsd(q), to_hsd(k), to_hsd(v), seg)
    return to_hsd(out).astype(q.dtype)


# ----------------------------------------------------------------------------- RoPE


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to (t, h, w) rotary frequencies (Wan2.1's split)."""
    if head_dim % 2:
        raise ValueError(f"3-D RoPE needs an even head_dim, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles_3d(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """Rotation angles ``(t*h*w, head_dim/2)`` of 3-D RoPE for a token grid.

    The head dimension is split between time, height and width (``rope_split``);
    each part rotates consecutive channel pairs by ``pos / theta**(2i/d)``. Computed
    in float64 on the host; the grid is static so this is a compile-time constant.
    """
    parts = []
    for n, dim in zip(grid, rope_split(head_dim)):
        inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)
        parts.append(np.outer(np.arange(n, dtype=np.float64), inv))  # (n, dim/2)
    t, h, w = grid
    ang_t = np.broadcast_to(parts[0][:, None, None], (t, h, w, parts[0].shape[-1]))
    ang_h = np.broadcast_to(parts[1][None, :, None], (t, h, w, parts[1].shape[-1]))
    ang_w = np.broadcast_to(parts[2][None, None, :], (t, h, w, parts[2].shape[-1]))
    return np.concatenate([ang_t, ang_h, ang_w], axis=-1).reshape(t * h * w, head_dim // 2)


def rope_cos_sin(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` of RoPE ``angles (S, D/2)`` as float32, computed in float64 on the host.

    ``apply_rope`` takes these rather than the angles: XLA fuses a cosine of a broadcast
    operand into its consumer and so evaluates it once per element of q and k (on
    ``bench_cpu``, 40 ms of a 1.2 s train step went to RoPE's recomputation alone).
    """
    angles = np.asarray(angles, np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates interleaved channel pairs of ``x (B, S, H, D)`` by the angles whose
    ``rope = (cos, sin)``, each ``(S, D/2)`` (``rope_cos_sin``)."""
    dtype = x.dtype
    x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos = jnp.asarray(rope[0], jnp.float32)[None, :, None, :]
    sin = jnp.asarray(rope[1], jnp.float32)[None, :, None, :]
    x1, x2 = x[..., 0], x[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(*out.shape[:-2], -1).astype(dtype)
