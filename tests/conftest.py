"""Test setup: 8 simulated CPU devices, set before JAX starts; one compilation cache per
test run; float32 matmuls in float32 on accelerators too."""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same tiny train, sample and VAE steps, in the xdist workers and in
# the subprocesses tests start (CLI runs, multi-host, notebooks). The controller makes one
# fresh cache directory before the workers start, and they and their subprocesses inherit it
# through the environment: every run still starts cold, but compiles each program once.
# A maximum size turns on jax's file lock, so that no process reads an entry half-written.
_RUN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _RUN_CACHE = tempfile.mkdtemp(prefix="vdit-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


def pytest_sessionfinish(session):
    """Removes the run's compilation cache once the controller (or a lone process) is done."""
    if _RUN_CACHE is not None and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _float32_matmuls_in_float32():
    # The float32 tolerances check the maths; a GPU's default float32 matmul is TF32
    # (a 10-bit mantissa), which failed test_custom_vjp_matches_autodiff's 2e-5 on an H200.
    import jax

    if jax.default_backend() == "cpu":
        yield
        return
    with jax.default_matmul_precision("highest"):
        yield
