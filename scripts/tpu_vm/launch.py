"""Train vdit on a Cloud TPU VM or pod slice, and keep it training through preemptions.

    python scripts/tpu_vm/launch.py train --name vdit-small --zone us-central2-b --accelerator-type v4-32 \\
        --project my-project --spot -- --config small --workdir gs://my-bucket/runs/small \\
        --config.mesh.data=1 --config.mesh.fsdp=-1

Everything after ``--`` is what ``vdit train`` gets. ``train`` then

1. requests the slice as a queued resource (``--spot`` for spot capacity),
2. waits until it is ACTIVE,
3. installs ``vdit[tpu]`` on every worker and mounts the workdir's bucket there
   (gcsfuse at ``/gcs/BUCKET``) so all hosts read and write one set of checkpoints,
4. builds ``moving_shapes`` on every worker when the config trains on it (the clips
   are a pure function of the seed, so every host builds the same dataset),
5. starts ``vdit train`` on every worker (``--distributed`` on multi-host slices)
   in the background, then streams worker 0's log,
6. watches: when the queued resource is preempted (SUSPENDED or FAILED) it deletes
   it and repeats 1-5, and ``vdit train`` resumes from the last checkpoint in the
   bucket; it returns when training has finished.

``--dry-run`` prints every command of that cycle, in order, instead of running it.
Before anything is requested the config is loaded and its mesh checked against the
slice's device count, so a mesh that cannot fit is an error on your laptop, not on
a TPU you pay for. ``logs`` streams worker 0's log; ``delete`` releases the slice.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

REPO_URL = "https://github.com/vdit-dev/vdit"  # pyproject's [project.urls] Repository (a test checks)
MOUNT_ROOT = "/gcs"  # gs://BUCKET/path is /gcs/BUCKET/path on every worker
REMOTE_DIR = "~/vdit"  # the train log and exit status on each worker
WAITING = ("ACCEPTED", "CREATING", "WAITING_FOR_RESOURCES", "PROVISIONING")
PREEMPTED = ("SUSPENDING", "SUSPENDED", "FAILED")
MAX_SETUP_ATTEMPTS = 5  # per slice: ssh to a new TPU VM can fail until its keys propagate


@dataclasses.dataclass(frozen=True)
class Generation:
    """How one TPU generation's accelerator types map to hosts and JAX devices.

    ``N`` in ``<prefix>-N`` counts TensorCores on v2-v5p and chips on v5e/v6e. v4 and
    v5p chips hold two TensorCores that JAX sees as one device (megacore).
    """

    runtime: str  # the TPU VM image (--runtime-version)
    unit: str  # what N counts
    cores_per_device: int
    devices_per_host: int
    sizes: tuple[int, ...] | None = None  # valid N when not "any multiple of 8"

    def shape(self, n: int) -> tuple[int, int]:
        """``(hosts, devices)`` of a slice of size ``n``."""
        devices = n // self.cores_per_device
        per_host = devices if self.sizes and devices <= 8 else self.devices_per_host
        return max(1, devices // per_host), devices


_CHIP_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
GENERATIONS = {
    "v2": Generation("tpu-ubuntu2204-base", "TensorCores", 1, 8),
    "v3": Generation("tpu-ubuntu2204-base", "TensorCores", 1, 8),
    "v4": Generation("tpu-ubuntu2204-base", "TensorCores", 2, 4),
    "v5p": Generation("v2-alpha-tpuv5", "TensorCores", 2, 4),
    # v5e and v6e: slices of up to 8 chips are one host; larger ones have 4 chips per host.
    "v5litepod": Generation("v2-alpha-tpuv5-lite", "chips", 1, 4, _CHIP_SIZES),
    "v6e": Generation("v2-alpha-tpuv6e", "chips", 1, 4, _CHIP_SIZES),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU accelerator type resolved to what the launcher needs."""

    accelerator_type: str
    runtime: str
    hosts: int
    devices: int


def parse_accelerator_type(accelerator_type: str) -> Slice:
    """``"v4-32"`` -> ``Slice(hosts=4, devices=16, ...)``; a one-line ValueError for anything else."""
    expected = ("expected v2-N, v3-N, v4-N or v5p-N (N TensorCores, a multiple of 8), "
                f"or v5litepod-N or v6e-N (N chips, one of {', '.join(map(str, _CHIP_SIZES))})")
    m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not m:
        raise ValueError(f"unknown accelerator type {accelerator_type!r}; {expected}")
    gen, n = GENERATIONS[m.group(1)], int(m.group(2))
    if (gen.sizes and n not in gen.sizes) or (not gen.sizes and (n < 8 or n % 8)):
        raise ValueError(f"{accelerator_type}: no such slice size ({gen.unit}); {expected}")
    hosts, devices = gen.shape(n)
    return Slice(accelerator_type, gen.runtime, hosts, devices)


@dataclasses.dataclass(frozen=True)
class Target:
    """A queued resource and its TPU VM (same name), and the gcloud commands that address them."""

    name: str
    zone: str
    project: str | None = None

    def location_flags(self) -> list[str]:
        """``--zone`` (and ``--project``) for every gcloud command."""
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def describe(self) -> list[str]:
        """Prints the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...)."""
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.name, *self.location_flags(),
                "--format=value(state.state)"]

    def delete(self) -> list[str]:
        """Deletes the queued resource and its TPU VM."""
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self.location_flags(),
                "--force", "--quiet"]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        """Runs a shell command on the slice's workers (all of them at once by default)."""
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self.location_flags(), f"--worker={worker}",
                f"--command={command}"]

    def logs(self) -> list[str]:
        """Follows worker 0's log (process 0 prints metrics and checkpoint messages)."""
        return self.ssh(f"tail -n +1 -F {REMOTE_DIR}/train.log", worker="0")

    def status(self) -> list[str]:
        """Prints 'running', 'finished <code>' or 'preempted <code>' from worker 0."""
        return self.ssh(
            f"cd {REMOTE_DIR} 2>/dev/null && test -f train.exit || {{ echo running; exit 0; }}; "
            'grep -q "vdit: preempted" train.log && echo preempted $(cat train.exit) '
            "|| echo finished $(cat train.exit)", worker="0")


@dataclasses.dataclass
class TrainPlan:
    """What ``train`` runs: the slice, where, vdit train's arguments, and what to set up first."""

    target: Target
    tpu: Slice
    provisioning: str  # "spot", "on-demand" or "reserved"
    train_args: list[str]  # vdit train's arguments, paths as the workers see them
    bucket: str | None  # mounted with gcsfuse on every worker when the workdir or data is on GCS
    prepare_args: list[str] | None  # vdit prepare's arguments when the config trains on moving_shapes
    install_spec: str  # what pip installs on every worker

    def create(self) -> list[str]:
        """Requests the slice as a queued resource (one node, named like the resource)."""
        flags = {"spot": ["--spot"], "reserved": ["--reserved"], "on-demand": []}[self.provisioning]
        return ["gcloud", "compute", "tpus", "queued-resources", "create", self.target.name,
                f"--node-id={self.target.name}", *self.target.location_flags(),
                f"--accelerator-type={self.tpu.accelerator_type}", f"--runtime-version={self.tpu.runtime}", *flags]

    def setup(self) -> list[list[str]]:
        """Install vdit (and gcsfuse + the bucket mount when needed) and build the data, on every worker."""
        ssh = self.target.ssh
        steps = [ssh(f'python3 -m pip install -q -U pip && python3 -m pip install -q "{self.install_spec}"')]
        if self.bucket:
            mount = f"{MOUNT_ROOT}/{self.bucket}"
            steps.append(ssh(
                "command -v gcsfuse >/dev/null || { "
                'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
                'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" '
                "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
                "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
                "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && "
                "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; } && "
                f"sudo mkdir -p {mount} && sudo chown $USER {mount} && "
                # Orbax commits a checkpoint by renaming its temporary directory, which gcsfuse
                # only does for directories below --rename-dir-limit objects.
                f"{{ mountpoint -q {mount} || gcsfuse --implicit-dirs --rename-dir-limit=1000000 "
                f"{self.bucket} {mount}; }}"))
        if self.prepare_args:
            steps.append(ssh(shlex.join(["python3", "-m", "vdit", "prepare", *self.prepare_args])))
        return steps

    def train_command(self) -> str:
        """``vdit train`` on one worker, detached so the ssh session may end; exit status to a file."""
        distributed = ["--distributed"] if self.tpu.hosts > 1 else []
        train = shlex.join(["python3", "-m", "vdit", "train", *distributed, "--no_progress", *self.train_args])
        # The previous attempt's log moves aside: `status` reads this attempt's outcome from train.log.
        return (f"mkdir -p {REMOTE_DIR} && cd {REMOTE_DIR} && rm -f train.exit && "
                "{ test -f train.log && mv -f train.log train.previous.log; true; } && "
                f"nohup bash -c {shlex.quote(f'{train} > train.log 2>&1; echo $? > train.exit')} "
                ">/dev/null 2>&1 &")

    def launch(self) -> list[str]:
        """Starts training on every worker at once (multi-host JAX needs all processes)."""
        return self.target.ssh(self.train_command())


# ------------------------------------------------------------------ building a plan


def _gcs_to_mount(path: str) -> tuple[str, str | None]:
    """``gs://b/x`` -> ``("/gcs/b/x", "b")``; other paths unchanged."""
    if not path.startswith("gs://"):
        return path, None
    bucket, _, rest = path[len("gs://"):].partition("/")
    if not bucket:
        raise ValueError(f"{path!r} names no bucket; expected gs://BUCKET/path")
    return f"{MOUNT_ROOT}/{bucket}" + (f"/{rest}" if rest else ""), bucket


def _moving_shapes_prepare(name: str, config) -> tuple[str, list[str]]:
    """The full dataset name and ``vdit prepare`` arguments for a ``moving_shapes`` config.

    Plain ``moving_shapes`` means the config's frames and resolution (what ``vdit
    train`` needs), not the f17_r32 default variant.
    """
    from vdit.data import moving_shapes as ms

    variant = name.partition("/")[2] or ms.config_name(frames=config.data.frames, resolution=config.data.resolution)
    kw = ms.parse_config_name(variant)
    h, w = kw.pop("resolution")
    if h != w:
        raise ValueError(f"data.name={name!r}: the launcher prepares square clips only; prepare {h}x{w} yourself "
                         "into gs://BUCKET/path and set --config.data.data_dir to it")
    flags = {**kw, "resolution": h}
    if "object_size" in flags:
        flags["object_size"] = ",".join(map(str, flags["object_size"]))
    return f"moving_shapes/{variant}", ["moving_shapes", *[f"--{k}={v}" for k, v in flags.items()]]


def parse_train_args(train_args: Sequence[str]):
    """``vdit train``'s arguments parsed by vdit's own parser, and the config they select.

    Returns:
      ``(parsed arguments, config with the overrides applied)``.

    Raises:
      ValueError: multi-process flags (the launchers add them), unknown arguments, bad config keys.
    """
    from vdit.cli import _split_overrides, build_parser
    from vdit.config import load_config, override

    multi_process = {"--distributed", "--coordinator", "--num_processes", "--process_id"}
    if multi_process & {a.partition("=")[0] for a in train_args}:
        raise ValueError("leave --distributed and its flags out of vdit train's arguments; the launcher adds them")
    parsed, unknown = build_parser().parse_known_args(["train", *_split_overrides(list(train_args))])
    if unknown:
        raise ValueError(f"unexpected vdit train arguments {' '.join(unknown)}; "
                         "expected --config, --workdir, --phase and overrides")
    return parsed, override(load_config(parsed.config), parsed.overrides)


def check_mesh_and_batch(config, devices: int, processes: int, where: str) -> dict[str, int]:
    """The config's mesh resolved on ``devices``; the batch sizes must suit it and ``processes``.

    ``vdit train`` checks the same, but only once the machines are up and paid for.

    Raises:
      ValueError: one line naming ``where``, the mesh or batch, and what would fit.
    """
    from vdit.sharding import MESH_AXES, resolve_mesh_shape

    try:
        mesh = dict(zip(MESH_AXES, resolve_mesh_shape(dict(config.mesh), devices)))
    except ValueError as e:
        raise ValueError(f"{where} has {devices} devices: {e}") from None
    divisor = math.lcm(mesh["data"] * mesh["fsdp"], processes)
    batches = (("data.batch_size", config.data.batch_size), ("vae_train.batch_size", config.vae_train.batch_size))
    for key, batch in batches:
        if batch and batch % divisor:
            raise ValueError(f"{key}={batch} must be a multiple of {divisor} on {where}: divisible by "
                             f"data x fsdp = {mesh['data'] * mesh['fsdp']} and by its {processes} processes")
    return mesh


def make_plan(args: argparse.Namespace) -> TrainPlan:
    """Validates the request (slice, vdit train arguments, config, mesh, batch) and builds the plan.

    Raises:
      ValueError: one line naming what was wrong and what was expected.
    """
    tpu = parse_accelerator_type(args.accelerator_type)
    if args.runtime_version:
        tpu = dataclasses.replace(tpu, runtime=args.runtime_version)
    parsed, config = parse_train_args(args.train_args)
    check_mesh_and_batch(config, tpu.devices, tpu.hosts, tpu.accelerator_type)

    workdir, bucket = _gcs_to_mount(parsed.workdir)
    if bucket is None and (tpu.hosts > 1 or args.spot):
        why = f"its {tpu.hosts} hosts must share it" if tpu.hosts > 1 else "a preempted spot VM loses its disk"
        raise ValueError(f"--workdir {parsed.workdir!r} is a local path but {why}; use gs://BUCKET/path")

    extra, prepare_args = [], None  # overrides the launcher adds after the user's (later ones win)
    data_dir, data_bucket = _gcs_to_mount(config.data.data_dir)
    if data_bucket:
        if bucket and data_bucket != bucket:
            raise ValueError(f"data.data_dir and --workdir must be in one bucket, got {data_bucket!r} and {bucket!r}")
        bucket = data_bucket
        extra.append(f"data.data_dir={data_dir}")
    elif config.data.name.startswith("moving_shapes"):
        # Every worker builds the same clips (a pure function of the seed) into its own disk.
        name, prepare_args = _moving_shapes_prepare(config.data.name, config)
        if data_dir:
            prepare_args.append(f"--data_dir={data_dir}")
        extra.append(f"data.name={name}")
    elif tpu.hosts > 1:
        raise ValueError(f"data.name={config.data.name!r} must be prepared where all {tpu.hosts} hosts can read it: "
                         "build it with `vdit prepare` into gs://BUCKET/path and set --config.data.data_dir to it")

    train_args = ["--config", parsed.config, "--workdir", workdir, "--phase", parsed.phase, *parsed.overrides, *extra]
    spec = f"vdit[tpu] @ git+{args.repo}" + (f"@{args.ref}" if args.ref else "")
    provisioning = "spot" if args.spot else "reserved" if args.reserved else "on-demand"
    target = Target(args.name, args.zone, args.project)
    return TrainPlan(target, tpu, provisioning, train_args, bucket, prepare_args, spec)


# ------------------------------------------------------------------ running it


class Shell:
    """Runs commands (tests replace it): ``run`` captures stdout, ``stream`` prints in the background."""

    def run(self, cmd: Sequence[str], *, check: bool = True) -> str:
        """Runs ``cmd`` and returns its stdout (raises on failure when ``check``)."""
        result = subprocess.run(list(cmd), stdout=subprocess.PIPE, text=True, check=check)
        return result.stdout

    def stream(self, cmd: Sequence[str]) -> subprocess.Popen:
        """Starts ``cmd`` with its output going to this terminal; the caller stops it."""
        return subprocess.Popen(list(cmd))

    def sleep(self, seconds: float) -> None:
        """Waits between polls."""
        time.sleep(seconds)


def print_dry_run(plan: TrainPlan, poll_seconds: int, out=print) -> None:
    """Prints every command of ``train``'s cycle, in the order it runs them."""
    t = plan.tpu
    out(f"# {t.accelerator_type}: {t.hosts} host(s), {t.devices} JAX devices, runtime {t.runtime}, "
        f"{plan.provisioning} capacity")
    out("# 1. request the slice")
    out(shlex.join(plan.create()))
    out(f"# 2. wait until the state is ACTIVE (polled every {poll_seconds} s)")
    out(shlex.join(plan.target.describe()))
    out("# 3. set up every worker")
    for cmd in plan.setup():
        out(shlex.join(cmd))
    out("# 4. train on every worker (resumes from the latest checkpoint in the workdir)")
    out(shlex.join(plan.launch()))
    out("# 5. stream worker 0's log")
    out(shlex.join(plan.target.logs()))
    out(f"# 6. every {poll_seconds} s: the state, and whether training has exited")
    out(shlex.join(plan.target.describe()))
    out(shlex.join(plan.target.status()))
    out(f"# on {'/'.join(PREEMPTED)} (preempted), release the slice and repeat from 1")
    out(shlex.join(plan.target.delete()))


def run_train(plan: TrainPlan, *, shell: Shell, poll_seconds: int, max_relaunches: int,
              log: Callable[[str], None] = print) -> int:
    """Creates the slice, trains, and relaunches after each preemption until training exits.

    Returns:
      ``vdit train``'s exit status on worker 0 (0 when training finished).
    """
    relaunches, setup_failures, launched, tail = 0, 0, False, None

    def stop_tail():
        nonlocal tail
        if tail is not None:
            tail.terminate()
            tail = None

    log(f"requesting {plan.tpu.accelerator_type} as queued resource {plan.target.name}")
    shell.run(plan.create())
    try:
        while True:
            state = shell.run(plan.target.describe(), check=False).strip()
            if state in PREEMPTED:
                stop_tail()
                launched = False
                relaunches += 1
                if relaunches > max_relaunches:
                    log(f"{plan.target.name} is {state} again after {max_relaunches} relaunches; giving up")
                    return 1
                log(f"{plan.target.name} is {state} (preempted); relaunch {relaunches}/{max_relaunches}")
                shell.run(plan.target.delete(), check=False)
                shell.run(plan.create())
            elif state == "ACTIVE" and not launched:
                try:
                    for cmd in plan.setup():
                        shell.run(cmd)
                    shell.run(plan.launch())
                except subprocess.CalledProcessError as e:
                    # A fresh VM often refuses ssh for a while; every setup step is idempotent.
                    setup_failures += 1
                    if setup_failures > MAX_SETUP_ATTEMPTS:
                        raise
                    log(f"setting up {plan.target.name} failed ({e.cmd[4]} exited {e.returncode}); "
                        f"retrying ({setup_failures}/{MAX_SETUP_ATTEMPTS})")
                else:
                    launched, setup_failures = True, 0
                    tail = shell.stream(plan.target.logs())
            elif state == "ACTIVE":
                words = shell.run(plan.target.status(), check=False).split()
                if words[:1] == ["finished"]:
                    code = int(words[1]) if len(words) > 1 and words[1].lstrip("-").isdigit() else 1
                    log(f"training exited with status {code}; release the slice with: "
                        f"python {sys.argv[0]} delete --name {plan.target.name} --zone {plan.target.zone}")
                    return code
                if words[:1] == ["preempted"]:
                    # vdit saved and exited on a SIGTERM (maintenance) while the slice stayed up: restart it.
                    log("vdit train stopped on a signal while the slice is ACTIVE; restarting it")
                    shell.run(plan.launch())
            elif state not in WAITING:
                log(f"{plan.target.name} is in state {state or '(unknown)'}; waiting")
            shell.sleep(poll_seconds)
    finally:
        stop_tail()


# ------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    """The launcher's argument parser (``train``, ``logs``, ``delete``)."""
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def target(p, accelerator=False):
        p.add_argument("--name", required=True, help="queued resource and TPU VM name")
        p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a (v5p)")
        p.add_argument("--project", help="GCP project (default: gcloud's configured project)")
        if accelerator:
            p.add_argument("--accelerator-type", required=True, help="v4-8, v5p-64, v5litepod-16, v6e-8, ...")

    train = sub.add_parser("train", help="create, set up, train, stream logs, relaunch after preemption",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target(train, accelerator=True)
    capacity = train.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (cheaper; preemptible)")
    capacity.add_argument("--reserved", action="store_true", help="use the project's reservation")
    train.add_argument("--runtime-version", help="TPU VM image (default: the one for the accelerator's generation)")
    train.add_argument("--repo", default=REPO_URL, help=f"git repository to install vdit from (default {REPO_URL})")
    train.add_argument("--ref", help="branch, tag or commit of --repo (default: its default branch)")
    train.add_argument("--poll-seconds", type=int, default=60, help="how often to check the slice (default 60)")
    train.add_argument("--max-relaunches", type=int, default=50, help="give up after this many preemptions")
    train.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    train.add_argument("train_args", nargs=argparse.REMAINDER,
                       help="after '--': vdit train's arguments (--config, --workdir, overrides)")

    logs = sub.add_parser("logs", help="stream worker 0's training log")
    target(logs)
    delete = sub.add_parser("delete", help="delete the queued resource and its TPU VM")
    target(delete)
    for p in (logs, delete):
        p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return parser


def main(argv: Sequence[str] | None = None, shell: Shell | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    shell = shell or Shell()
    try:
        if args.command == "train":
            if args.train_args[:1] == ["--"]:
                args.train_args = args.train_args[1:]
            plan = make_plan(args)
            if args.dry_run:
                print_dry_run(plan, args.poll_seconds)
                return 0
            try:
                return run_train(plan, shell=shell, poll_seconds=args.poll_seconds,
                                 max_relaunches=args.max_relaunches)
            except KeyboardInterrupt:
                print(f"\nlaunch.py: stopped watching; the slice and training keep running. Follow with "
                      f"`python {sys.argv[0]} logs --name {args.name} --zone {args.zone}`, release with "
                      f"`... delete`.", file=sys.stderr)
                return 130
        target = Target(args.name, args.zone, args.project)
        cmd = target.logs() if args.command == "logs" else target.delete()
        if args.dry_run:
            print(shlex.join(cmd))
            return 0
        return subprocess.call(cmd)
    except ValueError as e:
        print(f"launch.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"launch.py {args.command}: error: `{shlex.join(e.cmd)}` failed with status {e.returncode}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
