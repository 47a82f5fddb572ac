"""The training loop: VAE phase and DiT phase, resumable, on any mesh.

A workdir holds one run: ``W/vae/`` and ``W/dit/`` each with ``checkpoints/``,
``metrics.jsonl`` and ``tensorboard/``. ``train(config, W, "vae")`` then
``train(config, W, "dit")``; the DiT phase encodes its training clips with the VAE of
``W/vae`` (on the fly, or cached once to ``W/latents`` when
``train.latents="cached"``). Running either again resumes from its latest checkpoint.
``W/dit/vae_step.json`` records the VAE step the DiT was trained on: a DiT whose VAE was
trained on afterwards is refused (``VaeChangedError``) rather than sampled with other latents.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import pathlib
import shlex
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from vdit import train as T
from vdit.checkpoint import Checkpointer
from vdit.checks import check_config, check_dataset, check_eval_split, check_models
from vdit.data.pipeline import make_loader, open_dataset, to_global
from vdit.dit import relayout
from vdit.metrics import MetricsWriter
from vdit.mismatch import config_json, explain_mismatch
from vdit.models import Models, build_models
from vdit.preemption import PreemptionGuard
from vdit.sharding import make_mesh, request_cpu_devices, rules_from_config

log = logging.getLogger("vdit")
PHASES = ("vae", "dit")
EVAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
VAE_RECORD = "vae_step.json"  # in W/dit: {"vae_step": N}, the VAE checkpoint the DiT's latents came from


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and ``on_nonfinite="abort"``."""


class VaeChangedError(ValueError):
    """A workdir's VAE was trained on after its DiT was trained on the older VAE's latents."""


@dataclasses.dataclass
class Run:
    """The pieces of one phase, built once: models, mesh, state, step function, data."""

    config: ml_collections.ConfigDict
    phase: str
    models: Models
    mesh: Any
    rules: Any
    state: T.TrainState
    shardings: Any
    step_fn: Any
    frozen: Any
    loader: Any
    iterator: Any
    loss_fn: Any
    global_batch: int
    batch_keys: tuple[str, ...]
    eval_frozen: Any  # what evaluation on raw validation clips needs (the VAE, also with cached latents)
    vae_step: int | None = None  # DiT phase: the VAE checkpoint step its latents come from
    loader_args: dict = dataclasses.field(default_factory=dict)  # make_loader's, for serve_frames

    def serve_frames(self, frames: int) -> None:
        """Serves clips of ``frames`` frames from here on, continuing the same batch order."""
        loader = make_loader(**{**self.loader_args, "frames": frames})
        iterator = iter(loader)
        iterator.set_state(self.iterator.get_state())
        self.loader, self.iterator = loader, iterator


def phase_sections(config: ml_collections.ConfigDict, phase: str):
    """``(optim, train)`` config sections of a phase."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    return (config.vae_optim, config.vae_train) if phase == "vae" else (config.optim, config.train)


def train_command(workdir, phase: str) -> str:
    """The ``vdit train`` command that trains ``phase`` in ``workdir``, for hints.

    Its config is the one the workdir's first phase recorded (``W/vae/config.json``), or,
    before anything was trained there, the placeholder ``CONFIG``.
    """
    w = pathlib.Path(workdir)
    recorded = next((p for p in (w / "vae" / "config.json", w / "dit" / "config.json") if p.exists()), None)
    config = shlex.quote(str(recorded)) if recorded else "CONFIG"
    return f"vdit train --config {config} --workdir {shlex.quote(str(workdir))} --phase {phase}"


def load_params(workdir: str | pathlib.Path, phase: str, config: ml_collections.ConfigDict, models: Models,
                mesh, rules, *, ema: bool = True) -> Any:
    """Trained parameters of a phase from its latest checkpoint (EMA weights when kept).

    Raises ``VaeChangedError`` for a DiT whose VAE was trained on after it.
    """
    if phase == "dit":
        _check_vae_step(workdir, _phase_step(workdir, "vae"))
    return _restore_params(workdir, phase, config, models, mesh, rules, ema=ema)[1]


def _restore_params(workdir, phase: str, config, models: Models, mesh, rules, *, ema: bool = True) -> tuple[int, Any]:
    """``(step, params)`` of the latest readable checkpoint of a phase."""
    directory = pathlib.Path(workdir) / phase / "checkpoints"
    optim, train_cfg = phase_sections(config, phase)
    init = T.init_vae_params(models) if phase == "vae" else T.init_dit_params(models)
    tx = T.make_optimizer(optim, train_cfg.steps, train_cfg.on_nonfinite)
    keep_ema = phase == "dit" and train_cfg.ema_decay > 0
    # A reader creates nothing: Checkpointer would make a missing folder (a mistyped workdir) first.
    with Checkpointer(directory) if directory.is_dir() else contextlib.nullcontext() as ckpt:
        if ckpt is None or ckpt.latest_step() is None:
            command = train_command(workdir, phase)
            placeholder = (" (CONFIG: the config name or .py file of this workdir's runs, followed by the same "
                           "KEY=VALUE overrides)" if "CONFIG" in command.split() else "")
            raise FileNotFoundError(f"no {phase} checkpoint in {directory}; train it first with `{command}`"
                                    f"{placeholder}")
        target = T.abstract_state(init, tx, mesh, rules, ema=keep_ema)
        with explain_mismatch(pathlib.Path(workdir) / phase, config, phase):
            # One copy of the weights is read, not the optimizer's moments or the other copy.
            use_ema = ema and keep_ema
            step, state, _ = ckpt.restore(target, relayout=_RELAYOUT[phase],
                                          skip=("opt_state", "params") if use_ema else ("opt_state", "ema"))
    return step, (state.ema if use_ema else state.params)


def _recorded_vae_step(workdir) -> int | None:
    """The VAE step the workdir's DiT was trained on; None for a DiT saved before vdit recorded it."""
    path = pathlib.Path(workdir) / "dit" / VAE_RECORD
    try:
        return int(json.loads(path.read_text())["vae_step"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}); it should hold "
                         f'{{"vae_step": N}}, the VAE step the DiT was trained on') from None


def _check_vae_step(workdir, vae_step: int | None) -> None:
    """Raises ``VaeChangedError`` when the DiT was trained on another VAE step than ``vae_step``."""
    trained = _recorded_vae_step(workdir)
    if trained is None or vae_step is None or trained == vae_step:
        return
    w = pathlib.Path(workdir)
    raise VaeChangedError(
        f"the DiT in {w / 'dit'} was trained on the latents of VAE step {trained}, but the VAE in "
        f"{w / 'vae' / 'checkpoints'} is at step {vae_step}: it would decode latents the DiT never learned. "
        f"Train a DiT for this VAE in a new --workdir holding a copy of {w / 'vae'}, or move VAE checkpoints "
        f"newer than step {trained} out of {w / 'vae' / 'checkpoints'} to use the DiT as trained")


def build_run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, phase: str, *,
              mesh=None, devices=None, progress: bool = True) -> Run:
    """Builds everything a phase needs (fresh state; ``train`` restores on top); ``progress`` shows
    the bars of the one-off latent statistics and latent cache passes."""
    optim, train_cfg = phase_sections(config, phase)
    check_config(config)
    # Opened first: a dataset that does not fit the config fails before any model is built or restored.
    dataset = open_dataset(config.data.name, config.data.data_dir or None, "train", frames=config.data.frames,
                           resolution=config.data.resolution)
    check_dataset(config, dataset, phase)
    models = build_models(config)
    check_models(config, models)
    if mesh is None and devices is None:
        request_cpu_devices(int(config.get("cpu_devices", 0)))
    mesh = mesh or make_mesh(dict(config.mesh), devices)
    rules = rules_from_config(config.sharding_rules)
    global_batch, batch_key = int(config.data.batch_size), "data.batch_size"
    if phase == "vae" and config.vae_train.get("batch_size"):
        # the VAE often needs a smaller batch than the DiT
        global_batch, batch_key = int(config.vae_train.batch_size), "vae_train.batch_size"
    divisor = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % divisor or global_batch % jax.process_count():
        raise ValueError(f"{batch_key}={global_batch} must be divisible by the batch mesh axes data x fsdp = "
                         f"{divisor} and by the process count {jax.process_count()}")

    tx = T.make_optimizer(optim, train_cfg.steps, train_cfg.on_nonfinite)
    lr_fn = T.learning_rate(optim, train_cfg.steps)
    key = jax.random.PRNGKey(config.seed)
    frozen = None
    vae_step = None
    frames = config.data.frames
    crop = None
    if phase == "vae":
        init = T.init_vae_params(models)
        loss_fn = functools.partial(T.vae_loss, vae=models.vae, kl_weight=train_cfg.kl_weight, recon=train_cfg.recon,
                                    sample_posterior=train_cfg.get("sample_posterior", True))
        frames = train_cfg.get("frames") or frames  # random crops: cheaper steps, same per-frame network
        crop = int(train_cfg.get("crop") or 0) or None  # random windows of the frames, likewise
        sf = models.vae.spatial_factor
        if crop is not None and (crop < 0 or crop % sf):
            raise ValueError(f"vae_train.crop={crop}: expected 0 (whole frames) or a positive multiple of the "
                             f"VAE's spatial factor {sf}")
        ema = False
    else:
        init = T.init_dit_params(models)
        loss_fn = functools.partial(T.dit_loss, models=models, train=train_cfg, schedule_cfg=config.schedule,
                                    uncond=T.uncond_tokens(models.text.max_length))
        ema = train_cfg.ema_decay > 0
        if train_cfg.eval_every:
            check_eval_split(config, global_batch)
        vae_step, vae_params = _restore_params(workdir, "vae", config, models, mesh, rules)
        frozen = {"vae": vae_params}
        if _phase_step(workdir, "dit") is not None:  # a resume: before latent statistics or a cache are redone
            _check_vae_step(workdir, vae_step)
    state, shardings = T.init_state(init, tx, key, mesh, rules, ema=ema)

    if phase == "dit" and config.vae.latents_mean is None and config.vae.latents_std is None:
        config = with_latent_stats(config, workdir, dataset, models, frozen["vae"], mesh, global_batch,
                                   progress=progress, vae_step=vae_step)
        models = build_models(config)
        loss_fn = functools.partial(loss_fn, models=models)
    batch_keys = ("video", "text_ids", "text_mask")
    if phase == "dit" and train_cfg.latents == "cached":
        from vdit.latents import build_latent_cache
        from vdit.text import tokenizer_id

        # vae_step: latents of an older VAE must not be reused (a cache without it predates the record).
        meta = {"dataset": config.data.name, "tokenizer": tokenizer_id(models.text.tokenizer), "vae_step": vae_step}
        dataset = build_latent_cache(pathlib.Path(workdir) / "latents", dataset, models=models,
                                     vae_params=frozen["vae"], mesh=mesh, batch_size=global_batch,
                                     frames=config.data.frames, meta=meta, progress=progress)
        batch_keys = ("latents", "text_ids", "text_mask")
    eval_frozen = frozen
    if batch_keys[0] == "latents":
        frozen = None
    frozen_shardings = None if frozen is None else jax.tree.map(lambda a: a.sharding, frozen)
    loader_args = dict(
        dataset=dataset, batch_size=global_batch // jax.process_count(), seed=config.data.shuffle_seed,
        frames=frames, crop=crop, crop_multiple=models.vae.spatial_factor,
        tokenizer=models.text.tokenizer, max_text_length=models.text.max_length,
        worker_count=config.data.worker_count,
    )
    loader = make_loader(**loader_args)
    iterator = iter(loader)
    step = T.make_train_step(loss_fn, tx, lr_fn, ema_decay=train_cfg.get("ema_decay", 0.0),
                             grad_accum=optim.grad_accum)
    batch_spec = {k: 5 if k in ("video", "latents") else 2 for k in batch_keys}
    step_fn = T.jit_train_step(step, mesh, rules, shardings, batch_spec, frozen_shardings,
                               compiler_options=T.xla_options(mesh, train_cfg.get("xla_cpu_options")))
    return Run(config, phase, models, mesh, rules, state, shardings, step_fn, frozen, loader, iterator, loss_fn,
               global_batch, batch_keys, eval_frozen, vae_step, loader_args)


def _phase_step(workdir, phase: str) -> int | None:
    """The newest checkpoint step of a phase, or None (creating nothing)."""
    directory = pathlib.Path(workdir) / phase / "checkpoints"
    if not directory.is_dir():
        return None
    with Checkpointer(directory) as ckpt:
        return ckpt.latest_step()


def with_latent_stats(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, dataset, models: Models,
                      vae_params, mesh, batch_size: int, progress: bool = True,
                      vae_step: int | None = None) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``vae.latents_mean``/``latents_std`` are the trained VAE's measured statistics.

    Measured once over ``train.latent_stats_clips`` training clips and kept in
    ``W/vae/latent_stats.json``, so a resumed or repeated DiT phase (and sampling, which
    reads the DiT's saved config) normalises latents exactly the same way. The file
    records ``vae_step``; statistics of another VAE step are measured again.
    """
    from vdit.latents import measure_latent_stats

    path = pathlib.Path(workdir) / "vae" / "latent_stats.json"
    stats = json.loads(path.read_text()) if path.exists() else None
    if stats is not None and vae_step is not None and stats.get("vae_step", vae_step) != vae_step:
        # Files without vae_step predate the record and are kept as they are.
        log.warning("%s holds statistics of VAE step %s; the VAE is at step %d: measuring them again",
                    path, stats["vae_step"], vae_step)
        stats = None
    if stats is None:
        mean, std = measure_latent_stats(dataset, models=models, vae_params=vae_params, mesh=mesh,
                                         batch_size=batch_size, frames=config.data.frames,
                                         num_clips=int(config.train.get("latent_stats_clips", 1024)), progress=progress)
        stats = {"latents_mean": mean.tolist(), "latents_std": std.tolist()}
        if vae_step is not None:
            stats["vae_step"] = int(vae_step)
        if jax.process_index() == 0:
            tmp = path.with_suffix(".json.partial")
            tmp.write_text(json.dumps(stats, indent=1))
            tmp.rename(path)
    config = ml_collections.ConfigDict(config.to_dict())  # a copy: the caller's config is left alone
    config.vae.latents_mean = tuple(stats["latents_mean"])
    config.vae.latents_std = tuple(stats["latents_std"])
    config.lock()
    log.info("latents normalised with measured statistics from %s", path)
    return config


_TRAIN_SECTION = {"vae": "vae_train", "dit": "train"}
# A DiT checkpoint restores into either layer layout (scanned or unrolled blocks).
_RELAYOUT = {"vae": None, "dit": relayout}
def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, phase: str = "dit", *,
          mesh=None, devices=None, stop_after: int | None = None, progress: bool = True) -> dict:
    """Trains a phase to ``train.steps`` (resuming from the latest checkpoint); returns a summary.

    ``stop_after`` ends the call after that many steps *of this call* (with a checkpoint),
    as a preemption would: tests use it to interrupt and resume.
    """
    workdir = pathlib.Path(workdir).absolute()
    _, train_cfg = phase_sections(config, phase)
    run = build_run(config, workdir, phase, mesh=mesh, devices=devices, progress=progress)
    config = run.config  # with measured latent statistics, when the DiT phase measured them
    phase_dir = workdir / phase
    total = int(train_cfg.steps)
    # The VAE step a trained DiT was trained on stays, whatever keep_checkpoints says: training
    # the VAE on must not leave that DiT without the only VAE that decodes its latents.
    has_dit = phase == "vae" and _phase_step(workdir, "dit") is not None
    dit_vae_step = _recorded_vae_step(workdir) if has_dit else None
    ckpt = Checkpointer(phase_dir / "checkpoints", keep=train_cfg.keep_checkpoints,
                        save_every=train_cfg.checkpoint_every, pinned=[] if dit_vae_step is None else [dit_vae_step])
    start = 0
    if ckpt.latest_step() is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), run.state, run.shardings)
        with explain_mismatch(phase_dir, config, phase):
            start, run.state, _ = ckpt.restore(target, data_iterator=run.iterator, relayout=_RELAYOUT[phase])
        log.info("resumed %s from step %d", phase, start)
        if start > total:
            log.warning("%s is at step %d, past %s.steps=%d: nothing to train (set %s.steps above %d to train on)",
                        phase_dir / "checkpoints", start, _TRAIN_SECTION[phase], total, _TRAIN_SECTION[phase], start)
    elif jax.process_index() == 0:
        phase_dir.mkdir(parents=True, exist_ok=True)
        (phase_dir / "config.json").write_text(json.dumps(config_json(config), indent=2))
        if phase == "dit":
            tmp = phase_dir / (VAE_RECORD + ".partial")
            tmp.write_text(json.dumps({"vae_step": run.vae_step}))
            tmp.rename(phase_dir / VAE_RECORD)
    if has_dit and start < total:
        trained, kept = "an earlier VAE", ""
        if dit_vae_step is not None:
            trained = f"VAE step {dit_vae_step}"
            kept = (f"; {trained} is kept, so moving the newer ones out of {phase_dir / 'checkpoints'} restores "
                    f"that DiT")
        log.warning("training the VAE on from step %d, but %s was trained on the latents of %s: that DiT does "
                    "not fit the new VAE (vdit sample and the DiT phase refuse it); train a DiT for it in a new "
                    "--workdir%s",
                    start, workdir / "dit", trained, kept)

    # The VAE's first short_steps steps train on short clips (vae_train.short_frames): a resume
    # inside them serves short clips again, from where the saved batch order stands.
    short_steps = int(train_cfg.get("short_steps", 0)) if phase == "vae" else 0
    full_frames = run.loader_args.get("frames")
    if start < short_steps:
        run.serve_frames(int(train_cfg.short_frames))

    writer = MetricsWriter(phase_dir)
    flops = _flops_per_step(run, config) if phase == "dit" else None
    pending: list[tuple[int, dict]] = []
    last_saved = ckpt.latest_step()
    # Named by its clips while they are short: its rate falls, and its ETA grows, when they lengthen.
    desc = f"train {phase}" + (f" ({train_cfg.short_frames}-frame clips)" if start < short_steps else "")
    bar = tqdm(total=total, initial=start, desc=desc, disable=not progress or jax.process_index() != 0,
               dynamic_ncols=True)
    t_last, steps_since = time.perf_counter(), 0
    status = "done"
    compile_logged = None
    with PreemptionGuard() as guard:
        step = start
        while step < total:
            if step == short_steps and start < short_steps:
                run.serve_frames(full_frames)  # and the step compiles for the longer clips
                bar.set_description(f"train {phase}")
            batch = to_global(next(run.iterator), run.mesh, normalize=False)
            batch = {k: batch[k] for k in run.batch_keys}
            run.state, metrics = run.step_fn(run.state, batch, run.frozen)
            step += 1
            steps_since += 1
            pending.append((step, metrics))
            if step in (start + 1, short_steps + 1):  # the clock restarts after a compilation and its step
                jax.block_until_ready(metrics)
                t_last, steps_since = time.perf_counter(), 0
            bar.update(1)
            boundary = step % train_cfg.log_every == 0 or step == total
            stop = ckpt.should_stop(step, guard) or (stop_after is not None and step - start >= stop_after)
            save = ckpt.should_save(step) or step == total or stop
            if boundary or save:
                # One host sync per interval: fetch the interval's metrics, check them, log them.
                rows = jax.device_get(pending)
                pending.clear()
                bad = next((s for s, m in rows if not bool(m["finite"])), None)
                if bad is not None and train_cfg.on_nonfinite == "abort":
                    ckpt.wait()
                    where = f"step {last_saved} in {ckpt.directory}" if last_saved else "none saved yet"
                    raise NonFiniteLossError(f"{phase} loss is not finite at step {bad}; last good checkpoint: {where}")
                dt = time.perf_counter() - t_last
                mean = {k: float(np.mean([m[k] for _, m in rows])) for k in rows[-1][1] if k != "finite"}
                if steps_since:
                    mean.update(steps_per_s=steps_since / dt, examples_per_s=steps_since * run.global_batch / dt)
                    if flops:
                        mean["model_tflops_per_s"] = flops * steps_since / dt / 1e12
                if run.step_fn.compile_seconds != compile_logged:  # total so far, logged after each compile
                    mean["compile_s"] = compile_logged = run.step_fn.compile_seconds
                    mean.update({f"step_{k}": v for k, v in run.step_fn.compiled_stats.items()})
                if boundary:
                    writer.write(step, mean)
                    bar.set_postfix(loss=f"{mean['loss']:.4f}")
                t_last, steps_since = time.perf_counter(), 0
            if phase == "dit" and train_cfg.eval_every and step % train_cfg.eval_every == 0:
                evals = evaluate_loss(run)
                if evals:
                    writer.write(step, evals)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            if save:
                ckpt.save(step, run.state, data_state=run.iterator,
                          metadata={"config": config_json(config), "step": step, "phase": phase})
                last_saved = step
            if stop:
                status = "preempted" if guard.requested else "stopped"
                break
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    if status == "preempted" and jax.process_index() == 0:
        print(f"vdit: preempted; saved step {step} to {ckpt.directory}. Relaunch the same command to resume.")
    return {"phase": phase, "step": step, "status": status, "workdir": str(workdir)}


def _flops_per_step(run: Run, config: ml_collections.ConfigDict) -> float:
    """Analytic training FLOPs of one DiT step (forward x 3 for forward + backward)."""
    f, r = config.data.frames, config.data.resolution
    shape = run.models.vae.latent_shape((1, f, r, r, 3))[1:]
    return 3.0 * run.global_batch * T.model_flops_per_example(run.models, shape, run.models.text.max_length)


def evaluate_loss(run: Run, num_batches: int = 1) -> dict[str, float]:
    """DiT loss at fixed times ``EVAL_TIMES`` on fixed validation batches (same noise every call)."""
    config = run.config
    try:
        dataset = open_dataset(config.data.name, config.data.data_dir or None, "validation",
                               frames=config.data.frames, resolution=config.data.resolution)
    except FileNotFoundError:
        return {}
    loader = make_loader(dataset, batch_size=run.global_batch // jax.process_count(), seed=0, shuffle=False,
                         num_epochs=1, frames=config.data.frames, tokenizer=run.models.text.tokenizer,
                         max_text_length=run.models.text.max_length)
    totals = {t: 0.0 for t in EVAL_TIMES}
    count = 0
    for i, host_batch in enumerate(loader):
        if i >= num_batches:
            break
        batch = to_global(host_batch, run.mesh, normalize=False)
        batch = {k: batch[k] for k in ("video", "text_ids", "text_mask")}
        for t in EVAL_TIMES:
            totals[t] += float(_eval_at(run.loss_fn, run.state.params, batch, run.eval_frozen, jnp.float32(t)))
        count += 1
    return {f"eval_loss_t{t}": v / max(count, 1) for t, v in totals.items()}


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _eval_at(loss_fn, params, batch, frozen, t):
    b = batch["text_ids"].shape[0]
    loss, _ = loss_fn(params, batch, jax.random.PRNGKey(1234), frozen, t=jnp.full((b,), t, jnp.float32))
    return loss
