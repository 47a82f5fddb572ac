"""PreemptionGuard: a signal sets a flag that checkpointing reads, and the old handlers come back."""

import gc
import os
import signal
import warnings

import pytest

from tests.test_checkpoint import _wait_for
from vdit.checkpoint import Checkpointer
from vdit.preemption import PreemptionGuard


def test_preemption_guard_sets_flag_and_restores_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        assert signal.getsignal(signal.SIGTERM) != before
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: guard.requested) and guard.received == signal.SIGTERM
        with Checkpointer(tmp_path) as ckpt:
            assert ckpt.should_stop(7, guard)
            assert not ckpt.should_stop(7, None)
    assert signal.getsignal(signal.SIGTERM) == before
    # Python's own Ctrl-C handler as the previous one, whatever earlier tests in this worker left.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with PreemptionGuard(signals=(signal.SIGTERM, signal.SIGINT)) as guard:
                os.kill(os.getpid(), signal.SIGINT)
                assert _wait_for(lambda: guard.requested) and guard.received == signal.SIGINT
                # A second Ctrl-C still interrupts. Python may run the handler inside a gc
                # callback (JAX registers one), where the KeyboardInterrupt would be swallowed.
                gc.disable()
                try:
                    with pytest.raises(KeyboardInterrupt):
                        os.kill(os.getpid(), signal.SIGINT)
                        _wait_for(lambda: False, timeout=2.0)
                finally:
                    gc.enable()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
