"""The TPU VM launcher and the SLURM script: what they would run, checked without a cloud or a cluster.

Dry runs print every command; these tests check each is there, in order, with the
right flags, that the shell snippets sent to the workers parse, that the ``vdit``
commands parse with vdit's own argument parser, that the preemption loop relaunches,
and that bad input is a one-line error.
"""

import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys
import tomllib

import pytest

from vdit.cli import _split_overrides, build_parser

REPO = pathlib.Path(__file__).parent.parent
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
_spec = importlib.util.spec_from_file_location("tpu_launch", REPO / "scripts" / "tpu_vm" / "launch.py")
launch = sys.modules["tpu_launch"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(launch)

POD = ["train", "--name", "vdit-small", "--zone", "us-east5-a", "--project", "proj", "--accelerator-type", "v5p-64",
       "--spot", "--dry-run", "--", "--config", "small", "--workdir", "gs://bkt/runs/small",
       "--config.mesh.data=1", "--config.mesh.fsdp=-1"]


def dry_run(argv) -> list[list[str]]:
    """The launcher's dry-run commands (comment lines dropped), each split into its argv."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "tpu_vm" / "launch.py"), *argv], check=True,
                         capture_output=True, text=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def remote(cmd: list[str]) -> str:
    """The shell command an ``ssh --command=...`` runs on the workers."""
    (value,) = [a.removeprefix("--command=") for a in cmd if a.startswith("--command=")]
    return value


def assert_bash_parses(script: str):
    result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, f"{script!r}: {result.stderr}"


def vdit_args(words: list[str], command: str) -> list[str]:
    """The arguments after ``python3 -m vdit COMMAND`` in a shell command line."""
    i = words.index("vdit")
    assert words[i - 2:i + 2] == ["python3", "-m", "vdit", command], words
    return words[i + 2:words.index(">") if ">" in words else len(words)]


def test_pod_dry_run_prints_every_command_in_order():
    cmds = dry_run(POD)
    kinds = [" ".join(c[3:5]) if c[2] == "tpus" else c[0] for c in cmds]
    assert kinds == ["queued-resources create", "queued-resources describe", "tpu-vm ssh", "tpu-vm ssh",
                     "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "queued-resources describe", "tpu-vm ssh",
                     "queued-resources delete"]
    create, describe, install, mount, prepare, train, logs, _, status, delete = cmds
    assert create[5] == "vdit-small" and {"--node-id=vdit-small", "--zone=us-east5-a", "--project=proj",
                                          "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
                                          "--spot"} == set(create[6:])
    assert "--format=value(state.state)" in describe and {"--force", "--quiet"} <= set(delete)
    for cmd in (install, mount, prepare, train):
        assert "--worker=all" in cmd and cmd[5] == "vdit-small"
    for cmd in (logs, status):
        assert "--worker=0" in cmd
    for cmd in (install, mount, prepare, train, logs, status):
        assert_bash_parses(remote(cmd))

    assert 'pip install -q "vdit[tpu] @ git+https://github.com/vdit-dev/vdit"' in remote(install)
    assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 bkt /gcs/bkt" in remote(mount)
    # Every worker builds the dataset the config trains on: small's 33 frames at 128x128.
    prep = build_parser().parse_args(["prepare", *vdit_args(shlex.split(remote(prepare)), "prepare")])
    assert (prep.dataset, prep.frames, prep.resolution) == ("moving_shapes", 33, 128)

    # The detached job: `nohup bash -c '<vdit train ...> > train.log 2>&1; echo $? > train.exit' &`.
    words = shlex.split(remote(train))
    job = words[words.index("nohup") + 3]
    assert_bash_parses(job)
    args = build_parser().parse_args(["train", *_split_overrides(vdit_args(shlex.split(job), "train"))])
    assert args.distributed and args.no_progress and args.config == "small"
    assert args.workdir == "/gcs/bkt/runs/small"  # gs:// as the gcsfuse mount every worker has
    assert args.overrides == ["mesh.data=1", "mesh.fsdp=-1", "data.name=moving_shapes/f33_r128"]
    assert "echo $? > train.exit" in job


def test_single_host_dry_run_needs_no_bucket_or_distributed():
    cmds = dry_run(["train", "--name", "v4", "--zone", "us-central2-b", "--accelerator-type", "v4-8", "--dry-run",
                    "--", "--config", "tiny", "--workdir", "/home/me/run", "--config.data.name=moving_shapes/f5_r16"])
    create = cmds[0]
    assert "--accelerator-type=v4-8" in create and "--runtime-version=tpu-ubuntu2204-base" in create
    assert not any(a in create for a in ("--spot", "--reserved", "--project"))
    scripts = [remote(c) for c in cmds if "ssh" in c]
    assert not any("gcsfuse" in s for s in scripts)
    assert any("vdit prepare moving_shapes --frames=5 --resolution=16" in s for s in scripts)
    train = next(s for s in scripts if "vdit train" in s)
    assert "--distributed" not in train and "--workdir /home/me/run" in train


@pytest.mark.parametrize("accelerator, hosts, devices", [
    ("v2-8", 1, 8), ("v3-32", 4, 32), ("v4-8", 1, 4), ("v4-32", 4, 16), ("v5p-8", 1, 4), ("v5p-64", 8, 32),
    ("v5litepod-1", 1, 1), ("v5litepod-8", 1, 8), ("v5litepod-16", 4, 16), ("v6e-8", 1, 8), ("v6e-256", 64, 256),
])
def test_accelerator_types_resolve_to_hosts_and_devices(accelerator, hosts, devices):
    tpu = launch.parse_accelerator_type(accelerator)
    assert (tpu.hosts, tpu.devices) == (hosts, devices)


@pytest.mark.parametrize("change, message", [
    ({"--accelerator-type": "v9-8"}, "unknown accelerator type 'v9-8'; expected v2-N"),
    ({"--accelerator-type": "v4-12"}, "v4-12: no such slice size (TensorCores)"),
    ({"--accelerator-type": "v4-8", "extra": "--config.mesh.fsdp=8"}, "v4-8 has 4 devices: mesh data=1 x fsdp=8 "),
    ({"extra": "--config.mesh.tensor=3"}, "mesh data=1 x fsdp=-1 x context=1 x tensor=3 cannot fill 32 devices"),
    ({"extra": "--config.data.batch_size=40"},
     "data.batch_size=40 must be a multiple of 32 on v5p-64: divisible by data x fsdp = 32 and by its 8 processes"),
    ({"--workdir": "/home/me/run"}, "is a local path but its 8 hosts must share it; use gs://BUCKET/path"),
    ({"--workdir": "gs://"}, "'gs://' names no bucket"),
    ({"extra": "--config.mesh.fdsp=2"}, "unknown config key 'mesh.fdsp'; did you mean 'mesh.fsdp'?"),
    ({"extra": "--distributed"}, "leave --distributed and its flags out"),
    ({"extra": "--steps=3"}, "unexpected vdit train arguments --steps=3"),
])
def test_bad_input_is_a_one_line_error(change, message, capsys):
    argv = ["train", "--name", "x", "--zone", "z", "--accelerator-type", "v5p-64", "--dry-run", "--",
            "--config", "small", "--workdir", "gs://b/r", "--config.mesh.data=1", "--config.mesh.fsdp=-1"]
    for flag, value in change.items():
        if flag == "extra":
            argv.append(value)
        else:
            argv[argv.index(flag) + 1] = value
    assert launch.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("launch.py train: error: "), err
    assert message in err, err


class FakeShell(launch.Shell):
    """Answers `describe` and `status` from scripts and records every command."""

    def __init__(self, states, statuses, fail_once=()):
        self.states, self.statuses, self.log, self.fail_once = list(states), list(statuses), [], set(fail_once)

    def run(self, cmd, *, check=True):
        kind = self.kind(cmd)
        self.log.append(kind)
        if kind in self.fail_once:
            self.fail_once.remove(kind)
            raise subprocess.CalledProcessError(255, cmd)
        return {"describe": lambda: self.states.pop(0), "status": lambda: self.statuses.pop(0)}.get(kind, str)()

    def stream(self, cmd):
        self.log.append(self.kind(cmd))
        return subprocess.Popen(["sleep", "60"])

    def sleep(self, seconds):
        self.log.append("sleep")

    @staticmethod
    def kind(cmd):
        if cmd[3] == "queued-resources":
            return cmd[4]
        script = remote(cmd)
        return next(k for k, key in (("logs", "tail -n"), ("status", "train.exit ||"), ("train", "vdit train"),
                                     ("prepare", "vdit prepare"), ("mount", "gcsfuse"), ("install", "pip install"))
                    if key in script)


def _pod_plan():
    args = launch.build_parser().parse_args(POD)
    args.train_args = args.train_args[1:]
    return launch.make_plan(args)


def test_watch_loop_relaunches_after_preemption_until_training_finishes():
    shell = FakeShell(states=["WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "SUSPENDED", "PROVISIONING", "ACTIVE",
                              "ACTIVE", "ACTIVE", "ACTIVE"],
                      statuses=["running", "preempted 0", "finished 0"])
    code = launch.run_train(_pod_plan(), shell=shell, poll_seconds=1, max_relaunches=3, log=lambda _: None)
    assert code == 0
    setup = ["install", "mount", "prepare", "train", "logs"]
    assert shell.log == [
        "create", "describe", "sleep",                       # waiting for capacity
        "describe", *setup, "sleep",                         # ACTIVE: set up, start training, follow the log
        "describe", "status", "sleep",                       # running
        "describe", "delete", "create", "sleep",             # preempted: a new slice
        "describe", "sleep",
        "describe", *setup, "sleep",                         # set up again; vdit train resumes from the bucket
        "describe", "status", "train", "sleep",              # vdit stopped on SIGTERM, slice still up: restart
        "describe", "status",                                # finished
    ]


def test_watch_loop_retries_setup_when_ssh_fails():
    shell = FakeShell(states=["ACTIVE", "ACTIVE", "ACTIVE"], statuses=["finished 3"], fail_once=["mount"])
    assert launch.run_train(_pod_plan(), shell=shell, poll_seconds=1, max_relaunches=1, log=lambda _: None) == 3
    assert shell.log == ["create", "describe", "install", "mount", "sleep",
                         "describe", "install", "mount", "prepare", "train", "logs", "sleep", "describe", "status"]


def test_watch_loop_gives_up_after_max_relaunches():
    shell = FakeShell(states=["ACTIVE", "FAILED", "FAILED"], statuses=[])
    assert launch.run_train(_pod_plan(), shell=shell, poll_seconds=1, max_relaunches=1, log=lambda _: None) == 1
    assert shell.log.count("create") == 2 and shell.log[-1] == "describe"


def test_launcher_installs_from_the_projects_repository():
    urls = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]
    assert launch.REPO_URL == urls["Repository"]


# ------------------------------------------------------------------ SLURM


def sbatch(*args, **env):
    return subprocess.run(["bash", str(SBATCH), *args], capture_output=True, text=True,
                          env=dict(os.environ, VDIT_DRY_RUN="1", **env))


def test_slurm_dry_run_prints_srun_then_requeue():
    result = sbatch("--config", "small", "--workdir", "/shared/run", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                    SLURM_JOB_NUM_NODES="4", SLURM_NTASKS="32", SLURM_JOB_ID="77")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert "32 processes, one per GPU, on 4 nodes (job 77" in result.stdout
    srun, requeue = (shlex.split(line) for line in lines)
    assert srun[:5] == ["srun", "--kill-on-bad-exit=1", "python", "-m", "vdit"]
    args = build_parser().parse_args(_split_overrides(srun[4 + 1:]))
    assert args.command == "train" and args.distributed and args.no_progress
    assert (args.config, args.workdir, args.overrides) == ("small", "/shared/run", ["mesh.data=1", "mesh.fsdp=-1"])
    assert requeue == ["scontrol", "requeue", "77"]


def test_slurm_header_runs_one_process_per_gpu_and_resumes():
    header = dict(line.removeprefix("#SBATCH --").partition("=")[::2] for line in SBATCH.read_text().splitlines()
                  if line.startswith("#SBATCH --"))
    # jax.distributed on SLURM gives process SLURM_LOCALID the GPU of that number: every task sees all GPUs.
    assert header["ntasks-per-node"] == header["gpus-per-node"] and "gpus-per-task" not in header
    assert header["signal"].startswith("TERM@") and "requeue" in header


@pytest.mark.parametrize("args, message", [
    (["--workdir", "/shared/run"], "missing --config NAME"),
    (["--config", "small"], "missing --workdir DIR"),
    (["--config", "small", "--workdir", "/w", "--distributed"], "leave out --distributed"),
])
def test_slurm_bad_input_is_a_one_line_error(args, message):
    result = sbatch(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"train.sbatch: error: {message}")


# ------------------------------------------------------------------ the documented commands


def documented_commands():
    """``(file, argv)`` of every shell command in the README's and docs' bash blocks."""
    import re

    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if words := shlex.split(line, comments=True):
                    yield path.name, words


def test_documented_launch_commands_fit_their_machines():
    """Every launcher and sbatch command in the docs passes the pre-flight checks (mesh, batch, flags)."""
    checked = []
    for name, words in documented_commands():
        if words[:3] == ["python", "scripts/tpu_vm/launch.py", "train"]:
            args = launch.build_parser().parse_args(words[2:])
            args.train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
            launch.make_plan(args)
        elif words[0] == "sbatch":
            script = words.index("scripts/slurm/train.sbatch")
            nodes = int(next((w.split("=")[1] for w in words[1:script] if w.startswith("--nodes=")), 2))
            _, config = launch.parse_train_args(words[script + 1:])
            launch.check_mesh_and_batch(config, 8 * nodes, 8 * nodes, f"{nodes} nodes x 8 GPUs")
        else:
            continue
        checked.append(name)
    assert checked.count("README.md") >= 3 and len(checked) >= 6, checked
