"""``perfusion bench NAME``: run one benchmark and write its JSON report; the names come from ops.bench."""

from __future__ import annotations

import argparse
import importlib
import sys
from functools import partial
from pathlib import Path
from typing import Any, cast

from ops.bench import BENCHMARK_MODULES, BenchmarkModule, write_report


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure costs (the group objective against its pairwise decomposition, ...) and write JSON",
        description="Run one benchmark; its JSON report goes to --out or to stdout, a short summary to stdout.",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module_name in BENCHMARK_MODULES.items():
        module = cast(BenchmarkModule, importlib.import_module(module_name))
        benchmark_parser = benchmarks.add_parser(name, help=module.HELP, description=module.HELP)
        benchmark_parser.add_argument("--out", type=Path, default=None, help="write the JSON report to this file")
        module.add_arguments(benchmark_parser)
        benchmark_parser.set_defaults(handler=partial(run, module))


def run(module: BenchmarkModule, args: argparse.Namespace) -> int:
    report = module.run(args)
    write_report(report, args.out)
    if args.out is None:
        # stdout holds the JSON report alone, so it can be piped; the summary goes beside it.
        print(module.summary(report), file=sys.stderr)
    else:
        print(module.summary(report))
        print(f"report written to {args.out}")
    return 0
