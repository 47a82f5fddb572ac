"""The ``vdit`` command (also ``python -m vdit``).

Each subcommand is a small function over the library; ``vdit CMD --help`` documents it.
Errors a user can fix (bad config key, wrong shape, missing folder) print one line
and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys


def _cmd_info(args: argparse.Namespace) -> None:
    """Prints the parameter count of each model of a config (shapes only; nothing is allocated)."""
    import jax

    from vdit.models import build_models, param_counts

    config = _load(args)
    counts = param_counts(build_models(config))
    print(f"config {args.config} ({jax.device_count()} {jax.default_backend()} devices)")
    for name, count in counts.items():
        print(f"  {name:<6} {count:>16,d} parameters")


def _cmd_convert(args: argparse.Namespace) -> None:
    """Converts diffusers Wan2.1 weights into vdit checkpoints."""
    from vdit.convert import convert_folder

    parts = convert_folder(args.src, args.out, overwrite=args.overwrite)
    for part in parts:
        print(f"wrote {args.out}/{part} (model.json + Orbax params)")


def _load(args: argparse.Namespace):
    from vdit.config import load_config, override

    return override(load_config(args.config), args.overrides)


_DISTRIBUTED_FLAGS = ("coordinator", "num_processes", "process_id")


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--distributed", action="store_true",
                        help="multi-process run: call jax.distributed.initialize() (auto-detects TPU pods/SLURM)")
    parser.add_argument("--coordinator", help="host:port of process 0 (with --distributed, when not auto-detected)")
    parser.add_argument("--num_processes", type=int, help="number of processes (with --coordinator)")
    parser.add_argument("--process_id", type=int, help="this process's index (with --coordinator)")


def _init_distributed(args: argparse.Namespace) -> None:
    """Joins a multi-process run (TPU pod, GPU cluster, or CPU processes on one machine)."""
    given = {k: getattr(args, k) for k in _DISTRIBUTED_FLAGS if getattr(args, k) is not None}
    if not args.distributed:
        if given:  # ignoring them would run N independent trainings into one workdir
            flags = ", ".join(f"--{k}" for k in given)
            raise ValueError(f"{flags} only apply to a multi-process run: add --distributed, or leave them out")
        return
    n, i = given.get("num_processes"), given.get("process_id")
    if n is not None and n < 1 or i is not None and (i < 0 or n is not None and i >= n):
        raise ValueError(f"need --num_processes >= 1 and 0 <= --process_id < --num_processes, got {n} and {i}")
    import jax

    if args.coordinator:
        # Processes on CPUs need gloo for their collectives; only the CPU client reads this, and
        # it must be set before JAX starts a backend (so no jax.default_backend() check here).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"coordinator_address": args.coordinator, "num_processes": n, "process_id": i}
    try:
        # Whatever is not given, TPU pods and SLURM/MPI jobs provide.
        jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    except ValueError as e:
        missing = {"coordinator_address": "coordinator (--coordinator HOST:PORT)",
                   "Number of processes": "process count (--num_processes N)",
                   "process id": "process index (--process_id I)"}
        for needle, what in missing.items():
            if needle in str(e):
                raise ValueError(f"--distributed found no {what} to use (JAX detects TPU pods and SLURM/MPI "
                                 "jobs); elsewhere pass --coordinator HOST:PORT --num_processes N --process_id I"
                                 ) from None
        raise


def _cmd_train(args: argparse.Namespace) -> None:
    """Trains the VAE, then the text encoder and DiT on its latents; resumes from the latest checkpoints."""
    _init_distributed(args)
    from vdit.loop import train

    config = _load(args)
    phases = ("vae", "dit") if args.phase == "all" else (args.phase,)
    for phase in phases:
        summary = train(config, args.workdir, phase, progress=not args.no_progress)
        if summary["status"] != "done":
            return


def _cmd_sample(args: argparse.Namespace) -> None:
    """Generates videos for prompts from a workdir's checkpoints (EMA weights by default)."""
    from vdit import media
    from vdit.sample import config_from_workdir, generate, load_pipeline, sample_mesh, save_samples

    out = args.out or f"{args.workdir}/samples"
    if not args.overwrite:  # before sampling, which can take long
        files = media.output_names(media.sample_names(args.prompt, args.num))
        media.check_can_write(out, files, hint="pass --out DIR to write elsewhere or --overwrite to replace them")
    _init_distributed(args)
    # Several processes sample together on one mesh over all their devices; one of them alone would
    # sample (and write) everything again.
    spec = args.mesh or ("config" if args.distributed else None)
    mesh = sample_mesh(config_from_workdir(args.workdir), spec) if spec else None
    pipe = load_pipeline(args.workdir, ema=not args.no_ema, mesh=mesh)
    videos = generate(pipe, args.prompt, num_per_prompt=args.num, steps=args.steps, sampler=args.sampler,
                      cfg=args.cfg, seed=args.seed, negative_prompt=args.negative_prompt,
                      eta=args.eta)
    import jax

    if jax.process_index() == 0:  # every process has all the videos; one writes them
        paths = save_samples(videos, args.prompt, out, num_per_prompt=args.num, overwrite=args.overwrite)
        print(f"wrote {len(paths['mp4'])} videos (mp4 + gif), {paths['grid']} and {paths['contact_sheet']}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    """Builds a dataset once into DATA_DIR so training reads it fast (never downloads)."""
    if args.dataset not in ("moving_shapes", "folder") and not args.dataset.startswith("tfds:"):
        raise ValueError(f"unknown dataset {args.dataset!r}; expected moving_shapes, folder or tfds:NAME")
    if args.overwrite and args.dataset != "folder":
        raise ValueError("--overwrite applies to `vdit prepare folder` only (moving_shapes datasets are named "
                         "after their settings, and catalog datasets are built once)")
    if args.dataset == "moving_shapes":
        from vdit.data.moving_shapes import prepare_moving_shapes

        name = prepare_moving_shapes(args.data_dir, frames=args.frames, resolution=args.resolution,
                                     object_size=args.object_size, num_train=args.num_train,
                                     num_validation=args.num_validation,
                                     num_heldout=args.num_heldout, seed=args.seed)
    elif args.dataset.startswith("tfds:"):
        from vdit.data.catalog import prepare_catalog

        name = prepare_catalog(args.dataset[len("tfds:"):], args.data_dir)
    else:
        from vdit.data.folder import prepare_folder

        if not args.src or not args.name:
            raise ValueError("vdit prepare folder needs --src DIR (your videos) and --name NAME")
        name = prepare_folder(args.src, args.name, args.data_dir, frames=args.frames, resolution=args.resolution,
                              fps=args.fps, stride=args.stride, clips_per_video=args.clips_per_video,
                              overwrite=args.overwrite)
    print(f"prepared {name}")


def _cmd_demo(args: argparse.Namespace) -> None:
    """Prepares moving_shapes, trains the VAE and the DiT, samples every attribute and evaluates (resumable)."""
    from vdit.demo import run_demo

    run_demo(args.workdir, quick=args.quick, data_dir=args.data_dir, overrides=args.overrides,
             progress=not args.no_progress)


def _cmd_eval(args: argparse.Namespace) -> None:
    """Re-evaluates a demo workdir's samples and prints the results table."""
    from vdit.demo import evaluate_workdir

    evaluate_workdir(args.workdir)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, else a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _object_size(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'MIN,MAX', two fractions of the frame size such as 0.25,0.45, got {text!r}") from None
    return low, high


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="config name (tiny, shapes_cpu, small, ...) or path.py[:arg]")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides: --config.optim.lr=1e-4 or optim.lr=1e-4")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vdit`` command."""
    parser = argparse.ArgumentParser(
        prog="vdit",
        description="Text-to-video latent diffusion transformers in JAX: train a video VAE, text encoder "
        "and DiT on any device mesh, sample videos, convert Wan2.1 weights.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the whole pipeline on moving_shapes, judged by a pixel evaluator",
                          description=_cmd_demo.__doc__)
    demo.add_argument("--workdir", default="vdit_demo", help="run folder (default ./vdit_demo); reruns resume")
    demo.add_argument("--quick", action="store_true", help="minutes-scale settings (what CI runs)")
    demo.add_argument("--data_dir", help="where to build the dataset (default WORKDIR/data)")
    demo.add_argument("--no_progress", action="store_true", help="no progress bars")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="overrides of the shapes_cpu config, e.g. train.steps=1000 (faster, rougher)")
    demo.set_defaults(func=_cmd_demo)

    evaluate = sub.add_parser("eval", help="evaluate a demo workdir's samples", description=_cmd_eval.__doc__)
    evaluate.add_argument("--workdir", default="vdit_demo", help="a workdir that `vdit demo` filled")
    evaluate.set_defaults(func=_cmd_eval)

    train = sub.add_parser("train", help="train the VAE and the DiT (resumes)", description=_cmd_train.__doc__)
    _add_config_args(train)
    train.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics, samples")
    train.add_argument("--phase", choices=("all", "vae", "dit"), default="all", help="what to train (default: all)")
    train.add_argument("--no_progress", action="store_true", help="no progress bar")
    _add_distributed_args(train)
    train.set_defaults(func=_cmd_train)

    sample = sub.add_parser("sample", help="generate videos from a trained workdir", description=_cmd_sample.__doc__)
    sample.add_argument("--workdir", required=True, help="a workdir trained by vdit train")
    sample.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for several)")
    sample.add_argument("--num", type=positive_int, default=1, help="videos per prompt (default 1)")
    sample.add_argument("--steps", type=positive_int, help="sampler steps (default: config sample.steps)")
    sample.add_argument("--sampler", choices=("euler", "heun", "dpmpp_2m", "unipc", "ddim"),
                        help="sampler (default: config sample.sampler)")
    sample.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: config sample.cfg)")
    sample.add_argument("--negative_prompt", help="prompt to guide away from (default: the empty prompt)")
    sample.add_argument("--seed", type=int, help="noise seed (default: config sample.seed)")
    sample.add_argument("--eta", type=float,
                        help="DDIM stochasticity in [0, 1], with --sampler ddim on a VP schedule "
                        "(default: config sample.eta)")
    sample.add_argument("--out", help="output folder (default: WORKDIR/samples)")
    sample.add_argument("--overwrite", action="store_true",
                        help="replace files of the same names in the output folder (default: refuse)")
    sample.add_argument("--no_ema", action="store_true", help="use the raw weights instead of their EMA")
    sample.add_argument("--mesh", metavar="SPEC",
                        help="devices to sample on: 'config' (the run's mesh over all devices, as in training) or "
                             "axis sizes such as data=4,fsdp=2 (-1: the rest); default: one device, or "
                             "'config' with --distributed")
    _add_distributed_args(sample)
    sample.set_defaults(func=_cmd_sample)

    prepare = sub.add_parser("prepare", help="build a dataset (moving_shapes or a folder of your videos)",
                             description=_cmd_prepare.__doc__)
    prepare.add_argument("dataset", metavar="DATASET", help="moving_shapes, folder, or tfds:NAME (needs vdit[tf])")
    prepare.add_argument("--data_dir", help="dataset root (default $VDIT_DATA_DIR or ~/vdit_data)")
    prepare.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k (default 17)")
    prepare.add_argument("--resolution", type=int, default=32, help="frame size in pixels (default 32)")
    prepare.add_argument("--num_train", type=int, default=20000, help="moving_shapes: training clips")
    prepare.add_argument("--num_validation", type=int, default=1000, help="moving_shapes: validation clips")
    prepare.add_argument("--num_heldout", type=int, default=1000, help="moving_shapes: heldout-combination clips")
    prepare.add_argument("--object_size", type=_object_size, default="0.25,0.45",
                         help="moving_shapes: MIN,MAX size (fractions of the frame, default 0.25,0.45)")
    prepare.add_argument("--seed", type=int, default=0, help="moving_shapes: base seed")
    prepare.add_argument("--src", help="folder: your videos (.mp4 .webm .gif .mov) with captions")
    prepare.add_argument("--name", help="folder: dataset name (train with data.name=folder:NAME)")
    prepare.add_argument("--fps", type=float, help="folder: sample frames at this rate")
    prepare.add_argument("--stride", type=int, help="folder: take every Nth frame")
    prepare.add_argument("--clips_per_video", type=int, default=1, help="folder: clips cut from each video")
    prepare.add_argument("--overwrite", action="store_true",
                         help="folder: rebuild NAME even if prepared already (with other settings)")
    prepare.set_defaults(func=_cmd_prepare)

    info = sub.add_parser("info", help="parameter counts of a config's models", description=_cmd_info.__doc__)
    _add_config_args(info)
    info.set_defaults(func=_cmd_info)

    convert = sub.add_parser(
        "convert",
        help="convert diffusers Wan2.1 weights (transformer and/or VAE) into vdit",
        description=_cmd_convert.__doc__
        + " SRC is a diffusers model folder (config.json + *.safetensors) or a pipeline folder with"
        " transformer/ and vae/ subfolders. Nothing is downloaded.",
    )
    convert.add_argument("--src", required=True, help="diffusers folder")
    convert.add_argument("--out", required=True, help="output folder (one subfolder per model)")
    convert.add_argument("--overwrite", action="store_true", help="replace existing converted models in OUT")
    convert.set_defaults(func=_cmd_convert)

    from vdit.bench.command import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def _split_overrides(argv: list[str]) -> list[str]:
    # Accept `--config.a.b=v` and `--config.a.b v` as well as bare `a.b=v`.
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.") and "=" not in arg and i + 1 < len(argv):
            out.append(f"{arg[len('--config.'):]}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg[len("--config.") :] if arg.startswith("--config.") else arg)
        i += 1
    return out


def parse_command(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parses a ``vdit`` command line whose ``KEY=VALUE`` overrides may stand anywhere.

    argparse takes a positional list in one unbroken run, so ``vdit train $A --phase dit
    train.steps=200`` (overrides in ``$A`` and after ``--phase``) would leave the second
    run unrecognized; those are overrides too.
    """
    args, extra = parser.parse_known_args(_split_overrides(argv))
    if extra and hasattr(args, "overrides") and all(_OVERRIDE.match(e) for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepage_malloc_available() -> bool:
    """Whether glibc can back malloc with transparent huge pages here (Linux, glibc >= 2.35, THP not ``never``)."""
    if sys.platform != "linux":
        return False
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp_never = "[never]" in f.read()
        return libc == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35) and not thp_never
    except (AttributeError, ValueError, OSError):
        return False


def hugepage_reexec_args() -> tuple[list[str], dict[str, str]] | None:
    """The argv and environment that restart this process with glibc's malloc on huge pages, or None.

    XLA:CPU allocates its large temporary buffers afresh every step, and glibc hands
    them back to the kernel on free, so each step faults its working set in again in
    4 KiB pages: 37,000 faults per step of the demo's DiT and 47,000 of its VAE, 0.08-0.1 s
    of kernel time. ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) backs them with
    transparent huge pages, about 500 faults per step. glibc reads tunables only at
    start-up, hence a restart. None where it does not apply (``hugepage_malloc_available``),
    where ``GLIBC_TUNABLES`` already sets it, or with ``VDIT_HUGEPAGES=0``.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get("VDIT_HUGEPAGES") == "0" or "glibc.malloc.hugetlb" in tunables:
        return None
    if not hugepage_malloc_available():
        return None
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE)
    return [sys.executable, *sys.orig_argv[1:]], env


# Errors about the user's input and paths; anything else is a bug and keeps its traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def _message(e: Exception) -> str:
    """One line: an OSError from the OS itself names its file, e.g. "Permission denied: '/x'"."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename!r}" + (f" -> {e.filename2!r}" if e.filename2 is not None else "")
    return str(e)


def _check_folder_args(args: argparse.Namespace) -> None:
    """Output paths that cannot be written are refused up front, by name, before any long work:
    a folder flag naming a file (or a path under one), a file flag naming a folder."""
    for flag, want in (("workdir", "folder"), ("out", "folder"), ("data_dir", "folder"), ("profile", "folder"),
                       ("json", "file")):
        value = getattr(args, flag, None)
        if not isinstance(value, str) or "://" in value:  # gs:// and the like are not local paths
            continue
        path = pathlib.Path(value).expanduser()
        if want == "file" and path.is_dir():
            raise IsADirectoryError(f"--{flag} {value} is a folder, expected a file to write")
        parent = path if want == "folder" else path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == path else f"is inside {parent}, which is"
            raise NotADirectoryError(f"--{flag} {value} {where} a file, expected a folder")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vdit`` console script.

    Run as a command (``argv`` None), it first restarts itself once with
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` where that applies (see ``hugepage_reexec_args``).
    """
    if argv is None and (restart := hugepage_reexec_args()) is not None:
        try:
            os.execve(sys.executable, *restart)
        except OSError:
            pass  # the same command then simply runs on 4 KiB pages
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_command(parser, argv)
    args.argv = argv  # the command as typed, stamped on benchmark results
    try:
        _check_folder_args(args)
        args.func(args)
    except _USER_ERRORS as e:
        print(f"vdit {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    except (ImportError, RuntimeError) as e:
        # Errors of modules imported only by some commands (not imported: then it is not theirs).
        common, ckpt = sys.modules.get("vdit.data.common"), sys.modules.get("vdit.checkpoint")
        if not ((common and isinstance(e, common.MissingTensorFlowError))
                or (ckpt and isinstance(e, ckpt.CheckpointUnreadableError))):
            raise
        print(f"vdit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
