"""``perfusion eval signal``: the group-signal report (simulator/probes/signal.py), no broker needed.

How much preference signal the base model's groups carry for the evaluation's shoppers, against catalog renders:
within-group spread of true utility, its user-specific share, whether a single click finds the best image, the
clicked and merchant-picked gaps, the oracle best-of-K gain, with 95% bootstrap intervals over users and the
acceptance on the base row. Writes ``<out>/group_signal.json`` and the markdown (``--docs`` or
``<out>/group-signal.md``). Every option but the output folders reaches the reproduction command the report prints.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

# Flag -> (the SignalConfig field it sets, its type, help). The help texts repeat the config's so that
# ``perfusion --help`` does not import the simulator.
FLAGS: dict[str, tuple[str, type, str]] = {
    "--users": ("users", int, "training shoppers of the evaluation's panel (default 16)"),
    "--groups": ("groups_per_user", int, "groups shown to each user, the training prompts in turn (default 16)"),
    "--k": ("k", int, "candidates per group (default 4)"),
    "--steps": ("sampling_steps", int, "steps of the serving sampler (default: the serving sampler as it is)"),
    "--bootstrap": ("bootstrap_samples", int, "bootstrap resamplings of users (default 1000)"),
    "--seed": ("seed", int, "seed of the panel, click and merchant draws (default 0)"),
    "--threads": ("torch_threads", int, "torch threads (default 1)"),
    "--base": ("base_checkpoint", Path, "the base model folder (default assets/base)"),
}
JSON_NAME = "group_signal.json"
MARKDOWN_NAME = "group-signal.md"


def register(eval_subparsers: Any) -> None:
    """Add the ``signal`` mode to ``perfusion eval``'s subparsers."""
    parser = eval_subparsers.add_parser(
        "signal",
        help="how much preference signal the base model's groups carry, against catalog renders (no broker)",
        description="Logs base-model and catalog groups graded by the evaluation's simulated shoppers and reports "
        "the within-group spread of true utility, its user-specific share, P(a single click is the best), the "
        "clicked and merchant-picked gaps and the oracle best-of-K gain, with 95%% bootstrap intervals over users "
        f"and PASS/FAIL per acceptance criterion. Writes {JSON_NAME} and {MARKDOWN_NAME} (or --docs).",
    )
    for flag, (_, kind, help_text) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=help_text)
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help=f"folder for {JSON_NAME}")
    parser.add_argument("--docs", type=Path, default=None, help="write the markdown here (docs/group-signal.md)")
    parser.set_defaults(handler=run_signal_report)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The SignalConfig fields the command line sets, by field name."""
    values = {field: getattr(args, flag.removeprefix("--")) for flag, (field, _, _) in FLAGS.items()}
    return {field: value for field, value in values.items() if value is not None}


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run's numbers (output folders left out)."""
    parts = ["perfusion", "eval", "signal"]
    for flag in FLAGS:
        value = getattr(args, flag.removeprefix("--"))
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(part) for part in parts)


def run_signal_report(args: argparse.Namespace) -> int:
    """Measure, then write the JSON and the markdown."""
    from simulator.probes.signal import SignalConfig, SignalResults, render_signal_markdown, run_signal

    results = SignalResults.of(run_signal(SignalConfig(**given_options(args))), command_line(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / JSON_NAME).write_text(results.to_json())
    markdown = args.docs or args.out / MARKDOWN_NAME
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_signal_markdown(results))
    verdict = ", ".join(f"{name} {'PASS' if c.passed else 'FAIL'}" for name, c in results.acceptance.items())
    print(f"wrote {args.out / JSON_NAME} and {markdown} in {results.wall_seconds / 60:.1f} min ({verdict})")
    return 0
