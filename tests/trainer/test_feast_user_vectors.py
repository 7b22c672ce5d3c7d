"""The trainer's point-in-time user vectors from a real Feast store (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from perfusion.attributes import Attributes
from perfusion.contracts.records import GradedCandidate, GroupSample
from perfusion.image_store import catalog_image_id
from perfusion.user_features import user_vector
from tests.trainer.test_trainer_integration import FEATURED_USER, IMPRESSION_TS, push_features
from trainer.loop import FeastUserVectors


def sample(sample_id: str, user_id: str, ts: float) -> GroupSample:
    attributes = Attributes("dress", "red", "plain", "short-sleeve", "loose")
    candidate = GradedCandidate(
        image_id=catalog_image_id(attributes, seed=0), position=0, descriptor=attributes.descriptor(), grade=1
    )
    return GroupSample(
        sample_id=sample_id,
        user_id=user_id,
        design_id="design-1",
        prompt="a dress",
        model_version="base",
        impression_ts=ts,
        candidates=[candidate],
    )


@pytest.mark.slow
def test_samples_sharing_a_user_and_impression_time_each_get_that_users_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from perfusion.feature_store import apply_feature_repo, open_feature_store

    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PERFUSION_FEAST_DIR", str(tmp_path / "state" / "feast"))
    monkeypatch.setenv("PERFUSION_ONLINE_STORE", "sqlite")
    apply_feature_repo()
    preference = [1.0] + [0.0] * 25
    push_features(preference, IMPRESSION_TS - 60)

    # Two samples of one user at one instant (e.g. two designs shown together), one cold user.
    samples = [
        sample("a", FEATURED_USER, IMPRESSION_TS),
        sample("b", FEATURED_USER, IMPRESSION_TS),
        sample("c", "shopper-never-seen", IMPRESSION_TS),
    ]
    vectors = FeastUserVectors(open_feature_store()).vectors(samples)

    assert len(vectors) == 3
    np.testing.assert_array_equal(vectors[0], vectors[1])
    cold = user_vector({}, as_of=IMPRESSION_TS)
    assert not np.array_equal(vectors[0], cold)
    np.testing.assert_array_equal(vectors[2], cold)
