"""``perfusion eval sampler``: the sampler probe (simulator/probes/sampler_probe.py), no broker needed.

Measures each candidate sampler (DDIM leading 4 steps, the sampler before the probe; DDIM trailing at 2 to 10 steps;
DPM-Solver++ trailing at 4 and 6) against DDIM trailing at 25 steps: attribute accuracy per kind on the catalog's
held-out prompts, the simulator's garment-mask coverage on the evaluation's prompts (catalog renders as the reference
row), seconds per group of K; then applies the rule fixed in docs/sampler.md. Writes ``<out>/sampler.json`` and the
markdown (``--docs`` or ``<out>/sampler.md``). Every option but the output folders reaches the reproduction command.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

# Flag -> (the SamplerProbeConfig field it sets, its type, help). The help texts repeat the config's so that
# ``perfusion --help`` does not import the simulator.
FLAGS: dict[str, tuple[str, type, str]] = {
    "--seeds": ("seeds_per_prompt", int, "samples per held-out prompt, of 115 (default 2)"),
    "--coverage-seeds": ("coverage_seeds", int, "samples and catalog renders per evaluation prompt (default 16)"),
    "--k": ("k", int, "candidates per timed group (default 4)"),
    "--timing-groups": ("timing_groups", int, "timed groups per sampler after a warm-up, the least counts (default 5)"),
    "--batch-size": ("batch_size", int, "images denoised at once (default 128)"),
    "--threads": ("torch_threads", int, "torch threads (default 2)"),
    "--base": ("base_checkpoint", Path, "the base model folder (default assets/base)"),
}
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
    for flag, (_, kind, help_text) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=help_text)
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help=f"folder for {JSON_NAME}")
    parser.add_argument("--docs", type=Path, default=None, help="write the markdown here (docs/sampler.md)")
    parser.set_defaults(handler=run_sampler_report)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplerProbeConfig fields the command line sets, by field name."""
    values = {field: getattr(args, _dest(flag)) for flag, (field, _, _) in FLAGS.items()}
    return {field: value for field, value in values.items() if value is not None}


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run's numbers (output folders left out)."""
    parts = ["perfusion", "eval", "sampler"]
    for flag in FLAGS:
        value = getattr(args, _dest(flag))
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(part) for part in parts)


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


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

    results = SamplerProbeResults.of(run_sampler_probe(SamplerProbeConfig(**given_options(args))), command_line(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / JSON_NAME).write_text(results.to_json())
    markdown = args.docs or args.out / MARKDOWN_NAME
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_sampler_markdown(results))
    chosen = "none qualifies" if results.chosen_steps is None else f"{results.chosen_kind} {results.chosen_steps} steps"
    print(f"wrote {args.out / JSON_NAME} and {markdown} in {results.wall_seconds / 60:.1f} min (chosen: {chosen})")
    return 0
