"""The Feast repo in features/: it applies into a state folder, agrees with the agent's feature names, and a pushed
micro-batch comes back from the online store and lands in the offline history."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.errors import ConfigError
from perfusion.feature_store import FeaturePusher, history_file_of, redis_connection_string
from perfusion.paths import FEATURE_REPO_DIR
from streams.preferences import PREFERENCE_FEATURES, PreferenceUpdater, UserPreferenceState, feature_row
from streams.settings import StreamSettings


@pytest.fixture(scope="module")
def applied_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeaturePusher]:
    from perfusion.feature_store import apply_feature_repo

    state = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PERFUSION_STATE_DIR", str(state))
        patch.setenv("PERFUSION_FEAST_DIR", "")  # empty = the default under the state folder; restored afterwards
        patch.setenv("PERFUSION_ONLINE_STORE", "sqlite")
        summary = apply_feature_repo()
        assert summary.feast_dir == state / "feast"
        yield FeaturePusher.open()


def test_apply_registers_entities_and_views_outside_the_repo_folder(applied_store: FeaturePusher) -> None:
    store = applied_store.store
    assert sorted(e.name for e in store.list_entities()) == ["design", "user"]
    assert sorted(v.name for v in store.list_feature_views()) == [
        "merchant_profile",
        "user_preferences",
        "user_profile",
    ]
    assert not any(path.suffix in (".db", ".parquet") for path in FEATURE_REPO_DIR.rglob("*"))


def test_feature_view_fields_are_the_agents_features(applied_store: FeaturePusher) -> None:
    view = applied_store.store.get_feature_view("user_preferences")
    assert tuple(field.name for field in view.features) == PREFERENCE_FEATURES
    profile = applied_store.store.get_feature_view("user_profile")
    assert [field.name for field in profile.features] == ["age_group", "region"]
    merchant = applied_store.store.get_feature_view("merchant_profile")
    assert [field.name for field in merchant.features] == ["store_region"]


def test_every_feature_the_user_vector_reads_is_served(applied_store: FeaturePusher) -> None:
    from perfusion.user_features import USER_FEATURE_REFS

    store = applied_store.store
    for ref in USER_FEATURE_REFS:
        view, name = ref.split(":")
        assert name in [field.name for field in store.get_feature_view(view).features], ref
    # One read of all of them: no two views may share a feature name (Feast names columns without the view).
    response = store.get_online_features(features=list(USER_FEATURE_REFS), entity_rows=[{"user_id": "nobody"}])
    assert set(response.to_dict()) == {"user_id", *(ref.split(":")[1] for ref in USER_FEATURE_REFS)}


def test_pushed_micro_batch_reads_back_online_and_offline(applied_store: FeaturePusher) -> None:
    import pandas as pd

    from perfusion.feature_store import read_online_features

    updater = PreferenceUpdater(StreamSettings(bootstrap_servers="localhost:9"))
    rows = []
    for index in range(3):
        state = UserPreferenceState(user_id=f"user-{index}", last_active_ts=1_700_000_000.0 + index)
        state.totals["impressions"] = 10 * (index + 1)
        state.images_shown = 4 * state.totals["impressions"]
        state.totals["clicks"] = index
        rows.append(feature_row(state.user_id, updater.features(state)))
    rows[2]["preference"] = [1.0 / DESCRIPTOR_DIM] * DESCRIPTOR_DIM
    applied_store.push_user_preferences(rows)

    online = read_online_features(applied_store.store, "user_preferences", ["user-0", "user-2", "stranger"])
    assert online[0]["impressions_total"] == 10 and online[0]["clicks_total"] == 0
    assert online[1]["ctr"] == pytest.approx(2 / 120)
    assert online[1]["preference"] == pytest.approx([1.0 / DESCRIPTOR_DIM] * DESCRIPTOR_DIM)
    assert online[1]["last_active_ts"] == 1_700_000_002.0
    assert online[2]["last_active_ts"] is None

    from perfusion.feature_store import merged_history

    store = applied_store.store
    with merged_history(store):
        history = pd.read_parquet(history_file_of(store, store.get_feature_view("user_preferences")))
    assert sorted(history["user_id"]) == ["user-0", "user-1", "user-2"]
    assert history["event_timestamp"].max() == datetime.fromtimestamp(1_700_000_002.0, tz=UTC)


def test_profile_push_round_trips(applied_store: FeaturePusher) -> None:
    from perfusion.feature_store import USER_PROFILE_PUSH

    stamp = datetime.fromtimestamp(1_700_000_000.0, tz=UTC)
    applied_store.push(USER_PROFILE_PUSH, [{"user_id": "p1", "age_group": 3, "region": 1, "event_timestamp": stamp}])
    response = applied_store.store.get_online_features(
        features=["user_profile:age_group", "user_profile:region"], entity_rows=[{"user_id": "p1"}]
    ).to_dict()
    assert (response["age_group"], response["region"]) == ([3], [1])


def test_merchant_profile_push_round_trips_and_makes_a_merchant(applied_store: FeaturePusher) -> None:
    from perfusion.user_features import (
        MERCHANT_PROFILE_PUSH,
        USER_FEATURE_REFS,
        USER_VECTOR_SLICES,
        merchant_profile_rows,
        user_vector,
    )
    from service.features import FeastFeatureReader

    applied_store.push(MERCHANT_PROFILE_PUSH, merchant_profile_rows({"shop-1": 2}, signed_up_ts=1_700_000_000.0))
    response = applied_store.store.get_online_features(
        features=["merchant_profile:store_region"], entity_rows=[{"user_id": "shop-1"}, {"user_id": "p1"}]
    ).to_dict()
    assert response["store_region"] == [2, None]
    features = FeastFeatureReader(applied_store.store, USER_FEATURE_REFS).read("shop-1")
    u = user_vector(features)
    assert list(u[USER_VECTOR_SLICES["present"]]) == [0.0, 0.0, 1.0]
    assert list(u[USER_VECTOR_SLICES["region"]]) == [0.0, 0.0, 1.0, 0.0]


def test_pushes_leave_pending_parts_that_a_read_merges_into_the_history_once(applied_store: FeaturePusher) -> None:
    import pandas as pd

    from perfusion.feature_store import USER_PROFILE_PUSH, merged_history, pending_parts_folder

    history_file = history_file_of(applied_store.store, applied_store.store.get_feature_view("user_profile"))
    assert history_file is not None
    with merged_history(applied_store.store):  # whatever earlier tests pushed
        before = len(pd.read_parquet(history_file))
    for index in range(3):
        stamp = datetime.fromtimestamp(1_700_000_100.0 + index, tz=UTC)
        applied_store.push(USER_PROFILE_PUSH, [{"user_id": f"c{index}", "age_group": index % 5, "region": 0,
                                                "event_timestamp": stamp}])  # fmt: skip
    pending = pending_parts_folder(history_file)
    assert len(list(pending.glob("part-*.parquet"))) == 3 and not list(pending.glob(".*"))
    assert len(pd.read_parquet(history_file)) == before  # the history file itself is not rewritten by a push
    with merged_history(applied_store.store):
        history = pd.read_parquet(history_file)
        assert len(history) == before + 3 and {"c0", "c1", "c2"} <= set(history["user_id"])
    assert not list(pending.glob("part-*.parquet"))
    with merged_history(applied_store.store):
        assert len(pd.read_parquet(history_file)) == before + 3  # nothing merged twice


def test_a_pusher_merges_pending_parts_itself_once_in_a_while(applied_store: FeaturePusher) -> None:
    import pandas as pd

    from perfusion.feature_store import USER_PROFILE_PUSH, FeaturePusher, pending_parts_folder

    history_file = history_file_of(applied_store.store, applied_store.store.get_feature_view("user_profile"))
    assert history_file is not None
    eager = FeaturePusher(applied_store.store, merge_every_s=0.0)
    stamp = datetime.fromtimestamp(1_700_000_200.0, tz=UTC)
    eager.push(USER_PROFILE_PUSH, [{"user_id": "m1", "age_group": 1, "region": 2, "event_timestamp": stamp}])
    assert not list(pending_parts_folder(history_file).glob("part-*.parquet"))
    assert "m1" in set(pd.read_parquet(history_file)["user_id"])
    # The worker's Feast writer merges after it has answered the push: the push leaves the part, the merge takes it.
    eager.push(
        USER_PROFILE_PUSH, [{"user_id": "m2", "age_group": 1, "region": 2, "event_timestamp": stamp}],
        merge_due_history=False,
    )  # fmt: skip
    assert len(list(pending_parts_folder(history_file).glob("part-*.parquet"))) == 1
    assert eager.merge_due_history() == 1 and eager.merge_due_history() == 0  # nothing left to merge
    assert not list(pending_parts_folder(history_file).glob("part-*.parquet"))
    assert "m2" in set(pd.read_parquet(history_file)["user_id"])


def test_descriptor_length_matches_the_vocabulary() -> None:
    text = (FEATURE_REPO_DIR / "definitions.py").read_text()
    assert f"DESCRIPTOR_DIM = {DESCRIPTOR_DIM}\n" in text


def test_redis_connection_string_from_url() -> None:
    assert redis_connection_string("redis://127.0.0.1:6390/2") == "127.0.0.1:6390,db=2"
    assert redis_connection_string("redis://:secret@cache:6379") == "cache:6379,password=secret"
    assert redis_connection_string("127.0.0.1:7000") == "127.0.0.1:7000"
    with pytest.raises(ConfigError, match="redis://host:port"):
        redis_connection_string("http://cache:6379")


def test_redis_settings_select_the_redis_online_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from perfusion.feature_store import FeatureStoreSettings, repo_config

    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("PERFUSION_FEAST_DIR", "")
    monkeypatch.setenv("PERFUSION_ONLINE_STORE", "redis")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6391/0")
    config = repo_config(FeatureStoreSettings.from_env())
    assert config.online_store.type == "redis"
    assert config.online_store.connection_string == "127.0.0.1:6391,db=0"
    assert config.registry.path == str(tmp_path / "feast" / "registry.db")
    monkeypatch.setenv("PERFUSION_ONLINE_STORE", "memcached")
    with pytest.raises(ConfigError, match="'sqlite' or 'redis'"):
        FeatureStoreSettings.from_env()


def test_push_stamps_move_forward_when_the_latest_event_does_not() -> None:
    state = UserPreferenceState(user_id="u", last_active_ts=100.0)
    first = PreferenceUpdater.push_stamp(state)
    second = PreferenceUpdater.push_stamp(state)  # a batch of older events: last_active_ts unchanged
    state.last_active_ts = 200.0
    third = PreferenceUpdater.push_stamp(state)
    assert first == 100.0 and second == pytest.approx(100.001) and third == 200.0
    assert state.pushed_ts == third


@pytest.mark.integration
def test_a_later_push_of_older_events_is_served_from_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.infra.redis_server import RedisServer
    from perfusion.feature_store import apply_feature_repo, read_online_features

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("PERFUSION_FEAST_DIR", "")
    with RedisServer() as server:
        monkeypatch.setenv("PERFUSION_ONLINE_STORE", "redis")
        monkeypatch.setenv("REDIS_URL", server.status().address or "")
        apply_feature_repo()
        pusher = FeaturePusher.open()
        updater = PreferenceUpdater(StreamSettings(bootstrap_servers="localhost:9"))
        state = UserPreferenceState(user_id="late-clicker", last_active_ts=1_700_000_100.0)
        state.totals["impressions"], state.images_shown = 1, 4
        pusher.push_user_preferences([feature_row("late-clicker", updater.features(state), updater.push_stamp(state))])
        # A click stamped before the latest impression: the viewer's latest event time does not move.
        state.totals["clicks"] = 1
        pusher.push_user_preferences([feature_row("late-clicker", updater.features(state), updater.push_stamp(state))])
        online = read_online_features(pusher.store, "user_preferences", ["late-clicker"])
    assert online[0]["clicks_total"] == 1
