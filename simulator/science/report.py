"""The science evaluation's markdown: headline table per arm (shoppers), personalisation, merchants, cold start,
per segment, integrity and the robustness sweep, from one seed's results dict (:func:`protocol.run_seed`)."""

from __future__ import annotations

from typing import Any

from simulator.eval.report import markdown_table, signed_interval
from simulator.science.config import BASELINE


def _lift(entry: dict[str, Any] | None, percent: bool = True) -> str:
    if entry is None:
        return "n/a"
    if not percent:
        return signed_interval(entry)
    low, high = entry["ci95"]
    return f"{100 * entry['value']:+.1f}% [{100 * low:+.1f}%, {100 * high:+.1f}%]"


def render_science_markdown(result: dict[str, Any], command: str) -> str:
    config, arms = result["config"], result["arms"]
    round_zero = result["round_zero"]
    lines = [
        f"# Science evaluation, seed {config['seed']}",
        "",
        f"Reproduce: `{command}` (wall time {result['wall_seconds'] / 60:.1f} min on this machine).",
        "",
        f"Round 0 (base model, shared by every arm): {round_zero['events']} events, {round_zero['group_samples']} "
        f"group samples ({round_zero['groups_with_a_positive']} with a positive, {round_zero['merchant_samples']} "
        f"merchants' selections), K = {config['k']}. One update per arm with the trainer's code, then "
        f"{result['showings']} showings drawn by every arm with the same prompts and seeds. Expected rates are the "
        "marketplace's probabilities (no Bernoulli noise), realised ones one shared draw; lifts are arm over base "
        "less 1, pooled over viewers, 95% paired bootstrap intervals over viewers. See docs/science-protocol.md.",
        "",
        "## Training shoppers, against base",
        "",
    ]
    header = [
        "arm",
        "expected CTR",
        "expected conversion",
        "expected return rate",
        "realised CTR",
        "utility per image",
        "own u over another segment's",
    ]
    rows = []
    for name, entry in arms.items():
        shoppers = entry["by_viewers"]["shoppers"]
        if name == BASELINE:
            levels = shoppers["levels"]
            rows.append(
                [
                    f"{name} (levels)",
                    f"{levels['expected_ctr']:.3f}",
                    f"{levels['expected_conversion']:.3f}",
                    f"{levels['expected_return_rate']:.3f}",
                    f"{levels['realised_ctr']:.3f}",
                    f"{levels['utility_per_image']:+.3f}",
                    "n/a",
                ]
            )
            continue
        lift = shoppers["vs_base"]
        rows.append(
            [
                name,
                _lift(lift["expected_ctr"]),
                _lift(lift["expected_conversion"]),
                _lift(lift["expected_return_rate"]),
                _lift(lift["realised_ctr"]),
                _lift(lift["utility"], percent=False),
                _lift(shoppers["own_u_over_other_segment_u"], percent=False),
            ]
        )
    lines += markdown_table(header, rows)
    for group, title in (("merchants", "Merchants, their own new designs"), ("cold", "Cold-start shoppers")):
        lines += ["", f"## {title}, against base", ""]
        group_rows = [
            [
                name,
                _lift(entry["by_viewers"][group]["vs_base"]["utility"], percent=False),
                _lift(entry["by_viewers"][group]["vs_base"]["expected_ctr"]),
                _lift(entry["by_viewers"][group]["own_u_over_other_segment_u"], percent=False),
            ]
            for name, entry in arms.items()
            if name != BASELINE and group in entry["by_viewers"]
        ]
        lines += markdown_table(["arm", "utility per image", "expected CTR", "own u over another's"], group_rows)
    segments = sorted(next(iter(arms.values()))["by_segment"])
    lines += ["", "## Per segment (training shoppers): utility per image less base's", ""]
    lines += markdown_table(
        ["arm", *segments],
        [
            [name, *(_lift(entry["by_segment"][s]["utility"], percent=False) for s in segments)]
            for name, entry in arms.items()
            if name != BASELINE
        ],
    )
    lines += ["", "## Integrity", ""]
    lines += markdown_table(
        [
            "arm",
            "pixel shift from base",
            "garment coverage",
            "RM held-out GAUC",
            "ranked by RM",
            "gate",
            "update |s|",
            "wall s",
        ],
        [
            [
                name,
                f"{entry['integrity']['mean_abs_pixel_shift_from_base']:.2f}",
                f"{entry['integrity']['garment_mask_coverage']:.3f}",
                _gauc(entry["integrity"]),
                str(entry["integrity"]["ranked_by_reward_model"]),
                "; ".join(entry["integrity"]["gate_reasons"]),
                f"{entry['update'].get('generator_mean_abs_reward', float('nan')):.2f}",
                f"{entry['integrity']['seconds']:.0f}",
            ]
            for name, entry in arms.items()
        ],
    )
    lines += _reward_model_lines(result.get("reward_models", {}))
    lines += _grid_lines(result.get("grid"))
    grid = next(iter(arms.values()))["robustness_expected_ctr_lift"]
    lines += ["", "## Robustness: shoppers' expected CTR lift under other click models (reading only)", ""]
    lines += markdown_table(
        ["arm", *(f"decay {row['position_decay']}, slope {row['click_slope']}" for row in grid)],
        [
            [name, *(f"{100 * row['expected_ctr_lift']:+.1f}%" for row in entry["robustness_expected_ctr_lift"])]
            for name, entry in arms.items()
            if name != BASELINE
        ],
    )
    return "\n".join(lines) + "\n"


def _gauc(integrity: dict[str, Any]) -> str:
    value = integrity.get("reward_model_heldout_gauc")
    low, high = integrity.get("reward_model_heldout_gauc_ci95") or [None, None]
    if value is None or value != value:  # NaN: no held-out group with both classes
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _reward_model_lines(comparisons: dict[str, Any]) -> list[str]:
    """PerFusionRM and the towers without plug-ins against the true-utility ceiling, per held-out set."""
    if not comparisons:
        return []
    lines = ["", "## Reward models on round 0 (fitted on 70% of the groups, ranked on the rest)", ""]
    rows = []
    for heldout, models in comparisons.items():
        for name, values in models.items():
            low, high = values["gauc_ci95"]
            rows.append(
                [heldout, name, f"{values['gauc']:.3f} [{low:.3f}, {high:.3f}]", f"{values['heldout_groups']:.0f}"]
            )
        lift = models["perfusion_rm"].get("gauc_lift_vs_without_plugins")
        if lift is not None:
            rows.append([heldout, "PerFusionRM less without plug-ins", signed_interval(lift), ""])
    lines += markdown_table(["held-out groups", "model", "GAUC", "groups"], rows)
    return lines


def render_pooled_markdown(pooled: dict[str, Any], command: str, plot_link: str | None = None) -> str:
    """The seeds pooled: every arm's lifts over base, the per-seed verdicts of the decision rule, the targets, and
    the plot of every seed's lifts (``plot_link``, relative to the markdown) when there is one."""
    lines = [
        f"# Science evaluation, seeds {', '.join(str(seed) for seed in pooled['seeds'])} pooled",
        "",
        f"Reproduce: `{command}`; the decision rule is docs/science-protocol.md's. Viewers of every seed are resampled "
        "together; a claim stands only where it holds on every seed.",
        "",
    ]
    header = ["arm", "expected CTR", "expected conversion", "expected return rate", "utility", "own u over another's"]
    rows = [
        [
            name,
            _lift(entry["vs_base"]["expected_ctr"]),
            _lift(entry["vs_base"]["expected_conversion"]),
            _lift(entry["vs_base"]["expected_return_rate"]),
            _lift(entry["vs_base"]["utility"], percent=False),
            _lift(entry.get("own_u_over_other_segment_u"), percent=False),
        ]
        for name, entry in pooled["pooled"].items()
    ]
    lines += markdown_table(header, rows)
    if plot_link is not None:
        lines += ["", f"![every arm's lifts over base, per seed and pooled]({plot_link})"]
    claims = list(pooled["holds_on_every_seed"])
    lines += ["", "## The claims, per seed", ""]
    lines += markdown_table(
        ["claim", *(f"seed {seed}" for seed in pooled["verdicts"]), "on every seed"],
        [
            [
                claim,
                *(str(verdict[claim]) for verdict in pooled["verdicts"].values()),
                str(pooled["holds_on_every_seed"][claim]),
            ]
            for claim in claims
        ],
    )
    if pooled["targets"]:
        lines += ["", "## Targets (pooled point estimates)", ""]
        lines += markdown_table(
            ["metric", "target", "pooled", "met"],
            [
                [metric, f"{100 * t['target']:+.1f}%", _lift(t["pooled"]), str(t["met_by_point"])]
                for metric, t in pooled["targets"].items()
            ],
        )
    return "\n".join(lines) + "\n"


def _grid_lines(grid: dict[str, Any] | None) -> list[str]:
    """The image grid's section: one held-out prompt, a row per segment, a block of K per arm."""
    if not grid:
        return []
    rows = ", ".join(f"{row['segment']} ({row['viewer']})" for row in grid["rows"])
    return [
        "",
        f'## One held-out prompt across segments: "{grid["prompt"]}"',
        "",
        f"Rows, top to bottom: {rows}. Blocks, left to right: {', '.join(grid['arms'])}, K images each, the same "
        "seeds in every block of a row.",
        "",
        f"![{grid['prompt']} across segments]({grid['file']})",
    ]
