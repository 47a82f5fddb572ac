"""Wan2.1 T2V-1.3B: its DiT and VAE architectures (diffusers weights convert into them).

``arg``: ``host`` (default; one host, FSDP over its devices) or ``pod`` (multi-host:
FSDP within 16-device groups, data parallel across them). The text encoder is vdit's
byte encoder at Wan's text width (4096); umT5 plugs in through ``vdit.text.TextEncoder``.
"""

from vdit.configs._base import base_config


def get_config(arg=None):
    """Wan2.1-1.3B at 480p, 81 frames."""
    c = base_config()
    c.data.update(frames=81, resolution=480, batch_size=8)
    c.vae.update(dtype="bfloat16")
    c.text.update(max_length=512, width=4096, depth=2, num_heads=32, mlp_ratio=2.0, dtype="bfloat16")
    c.dit.update(width=1536, depth=30, num_heads=12, mlp_dim=8960, text_dim=4096, freq_dim=256, remat="dots",
                 scan_layers=True, attention_impl="auto", dtype="bfloat16")
    c.schedule.update(shift=5.0)
    c.optim.update(lr=1e-4, warmup_steps=1000)
    c.train.update(steps=100_000, checkpoint_every=1000, log_every=50)
    c.sample.update(steps=50, cfg=5.0)
    if (arg or "host") not in ("host", "pod"):
        raise ValueError(f"config argument {arg!r}: expected host (one host) or pod (multi-host)")
    if (arg or "host") == "pod":
        c.mesh.update(data=-1, fsdp=16)
    else:
        c.mesh.update(data=1, fsdp=-1)
    return c
