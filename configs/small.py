"""small: one GPU or TPU host; 8x spatial / 4x temporal VAE with 16 channels, ~119M DiT."""

from vdit.configs._base import base_config


def get_config(arg=None):
    """``arg`` picks the resolution: ``small`` (128x128, default) or ``small:256``."""
    res = int(arg) if str(arg or "").isdigit() else (128 if arg is None else 0)
    if res < 16 or res % 16:  # whole 2x2 patches of the VAE's 8x latents
        raise ValueError(f"small:{arg}: expected a frame size in pixels, a multiple of 16 such as small:256")
    c = base_config()
    c.data.update(frames=33, resolution=res, batch_size=32)
    c.vae.update(base_dim=64, dtype="bfloat16")
    c.text.update(max_length=128, width=512, depth=6, num_heads=8, dtype="bfloat16")
    # Heads of 128, as in Wan2.1: cuDNN's flash attention trains 1.28x faster on them than
    # on 12 heads of 64 at 32k tokens (docs/performance.md, GPU). ``auto`` attention is cuDNN
    # on a GPU and ``chunked`` (linear memory) elsewhere.
    c.dit.update(width=768, depth=12, num_heads=6, mlp_dim=3072, text_dim=512, remat="dots", scan_layers=True,
                 attention_impl="auto", dtype="bfloat16")
    c.schedule.update(shift=3.0)
    c.train.update(steps=100_000, checkpoint_every=2000, eval_every=2000, log_every=100)
    return c
