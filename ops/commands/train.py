"""``perfusion train``: the incremental trainer. Consumes group samples and training requests from Kafka, updates
PerFusionRM and the generator, gates the candidate on held-out groups, publishes a version and announces it.

``--once`` trains on what is on the topics now and exits; ``--arm`` picks one of the evaluation's arms (objective
and whether the adaptive network is trained); single flags override it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trainer.settings import ARMS, OBJECTIVES

# The choices come from the trainer's settings themselves (a light module: no torch), never a second list.
ARM_NAMES = tuple(ARMS)
OBJECTIVE_NAMES = OBJECTIVES


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
    parser.add_argument("--reward-steps", type=int, default=None, help="reward-model steps per update")
    parser.add_argument("--diffusion-steps", type=int, default=None, help="generator steps per update")
    parser.add_argument("--groups-per-batch", type=int, default=None, help="impressions per step")
    parser.add_argument("--seed", type=int, default=None, help="seed of sampling, noise and timesteps")
    parser.add_argument("--topic-prefix", default=None, help="topic and consumer-group prefix (as the worker's)")
    parser.add_argument("--bootstrap-servers", default=None, help="Kafka host:port (default: the project's broker)")
    parser.add_argument("--model-root", type=Path, default=None, help="published versions (default <state>/models)")
    parser.add_argument("--base-checkpoint", type=Path, default=None, help="base model folder (default assets/base)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from trainer.loop import build_trainer, describe_summary
    from trainer.settings import TrainerSettings

    settings = TrainerSettings.for_arm(
        args.arm,
        objective=args.objective,
        use_adaptive_network=args.adaptive_network,
        reward_steps=args.reward_steps,
        diffusion_steps=args.diffusion_steps,
        groups_per_batch=args.groups_per_batch,
        seed=args.seed,
        topic_prefix=args.topic_prefix,
        bootstrap_servers=args.bootstrap_servers,
        model_root=args.model_root,
        base_checkpoint=args.base_checkpoint,
    )
    trainer = build_trainer(settings)
    print(f"trainer: serving {trainer.serving_version or 'the base model'}; arm {settings.arm_description}")
    summary = trainer.run(once=args.once, max_updates=args.max_updates)
    print(f"trainer: {describe_summary(summary)}")
    return 0
