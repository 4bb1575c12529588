"""The ``laformer`` command: a thin face over the library.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed arguments, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from laformer.errors import LaFormerError

SUBCOMMAND_MODULES = ("generate", "chat", "info", "convert", "finetune", "classify", "evaluate", "quantize", "prune", "serve", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laformer",
        description="LLaMA-family models in plain PyTorch: generate, chat, inspect, convert, fine-tune, quantize.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"laformer.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"laformer.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LaFormerError as exc:
        print(f"laformer: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
