"""Why a checkpoint does not fit the run resuming from it, in one line.

A ``CheckpointMismatch`` from ``vdit.checkpoint`` says that the saved arrays (or the saved
data position) do not fit; ``explain_mismatch`` adds which settings differ from the run
that saved them (its ``config.json``) and what to do.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Callable

import ml_collections

from vdit.checkpoint import CheckpointMismatch, DataMismatch

# The config sections whose settings shape a phase's checkpoint (the DiT phase trains the text encoder too).
_MODEL_SECTIONS = {"vae": ("vae",), "dit": ("dit", "text")}
# Settings a checkpoint does not depend on: left out of a mismatch's list of differences.
_NOT_IN_CHECKPOINT = {"dit": {"remat", "scan_layers", "attention_impl"}}
# Settings the saved data position depends on (the order of batches): a DataMismatch lists these.
_DATA_ORDER = {"data": {"name", "data_dir", "batch_size", "shuffle_seed"}, "vae_train": {"batch_size"}}
# Training settings that shape the saved optimizer state (micro-batch accumulators, the
# skip-non-finite wrapper, the EMA copy): a model mismatch lists these too.
_STATE_KEYS = {"vae": {"vae_optim": {"grad_accum"}, "vae_train": {"on_nonfinite"}},
               "dit": {"optim": {"grad_accum"}, "train": {"on_nonfinite", "ema_decay"}}}


def compared_settings(phase: str, *, data: bool) -> dict[str, Callable[[str], bool]]:
    """Per config section, which of its keys a mismatch of the model/state (or of the data order) lists."""
    if data:
        return {s: _DATA_ORDER[s].__contains__ for s in (("data", "vae_train") if phase == "vae" else ("data",))}
    model = {s: (lambda k, s=s: k not in _NOT_IN_CHECKPOINT.get(s, ())) for s in _MODEL_SECTIONS[phase]}
    return model | {s: keys.__contains__ for s, keys in _STATE_KEYS[phase].items()}


@contextlib.contextmanager
def explain_mismatch(phase_dir: pathlib.Path, config: ml_collections.ConfigDict, phase: str):
    """Adds to a ``CheckpointMismatch`` the model settings that differ from the run that saved it
    (its ``config.json``), and what to do, in one line."""
    try:
        yield
    except CheckpointMismatch as e:
        changed = []
        try:
            saved = json.loads((phase_dir / "config.json").read_text())
        except (OSError, ValueError):
            saved = None
        now = config_json(config)
        what = "data" if isinstance(e, DataMismatch) else "model"
        compared = compared_settings(phase, data=what == "data")
        for section, counts in compared.items() if saved else ():
            old, new = saved.get(section, {}), now.get(section, {})
            changed += [f"{section}.{k} {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} here"
                        for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and counts(k)]
        hint = (f"{what} settings that differ from the run that saved it: {'; '.join(changed[:6])}"
                f"{' and more' if len(changed) > 6 else ''}"
                if changed else f"no {'/'.join(compared)} setting differs from its config.json")
        raise CheckpointMismatch(f"{e}: {hint}. Resume with the settings it was trained with, or train into "
                                 f"a new --workdir") from None


def config_json(config: ml_collections.ConfigDict) -> dict:
    """The config as the JSON that a phase's ``config.json`` records."""
    return json.loads(config.to_json_best_effort())
