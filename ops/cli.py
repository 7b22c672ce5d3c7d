"""The ``perfusion`` console script: one entry point, one subcommand per module in ``ops.commands``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets ``handler`` to a function
taking the parsed namespace and returning an exit code. Command modules import only the standard library at
module level; heavy imports (torch, faust, feast) happen inside the handlers, so ``perfusion --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from perfusion.errors import PerfusionError

# Order here is the order in ``perfusion --help``.
COMMAND_MODULES = (
    "broker",
    "redis",
    "features",
    "worker",
    "simulate",
    "demo",
    "pretrain",
    "train",
    "serve",
    "keys",
    "models",
    "schemas",
    "dlq",
    "bench",
    "eval",
)


def installed_version() -> str:
    """The installed distribution's version (pyproject.toml's ``version``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("perfusion")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed; `pip install -e .`)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perfusion",
        description="PerFusion: a personalized 'sell it before you make it' loop on Kafka, Feast and diffusers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"ops.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except PerfusionError as exc:
        print(f"perfusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
