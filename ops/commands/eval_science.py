"""``perfusion eval science``: one seed of the preregistered science evaluation (simulator/science), no broker.

Round 0 is logged once with the base model through the loop's own pure stages; every arm gets one update with the
trainer's code and draws the same showings; the simulator's shoppers score them. Writes
``<out>/science_seed<N>.json`` and the markdown (``--docs`` or ``<out>/science-seed<N>.md``). The flags are
ScienceConfig's fields (:mod:`perfusion.config_flags`) but ``--arms``, ``--quick``, ``--pool`` and the outputs; every
option but the output folders reaches the reproduction command the report prints. The decision rule is
docs/science-protocol.md's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perfusion.config_flags import add_config_flags_when_used, config_from_flags, flag_arguments

if TYPE_CHECKING:
    from pydantic import BaseModel


def register(eval_subparsers: Any) -> None:
    parser = eval_subparsers.add_parser(
        "science",
        help="one seed of the preregistered science evaluation: every arm's update on one logged round (no broker)",
        description="Logs round 0 with the base model through the loop's pure stages, updates every arm with the "
        "trainer's code, draws the same showings per arm and scores them with the simulator's shoppers: expected "
        "and realised CTR, conversion and returns over base with 95% intervals, own u over another segment's u, "
        "merchants, cold start, per segment, integrity and a click-model robustness sweep.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI size: a handful of viewers, few steps (flags apply over it)"
    )
    parser.add_argument("--arms", nargs="+", default=None, help="arms (default: all; arm@pathway for variants)")
    add_config_flags_when_used(parser, _science_config, exclude=("arms",))
    parser.add_argument(
        "--pool",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: pool these seeds' science_seed<N>.json and apply the decision rule to each",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results/science"), help="folder for the JSON")
    parser.add_argument("--docs", type=Path, default=None, help="write the markdown here")
    parser.set_defaults(handler=run_science)


def _science_config() -> type[BaseModel]:
    from simulator.science.config import ScienceConfig

    return ScienceConfig


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this seed's numbers (output folders left out)."""
    parts = ["perfusion", "eval", "science"]
    if args.quick:
        parts.append("--quick")
    if args.arms:
        parts += ["--arms", *args.arms]
    return shlex.join([*parts, *flag_arguments(args)])


def run_science(args: argparse.Namespace) -> int:
    from simulator.science.config import ScienceConfig

    if args.pool:
        return pool_seeds(args)
    arms = {"arms": tuple(args.arms)} if args.arms else {}
    # Built before the heavy imports, so that a wrong flag fails at once.
    config = config_from_flags(args, ScienceConfig.quick if args.quick else ScienceConfig, **arms)
    from simulator.science.protocol import run_seed
    from simulator.science.report import render_science_markdown

    args.out.mkdir(parents=True, exist_ok=True)
    result = run_seed(config, grid_png=args.out / f"science-seed{config.seed}-grid.png")
    json_path = args.out / f"science_seed{config.seed}.json"
    json_path.write_text(json.dumps(result, indent=2, default=str))
    markdown = args.docs or args.out / f"science-seed{config.seed}.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_science_markdown(result, command_line(args)))
    print(f"wrote {json_path} and {markdown} in {result['wall_seconds'] / 60:.1f} min")
    return 0


def pool_seeds(args: argparse.Namespace) -> int:
    from simulator.science.plots import plot_lifts
    from simulator.science.pooled import pool
    from simulator.science.report import render_pooled_markdown

    results = [json.loads(path.read_text()) for path in args.pool]
    pooled = pool(results)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "science_pooled.json"
    json_path.write_text(json.dumps(pooled, indent=2, default=str))
    plot_path = args.out / "science-lifts.png"
    plot_lifts(results, pooled, plot_path)
    markdown = args.docs or args.out / "science-pooled.md"
    command = "perfusion eval science --pool " + " ".join(shlex.quote(str(path)) for path in args.pool)
    plot_link = os.path.relpath(plot_path, markdown.parent)
    markdown.write_text(render_pooled_markdown(pooled, command, plot_link))
    print(f"wrote {json_path}, {plot_path} and {markdown}; on every seed: {pooled['holds_on_every_seed']}")
    return 0
