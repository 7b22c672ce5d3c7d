"""The group-signal report: how much preference signal the groups the loop logs carry, against catalog renders.

The group objective learns from the contrast within a group of K candidates: which one the viewer clicked, and
which they did not. It can only learn what that contrast holds. This report measures it, for groups drawn by the
**base** model (the serving generator with its default sampler, no user vector: what the loop logs before any
update) on the evaluation's training prompts, shown to the evaluation's panel of training shoppers, and for a
reference row of **catalog** groups (K renders of the prompt's garment whose open attributes, colour, pattern, sleeve
and fit, are drawn at random), graded by the same shoppers with the same random numbers:

- ``within_group_sd``: the spread of true utility within a group (standard deviation over its K candidates, as its
  viewer values them; mean over groups);
- ``user_specific_share``: the share of the within-group contrast that is specific to the viewer, not shared by the
  panel (:func:`simulator.probes.signal_stats.user_specific_share`); personalisation has something to learn only
  where it is high;
- ``single_click_best``: among groups with exactly one click, how often that click is the group's best image
  (chance 1 / K), and ``single_click_best_expected``, the same in expectation over the click model's draws;
- ``click_gap``: mean true utility of the clicked candidates less the unclicked ones', within a group;
- ``merchant_pick_gap``: the same for the simulator's merchants, who select 1 to ``max_selected`` candidates of their
  own design by their true utility plus noise (:meth:`simulator.marketplace.Marketplace.merchant_selection`), on
  their own utility; the merchant of a design is the evaluation's (:func:`simulator.eval.plan.design_owner`);
- ``best_of_k_gain``: what an oracle picking each group's best gains over a random candidate, and
  ``personal_best_gain``, its personal part: the viewer's own best over the candidate best for the panel on average.

Groups are logged by the probes' :func:`simulator.probes.logged_groups.log_base_groups` (its seeds and click draws).
Intervals: 95% percentile bootstrap over users (:func:`simulator.probes.signal_stats.bootstrap`). Acceptance, on
the base row: ``within_group_sd >= 0.8`` and ``single_click_best >= 0.5``.

It reads the simulator's hidden truth (every viewer's utility of every candidate), so it is a diagnostic of the
groups, never a training input: nothing it computes reaches the loop.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from perfusion.errors import ConfigError
from perfusion.settings import Settings
from simulator.eval.config import EvaluationConfig
from simulator.eval.plan import TRAIN_PROMPTS, Population, design_owner
from simulator.eval.results import Estimate, Record, ResultsFile
from simulator.ground_truth import PixelPreferencePanel
from simulator.marketplace import BehaviourConfig, Marketplace
from simulator.probes.logged_groups import LoggedGroups, log_base_groups
from simulator.probes.signal_stats import STATISTICS, GroupTable, bootstrap, groups_counted

log = logging.getLogger(__name__)

SourceName = Literal["base", "catalog"]
_CHUNK = 256  # images a viewer scores at once
CATALOG_SIZE = 32  # catalog renders at the size the panel's features were scaled on (simulator.eval.plan)
# Statistic of the base row -> the least value that passes.
ACCEPTANCE: dict[str, float] = {"within_group_sd": 0.8, "single_click_best": 0.5}


class SignalConfig(Settings):
    """Size and settings of one group-signal report."""

    users: int = Field(
        default=EvaluationConfig().train_users,
        ge=2,
        description="training shoppers of the evaluation's panel: each is shown groups, all view every one (at "
        "least 2: a panel to share contrast with)",
    )
    groups_per_user: int = Field(
        default=16, ge=1, description="groups shown to each user, the training prompts in turn"
    )
    k: int = Field(default=EvaluationConfig().k, ge=2, le=16, description="candidates per group")
    sampling_steps: int | None = Field(
        default=None,
        ge=1,
        description="steps of the serving sampler (None: the serving generator's default sampler as it is)",
    )
    bootstrap_samples: int = Field(default=1000, ge=100, description="bootstrap resamplings of users")
    seed: int = Field(default=0, description="seed of the panel (as the evaluation's), click and merchant draws")
    torch_threads: int = Field(default=1, ge=1, description="torch threads (a small U-Net runs best on one)")
    base_checkpoint: Path = Field(default=EvaluationConfig().base_checkpoint, description="the base model folder")

    @property
    def labels(self) -> str:
        """What :func:`log_base_groups` grades by: the shoppers' clicks and orders."""
        return "clicks"


# ---------------------------------------------------------------------------------------------------------- records


class SignalEstimate(Estimate):
    """A statistic with its 95% bootstrap interval over users."""

    groups: int = Field(ge=0, description="groups it averages over")


class GroupSignal(Record):
    """The preference signal in one source's groups; utilities are the simulator's true utilities (unit scale)."""

    groups: int = Field(ge=0, description="groups shown")
    clicks_per_group: float = Field(ge=0)
    within_group_sd: SignalEstimate = Field(description="sd (divisor K - 1) of the viewer's utility over a group's K")
    user_specific_share: SignalEstimate = Field(description="share of within-group contrast specific to the viewer")
    single_click_best: SignalEstimate = Field(description="P(the click is the best | exactly one click)")
    single_click_best_expected: SignalEstimate = Field(description="the same in expectation over the click draws")
    chance: float = Field(description="1 / K, single_click_best of clicks that ignore the images")
    click_gap: SignalEstimate = Field(description="utility of clicked less unclicked candidates, within a group")
    merchant_pick_gap: SignalEstimate = Field(description="merchant's utility of selected less unselected candidates")
    best_of_k_gain: SignalEstimate = Field(description="group's best less its mean utility")
    personal_best_gain: SignalEstimate = Field(description="the viewer's own best less the panel's best, to the viewer")


class Criterion(Record):
    """One acceptance criterion on the base row."""

    statistic: str
    threshold: float = Field(description="the least value that passes")
    value: float
    ci95: tuple[float, float]
    passed: bool


class Generation(Record):
    """What drew the base row."""

    checkpoint: str
    unet_sha256: str = Field(description="first 16 hex digits of the SHA-256 of the base U-Net's files")
    sampler: str = Field(description="the serving generator's sampler, as it describes itself")
    image_size: int = Field(ge=1)


class SignalSummary(Record):
    """Every number of one report, as :func:`run_signal` returns it."""

    sources: dict[SourceName, GroupSignal] = Field(description="base: the base model's groups; catalog: renders")
    acceptance: dict[str, Criterion]
    prompts: list[str]
    generation: Generation
    config: SignalConfig
    wall_seconds: float = Field(ge=0)


class SignalResults(SignalSummary, ResultsFile):
    """The content of the report's JSON."""

    command: str = Field(description="the command that reproduces the numbers (output folders left out)")

    @classmethod
    def of(cls, summary: SignalSummary, command: str) -> SignalResults:
        return cls(**dict(summary), command=command)


# ------------------------------------------------------------------------------------------------ catalog groups


def prompt_labels(prompt: str) -> dict[str, str]:
    """The attribute labels a prompt names, kind -> value ("a red t-shirt" -> garment t-shirt, colour red)."""
    from perfusion.attributes import ATTRIBUTE_KINDS

    words = prompt.lower().replace(",", " ").split()
    labels = {kind: value for kind, values in ATTRIBUTE_KINDS.items() for value in values if value in words}
    if "garment" not in labels:
        raise ConfigError(f"prompt {prompt!r} names no garment of {', '.join(ATTRIBUTE_KINDS['garment'])}")
    return labels


class CatalogGroups:
    """Stands where the generator does for :func:`log_base_groups`: K catalog renders of the prompt's garment, the
    kinds the prompt leaves open drawn at random without repeating an item; descriptors from the labels."""

    model_version = "catalog"

    def generate(self, prompt: str, user_vector: Any, k: int, seed: int) -> Any:
        from perfusion.catalog import all_attributes, render_many
        from service.generator import GeneratedGroup

        named = prompt_labels(prompt)
        options = [item for item in all_attributes() if all(getattr(item, kind) == v for kind, v in named.items())]
        if k > len(options):
            raise ConfigError(f"prompt {prompt!r} leaves {len(options)} catalog items open, fewer than k = {k}")
        rng = np.random.default_rng([seed, 31])
        items = [options[index] for index in rng.choice(len(options), size=k, replace=False)]
        seeds = [int(value) for value in rng.integers(0, 2**31 - 1, size=k)]
        images = render_many(items, seeds, size=CATALOG_SIZE)
        return GeneratedGroup(images, [item.descriptor() for item in items], self.model_version)


# ---------------------------------------------------------------------------------------------------------- the run


def group_table(
    logged: LoggedGroups,
    panel: PixelPreferencePanel,
    viewers: list[str],
    population: Population,
    seed: int,
) -> GroupTable:
    """The logged groups as every viewer values them, the owners' clicks (a positive grade: a click, or an order,
    which follows one), the click model's probabilities, and the design merchant's selection."""
    marketplace = Marketplace(panel)
    candidates = [sorted(sample.candidates, key=lambda candidate: candidate.position) for sample in logged.samples]
    images = np.stack([np.stack([logged.pixels[c.image_id] for c in group]) for group in candidates])  # (G, K, H, W, 3)
    count = images.shape[0]
    utilities = np.stack([_scores(panel, viewer, images) for viewer in viewers], axis=1)  # (G, V, K)
    owner = np.array([viewers.index(sample.user_id) for sample in logged.samples], dtype=np.int64)
    selections = [
        marketplace.merchant_selection(
            design_owner(population, sample.prompt), images[index], np.random.default_rng([seed, 23, index])
        )
        for index, sample in enumerate(logged.samples)
    ]
    own = utilities[np.arange(count), owner]  # (G, K)
    return GroupTable(
        utilities=utilities,
        owner=owner,
        clicked=np.array([[candidate.grade > 0 for candidate in group] for group in candidates], dtype=bool),
        click_probabilities=np.stack([marketplace.click_probabilities(row) for row in own]),
        picker_utilities=np.stack([selection.utilities for selection in selections]),
        picked=np.stack([selection.selected for selection in selections]),
    )


def _scores(panel: PixelPreferencePanel, viewer: str, images: np.ndarray) -> np.ndarray:
    """(G, K) true utilities of (G, K, H, W, 3) images for one viewer, scored a chunk of images at a time (the
    features hold 12 floats a pixel for the colour histogram)."""
    flat = images.reshape(-1, *images.shape[2:])
    chunks = [panel.utilities(viewer, flat[start : start + _CHUNK]) for start in range(0, len(flat), _CHUNK)]
    return np.concatenate(chunks).astype(np.float64).reshape(images.shape[:2])


def group_signal(table: GroupTable, config: SignalConfig) -> GroupSignal:
    """Every statistic of :data:`STATISTICS` on ``table``, with its interval and the groups it counts."""
    estimates = bootstrap(table, STATISTICS, config.bootstrap_samples, config.seed)
    counts = groups_counted(table)
    return GroupSignal.model_validate(
        {
            "groups": int(table.utilities.shape[0]),
            "clicks_per_group": float(table.clicked.sum(axis=1).mean()),
            "chance": 1.0 / table.k,
            **{name: {**estimate, "groups": counts[name]} for name, estimate in estimates.items()},
        }
    )


def acceptance(base: GroupSignal) -> dict[str, Criterion]:
    """Each criterion of :data:`ACCEPTANCE` on the base row; a NaN value fails."""
    criteria = {}
    for name, threshold in ACCEPTANCE.items():
        estimate: SignalEstimate = getattr(base, name)
        criteria[name] = Criterion(
            statistic=name,
            threshold=threshold,
            value=estimate.value,
            ci95=estimate.ci95,
            passed=bool(estimate.value >= threshold),
        )
    return criteria


def run_signal(config: SignalConfig) -> SignalSummary:
    """Log groups of the base model and of the catalog for the evaluation's panel, and measure their signal."""
    from perfusion.sampler_config import SERVING_SAMPLER
    from service.generator import load_serving_generator
    from simulator.eval.runner import arm_inputs

    started = time.monotonic()
    panel, population, text_encoder = arm_inputs(
        EvaluationConfig(
            train_users=config.users,
            k=config.k,
            seed=config.seed,
            torch_threads=config.torch_threads,
            base_checkpoint=config.base_checkpoint,
        )
    )
    users = population.train_users
    # An empty model store: the base model alone, with the serving configuration's sampler unless a flag asks.
    with tempfile.TemporaryDirectory(prefix="perfusion-signal-") as empty_store:
        if config.sampling_steps is None:
            serving = load_serving_generator(config.base_checkpoint, Path(empty_store), text_encoder)
        else:
            sampler = SERVING_SAMPLER.with_steps(config.sampling_steps)
            serving = load_serving_generator(config.base_checkpoint, Path(empty_store), text_encoder, sampler=sampler)
    drawn_by: tuple[tuple[SourceName, Any], ...] = (("base", serving), ("catalog", CatalogGroups()))
    sources: dict[SourceName, GroupSignal] = {}
    for name, generator in drawn_by:
        source_started = time.monotonic()
        logged = log_base_groups(config, panel, users, generator)
        sources[name] = group_signal(group_table(logged, panel, users, population, config.seed), config)
        log.info("signal: %s groups measured in %.0f s", name, time.monotonic() - source_started)
    base = sources["base"]
    return SignalSummary(
        sources=sources,
        acceptance=acceptance(base),
        prompts=list(TRAIN_PROMPTS),
        generation=Generation(
            checkpoint=_shown(config.base_checkpoint),
            unet_sha256=folder_digest(config.base_checkpoint / "unet"),
            sampler=sampler_description(serving),
            image_size=int(serving.config.sample_size),
        ),
        config=config,
        wall_seconds=time.monotonic() - started,
    )


def _shown(path: Path) -> str:
    """``path`` relative to the project's root when it lies inside it (the same on every clone), else as given."""
    from perfusion.paths import REPO_ROOT

    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def folder_digest(folder: Path) -> str:
    """First 16 hex digits of the SHA-256 over the names and bytes of ``folder``'s files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(item for item in folder.rglob("*") if item.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def sampler_description(generator: Any) -> str:
    """How the serving generator samples, from what it holds: its sampler (described by itself where it can), and
    its steps and guidance where it holds them apart from the sampler."""
    sampler = getattr(generator, "sampler", "unknown sampler")
    parts = [sampler.describe() if hasattr(sampler, "describe") else str(sampler)]
    steps = getattr(generator, "num_steps", None)
    guidance = getattr(generator, "guidance_scale", None)
    if steps is not None:
        parts.append(f"{steps} steps")
    if guidance is not None:
        parts.append(f"guidance {guidance}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------- report

# Statistic -> its label in the report's table, in the table's order.
_ROWS: dict[str, str] = {
    "within_group_sd": "within-group sd of true utility",
    "user_specific_share": "user-specific share of within-group contrast",
    "single_click_best": "P(single click = group's best)",
    "single_click_best_expected": "P(single click = best), click model's expectation",
    "click_gap": "gap clicked - unclicked (utility)",
    "merchant_pick_gap": "gap of a merchant's pick (merchant's utility)",
    "best_of_k_gain": "oracle best-of-K gain (best - group mean)",
    "personal_best_gain": "personal part (own best - panel's best)",
}


def _cell(estimate: SignalEstimate) -> str:
    low, high = estimate.ci95
    return f"{estimate.value:.3f} [{low:.3f}, {high:.3f}] ({estimate.groups})"


def render_signal_markdown(results: SignalResults) -> str:
    """The report: the statistics of both sources, the acceptance on the base row, and what each number means."""
    from simulator.eval.report import markdown_table

    config, base, catalog = results.config, results.sources["base"], results.sources["catalog"]
    b = BehaviourConfig()  # the marketplace's behaviour, which group_table's Marketplace(panel) uses
    rows = [[label, _cell(getattr(base, name)), _cell(getattr(catalog, name))] for name, label in _ROWS.items()]
    rows.append(["chance level of a single click, 1 / K", f"{base.chance:.3f}", f"{catalog.chance:.3f}"])
    rows.append(["clicks per group", f"{base.clicks_per_group:.2f}", f"{catalog.clicks_per_group:.2f}"])
    verdicts = [
        f"- {name} >= {criterion.threshold}: {criterion.value:.3f} [{criterion.ci95[0]:.3f}, {criterion.ci95[1]:.3f}] "
        f"**{'PASS' if criterion.passed else 'FAIL'}**"
        for name, criterion in results.acceptance.items()
    ]
    generation = results.generation
    lines = [
        "# Group signal: how much preference the logged groups carry",
        "",
        f"Reproduce: `{results.command}` (wall time {results.wall_seconds / 60:.1f} min on this machine). Code: "
        "simulator/probes/signal.py and signal_stats.py. A diagnostic that reads the simulator's truth; nothing in it "
        "trains the system.",
        "",
        f"Base model: `{generation.checkpoint}` (U-Net {generation.unet_sha256}), sampled by the serving generator "
        f"({generation.sampler}) at {generation.image_size}x{generation.image_size}, without a user vector. Prompts: "
        f"{', '.join(repr(prompt) for prompt in results.prompts)} in turn. Panel: the evaluation's {config.users} "
        f"training shoppers (seed {config.seed}), {config.groups_per_user} groups of K = {config.k} shown to each "
        f"({base.groups} groups per source); every shopper values every group. The catalog row: K renders of the "
        "prompt's garment, colour, pattern, sleeve and fit drawn at random, graded with the same click draws.",
        "",
        "## Acceptance (base row)",
        "",
        *verdicts,
        "",
        "## Statistics",
        "",
        "Value [95% bootstrap interval over users] (groups it averages over).",
        "",
        *markdown_table(["statistic", "base model", "catalog renders"], rows),
        "",
        "## What the numbers are",
        "",
        "- Within-group sd: the standard deviation (divisor K - 1) of a group's K true utilities for the shopper it "
        f"was shown to, mean over groups. Utilities are on a unit scale; a click follows sigmoid({b.click_bias:g} + "
        f"{b.click_slope:g} u) times the slot's weight (1 + slot) ** -{b.position_decay:g}, so a spread well below 1 "
        "gives clicks little to follow.",
        "- User-specific share: each viewer's utilities centred within the group are split into their mean over the "
        "panel (what every shopper prefers alike) and the viewer's residual; the share is the residual's sum of "
        "squares over the total. A generator conditioned on the user can only add what this share holds.",
        "- P(single click = best): over groups with exactly one click, how often it is the group's best by the "
        "clicker's utility; the click model's expectation is the same ratio with P(exactly one click, at k) from "
        "the click probabilities, free of which groups happened to get one click. Slot position biases clicks "
        "towards slot 0 in both.",
        "- Gap clicked - unclicked: within each group with both, the mean utility of clicked candidates less of the "
        "others, averaged over groups.",
        f"- Merchant's pick: the simulator's merchants select 1 to {b.max_selected} candidates of their own design by "
        f"their true utility plus N(0, {b.selection_noise_sd:g}) noise (`Marketplace.merchant_selection`); the gap "
        "is on the merchant's utility, the merchant of each design as in the evaluation. Intervals resample the "
        "shoppers whose groups they are.",
        "- Oracle best-of-K gain: a group's best utility less its mean, for its viewer; its personal part is the "
        "viewer's own best less their utility of the candidate the panel likes best on average.",
        "",
    ]
    return "\n".join(lines)
