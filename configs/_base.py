"""Fields every vdit config has; each config file fills in sizes.

Sections: ``mesh`` and ``sharding_rules`` (where arrays live), ``data``, the three
models ``vae``/``text``/``dit`` (their fields are constructor arguments), ``schedule``,
``optim`` and ``train`` for the DiT phase, ``vae_optim`` and ``vae_train`` for the VAE
phase, and ``sample``.
"""

import ml_collections

from vdit.sharding import DEFAULT_RULES

# Published per-channel statistics of Wan2.1's VAE latents.
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916)


def base_config() -> ml_collections.ConfigDict:
    """The shared skeleton with CPU-friendly defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # cpu_devices: XLA devices to split a CPU host into when vdit starts JAX (0: JAX's default,
    # one device driving every core); the ``data`` axis then spreads the batch over them.
    # Ignored where JAX_NUM_CPU_DEVICES is set and on a JAX that already started.
    c.cpu_devices = 0
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
    c.sharding_rules = ml_collections.ConfigDict(dict(DEFAULT_RULES))

    c.data = ml_collections.ConfigDict(dict(
        name="moving_shapes", data_dir="", frames=17, resolution=32, batch_size=16, worker_count=0, shuffle_seed=0,
    ))
    c.vae = ml_collections.ConfigDict(dict(
        base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, temporal_downsample=(False, True, True),
        mid_attention=True, latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD, dtype="float32",
    ))
    c.text = ml_collections.ConfigDict(dict(
        tokenizer="bytes", vocab_size=None, max_length=64, width=256, depth=4, num_heads=4, mlp_ratio=4.0,
        dtype="float32",
    ))
    c.dit = ml_collections.ConfigDict(dict(
        in_channels=16, patch_size=(1, 2, 2), width=384, depth=6, num_heads=6, mlp_dim=1536, text_dim=256,
        freq_dim=256, qk_norm=True, cross_attn_norm=True, pooled_text=False, attention_impl="xla", remat="none",
        scan_layers=False,
        dtype="float32", activation_dtype=None,
    ))
    c.schedule = ml_collections.ConfigDict(dict(
        kind="flow", prediction="velocity", shift=1.0, t_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
        weighting="uniform",
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-4, warmup_steps=100, decay="cosine", end_lr_factor=0.1, b1=0.9, b2=0.99, weight_decay=0.01,
        clip_norm=1.0, grad_accum=1,
    ))
    # latent_stats_clips: when vae.latents_mean/std are None, the DiT phase first measures
    # per-channel statistics of this many training clips' latents and normalises with them.
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, text_dropout=0.1, ema_decay=0.999, latents="online", latent_stats_clips=1024, log_every=50,
        eval_every=500, checkpoint_every=500, keep_checkpoints=3, on_nonfinite="abort",
    ))
    c.vae_optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=100, decay="cosine", end_lr_factor=0.1, b1=0.9, b2=0.99, weight_decay=0.0,
        clip_norm=1.0, grad_accum=1,
    ))
    # frames: clip length the VAE trains on (random crops; 0 = the data's); crop: frame size it
    # trains on (random square windows, a multiple of the spatial factor; 0 = whole frames). The
    # VAE is convolutional (its attention is per frame), so it still encodes and decodes whole
    # frames. sample_posterior: decode a posterior sample (True) or its mean (False, a plain
    # autoencoder with KL).
    # short_frames, short_steps: the first short_steps steps train on random windows of
    # short_frames frames (1 + 4k), the rest on `frames`. Most of what the VAE learns is per
    # frame, and a short clip costs a fraction of a long one (a 5-frame step of shapes_cpu's VAE
    # takes a third of the time of a 17-frame one); the temporal layers finish on full-length
    # clips. 0 steps: off.
    # xla_cpu_options: XLA compile options of the step on CPU devices (ignored on GPU/TPU).
    # By default XLA:CPU hands convolutions to YNNPACK, whose weight gradients of the VAE's
    # narrow convs are slower than XLA's own kernels; keeping YNNPACK for reductions only
    # runs the shapes_cpu VAE at 1.28x the steps per second (README, Results). Set the value
    # to "" for XLA's own kernels throughout.
    cpu_convs_off_ynnpack = dict(xla_cpu_experimental_ynn_fusion_type="LIBRARY_FUSION_TYPE_REDUCE")
    c.vae_train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=0, frames=0, crop=0, short_frames=0, short_steps=0, kl_weight=1e-6, recon="l1",
        sample_posterior=True, log_every=50,
        checkpoint_every=500, keep_checkpoints=3, on_nonfinite="abort",
        xla_cpu_options=ml_collections.ConfigDict(cpu_convs_off_ynnpack),
    ))
    # eta: DDIM stochasticity in [0, 1] (sampler "ddim" on a VP schedule; 0 is deterministic).
    c.sample = ml_collections.ConfigDict(dict(sampler="unipc", steps=30, cfg=5.0, negative_prompt="", seed=0, eta=0.0))
    return c
