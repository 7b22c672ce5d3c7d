"""What an evaluation run yields and ``results.json`` holds, as validated records.

The statistics (:mod:`simulator.eval.stats`, :mod:`simulator.eval.reward_models`) compute plain nested dicts; the
runner validates them into :class:`EvaluationSummary`, and the report writes :class:`EvaluationResults` (the summary
plus the reproduction command and the wall time) as ``results.json``. A key the records do not name, a missing one or
a value of the wrong type is refused, so the file and its readers cannot drift apart. The JSON Schema of the file,
``docs/schemas/results.schema.json``, is generated from these records (``python -m simulator.eval.results PATH``).

Numbers follow ``json.dumps(allow_nan=True)``: a rate with no denominator in the data (a conversion without clicks)
is ``NaN``, which JSON Schema's ``number`` does not cover; readers of the file must accept it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from simulator.eval.config import EvaluationConfig
from simulator.eval.plan import SliceName

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "schemas" / "results.schema.json"

RoundKey = Annotated[str, StringConstraints(pattern=r"^[0-9]+$")]  # "r": the version after r trainer updates
Interval = Annotated[
    tuple[float, float],
    Field(description="95% percentile bootstrap interval [low, high]; [NaN, NaN] where no resampling was finite"),
]


def _absent(value: object) -> bool:
    return value is None


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Estimate(Record):
    """A value with its 95% bootstrap interval."""

    value: float
    ci95: Interval


class MetricEstimate(Estimate):
    """One metric of one arm in one round and slice."""

    lift_vs_base: Estimate | None = Field(
        default=None,
        exclude_if=_absent,
        description="the arm less base on the same resampled users: relative change for the rates, difference for "
        "utility; absent for the base arm",
    )


class ArmRoundMetrics(Record):
    """Ratios of sums over the slice's users for one arm in one round."""

    ctr: MetricEstimate = Field(description="clicks / candidates shown")
    conversion: MetricEstimate = Field(description="orders / clicks")
    return_rate: MetricEstimate = Field(description="returns / orders")
    utility: MetricEstimate = Field(description="mean true utility of the shown candidates")
    impressions: int = Field(ge=0, description="showings measured")


class GeneratorShift(Record):
    """Mean absolute pixel difference (0 to 255) between an arm's final-round images and base's for the same showing;
    a slice's entry is absent when neither arm showed it."""

    mean_abs_pixel_diff: float
    showings: float = Field(ge=0, description="showings compared")
    live_mean_abs_pixel_diff: float | None = Field(default=None, exclude_if=_absent)
    heldout_prompt_mean_abs_pixel_diff: float | None = Field(default=None, exclude_if=_absent)
    cold_start_mean_abs_pixel_diff: float | None = Field(default=None, exclude_if=_absent)


class SegmentEstimate(Estimate):
    """Final-round true utility per image less base's for one shopper segment, interval over its users."""

    users: int = Field(ge=0)


class RewardModelScores(Record):
    """One reward model (or the true-utility ceiling) scored on the held-out groups."""

    gauc: float
    gauc_ci95: Interval
    map: float
    train_groups: float = Field(ge=0, description="live groups it learned from (0 for the ceiling)")
    heldout_groups: float = Field(ge=0)
    gauc_lift_vs_without_plugins: Estimate | None = Field(
        default=None,
        exclude_if=_absent,
        description="PerFusionRM's GAUC less the model without plug-ins', paired over resampled groups; only on "
        "perfusion_rm",
    )


class ArmHistory(Record):
    versions: list[str] = Field(description="the serving version of each round, base first")
    gate_refusals: int = Field(ge=0, description="updates the trainer's publish gate refused in the last round")
    seconds: float = Field(ge=0)


class EvaluationSummary(Record):
    """Every number of one run, as the runner hands it to the report."""

    metrics: dict[SliceName, dict[RoundKey, dict[str, ArmRoundMetrics]]] = Field(
        description="slice -> round -> arm -> metrics"
    )
    reward_models: dict[str, RewardModelScores] = Field(description="offline reward-model comparison by model")
    generator_shift_vs_base: dict[str, GeneratorShift] = Field(description="by arm other than base")
    utility_vs_base_by_segment: dict[str, dict[str, SegmentEstimate]] = Field(
        description="arm other than base -> shopper segment -> utility less base's"
    )
    arms: dict[str, ArmHistory]
    config: EvaluationConfig


class ResultsFile(BaseModel):
    """What a results record written as a JSON file adds: reading it back and writing it, with ``json`` rather than
    pydantic's parser and serializer, since the file may hold ``NaN``."""

    @classmethod
    def read(cls, path: Path) -> Self:
        """``path`` validated."""
        return cls.model_validate(json.loads(path.read_text()))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, allow_nan=True) + "\n"


class EvaluationResults(EvaluationSummary, ResultsFile):
    """The content of ``results.json``."""

    command: str = Field(description="the command that reproduces the numbers (output folders left out)")
    wall_seconds: float = Field(ge=0)

    @classmethod
    def of(cls, summary: EvaluationSummary, command: str, wall_seconds: float) -> EvaluationResults:
        return cls(**dict(summary), command=command, wall_seconds=wall_seconds)


class _WithoutDefaults(GenerateJsonSchema):
    """Drops default values: a results file holds every field anyway, and a default such as the base checkpoint's
    absolute path would make the schema differ from one clone to the next."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])


def results_schema() -> dict[str, Any]:
    """The JSON Schema of ``results.json``, the configuration's fields described and bounded as they are checked."""
    schema = EvaluationResults.model_json_schema(schema_generator=_WithoutDefaults)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    return json.dumps(results_schema(), indent=2) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(schema_text())
    print(f"wrote {target}")
