"""``perfusion train``: the incremental trainer. Consumes group samples and training requests from Kafka, updates
PerFusionRM and the generator, gates the candidate on held-out groups, publishes a version and announces it.

``--once`` trains on what is on the topics now and exits; ``--arm`` picks one of the evaluation's arms (objective
and whether the adaptive network is trained); single flags override it.
"""

from __future__ import annotations

import argparse
from typing import Any

from perfusion.settings import add_flags, flag_overrides
from trainer.settings import ARMS, OBJECTIVES, TrainerSettings

# The choices come from the trainer's settings themselves (a light module: no torch), never a second list.
ARM_NAMES = tuple(ARMS)
OBJECTIVE_NAMES = OBJECTIVES
# What --arm chooses (and --objective, --adaptive-network override): not flags of their own.
ARM_FIELDS = ("objective", "use_adaptive_network", "personalized_reward_model")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run the incremental trainer (consume samples, update, gate, publish)",
        description="Consume perfusion.group-samples and perfusion.train-requests, update PerFusionRM and the "
        "adaptive network, publish gated versions under <state>/models and announce them on "
        "perfusion.model-updates. Offsets are committed only after the publish they fed.",
    )
    parser.add_argument("--once", action="store_true", help="train on what is on the topics now, then exit")
    parser.add_argument("--max-updates", type=int, default=None, help="exit after this many updates")
    parser.add_argument("--arm", choices=ARM_NAMES, default="perfusion", help="objective and generator of one arm")
    parser.add_argument("--objective", choices=OBJECTIVE_NAMES, default=None, help="override the arm's objective")
    parser.add_argument(
        "--adaptive-network",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override the arm: train the adaptive network (or, with --no-adaptive-network, fine-tune the U-Net)",
    )
    # Every other setting of the trainer gets a flag of its own name, generated from the field (help, variable,
    # default): --reward-steps, --topic-prefix, --base-checkpoint, ...
    add_flags(parser, TrainerSettings, exclude=ARM_FIELDS)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from trainer.loop import build_trainer, describe_summary

    settings = TrainerSettings.for_arm(
        args.arm,
        objective=args.objective,
        use_adaptive_network=args.adaptive_network,
        **flag_overrides(args, TrainerSettings),
    )
    trainer = build_trainer(settings)
    print(f"trainer: serving {trainer.serving_version or 'the base model'}; arm {settings.arm_description}")
    summary = trainer.run(once=args.once, max_updates=args.max_updates)
    print(f"trainer: {describe_summary(summary)}")
    return 0
