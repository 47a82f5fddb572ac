"""Folder of captioned videos -> array_record TFDS dataset."""

import json

import numpy as np
import pytest

from vdit.data import DatasetNotPreparedError, make_loader, open_dataset, prepare_folder
from vdit.data import folder
from vdit.data.common import resize_crop

H, W = 24, 40  # source frames: landscape, so resizing must crop the sides


def clip(n, color=(255, 0, 0)):
    """``n`` frames of a square moving right; frame ``t`` also has ``t`` in its green channel."""
    v = np.zeros((n, H, W, 3), np.uint8)
    for t in range(n):
        v[t, 8:16, 10 + t : 18 + t] = color
        v[t, :, :, 1] = np.maximum(v[t, :, :, 1], 8 * t)
    return v


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    import mediapy

    folder.ensure_ffmpeg()
    d = tmp_path_factory.mktemp("videos")
    (d / "sub").mkdir()
    mediapy.write_video(d / "a.mp4", clip(20), fps=10)
    (d / "a.txt").write_text("a red square moving right\n")  # sidecar caption
    mediapy.write_video(d / "sub" / "b.gif", clip(12, (0, 0, 255)), fps=10, codec="gif")
    mediapy.write_video(d / "short.mp4", clip(3), fps=10)  # too short for 5 frames
    (d / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3 definitely not a webm" * 20)  # corrupt
    mediapy.write_video(d / "nocap.mp4", clip(10), fps=10)  # no caption anywhere
    lines = [{"file": "sub/b.gif", "caption": "a blue square"}, {"file": "short.mp4", "caption": "short"},
             {"file": "broken.webm", "caption": "broken"}, {"file": "a.mp4", "caption": "loses to the sidecar"}]
    (d / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


@pytest.fixture(scope="module")
def prepared(src, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    with pytest.warns(folder.SkippedVideoWarning) as record:
        name = prepare_folder(src, "mine", root, frames=5, resolution=16, clips_per_video=2, progress=False)
    assert name == "folder:mine"
    return root, [str(w.message) for w in record]


def test_skipped_files_counted_in_one_warning(prepared):
    _, messages = prepared
    assert len(messages) == 1
    msg = messages[0]
    assert "skipped 3 of 5 videos" in msg
    assert "1 corrupt: broken.webm" in msg and "1 too short: short.mp4" in msg and "1 without caption: nocap.mp4" in msg


def test_records(prepared):
    root, _ = prepared
    ds = open_dataset("folder:mine", root, "train")
    assert ds.frames == 5 and ds.resolution == (16, 16) and not ds.labels
    recs = [ds.source[i] for i in range(len(ds))]
    assert [(r["file"].decode(), r["caption"].decode()) for r in recs] == [
        ("a.mp4", "a red square moving right"),
        ("a.mp4", "a red square moving right"),  # 20 frames: 2 clips of 5 (clips_per_video=2)
        ("sub/b.gif", "a blue square"),
        ("sub/b.gif", "a blue square"),
    ]
    for r in recs:
        assert r["video"].shape == (5, 16, 16, 3) and r["video"].dtype == np.uint8
    red = recs[0]["video"][..., 0].astype(int)
    assert red.max() > 200  # the square survived decoding + resizing
    cols = (red > 128).any(1).argmax(-1)  # leftmost red column per frame: moves right
    assert cols[-1] > cols[0]
    green = [int(np.median(recs[1]["video"][t, :, :, 1])) for t in range(5)]  # frames 5..9 of a.mp4
    assert green == sorted(green) and abs(green[0] - 40) <= 6
    blue = recs[2]["video"][..., 2]
    assert blue.max() > 200 and recs[2]["video"][..., 0].max() < 60
    batch = next(iter(make_loader(ds, batch_size=2, seed=0, shard_index=0, shard_count=1)))
    assert set(batch) == {"video", "text_ids", "text_mask"}  # the source file name is not batched
    with pytest.raises(FileNotFoundError, match="no split 'validation'"):  # SplitNotFoundError
        open_dataset("folder:mine", root, "validation")


def test_rerun_and_changed_settings(prepared, src):
    root, _ = prepared
    name = prepare_folder(src, "mine", root, frames=5, resolution=16, clips_per_video=2, progress=False)
    assert name == "folder:mine"  # already prepared with these settings: a no-op
    with pytest.raises(ValueError, match="overwrite=True"):
        prepare_folder(src, "mine", root, frames=9, resolution=16, progress=False)


def test_fps_and_stride(src, tmp_path):
    (tmp_path / "c").mkdir()
    import shutil

    shutil.copy(src / "a.mp4", tmp_path / "c" / "a.mp4")
    (tmp_path / "c" / "captions.csv").write_text("file,caption\na.mp4,\"a red, square\"\n")
    with pytest.raises(ValueError, match="no usable video.*1 too short: a.mp4"):  # 20 frames / stride 5 < 5
        prepare_folder(tmp_path / "c", "strided", tmp_path, frames=5, resolution=16, stride=5, progress=False)
    with pytest.raises(DatasetNotPreparedError):
        open_dataset("folder:strided", tmp_path)
    name = prepare_folder(tmp_path / "c", "fps", tmp_path, frames=5, resolution=16, fps=5, progress=False)
    rec = open_dataset(name, tmp_path).source[0]
    assert rec["caption"].decode() == "a red, square"
    green = [int(np.median(rec["video"][t, :, :, 1])) for t in range(5)]  # source frames 0, 2, 4, 6, 8
    assert all(abs(g - 16 * t) <= 6 for t, g in enumerate(green)), green
    assert list(folder.frame_indices(4, src_fps=30, fps=12, stride=None)) == [0, 2, 5, 7]
    assert list(folder.frame_indices(3, src_fps=30, fps=None, stride=3)) == [0, 3, 6]


def test_bad_arguments(src, tmp_path):
    with pytest.raises(ValueError, match="1 \\+ 4k") as e:
        prepare_folder(src, "x", tmp_path, frames=6)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not both"):
        prepare_folder(src, "x", tmp_path, frames=5, fps=5, stride=2)
    with pytest.raises(ValueError, match="dataset name"):
        prepare_folder(src, "a/b", tmp_path, frames=5)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="video folder .*file is a file, expected a folder of videos"):
        prepare_folder(tmp_path / "file", "x", tmp_path, frames=5)


def test_not_prepared_error(tmp_path):
    with pytest.raises(DatasetNotPreparedError) as e:
        open_dataset("folder:pets", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "vdit prepare folder --src DIR --name pets" in msg


def test_resize_crop_keeps_the_center():
    frame = np.zeros((30, 60, 3), np.uint8)
    frame[:, :15] = (255, 0, 0)  # sides are cropped away...
    frame[:, 45:] = (255, 0, 0)
    frame[:, 15:45] = (0, 255, 0)  # ...the centre square stays
    out = resize_crop(frame, (10, 10))
    assert out.shape == (10, 10, 3)
    assert out[:, 1:-1, 1].min() > 250 and out[..., 1].min() > 200  # edges see a little of the sides
    assert out[:, 1:-1, 0].max() < 8 and out[..., 0].max() < 40
    assert np.array_equal(resize_crop(frame, (30, 60)), frame)  # already the right size: unchanged
