"""Preemption: termination signals turned into a flag the training loop checks at each step.

``Checkpointer.should_stop(step, guard)`` reads it (agreed across processes), so a SIGTERM
from a scheduler or a TPU maintenance event ends a run with a checkpoint and exit status 0.
"""

from __future__ import annotations

import logging
import signal
import warnings
from typing import Any, Sequence

import jax

log = logging.getLogger(__name__)


class PreemptionGuard:
    """Context manager that turns termination signals into a ``requested`` flag.

    Inside the ``with`` block, SIGTERM (and any other ``signals``) sets ``.requested``
    instead of killing the process, so the loop can save at the next step and exit 0
    (see ``Checkpointer.should_stop``). A second identical signal goes to the previous
    handler, so a stuck loop can still be interrupted. Previous handlers are restored
    on exit. In multi-process runs with JAX's preemption service on, SIGTERM is left to
    JAX, which turns it into a sync point agreed by all hosts.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self.received: int | None = None
        self.signals_handled: tuple[int, ...] = ()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        sigs = self.signals
        if jax.process_count() > 1 and jax.config.jax_enable_preemption_service:
            # JAX's C++ notifier owns SIGTERM there; a Python handler would hide it.
            sigs = tuple(s for s in sigs if s != signal.SIGTERM)
        # Decided from the configuration alone, so every process agrees on whether
        # should_stop() runs the all-reduce (a mismatch would hang the collective).
        self.signals_handled = sigs
        for sig in sigs:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                warnings.warn(f"PreemptionGuard: cannot install a handler for {signal.Signals(sig).name} "
                              f"outside the main thread; preemption will not be caught")
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == self.received:
            prev = self._previous.get(signum)
            if callable(prev):
                prev(signum, frame)
            elif prev == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        self.requested, self.received = True, signum
        log.warning("received %s: will save a checkpoint and stop at the next step", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        self.signals_handled = ()
