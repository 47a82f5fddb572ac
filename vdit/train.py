"""Train state, optimizer and the pure, sharded train steps of the VAE and the DiT.

Everything here is a pure function of arrays; ``vdit.loop`` drives it. A step is
``(state, batch, frozen) -> (state, metrics)``: ``frozen`` holds parameters that are
used but not trained (the VAE's, when the DiT trains on latents encoded on the fly).
RNG is explicit: each step draws from ``fold_in(state.key, state.step)``.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdit import schedule as sched
from vdit.dit import layers_stacked
from vdit.models import Models
from vdit.sharding import (
    activation_sharding, batch_sharding, collective_bytes, logical_to_sharding, replicated, unbox,
)
from vdit.vae import CausalVAE


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: step, params, optimizer, EMA, RNG."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    key: jax.Array


def learning_rate(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine decay to ``end_lr_factor * lr`` (or constant)."""
    warmup = max(int(optim.warmup_steps), 0)
    if optim.decay == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)],
                                    [warmup])
    if optim.decay != "cosine":
        raise ValueError(f"unknown optim.decay {optim.decay!r}; expected 'cosine' or 'constant'")
    return optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, max(warmup, 1), max(total_steps, warmup + 1), end_value=optim.lr * optim.end_lr_factor
    )


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, on_nonfinite: str = "abort"):
    """AdamW with global-norm clipping; weight decay on matrices only.

    ``on_nonfinite="skip"`` drops updates whose gradients are not finite
    (``optax.apply_if_finite``); ``grad_accum > 1`` accumulates micro-batches.
    """
    if on_nonfinite not in ("abort", "skip"):
        raise ValueError(f"unknown on_nonfinite {on_nonfinite!r}; expected 'abort' or 'skip'")
    # A matrix per block: a scanned DiT stacks its blocks' biases and norm scales into matrices.
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, p: p.ndim - layers_stacked(path) >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(learning_rate(optim, total_steps), b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                    mask=decay_mask),
    )
    if on_nonfinite == "skip":
        tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
    if optim.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(optim.grad_accum))
    return tx


def to_pixels(video: jax.Array) -> jax.Array:
    """uint8 frames -> float32 in [-1, 1]; float input passes through (as float32)."""
    if video.dtype == jnp.uint8:
        return video.astype(jnp.float32) / 127.5 - 1.0
    return video.astype(jnp.float32)


def _per_example_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


# ----------------------------------------------------------------------------- losses


def vae_loss(params, batch, key, frozen, *, vae: CausalVAE, kl_weight: float, recon: str = "l1",
             sample_posterior: bool = True):
    """Reconstruction (L1 or L2, per pixel) plus ``kl_weight`` x KL per latent element.

    ``sample_posterior=False`` decodes the posterior mean: with a small ``kl_weight`` the
    sampling noise mostly slows early training down, and the DiT trains on means anyway.
    """
    del frozen
    if recon not in ("l1", "l2"):
        raise ValueError(f"unknown vae_train.recon {recon!r}; expected 'l1' or 'l2'")
    video = to_pixels(batch["video"])
    out, posterior = vae.apply({"params": params}, video, key if sample_posterior else None)
    err = out - video
    rec = jnp.mean(jnp.abs(err)) if recon == "l1" else jnp.mean(jnp.square(err))
    kl = jnp.mean(posterior.kl()) / np.prod(posterior.mean.shape[1:])
    mse = jnp.mean(jnp.square(jnp.clip(out, -1, 1) - video))
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))  # peak-to-peak range 2 in [-1, 1]
    return rec + kl_weight * kl, {"recon": rec, "kl": kl, "psnr": psnr}


def encode_latents(vae: CausalVAE, vae_params, video: jax.Array) -> jax.Array:
    """Normalised posterior means of a video batch, without gradients (the VAE is frozen)."""
    posterior = vae.apply({"params": vae_params}, to_pixels(video), method=CausalVAE.encode)
    return jax.lax.stop_gradient(posterior.mean)


def dit_loss(params, batch, key, frozen, *, models: Models, train: ml_collections.ConfigDict,
             schedule_cfg: ml_collections.ConfigDict, uncond: tuple[np.ndarray, np.ndarray],
             t: jax.Array | None = None):
    """Flow-matching / diffusion loss of the DiT and the jointly trained text encoder.

    Captions are dropped to the empty (unconditional) prompt with probability
    ``train.text_dropout`` so the model learns both halves of classifier-free guidance.
    ``t`` fixes the timesteps (evaluation at fixed t); otherwise they are sampled.
    """
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    z = batch["latents"] if "latents" in batch else encode_latents(models.vae, frozen["vae"], batch["video"])
    b = z.shape[0]
    ids, mask = batch["text_ids"], batch["text_mask"]
    if train.text_dropout > 0 and t is None:
        drop = jax.random.bernoulli(k_drop, train.text_dropout, (b,))[:, None]
        ids = jnp.where(drop, jnp.asarray(uncond[0])[None], ids)
        mask = jnp.where(drop, jnp.asarray(uncond[1])[None], mask)
    emb = models.text.apply(params["text"], ids, mask)
    if t is None:
        t = sched.sample_t(k_t, b, distribution=schedule_cfg.t_sampling, mean=schedule_cfg.logit_mean,
                           std=schedule_cfg.logit_std, shift=models.schedule.shift)
    eps = jax.random.normal(k_eps, z.shape, jnp.float32)
    x_t = sched.add_noise(z, eps, t, models.schedule)
    pred = models.dit.apply({"params": params["dit"]}, x_t, t, emb, mask)
    per_example = _per_example_mean(jnp.square(pred - sched.loss_target(z, eps, t, models.schedule)))
    weight = sched.loss_weight(t, models.schedule, weighting=schedule_cfg.weighting)
    return jnp.mean(weight * per_example), {"mse": jnp.mean(per_example)}


# ----------------------------------------------------------------------------- state and step


def state_initializer(init_params: Callable[[jax.Array], Any], tx, *, ema: bool) -> Callable[[jax.Array], TrainState]:
    """``key -> TrainState`` with logically named (boxed) params: the fresh state of a phase."""

    def init(key):
        params = init_params(key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema=params if ema else None, key=key)

    return init


# An init is hundreds of small random-number fusions (one set per parameter) that runs once:
# on CPU, LLVM's optimiser takes most of its compile time. At -O0 the `tiny` VAE's init
# compiles in 2.9 s instead of 18.9 s and runs in 0.02 s instead of 0.01 s; the unoptimised
# code fills about 70M values a second, so past ~5e7 values it no longer pays.
INIT_CPU_OPTIONS = {"xla_backend_optimization_level": 0}
INIT_FAST_COMPILE_MAX_VALUES = 50_000_000


def init_state(init_params: Callable[[jax.Array], Any], tx, key: jax.Array, mesh, rules, *, ema: bool):
    """Builds the train state directly sharded on ``mesh``; returns ``(state, shardings)``.

    Parameters are initialised abstractly (``jax.eval_shape``) to read their logical
    axes, then materialised by a jitted init whose ``out_shardings`` place every
    shard on its device: no host ever holds the full state.
    """
    init = state_initializer(init_params, tx, ema=ema)
    with activation_sharding(mesh, rules):
        abstract = jax.eval_shape(init, key)
        shardings = logical_to_sharding(abstract, mesh, rules)
        lowered = jax.jit(init, out_shardings=shardings).lower(key)
    values = sum(x.size for x in jax.tree.leaves(abstract))
    options = xla_options(mesh, INIT_CPU_OPTIONS if values <= INIT_FAST_COMPILE_MAX_VALUES else None)
    state = compile_with_options(lowered, options)(key)
    return unbox(state), shardings


def abstract_state(init_params: Callable[[jax.Array], Any], tx, mesh, rules, *, ema: bool):
    """``ShapeDtypeStruct``s with shardings of a train state on ``mesh``: a checkpoint's restore target."""
    abstract = jax.eval_shape(state_initializer(init_params, tx, ema=ema), jax.random.PRNGKey(0))
    shardings = logical_to_sharding(abstract, mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), unbox(abstract), shardings)


def make_train_step(loss_fn: Callable, tx, lr_fn: optax.Schedule, *, ema_decay: float, grad_accum: int = 1):
    """The pure ``(state, batch, frozen) -> (state, metrics)`` update for ``loss_fn``.

    ``loss_fn(params, batch, key, frozen) -> (loss, aux metrics)``. Metrics include the
    loss, the gradient's global norm, the learning rate and whether the loss was finite.
    """

    def step(state: TrainState, batch, frozen):
        key = jax.random.fold_in(state.key, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key, frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            # Early on the average would be dominated by the random init: warm the decay up.
            n = state.step.astype(jnp.float32) + 1
            decay = jnp.minimum(ema_decay, (1 + n) / (10 + n))
            ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        metrics = dict(aux, loss=loss, grad_norm=optax.global_norm(grads), lr=lr_fn(state.step // grad_accum),
                       finite=jnp.isfinite(loss))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return step


def xla_options(mesh, cpu_options=None) -> dict[str, Any]:
    """The XLA compile options of a step on ``mesh``: ``cpu_options`` when its devices are CPUs, else none.

    ``cpu_options`` names ``DebugOptions`` fields (e.g. ``xla_cpu_experimental_ynn_fusion_type``),
    a mapping or a ``ConfigDict``; values are strings, numbers or booleans.
    """
    if not cpu_options or {d.platform for d in mesh.devices.flat} != {"cpu"}:
        return {}
    return dict(cpu_options.to_dict() if isinstance(cpu_options, ml_collections.ConfigDict) else cpu_options)


def compile_with_options(lowered, options: dict[str, Any] | None):
    """``lowered.compile(compiler_options=options)``; options this jaxlib does not know are
    dropped with a warning (they are tuning, never semantics), so a newer jax still runs."""
    if not options:
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=options)
    except Exception as e:  # jax raises JaxRuntimeError (INVALID_ARGUMENT) naming the option
        unknown = [k for k in options if k in str(e)]
        if not unknown:
            raise
        warnings.warn(f"XLA compile options {unknown} were rejected by this jaxlib ({str(e).splitlines()[0]}); "
                      f"compiling without them", RuntimeWarning, stacklevel=2)
        return compile_with_options(lowered, {k: v for k, v in options.items() if k not in unknown})


def jit_train_step(step_fn, mesh, rules, state_shardings, batch_spec: dict, frozen_shardings=None,
                   compiler_options: dict[str, Any] | None = None):
    """jits a train step with explicit in/out shardings and the state donated.

    ``batch_spec`` maps batch keys to their ranks; every batch array is split over
    ``data x fsdp`` on its leading axis. The returned callable compiles once per batch
    shape (a VAE that trains on short clips first has two) and runs inside
    ``activation_sharding`` so the models' activation constraints apply; its
    ``compile_seconds`` is the time spent compiling so far (``None`` before the first call),
    and ``compiled_stats`` what the latest compile's executable needs per device and step:
    ``temp_mib`` (XLA's temporary buffers) and ``collective_mib`` (bytes its collectives
    write; see ``vdit.sharding.collective_bytes``). ``compiler_options`` go to XLA with the
    compile (see ``xla_options``).
    """
    batch_shardings = {k: batch_sharding(mesh, ndim) for k, ndim in batch_spec.items()}
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings, frozen_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )

    compiled = {}

    def run(state, batch, frozen=None):
        shapes = tuple((k, v.shape) for k, v in sorted(batch.items()))
        with activation_sharding(mesh, rules):
            if shapes not in compiled:  # compile ahead of the first call of this shape, and time it
                start = time.perf_counter()
                compiled[shapes] = compile_with_options(jitted.lower(state, batch, frozen), compiler_options)
                run.compile_seconds = (run.compile_seconds or 0.0) + time.perf_counter() - start
                run.compiled_stats = _executable_stats(compiled[shapes])
            return compiled[shapes](state, batch, frozen)

    run.compile_seconds = None
    run.compiled_stats = {}
    run.jitted = jitted
    return run


def _executable_stats(compiled) -> dict[str, float]:
    """Per-device temp memory and collective traffic of one step, in MiB (what the backend reports)."""
    stats = {}
    memory = compiled.memory_analysis()  # None where a backend does not report it
    if memory is not None:
        stats["temp_mib"] = memory.temp_size_in_bytes / 2**20
    stats["collective_mib"] = sum(collective_bytes(compiled.as_text()).values()) / 2**20
    return stats


def model_flops_per_example(models: Models, latent_shape: tuple[int, ...], text_len: int) -> float:
    """Analytic forward FLOPs of the DiT for one example: the formula of ``vdit.bench.flops``.

    Matmuls incl. attention per token; timestep/adaLN MLPs once per example, not per token.
    """
    from vdit.bench.flops import dit_forward_flops

    return float(sum(dit_forward_flops(models.dit, latent_shape, text_len).values()))


@functools.cache
def uncond_tokens(max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask of the empty prompt (the unconditional prompt of CFG)."""
    from vdit.text import ByteTokenizer

    ids, mask = ByteTokenizer(max_length)([""])
    return ids[0], mask[0]


def init_vae_params(models: Models, config: ml_collections.ConfigDict | None = None) -> Callable[[jax.Array], Any]:
    """``key -> boxed VAE params`` (parameter shapes do not depend on the clip size)."""
    del config
    s = models.vae.spatial_factor
    video = jnp.zeros((1, 1 + models.vae.temporal_factor, 2 * s, 2 * s, models.vae.in_channels))
    return lambda key: models.vae.init(key, video)["params"]


def init_dit_params(models: Models, config: ml_collections.ConfigDict | None = None) -> Callable[[jax.Array], Any]:
    """``key -> {"dit": boxed params, "text": boxed params}``: what the DiT phase trains."""
    del config
    pt, ph, pw = models.dit.patch_size
    length = models.text.max_length
    latents = jnp.zeros((1, pt, ph, pw, models.dit.in_channels))
    emb, mask = jnp.zeros((1, length, models.dit.text_dim)), jnp.ones((1, length), bool)

    def init(key):
        k_dit, k_text = jax.random.split(key)
        return {"dit": models.dit.init(k_dit, latents, jnp.zeros((1,)), emb, mask)["params"],
                "text": models.text.init(k_text)}

    return init
