"""``perfusion eval sampler``: the sampler probe (simulator/probes/sampler_probe.py), no broker needed.

Measures each candidate sampler (DDIM leading 4 steps, the sampler before the probe; DDIM trailing at 2 to 10 steps;
DPM-Solver++ trailing at 4 and 6) against DDIM trailing at 25 steps: attribute accuracy per kind on the catalog's
held-out prompts, the simulator's garment-mask coverage on the evaluation's prompts (catalog renders as the reference
row), seconds per group of K; then applies the rule fixed in docs/sampler.md. Writes ``<out>/sampler.json`` and the
markdown (``--docs`` or ``<out>/sampler.md``). The flags are SamplerProbeConfig's fields
(:mod:`perfusion.config_flags`); every option but the output folders reaches the reproduction command.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perfusion.config_flags import add_config_flags_when_used, config_from_flags, flag_arguments

if TYPE_CHECKING:
    from pydantic import BaseModel

JSON_NAME = "sampler.json"
MARKDOWN_NAME = "sampler.md"


def register(eval_subparsers: Any) -> None:
    """Add the ``sampler`` mode to ``perfusion eval``'s subparsers."""
    parser = eval_subparsers.add_parser(
        "sampler",
        help="choose the serving sampler's steps: attribute accuracy, garment coverage and s/group per sampler",
        description="Samples the catalog's held-out prompts and the evaluation's prompts with each candidate sampler "
        "and with DDIM trailing 25 steps, from the same noise; reports attribute accuracy per kind, the garment "
        "mask's coverage (catalog renders as the reference row) and seconds per group of K, and the steps the rule "
        f"of docs/sampler.md chooses. Writes {JSON_NAME} and {MARKDOWN_NAME} (or --docs).",
    )
    add_config_flags_when_used(parser, _sampler_probe_config)
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help=f"folder for {JSON_NAME}")
    parser.add_argument("--docs", type=Path, default=None, help="write the markdown here (docs/sampler.md)")
    parser.set_defaults(handler=run_sampler_report)


def _sampler_probe_config() -> type[BaseModel]:
    from simulator.probes.sampler_probe import SamplerProbeConfig

    return SamplerProbeConfig


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run's numbers (output folders left out)."""
    return shlex.join(["perfusion", "eval", "sampler", *flag_arguments(args)])


def run_sampler_report(args: argparse.Namespace) -> int:
    """Measure, then write the JSON and the markdown."""
    from ops.cpu_threads import prefer_passive_openmp

    prefer_passive_openmp()  # before torch: the timings share the cores with whatever else runs
    from simulator.probes.sampler_probe import (
        SamplerProbeConfig,
        SamplerProbeResults,
        render_sampler_markdown,
        run_sampler_probe,
    )

    results = SamplerProbeResults.of(run_sampler_probe(config_from_flags(args, SamplerProbeConfig)), command_line(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / JSON_NAME).write_text(results.to_json())
    markdown = args.docs or args.out / MARKDOWN_NAME
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_sampler_markdown(results))
    chosen = "none qualifies" if results.chosen_steps is None else f"{results.chosen_kind} {results.chosen_steps} steps"
    print(f"wrote {args.out / JSON_NAME} and {markdown} in {results.wall_seconds / 60:.1f} min (chosen: {chosen})")
    return 0
