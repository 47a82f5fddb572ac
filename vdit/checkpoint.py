"""Checkpoints: train state, JSON metadata and Grain data-iterator state, via Orbax.

One step directory per saved step, written by an Orbax ``CheckpointManager`` as a
``Composite`` of three items::

    <dir>/<step>/state/   train state as plain nested dicts (``StandardSave``)
    <dir>/<step>/meta/    JSON metadata, e.g. the run's config (``JsonSave``)
    <dir>/<step>/data/    Grain iterator state, one ``process_<i>-of-<n>.json`` per process

Typical loop::

    with Checkpointer(workdir / "ckpt", keep=3, save_every=1000) as ckpt, PreemptionGuard() as guard:
        step = 0
        if ckpt.latest_step() is not None:
            step, state, _ = ckpt.restore(abstract_state, data_iterator=it)
        while step < total:
            state = train_step(state, next(it)); step += 1
            stop = ckpt.should_stop(step, guard)        # every step, on every process
            if stop or ckpt.should_save(step):
                ckpt.save(step, state, data_state=it, metadata=config.to_dict())
            if stop:
                break                                   # exit 0; close() waits for the save

Restoring takes the target shardings from ``abstract_state``, so a checkpoint written
on one mesh restores onto any other (elastic re-sharding).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import sys
import time
import warnings
from typing import Any, Callable, Collection, Iterable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization
from jax.experimental import multihost_utils

from vdit.preemption import PreemptionGuard

log = logging.getLogger(__name__)

_ITEMS = ("state", "meta", "data")
_COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, just before the step is final.


class _KeepLatestReadable:
    """Orbax preservation policy: keep the latest ``n`` readable steps, and the pinned ones.

    Steps found unreadable by ``restore`` neither count towards ``n`` nor get deleted,
    so keep-K never drops a good checkpoint in favour of a corrupt one, and the corrupt
    directory stays on disk for the user to inspect. Pinned steps (the VAE step a
    trained DiT depends on) are kept on top of the ``n``.
    """

    def __init__(self, n: int, unreadable: set[int], pinned: frozenset[int] = frozenset()):
        self.n, self.unreadable, self.pinned = n, unreadable, pinned

    def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
        readable = sorted(c.step for c in checkpoints if c.step not in self.unreadable | self.pinned)
        keep = set(readable[-self.n:]) | self.unreadable | self.pinned
        return [c.step in keep for c in checkpoints]


class _FrozenIteratorState:
    """An iterator state captured at ``save()`` time, shaped for Grain's Orbax handler.

    Grain's handler calls ``get_state()`` when the item is written; capturing it
    here guarantees the saved position is the one at the ``save()`` call even if the
    loop advances the iterator while the save is still in flight.
    """

    def __init__(self, state: Any):
        if hasattr(state, "get_state"):  # a Grain DataLoader or Dataset iterator
            state = state.get_state()
        if isinstance(state, dict):  # Dataset iterators: a JSON-able dict
            state = json.dumps(state, indent=2).encode()
        elif isinstance(state, str):
            state = state.encode()
        if not isinstance(state, bytes):
            kind = type(state).__name__
            raise TypeError(f"data_state must be a Grain iterator or its get_state() result, got {kind}")
        self._state = state  # DataLoader iterators: JSON already, as bytes

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Saves and restores training checkpoints (Orbax ``CheckpointManager``, async by default).

    Args:
      directory: root directory (local path or ``gs://...``); created if missing.
      keep: how many of the latest readable checkpoints to keep; older ones are deleted.
      save_every: ``should_save(step)`` is true every this many steps.
      pinned: steps never deleted, whatever ``keep`` says.
      async_save: write in a background thread; ``save`` returns once the arrays are
        copied to host memory.
    """

    def __init__(self, directory, *, keep: int = 3, save_every: int = 1000, pinned: Iterable[int] = (),
                 async_save: bool = True):
        if keep < 1 or save_every < 1:
            raise ValueError(f"keep and save_every must be >= 1, got keep={keep}, save_every={save_every}")
        path = str(directory)
        self.directory = epath.Path(path if "://" in path else epath.Path(path).expanduser().resolve())
        self.save_every = int(save_every)
        self._unreadable: set[int] = set()
        self._keep = int(keep)
        self._newest_saved = -1  # covers async saves not yet on disk
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_KeepLatestReadable(int(keep), self._unreadable, frozenset(int(s) for s in pinned)),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    # -- queries ------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """All steps on disk (including any found unreadable), ascending."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step on disk, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """True on multiples of ``save_every``."""
        return int(step) % self.save_every == 0

    def should_stop(self, step: int, guard: PreemptionGuard | None = None) -> bool:
        """True when the loop should save now and exit; the same answer on every process.

        Call it at every step on every process. Single process: the guard's flag.
        Multi-process: JAX's preemption sync point (``jax.distributed`` turns SIGTERM on
        any host into one agreed step; Orbax ``reached_preemption``), or, for signals our
        own guard caught, the flag all-reduced over processes (one tiny host collective).
        """
        local = bool(guard is not None and guard.requested)
        if jax.process_count() == 1:
            return local
        if self._manager.reached_preemption(int(step)):
            return True
        if guard is None or not guard.signals_handled:
            return False
        return not _everywhere(not local)

    # -- save ---------------------------------------------------------------------------

    def save(self, step: int, state, *, data_state=None, metadata: dict | None = None, force: bool = False) -> bool:
        """Saves ``state`` (any pytree of arrays) at ``step``; returns whether it saved.

        Args:
          step: the training step; always saved when called (the loop asks ``should_save``).
          state: pytree of ``jax.Array`` (e.g. a ``flax.struct`` TrainState with an optax state).
          data_state: a Grain iterator (or its ``get_state()``); its position now is saved,
            per process.
          metadata: JSON-serialisable dict (e.g. ``config.to_dict()``), returned by ``restore``
            as JSON gives it back: tuples as lists, keys as strings.
          force: replace an existing checkpoint at ``step``; without it the save is skipped
            with a warning, so nothing on disk is ever silently overwritten.

        Raises:
          ValueError: ``step`` is negative, or older than the newest readable checkpoint
            (a run continued from an earlier step): keep-K keeps the newest steps, so the
            two runs' checkpoints would mix and the new one could be deleted at once.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"checkpoint step must be an integer >= 0, got {step!r}")
        step = int(step)
        newest = max([s for s in self.all_steps() if s not in self._unreadable] + [self._newest_saved])
        if step < newest:
            raise ValueError(
                f"checkpoint {step} is older than the newest one in {self.directory} ({newest}); keep={self._keep} "
                f"keeps the newest steps, so it would mix with the newer run's checkpoints and could be deleted at "
                f"once. Save a run continued from an earlier step into a new directory")
        if hasattr(metadata, "to_dict"):  # ml_collections.ConfigDict
            metadata = metadata.to_dict()
        if metadata is not None:
            try:  # fail here, in the caller's thread, not in the background writer
                json.dumps(metadata)
            except (TypeError, ValueError) as e:
                raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
        if step in self.all_steps():
            if not force:
                why = " (it was unreadable at restore)" if step in self._unreadable else ""
                warnings.warn(f"checkpoint {step} already exists in {self.directory}{why}; "
                              f"not overwriting it (pass force=True to replace it)", stacklevel=2)
                return False
            self._manager.wait_until_finished()
            self._manager.delete(step)
            self._unreadable.discard(step)
        items = {"state": ocp.args.StandardSave(serialization.to_state_dict(state))}
        if metadata is not None:
            items["meta"] = ocp.args.JsonSave(metadata)
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_state))
        # force=True: Orbax's own policy would refuse any step <= its latest one (e.g.
        # after falling back past a corrupt step); the caller already decided to save.
        saved = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        self._newest_saved = max(self._newest_saved, step) if saved else self._newest_saved
        return saved

    # -- restore ------------------------------------------------------------------------

    def restore(self, abstract_state, *, step: int | None = None, data_iterator=None,
                relayout: Callable[[Any, Any], Any] | None = None,
                skip: Collection[str] = ()) -> tuple[int, Any, dict | None]:
        """Restores a checkpoint onto the shardings in ``abstract_state``.

        Args:
          abstract_state: the state's pytree with ``jax.ShapeDtypeStruct`` leaves carrying
            ``.sharding`` (or concrete arrays, whose shardings are used); any mesh works.
            Arrays come back in its dtypes (an f32 checkpoint restores into bf16 leaves
            as bf16), as Orbax casts.
          step: the step to restore; default the latest readable one.
          data_iterator: a Grain iterator whose state is set to the saved position.
          relayout: ``(tree, like) -> tree`` in the layout of ``like``, for states saved in
            another layout of the same numbers (``vdit.dit.relayout``: scanned or unrolled
            blocks). The step is read in its own layout, then converted on the devices.
          skip: top-level keys of the state (``"opt_state"``, ``"ema"``) not to read: their
            leaves come back as ``orbax.checkpoint.PLACEHOLDER`` (``...``). Sampling reads
            one copy of the weights instead of four (params, EMA, Adam's two moments).

        Returns:
          ``(step, state, metadata)``; ``metadata`` is None when none was saved.

        Without ``step``, an unreadable latest checkpoint (incomplete save, missing or
        truncated file) is skipped with a warning naming both steps and the previous one
        is restored; nothing is deleted.
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
            raise ValueError(f"step={step!r}: expected an integer step, or None for the latest readable one")
        self._manager.wait_until_finished()
        self._manager.reload()  # another process/job may have written or removed steps
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        if step is not None and int(step) not in steps:
            raise ValueError(f"no checkpoint at step {step} in {self.directory}; available steps: {steps}")
        target = serialization.to_state_dict(_abstract(abstract_state))
        if unknown := set(skip) - set(target):
            raise ValueError(f"skip={sorted(skip)}: the state has no key {', '.join(sorted(unknown))}; "
                             f"its keys: {', '.join(target)}")
        failed: list[tuple[int, str]] = []
        for s in [int(step)] if step is not None else steps[::-1]:
            result = self._attempt(s, target, data_iterator, relayout, frozenset(skip))
            if isinstance(result, str):
                self._unreadable.add(s)
                failed.append((s, result))
                continue
            if failed:
                bad = ", ".join(str(b) for b, _ in failed)
                what = f"checkpoint {bad} is" if len(failed) == 1 else f"checkpoints {bad} are"
                warnings.warn(f"{what} unreadable ({failed[0][1]}); restored step {s} instead", stacklevel=2)
            state, meta = result
            return s, serialization.from_state_dict(abstract_state, state), meta
        if step is not None:
            raise CheckpointUnreadableError(f"checkpoint {step} in {self.directory} is unreadable: {failed[0][1]}")
        raise CheckpointUnreadableError(f"all checkpoints in {self.directory} are unreadable (steps {steps}); "
                           f"latest error: {failed[0][1]}")

    def _attempt(self, step: int, target, data_iterator, relayout=None,
                 skip: frozenset[str] = frozenset()) -> tuple[Any, dict | None] | str:
        """Restores ``step``, or returns the one-line reason it is unreadable.

        With several processes, every process must reach the same verdict, or they would
        restore different steps (or desynchronise Orbax's barriers). So the cheap
        per-process checks are agreed on *before* Orbax reads, and the outcome after.
        A read error that hits only some processes' shards inside Orbax cannot be agreed
        on (those processes leave Orbax's barriers early); pass ``step=`` to skip it.
        """
        multi = jax.process_count() > 1
        wanted = target
        if relayout is not None and (saved := self._saved_tree(step)) is not None:
            target = relayout(target, saved)
        target = {k: _placeholders(v) if k in skip else v for k, v in target.items()}
        args, problem = self._plan(step, target, data_iterator)
        if multi and not _everywhere(problem is None):
            return problem or "unreadable on another process"
        if problem:
            return problem
        with _quiet_async_errors():
            try:
                out = self._read(step, args)
                result = out["state"], (out["meta"] if "meta" in args else None)
            except Exception as e:  # Orbax/TensorStore raise many types for bad files
                result = _one_line(e)
                if _MISMATCH.search(str(e)):  # not a bad file: the same on every step and process
                    result = CheckpointMismatch(f"checkpoint {step} in {self.directory} holds another model than "
                                                f"the one it is restored into ({_mismatch_summary(e)})")
                elif _DATA_MISMATCH.search(str(e)):  # likewise: Grain refuses another sampler's position
                    result = DataMismatch(f"checkpoint {step} in {self.directory} holds the data position of another "
                                          f"batch order than this run's (dataset size, batch size or shuffle seed)")
            if not isinstance(result, tuple):
                # Outside the except block, so the traceback no longer pins Orbax's abandoned
                # tasks: collect them now, while their duplicate reports are silenced.
                time.sleep(0.05)  # in-flight reads of the other arrays finish
                gc.collect()
        if isinstance(result, CheckpointMismatch):
            raise result
        if multi and not _everywhere(not isinstance(result, str)):
            return result if isinstance(result, str) else "unreadable on another process"
        if isinstance(result, tuple) and jax.tree.structure(target) != jax.tree.structure(
                {k: _placeholders(v) if k in skip else v for k, v in wanted.items()}):
            log.info("checkpoint %d holds the state in another layout; converting it", step)
            read = {k: v for k, v in wanted.items() if k not in skip}
            shardings = jax.tree.map(lambda t: t.sharding, read)
            convert = jax.jit(lambda tree: relayout(tree, read), out_shardings=shardings)
            converted = convert({k: v for k, v in result[0].items() if k not in skip})
            result = {k: converted[k] if k in converted else _placeholders(v) for k, v in wanted.items()}, result[1]
        return result

    def _read(self, step: int, args: dict) -> dict:
        """Orbax's restore of ``args``' items. A state with leaves to skip is read by a PyTree handler
        of its own: the manager keeps the Standard handler it met first for the item."""
        if not isinstance(args["state"], ocp.args.PyTreeRestore):
            return self._manager.restore(step, args=ocp.args.Composite(**args))
        rest = {k: v for k, v in args.items() if k != "state"}
        out = dict(self._manager.restore(step, args=ocp.args.Composite(**rest))) if rest else {}
        handler = ocp.PyTreeCheckpointHandler()
        try:
            out["state"] = handler.restore(self.directory / str(step) / "state", args=args["state"])
        finally:
            handler.close()
        return out

    def _saved_tree(self, step: int) -> dict | None:
        """The nested keys of step's saved state (leaves: Orbax array metadata), or None if unreadable."""
        try:
            return ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree
        except Exception:  # an unreadable step: the restore attempt says why
            return None

    def _plan(self, step: int, target, data_iterator) -> tuple[dict, str | None]:
        """Orbax restore args for ``step`` and the first problem cheap checks find (or None)."""
        step_dir = self.directory / str(step)
        args = {"state": ocp.args.StandardRestore(target)}
        if any(x is ocp.PLACEHOLDER for x in jax.tree.leaves(target)):
            # StandardRestore refuses placeholders; the PyTree handler under it skips them.
            restore_args = jax.tree.map(lambda x: x if x is ocp.PLACEHOLDER else ocp.ArrayRestoreArgs(
                sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target)
            args["state"] = ocp.args.PyTreeRestore(target, restore_args=restore_args)
        if not (step_dir / _COMMIT_MARKER).exists():
            return args, f"{_COMMIT_MARKER} missing, the save never finished"
        if not (step_dir / "state").exists():
            return args, "no state/ item"
        if (step_dir / "meta").exists():
            args["meta"] = ocp.args.JsonRestore()
        if data_iterator is None:
            return args, None
        data_dir = step_dir / "data"
        if not data_dir.exists():
            warnings.warn(f"checkpoint {step} has no data-iterator state; the data iterator is not restored")
            return args, None
        # Grain's handler writes one file per process: process_<i>-of-<n>.json.
        counts = {p.name.rsplit("-of-", 1)[-1].removesuffix(".json") for p in data_dir.glob("process_*-of-*.json")}
        n, mine = jax.process_count(), f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if counts and counts != {str(n)}:  # the same on every process: an error, not a fallback
            raise ValueError(f"checkpoint {step} holds data-iterator state for {'/'.join(sorted(counts))} "
                             f"process(es) but this run has {n}; restore without data_iterator= to start the "
                             f"data pipeline afresh")
        if not (data_dir / mine).exists():
            return args, f"data/{mine} missing"
        args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return args, None

    # -- lifecycle ----------------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until in-flight async saves are on disk (and old steps are pruned)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _placeholders(tree):
    """``tree`` with every leaf ``PLACEHOLDER``: Orbax leaves those unread."""
    return jax.tree.map(lambda _: ocp.PLACEHOLDER, tree)


def _abstract(tree):
    """ShapeDtypeStructs with shardings for every leaf; a one-line error where one is missing."""

    def leaf(path, x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            raise ValueError(f"abstract_state leaf {jax.tree_util.keystr(path)} has no sharding; "
                             f"use jax.ShapeDtypeStruct(shape, dtype, sharding=...) (see vdit.sharding)")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(leaf, tree)


class CheckpointMismatch(ValueError):
    """A checkpoint holds another model than the restore target (other tree or shapes):
    every step would fail alike, so nothing falls back to an older one."""


class DataMismatch(CheckpointMismatch):
    """A checkpoint's data position belongs to another batch order than the run's loader."""


class CheckpointUnreadableError(RuntimeError):
    """No checkpoint asked for could be read (each attempt's reason is in the message)."""


# What Orbax says when the target's tree or an array's shape differs from what was saved.
_MISMATCH = re.compile(r"tree structures do not match|is not compatible with the stored shape")
# What Grain says when the saved iterator state came from another sampler.
_DATA_MISMATCH = re.compile(r"Sampler in checkpoint does not match")


def _mismatch_summary(e: BaseException) -> str:
    """The first difference in Orbax's (pages long) mismatch error, in a few words."""
    text = " ".join(str(e).split())
    m = re.search(r"do not match: (\S+): - Source: (MISSING)?", text)
    if m:
        # Orbax's "Source" is the restore target, its "Target" what is on disk.
        where = "the checkpoint has it, this model not" if m.group(2) else "this model has it, the checkpoint not"
        return f"{m.group(1).rstrip(':')}: {where}"
    m = re.search(r"Requested shape: (\([^)]*\)) is not compatible with the stored shape: (\([^)]*\))", text)
    if m:
        return f"an array of shape {m.group(2)} in the checkpoint is {m.group(1)} in this model"
    return text[:200]


def _everywhere(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a host all-gather; call on all processes)."""
    return bool(np.min(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _one_line(e: BaseException) -> str:
    while e.__cause__ is not None:  # the innermost error names the bad file
        e = e.__cause__
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text if len(text) <= 240 else text[:240] + '...'}"


@contextlib.contextmanager
def _quiet_async_errors():
    """Silences the echoes of a failed Orbax restore.

    When one array read fails, Orbax abandons its other asyncio tasks and closes the
    loop; each then reports the same error again ("Future exception was never
    retrieved", "Event loop is closed"), pages of tracebacks. ``restore`` reports the
    error once, in its own warning or exception.
    """
    aio, hook = logging.getLogger("asyncio"), sys.unraisablehook
    disabled, aio.disabled = aio.disabled, True
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        aio.disabled, sys.unraisablehook = disabled, hook
