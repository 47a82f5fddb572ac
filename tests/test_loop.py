"""The training loop end to end: exact resume, preemption, non-finite abort, sampling to files."""

import json
import logging
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vdit.config import load_config, override
from vdit.data.moving_shapes import prepare_moving_shapes
from vdit.loop import NonFiniteLossError, VaeChangedError, train
from vdit.metrics import read_metrics

# Under xdist (`--dist loadgroup`, pyproject.toml) one worker trains the `vae_workdir` fixture's VAE once.
pytestmark = pytest.mark.xdist_group("loop")

REPO = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    name = prepare_moving_shapes(root, frames=5, resolution=16, num_train=64, num_validation=16, num_heldout=16,
                                 progress=False)
    return str(root), name


def tiny(data, *extra):
    root, name = data
    return override(load_config("tiny"), [f"data.name={name}", f"data.data_dir={root}", "train.log_every=1",
                                          "vae_train.steps=4", "vae_train.checkpoint_every=4", *extra])


@pytest.fixture(scope="module")
def vae_workdir(data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vae_run")
    summary = train(tiny(data), workdir, "vae", progress=False)
    assert summary == {"phase": "vae", "step": 4, "status": "done", "workdir": str(workdir)}
    return workdir


def _with_vae(vae_workdir, dest):
    shutil.copytree(vae_workdir / "vae", dest / "vae")
    return dest


def _final_params(workdir, phase="dit"):
    from vdit.loop import load_params
    from vdit.models import build_models
    from vdit.sharding import make_mesh, rules_from_config

    config = load_config("tiny")
    models = build_models(config)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    return jax.device_get(load_params(workdir, phase, config, models, mesh,
                                      rules_from_config(config.sharding_rules), ema=False))


def _losses(workdir):
    """The ``(step, loss)`` pairs the DiT run in ``workdir`` logged."""
    return [(r["step"], r["loss"]) for r in read_metrics(workdir / "dit") if "loss" in r]


def _assert_same_params(a, b, atol=0.0):
    for x, y in zip(jax.tree.leaves(_final_params(a)), jax.tree.leaves(_final_params(b)), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_interrupted_run_equals_uninterrupted(data, vae_workdir, tmp_path, caplog):
    config = tiny(data, "train.steps=12", "train.checkpoint_every=100", "train.eval_every=0")
    straight = _with_vae(vae_workdir, tmp_path / "straight")
    assert train(config, straight, "dit", progress=False)["step"] == 12

    resumed = _with_vae(vae_workdir, tmp_path / "resumed")
    assert train(config, resumed, "dit", stop_after=5, progress=False)["status"] == "stopped"
    assert train(config, resumed, "dit", stop_after=4, progress=False)["step"] == 9
    assert train(config, resumed, "dit", progress=False) ["step"] == 12

    assert _losses(resumed) == _losses(straight) and len(_losses(straight)) == 12  # bit-identical, every step
    _assert_same_params(resumed, straight)
    # Fewer steps than the checkpoint holds: nothing runs, and the log says so.
    with caplog.at_level(logging.WARNING, logger="vdit"):
        fewer = tiny(data, "train.steps=8", "train.checkpoint_every=100", "train.eval_every=0")
        assert train(fewer, resumed, "dit", progress=False)["step"] == 12
    assert "is at step 12, past train.steps=8: nothing to train (set train.steps above 12 to train on)" in caplog.text


def test_resuming_with_another_model_names_the_changed_settings(data, vae_workdir, tmp_path):
    from vdit.checkpoint import CheckpointMismatch

    workdir = _with_vae(vae_workdir, tmp_path / "w")
    assert train(tiny(data, "train.steps=2", "train.eval_every=0"), workdir, "dit", progress=False)["step"] == 2
    # remat and scan_layers do not change what a checkpoint holds: only the depth is named.
    changed = tiny(data, "train.steps=4", "train.eval_every=0", "dit.depth=3", "dit.scan_layers=true", "dit.remat=full")
    with pytest.raises(CheckpointMismatch, match=r"holds another model .*: model settings that differ from the run "
                                                 r"that saved it: dit.depth 2 there, 3 here\. "
                                                 r"Resume with the settings it was trained with, or train into a new "
                                                 r"--workdir$"):
        train(changed, workdir, "dit", progress=False)
    # Micro-batch accumulation keeps state of its own in the optimizer: named too (it once read "no setting differs").
    with pytest.raises(CheckpointMismatch, match=r"settings that differ from the run that saved it: optim.grad_accum "
                                                 r"1 there, 2 here\."):
        train(tiny(data, "train.steps=4", "train.eval_every=0", "optim.grad_accum=2"), workdir, "dit", progress=False)
    # Another batch order (here a shuffle seed): the saved data position does not fit it. Every
    # step would fail alike; this once read "all checkpoints are unreadable".
    reordered = tiny(data, "train.steps=4", "train.eval_every=0", "data.shuffle_seed=3")
    with pytest.raises(CheckpointMismatch, match=r"holds the data position of another batch order .*: data settings "
                                                 r"that differ from the run that saved it: data.shuffle_seed 0 there, "
                                                 r"3 here\. Resume with the settings"):
        train(reordered, workdir, "dit", progress=False)
    assert sorted(p.name for p in (workdir / "dit" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_resume_and_load_across_scan_layers(data, vae_workdir, tmp_path):
    # A run saved with unrolled blocks resumes scanned (and the scanned checkpoint loads back
    # unrolled): the same numbers in another layout, so the same run as one that never switched.
    config = tiny(data, "train.steps=4", "train.checkpoint_every=100", "train.eval_every=0")
    straight = _with_vae(vae_workdir, tmp_path / "straight")
    assert train(config, straight, "dit", progress=False)["step"] == 4
    switched = _with_vae(vae_workdir, tmp_path / "switched")
    assert train(config, switched, "dit", stop_after=2, progress=False)["status"] == "stopped"
    scanned = override(config, ["dit.scan_layers=true", "dit.remat=full"])
    assert train(scanned, switched, "dit", progress=False)["step"] == 4

    assert [s for s, _ in _losses(switched)] == [1, 2, 3, 4]
    np.testing.assert_allclose(np.array(_losses(switched)), np.array(_losses(straight)), rtol=1e-5)
    _assert_same_params(switched, straight, atol=1e-5)


def test_nonfinite_loss_aborts_naming_step_and_checkpoint(data, vae_workdir, tmp_path):
    config = tiny(data, "train.steps=8", "train.checkpoint_every=2", "optim.lr=1e30", "optim.warmup_steps=0",
                  "optim.clip_norm=1e30", "train.eval_every=0")
    workdir = _with_vae(vae_workdir, tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match=r"dit loss is not finite at step \d+; last good checkpoint: step"):
        train(config, workdir, "dit", progress=False)


def test_sigterm_saves_exits_zero_and_relaunch_resumes(data, vae_workdir, tmp_path):
    root, name = data
    workdir = _with_vae(vae_workdir, tmp_path / "preempt")
    cmd = [sys.executable, "-m", "vdit", "train", "--config", "tiny", "--workdir", str(workdir), "--phase", "dit",
           "--no_progress", f"data.name={name}", f"data.data_dir={root}", "train.log_every=1", "train.steps=400",
           "train.checkpoint_every=1000", "train.eval_every=0"]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    metrics = workdir / "dit" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(read_metrics(workdir / "dit")) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-2000:]
    assert "preempted; saved step" in out
    saved = int(out.split("preempted; saved step ")[1].split()[0])
    assert 3 <= saved < 400
    assert (workdir / "dit" / "checkpoints" / str(saved)).is_dir()

    # The relaunch resumes from that step (a shorter run so the test stays quick).
    done = subprocess.run(cmd[:-3] + [f"train.steps={saved + 2}", "train.checkpoint_every=1000", "train.eval_every=0"],
                          env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    steps = [r["step"] for r in read_metrics(workdir / "dit") if "loss" in r]
    assert steps[-2:] == [saved + 1, saved + 2] and steps.count(saved) == 1


def test_two_processes_train_the_same_vae_bitwise(data, tmp_path):
    # As the demo runs it: a fresh process each, two XLA:CPU devices (so a cross-device
    # gradient reduction), the data loader's threads. Nothing may vary from run to run.
    root, name = data
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    runs = [tmp_path / "first", tmp_path / "second"]
    for workdir in runs:
        cmd = [sys.executable, "-m", "vdit", "train", "--config", "tiny", "--workdir", str(workdir), "--phase", "vae",
               "--no_progress", f"data.name={name}", f"data.data_dir={root}", "cpu_devices=2", "vae_train.steps=6",
               "vae_train.checkpoint_every=6", "vae_train.log_every=1"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    losses = [[(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(w / "vae") if "loss" in r] for w in runs]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    first, second = (_final_params(w, "vae") for w in runs)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(a, b)


def test_sample_writes_readable_videos(data, vae_workdir, tmp_path):
    import mediapy

    from vdit.cli import main

    workdir = _with_vae(vae_workdir, tmp_path / "sample")
    train(tiny(data, "train.steps=2", "train.eval_every=0"), workdir, "dit", progress=False)
    out = tmp_path / "out"
    assert main(["sample", "--workdir", str(workdir), "--prompt", "a red circle moving left", "--prompt",
                 "a blue square moving up", "--num", "2", "--steps", "3", "--out", str(out)]) == 0
    mp4s = sorted(out.glob("*.mp4"))
    assert len(mp4s) == 4 and (out / "contact_sheet.png").exists() and (out / "grid.gif").exists()
    video = mediapy.read_video(mp4s[0])
    assert video.shape[0] == 5 and video.shape[-1] == 3

    # On a mesh: the same videos, from parameters that stay sharded as the run's rules say.
    from vdit import sample
    from vdit.sample import generate, load_pipeline, sample_mesh

    prompts = ["a red circle moving left", "a blue square moving up"]
    one = generate(load_pipeline(workdir), prompts, num_per_prompt=2, steps=3)
    pipe = load_pipeline(workdir, mesh=sample_mesh(None, "data=2,fsdp=-1"))
    assert dict(pipe.mesh.shape)["fsdp"] == 4
    axes = lambda spec: {a for e in spec for a in (e if isinstance(e, tuple) else (e,))}  # noqa: E731
    assert any("fsdp" in axes(x.sharding.spec) for x in jax.tree.leaves(pipe.params["dit"]))
    assert sample._lives_on(pipe.params, pipe.mesh)  # so generate samples on them as they are
    assert np.abs(generate(pipe, prompts, num_per_prompt=2, steps=3).astype(int) - one).max() <= 1
    mesh_out = tmp_path / "mesh"
    assert main(["sample", "--workdir", str(workdir), "--prompt", prompts[0], "--steps", "3", "--mesh", "config",
                 "--out", str(mesh_out)]) == 0
    assert len(list(mesh_out.glob("*.mp4"))) == 1 and (mesh_out / "contact_sheet.png").exists()


def test_cached_latents_train_like_online_encoding(data, vae_workdir, tmp_path):
    # Same data order and RNG: training from the cache must follow the on-the-fly run.
    runs = {}
    for mode in ("online", "cached"):
        workdir = _with_vae(vae_workdir, tmp_path / mode)
        train(tiny(data, "train.steps=4", f"train.latents={mode}", "train.eval_every=0"), workdir, "dit",
              progress=False)
        runs[mode] = [r["loss"] for r in read_metrics(workdir / "dit") if "loss" in r]
    assert (tmp_path / "cached" / "latents" / "latents.npy").exists()
    np.testing.assert_allclose(runs["cached"], runs["online"], rtol=1e-5)

    # Latents are normalised with statistics measured on the training clips (all 64 here),
    # recorded next to the VAE and in the DiT's config, which sampling reads.
    stats = json.loads((tmp_path / "cached" / "vae" / "latent_stats.json").read_text())
    saved = json.loads((tmp_path / "cached" / "dit" / "config.json").read_text())["vae"]
    np.testing.assert_allclose(saved["latents_mean"], stats["latents_mean"])
    np.testing.assert_allclose(saved["latents_std"], stats["latents_std"])
    assert min(stats["latents_std"]) > 1e-3
    cached = np.load(tmp_path / "cached" / "latents" / "latents.npy")
    np.testing.assert_allclose(cached.mean(axis=(0, 1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(cached.std(axis=(0, 1, 2, 3)), 1.0, atol=1e-3)
    # The cache holds token ids: a run with another tokenizer must not train on them.
    shutil.rmtree(tmp_path / "cached" / "dit")
    with pytest.raises(ValueError, match=r"latent cache .* built with tokenizer='ByteTokenizer.*this run has "
                                         r"tokenizer='WordTokenizer"):
        train(tiny(data, "train.steps=1", "train.latents=cached", "text.tokenizer=words"), tmp_path / "cached", "dit",
              progress=False)
    with pytest.raises(ValueError, match="train.latents='disk'"):
        train(tiny(data, "train.latents=disk"), _with_vae(vae_workdir, tmp_path / "bad"), "dit", progress=False)


def test_vae_trains_on_random_crops(data, tmp_path):
    # 8x8 windows of the 16x16 clips; the trained VAE still encodes and decodes whole frames.
    summary = train(tiny(data, "vae_train.crop=8", "vae_train.steps=2", "vae_train.checkpoint_every=2"),
                    tmp_path / "crop", "vae", progress=False)
    assert summary["status"] == "done" and summary["step"] == 2
    from vdit.loop import build_run

    run = build_run(tiny(data, "vae_train.crop=8"), tmp_path / "crop", "vae", progress=False)
    assert next(run.iterator)["video"].shape[1:] == (5, 8, 8, 3)
    with pytest.raises(ValueError, match=r"vae_train.crop=6: expected 0 \(whole frames\) or a positive multiple of "
                                         r"the VAE's spatial factor 4"):
        train(tiny(data, "vae_train.crop=6"), tmp_path / "bad", "vae", progress=False)
    assert not (tmp_path / "bad" / "vae").exists() or not any((tmp_path / "bad" / "vae").iterdir())


def test_vae_trains_on_short_clips_first_and_resumes_exactly(data, tmp_path):
    # Steps 1-2 on 1-frame windows (images), 3-4 on the data's 5 frames. A run stopped inside
    # the short steps, and again at the switch, ends where an uninterrupted one does.
    short = ("vae_train.short_frames=1", "vae_train.short_steps=2", "vae_train.log_every=1",
             "vae_train.checkpoint_every=100")
    config = tiny(data, *short)
    straight, resumed, plain = tmp_path / "straight", tmp_path / "resumed", tmp_path / "plain"
    assert train(config, straight, "vae", progress=False)["step"] == 4
    assert train(config, resumed, "vae", stop_after=1, progress=False)["status"] == "stopped"
    assert train(config, resumed, "vae", stop_after=1, progress=False)["step"] == 2
    assert train(config, resumed, "vae", progress=False)["step"] == 4
    assert train(tiny(data, *short[2:]), plain, "vae", progress=False)["step"] == 4

    def losses(workdir):
        return [(r["step"], r["loss"]) for r in read_metrics(workdir / "vae") if "loss" in r]

    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4  # bit-identical, every step
    for x, y in zip(jax.tree.leaves(_final_params(resumed, "vae")), jax.tree.leaves(_final_params(straight, "vae")),
                    strict=True):
        np.testing.assert_array_equal(x, y)
    assert losses(plain)[0] != losses(straight)[0]  # the first steps saw other clips
    # One compilation per clip length, each logged (compile_s is the running total).
    compiles = [r["compile_s"] for r in read_metrics(straight / "vae") if "compile_s" in r]
    assert [r["step"] for r in read_metrics(straight / "vae") if "compile_s" in r] == [1, 3]
    assert 0 < compiles[0] < compiles[1]
    # And each compile logs its executable's temp memory per device: more for the longer clips.
    temps = [r["step_temp_mib"] for r in read_metrics(straight / "vae") if "compile_s" in r]
    assert 0 < temps[0] < temps[1]


@pytest.mark.parametrize("settings, message", [
    (("vae_train.short_steps=2",), r"vae_train.short_steps=2 needs vae_train.short_frames, the length of those first "
                                   r"clips \(1 \+ 4k frames, fewer than the 5 trained on after\)"),
    (("vae_train.short_steps=2", "vae_train.short_frames=5"),
     r"vae_train.short_frames=5: expected fewer than the 5 frames the VAE trains on after its first 2 steps"),
    (("vae_train.short_steps=2", "vae_train.short_frames=3"), r"vae_train.short_frames=3: expected 1 \+ 4k frames"),
    (("vae_train.short_steps=-1",), r"vae_train.short_steps=-1: expected an integer >= 0"),
])
def test_bad_short_clip_settings_fail_in_one_line(data, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        train(tiny(data, *settings), tmp_path / "w", "vae", progress=False)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("phase, setting, message", [
    ("dit", "train.steps=0", r"train.steps=0: expected an integer >= 1 \(the step to train to\)"),
    ("vae", "vae_train.steps=-5", r"vae_train.steps=-5: expected an integer >= 1"),
    ("vae", "train.steps=0", r"train.steps=0: expected"),  # `vdit train` would train the VAE first
    ("vae", "vae_train.log_every=0", r"vae_train.log_every=0: expected an integer >= 1"),
    ("dit", "train.checkpoint_every=0", r"train.checkpoint_every=0: expected an integer >= 1"),
    ("vae", "vae_train.keep_checkpoints=0", r"vae_train.keep_checkpoints=0: expected an integer >= 1"),
    ("dit", "train.eval_every=-1", r"train.eval_every=-1: expected an integer >= 0"),
    ("vae", "vae_train.frames=6", r"vae_train.frames=6: expected 1 \+ 4k frames .*, or 0 for data.frames"),
    ("dit", "data.resolution=32", (r"data.resolution=32 but moving_shapes/\S+ stores 16x16 frames and clips are "
                                   r"never resized: set data.resolution=16, or prepare the dataset at 32x32")),
    ("vae", "data.resolution=8", (r"data.resolution=8 but .* stores 16x16 frames .*; vae_train.crop=8 trains the "
                                  r"VAE on 8x8 windows$")),
    ("dit", "data.frames=9", (r"data.frames=9 but moving_shapes/\S+ stores 5-frame clips: set data.frames to at "
                              r"most 5")),
    # 8 CPU devices (conftest) on the data axis: the message names the batch the VAE phase uses
    ("vae", "vae_train.batch_size=12", r"vae_train.batch_size=12 must be divisible by the batch mesh axes .* = 8"),
    ("dit", "data.batch_size=12", r"data.batch_size=12 must be divisible by the batch mesh axes data x fsdp = 8"),
    # Settings the DiT phase or the optimizer would reject only after the whole VAE phase: checked first.
    ("vae", "train.latents=disk", r"train.latents='disk': expected 'online' \(encode every step\) or 'cached'"),
    ("vae", "optim.decay=linear", r"optim.decay='linear': expected 'cosine' or 'constant'"),
    ("dit", "vae_optim.decay=linear", r"vae_optim.decay='linear': expected"),
    ("vae", "optim.lr=-0.001", r"optim.lr=-0.001: expected a finite number >= 0"),
    ("vae", "vae_optim.grad_accum=0", r"vae_optim.grad_accum=0: expected an integer >= 1"),
    ("vae", "dit.patch_size=(1,8,8)", r"data.resolution=16 gives latents of H=4, which dit.patch_size=\(1, 8, 8\) does "
                                      r"not divide into whole patches"),
    ("vae", "dit.patch_size=(3,2,2)", r"data.frames=5 gives latents of T=2, which dit.patch_size=\(3, 2, 2\)"),
    ("vae", "dit.in_channels=8", r"dit.in_channels=8 must equal vae.z_dim=4"),
    ("vae", "vae.dim_mult=()", r"vae.dim_mult=\(\): expected one channel multiplier per resolution level"),
    ("vae", "dit.patch_size=(2,2)", r"dit.patch_size=\(2, 2\): expected three positive integers"),
    # 16 validation clips: the eval loss's one batch of 24 would be dropped as partial (it read 0.0)
    ("dit", "data.batch_size=24", r"train.eval_every=10 evaluates on one batch of 24 validation clips, but "
                                  r"moving_shapes/\S+ has 16: set train.eval_every=0, or prepare at least 24"),
])
def test_bad_settings_fail_before_anything_is_written(data, tmp_path, phase, setting, message):
    with pytest.raises(ValueError, match=message):
        train(tiny(data, setting), tmp_path / "w", phase, progress=False)
    assert not (tmp_path / "w").exists()


def test_cli_rejects_zero_steps_in_one_line(data, tmp_path, capsys):
    from vdit.cli import main

    root, name = data
    assert main(["train", "--config", "tiny", "--workdir", str(tmp_path / "w"), "--phase", "dit", "--no_progress",
                 f"data.name={name}", f"data.data_dir={root}", "train.steps=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vdit train: error: train.steps=0: expected an integer >= 1") and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_missing_dit_names_a_runnable_train_command(vae_workdir, tmp_path):
    from vdit.cli import build_parser
    from vdit.loop import load_params
    from vdit.models import build_models
    from vdit.sharding import make_mesh, rules_from_config

    workdir = _with_vae(vae_workdir, tmp_path / "has space")
    config = load_config("tiny")
    with pytest.raises(FileNotFoundError, match=r"no dit checkpoint in .*; train it first with `vdit train "
                                                r"--config .*config.json' --workdir .* --phase dit`$") as e:
        load_params(workdir, "dit", config, build_models(config), make_mesh({"data": 1}, jax.devices()[:1]),
                    rules_from_config(config.sharding_rules))
    command = shlex.split(str(e.value).split("`")[1])
    args = build_parser().parse_args(command[1:])
    recorded = workdir / "vae" / "config.json"
    assert (args.command, args.config, args.workdir, args.phase) == ("train", str(recorded), str(workdir), "dit")
    # the VAE run's whole config, overrides included
    assert json.loads(load_config(args.config).to_json_best_effort()) == json.loads(recorded.read_text())

    with pytest.raises(FileNotFoundError, match=r"--config CONFIG --workdir .* --phase vae` \(CONFIG: "):
        load_params(tmp_path / "empty", "vae", config, build_models(config), make_mesh({"data": 1}, jax.devices()[:1]),
                    rules_from_config(config.sharding_rules))
    assert not (tmp_path / "empty").exists()  # a reader creates nothing, however mistyped the workdir
    assert not (workdir / "dit").exists()


def test_dit_refuses_a_vae_trained_on_after_it(data, vae_workdir, tmp_path, caplog, capsys):
    from vdit.cli import main

    workdir = _with_vae(vae_workdir, tmp_path / "w")
    dit = tiny(data, "train.steps=2", "train.eval_every=0", "train.latents=cached")
    assert train(dit, workdir, "dit", progress=False)["step"] == 2
    assert json.loads((workdir / "dit" / "vae_step.json").read_text()) == {"vae_step": 4}
    assert json.loads((workdir / "vae" / "latent_stats.json").read_text())["vae_step"] == 4

    with caplog.at_level(logging.WARNING, logger="vdit"):
        assert train(tiny(data, "vae_train.steps=12", "vae_train.keep_checkpoints=1"), workdir, "vae",
                     progress=False)["step"] == 12
    assert "trained on the latents of VAE step 4: that DiT does not fit the new VAE" in caplog.text
    assert "VAE step 4 is kept, so moving the newer ones out" in caplog.text
    # keep_checkpoints=1 deleted step 8, never step 4: the DiT's VAE
    assert sorted(int(p.name) for p in (workdir / "vae" / "checkpoints").iterdir() if p.name.isdigit()) == [4, 12]
    moved = shutil.copytree(workdir, tmp_path / "moved")
    shutil.rmtree(moved / "vae" / "checkpoints" / "12")
    _final_params(moved)  # as the refusal below advises

    refused = (r"the DiT in \S+ was trained on the latents of VAE step 4, but the VAE in \S+ is at step 12: it "
               r"would decode latents the DiT never learned\. Train a DiT for this VAE in a new --workdir")
    with pytest.raises(VaeChangedError, match=refused):
        _final_params(workdir)
    stats = (workdir / "vae" / "latent_stats.json").read_text()
    with pytest.raises(VaeChangedError, match=refused):  # resuming, before statistics or latents are redone
        train(tiny(data, "train.steps=4", "train.eval_every=0", "train.latents=cached"), workdir, "dit",
              progress=False)
    assert (workdir / "vae" / "latent_stats.json").read_text() == stats
    assert sorted(p.name for p in (workdir / "dit" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert main(["sample", "--workdir", str(workdir), "--prompt", "a red circle", "--steps", "2",
                 "--out", str(tmp_path / "out")]) == 2
    assert "was trained on the latents of VAE step 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # A workdir from before the record: accepted as it always was.
    old = shutil.copytree(workdir, tmp_path / "old")
    (old / "dit" / "vae_step.json").unlink()
    _final_params(old)

    # A new DiT here: statistics are measured again; the latents cached with VAE step 4 are refused.
    shutil.rmtree(workdir / "dit")
    with caplog.at_level(logging.WARNING, logger="vdit"), pytest.raises(
            ValueError, match=r"latent cache \S+ was built with vae_step=4, this run has vae_step=12; delete"):
        train(dit, workdir, "dit", progress=False)
    assert "holds statistics of VAE step 4; the VAE is at step 12: measuring them again" in caplog.text
    assert json.loads((workdir / "vae" / "latent_stats.json").read_text())["vae_step"] == 12
