"""Device meshes and logical-axis sharding.

vdit names every parameter and activation axis logically (``embed``, ``mlp``,
``act_batch``, ...; see ``vdit.layers``). One rules table maps those names onto the
four mesh axes:

=========  =====================================================================
``data``   pure data parallelism: the batch is split, parameters are replicated
``fsdp``   the batch is split and parameters/optimizer state are sharded (ZeRO-3)
``context``the token sequence is split (sequence-parallel attention)
``tensor`` weights are split along heads / MLP width (tensor parallelism)
=========  =====================================================================

The same code runs on one CPU (every axis 1) and on a pod; only the mesh changes.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", BATCH_AXES),
    ("act_seq", "context"),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("layers", None),
)


def resolve_mesh_shape(shape: Mapping[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves a mesh shape (at most one ``-1``) against the device count.

    Raises a one-line ValueError when the mesh does not use exactly ``num_devices``.
    """
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
        dims = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        dims = [int(d) for d in shape]
        if len(dims) != len(MESH_AXES):
            raise ValueError(f"mesh shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {tuple(dims)}")
    if dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
        raise ValueError(f"mesh shape {_fmt(dims)}: use positive sizes and at most one -1")
    if -1 in dims:
        rest = math.prod(d for d in dims if d != -1)
        if num_devices % rest:
            raise ValueError(
                f"mesh {_fmt(dims)} cannot fill {num_devices} devices: {num_devices} is not divisible by {rest}")
        dims[dims.index(-1)] = num_devices // rest
    if math.prod(dims) != num_devices:
        raise ValueError(
            f"mesh {_fmt(dims)} uses {math.prod(dims)} devices but {num_devices} are available; "
            f"make the product of the mesh axes equal {num_devices} (or set one axis to -1)"
        )
    return tuple(dims)


def _fmt(dims) -> str:
    return " x ".join(f"{a}={d}" for a, d in zip(MESH_AXES, dims))


def request_cpu_devices(count: int) -> None:
    """Asks XLA:CPU for ``count`` devices, so that a ``data`` mesh axis splits a host's cores.

    Call it before JAX starts its backends. A no-op for ``count <= 0`` and when
    ``JAX_NUM_CPU_DEVICES`` is set (the user's choice wins). A backend that already runs
    keeps its devices (XLA cannot add any): this warns and goes on with them.
    """
    if count <= 0 or "JAX_NUM_CPU_DEVICES" in os.environ:
        return
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError:
        warnings.warn(f"cpu_devices={count} not applied: JAX's backends already started with "
                      f"{len(jax.devices('cpu'))} CPU device(s); set JAX_NUM_CPU_DEVICES={count} before JAX starts",
                      RuntimeWarning, stacklevel=2)


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``(data, fsdp, context, tensor)`` mesh over all (or the given) devices.

    Axis types are ``Auto`` so GSPMD propagates shardings from our constraints (newer
    JAX defaults to ``Explicit``).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh got an empty device list; pass at least one device (or None for all)")
    dims = resolve_mesh_shape(shape, len(devices))
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Normalises a rules table from a config (list of pairs or mapping) to a tuple of pairs."""
    items = rules.items() if hasattr(rules, "items") else rules  # Mapping or ConfigDict
    out = []
    for name, axes in items:
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes) or None
        bad = [a for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None and a not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule {name!r} -> {axes!r} names unknown mesh axes {bad}; expected {MESH_AXES}")
        out.append((str(name), axes))
    return tuple(out)


def unbox(tree: Any) -> Any:
    """Strips flax's logical-axis boxes, leaving plain values.

    Unlike ``nn.meta.unbox`` it never adds sharding constraints, so it is safe on
    shapes and concrete arrays inside ``activation_sharding``.
    """
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def logical_to_sharding(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """Maps a pytree of logically named (boxed) arrays or shapes to ``NamedSharding``s.

    A dimension whose size is not divisible by its mesh axes is replicated instead
    (e.g. a 3-channel RGB bias under ``fsdp=4``), so one rules table serves every
    model size; large weights, whose sizes divide, are split as the rules say.
    """
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(tree), list(rules))
    shapes = unbox(tree)

    def fit(spec, leaf):
        shape = np.shape(leaf)
        dims = list(spec) + [None] * (len(shape) - len(spec))
        for i, axes in enumerate(dims):
            names = axes if isinstance(axes, tuple) else (axes,)
            if shape[i] % math.prod(mesh.shape[a] for a in names if a is not None):
                dims[i] = None
        return NamedSharding(mesh, P(*dims))

    return jax.tree.map(fit, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int, seq_axis: int | None = None) -> NamedSharding:
    """Sharding of an ``ndim`` batch array: axis 0 over ``data x fsdp`` (optionally a sequence axis on ``context``)."""
    spec = [BATCH_AXES] + [None] * (ndim - 1)
    if seq_axis is not None:
        if not 0 < seq_axis < ndim:
            raise ValueError(f"seq_axis={seq_axis} must be an axis after the batch axis of a rank-{ndim} array")
        spec[seq_axis] = "context"
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (the product of the batch axes)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]]):
    """Context in which model code's ``layers.constrain`` calls shard activations.

    Both the mesh (``jax.set_mesh``) and the logical rules must be in scope while a
    function is traced; outside it the constraints are no-ops.
    """
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield


_COLLECTIVE = re.compile(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each kind of collective writes per device in one run of a compiled module.

    ``hlo_text`` is ``compiled.as_text()`` of a partitioned (jitted, sharded) function; its
    shapes are per device. An ``all-gather`` counts the gathered result, an ``all-reduce``
    its reduced operand. Kinds that do not occur are absent.
    """
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if m is None:
            continue
        arrays = _ARRAY.findall(m.group(1))
        if m.group(3) and m.group(2) in ("all-gather", "collective-permute"):
            arrays = arrays[-1:]  # an async start returns (operand, result): count the result
        n = sum(math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE.get(dtype, 4) for dtype, dims in arrays)
        out[m.group(2)] = out.get(m.group(2), 0) + n
    return out
