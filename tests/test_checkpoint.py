"""Checkpoints: exact round trips, keep-K, async safety, re-sharding, corrupt fallback, data state, agreed stops."""

import functools
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jax.experimental import multihost_utils

from vdit.checkpoint import CheckpointMismatch, Checkpointer
from vdit.preemption import PreemptionGuard
from vdit.sharding import make_mesh


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    ema: dict
    key: jax.Array


def _specs():
    """Weights sharded over ``fsdp`` on dim 0; everything else replicated."""
    w = {"dense": {"kernel": P("fsdp", None), "bias": P()}, "norm": {"scale": P()}}
    adam = optax.ScaleByAdamState(count=P(), mu=w, nu=w)
    return TrainState(step=P(), params=w, opt_state=(adam, optax.EmptyState(), optax.EmptyState()), ema=w, key=P())


def _state(mesh, seed=0):
    """A TrainState with a real adamw state (a few updates taken), placed on ``mesh``."""
    # Built under jit with out_shardings so it also works when the mesh spans processes.
    return jax.jit(functools.partial(_make_state, seed), out_shardings=_shardings(mesh))()


def _make_state(seed):
    k = jax.random.split(jax.random.key(seed), 3)
    params = {"dense": {"kernel": jax.random.normal(k[0], (16, 6)), "bias": jax.random.normal(k[1], (6,))},
              "norm": {"scale": jnp.ones((6,), jnp.bfloat16)}}
    tx = optax.adamw(1e-2)
    opt = tx.init(params)
    for _ in range(2):
        grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
    state = TrainState(step=jnp.asarray(2, jnp.int32), params=params, opt_state=opt,
                       ema=jax.tree.map(lambda p: p * 0.5, params), key=k[2])
    return state


def _shardings(mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), _specs(), is_leaf=lambda x: isinstance(x, P))


def _abstract(mesh, like):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, _shardings(mesh))


def _is_key(x):
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host(tree):
    """A numpy copy of ``tree`` (typed PRNG keys as their raw key data)."""
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x), tree)


def _assert_equal(a, b):
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    assert ta == tb, (ta, tb)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if _is_key(x):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise (bf16 included)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": 2, "fsdp": 4})


def test_round_trip_bitwise_with_adamw_state_and_metadata(tmp_path, mesh):
    state = _state(mesh)
    meta = {"model": {"width": 64, "dtype": "bfloat16"}, "lr": 3e-4, "tags": ["a", "b"], "note": None}
    with Checkpointer(tmp_path, keep=2, save_every=10) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        assert ckpt.should_save(20) and not ckpt.should_save(21)
        assert ckpt.save(10, state, metadata=meta)
        ckpt.wait()
        step, restored, got_meta = ckpt.restore(_abstract(mesh, state))
    assert step == 10 and got_meta == meta
    assert isinstance(restored, TrainState) and isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    _assert_equal(restored, state)
    assert restored.params["dense"]["kernel"].sharding == state.params["dense"]["kernel"].sharding


def test_skip_leaves_the_optimizer_and_the_other_weights_unread(tmp_path, mesh):
    # Sampling wants one copy of the weights: the rest of the state stays on disk.
    state = _state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state)
        ckpt.wait()
        _, got, _ = ckpt.restore(_abstract(mesh, state), skip=("opt_state", "params"))
        with pytest.raises(ValueError, match=r"skip=\['opt', 'params'\]: the state has no key opt; its keys: step, "
                                             r"params, opt_state, ema, key"):
            ckpt.restore(_abstract(mesh, state), skip=("params", "opt"))
    _assert_equal(got.ema, state.ema)
    assert got.ema["dense"]["kernel"].sharding == state.ema["dense"]["kernel"].sharding
    assert all(x is ocp.PLACEHOLDER for x in jax.tree.leaves((got.params, got.opt_state)))


def test_keep_k_and_existing_step_not_overwritten(tmp_path, mesh):
    state = _state(mesh)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, state, metadata={"v": s})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
        with pytest.warns(UserWarning, match="checkpoint 3 already exists.*not overwriting"):
            assert ckpt.save(3, _state(mesh, seed=1), metadata={"v": "new"}) is False
        assert ckpt.restore(_abstract(mesh, state))[2] == {"v": 3}
        _assert_equal(ckpt.restore(_abstract(mesh, state))[1], state)
        assert ckpt.save(3, state, metadata={"v": "forced"}, force=True)  # explicit replace
        assert ckpt.restore(_abstract(mesh, state), step=3)[2] == {"v": "forced"}
    with Checkpointer(tmp_path / "pinned", keep=2, pinned=[1], async_save=False) as ckpt:
        for s in (1, 2, 3, 4):
            ckpt.save(s, state)
        assert ckpt.all_steps() == [1, 3, 4]  # a pinned step stays, on top of the latest two


def test_async_save_then_donate_and_mutate(tmp_path, mesh):
    state = _state(mesh)
    expected = _host(state)  # host copy taken before saving
    clobber = jax.jit(lambda s: jax.tree.map(lambda x: x if _is_key(x) else x * 0 + 7, s),
                      donate_argnums=0)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        assert ckpt.save(5, state)
        kernel = state.params["dense"]["kernel"]
        state = clobber(state)  # donates (frees or reuses) the saved buffers right away
        state = clobber(state)
        # Sharded leaves really were donated; where Orbax still holds a host view (replicated
        # leaves on CPU) JAX copies instead. Either way the checkpoint must hold the old values.
        assert kernel.is_deleted()
        ckpt.wait()
        _, restored, meta = ckpt.restore(_abstract(mesh, state))
    assert meta is None
    _assert_equal(_host(restored), expected)


@pytest.mark.parametrize("target", ["fsdp8", "one_device"])
def test_restore_onto_another_mesh(tmp_path, mesh, target):
    state = _state(mesh)
    assert {s.data.shape for s in state.params["dense"]["kernel"].addressable_shards} == {(4, 6)}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(7, state)
    new_mesh = make_mesh({"fsdp": 8}) if target == "fsdp8" else make_mesh({}, devices=jax.devices()[:1])
    abstract = _abstract(new_mesh, state)
    with Checkpointer(tmp_path) as ckpt:
        step, restored, _ = ckpt.restore(abstract)
    assert step == 7
    _assert_equal(_host(restored), _host(state))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert got.sharding == want.sharding
    rows = 2 if target == "fsdp8" else 16
    assert {s.data.shape for s in restored.params["dense"]["kernel"].addressable_shards} == {(rows, 6)}


def test_dit_state_restores_into_the_other_layer_layout_on_another_mesh(tmp_path):
    # scan_layers stacks the blocks' params (and their Adam moments and EMA); a checkpoint of
    # either layout restores into the other, re-sharded, with every number unchanged.
    from flax import serialization

    from vdit import train as T
    from vdit.config import load_config, override
    from vdit.dit import relayout
    from vdit.models import build_models
    from vdit.sharding import rules_from_config

    def setup(scan, mesh_axes):
        config = override(load_config("tiny"), [f"dit.scan_layers={scan}", "dit.depth=3"])
        tx = T.make_optimizer(config.optim, 10)
        return T.init_dit_params(build_models(config)), tx, make_mesh(mesh_axes), rules_from_config(config.sharding_rules)

    init, tx, mesh, rules = setup("false", {"fsdp": 4, "tensor": 2})
    state, _ = T.init_state(init, tx, jax.random.PRNGKey(0), mesh, rules, ema=True)
    with Checkpointer(tmp_path / "unrolled", async_save=False) as ckpt:
        ckpt.save(3, state)
    init, tx, mesh, rules = setup("true", {"data": 2, "fsdp": 2, "tensor": 2})
    target = T.abstract_state(init, tx, mesh, rules, ema=True)
    with Checkpointer(tmp_path / "unrolled") as ckpt:
        with pytest.raises(CheckpointMismatch):  # without relayout: another tree
            ckpt.restore(target)
        _, scanned, _ = ckpt.restore(target, relayout=relayout)
        _, ema_only, _ = ckpt.restore(target, relayout=relayout, skip=("opt_state", "params"))
    _assert_equal(ema_only.ema, scanned.ema)
    assert scanned.params["dit"]["blocks"]["block"]["mlp"]["fc1"]["linear"]["kernel"].shape == (3, 32, 64)
    for got, want in zip(jax.tree.leaves(scanned), jax.tree.leaves(target)):
        assert got.sharding == want.sharding and got.shape == want.shape
    host = serialization.to_state_dict(jax.device_get(state))
    expected = relayout(host, serialization.to_state_dict(target))
    _assert_equal(serialization.to_state_dict(jax.device_get(scanned)), expected)

    with Checkpointer(tmp_path / "scanned", async_save=False) as ckpt:
        ckpt.save(4, scanned)
    init, tx, mesh, rules = setup("false", {"fsdp": 8})
    target = T.abstract_state(init, tx, mesh, rules, ema=True)
    with Checkpointer(tmp_path / "scanned") as ckpt:
        _, unrolled, _ = ckpt.restore(target, relayout=relayout)
    for got, want in zip(jax.tree.leaves(unrolled), jax.tree.leaves(target)):
        assert got.sharding == want.sharding
    _assert_equal(serialization.to_state_dict(jax.device_get(unrolled)), host)


def _corrupt(path, how):
    if how == "no_commit_marker":
        os.remove(path / "commit_success.txt")
        return
    # TensorStore/OCDBT keeps array bytes (small ones inline in B-tree nodes) under state/**/d/.
    files = [os.path.join(d, f) for d, _, fs in os.walk(path / "state") for f in fs if os.path.basename(d) == "d"]
    assert files
    for f in files:
        if how == "truncated":
            os.truncate(f, os.path.getsize(f) // 2)
        else:
            os.remove(f)


@pytest.mark.parametrize("how", ["truncated", "deleted", "no_commit_marker"])
def test_corrupt_latest_falls_back_and_is_kept(tmp_path, mesh, how):
    states = {s: _state(mesh, seed=s) for s in (10, 20, 30)}
    with Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        for s, st in states.items():
            ckpt.save(s, st)
        assert ckpt.all_steps() == [20, 30]
    _corrupt(tmp_path / "30", how)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        with pytest.warns(UserWarning, match=r"checkpoint 30 is unreadable \(.+\); restored step 20 instead"):
            step, restored, _ = ckpt.restore(_abstract(mesh, states[20]))
        assert step == 20
        _assert_equal(restored, states[20])
        with pytest.raises(RuntimeError, match="checkpoint 30 .* is unreadable"):
            ckpt.restore(_abstract(mesh, states[20]), step=30)  # an explicit step never falls back
        # The resumed run reaches step 30 again: the corrupt directory is not overwritten ...
        with pytest.warns(UserWarning, match="checkpoint 30 already exists .*unreadable"):
            assert not ckpt.save(30, states[30])
        # ... and new steps save; keep-K counts readable steps only, so 20 outlives corrupt 30
        # (which is never deleted automatically).
        assert ckpt.save(40, states[30])
        ckpt.wait()
        assert ckpt.all_steps() == [20, 30, 40]
        assert ckpt.save(50, states[30])
        ckpt.wait()
        assert ckpt.all_steps() == [30, 40, 50]
        assert ckpt.restore(_abstract(mesh, states[20]))[0] == 50
    assert (tmp_path / "30").is_dir()


def test_a_step_older_than_the_newest_is_refused_not_pruned(tmp_path, mesh):
    # keep-K keeps the newest steps: a run continued from step 10 beside a saved step 30
    # would see its own checkpoints deleted as soon as they were written.
    state = _state(mesh)
    with Checkpointer(tmp_path, keep=1) as ckpt:
        assert ckpt.save(30, state)  # async: not on disk yet when the next save is asked for
        with pytest.raises(ValueError, match=r"checkpoint 10 is older than the newest one in .* \(30\); keep=1 "
                                             r"keeps the newest steps, .* into a new directory"):
            ckpt.save(10, state)
        for bad in (-1, 2.0, True):
            with pytest.raises(ValueError, match=r"checkpoint step must be an integer >= 0, got"):
                ckpt.save(bad, state)
        ckpt.wait()
        assert ckpt.all_steps() == [30]
    with Checkpointer(tmp_path, keep=1) as ckpt:
        with pytest.raises(ValueError, match=r"checkpoint 29 is older than the newest one"):
            ckpt.save(29, state)
        assert ckpt.save(31, state)
        ckpt.wait()
        assert ckpt.all_steps() == [31]


def test_missing_checkpoints_errors(tmp_path, mesh):
    state = _state(mesh)
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoints in"):
            ckpt.restore(_abstract(mesh, state))
    with Checkpointer(tmp_path / "run", async_save=False) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
        with pytest.raises(ValueError, match=r"no checkpoint at step 5 in .*; available steps: \[1, 2\]"):
            ckpt.restore(_abstract(mesh, state), step=5)
        with pytest.raises(ValueError, match=r"step='latest': expected an integer step, or None for the latest"):
            ckpt.restore(_abstract(mesh, state), step="latest")
        with pytest.raises(ValueError, match="has no sharding"):
            ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
        with pytest.raises(TypeError, match="JSON-serialisable"):
            ckpt.save(3, state, metadata={"f": object()})
        for s in (1, 2):
            os.remove(tmp_path / "run" / str(s) / "commit_success.txt")
        with pytest.raises(RuntimeError, match=r"all checkpoints in .* are unreadable \(steps \[1, 2\]\)"):
            ckpt.restore(_abstract(mesh, state))


def test_restoring_into_another_model_names_the_difference_and_falls_back_to_nothing(tmp_path, mesh):
    state = _state(mesh)
    target = _abstract(mesh, state)
    rep = NamedSharding(mesh, P())
    extra = dict(target.params, extra=jax.ShapeDtypeStruct((3,), jnp.float32, sharding=rep))
    fewer = {k: v for k, v in target.params.items() if k != "norm"}
    wider = jax.tree.map(lambda x: x, target.params)
    wider["dense"]["kernel"] = jax.ShapeDtypeStruct((16, 7), jnp.float32, sharding=target.params["dense"]["kernel"].sharding)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
        cases = [(extra, r"\(params.extra: this model has it, the checkpoint not\)"),
                 (fewer, r"\(params.norm: the checkpoint has it, this model not\)"),
                 (wider, r"\(an array of shape \(16, 6\) in the checkpoint is \(16, 7\) in this model\)")]
        for params, why in cases:
            with warnings.catch_warnings(record=True) as caught:  # no "restored step 1 instead"
                warnings.simplefilter("always")
                with pytest.raises(CheckpointMismatch, match=r"^checkpoint 2 in .* holds another model than the one "
                                                             r"it is restored into " + why):
                    ckpt.restore(target.replace(params=params))
            assert not [w for w in caught if "instead" in str(w.message)]
        assert ckpt.all_steps() == [1, 2] and ckpt.restore(target)[0] == 2  # nothing was marked unreadable


@pytest.mark.parametrize("kind", ["dataset", "dataloader"])
def test_data_iterator_resumes_exactly(tmp_path, mesh, kind):
    def make():
        if kind == "dataset":
            return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4))
        loader = grain.DataLoader(data_source=grain.sources.RangeDataSource(0, 100, 1),
                                  sampler=grain.samplers.IndexSampler(100, shuffle=True, seed=0, num_epochs=1),
                                  operations=[grain.transforms.Batch(4)], worker_count=0)
        return iter(loader)

    reference = make()
    expected = [np.asarray(next(reference)) for _ in range(8)]
    it = make()
    for _ in range(3):
        next(it)
    state = _state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, data_state=it)
        next(it)  # the loop moves on while the save is in flight; the saved position must not
        ckpt.wait()
        fresh = make()
        step, _, _ = ckpt.restore(_abstract(mesh, state), data_iterator=fresh)
    assert step == 3
    assert (tmp_path / "3" / "data" / "process_0-of-1.json").exists()  # one file per process
    for want in expected[3:]:
        np.testing.assert_array_equal(np.asarray(next(fresh)), want)
    # A run with another process count cannot take this per-process state: one clear error.
    os.rename(tmp_path / "3" / "data" / "process_0-of-1.json", tmp_path / "3" / "data" / "process_0-of-2.json")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="data-iterator state for 2 process.* this run has 1"):
            ckpt.restore(_abstract(mesh, state), data_iterator=make())


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)  # Python runs signal handlers between bytecodes of the main thread
    return cond()


def test_two_processes_save_restore_and_agree_to_stop(tmp_path):
    """Two real JAX processes (gloo) x 4 CPU devices: per-process data state, re-shard, agreed stop."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:  # SIGKILL: JAX's preemption notifier catches SIGTERM
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
        assert "WORKER OK" in out
    assert sorted(os.listdir(tmp_path / "2" / "data")) == ["commit_success.txt", "process_0-of-2.json",
                                                           "process_1-of-2.json"]


def _worker(process_id: int, port: int, workdir: str):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = make_mesh({"data": 2, "fsdp": 4})
    state = _state(mesh)
    ds = grain.MapDataset.range(100)[process_id::2].shuffle(seed=0).batch(4)  # each process its own shard
    it, ref = iter(ds), iter(ds)
    for _ in range(2):
        next(it), next(ref)
    expected = [np.asarray(next(ref)) for _ in range(3)]

    def gathered(tree):
        return [multihost_utils.process_allgather(jax.random.key_data(x) if _is_key(x) else x, tiled=True)
                for x in jax.tree.leaves(tree)]

    with Checkpointer(workdir, keep=2) as ckpt:
        assert ckpt.save(2, state, data_state=it, metadata={"processes": 2})
        ckpt.wait()
        fresh = iter(ds)
        step, restored, meta = ckpt.restore(_abstract(make_mesh({"fsdp": 8}), state), data_iterator=fresh)
        assert step == 2 and meta == {"processes": 2}
        for a, b in zip(gathered(restored), gathered(state)):
            np.testing.assert_array_equal(a, b)
        for want in expected:  # this process's own stream resumes exactly
            np.testing.assert_array_equal(np.asarray(next(fresh)), want)

        # Step 4 damaged where only process 1 looks: both processes still fall back together.
        assert ckpt.save(4, state, data_state=fresh)
        ckpt.wait()
        multihost_utils.sync_global_devices("saved 4")
        if process_id == 0:
            os.remove(os.path.join(workdir, "4", "data", "process_1-of-2.json"))
        multihost_utils.sync_global_devices("damaged 4")
        with pytest.warns(UserWarning, match="checkpoint 4 is unreadable .*; restored step 2 instead"):
            assert ckpt.restore(_abstract(mesh, state), data_iterator=iter(ds))[0] == 2

        # SIGINT on process 0 only: our handler's flag is all-reduced, both stop at the same step.
        with PreemptionGuard(signals=(signal.SIGTERM, signal.SIGINT)) as guard:
            assert guard.signals_handled == (signal.SIGINT,)  # SIGTERM is left to JAX here
            assert not ckpt.should_stop(3, guard)
            if process_id == 0:
                os.kill(os.getpid(), signal.SIGINT)
                assert _wait_for(lambda: guard.requested)
            assert ckpt.should_stop(4, guard)

        # SIGTERM on process 1 only: JAX's preemption service picks one step that all agree on.
        with PreemptionGuard() as guard:
            if process_id == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            stop = next((s for s in range(5, 500) if ckpt.should_stop(s, guard) or time.sleep(0.01)), -1)
            assert stop > 0 and not guard.requested
            assert len(set(multihost_utils.process_allgather(np.int32(stop)).tolist())) == 1

    # A DiT state saved with unrolled blocks restores scanned, each process converting its shards.
    from flax import serialization

    from vdit import train as T
    from vdit.config import load_config, override
    from vdit.dit import relayout
    from vdit.models import build_models
    from vdit.sharding import rules_from_config

    def dit_setup(scan):
        config = override(load_config("tiny"), [f"dit.scan_layers={scan}"])
        init, tx = T.init_dit_params(build_models(config)), T.make_optimizer(config.optim, 10)
        return init, tx, rules_from_config(config.sharding_rules)

    init, tx, rules = dit_setup("false")
    unrolled, _ = T.init_state(init, tx, jax.random.PRNGKey(0), mesh, rules, ema=False)
    with Checkpointer(os.path.join(workdir, "layout"), async_save=False) as ckpt:
        ckpt.save(1, unrolled)
        init, tx, rules = dit_setup("true")
        target = T.abstract_state(init, tx, make_mesh({"fsdp": 8}), rules, ema=False)
        _, scanned, _ = ckpt.restore(target, relayout=relayout)
    like = serialization.to_state_dict(target)
    expected = jax.jit(lambda t: relayout(t, like))(serialization.to_state_dict(unrolled))
    got = serialization.to_state_dict(scanned)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(gathered(got), gathered(expected)):
        np.testing.assert_array_equal(a, b)
    print("WORKER OK", process_id, stop, flush=True)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
