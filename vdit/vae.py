"""Causal video VAE (Wan2.1's architecture) with chunked causal and tiled encode/decode.

Videos are channels-last ``(B, T, H, W, C)`` in [-1, 1] with ``T = 1 + t_f * k``
frames (``t_f`` = ``temporal_factor``, 4 for Wan2.1). The first frame is encoded on its
own, so an image is a 1-frame video and both share one latent space; latents are
``(B, 1 + k, H / s_f, W / s_f, z_dim)``.

Three ways through the same network give the same numbers (up to float rounding):

* whole clip: every causal conv sees the full clip at once (fastest, most memory);
* ``chunked=True``: the first frame alone, then one latent frame at a time (``t_f``
  video frames to encode, one latent frame to decode) in a ``lax.scan`` whose carry is
  the pytree of causal-conv caches, so memory does not grow with clip length and the
  chunk is compiled once. This is the loop Wan and diffusers run;
* ``tile_size=...``: overlapping spatial tiles, linearly blended in the overlap (an
  approximation, like any tiled VAE; exact when one tile covers the frame). Tiles run
  in a ``lax.scan`` too, and combine with ``chunked``.

Typical use::

    vae = CausalVAE(**kwargs)
    params = vae.init(key, video)["params"]
    post = vae.apply({"params": params}, video, method="encode")  # DiagonalGaussian
    z = post.sample(key)
    frames = vae.apply({"params": params}, z, method="decode")
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import struct

from vdit.layers import Conv, Dtype
from vdit.vae_blocks import Decoder, Encoder

_SCAN = dict(variable_broadcast="params", split_rngs={"params": False})


# ----------------------------------------------------------------------------- input checks


def _nearest(n: int, valid_floor: int, step: int, minimum: int) -> str:
    lo, hi = valid_floor, valid_floor + step
    return f"{lo} or {hi}" if lo >= minimum else f"{hi}"


def _check_rank_and_channels(shape: tuple, channels: int, what: str, axes: str) -> None:
    expected = f"(B, {axes}, {channels})"
    if len(shape) != 5:
        hint = ""
        if len(shape) == 4 and shape[-1] == channels:
            hint = "; a batch of images (B, H, W, C) is a 1-frame video: use x[:, None]"
        raise ValueError(f"{what}: expected a rank-5 array {expected}, got rank {len(shape)} shape {shape}{hint}")
    if shape[-1] != channels:
        if shape[1] == channels:
            raise ValueError(
                f"{what}: expected channels-last {expected}, got {shape}, which looks channels-first "
                f"(B, C, {axes}); use x.transpose(0, 2, 3, 4, 1)"
            )
        raise ValueError(f"{what}: expected {expected} with {channels} channels last, got {shape[-1]} in {shape}")


def check_video(
    shape: Sequence[int],
    *,
    channels: int = 3,
    temporal_factor: int = 4,
    spatial_factor: int = 8,
    what: str = "video",
) -> None:
    """Raises a one-line ValueError unless ``shape`` is a valid ``(B, T, H, W, C)`` video.

    Valid means rank 5, channels-last with ``channels`` channels, ``T = 1 + k *
    temporal_factor`` frames and ``H``, ``W`` multiples of ``spatial_factor``. The
    message names the expected shape and the nearest valid sizes.
    """
    shape = tuple(int(d) for d in shape)
    _check_rank_and_channels(shape, channels, what, "T, H, W")
    _, t, h, w, _ = shape
    tf, sf = temporal_factor, spatial_factor
    if t < 1 or (t - 1) % tf:
        near = _nearest(t, 1 + tf * ((t - 1) // tf), tf, 1)
        raise ValueError(f"{what} of shape {shape}: expected T = 1 + {tf}k frames, got {t}; nearest valid: {near}")
    for axis, n in (("H", h), ("W", w)):
        if n < 1 or n % sf:
            near = _nearest(n, sf * (n // sf), sf, sf)
            raise ValueError(
                f"{what} of shape {shape}: expected {axis} divisible by {sf}, got {n}; nearest valid: {near}"
            )


def check_latents(shape: Sequence[int], *, channels: int = 16, what: str = "latents") -> None:
    """Raises a one-line ValueError unless ``shape`` is a valid ``(B, t, h, w, C)`` latent."""
    shape = tuple(int(d) for d in shape)
    _check_rank_and_channels(shape, channels, what, "t, h, w")
    if min(shape[1:4]) < 1:
        raise ValueError(f"{what}: expected (B, t, h, w, {channels}) with t, h, w >= 1, got {shape}")


# ----------------------------------------------------------------------------- posterior


@struct.dataclass
class DiagonalGaussian:
    """The posterior ``N(mean, exp(logvar))`` over latents ``(B, t, h, w, C)``, float32."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        """``exp(logvar / 2)``."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        """``exp(logvar)``."""
        return jnp.exp(self.logvar)

    def mode(self) -> jax.Array:
        """The most likely latent, ``mean``."""
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """A reparameterised sample ``mean + std * eps`` (differentiable in mean/logvar)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def kl(self) -> jax.Array:
        """``KL(q || N(0, I))`` per example ``(B,)``, summed over all latent elements."""
        kl = 0.5 * (jnp.square(self.mean) + self.var - 1.0 - self.logvar)
        return kl.reshape(kl.shape[0], -1).sum(-1)


# ----------------------------------------------------------------------------- tiling plan


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    # The last tile is moved back to end at the border, so all tiles share one shape.
    if tile >= n:
        return [0]
    return list(range(0, n - tile, stride)) + [n - tile]


def _ramp(length: int, overlap: int, rise: bool, fall: bool) -> np.ndarray:
    # Linear cross-fade: neighbouring ramps sum to one where tiles overlap by `overlap`.
    w = np.ones(length, np.float32)
    if overlap > 0:
        up = np.arange(1, overlap + 1, dtype=np.float32) / (overlap + 1)
        if rise:
            w[:overlap] = np.minimum(w[:overlap], up)
        if fall:
            w[-overlap:] = np.minimum(w[-overlap:], up[::-1])
    return w


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if np.ndim(v) == 0:
        return int(v), int(v)
    if len(v) != 2:
        raise ValueError(f"expected a size or an (h, w) pair of pixels, got {tuple(v)}")
    return int(v[0]), int(v[1])


# ----------------------------------------------------------------------------- the model


class CausalVAE(nn.Module):
    """Causal 3-D convolutional VAE; the defaults are Wan2.1's VAE architecture.

    Attributes:
      base_dim: encoder width of the first level (Wan2.1: 96).
      decoder_base_dim: decoder base width (default ``base_dim``).
      z_dim: latent channels.
      dim_mult: width multipliers per level; ``len - 1`` spatial halvings.
      num_res_blocks: ResBlocks per encoder level (the decoder has one more).
      temporal_downsample: per downsampling, whether it also halves time.
      mid_attention: per-frame self-attention in the encoder/decoder mid blocks.
      in_channels, out_channels: video channels.
      latents_mean, latents_std: per-channel latent statistics; ``normalize=True``
        latents are ``(z - mean) / std``. None is the identity.
      attention_impl: backend of ``vdit.attention.attention``.
      dtype: compute dtype of convolutions (norms and the posterior are float32).
      param_dtype: parameter dtype.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    mid_attention: bool = True
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame (after the first)."""
        return 2 ** sum(bool(d) for d in self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W."""
        return 2 ** (len(self.dim_mult) - 1)

    def latent_shape(self, video_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent shape ``(B, 1 + k, H/s, W/s, z_dim)`` of a (checked) video shape."""
        self.check_video(video_shape)
        b, t, h, w, _ = video_shape
        s = self.spatial_factor
        return (b, 1 + (t - 1) // self.temporal_factor, h // s, w // s, self.z_dim)

    def video_shape(self, latent_shape: Sequence[int]) -> tuple[int, ...]:
        """Video shape ``(B, 1 + t_f k, s h, s w, C)`` decoded from a latent shape."""
        check_latents(latent_shape, channels=self.z_dim)
        b, t, h, w, _ = latent_shape
        s = self.spatial_factor
        return (b, 1 + (t - 1) * self.temporal_factor, h * s, w * s, self.out_channels)

    def check_video(self, shape: Sequence[int]) -> None:
        """``check_video`` with this model's channels and compression factors."""
        check_video(
            shape,
            channels=self.in_channels,
            temporal_factor=self.temporal_factor,
            spatial_factor=self.spatial_factor,
        )

    def setup(self):
        """Checks the architecture settings (one-line errors), then builds encoder and decoder."""
        if not self.dim_mult:
            raise ValueError("dim_mult is empty: expected one channel multiplier per resolution level")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs one entry per downsampling (len(dim_mult) - 1 = "
                f"{len(self.dim_mult) - 1}), got {self.temporal_downsample}"
            )
        for name in ("latents_mean", "latents_std"):
            stats = getattr(self, name)
            if stats is not None and len(stats) != self.z_dim:
                raise ValueError(f"{name} needs z_dim = {self.z_dim} values, got {len(stats)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        arch = dict(
            dim_mult=tuple(self.dim_mult),
            num_res_blocks=self.num_res_blocks,
            temporal_downsample=tuple(self.temporal_downsample),
            mid_attention=self.mid_attention,
            attention_impl=self.attention_impl,
            **kw,
        )
        self.encoder = Encoder(self.base_dim, 2 * self.z_dim, **arch)
        self.quant_conv = Conv(2 * self.z_dim, (1, 1, 1), **kw)
        self.post_quant_conv = Conv(self.z_dim, (1, 1, 1), **kw)
        self.decoder = Decoder(self.decoder_base_dim or self.base_dim, self.out_channels, **arch)

    def __call__(self, video: jax.Array, key: jax.Array | None = None, *, chunked: bool = False):
        """Training forward pass: encode, sample (or take the mean when ``key`` is None), decode.

        Latents are unnormalised and the reconstruction is not clamped, so gradients
        reach every pixel.

        Returns:
          ``(reconstruction (B, T, H, W, C) float32, posterior DiagonalGaussian)``.
        """
        posterior = self.encode(video, normalize=False, chunked=chunked)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z, normalize=False, chunked=chunked, clamp=False), posterior

    def encode(
        self,
        video: jax.Array,
        *,
        normalize: bool = True,
        chunked: bool = False,
        tile_size: int | Sequence[int] | None = None,
        tile_stride: int | Sequence[int] | None = None,
    ) -> DiagonalGaussian:
        """Encodes ``(B, T, H, W, C)`` pixels in [-1, 1] into the latent posterior.

        Args:
          video: ``T = 1 + temporal_factor * k``, H and W multiples of ``spatial_factor``.
          normalize: return the posterior of ``(z - latents_mean) / latents_std``.
          chunked: run the causal chunk loop (bounded memory) instead of the whole clip.
          tile_size: spatial tile ``(h, w)`` in pixels (multiples of ``spatial_factor``),
            or None for no tiling.
          tile_stride: distance between tiles in pixels (default 3/4 of the tile).

        Returns:
          ``DiagonalGaussian`` with mean/logvar ``(B, 1 + k, H/s, W/s, z_dim)``, float32;
          logvar clipped to [-30, 20] as Wan does.
        """
        self.check_video(video.shape)
        if not jnp.issubdtype(video.dtype, jnp.floating):
            # uint8 frames would encode as if 0..255 were [-1, 1]: a silent, wrong latent.
            raise ValueError(f"video of dtype {video.dtype}: expected floats in [-1, 1] "
                             f"(vdit.data.pipeline.normalize_video maps uint8 frames there)")
        s = self.spatial_factor
        fn = lambda mdl, x: mdl._moments(x, chunked)  # noqa: E731
        if tile_size is None:
            moments = fn(self, video)
        else:
            out_shape = self.latent_shape(video.shape)[:4] + (2 * self.z_dim,)
            moments = self._tiled(fn, video, out_shape, *self._tile_args(tile_size, tile_stride), 1, s)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        logvar = jnp.clip(logvar, -30.0, 20.0)
        if normalize and self.latents_mean is not None:
            mean = mean - jnp.asarray(self.latents_mean, jnp.float32)
        if normalize and self.latents_std is not None:
            std = jnp.asarray(self.latents_std, jnp.float32)
            mean, logvar = mean / std, logvar - 2.0 * jnp.log(std)
        return DiagonalGaussian(mean, logvar)

    def decode(
        self,
        z: jax.Array,
        *,
        normalize: bool = True,
        chunked: bool = False,
        tile_size: int | Sequence[int] | None = None,
        tile_stride: int | Sequence[int] | None = None,
        clamp: bool = True,
    ) -> jax.Array:
        """Decodes latents ``(B, t, h, w, z_dim)`` into ``(B, 1 + t_f (t - 1), s h, s w, C)``.

        Args:
          z: latents.
          normalize: ``z`` is normalised, ``(z - latents_mean) / latents_std``; undo it first.
          chunked: decode one latent frame at a time in a causal ``lax.scan``.
          tile_size: spatial tile ``(h, w)`` in output pixels (multiples of ``spatial_factor``).
          tile_stride: distance between tiles in output pixels (default 3/4 of the tile).
          clamp: clip the output to [-1, 1] (Wan does).

        Returns:
          Float32 video.
        """
        check_latents(z.shape, channels=self.z_dim)
        z = z.astype(jnp.float32)
        if normalize and self.latents_std is not None:
            z = z * jnp.asarray(self.latents_std, jnp.float32)
        if normalize and self.latents_mean is not None:
            z = z + jnp.asarray(self.latents_mean, jnp.float32)
        s = self.spatial_factor
        fn = lambda mdl, x: mdl._pixels(x, chunked)  # noqa: E731
        if tile_size is None:
            video = fn(self, z)
        else:
            tile, stride = self._tile_args(tile_size, tile_stride)
            tile, stride = tuple(t // s for t in tile), tuple(t // s for t in stride)
            video = self._tiled(fn, z, self.video_shape(z.shape)[:4] + (self.out_channels,), tile, stride, s, 1)
        video = video.astype(jnp.float32)
        return jnp.clip(video, -1.0, 1.0) if clamp else video

    # ------------------------------------------------------------------------- internals

    def _moments(self, video: jax.Array, chunked: bool) -> jax.Array:
        # (B, T, H, W, C) -> (B, t, h, w, 2 z): encoder + quant conv, whole or chunked.
        if not chunked or video.shape[1] == 1:
            h, _ = self.encoder(video)
        else:
            b, t = video.shape[:2]
            f = self.temporal_factor
            first, cache = self.encoder(video[:, :1])
            chunks = video[:, 1:].reshape(b, (t - 1) // f, f, *video.shape[2:]).swapaxes(0, 1)
            h = jnp.concatenate([first, self._scan_chunks(self.encoder, cache, chunks)], axis=1)
        return self.quant_conv(h)

    def _pixels(self, z: jax.Array, chunked: bool) -> jax.Array:
        # (B, t, h, w, z) -> (B, T, H, W, C) unclamped: post-quant conv + decoder.
        x = self.post_quant_conv(z)
        if not chunked or x.shape[1] == 1:
            return self.decoder(x)[0]
        first, cache = self.decoder(x[:, :1])
        chunks = jnp.swapaxes(x[:, 1:, None], 0, 1)  # (t - 1, B, 1, h, w, z)
        return jnp.concatenate([first, self._scan_chunks(self.decoder, cache, chunks)], axis=1)

    @staticmethod
    def _scan_chunks(net: nn.Module, cache, chunks: jax.Array) -> jax.Array:
        # chunks (N, B, t, ...) -> outputs concatenated in time (B, N * t', ...).
        def step(mdl, carry, chunk):
            y, carry = mdl(chunk, carry)
            return carry, y

        _, ys = nn.scan(step, **_SCAN)(net, cache, chunks)  # (N, B, t', ...)
        ys = jnp.swapaxes(ys, 0, 1)
        return ys.reshape(ys.shape[0], -1, *ys.shape[3:])

    def _tile_args(self, tile_size, tile_stride) -> tuple[tuple[int, int], tuple[int, int]]:
        s = self.spatial_factor
        tile = _pair(tile_size)
        stride = _pair(tile_stride) if tile_stride is not None else tuple(max(s, t * 3 // 4 // s * s) for t in tile)
        for name, v in (("tile_size", tile), ("tile_stride", stride)):
            if min(v) < s or any(d % s for d in v):
                raise ValueError(f"{name} must be positive multiples of spatial_factor {s} pixels, got {v}")
        if any(st > t for st, t in zip(stride, tile)):
            raise ValueError(f"tile_stride {stride} must not exceed tile_size {tile}, or tiles would leave gaps")
        return tile, stride

    def _tiled(self, fn: Callable, x: jax.Array, out_shape: tuple, tile, stride, up: int, down: int) -> jax.Array:
        # Runs fn(module, tile) over overlapping spatial tiles of x and blends the results.
        # Output coordinates are input coordinates * up / down.
        b, t, h, w, c = x.shape
        ys, xs = _tile_starts(h, tile[0], stride[0]), _tile_starts(w, tile[1], stride[1])
        if len(ys) == 1 and len(xs) == 1:  # one tile covers the frame: exactly untiled
            return fn(self, x)
        th, tw = min(tile[0], h), min(tile[1], w)
        oth, otw = th * up // down, tw * up // down
        ov_h, ov_w = (tile[0] - stride[0]) * up // down, (tile[1] - stride[1]) * up // down
        offsets, weights = [], []
        norm = np.zeros(out_shape[2:4], np.float32)
        for y0 in ys:
            wy = _ramp(oth, ov_h, y0 > 0, y0 + th < h)
            for x0 in xs:
                wmap = np.outer(wy, _ramp(otw, ov_w, x0 > 0, x0 + tw < w))
                oy, ox = y0 * up // down, x0 * up // down
                norm[oy : oy + oth, ox : ox + otw] += wmap
                offsets.append((y0, x0, oy, ox))
                weights.append(wmap)

        def step(mdl, acc, inputs):
            (y0, x0, oy, ox), wmap = inputs
            zero = jnp.zeros((), jnp.int32)
            tile_in = jax.lax.dynamic_slice(x, (zero, zero, y0, x0, zero), (b, t, th, tw, c))
            out = fn(mdl, tile_in).astype(jnp.float32) * wmap[:, :, None]
            start = (zero, zero, oy, ox, zero)
            acc = jax.lax.dynamic_update_slice(acc, jax.lax.dynamic_slice(acc, start, out.shape) + out, start)
            return acc, None

        acc = jnp.zeros(out_shape, jnp.float32)
        offsets = tuple(jnp.asarray(np.array(offsets, np.int32)[:, i]) for i in range(4))
        acc, _ = nn.scan(step, **_SCAN)(self, acc, (offsets, jnp.asarray(np.stack(weights))))
        return acc / norm[:, :, None]
