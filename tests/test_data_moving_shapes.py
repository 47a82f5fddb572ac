"""moving_shapes: a TFDS dataset built and read without TensorFlow."""

import importlib.util
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vdit.data import DatasetNotPreparedError, open_dataset, prepare_moving_shapes
from vdit.data import moving_shapes as ms

TINY = dict(frames=5, resolution=16, num_train=40, num_validation=8, num_heldout=8)
TINY_NAME = "moving_shapes/f5_r16_n40-8-8"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms")
    assert prepare_moving_shapes(root, progress=False, **TINY) == TINY_NAME
    return root


def _records(data_dir, split):
    ds = open_dataset(TINY_NAME, data_dir, split)
    return ds, [ds.source[i] for i in range(len(ds))]


def _combo(r):
    return (ms.COLORS[r["color"]], ms.SHAPES[r["shape"]], ms.DIRECTIONS[r["direction"]])


def test_no_tensorflow_needed():
    # The whole module runs without TensorFlow; if it is installed this proves nothing.
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("tensorflow is installed; the TF-free path is not exercised")
    import sys

    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("split,n", [("train", 40), ("validation", 8), ("heldout", 8)])
def test_shapes_dtypes_captions(data_dir, split, n):
    ds, recs = _records(data_dir, split)
    assert len(ds) == n and ds.frames == 5 and ds.resolution == (16, 16)
    assert ds.labels == {"color": ms.COLORS, "shape": ms.SHAPES, "direction": ms.DIRECTIONS}
    for r in recs:
        assert r["video"].shape == (5, 16, 16, 3) and r["video"].dtype == np.uint8
        assert r["caption"].decode() == ms.caption(*_combo(r))
        assert r["video"].max() == 255 and r["video"][:, 0, 0].max() == 0  # object present, corner black


def test_metadata(data_dir):
    ds = open_dataset(TINY_NAME, data_dir, "heldout")
    assert [tuple(c) for c in ds.metadata["heldout_combos"]] == list(ms.HELDOUT_COMBOS)


def test_heldout_split_and_coverage(data_dir):
    train = {_combo(r) for r in _records(data_dir, "train")[1]}
    held = {_combo(r) for r in _records(data_dir, "heldout")[1]}
    val = {_combo(r) for r in _records(data_dir, "validation")[1]}
    assert not train & set(ms.HELDOUT_COMBOS)
    assert held == set(ms.HELDOUT_COMBOS)  # 8 clips cycle through the 8 combos
    assert val <= set(ms.TRAIN_COMBOS)
    for i, values in enumerate((ms.COLORS, ms.SHAPES, ms.DIRECTIONS)):
        assert {c[i] for c in train} == set(values)


def test_constants():
    assert len(ms.ALL_COMBOS) == 72 and len(ms.HELDOUT_COMBOS) == 8 and len(ms.TRAIN_COMBOS) == 64
    # Every attribute pair of a heldout triple still appears in train: only the triple is new.
    for a, b in itertools.combinations(range(3), 2):
        train_pairs = {(c[a], c[b]) for c in ms.TRAIN_COMBOS}
        assert all((c[a], c[b]) in train_pairs for c in ms.HELDOUT_COMBOS)


def test_deterministic_and_chunk_independent(data_dir, tmp_path):
    prepare_moving_shapes(tmp_path, progress=False, num_threads=0, **TINY)
    _, a = _records(data_dir, "train")
    _, b = _records(tmp_path, "train")
    assert all(np.array_equal(x["video"], y["video"]) and x["caption"] == y["caption"] for x, y in zip(a, b))
    # Clip i depends on (seed, split, i) only, not on which clips are rendered with it.
    few, _ = ms.render_clips("train", [7, 3], frames=5, resolution=16)
    np.testing.assert_array_equal(few[0], a[7]["video"])
    np.testing.assert_array_equal(few[1], a[3]["video"])
    other, _ = ms.render_clips("train", [7], frames=5, resolution=16, seed=1)
    assert not np.array_equal(other[0], a[7]["video"])


def test_rerun_is_noop(data_dir):
    files = sorted((data_dir / "moving_shapes").rglob("*"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert prepare_moving_shapes(data_dir, progress=False, **TINY) == TINY_NAME
    assert [p.stat().st_mtime_ns for p in sorted((data_dir / "moving_shapes").rglob("*"))] == mtimes
    assert not (data_dir / "downloads").exists()  # TFDS's download dir stays out of data_dir


def test_tfds_builder_reads_it(data_dir):
    builder = tfds.builder(TINY_NAME, data_dir=str(data_dir))
    assert len(builder.as_data_source(split="validation")) == 8


def test_not_prepared_error(data_dir, tmp_path):
    with pytest.raises(DatasetNotPreparedError) as e:
        open_dataset("moving_shapes", tmp_path, "train")
    msg = str(e.value)
    assert "\n" not in msg and f"vdit prepare moving_shapes --data_dir {tmp_path}" in msg
    with pytest.raises(DatasetNotPreparedError) as e:  # other variants present: they are listed
        open_dataset("moving_shapes/f9_r24", data_dir, "train")
    msg = str(e.value)
    assert TINY_NAME in msg and "--frames 9 --resolution 24" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="no split"):
        open_dataset(TINY_NAME, data_dir, "test")


def test_config_names():
    assert ms.config_name() == "f17_r32"
    kw = dict(frames=9, resolution=(16, 24), object_size=(0.2, 0.4), num_train=5, num_validation=1,
              num_heldout=2, seed=3)
    name = ms.config_name(**kw)
    assert name == "f9_r16x24_o20-40_n5-1-2_s3"
    assert ms.parse_config_name(name) == kw
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ms.config_name(frames=6)
    # Before anything is written: an empty train split, or a seed numpy refuses
    with pytest.raises(ValueError, match="num_train must be >= 1, got 0"):
        ms.moving_shapes_config(num_train=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        ms.moving_shapes_config(seed=-1)


def test_attributes_readable_from_pixels():
    """A simple pixel analyzer recovers colour, shape and direction of every default clip."""
    video, p = ms.render_clips("validation", np.arange(300))  # default 17 frames at 32x32
    fg = video.max(-1) > 127  # (N, T, H, W)
    on = (video * fg[..., None]).reshape(len(video), -1, 3).max(1) > 127  # channels lit
    color = np.array([np.flatnonzero(((ms.COLOR_RGB > 0) == o).all(1))[0] for o in on])
    area = fg.sum((2, 3))
    cx = (fg.sum(2) * np.arange(32)).sum(-1) / area
    cy = (fg.sum(3) * np.arange(32)).sum(-1) / area
    dx, dy = cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]
    direction = np.where(np.abs(dx) > np.abs(dy), np.where(dx < 0, 0, 1), np.where(dy < 0, 2, 3))
    fill = area[:, 0] / (fg[:, 0].any(2).sum(1) * fg[:, 0].any(1).sum(1))  # area / bounding box
    shape = np.where(fill > 0.95, 1, np.where(fill > 0.65, 0, 2))
    np.testing.assert_array_equal(color, p["color"])
    np.testing.assert_array_equal(direction, p["direction"])
    np.testing.assert_array_equal(shape, p["shape"])
    assert (np.maximum(np.abs(dx), np.abs(dy)) >= 4).all()  # clearly moving


@pytest.mark.slow
def test_full_build_under_a_minute(tmp_path):
    import time

    t = time.perf_counter()
    prepare_moving_shapes(tmp_path, progress=False)
    assert time.perf_counter() - t < 60
    assert len(open_dataset("moving_shapes", tmp_path, "train")) == 20000
