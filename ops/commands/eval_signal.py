"""``perfusion eval signal``: the group-signal report (simulator/probes/signal.py), no broker needed.

How much preference signal the base model's groups carry for the evaluation's shoppers, against catalog renders:
within-group spread of true utility, its user-specific share, whether a single click finds the best image, the
clicked and merchant-picked gaps, the oracle best-of-K gain, with 95% bootstrap intervals over users and the
acceptance on the base row. Writes ``<out>/group_signal.json`` and the markdown (``--docs`` or
``<out>/group-signal.md``). The flags are SignalConfig's fields (:mod:`perfusion.config_flags`); every option but
the output folders reaches the reproduction command the report prints.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perfusion.config_flags import add_config_flags_when_used, config_from_flags, flag_arguments

if TYPE_CHECKING:
    from pydantic import BaseModel

JSON_NAME = "group_signal.json"
MARKDOWN_NAME = "group-signal.md"


def register(eval_subparsers: Any) -> None:
    """Add the ``signal`` mode to ``perfusion eval``'s subparsers."""
    parser = eval_subparsers.add_parser(
        "signal",
        help="how much preference signal the base model's groups carry, against catalog renders (no broker)",
        description="Logs base-model and catalog groups graded by the evaluation's simulated shoppers and reports "
        "the within-group spread of true utility, its user-specific share, P(a single click is the best), the "
        "clicked and merchant-picked gaps and the oracle best-of-K gain, with 95% bootstrap intervals over users "
        f"and PASS/FAIL per acceptance criterion. Writes {JSON_NAME} and {MARKDOWN_NAME} (or --docs).",
    )
    add_config_flags_when_used(parser, _signal_config)
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help=f"folder for {JSON_NAME}")
    parser.add_argument("--docs", type=Path, default=None, help="write the markdown here (docs/group-signal.md)")
    parser.set_defaults(handler=run_signal_report)


def _signal_config() -> type[BaseModel]:
    from simulator.probes.signal import SignalConfig

    return SignalConfig


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run's numbers (output folders left out)."""
    return shlex.join(["perfusion", "eval", "signal", *flag_arguments(args)])


def run_signal_report(args: argparse.Namespace) -> int:
    """Measure, then write the JSON and the markdown."""
    from simulator.probes.signal import SignalConfig, SignalResults, render_signal_markdown, run_signal

    results = SignalResults.of(run_signal(config_from_flags(args, SignalConfig)), command_line(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / JSON_NAME).write_text(results.to_json())
    markdown = args.docs or args.out / MARKDOWN_NAME
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_signal_markdown(results))
    verdict = ", ".join(f"{name} {'PASS' if c.passed else 'FAIL'}" for name, c in results.acceptance.items())
    print(f"wrote {args.out / JSON_NAME} and {markdown} in {results.wall_seconds / 60:.1f} min ({verdict})")
    return 0
