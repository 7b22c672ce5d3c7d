"""``perfusion eval science``: one seed of the preregistered science evaluation (simulator/science), no broker.

Round 0 is logged once with the base model through the loop's own pure stages; every arm gets one update with the
trainer's code and draws the same showings; the simulator's shoppers score them. Writes
``<out>/science_seed<N>.json`` and the markdown (``--docs`` or ``<out>/science-seed<N>.md``). Every option but the
output folders reaches the reproduction command the report prints. The decision rule is docs/science-protocol.md's.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

# Flag -> (the ScienceConfig field it sets, its type, help). Help repeats the config's so that ``perfusion --help``
# does not import the simulator.
FLAGS: dict[str, tuple[str, type, str]] = {
    "--seed": ("seed", int, "panel, logs, training noise and plan (validation: 100; test seeds: 0, 1, 2)"),
    "--shoppers-per-segment": ("shoppers_per_segment", int, "training shoppers per segment (default 10)"),
    "--cold-shoppers": ("cold_shoppers", int, "shoppers with a profile only (default 8)"),
    "--merchants-per-segment": ("merchants_per_segment", int, "merchants per segment (default 2)"),
    "--logged-groups": ("logged_groups", int, "round-0 groups per shopper (default 12)"),
    "--merchant-groups": ("merchant_groups", int, "round-0 groups per merchant (default 4)"),
    "--eval-showings": ("eval_showings", int, "showings per shopper after the update (default 2)"),
    "--k": ("k", int, "candidates per group (default 4)"),
    "--best-of": ("best_of", int, "N of base_best_of_n (default 16)"),
    "--steps": ("sampling_steps", int, "serving sampler steps (default the serving sampler's)"),
    "--reward-steps": ("reward_steps", int, "reward-model steps (default 150)"),
    "--generator-steps": ("diffusion_steps", int, "generator steps (default the trainer's)"),
    "--groups-per-batch": ("groups_per_batch", int, "groups per step (default the trainer's)"),
    "--draws": ("draws_per_group", int, "(t, noise) draws per group (default the trainer's)"),
    "--beta": ("beta", float, "implicit-reward scale (default the trainer's)"),
    "--supervised-weight": ("supervised_weight", float, "lambda of the positives' term (default the trainer's)"),
    "--adaptive-lr": ("adaptive_learning_rate", float, "adaptive network learning rate (default the trainer's)"),
    "--unet-lr": ("unet_learning_rate", float, "fine-tuned U-Net learning rate (default the trainer's)"),
    "--rounds": ("rounds", int, "updates: 1 = the one-update protocol (default), 2+ = a closed loop"),
    "--closed-loop-groups": ("closed_loop_groups", int, "groups per shopper between updates (default 2)"),
    "--panel": ("panel", str, "module:Class of a PreferencePanel (default the pixel panel)"),
    "--bootstrap": ("bootstrap_samples", int, "bootstrap resamplings (default 1000)"),
    "--threads": ("torch_threads", int, "torch threads per arm process (default 1)"),
    "--parallel": ("parallel_arms", int, "arm processes at once (default 2)"),
    "--base": ("base_checkpoint", Path, "the base model folder (default assets/base)"),
}


def register(eval_subparsers: Any) -> None:
    parser = eval_subparsers.add_parser(
        "science",
        help="one seed of the preregistered science evaluation: every arm's update on one logged round (no broker)",
        description="Logs round 0 with the base model through the loop's pure stages, updates every arm with the "
        "trainer's code, draws the same showings per arm and scores them with the simulator's shoppers: expected "
        "and realised CTR, conversion and returns over base with 95%% intervals, own u over another segment's u, "
        "merchants, cold start, per segment, integrity and a click-model robustness sweep.",
    )
    parser.add_argument("--quick", action="store_true", help="CI size: a handful of viewers, few steps")
    parser.add_argument("--arms", nargs="+", default=None, help="arms (default: all; arm@pathway for variants)")
    for flag, (_, kind, help_text) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=help_text)
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


def command_line(args: argparse.Namespace) -> str:
    parts = ["perfusion", "eval", "science"]
    if args.quick:
        parts.append("--quick")
    if args.arms:
        parts += ["--arms", *args.arms]
    for flag in FLAGS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(part) for part in parts)


def run_science(args: argparse.Namespace) -> int:
    from simulator.science.config import ScienceConfig
    from simulator.science.protocol import run_seed
    from simulator.science.report import render_science_markdown

    if args.pool:
        return pool_seeds(args)
    values = {field: getattr(args, flag.removeprefix("--").replace("-", "_")) for flag, (field, _, _) in FLAGS.items()}
    options: dict[str, Any] = {field: value for field, value in values.items() if value is not None}
    if args.arms:
        options["arms"] = tuple(args.arms)
    config = ScienceConfig.quick(**options) if args.quick else ScienceConfig(**options)
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
    from simulator.science.pooled import pool
    from simulator.science.report import render_pooled_markdown

    results = [json.loads(path.read_text()) for path in args.pool]
    pooled = pool(results)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "science_pooled.json"
    json_path.write_text(json.dumps(pooled, indent=2, default=str))
    markdown = args.docs or args.out / "science-pooled.md"
    command = "perfusion eval science --pool " + " ".join(shlex.quote(str(path)) for path in args.pool)
    markdown.write_text(render_pooled_markdown(pooled, command))
    print(f"wrote {json_path} and {markdown}; on every seed: {pooled['holds_on_every_seed']}")
    return 0
