"""Wan2.1 VAE weights from diffusers' ``AutoencoderKLWan`` into ``vdit.vae.CausalVAE``.

diffusers stores the Wan2.1 VAE channels-first in PyTorch modules; vdit's
``CausalVAE`` mirrors the same module tree channels-last, so conversion is a renaming
rule plus a kernel transpose:

================================  ==========================================
diffusers key                     vdit parameter path
================================  ==========================================
``a.down_blocks.3.conv1.weight``  ``a/down_blocks_3/conv1/conv/kernel``, (O, I, *k) -> (*k, I, O)
``a.b.conv1.bias``                ``a/b/conv1/conv/bias``
``a.b.norm1.gamma``               ``a/b/norm1/scale``, flattened to (C,)
``a.b.resample.1.*``              ``a/b/conv/...`` (the conv inside the Sequential)
``a.up_blocks.0.upsamplers.0.*``  ``a/up_blocks_0/upsampler/...``
================================  ==========================================

Every converted tensor is checked against the parameter shapes of ``CausalVAE`` built
from the converted config; unknown or missing keys raise a ValueError that lists them.
torch is imported only when torch tensors are given (it is a conversion dependency).

Example::

    from diffusers import AutoencoderKLWan
    torch_vae = AutoencoderKLWan.from_pretrained(repo, subfolder="vae")
    kwargs, params = convert_wan_vae(torch_vae)
    vae = CausalVAE(**kwargs)
    latents = vae.apply({"params": params}, video, method="encode").mode()
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
import flax.linen as nn
from flax import traverse_util

from vdit.vae import CausalVAE
from vdit.convert.common import as_numpy

# Config keys that only affect diffusers' own runtime (tiling defaults, bookkeeping) or
# training-time dropout, which vdit's inference-equivalent VAE does not have.
_IGNORED_CONFIG = {"dropout", "scale_factor_temporal", "scale_factor_spatial"}
_DIFFUSERS_DEFAULTS = {  # AutoencoderKLWan's defaults, for configs that omit keys
    "base_dim": 96,
    "decoder_base_dim": None,
    "z_dim": 16,
    "dim_mult": (1, 2, 4, 4),
    "num_res_blocks": 2,
    "attn_scales": (),
    "temperal_downsample": (False, True, True),
    "is_residual": False,
    "in_channels": 3,
    "out_channels": 3,
    "patch_size": None,
    "latents_mean": None,
    "latents_std": None,
}


def wan_vae_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """``CausalVAE`` constructor kwargs from an ``AutoencoderKLWan`` config (dict or FrozenDict).

    Raises:
      ValueError: for Wan2.2-only features (``is_residual``, ``patch_size``), down-block
        attention (``attn_scales``, which diffusers' own encoder cannot run) or unknown keys.
    """
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    unknown = sorted(set(cfg) - set(_DIFFUSERS_DEFAULTS) - _IGNORED_CONFIG)
    if unknown:
        known = sorted(set(_DIFFUSERS_DEFAULTS) | _IGNORED_CONFIG)
        raise ValueError(f"unknown AutoencoderKLWan config keys {unknown}; known keys: {known}")
    cfg = {**_DIFFUSERS_DEFAULTS, **cfg}
    if cfg["is_residual"] or cfg["patch_size"] not in (None, 1):
        raise ValueError(
            "this is a Wan2.2-style VAE (is_residual=True or patch_size set); only the Wan2.1 layout converts"
        )
    if cfg["attn_scales"]:
        raise ValueError(
            f"attn_scales={cfg['attn_scales']} is not supported: Wan2.1 uses none (mid-block attention only), "
            "and diffusers' encoder cannot run down-block attention with its feature cache"
        )

    for name in ("latents_mean", "latents_std"):
        if cfg[name] is not None and len(cfg[name]) != cfg["z_dim"]:
            raise ValueError(f"config {name} has {len(cfg[name])} values but z_dim = {cfg['z_dim']}")

    def floats(v):
        return None if v is None else tuple(float(x) for x in v)

    return dict(
        base_dim=int(cfg["base_dim"]),
        decoder_base_dim=None if cfg["decoder_base_dim"] is None else int(cfg["decoder_base_dim"]),
        z_dim=int(cfg["z_dim"]),
        dim_mult=tuple(int(m) for m in cfg["dim_mult"]),
        num_res_blocks=int(cfg["num_res_blocks"]),
        temporal_downsample=tuple(bool(d) for d in cfg["temperal_downsample"]),
        mid_attention=True,
        in_channels=int(cfg["in_channels"]),
        out_channels=int(cfg["out_channels"]),
        latents_mean=floats(cfg["latents_mean"]),
        latents_std=floats(cfg["latents_std"]),
    )


def _vdit_path(key: str) -> tuple[tuple[str, ...], str] | None:
    """(module path, leaf kind) of a diffusers key, or None when no rule applies."""
    key = key.replace(".resample.1.", ".conv.").replace(".upsamplers.0.", ".upsampler.")
    key = re.sub(r"\.(\d+)(?=\.)", r"_\1", key)  # down_blocks.3. -> down_blocks_3.
    *path, leaf = key.split(".")
    if leaf not in ("weight", "bias", "gamma") or any(not re.fullmatch(r"[a-z_][a-z0-9_]*", p) for p in path):
        return None
    return tuple(path), leaf


def _expected_shapes(kwargs: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    vae = CausalVAE(**kwargs)
    s, c = vae.spatial_factor, vae.in_channels
    video = jax.ShapeDtypeStruct((1, 1, s, s, c), np.float32)  # a 1-frame clip builds every parameter
    abstract = jax.eval_shape(lambda v: vae.init(jax.random.key(0), v), video)
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]))
    return {k: tuple(v.shape) for k, v in flat.items()}


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_wan_vae(
    model_or_state_dict: Any,
    config: Mapping[str, Any] | None = None,
    *,
    dtype: Any = np.float32,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts a diffusers ``AutoencoderKLWan`` (Wan2.1 VAE) into vdit's ``CausalVAE``.

    Args:
      model_or_state_dict: an ``AutoencoderKLWan`` instance, or its ``state_dict()``
        (a mapping of names to torch tensors or numpy arrays).
      config: the model's config (``model.config`` or an equivalent dict); required with
        a state dict, taken from the model otherwise.
      dtype: numpy dtype of the returned parameters.

    Returns:
      ``(kwargs, params)``: ``CausalVAE(**kwargs)`` is the architecture (with the
      latent mean/std of the config) and ``params`` the nested dict of numpy arrays to
      pass as ``{"params": params}``. Arrays stay on the host so the caller chooses
      their placement and sharding.

    Raises:
      ValueError: unsupported config, keys of the state dict with no vdit counterpart,
        vdit parameters missing from the state dict, or mismatched shapes.
    """
    if hasattr(model_or_state_dict, "state_dict") and hasattr(model_or_state_dict, "config"):
        config = model_or_state_dict.config if config is None else config
        state_dict = model_or_state_dict.state_dict()
    else:
        state_dict = model_or_state_dict
        if config is None:
            raise ValueError("convert_wan_vae needs the AutoencoderKLWan config when given a state dict")
    kwargs = wan_vae_kwargs(config)
    expected = _expected_shapes(kwargs)

    flat, unexpected = {}, []
    for key, value in state_dict.items():
        rule = _vdit_path(key)
        target = None
        if rule is not None:
            path, leaf = rule
            target = path + {"gamma": ("scale",), "weight": ("conv", "kernel"), "bias": ("conv", "bias")}[leaf]
        if target not in expected:
            unexpected.append(key)
            continue
        array = as_numpy(value)
        if leaf == "gamma":
            array = array.reshape(-1)
        elif leaf == "weight":  # torch (O, I, *k) -> flax (*k, I, O)
            array = np.transpose(array, (*range(2, array.ndim), 1, 0))
        flat[target] = array
    missing = ["/".join(k) for k in expected if k not in flat]
    if unexpected or missing:
        raise ValueError(
            f"state dict does not match CausalVAE(base_dim={kwargs['base_dim']}, dim_mult={kwargs['dim_mult']}, "
            f"num_res_blocks={kwargs['num_res_blocks']}): {len(unexpected)} unexpected keys "
            f"[{_listing(unexpected)}]; {len(missing)} missing vdit parameters [{_listing(missing)}]"
        )
    bad = [f"{'/'.join(k)}: {flat[k].shape} vs {expected[k]}" for k in expected if flat[k].shape != expected[k]]
    if bad:
        raise ValueError(f"{len(bad)} converted tensors have the wrong shape: {_listing(bad, 4)}")
    params = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in flat.items()}
    return kwargs, traverse_util.unflatten_dict(params)
