"""Benchmarks behind ``perfusion bench NAME``: one module per benchmark, registered in ``BENCHMARK_MODULES``.

A benchmark module keeps its module-level imports light: the standard library, pydantic and the settings modules
its flags are generated from, never torch, Faust or the simulator (``perfusion --help`` imports it to build the
parser). It provides:

- ``HELP``: one line for ``perfusion bench --help``;
- ``add_arguments(parser)``: its options (``--out`` is added for every benchmark);
- ``run(args) -> dict``: measure, and return a JSON-serialisable report;
- ``summary(report) -> str``: a few human-readable lines about that report.

To add a benchmark, write ``ops/bench/<name>.py`` and add one line to ``BENCHMARK_MODULES``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

# Benchmark name -> module implementing it. Order here is the order in ``perfusion bench --help``.
BENCHMARK_MODULES: dict[str, str] = {
    "objective": "ops.bench.objective",
    "streams": "ops.bench.streams",
    "serve": "ops.bench.serve",
    "recovery": "ops.bench.recovery",
}


class BenchmarkModule(Protocol):
    """What ``ops.commands.bench`` expects of a module named in ``BENCHMARK_MODULES``."""

    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> dict[str, Any]: ...

    def summary(self, report: dict[str, Any]) -> str: ...


def median_seconds(action: Callable[[], object], repeats: int, warmup: int, synchronize: Callable[[], None]) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``action`` after ``warmup`` untimed calls.

    ``synchronize`` waits for queued device work (``torch.cuda.synchronize`` on a GPU, a no-op on the CPU) before
    each clock read, so asynchronous kernels are counted in the call that launched them.
    """
    for _ in range(warmup):
        action()
    synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def write_report(report: dict[str, Any], out: Path | None) -> None:
    """Write the JSON report to ``out`` (folders created), or print it when ``out`` is None."""
    text = json.dumps(report, indent=2, sort_keys=True)
    if out is None:
        print(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
