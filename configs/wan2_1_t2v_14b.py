"""Wan2.1 T2V-14B: the 1.3B config (``wan2_1_t2v_1_3b``) with the 14B DiT, at 720p.

``arg``: ``host`` (default; FSDP over one host's devices) or ``pod`` (multi-host: FSDP
within 32-device groups, data parallel across them).
"""

from vdit.configs import wan2_1_t2v_1_3b


def get_config(arg=None):
    """Wan2.1-14B at 720p, 81 frames."""
    c = wan2_1_t2v_1_3b.get_config(arg)
    c.data.update(resolution=720)
    c.dit.update(width=5120, depth=40, num_heads=40, mlp_dim=13824)
    if (arg or "host") == "pod":
        c.mesh.update(data=-1, fsdp=32, tensor=1)
    return c
