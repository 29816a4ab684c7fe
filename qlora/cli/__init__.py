"""The `qlora` command. Each subcommand lives in its own module with a `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

SUBCOMMANDS = ["info", "kernels", "memory", "train", "eval", "generate", "export", "sweep", "bench"]


def build_parser() -> argparse.ArgumentParser:
    from qlora import __version__

    parser = argparse.ArgumentParser(prog="qlora", description="Fine-tune LLMs on one GPU with QLoRA.")
    parser.add_argument("--version", action="version", version=f"qlora {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"qlora.cli.{name}").register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, KeyError, OSError) as err:  # OSError names its file: a full disk, a lost mount
        print(f"qlora {args.command}: error: {err}", file=sys.stderr)
        return 2
