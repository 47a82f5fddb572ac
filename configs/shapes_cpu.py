"""shapes_cpu: the `vdit demo` models for moving_shapes (17 frames at 32x32) on a 2-core CPU."""

from vdit.configs._base import base_config


def get_config(arg=None):
    """Demo-sized VAE (4x temporal, 4x spatial, 16 channels), text encoder and DiT.

    Sized by measurement on a 2-core CPU (the issue notes hold the sweeps): the VAE
    without residual blocks learns faster per second than deeper ones, trained as a
    plain L2 autoencoder on 16x16 windows of 17-frame clips; the DiT's blocks are unrolled,
    keeping every activation for the backward pass (docs/performance.md, remat).
    """
    if arg is not None:
        raise ValueError(f"shapes_cpu:{arg}: shapes_cpu takes no argument (use shapes_cpu, and key=value overrides)")
    c = base_config()
    # Two XLA devices, one per core of the 2-core CPU this demo is sized for, each with half
    # the batch. With the vdit command's huge-page malloc (and, in those f32 runs, remat
    # "dots"), the DiT trained at 1.23x and the VAE at 1.11x the steps/s of one device,
    # "full" remat and 4 KiB pages (docs/performance.md).
    c.cpu_devices = 2
    # The DiT trains on 32 clips a step (the VAE has its own batch). At 16 clips a step it
    # learned direction in some runs only (31% to 100% on train prompts with the same seed);
    # at 32 in every run so far, over four seeds and two VAEs (README, Results).
    c.data.update(frames=17, resolution=32, batch_size=32)
    c.vae.update(base_dim=16, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=0, temporal_downsample=(True, True),
                 mid_attention=False, latents_mean=None, latents_std=None)
    # One token per word: with byte tokens the demo's DiT mixed up directions (69%; all
    # three 44% train, 31% heldout); with words 100% (67%, 59%). Same machine, VAE and
    # DiT; README, Results.
    c.text.update(tokenizer="words", max_length=40, width=128, depth=2, num_heads=4, mlp_ratio=2.0)
    # remat "none": with unrolled blocks, no recomputation at all was the fastest where measured.
    # On a 2-core AMD EPYC (2026-12-06) the bench step took 0.307 s against 0.351 s ("dots") and 0.377 s
    # ("full"), with 422 MiB of temp buffers against 216 and 135 (`vdit bench train --config
    # shapes_cpu --remat none,dots,full --no_xcheck`, its first run; later ones spread, see the docs),
    # and `vdit train` ran 2.78-2.85 DiT steps/s against 2.09-2.35 in three alternated pairs
    # (docs/performance.md, "remat in the demo").
    # The demo used "full" until then, chosen on a Xeon while the blocks were scanned (0.336 s
    # against 0.530 s "none"); unrolled "none" was not timed on a Xeon.
    # Matmul operands in bf16, everything else in f32: XLA:CPU runs bf16 x bf16 -> f32
    # matmuls on the CPU's AMX units, 1.39-1.43x the DiT steps/s of f32 (docs/performance.md).
    # Color and shape were learned as in f32; at 16 clips a step direction varied between
    # runs in both (README).
    # Unrolled blocks: since unrolled remat really recomputes in order (438c9b3), 4.50-4.61
    # DiT steps/s against 3.67-3.78 scanned (`vdit train` A/B on a finished demo workdir,
    # 2026-12-06). A workdir trained scanned (before 2026-12-06) resumes with
    # dit.scan_layers=true.
    c.dit.update(in_channels=16, width=192, depth=6, num_heads=6, mlp_dim=768, text_dim=128, freq_dim=128,
                 scan_layers=False, remat="none", dtype="bfloat16", activation_dtype="float32")
    # 1,300 DiT steps, paid for by the VAE's short clips (below). On the short-clip VAE, 1,000
    # steps lost shape and direction (train 87.5% / 81.2%, heldout all three 50%), 1,300 drew
    # every train video right and 96.9% of heldout ones (2-core EPYC, 2026-12-07). On the
    # earlier VAE, 1,000 steps left shape the thinnest margin (89.6-100%), and 1,500 drew every
    # attribute right in four of four runs (README, Results).
    c.train.update(steps=1300, ema_decay=0.995, latents="cached", log_every=50, eval_every=500, checkpoint_every=500)
    c.optim.update(lr=2e-3, warmup_steps=50)
    # Training times drawn around t = 0.73 (logit-normal, mean 1) rather than 0.5: motion is
    # decided at high noise. With mean 0 the demo's objects stayed in place (direction 33%,
    # against 58% with mean 1; README, Results).
    c.schedule.update(logit_mean=1.0)
    # The VAE trains on random 16x16 windows of 16 clips a step, 1,600 steps: validation PSNR
    # (64 whole 32x32 clips, as eval.json measures it) 32.1 dB, against 31.2 dB for 1,200 steps
    # of 8 whole clips; a step costs half as much, so the phase takes two thirds of the time.
    # 1,200 steps of crops gave 30.2 dB; a higher lr (4e-3) and a wider decoder did worse
    # (README, Results).
    # The first 1,300 of those steps train on 5-frame windows, which run 3x the steps/s of
    # 17-frame clips; the last 300 on whole 17-frame clips. On a 2-core EPYC (2026-12-07) the
    # phase took 185 s to 32.7 dB, against 376 s to 32.1 dB on 17 frames throughout; 800 and
    # 1,100 short steps gave 32.8 dB. Its latents need more DiT steps (above); the time saved
    # here pays for them (README, Results).
    c.vae_train.update(steps=1600, batch_size=16, crop=16, frames=0, short_frames=5, short_steps=1300, recon="l2",
                       sample_posterior=False, log_every=50, checkpoint_every=400)
    c.vae_optim.update(lr=2e-3, warmup_steps=20)
    c.sample.update(sampler="unipc", steps=20, cfg=4.0)
    return c
