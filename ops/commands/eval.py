"""``perfusion eval``: the closed-loop evaluation of every arm against the simulated marketplace (issue 7)."""

from __future__ import annotations

import argparse
import logging
import shlex
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="run every arm through rounds of the live loop and report CTR, conversion, returns with 95%% CIs",
        description="Per arm: its own topic prefix, Feast store, stream worker and trainer; generated groups, "
        "simulated shoppers and merchants judging the pixels, events on Kafka, updates, publishes. Writes "
        "results.json, PNG plots and results.md (and, with --docs, docs/results.md).",
    )
    parser.add_argument("--quick", action="store_true", help="CI size: every arm, one update, a handful of users")
    parser.add_argument("--rounds", type=int, default=None, help="trainer updates per arm")
    parser.add_argument("--users", type=int, default=None, help="live (training) users")
    parser.add_argument("--cold-users", type=int, default=None, help="held-out cold-start users")
    parser.add_argument("--impressions", type=int, default=None, help="live impressions per user per round")
    parser.add_argument("--steps", type=int, default=None, help="DDIM sampling steps")
    parser.add_argument("--arms", nargs="+", default=None, help="arms to run (default: all six)")
    parser.add_argument("--generator-steps", type=int, default=None, help="generator steps per trainer update")
    parser.add_argument("--adaptive-lr", type=float, default=None, help="learning rate of the adaptive network")
    parser.add_argument("--unet-lr", type=float, default=None, help="learning rate of the fine-tuned U-Net arms")
    parser.add_argument("--gate-tolerance", type=float, default=None, help="trainer's generator gate, in RM stds")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="instead of the loop: one generator update per arm on logged base-model groups, scored per segment",
    )
    parser.add_argument("--probe-groups", type=int, default=None, help="with --probe: logged groups per user")
    parser.add_argument(
        "--probe-labels",
        default=None,
        help="with --probe: 'clicks' trains on clicks and orders (default); 'true-utility', a diagnostic upper "
        "bound, on each group's best image by the simulator's true utility",
    )
    parser.add_argument(
        "--reward-probe",
        action="store_true",
        help="instead of the loop: reward models (with and without plug-ins, pretrained and random towers) trained "
        "on logged base-model groups (--probe-groups per user) and scored on new groups of the same users",
    )
    parser.add_argument("--rm-steps", type=int, default=None, help="with --reward-probe: steps of each reward model")
    parser.add_argument("--seed", type=int, default=None, help="seed of users, plan and draws")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--parallel", type=int, default=None, help="arms run at once, one process each (default: one per two CPU cores)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for JSON and plots")
    parser.add_argument("--docs", type=Path, default=None, help="also write the markdown here (docs/results.md)")
    parser.add_argument(
        "--notes", type=Path, default=None, help="append this hand-written analysis to the markdown (kept on reruns)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="per-arm state (default: a temporary folder)")
    parser.set_defaults(handler=run)


FLAGS = {
    "quick": "--quick",
    "probe": "--probe",
    "reward_probe": "--reward-probe",
    "probe_groups": "--probe-groups",
    "probe_labels": "--probe-labels",
    "rm_steps": "--rm-steps",
    "rounds": "--rounds",
    "users": "--users",
    "cold_users": "--cold-users",
    "impressions": "--impressions",
    "steps": "--steps",
    "arms": "--arms",
    "generator_steps": "--generator-steps",
    "adaptive_lr": "--adaptive-lr",
    "unet_lr": "--unet-lr",
    "gate_tolerance": "--gate-tolerance",
    "seed": "--seed",
    "threads": "--threads",
    "parallel": "--parallel",
}


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run's numbers (output folders left out)."""
    parts = ["perfusion", "eval"]
    for name, flag in FLAGS.items():
        value = getattr(args, name)
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *value]
        elif value not in (None, False):
            parts += [flag, str(value)]
    return " ".join(shlex.quote(part) for part in parts)


def run(args: argparse.Namespace) -> int:
    if args.notes is not None and not args.notes.is_file():
        from perfusion.errors import ConfigError

        # Checked before the run, not after it: a full evaluation takes most of an hour.
        raise ConfigError(f"--notes {args.notes} is not a file; write the analysis there first or leave --notes out")
    if args.probe and args.reward_probe:
        from perfusion.errors import ConfigError

        raise ConfigError("--probe and --reward-probe are two separate runs; pass one of them")
    if args.probe:
        return run_probe(args)
    if args.reward_probe:
        return run_reward_probe(args)
    from harness.loop import running_broker
    from simulator.eval.config import EvaluationConfig
    from simulator.eval.report import write_report
    from simulator.eval.runner import run_evaluation

    overrides = {
        "rounds": args.rounds,
        "train_users": args.users,
        "cold_users": args.cold_users,
        "impressions_per_user": args.impressions,
        "sampling_steps": args.steps,
        "arms": tuple(args.arms) if args.arms else None,
        "seed": args.seed,
        "gate_generator_tolerance": args.gate_tolerance,
        "diffusion_steps": args.generator_steps,
        "adaptive_learning_rate": args.adaptive_lr,
        "unet_learning_rate": args.unet_lr,
        "torch_threads": args.threads,
        "parallel_arms": args.parallel,
    }
    values = {key: value for key, value in overrides.items() if value is not None}
    config = EvaluationConfig.quick(**values) if args.quick else EvaluationConfig(**values)
    command = command_line(args)
    with (
        running_broker(announce=lambda message: print(f"==> {message}", flush=True)) as bootstrap,
        tempfile.TemporaryDirectory(prefix="perfusion-eval-") as scratch,
    ):
        work_dir = args.work_dir or Path(scratch)
        result = run_evaluation(config, bootstrap, work_dir)
    markdown = write_report(result, args.out, command, markdown_path=args.docs, notes_path=args.notes)
    print(f"wrote {args.out / 'results.json'}, plots and {markdown} in {result.wall_seconds / 60:.1f} min")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    """``perfusion eval --probe``: simulator/probes/generator_probe.py, no broker needed."""
    from simulator.probes.generator_probe import ProbeConfig, render_probe_markdown
    from simulator.probes.generator_probe import run_probe as probe

    overrides = {
        "arms": tuple(args.arms) if args.arms else None,
        "train_users": args.users,
        "groups_per_user": args.probe_groups,
        "labels": args.probe_labels,
        "sampling_steps": args.steps,
        "diffusion_steps": args.generator_steps,
        "adaptive_learning_rate": args.adaptive_lr,
        "unet_learning_rate": args.unet_lr,
        "seed": args.seed,
        "torch_threads": args.threads,
    }
    config = ProbeConfig(**{key: value for key, value in overrides.items() if value is not None})
    result = probe(config)
    return _write_probe(args, "probe", result, render_probe_markdown(result, command_line(args)))


def _write_probe(args: argparse.Namespace, name: str, result: dict[str, Any], markdown_text: str) -> int:
    """``<out>/<name>.json`` with the command, and the markdown to --docs or ``<out>/<name>.md``."""
    import json

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({**result, "command": command_line(args)}, indent=2) + "\n")
    markdown = args.docs or args.out / f"{name}.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(markdown_text)
    print(f"wrote {args.out / f'{name}.json'} and {markdown} in {result['wall_seconds'] / 60:.1f} min")
    return 0


def run_reward_probe(args: argparse.Namespace) -> int:
    """``perfusion eval --reward-probe``: simulator/probes/reward_probe.py, no broker needed."""
    from simulator.probes.reward_probe import RewardProbeConfig, render_reward_probe_markdown
    from simulator.probes.reward_probe import run_reward_probe as probe

    overrides = {
        "users": args.users,
        "train_groups": args.probe_groups,
        "labels": args.probe_labels,
        "sampling_steps": args.steps,
        "steps": args.rm_steps,
        "seed": args.seed,
        "torch_threads": args.threads,
    }
    config = RewardProbeConfig(**{key: value for key, value in overrides.items() if value is not None})
    result = probe(config)
    return _write_probe(args, "reward_probe", result, render_reward_probe_markdown(result, command_line(args)))
