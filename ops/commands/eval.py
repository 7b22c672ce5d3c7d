"""``perfusion eval MODE``: the closed-loop evaluation of every arm against the simulated marketplace (``loop``) and
the offline probes of one generator update (``probe``) and of the reward models (``reward-probe``), and the
group-signal report (``signal``, :mod:`ops.commands.eval_signal`), the choice of the serving sampler
(``sampler``, :mod:`ops.commands.eval_sampler`) and the preregistered science evaluation (``science``,
:mod:`ops.commands.eval_science`).

A mode's flags are its config's fields (:mod:`perfusion.config_flags`: ``--sampling-steps`` sets
``sampling_steps``), beside the options that are not fields (``--quick``, ``--arms``, the output folders). Every
option except the output folders changes the numbers, so each one given reaches the reproduction command the reports
print (:func:`command_line`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops.commands import eval_sampler, eval_science, eval_signal
from perfusion.config_flags import (
    ConfigFlagsParser,
    add_config_flags_when_used,
    config_flags,
    config_from_flags,
    flag_arguments,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

log = logging.getLogger(__name__)

# Options that only say where the outputs go; every other option is part of the reproduction command.
OUTPUT_OPTIONS = frozenset({"help", "out", "docs", "notes", "work_dir"})


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate the arms: the live loop with 95%% CIs, or offline probes of one update",
        description="loop: every arm through rounds of the live loop; probe: one generator update per arm on "
        "logged groups; reward-probe: reward models trained on logged groups. Each writes JSON and markdown. "
        "Every mode's flags but its outputs and --quick, --arms or --pool are its config's fields.",
    )
    # Each mode's parser adds its config's flags when it is used, so that building the CLI imports no config.
    modes = parser.add_subparsers(dest="mode", metavar="MODE", required=True, parser_class=ConfigFlagsParser)
    _register_loop(modes)
    _register_probe(modes)
    _register_reward_probe(modes)
    eval_signal.register(modes)
    eval_sampler.register(modes)
    eval_science.register(modes)


def _evaluation_config() -> type[BaseModel]:
    from simulator.eval.config import EvaluationConfig

    return EvaluationConfig


def _probe_config() -> type[BaseModel]:
    from simulator.probes.generator_probe import ProbeConfig

    return ProbeConfig


def _reward_probe_config() -> type[BaseModel]:
    from simulator.probes.reward_probe import RewardProbeConfig

    return RewardProbeConfig


def _register_loop(modes: Any) -> None:
    parser = modes.add_parser(
        "loop",
        help="run every arm through rounds of the live loop and report CTR, conversion, returns with 95%% CIs",
        description="Per arm: its own topic prefix, Feast store, stream worker and trainer; generated groups, "
        "simulated shoppers and merchants judging the pixels, events on Kafka, updates, publishes. Writes "
        "results.json, PNG plots and results.md (and, with --docs, docs/results.md).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI size: every arm, one update, a handful of users (flags apply over it)"
    )
    parser.add_argument("--arms", nargs="+", default=None, help="arms to run (default: all six)")
    add_config_flags_when_used(parser, _evaluation_config, exclude=("arms",))
    _add_output_options(parser, "docs/results.md")
    parser.add_argument(
        "--notes", type=Path, default=None, help="append this hand-written analysis to the markdown (kept on reruns)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="per-arm state (default: a temporary folder)")
    _set_handler(parser, "loop", run)


def _register_probe(modes: Any) -> None:
    parser = modes.add_parser(
        "probe",
        help="one generator update per arm on logged base-model groups, scored per shopper segment (no broker)",
        description="Logs base-model groups graded by the simulated shoppers, trains each arm's generator once on "
        "them with the trainer's code, and scores trained against base per segment, with a personalisation check. "
        "Writes probe.json and probe.md (or --docs).",
    )
    parser.add_argument("--arms", nargs="+", default=None, help="arms whose update is probed (default: the four)")
    add_config_flags_when_used(parser, _probe_config, exclude=("arms",))
    _add_output_options(parser, "docs/generator-probe.md")
    _set_handler(parser, "probe", run_probe)


def _register_reward_probe(modes: Any) -> None:
    parser = modes.add_parser(
        "reward-probe",
        help="reward models (with and without plug-ins, pretrained and random towers) trained on logged groups "
        "and scored on new groups of the same users (no broker)",
        description="Logs --train-groups base-model groups per user to learn from and --heldout-groups new ones to "
        "score on, trains four reward models with the trainer's step, and reports held-out GAUC and MAP with paired "
        "differences. Writes reward_probe.json and reward_probe.md (or --docs).",
    )
    add_config_flags_when_used(parser, _reward_probe_config)
    _add_output_options(parser, "docs/reward-probe.md")
    _set_handler(parser, "reward-probe", run_reward_probe)


def _add_output_options(parser: argparse.ArgumentParser, docs_example: str) -> None:
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for JSON and plots")
    parser.add_argument("--docs", type=Path, default=None, help=f"also write the markdown here ({docs_example})")


def _set_handler(parser: argparse.ArgumentParser, mode: str, handler: Any) -> None:
    """The mode's handler, and its options other than the config's flags that reach the reproduction command, in
    the order they were added."""
    reproduced = tuple(
        (action.dest, action.option_strings[0])
        for action in parser._actions
        if action.option_strings and action.dest not in OUTPUT_OPTIONS
    )
    parser.set_defaults(handler=handler, reproduced_mode=mode, reproduced_options=reproduced)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run's numbers (output folders left out): the mode's own options, then
    the config flags given."""
    parts = ["perfusion", "eval", args.reproduced_mode]
    config_dests = {flag.dest for flag in config_flags(args).flags}  # on a parser that added them at once
    for name, flag in args.reproduced_options:
        if name in config_dests:
            continue
        value = getattr(args, name)
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *value]
        elif value not in (None, False):
            parts += [flag, str(value)]
    return shlex.join([*parts, *flag_arguments(args)])


def run(args: argparse.Namespace) -> int:
    """``perfusion eval loop``: simulator/eval/, on the project's broker (or KAFKA_BOOTSTRAP_SERVERS)."""
    if args.notes is not None and not args.notes.is_file():
        from perfusion.errors import ConfigError

        # Checked before the run, not after it: a full evaluation takes most of an hour.
        raise ConfigError(f"--notes {args.notes} is not a file; write the analysis there first or leave --notes out")
    from simulator.eval.config import EvaluationConfig

    arms = {"arms": tuple(args.arms)} if args.arms else {}
    config = config_from_flags(args, EvaluationConfig.quick if args.quick else EvaluationConfig, **arms)
    from harness.loop import running_broker
    from simulator.eval.report import write_report
    from simulator.eval.runner import run_evaluation

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
    """``perfusion eval probe``: simulator/probes/generator_probe.py, no broker needed."""
    from simulator.probes.generator_probe import ProbeConfig, ProbeResults, render_probe_markdown
    from simulator.probes.generator_probe import run_probe as probe

    config = config_from_flags(args, ProbeConfig, **({"arms": tuple(args.arms)} if args.arms else {}))
    results = ProbeResults.of(probe(config), command_line(args))
    return _write_probe(args, "probe", results.to_json(), render_probe_markdown(results), results.wall_seconds)


def _write_probe(args: argparse.Namespace, name: str, json_text: str, markdown_text: str, wall_seconds: float) -> int:
    """``<out>/<name>.json`` (the results with the command), and the markdown to --docs or ``<out>/<name>.md``."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json_text)
    markdown = args.docs or args.out / f"{name}.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(markdown_text)
    print(f"wrote {args.out / f'{name}.json'} and {markdown} in {wall_seconds / 60:.1f} min")
    return 0


def run_reward_probe(args: argparse.Namespace) -> int:
    """``perfusion eval reward-probe``: simulator/probes/reward_probe.py, no broker needed."""
    from simulator.probes.reward_probe import RewardProbeConfig, RewardProbeResults, render_reward_probe_markdown
    from simulator.probes.reward_probe import run_reward_probe as probe

    config = config_from_flags(args, RewardProbeConfig)
    results = RewardProbeResults.of(probe(config), command_line(args))
    markdown = render_reward_probe_markdown(results)
    return _write_probe(args, "reward_probe", results.to_json(), markdown, results.wall_seconds)
