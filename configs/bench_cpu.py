"""bench_cpu: the CPU benchmark of `vdit bench` (docs/performance.md), a ~20M-parameter DiT at 1,024 tokens per step.

``arg`` is the DiT tokens per example: ``256`` (default: 13 frames at 64x64, batch 4)
or ``1024`` (13 frames at 128x128, batch 1). Either way a train step sees 1,024 tokens.
"""

from vdit.configs._base import base_config

# tokens per example -> frame size giving it (4 latent frames of (res/4/2)^2 tokens)
_RESOLUTION = {256: 64, 1024: 128}


def get_config(arg=None):
    """DiT width 384, depth 8, 6 heads, MLP 1536 (20.4M parameters) over a 4x/4x, 16-channel VAE."""
    tokens = int(arg) if str(arg or "").isdigit() else (256 if arg is None else 0)
    if tokens not in _RESOLUTION:
        raise ValueError(f"bench_cpu:{arg}: tokens per example must be one of {sorted(_RESOLUTION)}")
    c = base_config()
    c.data.update(frames=13, resolution=_RESOLUTION[tokens], batch_size=1024 // tokens)
    c.vae.update(base_dim=16, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True),
                 mid_attention=False, latents_mean=None, latents_std=None)
    c.text.update(max_length=64, width=256, depth=2, num_heads=4, mlp_ratio=2.0)
    # Scanned blocks with `dots` remat: the setting the docs' main train tables were measured with.
    # Unrolled blocks are faster on XLA:CPU for 1.6-1.8x the compile time: in f32 with `dots`
    # (0.725 against 0.762 s, 237 against 285 MiB; remat table) and in bf16 with `full` (0.396
    # against 0.440 s scanned, 144 against 162 MiB) (docs/performance.md).
    c.dit.update(in_channels=16, width=384, depth=8, num_heads=6, mlp_dim=1536, text_dim=256, freq_dim=256,
                 scan_layers=True, remat="dots")
    c.sample.update(steps=20)
    return c
