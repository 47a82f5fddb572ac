"""`vdit demo --quick` runs end to end, writes every output, and a rerun reuses the work."""

import json

import pytest

from vdit.cli import main


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "demo"
    assert main(["demo", "--quick", "--workdir", str(workdir), "--no_progress"]) == 0
    table = capsys.readouterr().out
    assert "heldout" in table and "color" in table

    results = json.loads((workdir / "eval.json").read_text())
    for key in ("schema_version", "num_videos", "train", "heldout", "confusion", "temporal_consistency",
                "frechet_distance", "vae_psnr_db", "vae_agreement", "timings", "seeds"):
        assert key in results, key
    for group in ("train", "heldout"):
        assert set(results[group]) >= {"count", "color", "shape", "direction", "all_correct"}
    assert results["num_videos"] == 20 * results["seeds"]
    samples = workdir / "samples"
    assert len(list(samples.glob("*.mp4"))) == results["num_videos"]
    assert (samples / "grid_labelled.gif").exists() and (samples / "contact_sheet.png").exists()

    # A second run on the same workdir reuses data and checkpoints: no step is trained again,
    # and it samples with this run's sample settings, not those saved with the checkpoints.
    import vdit.sample

    calls = []
    generate = vdit.sample.generate
    monkeypatch.setattr(vdit.sample, "generate", lambda *a, **kw: calls.append(kw) or generate(*a, **kw))
    before = (workdir / "dit" / "metrics.jsonl").read_text()
    assert main(["demo", "--quick", "--workdir", str(workdir), "--no_progress", "sample.cfg=1.5"]) == 0
    assert (workdir / "dit" / "metrics.jsonl").read_text() == before
    assert [kw["cfg"] for kw in calls] == [1.5]
    assert main(["eval", "--workdir", str(workdir)]) == 0

    # Another batch order than the one the checkpoints were saved with: one line naming it.
    assert main(["demo", "--quick", "--workdir", str(workdir), "--no_progress", "data.batch_size=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data settings that differ from the run that saved it: data.batch_size 16 there, 8 " \
        "here" in err[0] and err[0].endswith("holds a demo run with other overrides: rerun with those, or pass "
                                             "another --workdir)"), err
    assert (workdir / "dit" / "metrics.jsonl").read_text() == before


def test_a_quick_demo_workdir_is_named_as_such(tmp_path):
    from vdit.demo import _other_run

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"data": {"frames": 5, "resolution": 16, "batch_size": 16}}))
    assert _other_run(tmp_path, "vae", quick=False) == (f"{tmp_path} holds a `vdit demo` run with --quick: rerun it "
                                                        f"so, or pass another --workdir")
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"data": {"frames": 17, "resolution": 32, "batch_size": 32}}))
    assert "run without --quick" in _other_run(tmp_path, "vae", quick=True)
    assert "another run" in _other_run(tmp_path, "dit", quick=True)  # nothing recorded there


def test_demo_rejects_an_unknown_override_before_doing_any_work(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert main(["demo", "--quick", "--workdir", str(workdir), "train.step=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vdit demo: error: unknown config key 'train.step'; did you mean 'train.steps'?"]
    assert not workdir.exists()


def test_run_demo_leaves_the_callers_config_alone(tmp_path):
    from vdit.config import load_config
    from vdit.demo import run_demo

    config = load_config("shapes_cpu")
    before = config.to_json()
    with pytest.raises(ValueError, match="train.steps"):
        run_demo(tmp_path / "demo", config=config, overrides=["train.steps=7", "train.step=5"])
    assert config.to_json() == before and not (tmp_path / "demo").exists()
