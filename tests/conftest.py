"""Test setup: 8 simulated CPU devices, set before JAX starts; float32 matmuls in float32
on accelerators too."""

import os

import pytest

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
