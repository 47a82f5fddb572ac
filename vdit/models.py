"""Builds vdit's three models from a config: the only place config meets model code.

Model constructors take plain hyperparameters; this module turns config sections into
them (dtype names into dtypes, lists into tuples) and checks that the pieces fit
together (VAE latent channels = DiT input channels, text width = DiT text width).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from vdit.config import to_kwargs
from vdit.dit import DiT
from vdit.schedule import Schedule
from vdit.text import TransformerTextEncoder
from vdit.vae import CausalVAE


def _dtype(name):
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"unknown dtype {name!r}; expected e.g. 'float32' or 'bfloat16'") from e


def _with_dtypes(kwargs: dict) -> dict:
    for key in ("dtype", "param_dtype", "activation_dtype"):
        if kwargs.get(key) is not None:
            kwargs[key] = _dtype(kwargs[key])
    return kwargs


@dataclasses.dataclass(frozen=True)
class Models:
    """The VAE, text encoder and DiT of one config, plus the noise schedule."""

    vae: CausalVAE
    text: TransformerTextEncoder
    dit: DiT
    schedule: Schedule


def build_vae(config: ml_collections.ConfigDict) -> CausalVAE:
    """The config's causal video VAE."""
    return CausalVAE(**_with_dtypes(to_kwargs(config.vae)))


def build_models(config: ml_collections.ConfigDict) -> Models:
    """All models of a config; raises a one-line ValueError when they do not fit together."""
    vae = build_vae(config)
    text_kwargs = _with_dtypes(to_kwargs(config.text))
    text = TransformerTextEncoder(**text_kwargs)
    dit = DiT(**_with_dtypes(to_kwargs(config.dit)))
    if dit.in_channels != vae.z_dim:
        raise ValueError(f"dit.in_channels={dit.in_channels} must equal vae.z_dim={vae.z_dim}")
    if dit.text_dim != text.width:
        raise ValueError(f"dit.text_dim={dit.text_dim} must equal text.width={text.width}")
    s = config.schedule
    schedule = Schedule(kind=s.kind, prediction=s.prediction, shift=s.shift, vp=s.get("vp"))
    return Models(vae=vae, text=text, dit=dit, schedule=schedule)


def param_counts(models: Models) -> dict[str, int]:
    """Parameter count of each model, from shapes alone (``jax.eval_shape``; nothing allocated)."""
    import jax

    from vdit.dit import count_params

    key = jax.random.PRNGKey(0)
    s = models.vae.spatial_factor
    video = jax.ShapeDtypeStruct((1, 1, s, s, models.vae.in_channels), jnp.float32)
    vae = jax.eval_shape(models.vae.init, key, video)
    text = jax.eval_shape(models.text.init, key)
    pt, ph, pw = models.dit.patch_size
    latents = jax.ShapeDtypeStruct((1, pt, ph, pw, models.dit.in_channels), jnp.float32)
    emb = jax.ShapeDtypeStruct((1, 2, models.dit.text_dim), jnp.float32)
    dit = jax.eval_shape(models.dit.init, key, latents, jnp.zeros((1,)), emb)
    counts = {"vae": count_params(vae), "text": count_params(text), "dit": count_params(dit)}
    counts["total"] = sum(counts.values())
    return counts
