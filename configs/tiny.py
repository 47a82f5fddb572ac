"""tiny: the smallest useful config, for tests (16x16, 5 frames, seconds per step on CPU)."""

from vdit.configs._base import base_config


def get_config(arg=None):
    """Tiny models on a 4x-temporal, 4x-spatial VAE; takes no ``arg``."""
    if arg is not None:
        raise ValueError(f"tiny:{arg}: tiny takes no argument (use tiny, and key=value overrides)")
    c = base_config()
    c.data.update(frames=5, resolution=16, batch_size=8)
    c.vae.update(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True),
                 mid_attention=False, latents_mean=None, latents_std=None)
    c.text.update(max_length=40, width=32, depth=1, num_heads=2, mlp_ratio=2.0)
    c.dit.update(in_channels=4, width=32, depth=2, num_heads=2, mlp_dim=64, text_dim=32, freq_dim=32)
    c.train.update(steps=20, log_every=5, eval_every=10, checkpoint_every=10, ema_decay=0.9)
    c.vae_train.update(steps=20, log_every=5, checkpoint_every=10)
    c.optim.update(lr=1e-3, warmup_steps=2)
    c.vae_optim.update(warmup_steps=2)
    c.sample.update(steps=4, cfg=3.0)
    return c
