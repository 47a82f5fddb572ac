"""The ``vdit bench`` subcommands: run a benchmark, print its table, write its JSON.

    vdit bench train --config bench_cpu --peer --json train.json
    vdit bench report train.json --docs docs/performance.md

Each result is stamped with the machine, library versions, date, load and the exact
command, so a figure never travels without them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

from vdit.cli import positive_int

DEFAULT_SEQS = "1024,2048,4096,8192,16384"


def _csv(cast):
    def parse(text: str) -> list:
        try:
            return [cast(v.strip()) for v in text.split(",") if v.strip()]
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}: {e}") from e

    return parse


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"{text!r} is not true or false")
    return text.lower() == "true"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> dict:
    """Runs the benchmark ``args.kind`` and returns its result (without the stamp)."""
    common = dict(warmup=args.warmup, repeats=args.repeats, log=_log)
    if args.repeats < 0 or args.warmup < 0:
        raise ValueError(f"--repeats and --warmup must be >= 0, got {args.repeats} and {args.warmup}")
    config = _config(args)
    if args.kind == "train":
        from vdit.bench.train import bench_train

        return bench_train(config, batch=args.batch, remats=args.remat, scans=args.scan, devices=args.cpu_devices,
                           peer=args.peer, xcheck=not args.no_xcheck, profile=args.profile, floor=args.floor,
                           **common)
    if args.kind == "sample":
        from vdit.bench.sample import bench_sample

        return bench_sample(config, batch=args.batch, steps=args.steps, sampler=args.sampler, cfg=args.cfg, **common)
    if args.kind == "vae":
        from vdit.bench.vae import bench_vae

        return bench_vae(config, batch=args.batch, frames=args.frames, resolution=args.resolution, **common)
    from vdit.bench.attention import bench_attention

    limit = int(args.mem_limit_gb * 2**30) if args.mem_limit_gb else None
    return bench_attention(config, seqs=args.seq, impls=args.impl, batch=args.batch, mem_limit=limit, **common)


def _config(args: argparse.Namespace):
    from vdit.config import load_config, override

    return override(load_config(args.config), args.overrides)


def cmd_bench(args: argparse.Namespace) -> None:
    """Runs one benchmark (or renders results into the docs); see ``vdit bench KIND --help``."""
    from vdit.bench import report

    if args.kind == "report":
        results = report.load_results(args.results)
        if args.docs:
            path = pathlib.Path(args.docs)
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
            path.write_text(report.update_docs(path.read_text(), results))
            print(f"updated {path} from {len(results)} results")
        else:
            print("\n\n".join(report.render(r) for r in results))
        return
    if getattr(args, "cpu_devices", None) and max(args.cpu_devices) > 1:
        from vdit.sharding import request_cpu_devices

        request_cpu_devices(max(args.cpu_devices))  # before anything starts JAX's backends
    import jax

    from vdit.bench.machine import load_average, machine_info

    machine = machine_info()
    body = _run(args)
    machine.update(load_after=load_average(), note=args.note or None)
    backend = jax.default_backend()
    result = {"schema": report.SCHEMA, "kind": args.kind,
              "section": args.section or (args.kind if backend == "cpu" else f"{args.kind}-{backend}"),
              "command": "vdit " + shlex.join(args.argv), "config": args.config, "overrides": list(args.overrides),
              "machine": machine, **body}
    print(report.render(result))
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        _log(f"wrote {path}")


def add_parser(sub) -> None:
    """Adds ``bench`` and its kinds to the ``vdit`` subcommand parser ``sub``."""
    bench = sub.add_parser("bench", help="benchmarks: DiT train step against diffusers, sampling, VAE, attention",
                           description="Runs one benchmark and prints its table (vdit bench KIND --help), or renders "
                           "results into docs/performance.md (vdit bench report). Timings are medians of --repeats "
                           "runs after --warmup; each result is stamped with machine, versions, date and load.")
    kinds = bench.add_subparsers(dest="kind", required=True, metavar="KIND")

    def kind(name: str, help_: str) -> argparse.ArgumentParser:
        p = kinds.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", required=True, help="config name (bench_cpu, tiny, small, ...) or path.py[:arg]")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. dit.dtype=bfloat16")
        p.add_argument("--repeats", type=int, default=5,
                       help="timed runs, median reported (default 5; 0 = compile only)")
        p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
        p.add_argument("--json", help="write the result (with machine stamp) to this file")
        p.add_argument("--note", help="free text stamped on the result, e.g. 'busy machine'")
        p.add_argument("--section", help="docs section of the result (default: KIND, or KIND-gpu/-tpu)")
        p.set_defaults(func=cmd_bench)
        return p

    train = kind("train", "DiT train step: time, model FLOP/s vs measured GEMM peak, memory; --peer adds diffusers")
    train.add_argument("--batch", type=positive_int, help="examples per step (default: data.batch_size)")
    train.add_argument("--remat", type=_csv(str), help="remat policies to compare, e.g. none,dots,full")
    train.add_argument("--scan", type=_csv(_bool), help="scan over layers settings, e.g. false,true")
    train.add_argument("--cpu_devices", type=_csv(positive_int),
                       help="device counts to compare, e.g. 1,2: the step runs data-parallel over N devices, as "
                            "cpu_devices=N trains (on a CPU the host is split into max(N) XLA devices first)")
    train.add_argument("--peer", action="store_true", help="also time diffusers' WanTransformer3DModel (needs torch)")
    train.add_argument("--floor", action="store_true",
                       help="also time each of the step's matmuls alone and sum them: the step's matmul floor "
                            "(with --peer, the same matmuls in torch too)")
    train.add_argument("--no_xcheck", action="store_true", help="skip the FLOP cross-check with XLA cost_analysis")
    train.add_argument("--profile", metavar="DIR",
                       help="also trace 3 steps of each variant with jax.profiler into DIR and write "
                       "DIR/ops_<remat>_scan<scan>.json: op time by phase (forward/backward/remat/other) and "
                       "kind (matmul/loop), and the top ops")

    sample = kind("sample", "sampler loop: per-step latency, CFG batched vs two passes, compile time")
    sample.add_argument("--batch", type=positive_int, default=1, help="videos at once (default 1)")
    sample.add_argument("--steps", type=positive_int, help="sampler steps (default: sample.steps)")
    sample.add_argument("--sampler", choices=("euler", "heun", "dpmpp_2m", "unipc", "ddim"), help="default: config")
    sample.add_argument("--cfg", type=float, help="guidance scale (default: sample.cfg)")

    vae = kind("vae", "VAE decode: chunked causal vs whole clip, bytes per output pixel-frame and time")
    vae.add_argument("--batch", type=positive_int, default=1, help="clips at once (default 1)")
    vae.add_argument("--frames", type=positive_int, help="frames per clip, 1 + 4k (default: data.frames)")
    vae.add_argument("--resolution", type=positive_int, help="frame size in pixels (default: data.resolution)")

    attn = kind("attention", "attention backends: time and memory against sequence length")
    attn.add_argument("--seq", type=_csv(positive_int), default=_csv(positive_int)(DEFAULT_SEQS),
                      help=f"lengths (default {DEFAULT_SEQS})")
    attn.add_argument("--impl", type=_csv(str), help="backends (default xla,chunked)")
    attn.add_argument("--batch", type=positive_int, default=1, help="examples (default 1)")
    attn.add_argument("--mem_limit_gb", type=float, help="do not run lengths needing more (default: half the memory)")

    rep = kinds.add_parser("report", help="print results, or fill docs/performance.md with them",
                           description="Renders result JSON files; with --docs, replaces their sections in a "
                           "markdown file.")
    rep.add_argument("results", nargs="+", help="result JSON files written with --json")
    rep.add_argument("--docs", help="markdown file with <!-- bench:SECTION --> regions to fill")
    rep.set_defaults(func=cmd_bench)
