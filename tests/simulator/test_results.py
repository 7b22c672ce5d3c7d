"""The records of results.json: the committed run reads and writes back byte for byte, the committed schema is the
records' own, and a file that drifts from the records is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from perfusion.errors import ConfigError
from perfusion.paths import REPO_ROOT
from simulator.eval.results import SCHEMA_PATH, EvaluationResults, MetricEstimate, results_schema, schema_text

COMMITTED_RESULTS = REPO_ROOT / "docs" / "results" / "results.json"


def committed() -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(COMMITTED_RESULTS.read_text())
    return payload


def test_the_committed_results_read_and_write_back_byte_for_byte() -> None:
    # Absent optional entries (base's lift, a slice no arm showed) stay absent rather than becoming null.
    assert EvaluationResults.read(COMMITTED_RESULTS).to_json() == COMMITTED_RESULTS.read_text()


def test_the_committed_schema_is_the_records_schema() -> None:
    assert SCHEMA_PATH.read_text() == schema_text(), "regenerate it: python -m simulator.eval.results"
    schema = results_schema()
    assert set(schema["required"]) == set(committed())
    # No default may name a machine's folder (the base checkpoint's absolute path).
    assert str(REPO_ROOT) not in SCHEMA_PATH.read_text()


def test_nan_survives_the_round_trip() -> None:
    # A rate without a denominator in the data (returns / orders with no order) is NaN, not null.
    estimate = MetricEstimate.model_validate({"value": math.nan, "ci95": [math.nan, math.nan]})
    assert json.dumps(estimate.model_dump(mode="json"), allow_nan=True) == '{"value": NaN, "ci95": [NaN, NaN]}'


def _first_entry(payload: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = payload["metrics"]["live"]["0"]["base"]
    return entry


DRIFTS: dict[str, Any] = {
    "an unknown metric": lambda p: _first_entry(p).update(ctr_typo=_first_entry(p)["ctr"]),
    "a missing interval": lambda p: p["reward_models"]["perfusion_rm"].pop("gauc_ci95"),
    "an interval of three numbers": lambda p: p["reward_models"]["perfusion_rm"].update(gauc_ci95=[0, 1, 2]),
    "a count that is not a whole number": lambda p: _first_entry(p).update(impressions=2.5),
    "an unknown slice": lambda p: p["metrics"].update(merchant=p["metrics"]["live"]),
    "a round that is not a number": lambda p: p["metrics"]["live"].update(last=p["metrics"]["live"]["0"]),
    "a missing command": lambda p: p.pop("command"),
}


@pytest.mark.parametrize("drift", sorted(DRIFTS))
def test_a_file_that_drifts_from_the_records_is_refused(drift: str, tmp_path: Path) -> None:
    payload = committed()
    DRIFTS[drift](payload)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(payload, allow_nan=True))
    with pytest.raises(ValidationError):
        EvaluationResults.read(path)


def test_the_configuration_in_the_file_is_checked_as_the_evaluation_checks_it(tmp_path: Path) -> None:
    payload = committed()
    payload["config"]["arms"] = ["perfusion"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(payload, allow_nan=True))
    with pytest.raises(ConfigError, match="base"):
        EvaluationResults.read(path)
