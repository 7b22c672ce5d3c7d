"""What ``perfusion eval`` writes: results JSON, PNG plots and docs/results.md.

- ``results.json``: :class:`simulator.eval.results.EvaluationResults` (every metric with its 95% bootstrap
  interval over users and its lift over the base arm, the offline reward-model comparison, versions per arm,
  the configuration, the command and the wall time), whose schema is ``docs/schemas/results.schema.json``;
- ``metrics_per_round.png``: each metric per round per arm, with intervals, one row per slice;
- ``reward_models.png``: GAUC and MAP of PerFusionRM and of the same towers without plug-ins;
- ``segment_grid.png``: the same prompt generated for users of different segments, base against PerFusion;
- ``results.md``: the final-round table against the base arm and the reproduction command.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulator.eval.config import BASELINE_ARM, EvaluationConfig
from simulator.eval.plan import SLICES
from simulator.eval.results import Estimate, EvaluationResults, MetricEstimate
from simulator.eval.runner import EvaluationResult, arms_at_once
from simulator.eval.stats import METRICS, RELATIVE_METRICS

METRIC_LABELS = {
    "ctr": "CTR",
    "conversion": "conversion (orders / clicks)",
    "return_rate": "return rate",
    "utility": "mean true utility",
}
TARGETS = {"ctr": "≥ +13%", "conversion": "≥ +13%", "return_rate": "≤ −7.9%", "utility": "—"}


def write_report(
    result: EvaluationResult,
    out_dir: Path,
    command: str,
    markdown_path: Path | None = None,
    notes_path: Path | None = None,
) -> Path:
    """Write the JSON, the plots and the markdown (with ``notes_path``'s hand-written analysis appended as it is,
    so a rerun keeps it); returns the markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = EvaluationResults.of(result.summary, command, result.wall_seconds)
    (out_dir / "results.json").write_text(results.to_json())
    plot_metrics(result, out_dir / "metrics_per_round.png")
    plot_reward_models(result, out_dir / "reward_models.png")
    plot_segment_grid(result, out_dir / "segment_grid.png")
    markdown = markdown_path or out_dir / "results.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    text = render_markdown(result, command, plots_dir=_relative(out_dir, markdown.parent))
    if notes_path is not None:
        text += "\n" + notes_path.read_text()
    markdown.write_text(text)
    return markdown


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path.resolve())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(result: EvaluationResult, path: Path) -> None:
    plt = _pyplot()
    metrics = result.summary.metrics
    figure, axes = plt.subplots(len(SLICES), len(METRICS), figsize=(4 * len(METRICS), 3 * len(SLICES)), squeeze=False)
    rounds = sorted(int(r) for r in metrics[SLICES[0]])
    for row, slice_name in enumerate(SLICES):
        for column, metric in enumerate(METRICS):
            axis = axes[row][column]
            for offset, arm in enumerate(result.arms):
                estimates = [getattr(metrics[slice_name][str(r)][arm], metric) for r in rounds]
                values = [estimate.value for estimate in estimates]
                lows = [estimate.ci95[0] for estimate in estimates]
                highs = [estimate.ci95[1] for estimate in estimates]
                xs = np.array(rounds, dtype=float) + 0.04 * (offset - len(result.arms) / 2)
                errors = np.abs(np.array([np.subtract(values, lows), np.subtract(highs, values)]))
                axis.errorbar(xs, values, yerr=errors, marker="o", capsize=2, label=arm)
            axis.set_title(f"{METRIC_LABELS[metric]} · {slice_name}", fontsize=9)
            axis.set_xticks(rounds)
            axis.set_xlabel("round (updates so far)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_reward_models(result: EvaluationResult, path: Path) -> None:
    plt = _pyplot()
    models = result.summary.reward_models
    names = list(models)
    figure, axis = plt.subplots(figsize=(5, 3.2))
    width = 0.35
    for offset, metric in enumerate(("gauc", "map")):
        axis.bar(
            np.arange(len(names)) + offset * width,
            [getattr(models[name], metric) for name in names],
            width,
            label=metric,
        )
    axis.set_xticks(np.arange(len(names)) + width / 2, names)
    axis.set_ylim(0.0, 1.0)
    axis.set_title("reward models on held-out groups")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_segment_grid(result: EvaluationResult, path: Path) -> None:
    """One row per segment (its first user with a final-round showing of the grid prompt): base | PerFusion."""
    plt = _pyplot()
    compared = [arm for arm in (BASELINE_ARM, "perfusion") if arm in result.arms]
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for user, segment in result.segments.items():
        if segment not in seen and all(user in result.arms[arm].grid_images for arm in compared):
            rows.append((segment, user))
            seen.add(segment)
    figure, axes = plt.subplots(
        max(1, len(rows)), len(compared), figsize=(3.2 * len(compared), 1.2 * max(1, len(rows)) + 0.6), squeeze=False
    )
    for row, (segment, user) in enumerate(rows):
        for column, arm in enumerate(compared):
            strip = np.concatenate(list(result.arms[arm].grid_images[user]), axis=1)
            axes[row][column].imshow(strip, interpolation="nearest")
            axes[row][column].set_xticks([])
            axes[row][column].set_yticks([])
            if column == 0:
                axes[row][column].set_ylabel(segment, fontsize=7)
            if row == 0:
                axes[row][column].set_title(arm, fontsize=9)
    figure.suptitle(f"'{result.grid_prompt}', final round, one user per segment", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _format(entry: Estimate, percent: bool = False) -> str:
    value, (low, high) = entry.value, entry.ci95
    if any(math.isnan(x) for x in (value, low, high)):
        return "n/a"
    if percent:
        return f"{value:+.1%} [{low:+.1%}, {high:+.1%}]"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def render_markdown(result: EvaluationResult, command: str, plots_dir: str) -> str:
    config = result.config
    metrics = result.summary.metrics
    final = str(config.rounds)
    lines = [
        "# Closed-loop evaluation results",
        "",
        f"Reproduce: `{command}` (wall time {result.wall_seconds / 60:.1f} min on this machine, arms run "
        f"{_arms_at_once(config)} on {os.cpu_count()} CPU cores).",
        "",
        f"Setup: {len(config.arms)} arms, {config.rounds} trainer update(s) per arm, {config.train_users} live users "
        f"({config.impressions_per_user} impression(s) each per round), {config.cold_users} cold-start users, "
        f"K = {config.k}, {config.sampling_steps} DDIM steps, {config.reward_steps} RM and {config.diffusion_steps} "
        f"generator steps per update (learning rates: {_generator_learning_rates(config)}), seed {config.seed}. "
        "Every arm sees the same users, prompts, seeds, event times and marketplace draws. Intervals: 95% paired "
        f"bootstrap over users ({config.bootstrap_samples} resamplings).",
        "",
    ]
    for slice_name in metrics:
        entries = metrics[slice_name][final]
        header = ["arm", *(METRIC_LABELS[m] for m in METRICS)]
        lines += [f"## Round {final} (after the last update), {slice_name.replace('_', ' ')}", ""]
        lines += markdown_table(
            header, ([arm, *(_format(getattr(entries[arm], m)) for m in METRICS)] for arm in result.arms)
        )
        lines += ["", "Lift over base (rates: relative change; utility: difference), 95% CI:", ""]
        lifts = [
            [arm, *(_format(_lift(getattr(entries[arm], m)), percent=m in RELATIVE_METRICS) for m in METRICS)]
            for arm in result.arms
            if arm != BASELINE_ARM
        ]
        lines += markdown_table(header, [*lifts, ["target (perfusion)", *(TARGETS[m] for m in METRICS)]])
        lines.append("")
    lines += [
        "## How far the generator moved",
        "",
        "Mean absolute pixel difference (0 to 255) between each arm's final-round images and the base model's for the "
        "same showing (same viewer, prompt and seeds); 0 means its updates did not change what shoppers see.",
        "",
        "| arm | all showings | live | held-out prompt | cold start |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {arm} | {shift.mean_abs_pixel_diff:.2f} | {_or_nan(shift.live_mean_abs_pixel_diff):.2f} | "
            f"{_or_nan(shift.heldout_prompt_mean_abs_pixel_diff):.2f} | "
            f"{_or_nan(shift.cold_start_mean_abs_pixel_diff):.2f} |"
            for arm, shift in result.summary.generator_shift_vs_base.items()
        ),
        "",
        *_segment_lines(result),
        "## Reward models (offline, held-out groups)",
        "",
        "| model | GAUC [95% CI over groups] | MAP | train groups | held-out groups |",
    ]
    lines.append("| --- | --- | --- | --- | --- |")
    models = result.summary.reward_models
    for name, scores in models.items():
        low, high = scores.gauc_ci95
        lines.append(
            f"| {name} | {scores.gauc:.3f} [{low:.3f}, {high:.3f}] | {scores.map:.3f} | "
            f"{int(scores.train_groups)} | {int(scores.heldout_groups)} |"
        )
    lift = models["perfusion_rm"].gauc_lift_vs_without_plugins if "perfusion_rm" in models else None
    if lift is not None:
        lines += [
            "",
            f"PerFusionRM less the model without plug-ins: GAUC {signed_interval(lift)} (paired bootstrap over "
            "held-out groups).",
        ]
    lines += [
        "",
        "`true_utility_ceiling` scores the same groups by the simulator's true utilities (no model reads them): the "
        "GAUC a perfect model of each shopper's taste reaches on these noisy clicks and orders, the ceiling of any "
        "reward model here.",
        "",
        "Targets: PerFusionRM GAUC ≥ 0.95 and ≥ 0.2 above the model without plug-ins.",
        "",
    ]
    lines += ["## Arms", "", "| arm | published versions | gate refusals | seconds |", "| --- | --- | --- | --- |"]
    for arm, history in result.summary.arms.items():
        lines.append(f"| {arm} | {', '.join(history.versions)} | {history.gate_refusals} | {history.seconds:.0f} |")
    lines += [
        "",
        "## Plots",
        "",
        f"![metrics per round]({plots_dir}/metrics_per_round.png)",
        "",
        f"![reward models]({plots_dir}/reward_models.png)",
        "",
        f"![same prompt, different segments]({plots_dir}/segment_grid.png)",
        "",
    ]
    return "\n".join(lines)


def _arms_at_once(config: EvaluationConfig) -> str:
    workers = arms_at_once(config)
    return "one after another" if workers == 1 else f"{workers} at a time"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: the header, the separator, one line per row of cells."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def signed_interval(entry: Estimate | Mapping[str, Any]) -> str:
    """An estimate (or ``{"value": v, "ci95": [low, high]}``) as "+v [+low, +high]": differences, so the sign always
    shows."""
    value, (low, high) = (entry.value, entry.ci95) if isinstance(entry, Estimate) else (entry["value"], entry["ci95"])
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def _lift(estimate: MetricEstimate) -> Estimate:
    if estimate.lift_vs_base is None:
        raise ValueError("an arm other than base has no lift over base; the summary was built without the base arm")
    return estimate.lift_vs_base


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _segment_lines(result: EvaluationResult) -> list[str]:
    by_segment = result.summary.utility_vs_base_by_segment
    if not by_segment:
        return []
    segments = sorted({segment for values in by_segment.values() for segment in values})
    lines = [
        "## Who gained: true utility by shopper segment",
        "",
        "Final round, live and held-out-prompt showings of the training users: mean true utility per image less "
        "base's, per segment of shoppers (the simulator's segments, which no model sees), 95% paired bootstrap over "
        "the segment's users. A generator that moves every shopper's images alike gains in the segments whose taste "
        "that shift matches and loses in the others; a personalised one gains in each.",
        "",
    ]
    rows = (
        [arm, *(signed_interval(values[s]) if s in values else "n/a" for s in segments)]
        for arm, values in by_segment.items()
    )
    lines += markdown_table(["arm", *segments], rows)
    return [*lines, ""]


def _generator_learning_rates(config: EvaluationConfig) -> str:
    from trainer.settings import TrainerSettings

    defaults = {name: info.default for name, info in TrainerSettings.model_fields.items()}
    rates = []
    for name, label in (("adaptive_learning_rate", "adaptive network"), ("unet_learning_rate", "fine-tuned U-Net")):
        value = getattr(config, name)
        rates.append(f"{label} {value:g}" if value is not None else f"{label} {defaults[name]:g} (the trainer's)")
    return ", ".join(rates)
