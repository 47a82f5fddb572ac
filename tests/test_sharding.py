"""Meshes from config shapes, clear errors, and logical rules that really split weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from vdit.dit import DiT
from vdit.sharding import (
    DEFAULT_RULES, batch_sharding, collective_bytes, logical_to_sharding, make_mesh, resolve_mesh_shape,
    rules_from_config,
)


def test_resolve_mesh_shapes_and_errors():
    assert resolve_mesh_shape({"data": -1}, 8) == (8, 1, 1, 1)
    assert resolve_mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4, 1, 1)
    assert resolve_mesh_shape((1, 2, 2, 2), 8) == (1, 2, 2, 2)
    message = "mesh data=2 x fsdp=2 x context=1 x tensor=1 uses 4 devices but 8 are available"
    with pytest.raises(ValueError, match=message):
        resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        resolve_mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        resolve_mesh_shape({"model": 8}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        rules_from_config({"embed": "model"})
    with pytest.raises(ValueError, match="make_mesh got an empty device list"):
        make_mesh({"data": -1}, [])
    with pytest.raises(ValueError, match="seq_axis=5 must be an axis after the batch axis of a rank-3 array"):
        batch_sharding(make_mesh({"data": -1}), 3, seq_axis=5)


def test_fsdp_and_tensor_rules_split_dit_weights():
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    assert mesh.devices.size == jax.device_count() == 8
    model = DiT(in_channels=4, width=64, depth=1, num_heads=4, mlp_dim=128, text_dim=16, freq_dim=32)
    x, text = jnp.zeros((8, 1, 4, 4, 4)), jnp.zeros((8, 3, 16))
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros(8), text)
    shardings = logical_to_sharding(abstract, mesh, rules_from_config(dict(DEFAULT_RULES)))
    init = jax.jit(model.init, out_shardings=shardings)
    params = nn.meta.unbox(init(jax.random.PRNGKey(0), x, jnp.zeros(8), text))["params"]
    fc1 = params["blocks_0"]["mlp"]["fc1"]["linear"]["kernel"]  # (embed=64, mlp=128) over (fsdp=4, tensor=2)
    assert {s.data.shape for s in fc1.addressable_shards} == {(16, 64)}
    assert batch_sharding(mesh, 5).spec[0] == ("data", "fsdp")


def test_collective_bytes_reads_per_device_results():
    hlo = "\n".join([
        "  %ag = f32[8,16]{1,0} all-gather(f32[2,16]{1,0} %p), dimensions={0}",
        "  %ar = (f32[4]{0}, bf16[2,3]{1,0}) all-reduce(%a, %b), to_apply=%add",
        "  %ags = (f32[2,16]{1,0}, f32[8,16]{1,0}) all-gather-start(f32[2,16]{1,0} %q), dimensions={0}",
        "  %agd = f32[8,16]{1,0} all-gather-done(%ags)",
        "  %dot = f32[8,8]{1,0} dot(%x, %y)",
    ])
    assert collective_bytes(hlo) == {"all-gather": 2 * 8 * 16 * 4, "all-reduce": 4 * 4 + 6 * 2}
    assert collective_bytes("") == {}
