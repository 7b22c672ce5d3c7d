"""The base model's report: docs/samples.png, docs/open_samples.png and docs/base-model.md from a pretraining result
(:func:`trainer.pretrain.pretrain` or :func:`trainer.pretrain.evaluate_checkpoint`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perfusion.attributes import ATTRIBUTE_KINDS
from trainer.pretrain import PretrainResult, save_grids


def write_docs(result: PretrainResult, docs: Path, provenance: dict[str, Any]) -> None:
    """docs/samples.png and docs/base-model.md with the figures and the command that made them."""
    docs.mkdir(parents=True, exist_ok=True)
    save_grids(docs, result.grid, result.open_grid)
    m = result.metrics
    heldout = m["heldout_accuracy"]
    renders = m["classifier_accuracy_on_renders"]
    lines = [
        "# The base text-to-image model",
        "",
        "A pixel-space diffusers `UNet2DConditionModel` cross-attending to frozen all-MiniLM-L6-v2 token states,",
        "trained on the rendered catalog (train captions only), EMA weights, classifier-free guidance (10% caption",
        "dropout). It is committed in `assets/base/` and loaded by `perfusion.sampling.BaseGenerator`.",
        "",
        f"Captions drop each of the colour, pattern, sleeve and fit words with probability "
        f"{m.get('attribute_dropout', 0.0)}, independently, so that the model learns to draw what a prompt leaves",
        'open: "a t-shirt" should give t-shirts of many colours and patterns, "a navy t-shirt" navy ones of any',
        'pattern. A named plain pattern is written ("a navy plain ..."), so that no pattern word means any pattern.',
        "",
        "## Figures",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| parameters | {m['parameters'] / 1e6:.2f} M |",
        f"| training steps | {int(m['train_steps'])} at batch {provenance['batch_size']} |",
        f"| training wall time | {m['train_wall_s'] / 60:.1f} min on {provenance['device_name']} |",
        *_previous_rows(provenance.get("previous")),
        f"| final training loss | {m['final_loss']} |",
        f"| evaluation sampler | {m.get('eval_sampler', 'DDIM')} |",
        f"| held-out captions, samples classified | {m['heldout_captions']}, {m['eval_samples']} |",
        *(f"| held-out sample accuracy: {kind} | {value:.1%} |" for kind, value in heldout.items()),
        f"| classifier on fresh renders: garment, colour | {renders['garment']:.1%}, {renders['colour']:.1%} |",
        *_reward_tower_rows(m.get("reward_towers")),
        "",
        "Held-out captions are attribute combinations never shown in pretraining; the attribute classifier, trained",
        "on renders of every catalog item, reads the generated samples.",
        "",
        "![samples for held-out captions](samples.png)",
        "",
        "Rows: held-out captions, fully specified; columns: seeds 0, 1, 2, ...",
        "",
        *_open_spread_lines(m),
        "## Reproduce",
        "",
        "```",
        *_previous_commands(provenance.get("previous")),
        provenance["command"],
        *([provenance["evaluate_command"]] if provenance.get("evaluate_command") else []),
        "```",
        "",
    ]
    (docs / "base-model.md").write_text("\n".join(lines))


def _previous_rows(previous: dict[str, Any] | None) -> list[str]:
    """Rows for the runs this checkpoint continued, earliest first."""
    if not previous:
        return []
    return [
        *_previous_rows(previous.get("previous")),
        f"| continued from: steps, wall time | {int(previous['train_steps'])} at batch {previous['batch_size']}, "
        f"{previous['train_wall_s'] / 60:.1f} min on {previous['device_name']} |",
    ]


def _previous_commands(previous: dict[str, Any] | None) -> list[str]:
    return [*_previous_commands(previous.get("previous")), previous["command"]] if previous else []


def _open_spread_lines(m: dict[str, Any]) -> list[str]:
    spread = m.get("open_spread")
    if not spread:
        return []
    colours, patterns = len(ATTRIBUTE_KINDS["colour"]), len(ATTRIBUTE_KINDS["pattern"])
    return [
        "## What a garment-only prompt leaves open",
        "",
        f'{m["open_seeds"]} seeds of each garment-only prompt ("a t-shirt"), read by the attribute classifier: how',
        f"many of the {colours} colours and {patterns} patterns appear, and the normalised entropy of their shares",
        "(1: every value equally often; 0: always the same).",
        "",
        "| prompt | garment right | colours | colour entropy | patterns | pattern entropy | sleeves | fits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| a {garment} | {f['garment_accuracy']:.0%} | {int(f['colour_values'])} | {f['colour_entropy']:.2f} | "
            f"{int(f['pattern_values'])} | {f['pattern_entropy']:.2f} | {int(f['sleeve_values'])} | "
            f"{int(f['fit_values'])} |"
            for garment, f in spread.items()
        ),
        "",
        "![garment-only prompts across seeds](open_samples.png)",
        "",
        "Rows: garment-only prompts; columns: seeds 0, 1, 2, ...",
        "",
    ]


def _reward_tower_rows(figures: dict[str, Any] | None) -> list[str]:
    if not figures:
        return []
    return [
        f"| PerFusionRM towers: contrastive steps, wall time | {int(figures['steps'])}, "
        f"{figures['train_wall_s'] / 60:.1f} min |",
        f"| PerFusionRM towers: held-out caption named, top-1 / top-5 of {int(figures['heldout_captions'])} | "
        f"{figures['heldout_retrieval_top1']:.1%} / {figures['heldout_retrieval_top5']:.1%} |",
    ]
