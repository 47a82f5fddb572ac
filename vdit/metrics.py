"""Training metrics from process 0: JSONL always, TensorBoard event files, a progress bar.

Only process 0 writes (every process computes the same replicated metrics), so a
multi-host run produces one log, not one per host.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np


class MetricsWriter:
    """Appends ``{"step": ..., **metrics}`` lines to ``metrics.jsonl`` and TensorBoard scalars.

    Appending (never truncating) keeps the history of a resumed run in one file.
    """

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: JSONL alone is enough
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records scalar metrics at ``step`` (numpy/jax scalars are converted)."""
        if not self.active:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        """Flushes and closes the files."""
        if not self.active:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _scalar(v: Any) -> Any:
    v = np.asarray(v)
    if v.dtype == bool:
        return bool(v)
    if np.issubdtype(v.dtype, np.integer):
        return int(v)
    return float(v)


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """All rows of a workdir's ``metrics.jsonl`` (empty when there is none)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
