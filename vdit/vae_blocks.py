"""Blocks of the causal video VAE (the Wan2.1 layout), channels-last ``(B, T, H, W, C)``.

Every block is causal in time and streams: ``block(x, cache) -> (y, new_cache)``.
``cache=None`` means "the clip starts here" (zero history, and the first frame gets
the special treatment of the temporal resamplers); a cache returned by a previous call
continues the same clip. Caches hold the last input frames each temporal convolution
needs, so they have the same shapes for every chunk and can be a ``lax.scan`` carry.
Processing a clip whole or as [first frame, chunk, chunk, ...] gives the same result.

Parameter names follow diffusers' ``AutoencoderKLWan`` module tree (``down_blocks_3``
for ``down_blocks.3``) so that ``vdit.convert.wan_vae`` maps weights by rule.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from vdit.attention import attention
from vdit.layers import Conv, Dtype, RMSNorm, constrain

Cache = Any  # a pytree of past frames; None at the start of a clip

# Wan normalises by max(||x||, 1e-12) * sqrt(C); a tiny eps on the mean square equals
# that to float precision and keeps an all-zero vector at zero.
NORM_EPS = 1e-12
_SAME_HW = ((0, 0), (1, 1), (1, 1))  # time is padded causally by hand, space "same"
RESAMPLE_MODES = ("down2d", "down3d", "up2d", "up3d")
# Video activations are split over the batch only. Left to itself, sharding propagation
# follows the fsdp-sharded conv kernels onto the channels, so each conv's input is
# all-gathered across fsdp and the backward pass (batch-split) must replicate
# activations to meet it; with the weights small and the activations large, gathering
# the weights (ZeRO-3) is the cheap side.
VIDEO = ("act_batch", None, None, None, "act_embed")


def time_identity_init(tap: int, copies: int = 1):
    """Initializer of a ``(kt, 1, 1, C, copies * C)`` temporal conv that passes frame ``tap`` through.

    Wan's resamplers start this way (its ``init_weight``/``init_weight2``): the
    downsampler keeps one frame of each pair and the upsampler repeats each frame,
    so an untrained VAE begins as a per-frame image autoencoder and training only
    has to learn what motion adds.
    """

    def init(key, shape, dtype=jnp.float32):
        del key
        kt, kh, kw, c_in, c_out = shape
        if (kh, kw) != (1, 1) or c_out != copies * c_in or not 0 <= tap < kt:
            raise ValueError(f"time_identity_init(tap={tap}, copies={copies}) cannot initialise a kernel {shape}")
        kernel = jnp.zeros(shape, dtype)
        return kernel.at[tap, 0, 0].set(jnp.tile(jnp.eye(c_in, dtype=dtype), (1, copies)))

    return init


def _get(cache: Cache, name: str) -> Cache:
    return None if cache is None else cache[name]


def causal(conv: nn.Module, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Applies a stride-1 temporal ``conv`` causally: past frames come from ``cache``.

    Args:
      conv: a ``Conv`` with kernel ``(kt, kh, kw)``, no time padding.
      x: ``(B, T, H, W, C)``.
      cache: the previous ``kt - 1`` input frames, or None (zeros) at clip start.

    Returns:
      ``(B, T, H', W', C')`` and the cache for the next chunk (last ``kt - 1`` frames).
    """
    kt = conv.kernel_size[0]
    if cache is None:
        cache = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
    x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    return constrain(conv(x), VIDEO), x[:, x.shape[1] - (kt - 1) :]


class ResBlock(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with causal 3x3x3 convs.

    A 1x1x1 ``conv_shortcut`` projects ``x`` when the width changes.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = x
        if x.shape[-1] != self.features:
            h = constrain(Conv(self.features, (1, 1, 1), name="conv_shortcut", **kw)(x), VIDEO)
        y = jax.nn.silu(RMSNorm(NORM_EPS, param_dtype=self.param_dtype, name="norm1")(x))
        conv1 = Conv(self.features, (3, 3, 3), padding=_SAME_HW, name="conv1", **kw)
        y, c1 = causal(conv1, y, _get(cache, "conv1"))
        y = jax.nn.silu(RMSNorm(NORM_EPS, param_dtype=self.param_dtype, name="norm2")(y))
        conv2 = Conv(self.features, (3, 3, 3), padding=_SAME_HW, name="conv2", **kw)
        y, c2 = causal(conv2, y, _get(cache, "conv2"))
        return y + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing in time)."""

    impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, h, w, c = x.shape
        y = RMSNorm(NORM_EPS, param_dtype=self.param_dtype, name="norm")(x)
        qkv = Conv(3 * c, (1, 1), name="to_qkv", **kw)(y)  # per-frame 1x1 conv
        q, k, v = jnp.split(qkv.reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)  # (B*T, HW, 1, C)
        y = attention(q, k, v, impl=self.impl).reshape(b, t, h, w, c)
        # Zero-initialised output, as Wan's: the block starts as the identity.
        proj = Conv(c, (1, 1), kernel_init=nn.initializers.zeros_init(), name="proj", **kw)
        return constrain(x + proj(y), VIDEO), None


class MidBlock(nn.Module):
    """ResBlock, optional per-frame attention, ResBlock, at constant width."""

    use_attention: bool = True
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x, c0 = ResBlock(c, name="resnets_0", **kw)(x, _get(cache, "resnets_0"))
        if self.use_attention:
            x, _ = AttentionBlock(self.attention_impl, name="attentions_0", **kw)(x)
        x, c1 = ResBlock(c, name="resnets_1", **kw)(x, _get(cache, "resnets_1"))
        return x, {"resnets_0": c0, "resnets_1": c1}


class Resample(nn.Module):
    """Halves or doubles H and W, and in the ``3d`` modes also time (Wan's ``Resample``).

    ``down2d``/``down3d``: pad right/bottom by one, 3x3 conv with stride 2 (width kept).
    ``down3d`` then convolves time with a (3, 1, 1) kernel, stride 2: the first frame of a
    clip passes through alone and ``1 + 2m`` frames become ``1 + m``.
    ``up3d`` first doubles time: a causal (3, 1, 1) conv to twice the width whose halves
    become the even and odd output frames; the first frame of a clip is not doubled, so
    ``1 + m`` frames become ``1 + 2m``. ``up2d``/``up3d`` then repeat pixels 2x2 and apply a
    3x3 conv to ``features`` channels.
    """

    features: int
    mode: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        if self.mode not in RESAMPLE_MODES:
            raise ValueError(f"Resample mode must be one of {RESAMPLE_MODES}, got {self.mode!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, _, h, w, c = x.shape
        new_cache = None
        if self.mode == "up3d":
            time_conv = Conv(2 * c, (3, 1, 1), kernel_init=time_identity_init(2, copies=2), name="time_conv", **kw)
            first = None
            if cache is None:
                first, x = x[:, :1], x[:, 1:]
            if x.shape[1]:
                y, new_cache = causal(time_conv, x, cache)  # (B, T, H, W, 2C)
                t = y.shape[1]
                x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
            else:  # a lone first frame: no history yet, as if zeros came before
                new_cache = jnp.zeros((b, 2, h, w, c), x.dtype)
                self._touch(time_conv, c, x.dtype)
            if first is not None:
                x = jnp.concatenate([first, x.astype(first.dtype)], axis=1)
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest, exact for 2x
            x = Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv", **kw)(x)
            return constrain(x, VIDEO), new_cache

        x = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
        x = constrain(Conv(self.features, (3, 3), strides=(2, 2), name="conv", **kw)(x), VIDEO)
        if self.mode == "down3d":
            time_conv = Conv(self.features, (3, 1, 1), strides=(2, 1, 1), kernel_init=time_identity_init(1),
                             name="time_conv", **kw)
            new_cache = x[:, -1:]
            if cache is not None:
                x = time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
            elif x.shape[1] >= 3:  # frames 0..2, 2..4, ...; frame 0 also passes alone
                x = jnp.concatenate([x[:, :1], time_conv(x)], axis=1)
            else:
                self._touch(time_conv, self.features, x.dtype)
        return constrain(x, VIDEO), new_cache

    def _touch(self, conv: nn.Module, c: int, dtype) -> None:
        # A 1-frame clip never runs the time conv; create its parameters anyway at init.
        if self.is_initializing():
            conv(jnp.zeros((1, 3, 1, 1, c), dtype))


class Encoder(nn.Module):
    """Video ``(B, T, H, W, C_in)`` -> ``(B, t, h, w, out_channels)`` (Wan2.1 encoder).

    Widths ``base_dim * (1, *dim_mult)``; each level has ``num_res_blocks`` ResBlocks and
    all but the last end in a ``down2d``/``down3d`` Resample (``temporal_downsample[i]``).
    """

    base_dim: int
    out_channels: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temporal_downsample: tuple[bool, ...]
    mid_attention: bool = True
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dims = [self.base_dim * m for m in (1, *self.dim_mult)]
        new = {}
        x, new["conv_in"] = causal(
            Conv(dims[0], (3, 3, 3), padding=_SAME_HW, name="conv_in", **kw), x, _get(cache, "conv_in")
        )
        # One flat list like diffusers' ``down_blocks``, so indices match its weights.
        layers = []
        for level, width in enumerate(dims[1:]):
            layers += [(ResBlock, (width,))] * self.num_res_blocks
            if level != len(self.dim_mult) - 1:
                mode = "down3d" if self.temporal_downsample[level] else "down2d"
                layers.append((Resample, (width, mode)))
        for i, (cls, args) in enumerate(layers):
            name = f"down_blocks_{i}"
            x, new[name] = cls(*args, name=name, **kw)(x, _get(cache, name))
        x, new["mid_block"] = MidBlock(self.mid_attention, self.attention_impl, name="mid_block", **kw)(
            x, _get(cache, "mid_block")
        )
        x = jax.nn.silu(RMSNorm(NORM_EPS, param_dtype=self.param_dtype, name="norm_out")(x))
        conv_out = Conv(self.out_channels, (3, 3, 3), padding=_SAME_HW, name="conv_out", **kw)
        x, new["conv_out"] = causal(conv_out, x, _get(cache, "conv_out"))
        return x, new


class UpBlock(nn.Module):
    """``num_res_blocks + 1`` ResBlocks, then an optional ``up2d``/``up3d`` to half width."""

    features: int
    num_res_blocks: int
    upsample: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        new = {}
        for i in range(self.num_res_blocks + 1):
            name = f"resnets_{i}"
            x, new[name] = ResBlock(self.features, name=name, **kw)(x, _get(cache, name))
        if self.upsample is not None:
            up = Resample(self.features // 2, self.upsample, name="upsampler", **kw)
            x, new["upsampler"] = up(x, _get(cache, "upsampler"))
        return x, new


class Decoder(nn.Module):
    """Latents ``(B, t, h, w, C_z)`` -> video ``(B, T, H, W, out_channels)`` (Wan2.1 decoder).

    Widths ``base_dim * (dim_mult[-1], *reversed(dim_mult))``; each Resample halves the
    width, and ``temporal_upsample`` is ``reversed(temporal_downsample)``. The output is
    not clamped here.
    """

    base_dim: int
    out_channels: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temporal_downsample: tuple[bool, ...]
    mid_attention: bool = True
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dims = [self.base_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        temporal_upsample = tuple(self.temporal_downsample)[::-1]
        new = {}
        x, new["conv_in"] = causal(
            Conv(dims[0], (3, 3, 3), padding=_SAME_HW, name="conv_in", **kw), x, _get(cache, "conv_in")
        )
        x, new["mid_block"] = MidBlock(self.mid_attention, self.attention_impl, name="mid_block", **kw)(
            x, _get(cache, "mid_block")
        )
        for i, width in enumerate(dims[1:]):
            mode = None
            if i != len(self.dim_mult) - 1:
                mode = "up3d" if temporal_upsample[i] else "up2d"
            name = f"up_blocks_{i}"
            x, new[name] = UpBlock(width, self.num_res_blocks, mode, name=name, **kw)(x, _get(cache, name))
        x = jax.nn.silu(RMSNorm(NORM_EPS, param_dtype=self.param_dtype, name="norm_out")(x))
        conv_out = Conv(self.out_channels, (3, 3, 3), padding=_SAME_HW, name="conv_out", **kw)
        x, new["conv_out"] = causal(conv_out, x, _get(cache, "conv_out"))
        return x, new
