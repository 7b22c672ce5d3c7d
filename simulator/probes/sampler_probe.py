"""Which sampler the service draws with: attribute accuracy, garment coverage and cost of each candidate sampler.

Every group the loop shows is sampled with :data:`perfusion.sampler_config.SERVING_SAMPLER`; this probe chooses its
step count. For each candidate (:data:`CANDIDATES`: DDIM with leading spacing at 4 steps, the sampler before this
probe; DDIM with trailing spacing at 2 to 10 steps; DPM-Solver++ 2nd order, thresholded, trailing at 4 and 6 steps)
and for the reference (:data:`REFERENCE`, DDIM trailing at 25 steps), with guidance 3 and the same initial noise:

(a) **attribute accuracy** per kind of samples of the catalog's held-out fully specified prompts
    (``split_catalog().heldout``, prompt ``attrs.prompt()``, which names every kind and writes "plain"), read by the
    base checkpoint's attribute classifier, as pretraining's ``evaluate_heldout`` measures the base model;
(b) **garment coverage**: the mean share of pixels the simulator's garment mask covers (the ``coverage`` feature of
    :func:`simulator.ground_truth.pixel_features`, the pixels that differ from the border's median colour) in
    samples of the evaluation's prompts (training and held-out, garment-only), with catalog renders of the same
    prompts (their open kinds drawn at random) as the reference row;
(c) **seconds per group** of K on this machine: :func:`perfusion.sampling.denoise` of K rows through the base U-Net,
    both guidance branches in one forward of 2K rows a step; the least of a few groups after a warm-up, since other
    work on a shared machine only ever adds to a group's time (the load average is recorded beside it).

The rule (:data:`RULE`, fixed before the measurement): the serving sampler is the trailing candidate with the fewest
steps whose mean attribute accuracy over the kinds is at most :data:`ACCURACY_TOLERANCE` below the reference's and
whose coverage is within :data:`COVERAGE_TOLERANCE` of the reference's, either way; at equal steps DDIM before
DPM-Solver++. The leading row is reported, never chosen. Nothing here trains anything; the base checkpoint is read
as it is, so a new checkpoint is measured by running the command again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from perfusion.paths import ASSETS_DIR
from perfusion.sampler_config import SamplerConfig
from perfusion.settings import Settings
from simulator.eval.plan import HELDOUT_PROMPTS, TRAIN_PROMPTS
from simulator.eval.results import Record, ResultsFile
from simulator.ground_truth import PIXEL_FEATURE_NAMES, pixel_features

if TYPE_CHECKING:
    import torch

    from perfusion.attributes import Attributes

log = logging.getLogger(__name__)

GUIDANCE = 3.0  # the serving guidance; every row samples with it
CANDIDATES: tuple[SamplerConfig, ...] = (
    SamplerConfig(kind="ddim", spacing="leading", steps=4, guidance_scale=GUIDANCE),
    *(SamplerConfig(kind="ddim", spacing="trailing", steps=n, guidance_scale=GUIDANCE) for n in (2, 3, 4, 6, 8, 10)),
    *(SamplerConfig(kind="dpm-solver", spacing="trailing", steps=n, guidance_scale=GUIDANCE) for n in (4, 6)),
)
REFERENCE = SamplerConfig(kind="ddim", spacing="trailing", steps=25, guidance_scale=GUIDANCE)
ACCURACY_TOLERANCE = 0.03  # 3 points of mean attribute accuracy below the reference's
COVERAGE_TOLERANCE = 0.05  # 5 points of image area either side of the reference's coverage
RULE = (
    "The serving sampler is the trailing-spacing candidate with the fewest steps whose mean attribute accuracy over "
    f"the kinds is at most {ACCURACY_TOLERANCE * 100:.0f} points below the {REFERENCE.steps}-step reference's and "
    f"whose garment coverage is within {COVERAGE_TOLERANCE * 100:.0f} points of the reference's, either way; at "
    "equal steps DDIM comes before DPM-Solver++. The leading-spacing row is today's sampler, reported, never chosen."
)
COVERAGE_PROMPTS: tuple[str, ...] = TRAIN_PROMPTS + HELDOUT_PROMPTS
_COVERAGE = PIXEL_FEATURE_NAMES.index("coverage")
_KIND_ORDER = {"ddim": 0, "dpm-solver": 1}
Role = Literal["today", "candidate", "reference"]


class SamplerProbeConfig(Settings):
    """Size and settings of one sampler probe."""

    seeds_per_prompt: int = Field(default=2, ge=1, description="samples per held-out prompt (115 prompts)")
    coverage_seeds: int = Field(default=16, ge=1, description="samples (and catalog renders) per evaluation prompt")
    k: int = Field(default=4, ge=1, le=16, description="candidates per timed group")
    timing_groups: int = Field(default=5, ge=1, description="timed groups per sampler (after one warm-up group)")
    batch_size: int = Field(default=128, ge=1, description="images denoised at once (2x rows per forward)")
    torch_threads: int = Field(default=2, ge=1, description="torch threads")
    base_checkpoint: Path = Field(default=ASSETS_DIR / "base", description="the base model folder")


# ---------------------------------------------------------------------------------------------------------- records


class SamplerRow(Record):
    """One sampler's figures."""

    role: Role = Field(description="today: the sampler before this probe; reference: the 25-step one")
    kind: str
    spacing: str
    steps: int = Field(ge=1)
    guidance_scale: float
    first_timestep: int = Field(description="the first timestep of the schedule (999 = pure noise)")
    model_evaluations: int = Field(ge=0, description="steps that call the model (the terminal step does not)")
    accuracy: dict[str, float] = Field(description="attribute accuracy per kind on the held-out prompts' samples")
    mean_accuracy: float = Field(description="mean of accuracy over the kinds")
    coverage: float = Field(description="mean share of pixels under the garment mask, evaluation prompts' samples")
    seconds_per_group: float = Field(ge=0, description="least seconds to denoise a group of K on this machine")
    qualifies: bool | None = Field(description="passes the rule's tolerances (None for the reference)")

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(kind=self.kind, spacing=self.spacing, steps=self.steps, guidance_scale=self.guidance_scale)

    @property
    def label(self) -> str:
        return f"{'DDIM' if self.kind == 'ddim' else 'DPM-Solver++'} {self.spacing}"


class SamplerProbeSummary(Record):
    """Every number of one probe, as :func:`run_sampler_probe` returns it."""

    rule: str
    rows: list[SamplerRow] = Field(description="the candidates in CANDIDATES order, then the reference")
    catalog_coverage: float = Field(description="the garment mask's mean share in catalog renders of the prompts")
    chosen_steps: int | None = Field(description="steps of the chosen sampler; None when no candidate qualifies")
    chosen_kind: str | None
    checkpoint: str
    unet_sha256: str = Field(description="first 16 hex digits of the SHA-256 of the base U-Net's files")
    heldout_prompts: int = Field(ge=0)
    coverage_prompts: list[str]
    config: SamplerProbeConfig
    load_average_1m: tuple[float, float] = Field(description="the machine's 1-minute load average at start and end")
    wall_seconds: float = Field(ge=0)

    @property
    def reference(self) -> SamplerRow:
        return next(row for row in self.rows if row.role == "reference")


class SamplerProbeResults(SamplerProbeSummary, ResultsFile):
    """The content of the probe's JSON."""

    command: str = Field(description="the command that reproduces the numbers (output folders left out)")

    @classmethod
    def of(cls, summary: SamplerProbeSummary, command: str) -> SamplerProbeResults:
        return cls(**dict(summary), command=command)


# --------------------------------------------------------------------------------------------------------- the rule


def qualifies(row: SamplerRow, reference: SamplerRow) -> bool:
    """The rule's tolerances: accuracy at most 3 points below the reference's, coverage within 5 points of it."""
    close_accuracy = row.mean_accuracy >= reference.mean_accuracy - ACCURACY_TOLERANCE
    return close_accuracy and abs(row.coverage - reference.coverage) <= COVERAGE_TOLERANCE


def choose(rows: list[SamplerRow]) -> SamplerRow | None:
    """The rule's choice among the trailing candidates: fewest steps that qualify, DDIM first at equal steps."""
    eligible = [row for row in rows if row.role == "candidate" and row.spacing == "trailing" and row.qualifies]
    return min(eligible, key=lambda row: (row.steps, _KIND_ORDER[row.kind]), default=None)


def mask_coverage(images: np.ndarray) -> float:
    """Mean share of pixels under the simulator's garment mask, images (N, H, W, 3) uint8."""
    return float(pixel_features(images)[:, _COVERAGE].mean())


# ---------------------------------------------------------------------------------------------------------- the run


@dataclass
class _Inputs:
    """What every sampler draws from: the base model, the prompts' token states and the shared initial noise."""

    unet: Any
    model_config: Any
    classifier: Any
    heldout_targets: list[Attributes]
    heldout_states: torch.Tensor  # [N, L, D], one row per held-out sample
    heldout_noise: torch.Tensor  # [N, C, H, W]
    coverage_states: torch.Tensor  # [M, L, D], one row per evaluation-prompt sample
    coverage_noise: torch.Tensor  # [M, C, H, W]
    uncond_states: torch.Tensor  # [1, L, D], the empty prompt


def _inputs(config: SamplerProbeConfig) -> _Inputs:
    import torch

    from perfusion.catalog import split_catalog
    from perfusion.checkpoints import load_component
    from perfusion.models.attribute_classifier import build_attribute_classifier
    from perfusion.sampling import base_model_config, base_text_encoder, initial_noise, load_base_unet

    folder = config.base_checkpoint
    model_config = base_model_config(folder)
    classifier = load_component(folder, "attribute_classifier", build_attribute_classifier).eval()
    encoder = base_text_encoder(folder)
    heldout = list(split_catalog().heldout)
    targets = [attrs for attrs in heldout for _ in range(config.seeds_per_prompt)]
    coverage_prompts = [prompt for prompt in COVERAGE_PROMPTS for _ in range(config.coverage_seeds)]

    def encode(prompts: list[str]) -> torch.Tensor:
        unique = sorted(set(prompts))
        states, _ = encoder.encode(unique)
        return states[[unique.index(prompt) for prompt in prompts]]

    def noise(count: int, first_seed: int) -> torch.Tensor:
        seeds = range(first_seed, first_seed + count)
        return initial_noise(list(seeds), model_config.channels, model_config.sample_size, torch.device("cpu"))

    with torch.no_grad():
        return _Inputs(
            unet=load_base_unet(folder),
            model_config=model_config,
            classifier=classifier,
            heldout_targets=targets,
            heldout_states=encode([attrs.prompt() for attrs in targets]),
            heldout_noise=noise(len(targets), 10_000),  # pretraining's evaluate_heldout seeds
            coverage_states=encode(coverage_prompts),
            coverage_noise=noise(len(coverage_prompts), 20_000),
            uncond_states=encode([""]),
        )


def _draw(inputs: _Inputs, sampler: SamplerConfig, states: Any, noise: Any, batch_size: int) -> np.ndarray:
    """uint8 (N, H, W, 3): row i denoised from noise[i] for states[i], in batches."""
    from perfusion.sampling import denoise, to_uint8, unet_noise_fn

    predict = unet_noise_fn(inputs.unet)
    chunks = []
    for start in range(0, noise.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        images = denoise(predict, noise[rows], states[rows], sampler, inputs.model_config, inputs.uncond_states)
        chunks.append(to_uint8(images))
    return np.concatenate(chunks)


def _seconds_per_group(inputs: _Inputs, sampler: SamplerConfig, config: SamplerProbeConfig) -> float:
    states = inputs.coverage_states[:1].expand(config.k, -1, -1)
    noise = inputs.coverage_noise[: config.k]
    timings = []
    for index in range(config.timing_groups + 1):
        started = time.perf_counter()
        _draw(inputs, sampler, states, noise, config.k)
        if index:  # the first group warms up
            timings.append(time.perf_counter() - started)
    return min(timings)


def catalog_renders(coverage_seeds: int, size: int) -> np.ndarray:
    """``coverage_seeds`` catalog renders per evaluation prompt: the prompt's garment, its open kinds at random."""
    from perfusion.catalog import all_attributes, render_many

    items = all_attributes()
    chosen, seeds = [], []
    for index, prompt in enumerate(COVERAGE_PROMPTS):
        garment = prompt.removeprefix("a ")
        options = [item for item in items if item.garment == garment]
        rng = np.random.default_rng([index, 47])
        picks = rng.choice(len(options), size=coverage_seeds, replace=coverage_seeds > len(options))
        chosen += [options[int(pick)] for pick in picks]
        seeds += [int(value) for value in rng.integers(0, 2**31 - 1, size=coverage_seeds)]
    return render_many(chosen, seeds, size=size)


def measure(inputs: _Inputs, sampler: SamplerConfig, role: Role, config: SamplerProbeConfig) -> SamplerRow:
    """One sampler's row (``qualifies`` left None: it needs the reference)."""
    from perfusion.models.attribute_classifier import attribute_accuracy
    from perfusion.models.base import build_sampling_scheduler
    from perfusion.sampling import model_timesteps

    started = time.monotonic()
    first_timestep = int(build_sampling_scheduler(inputs.model_config, sampler).timesteps[0])
    evaluations = len(model_timesteps(sampler, inputs.model_config))
    heldout = _draw(inputs, sampler, inputs.heldout_states, inputs.heldout_noise, config.batch_size)
    accuracy = attribute_accuracy(inputs.classifier, heldout, inputs.heldout_targets)
    coverage = mask_coverage(_draw(inputs, sampler, inputs.coverage_states, inputs.coverage_noise, config.batch_size))
    row = SamplerRow(
        role=role,
        kind=sampler.kind,
        spacing=sampler.spacing,
        steps=sampler.steps,
        guidance_scale=sampler.guidance_scale,
        first_timestep=first_timestep,
        model_evaluations=evaluations,
        accuracy=accuracy,
        mean_accuracy=float(np.mean(list(accuracy.values()))),
        coverage=coverage,
        seconds_per_group=_seconds_per_group(inputs, sampler, config),
        qualifies=None,
    )
    log.info(
        "sampler %s %d steps: accuracy %.3f, coverage %.3f, %.2f s/group (%.0f s)",
        row.label,
        row.steps,
        row.mean_accuracy,
        row.coverage,
        row.seconds_per_group,
        time.monotonic() - started,
    )
    return row


def run_sampler_probe(config: SamplerProbeConfig) -> SamplerProbeSummary:
    """Measure every candidate and the reference on the same noise, and apply the rule."""
    import torch

    started, load_at_start = time.monotonic(), os.getloadavg()[0]
    torch.set_num_threads(config.torch_threads)
    inputs = _inputs(config)
    reference = measure(inputs, REFERENCE, "reference", config)
    rows = []
    for sampler in CANDIDATES:
        row = measure(inputs, sampler, "today" if sampler.spacing == "leading" else "candidate", config)
        rows.append(row.model_copy(update={"qualifies": qualifies(row, reference)}))
    rows.append(reference)
    chosen = choose(rows)
    return SamplerProbeSummary(
        rule=RULE,
        rows=rows,
        catalog_coverage=mask_coverage(catalog_renders(config.coverage_seeds, inputs.model_config.sample_size)),
        chosen_steps=None if chosen is None else chosen.steps,
        chosen_kind=None if chosen is None else chosen.kind,
        checkpoint=_shown(config.base_checkpoint),
        unet_sha256=_folder_digest(config.base_checkpoint / "unet"),
        heldout_prompts=len(inputs.heldout_targets) // config.seeds_per_prompt,
        coverage_prompts=list(COVERAGE_PROMPTS),
        config=config,
        load_average_1m=(load_at_start, os.getloadavg()[0]),
        wall_seconds=time.monotonic() - started,
    )


def _shown(path: Path) -> str:
    """``path`` relative to the project's root when it lies inside it, else as given."""
    from perfusion.paths import REPO_ROOT

    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(item for item in folder.rglob("*") if item.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------- report


def render_sampler_markdown(results: SamplerProbeResults) -> str:
    """docs/sampler.md: the rule, the table, the choice, and the command that reproduces it."""
    from perfusion.attributes import ATTRIBUTE_KINDS
    from simulator.eval.report import markdown_table

    config = results.config
    kinds = list(ATTRIBUTE_KINDS)
    header = ["sampler", "steps", "first t", "model evals", *kinds, "mean", "coverage", "s / group", "rule"]
    rows = []
    for row in results.rows:
        verdict = {True: "passes", False: "fails", None: "reference"}[row.qualifies]
        if row.role == "today":
            verdict += " (today, not eligible)"
        rows.append(
            [
                row.label,
                str(row.steps),
                str(row.first_timestep),
                str(row.model_evaluations),
                *(f"{row.accuracy[kind]:.3f}" for kind in kinds),
                f"**{row.mean_accuracy:.3f}**",
                f"**{row.coverage:.3f}**",
                f"{row.seconds_per_group:.2f}",
                verdict,
            ]
        )
    rows.append(["catalog renders", "", "", "", *([""] * len(kinds)), "", f"{results.catalog_coverage:.3f}", "", ""])
    if results.chosen_steps is None:
        choice = "No trailing candidate qualifies: keep the serving sampler as it is and look at the table."
    else:
        name = "DDIM" if results.chosen_kind == "ddim" else "DPM-Solver++"
        choice = (
            f"**{name}, trailing spacing, {results.chosen_steps} steps, guidance {GUIDANCE:g}**: "
            "`perfusion.sampler_config.SERVING_SAMPLER` holds it."
        )
    samples = results.heldout_prompts * config.seeds_per_prompt
    coverage_samples = len(results.coverage_prompts) * config.coverage_seeds
    return "\n".join(
        [
            "# The serving sampler: how many steps",
            "",
            f"Reproduce: `{results.command}` (wall time {results.wall_seconds / 60:.1f} min on this machine, "
            f"{config.torch_threads} torch threads). Code: simulator/probes/sampler_probe.py. JSON beside it "
            "(`sampler.json`).",
            "",
            f"Base model: `{results.checkpoint}` (U-Net {results.unet_sha256}). Every row samples with classifier-free "
            f"guidance {GUIDANCE:g}, from the same initial noise, through `perfusion.sampling.denoise` (both guidance "
            "branches in one forward of 2B rows).",
            "",
            "## The rule (fixed before the measurement)",
            "",
            results.rule,
            "",
            f"- accuracy: attribute accuracy per kind of {samples} samples ({config.seeds_per_prompt} per prompt) of "
            f"the catalog's {results.heldout_prompts} held-out fully specified prompts (`Attributes.prompt()`), read "
            "by the base checkpoint's attribute classifier; mean over the kinds.",
            f"- coverage: mean share of pixels under the simulator's garment mask (`pixel_features` coverage: pixels "
            f"that differ from the border's median colour) in {coverage_samples} samples of the evaluation's prompts "
            f"({', '.join(results.coverage_prompts)}); the catalog row is {coverage_samples} renders of the same "
            "prompts, their open kinds at random.",
            f"- s / group: seconds to denoise a group of K = {config.k} (2K rows a forward) on this machine, the "
            f"least of {config.timing_groups} (load average {results.load_average_1m[0]:.1f} at the start, "
            f"{results.load_average_1m[1]:.1f} at the end, on {os.cpu_count()} CPUs).",
            "- first t: the schedule's first timestep; model evals: steps that call the model. A trailing schedule "
            "starts at t = 999, where alpha-bar is 2.4e-9 and an epsilon model's x0 estimate is its error times "
            "20,000: that step takes x0 = 0 (the prior mean) without calling the model.",
            "",
            "## Measured",
            "",
            *markdown_table(header, rows),
            "",
            "## Choice",
            "",
            choice,
            "",
        ]
    )
