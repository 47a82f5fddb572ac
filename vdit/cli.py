"""The ``vdit`` command (also ``python -m vdit``).

Each subcommand is a small function over the library; ``vdit CMD --help`` documents it.
Errors a user can fix (bad config key, wrong shape, missing folder) print one line
and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> None:
    """Prints the parameter count of each model of a config (shapes only; nothing is allocated)."""
    import jax

    from vdit.config import load_config, override
    from vdit.models import build_models, param_counts

    config = override(load_config(args.config), args.overrides)
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vdit`` command."""
    parser = argparse.ArgumentParser(
        prog="vdit",
        description="Text-to-video latent diffusion transformers in JAX: train a video VAE, text encoder "
        "and DiT on any device mesh, sample videos, convert Wan2.1 weights.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="parameter counts of a config's models", description=_cmd_info.__doc__)
    info.add_argument("--config", required=True, help="config name (e.g. tiny, small) or path.py[:arg]")
    info.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. dit.depth=4")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vdit`` console script."""
    parser = build_parser()
    args = parser.parse_args(_split_overrides(sys.argv[1:] if argv is None else argv))
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"vdit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
