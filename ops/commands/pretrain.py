"""``perfusion pretrain``: train the base text-to-image model and the attribute classifier on the catalog.

Examples::

    perfusion pretrain --quick                                  # tiny model, well under a minute (CI)
    perfusion pretrain --steps 3000 --out assets/base --docs docs
    perfusion pretrain --export-text-states states.safetensors  # on a machine with MiniLM
    perfusion pretrain --text-states states.safetensors --device cuda --bf16 --batch-size 512
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="train the base text-to-image model on the rendered catalog",
        description="Train the base UNet (and the attribute classifier) on the catalog's train captions, then "
        "report garment and colour accuracy of samples for held-out captions and write a sample grid.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: finishes in under a minute")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 3000; --quick: 30)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 64; --quick: 16)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    parser.add_argument(
        "--attribute-dropout",
        type=float,
        default=None,
        help="chance that each colour, pattern, sleeve and fit word is left out of a caption (default 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds renders, initialisation, batches and sampling")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    parser.add_argument("--time-budget-min", type=float, default=None, help="stop training after this many minutes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: <state dir>/base)")
    parser.add_argument("--docs", type=Path, default=None, help="also write samples.png and base-model.md here")
    parser.add_argument(
        "--base-model", type=Path, default=None, help="local diffusers folder whose unet/ to start from"
    )
    parser.add_argument(
        "--resume", type=Path, default=None, help="continue training the base checkpoint in this folder"
    )
    parser.add_argument("--text-states", type=Path, default=None, help="precomputed caption states instead of MiniLM")
    parser.add_argument(
        "--export-text-states", type=Path, default=None, help="write every catalog caption's MiniLM states and exit"
    )
    parser.add_argument(
        "--evaluate", type=Path, default=None, help="measure this checkpoint folder again instead of training"
    )
    parser.add_argument("--guidance-scale", type=float, default=None, help="guidance for evaluation (default 3)")
    parser.add_argument("--eval-seeds", type=int, default=None, help="samples per held-out caption (default 2)")
    parser.add_argument("--classifier-steps", type=int, default=None, help="attribute classifier steps (default 1200)")
    parser.add_argument(
        "--reward-tower-steps", type=int, default=None, help="contrastive steps of PerFusionRM's towers (default 1500)"
    )
    parser.add_argument(
        "--reward-towers-only",
        action="store_true",
        help="train only PerFusionRM's towers and add them to --out, leaving the base model there as it is",
    )
    parser.set_defaults(handler=run)


# Options recorded in a checkpoint's provenance, in this order; flags are recorded when set.
RECORDED_OPTIONS = (
    "quick", "steps", "batch_size", "lr", "attribute_dropout", "seed", "device", "bf16", "time_budget_min", "threads",
    "out", "docs", "base_model", "resume", "text_states", "evaluate", "guidance_scale", "eval_seeds",
    "classifier_steps", "reward_tower_steps", "reward_towers_only",
)  # fmt: skip


def command_line(args: argparse.Namespace) -> str:
    """The ``perfusion pretrain`` command line that reproduces these parsed options."""
    words = ["perfusion", "pretrain"]
    for name in RECORDED_OPTIONS:
        value = getattr(args, name, None)
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value not in (None, False):
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def run(args: argparse.Namespace) -> int:
    import platform

    import torch

    from perfusion.catalog import all_attributes
    from perfusion.errors import ConfigError
    from perfusion.models.base import QUICK_CONFIG, BaseModelConfig
    from perfusion.paths import state_dir
    from perfusion.text_encoder import CaptionStates, TextEncoder
    from trainer.attribute_classifier import ClassifierTrainingConfig
    from trainer.pretrain import PretrainConfig, evaluate_checkpoint, pretrain, save_pretrain_result
    from trainer.pretrain_docs import write_docs
    from trainer.reward_pretrain import RewardPretrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    model_config = QUICK_CONFIG if args.quick else BaseModelConfig()
    # The catalog's captions (the reward towers' text) and every attribute-dropout prompt of every item.
    captions = [text for attrs in all_attributes() for text in (attrs.caption(), *attrs.prompts())]
    if args.export_text_states:
        encoder = TextEncoder(max_length=model_config.text_max_length)
        CaptionStates.from_encoder(encoder, captions).save(args.export_text_states)
        print(f"wrote {len(captions) + 1} prompt encodings to {args.export_text_states}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} was asked for but CUDA is not available; use --device cpu")
    if args.text_states:
        text = CaptionStates.load(args.text_states)
    else:
        text = CaptionStates.from_encoder(TextEncoder(max_length=model_config.text_max_length), captions)
    if text.states.shape[1] != model_config.text_max_length:
        raise ConfigError(
            f"{args.text_states} holds {text.states.shape[1]} tokens a prompt but the model cross-attends to "
            f"{model_config.text_max_length}; export the states again with this version"
        )
    quick = args.quick
    defaults = PretrainConfig()
    classifier = ClassifierTrainingConfig(
        steps=args.classifier_steps or (40 if quick else defaults.classifier.steps),
        variants=1 if quick else defaults.classifier.variants,
        seed=args.seed,
        device=args.device,
    )
    reward_towers = RewardPretrainConfig(
        steps=args.reward_tower_steps or (20 if quick else defaults.reward_towers.steps),
        variants=1 if quick else defaults.reward_towers.variants,
        image_size=model_config.sample_size,
        seed=args.seed,
    )
    if args.reward_towers_only:
        return _pretrain_reward_towers_only(args, reward_towers, text, model_config.channels)
    config = PretrainConfig(
        steps=args.steps or (30 if quick else defaults.steps),
        batch_size=args.batch_size or (16 if quick else defaults.batch_size),
        learning_rate=args.lr,
        attribute_dropout=defaults.attribute_dropout if args.attribute_dropout is None else args.attribute_dropout,
        warmup_steps=10 if quick else defaults.warmup_steps,
        variants=1 if quick else defaults.variants,
        seed=args.seed,
        device=args.device,
        bf16=args.bf16,
        time_budget_s=args.time_budget_min * 60 if args.time_budget_min else None,
        eval_captions=8 if quick else 0,
        eval_seeds=args.eval_seeds or (1 if quick else defaults.eval_seeds),
        grid_captions=4 if quick else defaults.grid_captions,
        grid_seeds=3 if quick else defaults.grid_seeds,
        open_seeds=4 if quick else defaults.open_seeds,
        open_grid_seeds=3 if quick else defaults.open_grid_seeds,
        sample_steps=5 if quick else defaults.sample_steps,
        guidance_scale=args.guidance_scale or defaults.guidance_scale,
        classifier=classifier,
        reward_towers=reward_towers,
    )
    if args.evaluate:
        evaluated, recorded = evaluate_checkpoint(args.evaluate, config, text)
        if args.docs:
            write_docs(evaluated, args.docs, {**recorded, "evaluate_command": command_line(args)})
        accuracy = evaluated.metrics["heldout_accuracy"]
        print(f"{args.evaluate}: garment {accuracy['garment']:.1%}, colour {accuracy['colour']:.1%}")
        return 0
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.machine()})"
    provenance = {
        "command": command_line(args),
        "seed": args.seed,
        "batch_size": config.batch_size,
        "device_name": device_name,
        "torch": torch.__version__,
        "base_model": str(args.base_model) if args.base_model else None,
        "resumed_from": str(args.resume) if args.resume else None,
    }
    if args.resume:
        provenance["previous"] = previous_training(args.resume)
    if args.resume and args.base_model:
        raise ConfigError("--resume and --base-model both name a starting point; pass one of them")
    result = pretrain(model_config, config, text, base_model=args.base_model, resume=args.resume)
    out = args.out or state_dir() / "base"
    save_pretrain_result(result, out, model_config, config, provenance, built=args.base_model is None)
    if args.docs:
        write_docs(result, args.docs, provenance)
    accuracy = result.metrics["heldout_accuracy"]
    print(
        f"pretrained {int(result.metrics['train_steps'])} steps in {result.metrics['train_wall_s']:.0f} s; "
        f"held-out sample accuracy: garment {accuracy['garment']:.1%}, colour {accuracy['colour']:.1%}; "
        f"checkpoint in {out}"
    )
    logging.getLogger(__name__).debug("metrics: %s", result.metrics)
    return 0


def previous_training(folder: Path) -> dict[str, Any]:
    """How the checkpoint in ``folder`` was trained (its own chain included), for a run that continues it."""
    import json

    report = json.loads((folder / "report.json").read_text())
    provenance, metrics = report["provenance"], report["metrics"]
    return {
        "command": provenance["command"],
        "train_steps": metrics["train_steps"],
        "batch_size": provenance["batch_size"],
        "train_wall_s": metrics["train_wall_s"],
        "device_name": provenance["device_name"],
        "previous": provenance.get("previous"),
    }


def _pretrain_reward_towers_only(args: argparse.Namespace, config: Any, text: Any, channels: int) -> int:
    """``--reward-towers-only``: PerFusionRM's towers into ``--out`` beside a base model trained before."""
    from perfusion.paths import state_dir
    from trainer.reward_pretrain import pretrain_reward_towers, save_reward_towers

    out = args.out or state_dir() / "base"
    towers, figures = pretrain_reward_towers(config, text, channels)
    folder = save_reward_towers(out, towers, {**figures, "command": command_line(args)})
    print(
        f"reward towers: {int(figures['steps'])} steps in {figures['train_wall_s']:.0f} s; held-out caption "
        f"retrieval top-1 {figures['heldout_retrieval_top1']:.1%}, top-5 {figures['heldout_retrieval_top5']:.1%}; "
        f"saved in {folder}"
    )
    return 0
