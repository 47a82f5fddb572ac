"""Video diffusion transformer (DiT) over VAE latents.

The architecture is Wan2.1's text-to-video transformer (and can load its weights via
``vdit.convert.wan_dit``): 3-D patchify, 3-D RoPE in self-attention, RMSNorm on q and
k, cross-attention to text tokens, GELU-tanh MLP, and adaLN-Zero modulation
(shift/scale/gate for attention and MLP) from one timestep MLP shared by all blocks
plus a learned per-block table.

Shapes: latents ``(B, T, H, W, C)`` channels-last; text ``(B, L, text_dim)`` with a
padding mask ``(B, L)``; time ``t`` in [0, 1] (1 = noise), shape ``(B,)``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from vdit import layers
from vdit.attention import MultiHeadAttention, rope_angles_3d, rope_cos_sin

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Through see_through_matmuls: a ``layers.einsum`` is a custom-VJP call, which the
    # policy alone would never save.
    "dots": layers.see_through_matmuls(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[cos, sin]`` of (already scaled) timesteps ``(B,) -> (B, dim)``."""
    if jnp.ndim(t) != 1:
        raise ValueError(f"timestep_embedding expects timesteps of shape (B,), got shape {tuple(jnp.shape(t))}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def nearest_multiples(n: int, m: int) -> str:
    """``'a or b'``: the multiples of ``m`` closest to ``n`` (for error messages)."""
    lo = max(m, n // m * m)
    return f"{lo}" if lo == n else f"{lo} or {lo + m}"


def check_latents(shape: tuple[int, ...], channels: int, patch_size: tuple[int, int, int]) -> None:
    """Raises a one-line ValueError unless ``shape`` is ``(B, T, H, W, channels)`` divisible by the patch."""
    if len(shape) != 5:
        raise ValueError(f"DiT expects latents (B, T, H, W, C={channels}), got rank {len(shape)} shape {tuple(shape)}")
    if shape[-1] != channels:
        hint = " (channels-first? vdit is channels-last)" if shape[1] == channels else ""
        raise ValueError(f"DiT expects latents (B, T, H, W, C={channels}), got {tuple(shape)}{hint}")
    for name, n, p in zip("THW", shape[1:4], patch_size):
        if n % p:
            raise ValueError(
                f"latent {name}={n} is not divisible by patch size {p} (patch {tuple(patch_size)}); "
                f"nearest valid {name}: {nearest_multiples(n, p)}"
            )


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: self-attention, text cross-attention, MLP."""

    num_heads: int
    mlp_dim: int
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    activation_dtype: Any = None

    @nn.compact
    def __call__(self, x, context, context_mask, mod, rope):
        # x (B, S, D) float32 residual stream; mod (B, 6, D) shared timestep modulation.
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, out_dtype=self.activation_dtype)
        attn = functools.partial(MultiHeadAttention, self.num_heads, self.qk_norm, self.eps, self.attention_impl, **kw)
        table = self.param(
            "modulation", layers.partitioned(nn.initializers.zeros_init(), (None, "embed")), (6, d), jnp.float32
        )
        shift, scale, gate, c_shift, c_scale, c_gate = jnp.split(table[None] + mod, 6, axis=1)  # each (B, 1, D)

        norm = layers.LayerNorm(self.eps, use_affine=False, name="norm1")(x)
        h = (norm * (1 + scale) + shift).astype(self.dtype)
        x = x + attn(name="self_attn")(h, rope=rope).astype(jnp.float32) * gate

        h = layers.LayerNorm(self.eps, name="norm2")(x) if self.cross_attn_norm else x
        x = x + attn(name="cross_attn")(h.astype(self.dtype), context, context_mask).astype(jnp.float32)

        norm = layers.LayerNorm(self.eps, use_affine=False, name="norm3")(x)
        h = (norm * (1 + c_scale) + c_shift).astype(self.dtype)
        x = x + layers.MLP(self.mlp_dim, activation="gelu_tanh", name="mlp", **kw)(h).astype(jnp.float32) * c_gate
        return layers.constrain(x, layers.ACT)


class _ScanBlock(nn.Module):
    """Adapter so ``nn.scan`` can carry ``x`` and broadcast the other block inputs."""

    block_kwargs: dict
    remat: str = "none"

    @nn.compact
    def __call__(self, x, context, context_mask, mod, rope):
        block = DiTBlock
        if REMAT_POLICIES[self.remat] is not None:
            block = nn.remat(DiTBlock, policy=REMAT_POLICIES[self.remat])
        return block(**self.block_kwargs, name="block")(x, context, context_mask, mod, rope), None


class DiT(nn.Module):
    """Text-conditioned video DiT predicting the flow velocity (or eps / v) of latents.

    Attributes:
      in_channels: latent channels.
      out_channels: predicted channels (defaults to ``in_channels``).
      patch_size: (t, h, w) patch of latents per token.
      width: model width (``num_heads * head_dim``).
      depth: number of blocks.
      num_heads: attention heads.
      mlp_dim: MLP hidden width.
      text_dim: width of the text encoder's embeddings.
      freq_dim: sinusoidal timestep embedding width.
      timestep_scale: ``t`` in [0, 1] is multiplied by this before embedding (Wan: 1000).
      qk_norm: RMSNorm on queries and keys.
      cross_attn_norm: LayerNorm (affine) before cross-attention.
      pooled_text: also condition every block's adaLN on the mask-averaged text
        embedding, added to the timestep embedding (SD3/Flux's pooled vector). Wan
        conditions on text through cross-attention only (False); a global signal
        makes a small model from scratch follow prompts after far fewer steps.
      eps: epsilon of every norm.
      rope_theta: RoPE base.
      attention_impl: backend of ``vdit.attention.attention``.
      remat: rematerialisation policy per block, a key of ``REMAT_POLICIES``.
      scan_layers: scan over blocks (params stacked on a leading ``layers`` axis).
      dtype: compute dtype of matmuls; norms, modulation and the residual stream are f32.
      param_dtype: dtype of the linear layers' weights and the q/k norm scales. The
        timestep and pooled-text MLPs, the modulation tables and the cross-attention
        LayerNorm stay f32 whatever it is, as diffusers keeps Wan's (``_keep_in_fp32_modules``):
        they set every block's modulation, and small updates to them vanish in bf16.
      activation_dtype: dtype of matmul outputs and of the activations between them
        (q/k/v, MLP hidden); None = ``dtype``. ``float32`` with a bf16 ``dtype`` keeps
        only the matmul operands in bf16: on XLA:CPU the fast setting (docs/performance.md).
    """

    in_channels: int = 16
    out_channels: int | None = None
    patch_size: tuple[int, int, int] = (1, 2, 2)
    width: int = 1536
    depth: int = 30
    num_heads: int = 12
    mlp_dim: int = 8960
    text_dim: int = 4096
    freq_dim: int = 256
    timestep_scale: float = 1000.0
    qk_norm: bool = True
    cross_attn_norm: bool = True
    pooled_text: bool = False
    eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_impl: str = "xla"
    remat: str = "none"
    scan_layers: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    activation_dtype: Any = None

    def _check_config(self):
        sizes = dict(width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                     text_dim=self.text_dim, freq_dim=self.freq_dim)
        bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"DiT sizes must be positive integers, got {bad}")
        patch = tuple(self.patch_size)
        if len(patch) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in patch):
            raise ValueError(f"DiT patch_size must be three positive integers (t, h, w), got {self.patch_size!r}")
        if self.width % self.num_heads:
            raise ValueError(f"DiT width {self.width} must be divisible by num_heads {self.num_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")

    @nn.compact
    def __call__(self, x, t, text, text_mask=None):
        """Predicts ``(B, T, H, W, out_channels)`` for latents ``x`` at times ``t`` given text.

        Args:
          x: noisy latents ``(B, T, H, W, C)``.
          t: times in [0, 1], shape ``(B,)`` or scalar.
          text: text embeddings ``(B, L, text_dim)``.
          text_mask: ``(B, L)`` bool, True for real tokens; None attends to all.
        """
        self._check_config()
        check_latents(x.shape, self.in_channels, self.patch_size)
        b, nt, nh, nw, c = x.shape
        pt, ph, pw = self.patch_size
        gt, gh, gw = nt // pt, nh // ph, nw // pw
        if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != self.text_dim:
            raise ValueError(f"DiT expects text (B={b}, L, text_dim={self.text_dim}), got {tuple(text.shape)}")
        if jnp.ndim(t) > 1 or (jnp.ndim(t) == 1 and jnp.shape(t)[0] not in (1, b)):
            raise ValueError(f"DiT expects t of shape (B={b},) or a scalar, got shape {tuple(jnp.shape(t))}")
        if not jnp.issubdtype(jnp.result_type(t), jnp.floating):
            # Integer timesteps (0..999, diffusers' scale) would be read as times in [0, 1].
            raise ValueError(f"DiT expects t as float times in [0, 1] (it scales them by timestep_scale="
                             f"{self.timestep_scale:g}), got {jnp.result_type(t)}")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        d, out_ch = self.width, self.out_channels or self.in_channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, out_dtype=self.activation_dtype)

        # Patchify as one GEMM: (B, T, H, W, C) -> (B, S, pt*ph*pw*C); equals a stride=kernel Conv3d.
        p = x.reshape(b, gt, pt, gh, ph, gw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        p = p.reshape(b, gt * gh * gw, pt * ph * pw * c)
        h = layers.Dense(d, axes=(None, "embed"), name="patch_embed", **kw)(p).astype(jnp.float32)
        h = layers.constrain(h, layers.ACT)

        # Timestep conditioning stays in f32: it sets every modulation of every block.
        temb = timestep_embedding(t * self.timestep_scale, self.freq_dim)
        temb = layers.MLP(d, d, activation="silu", name="time_embed")(temb)  # (B, D)
        if self.pooled_text:
            keep = (jnp.ones(text.shape[:2], bool) if text_mask is None else text_mask).astype(jnp.float32)
            pooled = jnp.sum(text.astype(jnp.float32) * keep[..., None], axis=1) / jnp.maximum(
                jnp.sum(keep, axis=1, keepdims=True), 1.0)  # (B, text_dim)
            temb = temb + layers.MLP(d, d, activation="silu", in_axes="embed", name="text_pool_embed")(pooled)
        mod = layers.Dense(6 * d, axes=("embed", "mlp"), kernel_init=nn.initializers.zeros_init(), name="time_proj")(
            jax.nn.silu(temb)
        ).reshape(b, 6, d)
        context = layers.MLP(d, d, activation="gelu_tanh", name="text_embed", **kw)(text)

        rope = tuple(jnp.asarray(a) for a in rope_cos_sin(rope_angles_3d((gt, gh, gw), d // self.num_heads,
                                                                          self.rope_theta)))
        block_kwargs = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            qk_norm=self.qk_norm,
            cross_attn_norm=self.cross_attn_norm,
            eps=self.eps,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            activation_dtype=self.activation_dtype,
        )
        if self.scan_layers:
            blocks = nn.scan(
                _ScanBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 4,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(block_kwargs, self.remat, name="blocks")
            h, _ = blocks(h, context, text_mask, mod, rope)
        else:
            policy = REMAT_POLICIES[self.remat]
            for i in range(self.depth):
                if policy is None:
                    h = DiTBlock(**block_kwargs, name=f"blocks_{i}")(h, context, text_mask, mod, rope)
                else:  # recomputed in the backward pass, in order (a scan body is in order by itself)
                    block = nn.remat(DiTBlock, policy=policy)(**block_kwargs, name=f"blocks_{i}")
                    h = layers.remat_after_cotangent(block, h, context, text_mask, mod, rope)

        table = self.param(
            "out_modulation", layers.partitioned(nn.initializers.zeros_init(), (None, "embed")), (2, d), jnp.float32
        )
        shift, scale = jnp.split(table[None] + temb[:, None], 2, axis=1)  # (B, 1, D) each
        h = layers.LayerNorm(self.eps, use_affine=False, name="norm_out")(h) * (1 + scale) + shift
        out = layers.Dense(
            pt * ph * pw * out_ch, axes=("embed", None), kernel_init=nn.initializers.zeros_init(), name="proj_out", **kw
        )(h.astype(self.dtype))
        out = out.reshape(b, gt, gh, gw, pt, ph, pw, out_ch).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return out.reshape(b, nt, nh, nw, out_ch).astype(jnp.float32)


def count_params(params) -> int:
    """Total number of parameter scalars in a (possibly boxed) pytree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(params))))


# Where a DiT's blocks keep their params: stacked on a leading ``layers`` axis under
# ``blocks/block`` (``scan_layers``), or one subtree per block.
_SCANNED, _SCAN_BODY = "blocks", "block"
_UNROLLED = re.compile(r"blocks_(\d+)")


def layers_stacked(path) -> bool:
    """Whether the leaf at ``path`` (a ``jax.tree_util`` key path) is a scanned DiT's stack of
    per-block params, whose leading axis is the block index."""
    keys = [getattr(k, "key", None) for k in path]
    return any(a == _SCANNED and b == _SCAN_BODY for a, b in zip(keys, keys[1:]))


def relayout(tree, like):
    """``tree`` with every DiT's blocks in the layout they have in ``like``.

    ``scan_layers`` changes where the blocks' params live, not what they are: stacked under
    ``blocks/block`` or one ``blocks_<i>`` per block. Both arguments are nested dicts (params,
    or a whole train state as a state dict: the optimizer's moments and the EMA follow the
    params); leaves are arrays, tracers or ``jax.ShapeDtypeStruct``s, and only ``like``'s
    keys are read. Subtrees that differ in other ways (another depth) are left as they are,
    for the restore that follows to name the difference.
    """
    if not isinstance(tree, Mapping) or not isinstance(like, Mapping):
        return tree
    out = dict(tree)
    like_depth = _unrolled_depth(like)
    if _is_scanned(out) and like_depth and not _is_scanned(like):
        stack = out.pop(_SCANNED)[_SCAN_BODY]
        if {_leading(x) for x in jax.tree.leaves(stack)} == {like_depth}:
            out.update({f"blocks_{i}": jax.tree.map(lambda x, i=i: _take(x, i), stack) for i in range(like_depth)})
        else:
            out[_SCANNED] = {_SCAN_BODY: stack}
    elif _unrolled_depth(out) and _is_scanned(like) and not _unrolled_depth(like):
        depth = _unrolled_depth(out)
        blocks = [out.pop(f"blocks_{i}") for i in range(depth)]
        out[_SCANNED] = {_SCAN_BODY: jax.tree.map(lambda *xs: _stack(xs), *blocks)}
    return {k: relayout(v, like[k]) if k in like else v for k, v in out.items()}


def _is_scanned(node: Mapping) -> bool:
    body = node.get(_SCANNED)
    return isinstance(body, Mapping) and set(body) == {_SCAN_BODY}


def _unrolled_depth(node: Mapping) -> int:
    """The number of ``blocks_<i>`` in ``node`` when they run 0..n-1 (else 0)."""
    found = {int(m.group(1)) for k in node if isinstance(k, str) and (m := _UNROLLED.fullmatch(k))}
    return len(found) if found == set(range(len(found))) else 0


def _leading(x) -> int | None:
    return x.shape[0] if getattr(x, "shape", ()) else None


def _stack(xs):
    x = xs[0]
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=_layers_spec(x.sharding, add=True))
    return jnp.stack(xs)


def _take(x, i: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_layers_spec(x.sharding, add=False))
    return x[i]


def _layers_spec(sharding, *, add: bool):
    """``sharding`` with a replicated leading (layers) axis added or dropped."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding  # single-device and the like fit any shape
    spec = tuple(sharding.spec)
    spec = (None, *spec) if add else spec[1:]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
