"""User errors of the ``vdit`` command come out as one line and exit status 2, before any long work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vdit import media
from vdit.cli import build_parser, main, parse_command


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _parse_error(capsys, argv) -> str:
    """argparse's own rejection: usage, then one error line naming the option."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _videos(n: int, value: int = 0) -> np.ndarray:
    return np.full((n, 3, 8, 8, 3), value, np.uint8)


# ----------------------------------------------------------------------------- sample outputs


def test_save_samples_refuses_to_overwrite_and_replaces_with_overwrite(tmp_path):
    from vdit.sample import save_samples

    out = tmp_path / "samples"
    paths = save_samples(_videos(2), ["a red circle"], out, num_per_prompt=2)
    assert sorted(p.name for p in out.iterdir()) == sorted(media.output_names(["000_a_red_circle_s0",
                                                                               "000_a_red_circle_s1"]))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=r"000_a_red_circle_s0.mp4, 000_a_red_circle_s0.gif, .* and 3 more"):
        save_samples(_videos(2, 255), ["a red circle"], out, num_per_prompt=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    with pytest.raises(FileExistsError, match="grid.gif, contact_sheet.png"):  # other prompts: shared files
        save_samples(_videos(1), ["a blue square"], out)

    again = save_samples(_videos(2, 255), ["a red circle"], out, num_per_prompt=2, overwrite=True)
    assert again == paths and media.read_video(paths["mp4"][0]).mean() > 200


def test_write_all_needs_one_name_per_video(tmp_path):
    with pytest.raises(ValueError, match="3 videos but 2 names"):
        media.write_all(tmp_path, _videos(3), ["a", "b"])


@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling fails the test if reached; ``allow()`` lets it return small synthetic videos."""
    import vdit.sample

    def load_pipeline(*a, **kw):
        raise AssertionError("sampled before checking the output folder")

    monkeypatch.setattr(vdit.sample, "load_pipeline", load_pipeline)

    def allow():
        monkeypatch.setattr(vdit.sample, "load_pipeline", lambda *a, **kw: None)
        monkeypatch.setattr(vdit.sample, "generate", lambda pipe, prompts, num_per_prompt, **kw:
                            _videos(len(prompts) * num_per_prompt, 255))

    return allow


def test_sample_refuses_existing_outputs_before_sampling(tmp_path, capsys, no_sampling):
    workdir = tmp_path / "run"
    (workdir / "samples").mkdir(parents=True)
    (workdir / "samples" / "grid.gif").write_bytes(b"mine")
    assert main(["sample", "--workdir", str(workdir), "--prompt", "a red circle"]) == 2
    err = _error(capsys)
    assert err.startswith(f"vdit sample: error: {workdir / 'samples'} already holds grid.gif;")
    assert "--out DIR" in err and "--overwrite" in err
    assert (workdir / "samples" / "grid.gif").read_bytes() == b"mine"

    no_sampling()
    assert main(["sample", "--workdir", str(workdir), "--prompt", "a red circle", "--overwrite"]) == 0
    assert (workdir / "samples" / "grid.gif").read_bytes() != b"mine"
    assert "wrote 1 videos" in capsys.readouterr().out


def test_sample_passes_eta_to_generate(tmp_path, monkeypatch, capsys):
    import vdit.sample

    seen = []
    monkeypatch.setattr(vdit.sample, "load_pipeline", lambda *a, **kw: None)
    monkeypatch.setattr(vdit.sample, "generate", lambda pipe, prompts, num_per_prompt, **kw:
                        seen.append(kw["eta"]) or _videos(len(prompts) * num_per_prompt))
    for i, extra in enumerate((["--sampler", "ddim", "--eta", "0.5"], [])):
        out = str(tmp_path / str(i))
        assert main(["sample", "--workdir", str(tmp_path), "--prompt", "a", "--out", out, *extra]) == 0
    assert seen == [0.5, None]  # unset: the config's sample.eta


def test_sample_into_a_new_out_folder(tmp_path, capsys, no_sampling):
    no_sampling()
    out = tmp_path / "new" / "out"
    assert main(["sample", "--workdir", str(tmp_path), "--prompt", "a", "--prompt", "b", "--num", "2",
                 "--out", str(out)]) == 0
    assert len(list(out.glob("*.mp4"))) == 4


@pytest.mark.parametrize("num", ["0", "-2", "two"])
def test_sample_num_must_be_positive(capsys, num):
    err = _parse_error(capsys, ["sample", "--workdir", "w", "--prompt", "a", "--num", num])
    assert err == f"vdit sample: error: argument --num: expected a positive integer, got '{num}'"


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize("argv, flag", [
    (["sample", "--workdir", "W", "--prompt", "a", "--out", "F"], "--out"),
    (["sample", "--workdir", "F", "--prompt", "a"], "--workdir"),
    (["train", "--config", "tiny", "--workdir", "F"], "--workdir"),
    (["eval", "--workdir", "F"], "--workdir"),
    (["prepare", "moving_shapes", "--data_dir", "F/sub"], "--data_dir"),
    (["demo", "--quick", "--workdir", "W", "--data_dir", "F"], "--data_dir"),
    (["bench", "train", "--config", "tiny", "--profile", "F"], "--profile"),
    (["bench", "train", "--config", "tiny", "--json", "F/out.json"], "--json"),  # before the benchmark runs
])
def test_a_file_where_a_folder_belongs(tmp_path, capsys, no_sampling, argv, flag):
    file = tmp_path / "file"
    file.write_text("keep me")
    argv = [str(file) + a[1:] if a.startswith("F") else str(tmp_path / a) if a == "W" else a for a in argv]
    assert main(argv) == 2
    err = _error(capsys)
    assert f"error: {flag} {file}" in err and "a file, expected a folder" in err
    assert file.read_text() == "keep me" and not (tmp_path / "W").exists()


def test_os_errors_about_paths_are_one_line(tmp_path, capsys, monkeypatch):
    import vdit.demo

    def denied(workdir):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(vdit.demo, "evaluate_workdir", denied)
    assert main(["eval", "--workdir", str(tmp_path)]) == 2
    assert _error(capsys) == f"vdit eval: error: Permission denied: '{tmp_path / 'x'}'"


def test_unreadable_checkpoints_are_one_line_other_runtime_errors_not(tmp_path, capsys, monkeypatch):
    import vdit.demo
    from vdit.checkpoint import CheckpointUnreadableError

    def unreadable(workdir):
        raise CheckpointUnreadableError(f"all checkpoints in {workdir} are unreadable (steps [2]); latest error: x")

    monkeypatch.setattr(vdit.demo, "evaluate_workdir", unreadable)
    assert main(["eval", "--workdir", str(tmp_path)]) == 2
    assert _error(capsys).startswith(f"vdit eval: error: all checkpoints in {tmp_path} are unreadable")

    def bug(workdir):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(vdit.demo, "evaluate_workdir", bug)
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["eval", "--workdir", str(tmp_path)])


# ----------------------------------------------------------------------------- prepare


def test_prepare_tfds_without_tensorflow_is_one_line(tmp_path, capsys, monkeypatch):
    from vdit.data import catalog

    monkeypatch.setattr(catalog, "has_tensorflow", lambda: False)
    assert main(["prepare", "tfds:ucf101", "--data_dir", str(tmp_path)]) == 2
    err = _error(capsys)
    assert err.startswith("vdit prepare: error: tfds:ucf101 needs TensorFlow") and "pip install 'vdit[tf]'" in err


def test_other_import_errors_keep_their_traceback(tmp_path, monkeypatch):
    from vdit.data import catalog

    def broken(*a, **kw):
        raise ImportError("a real bug")

    monkeypatch.setattr(catalog, "prepare_catalog", broken)
    with pytest.raises(ImportError, match="a real bug"):
        main(["prepare", "tfds:ucf101", "--data_dir", str(tmp_path)])


@pytest.mark.parametrize("value", ["a,b", "0.3", "0.1,0.2,0.3"])
def test_prepare_object_size_names_the_format(capsys, value):
    err = _parse_error(capsys, ["prepare", "moving_shapes", "--object_size", value])
    assert err.startswith("vdit prepare: error: argument --object_size: expected 'MIN,MAX'")
    assert err.endswith(f"got '{value}'")


def test_prepare_passes_object_size_and_overwrite(tmp_path, capsys, monkeypatch):
    from vdit.data import folder, moving_shapes

    calls = []
    monkeypatch.setattr(moving_shapes, "prepare_moving_shapes", lambda *a, **kw: calls.append(kw) or "ms")
    monkeypatch.setattr(folder, "prepare_folder", lambda *a, **kw: calls.append(kw) or "folder:x")
    assert main(["prepare", "moving_shapes", "--data_dir", str(tmp_path), "--object_size", "0.2,0.3"]) == 0
    assert main(["prepare", "folder", "--src", "s", "--name", "x", "--overwrite"]) == 0
    assert calls[0]["object_size"] == (0.2, 0.3) and calls[1]["overwrite"] is True

    assert main(["prepare", "moving_shapes", "--overwrite"]) == 2
    assert "--overwrite applies to `vdit prepare folder` only" in _error(capsys)


def test_prepare_folder_conflict_names_the_flag(tmp_path, capsys, monkeypatch):
    from vdit.data import folder

    def prepared(*a, **kw):  # folder.prepare_folder's message for another --frames on a prepared name
        raise ValueError("folder:x is already prepared in /d with {'frames': 5}; pass overwrite=True (--overwrite) "
                         "to rebuild")

    monkeypatch.setattr(folder, "prepare_folder", prepared)
    assert main(["prepare", "folder", "--src", str(tmp_path), "--name", "x", "--frames", "9"]) == 2
    assert _error(capsys).endswith("(--overwrite) to rebuild")


# ----------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("command", [["train", "--config", "tiny"], ["sample", "--prompt", "a red circle"]])
@pytest.mark.parametrize("extra, named", [
    (["--coordinator", "localhost:1234"], "--coordinator"),
    (["--num_processes", "2", "--process_id", "1"], "--num_processes, --process_id"),
])
def test_distributed_flags_need_distributed(tmp_path, capsys, command, extra, named):
    assert main([*command, "--workdir", str(tmp_path / "w"), *extra]) == 2
    assert _error(capsys) == (f"vdit {command[0]}: error: {named} only apply to a multi-process run: "
                              "add --distributed, or leave them out")
    assert not (tmp_path / "w").exists()


def test_distributed_process_id_in_range(tmp_path, capsys):
    argv = ["train", "--config", "tiny", "--workdir", str(tmp_path), "--distributed", "--coordinator", "h:1",
            "--num_processes", "2", "--process_id", "2"]
    assert main(argv) == 2
    assert "0 <= --process_id < --num_processes, got 2 and 2" in _error(capsys)


def test_distributed_without_a_cluster_names_coordinator(tmp_path):
    # A fresh process: jax.distributed must start before any backend, and this one has started.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MPI_"))}
    argv = ["train", "--config", "tiny", "--workdir", str(tmp_path / "w"), "--distributed"]
    result = subprocess.run([sys.executable, "-m", "vdit", *argv], check=False, capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vdit train: error: --distributed found no coordinator")
    assert "--coordinator HOST:PORT --num_processes N --process_id I" in err[0]


# ----------------------------------------------------------------------------- eval


def _demo_workdir(tmp_path, results, samples=()):
    workdir = tmp_path / "demo"
    (workdir / "samples").mkdir(parents=True)
    (workdir / "eval.json").write_text(results if isinstance(results, str) else json.dumps(results))
    for name in samples:
        (workdir / "samples" / f"{name}.mp4").write_bytes(b"")
    return workdir


def test_eval_of_a_missing_workdir(tmp_path, capsys):
    assert main(["eval", "--workdir", str(tmp_path / "nope")]) == 2
    assert _error(capsys) == (f"vdit eval: error: workdir {tmp_path / 'nope'} not found; "
                              f"run `vdit demo --workdir {tmp_path / 'nope'}` first")


def test_eval_of_a_train_workdir_suggests_sample(tmp_path, capsys):
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text("{}")
    assert main(["eval", "--workdir", str(tmp_path)]) == 2
    err = _error(capsys)
    assert "eval.json not found" in err and "looks like a `vdit train` workdir" in err
    assert f"vdit sample --workdir {tmp_path} --prompt" in err


@pytest.mark.parametrize("results, message", [
    ({"schema_version": 1}, "eval.json has no 'seeds' (the demo writes it)"),
    ({"seeds": 0}, "eval.json has seeds=0, expected a positive integer"),
    ("{", "eval.json is not valid JSON"),
])
def test_eval_json_without_seeds(tmp_path, capsys, results, message):
    workdir = _demo_workdir(tmp_path, results)
    assert main(["eval", "--workdir", str(workdir)]) == 2
    err = _error(capsys)
    assert message in err and f"run `vdit demo --workdir {workdir}`" in err


def test_eval_names_missing_samples(tmp_path, capsys):
    from vdit.demo import sample_names

    names = sample_names(2)
    workdir = _demo_workdir(tmp_path, {"seeds": 2}, samples=names[3:])
    assert main(["eval", "--workdir", str(workdir)]) == 2
    err = _error(capsys)
    assert f"lacks 3 of the {len(names)} demo samples eval.json counts ({names[0]}.mp4, " in err
    assert f"run `vdit demo --workdir {workdir}`" in err


def test_eval_names_an_unreadable_sample(tmp_path, capsys):
    from vdit.demo import sample_names

    workdir = _demo_workdir(tmp_path, {"seeds": 2}, samples=sample_names(2))  # empty files
    assert main(["eval", "--workdir", str(workdir)]) == 2
    err = _error(capsys)
    assert err.startswith(f"vdit eval: error: {workdir / 'samples' / sample_names(2)[0]}.mp4 is not a readable video "
                          f"(ffmpeg: "), err


# ----------------------------------------------------------------------------- demo


def test_demo_refuses_samples_it_did_not_write_before_any_work(tmp_path, capsys):
    workdir = tmp_path / "demo"
    (workdir / "samples").mkdir(parents=True)
    (workdir / "samples" / "grid.gif").write_bytes(b"from vdit sample")
    assert main(["demo", "--quick", "--workdir", str(workdir)]) == 2
    err = _error(capsys)
    assert "already holds grid.gif" in err and "not from `vdit demo`" in err
    assert sorted(p.name for p in workdir.iterdir()) == ["samples"]  # no dataset, no training

    from vdit.demo import LABELLED_GRID, check_samples_writable, sample_names

    (workdir / "samples" / LABELLED_GRID).write_bytes(b"")  # an earlier demo's samples: replaced on a rerun
    check_samples_writable(workdir / "samples", sample_names(2))


# ----------------------------------------------------------------------------- overrides


def test_overrides_may_stand_on_both_sides_of_an_option():
    # docs/performance.md's A/B commands: `A="--config ... k=v"; vdit train $A --phase dit k2=v2`
    args = parse_command(build_parser(), ["train", "--config", "shapes_cpu", "--workdir", "W", "data.name=x",
                                          "--phase", "dit", "train.steps=200", "--config.optim.lr", "1e-3"])
    assert args.phase == "dit" and args.overrides == ["data.name=x", "train.steps=200", "optim.lr=1e-3"]


def test_a_stray_word_after_the_overrides_is_still_rejected(capsys):
    argv = ["train", "--config", "tiny", "--workdir", "W", "a.b=1", "--phase", "dit", "stray"]
    assert _parse_error(capsys, argv) == "vdit: error: unrecognized arguments: stray"


def test_bench_json_must_be_a_file_and_sizes_positive(tmp_path, capsys):
    assert main(["bench", "train", "--config", "tiny", "--json", str(tmp_path)]) == 2
    assert _error(capsys) == f"vdit bench: error: --json {tmp_path} is a folder, expected a file to write"
    for argv, flag, bad in ((["sample", "--batch", "0"], "--batch", "'0'"),
                            (["vae", "--frames", "-5"], "--frames", "'-5'"),
                            (["attention", "--seq", "1024,0"], "--seq", "'0'")):
        err = _parse_error(capsys, ["bench", *argv, "--config", "tiny"])
        assert err.startswith(f"vdit bench {argv[0]}: error: argument {flag}: ") and bad in err, err
