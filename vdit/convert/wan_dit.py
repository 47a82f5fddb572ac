"""Convert diffusers' ``WanTransformer3DModel`` (Wan2.1 text-to-video) into ``vdit.dit.DiT``.

Works from a live diffusers model or from its ``state_dict`` plus config dict, so a
``.safetensors`` checkpoint can be converted without building the torch model::

    kwargs, params = convert_wan_dit(state_dict, config)
    model = DiT(**kwargs)
    out = model.apply({"params": params}, x, t, text)

Every source tensor must be used exactly once; leftovers or missing keys raise a
``ValueError`` naming them, so a silently half-loaded model cannot happen.
"""

from __future__ import annotations

from typing import Any, Mapping


from vdit.convert.common import KeyTracker, as_numpy, linear, stack_layers

# Wan2.1 T2V only: the I2V image branch (added k/v projections, image embedder) is not supported.
_UNSUPPORTED = {"image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None}


# Integer sizes of a diffusers WanTransformer3DModel config, with diffusers' defaults.
_SIZES = {"in_channels": 16, "out_channels": 16, "num_attention_heads": 40, "attention_head_dim": 128,
          "num_layers": 40, "ffn_dim": 13824, "text_dim": 4096, "freq_dim": 256}


def dit_kwargs_from_config(config: Mapping[str, Any]) -> dict:
    """``DiT`` constructor arguments equivalent to a diffusers ``WanTransformer3DModel`` config."""
    for key, ok in _UNSUPPORTED.items():
        if config.get(key, ok) != ok:
            raise ValueError(f"Wan config has {key}={config[key]!r}: only text-to-video (no image branch) converts")
    if config.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads", None):
        raise ValueError(
            f"Wan qk_norm={config['qk_norm']!r} is not supported; expected 'rms_norm_across_heads' or None")
    for key, default in _SIZES.items():
        value = config.get(key, default)
        if value is None and key == "out_channels":  # diffusers: as many as in_channels
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Wan config has {key}={value!r}: expected a positive integer")
    patch = config.get("patch_size", (1, 2, 2))
    if not (isinstance(patch, (list, tuple)) and len(patch) == 3
            and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)):
        raise ValueError(f"Wan config has patch_size={patch!r}: expected three positive integers [t, h, w]")
    heads, head_dim = config.get("num_attention_heads", 40), config.get("attention_head_dim", 128)
    return dict(
        in_channels=config.get("in_channels", 16),
        out_channels=config.get("out_channels", 16),
        patch_size=tuple(config.get("patch_size", (1, 2, 2))),
        width=heads * head_dim,
        depth=config.get("num_layers", 40),
        num_heads=heads,
        mlp_dim=config.get("ffn_dim", 13824),
        text_dim=config.get("text_dim", 4096),
        freq_dim=config.get("freq_dim", 256),
        timestep_scale=1000.0,
        qk_norm=config.get("qk_norm", "rms_norm_across_heads") is not None,
        cross_attn_norm=config.get("cross_attn_norm", True),
        eps=config.get("eps", 1e-6),
    )


def wan_config_from_dit(dit, *, rope_max_seq_len: int = 1024) -> dict:
    """The diffusers ``WanTransformer3DModel`` config of the same network as ``dit`` (a ``vdit.dit.DiT``).

    The inverse of ``dit_kwargs_from_config``, and checked against it: the config maps
    back onto ``dit``'s hyperparameters or this raises a one-line ValueError naming the
    field diffusers cannot express. Execution options (attention backend, remat, scan,
    dtypes) are not part of the network and are not compared.

    Args:
      dit: the vdit DiT module.
      rope_max_seq_len: diffusers precomputes RoPE up to this many positions per axis.
    """
    if dit.width % dit.num_heads:
        raise ValueError(f"DiT width {dit.width} must be divisible by num_heads {dit.num_heads}")
    if dit.pooled_text:
        raise ValueError(
            "DiT pooled_text=True has no diffusers Wan equivalent (Wan conditions on text by cross-attention only)")
    if dit.rope_theta != 10000.0:
        raise ValueError(f"diffusers' Wan RoPE is fixed at theta=10000; this DiT has rope_theta={dit.rope_theta}")
    config = dict(
        patch_size=tuple(dit.patch_size), num_attention_heads=dit.num_heads,
        attention_head_dim=dit.width // dit.num_heads, in_channels=dit.in_channels,
        out_channels=dit.out_channels or dit.in_channels, text_dim=dit.text_dim, freq_dim=dit.freq_dim,
        ffn_dim=dit.mlp_dim, num_layers=dit.depth, cross_attn_norm=dit.cross_attn_norm,
        qk_norm="rms_norm_across_heads" if dit.qk_norm else None, eps=dit.eps, image_dim=None,
        added_kv_proj_dim=None, rope_max_seq_len=rope_max_seq_len, pos_embed_seq_len=None,
    )
    for key, value in dit_kwargs_from_config(config).items():
        mine = getattr(dit, key)
        mine = tuple(mine) if key == "patch_size" else (mine or dit.in_channels) if key == "out_channels" else mine
        if value != mine:
            raise ValueError(f"DiT {key}={mine!r} has no diffusers Wan equivalent (Wan implies {value!r})")
    return config


def convert_wan_dit(model_or_state_dict, config: Mapping[str, Any] | None = None, *, scan_layers: bool = False):
    """Converts a Wan2.1 transformer into ``(DiT kwargs, params)``.

    Args:
      model_or_state_dict: a diffusers ``WanTransformer3DModel`` or its state dict
        (name -> torch tensor or numpy array).
      config: the model's config dict; required when passing a state dict.
      scan_layers: stack block parameters on a leading axis for ``DiT(scan_layers=True)``.

    Returns:
      ``(kwargs, params)``: constructor arguments for ``vdit.dit.DiT`` and a params
      pytree of float32 numpy arrays.
    """
    if hasattr(model_or_state_dict, "state_dict"):
        config = dict(model_or_state_dict.config)
        state = model_or_state_dict.state_dict()
    else:
        if config is None:
            raise ValueError("convert_wan_dit(state_dict, config): the Wan transformer config is required")
        state = model_or_state_dict
    kwargs = dit_kwargs_from_config(config)
    src = KeyTracker({k: as_numpy(v) for k, v in state.items()}, ignore=("norm_added_q",))
    c, (pt, ph, pw), d = kwargs["in_channels"], kwargs["patch_size"], kwargs["width"]

    # Conv3d (D, C, pt, ph, pw) -> Dense over patches flattened in (pt, ph, pw, C) order.
    w = src.pop("patch_embedding.weight")
    if w.shape != (d, c, pt, ph, pw):
        raise ValueError(f"patch_embedding.weight has shape {w.shape}, expected {(d, c, pt, ph, pw)}")
    params: dict[str, Any] = {
        "patch_embed": {
            "linear": {"kernel": w.transpose(2, 3, 4, 1, 0).reshape(pt * ph * pw * c, d),
                       "bias": src.pop("patch_embedding.bias")}
        },
        "time_embed": {
            "fc1": linear(src, "condition_embedder.time_embedder.linear_1"),
            "fc2": linear(src, "condition_embedder.time_embedder.linear_2"),
        },
        "time_proj": linear(src, "condition_embedder.time_proj"),
        "text_embed": {
            "fc1": linear(src, "condition_embedder.text_embedder.linear_1"),
            "fc2": linear(src, "condition_embedder.text_embedder.linear_2"),
        },
        "out_modulation": src.pop("scale_shift_table").reshape(2, d),
        "proj_out": linear(src, "proj_out"),
    }
    blocks = [_block(src, f"blocks.{i}", kwargs) for i in range(kwargs["depth"])]
    src.finish("Wan transformer")
    if scan_layers:
        params["blocks"] = {"block": stack_layers(blocks)}
    else:
        params.update({f"blocks_{i}": b for i, b in enumerate(blocks)})
    return kwargs, params


def _attention(src: KeyTracker, prefix: str, qk_norm: bool) -> dict:
    out = {name: linear(src, f"{prefix}.to_{name}") for name in ("q", "k", "v")}
    out["out"] = linear(src, f"{prefix}.to_out.0")
    if qk_norm:
        out["q_norm"] = {"scale": src.pop(f"{prefix}.norm_q.weight")}
        out["k_norm"] = {"scale": src.pop(f"{prefix}.norm_k.weight")}
    return out


def _block(src: KeyTracker, prefix: str, kwargs: dict) -> dict:
    d = kwargs["width"]
    block = {
        "modulation": src.pop(f"{prefix}.scale_shift_table").reshape(6, d),
        "self_attn": _attention(src, f"{prefix}.attn1", kwargs["qk_norm"]),
        "cross_attn": _attention(src, f"{prefix}.attn2", kwargs["qk_norm"]),
        "mlp": {"fc1": linear(src, f"{prefix}.ffn.net.0.proj"), "fc2": linear(src, f"{prefix}.ffn.net.2")},
    }
    if kwargs["cross_attn_norm"]:
        block["norm2"] = {"scale": src.pop(f"{prefix}.norm2.weight"), "bias": src.pop(f"{prefix}.norm2.bias")}
    return block

