"""vdit: text-to-video latent diffusion transformers in JAX."""

__version__ = "0.1.0"
