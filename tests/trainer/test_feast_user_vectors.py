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


def use_fresh_feature_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Feast repo of this test's own (sqlite online store) under tmp_path, applied."""
    from perfusion.feature_store import apply_feature_repo

    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PERFUSION_FEAST_DIR", str(tmp_path / "state" / "feast"))
    monkeypatch.setenv("PERFUSION_ONLINE_STORE", "sqlite")
    apply_feature_repo()


@pytest.mark.slow
def test_samples_sharing_a_user_and_impression_time_each_get_that_users_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from perfusion.feature_store import open_feature_store

    use_fresh_feature_repo(tmp_path, monkeypatch)
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


@pytest.mark.slow
def test_a_merchants_sample_gets_the_merchants_own_u_as_of_its_impression(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from perfusion.contracts.records import Candidate, Impression, Select
    from perfusion.feature_store import FeaturePusher, open_feature_store
    from perfusion.user_features import MERCHANT_PROFILE_PUSH, USER_VECTOR_SLICES, merchant_profile_rows
    from streams.preferences import PreferenceUpdater, UserPreferenceState, feature_row
    from streams.settings import StreamSettings
    from tests.streams.test_preferences_agent import DictMemory

    use_fresh_feature_repo(tmp_path, monkeypatch)
    pusher = FeaturePusher.open()
    pusher.push(MERCHANT_PROFILE_PUSH, merchant_profile_rows({"shop-1": 3}, signed_up_ts=IMPRESSION_TS - 86_400))
    # An earlier review of one of the merchant's designs: they selected the navy candidate.
    navy = Attributes("dress", "navy", "plain", "long-sleeve", "slim").descriptor()
    red = Attributes("dress", "red", "plain", "short-sleeve", "loose").descriptor()
    review = Impression(
        event_id="review-0", ts=IMPRESSION_TS - 600, user_id="shop-1", design_id="design-1", prompt="a dress",
        model_version="base", candidates=[
            Candidate(image_id="navy", position=0, descriptor=navy),
            Candidate(image_id="red", position=1, descriptor=red),
        ],
    )  # fmt: skip
    selected = Select(
        event_id="select-0", ts=IMPRESSION_TS - 590, user_id="shop-1", impression_id="review-0",
        design_id="design-1", image_ids=["navy"],
    )  # fmt: skip
    updater = PreferenceUpdater(StreamSettings(bootstrap_servers="localhost:9"))
    state = UserPreferenceState(user_id="shop-1")
    memory = DictMemory()
    for event in (review, selected):
        updater.apply(state, event, memory)
    pusher.push_user_preferences([feature_row("shop-1", updater.features(state))])

    [merchant, before_sign_up] = FeastUserVectors(open_feature_store()).vectors(
        [sample("later-review", "shop-1", IMPRESSION_TS), sample("early", "shop-1", IMPRESSION_TS - 2 * 86_400)]
    )
    assert list(merchant[USER_VECTOR_SLICES["present"]]) == [1.0, 0.0, 1.0]
    assert list(merchant[USER_VECTOR_SLICES["region"]]) == [0.0, 0.0, 0.0, 1.0]
    assert merchant[USER_VECTOR_SLICES["preference"]] == pytest.approx(navy)
    assert merchant[USER_VECTOR_SLICES["rates"]][3] == pytest.approx((1 + 8 * 0.25) / (2 + 8))  # select rate
    # Point in time: before the merchant signed up and reviewed anything, u is the cold one.
    np.testing.assert_array_equal(before_sign_up, user_vector({}))
