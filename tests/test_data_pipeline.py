"""Grain pipeline: batches, sharding, epochs, exact resume, global arrays, catalog errors."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from vdit.data import (
    MissingTensorFlowError,
    default_data_dir,
    make_loader,
    open_dataset,
    prepare_moving_shapes,
    to_global,
)
from vdit.data import catalog
from vdit.data import moving_shapes as ms
from vdit.text import ByteTokenizer

TINY = dict(frames=5, resolution=16, num_train=40, num_validation=8, num_heldout=8)


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms")
    return open_dataset(prepare_moving_shapes(root, progress=False, **TINY), root, "train")


def fake_source(n=24, frames=5):
    """Records with an ``id`` label, to check which records a loader serves."""
    return [
        {"video": np.full((frames, 4, 4, 3), i, np.uint8), "caption": f"clip {i}", "id": i, "note": "dropped"}
        for i in range(n)
    ]


def ids_of(loader, steps=None):
    it = iter(loader)
    batches = list(it) if steps is None else [next(it) for _ in range(steps)]
    return np.concatenate([b["id"] for b in batches]) if batches else np.zeros((0,), int)


def test_batch_contents(train):
    tok = ByteTokenizer(40)
    batch = next(iter(make_loader(train, batch_size=4, seed=0, tokenizer=tok)))
    assert set(batch) == {"video", "text_ids", "text_mask", "color", "shape", "direction"}
    assert batch["video"].shape == (4, 5, 16, 16, 3) and batch["video"].dtype == np.uint8
    assert batch["text_ids"].shape == (4, 40) and batch["text_ids"].dtype == np.int32
    assert batch["text_mask"].shape == (4, 40) and batch["text_mask"].dtype == bool
    for i in range(4):
        attrs = (ms.COLORS[batch["color"][i]], ms.SHAPES[batch["shape"][i]], ms.DIRECTIONS[batch["direction"][i]])
        assert tok.decode(batch["text_ids"][i]) == ms.caption(*attrs)
        assert batch["text_mask"][i].sum() == len(ms.caption(*attrs)) + 2


def test_images_are_random_single_frames(train):
    batch = next(iter(make_loader(train, batch_size=8, seed=0, frames=1, shuffle=False)))
    assert batch["video"].shape == (8, 1, 16, 16, 3)
    picked = []
    for i in range(8):
        clip = train.source[i]["video"]
        picked.append(next(t for t in range(5) if np.array_equal(clip[t], batch["video"][i, 0])))
    assert len(set(picked)) > 1  # not always the same frame
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        make_loader(train, batch_size=2, frames=3)
    with pytest.raises(ValueError, match="stores 5"):
        make_loader(train, batch_size=2, frames=9)


def test_crops_are_random_windows_on_the_grid(train):
    # Every pixel of these clips is unique, so a window tells where it was cut.
    pixels = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    source = [{"video": np.stack([np.stack([pixels + t] * 3, -1) for t in range(5)]), "caption": "c", "id": i}
              for i in range(8)]
    batch = next(iter(make_loader(source, batch_size=8, seed=0, crop=8, crop_multiple=4, shuffle=False)))
    assert batch["video"].shape == (8, 5, 8, 8, 3)
    corners = {(int(v[0, 0, 0, 0]) // 16, int(v[0, 0, 0, 0]) % 16) for v in batch["video"]}
    for v in batch["video"]:
        y, x = int(v[0, 0, 0, 0]) // 16, int(v[0, 0, 0, 0]) % 16
        np.testing.assert_array_equal(v, source[0]["video"][:, y : y + 8, x : x + 8])  # one window, all frames
    assert all(y % 4 == 0 and x % 4 == 0 for y, x in corners), corners
    assert len(corners) > 1  # not always the same window
    again = next(iter(make_loader(source, batch_size=8, seed=0, crop=8, crop_multiple=4, shuffle=False)))
    np.testing.assert_array_equal(again["video"], batch["video"])  # seeded
    assert next(iter(make_loader(train, batch_size=2, crop=(16, 8), shuffle=False)))["video"].shape == (2, 5, 16, 8, 3)
    with pytest.raises(ValueError, match="asked for 32x32 crops but .* stores 16x16 frames"):
        make_loader(train, batch_size=2, crop=32)
    with pytest.raises(ValueError, match="crop 6x6 must be a multiple of crop_multiple=4"):
        make_loader(train, batch_size=2, crop=6, crop_multiple=4)


def test_epochs_and_shuffling():
    src = fake_source(24)
    ids = ids_of(make_loader(src, batch_size=4, seed=3, num_epochs=2, shard_index=0, shard_count=1))
    assert len(ids) == 48
    e0, e1 = ids[:24], ids[24:]
    assert sorted(e0) == sorted(e1) == list(range(24))
    assert list(e0) != list(range(24)) and list(e0) != list(e1)  # shuffled, differently per epoch
    again = ids_of(make_loader(src, batch_size=4, seed=3, num_epochs=2, shard_index=0, shard_count=1))
    np.testing.assert_array_equal(ids, again)
    assert set(next(iter(make_loader(src, batch_size=2, shard_index=0, shard_count=1)))) == {
        "video", "text_ids", "text_mask", "id"}  # strings other than the caption are dropped


def test_shards_are_disjoint_and_cover_an_epoch():
    src = fake_source(25)  # one record is dropped so that shards are equal
    shards = [ids_of(make_loader(src, batch_size=3, seed=1, num_epochs=1, shard_index=i, shard_count=2))
              for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 12
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 24
    with pytest.raises(ValueError, match="shard_index and shard_count"):
        make_loader(src, batch_size=2, shard_index=0)
    # a last partial batch is dropped: a batch the epochs cannot fill would make an empty loader
    with pytest.raises(ValueError, match=r"25 records x 1 epochs cannot fill one global batch of 26; use a batch "
                                         r"of at most 12 per process"):
        make_loader(src, batch_size=13, num_epochs=1, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 2.5"):
        make_loader(src, batch_size=2.5)


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_exact(train, workers):
    kw = dict(batch_size=4, seed=7, frames=1, worker_count=workers)  # random frame choice is restored too
    it = iter(make_loader(train, **kw))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(12)]  # crosses the epoch boundary (10 batches per epoch)
    resumed = iter(make_loader(train, **kw))
    resumed.set_state(state)
    got = [next(resumed) for _ in range(12)]
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        for k in e:
            np.testing.assert_array_equal(e[k], g[k])
    json.loads(state)  # plain JSON bytes, small enough for a checkpoint


def test_to_global_on_8_devices(train):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    local = next(iter(make_loader(train, batch_size=8, seed=0)))
    batch = to_global(local, mesh)
    video = batch["video"]
    assert video.shape == (8, 5, 16, 16, 3) and video.dtype == np.float32
    assert video.sharding.spec == jax.sharding.PartitionSpec(("data",))
    np.testing.assert_allclose(np.asarray(video), local["video"] / 127.5 - 1.0, atol=1e-6)
    assert float(video.min()) >= -1.0 and float(video.max()) <= 1.0
    for shard in video.addressable_shards:  # each data-parallel group holds its 2 examples
        assert shard.data.shape == (2, 5, 16, 16, 3)
    assert batch["text_ids"].dtype == np.int32 and batch["text_mask"].dtype == bool
    np.testing.assert_array_equal(np.asarray(batch["color"]), local["color"])
    from vdit.sharding import batch_sharding, make_mesh

    vdit_mesh = make_mesh({"data": 2, "fsdp": 2, "context": 1, "tensor": 2})  # vdit's 4-axis mesh
    on_vdit = to_global(local, vdit_mesh)
    assert on_vdit["video"].sharding == batch_sharding(vdit_mesh, 5)  # what the train step expects
    assert on_vdit["text_ids"].sharding == batch_sharding(vdit_mesh, 2)
    raw = to_global(local, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")), normalize=False)
    assert raw["video"].dtype == np.uint8
    with pytest.raises(ValueError, match="does not divide"):
        to_global({"video": local["video"][:3]}, mesh)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VDIT_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("VDIT_DATA_DIR")
    assert default_data_dir() == __import__("pathlib").Path.home() / "vdit_data"


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        open_dataset("mnist", tmp_path)


# ----------------------------------------------------------------------------- TFDS catalog


@pytest.mark.skipif(catalog.has_tensorflow(), reason="tensorflow is installed")
def test_catalog_without_tensorflow_is_one_line_error(tmp_path):
    with pytest.raises(MissingTensorFlowError) as e:
        open_dataset("tfds:ucf101", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'vdit[tf]'" in msg and "tfds:ucf101" in msg


def test_catalog_mapping_without_tfds_builder():
    raw = [{"video": np.full((40, 30, 50, 1), i, np.uint8), "label": i} for i in range(3)]
    src = catalog.CatalogSource(raw, "tfds:fake/train", ("video", "label"), ["ApplyEyeMakeup", "YoYo", "jump_rope"],
                                frames=5, resolution=(16, 16))
    rec = src[1]
    assert rec["video"].shape == (5, 16, 16, 3) and rec["caption"] == "yo yo"
    assert src[0]["caption"] == "apply eye makeup" and src[2]["caption"] == "jump rope"
    assert catalog.fit_clip(np.zeros((2, 8, 8, 3), np.uint8), 5, (4, 4)).shape == (5, 4, 4, 3)
    assert "0x" not in repr(src)  # stable repr: Grain compares it on restore


@pytest.mark.skipif(not catalog.has_tensorflow(), reason="needs tensorflow")
def test_catalog_ucf101_with_mock_data(tmp_path, monkeypatch):  # pragma: no cover - only with TensorFlow
    import tensorflow_datasets as tfds

    monkeypatch.setattr(catalog, "_is_prepared", lambda builder: True)  # mock_data fakes the files
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        assert catalog.prepare_catalog("ucf101", tmp_path) == "tfds:ucf101"
        ds = open_dataset("tfds:ucf101", tmp_path, "train", frames=5, resolution=16)
        batch = next(iter(make_loader(ds, batch_size=2, seed=0, shard_index=0, shard_count=1)))
    assert batch["video"].shape == (2, 5, 16, 16, 3) and batch["video"].dtype == np.uint8
    assert batch["text_mask"].any(-1).all()


# ----------------------------------------------------------------------------- two real processes

_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    sys.path.insert(0, sys.argv[3])
    from test_data_pipeline import fake_source
    from vdit.data import make_loader, to_global

    loader = make_loader(fake_source(25), batch_size=2, seed=1, num_epochs=1)  # ShardByJaxProcess
    ids, shapes = [], []
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    for batch in loader:
        ids += batch["id"].tolist()
        g = to_global(batch, mesh)
        local = np.concatenate([np.asarray(s.data) for s in sorted(
            g["id"].addressable_shards, key=lambda s: s.index[0].start)])
        assert np.array_equal(local, batch["id"]), (local, batch["id"])
        shapes.append(g["video"].shape)
    print("RESULT", json.dumps({"ids": ids, "shapes": shapes}))
    """
)


def test_two_processes_read_disjoint_shards(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"localhost:{port}", str(i), os.path.dirname(__file__)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT", 1)[1]))
    a, b = (set(r["ids"]) for r in results)
    assert len(a) == len(b) == 12 and not a & b and len(a | b) == 24
    assert [tuple(s) for s in results[0]["shapes"]] == [(4, 5, 4, 4, 3)] * 6  # global batch = 2 x local
