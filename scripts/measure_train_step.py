"""Compile time, steps/s and model TFLOP/s of one config's DiT train step on this machine.

    python scripts/measure_train_step.py --config small --batch 2 --steps 3

Random latents and tokens stand in for data (the step's cost does not depend on them);
the full vdit train step runs: text encoder + DiT forward/backward, AdamW, EMA.
TFLOP/s uses the analytic count of ``vdit.train.model_flops_per_example`` (x3 for training).
"""

import argparse
import functools
import time

import jax
import numpy as np

from vdit import train as T
from vdit.config import load_config, override
from vdit.models import build_models
from vdit.sharding import make_mesh, rules_from_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = override(load_config(args.config), args.overrides)
    models = build_models(config)
    res = config.data.resolution
    shape = models.vae.latent_shape((1, config.data.frames, res, res, 3))[1:]
    length = models.text.max_length
    rng = np.random.default_rng(0)
    batch = {"latents": rng.normal(size=(args.batch, *shape)).astype(np.float32),
             "text_ids": rng.integers(4, 200, (args.batch, length)).astype(np.int32),
             "text_mask": np.ones((args.batch, length), bool)}
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    rules = rules_from_config(config.sharding_rules)
    tx = T.make_optimizer(config.optim, 100)
    state, shardings = T.init_state(T.init_dit_params(models), tx, jax.random.PRNGKey(0), mesh, rules, ema=True)
    loss = functools.partial(T.dit_loss, models=models, train=config.train, schedule_cfg=config.schedule,
                             uncond=T.uncond_tokens(length))
    step = T.jit_train_step(T.make_train_step(loss, tx, T.learning_rate(config.optim, 100), ema_decay=0.99), mesh,
                            rules, shardings, {k: v.ndim for k, v in batch.items()})
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - start) / args.steps
    flops = 3 * args.batch * T.model_flops_per_example(models, shape, length)
    print(f"{args.config}: latents {shape}, batch {args.batch}, {jax.devices()[0].device_kind}: "
          f"compile {step.compile_seconds:.1f} s, {1 / dt:.3f} steps/s, {flops / dt / 1e12:.4f} model TFLOP/s")


if __name__ == "__main__":
    main()
