"""Feast as its users expect: a store's folder and online store passed as settings (two stores in one process, the
environment untouched), the repo applied with ``FeatureStore.apply``, windowed counts that age on online reads, the
user vector's feature service, and the ``feast`` CLI in the repo folder without any variable of ours."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from perfusion.errors import ConfigError, InfrastructureError
from perfusion.feature_store import (
    USER_PREFERENCES_PUSH,
    USER_PROFILE_PUSH,
    USER_VECTOR_SERVICE,
    FeatureAges,
    FeaturePusher,
    FeatureStoreSettings,
    apply_feature_repo,
    history_file_of,
    open_feature_store,
    read_online_features,
    repo_config,
)
from perfusion.paths import FEATURE_REPO_DIR
from streams.preferences import PREFERENCE_FEATURES

T0 = 1_700_000_000.0  # an event time, seconds since the epoch


def _stamp(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeaturePusher, FeaturePusher]:
    """The repo applied in two folders of one process, each store opened from its own settings."""
    root = tmp_path_factory.mktemp("stores")
    environment_before = dict(os.environ)
    pushers = []
    for name in ("a", "b"):
        settings = FeatureStoreSettings(feast_dir=root / name)
        summary = apply_feature_repo(settings)
        assert summary.feast_dir == root / name and summary.feature_services == [USER_VECTOR_SERVICE]
        pushers.append(FeaturePusher.open(settings))
    assert dict(os.environ) == environment_before  # nothing of Feast goes through this process's environment
    return pushers[0], pushers[1]


def test_two_stores_in_one_process_keep_their_own_rows_and_history(
    two_stores: tuple[FeaturePusher, FeaturePusher],
) -> None:
    first, second = two_stores
    row = {"user_id": "only-in-a", "age_group": 4, "region": 3, "event_timestamp": _stamp(T0)}
    first.push(USER_PROFILE_PUSH, [row])
    assert read_online_features(first.store, "user_profile", ["only-in-a"])[0]["age_group"] == 4
    assert read_online_features(second.store, "user_profile", ["only-in-a"])[0]["age_group"] is None
    view = first.store.get_feature_view("user_profile")
    first_history, second_history = history_file_of(first.store, view), history_file_of(second.store, view)
    assert first_history is not None and second_history is not None
    assert first_history.is_relative_to(Path(str(first.store.config.repo_path)))
    assert second_history.is_relative_to(Path(str(second.store.config.repo_path)))
    assert first_history != second_history and first_history.exists() and second_history.exists()


def test_the_registry_names_no_folder(two_stores: tuple[FeaturePusher, FeaturePusher]) -> None:
    for view in two_stores[0].store.list_feature_views():
        assert not Path(view.batch_source.path).is_absolute(), view.batch_source.path


def test_an_unapplied_folder_says_to_apply(tmp_path: Path) -> None:
    with pytest.raises(InfrastructureError, match="perfusion features apply"):
        open_feature_store(FeatureStoreSettings(feast_dir=tmp_path / "empty"))


def test_settings_read_todays_variables_only_through_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERFUSION_FEAST_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("PERFUSION_ONLINE_STORE", "redis")
    monkeypatch.setenv("REDIS_URL", "redis://cache:6390/1")
    built = FeatureStoreSettings(feast_dir=tmp_path / "given")
    assert (built.feast_dir, built.online_store, built.redis_url) == (tmp_path / "given", "sqlite", "")
    read = FeatureStoreSettings.from_env()
    assert (read.feast_dir, read.online_store, read.redis_url) == (
        tmp_path / "from-env",
        "redis",
        "redis://cache:6390/1",
    )
    assert repo_config(read).online_store.connection_string == "cache:6390,db=1"
    with pytest.raises(ConfigError, match="online_store"):
        FeatureStoreSettings(online_store="memcached")


def test_reapplying_deletes_what_the_repo_no_longer_defines(two_stores: tuple[FeaturePusher, FeaturePusher]) -> None:
    from feast import FeatureView, Field
    from feast.types import Int64

    store = two_stores[1].store
    user = store.get_entity("user")
    leftover = FeatureView(
        name="leftover",
        entities=[user],
        schema=[Field(name="leftover_count", dtype=Int64)],
        source=store.get_data_source("user_profile_history"),
    )
    store.apply([leftover])
    assert "leftover" in {view.name for view in store.list_feature_views()}
    settings = FeatureStoreSettings(feast_dir=Path(str(store.config.repo_path)))
    summary = apply_feature_repo(settings)
    assert summary.feature_views == ["merchant_profile", "user_preferences", "user_profile"]
    assert "leftover" not in {view.name for view in open_feature_store(settings).list_feature_views()}


# ------------------------------------------------------------------------------------------------------ ageing


def _counts_row(user_id: str, ts: float) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(PREFERENCE_FEATURES, 0)
    row.update(impressions_1h=3, impressions_1d=5, impressions_total=7, clicks_1h=1, clicks_1d=1, clicks_total=2)
    row.update(ctr=0.1, cvr=0.0, preference=[0.0] * 26, last_active_ts=ts, user_id=user_id)
    return {**row, "event_timestamp": _stamp(ts)}


def test_an_idle_viewers_windowed_counts_read_zero_once_their_window_has_passed(
    two_stores: tuple[FeaturePusher, FeaturePusher],
) -> None:
    pusher = two_stores[0]
    pusher.push(USER_PREFERENCES_PUSH, [_counts_row("idle", T0)])

    def read(now: float) -> tuple[int, int, int, int]:
        [row] = read_online_features(pusher.store, "user_preferences", ["idle"], now=now)
        return row["impressions_1h"], row["impressions_1d"], row["impressions_total"], row["clicks_1h"]

    assert read(T0 + 10 * 60) == (3, 5, 7, 1)  # within both windows: as pushed
    assert read(T0 + 2 * 3600) == (0, 5, 7, 0)  # the hour has passed: the 1 h counts age, the day's do not
    assert read(T0 + 2 * 86_400) == (0, 0, 7, 0)  # the day has passed too; all-time counts never age
    [stranger] = read_online_features(pusher.store, "user_preferences", ["stranger"], now=T0 + 2 * 86_400)
    assert stranger["impressions_1h"] is None  # absent stays absent (the user vector reads it as nothing)


def test_the_window_follows_the_event_minute_like_the_agent() -> None:
    from feast import Entity, FeatureView, Field, FileSource
    from feast.types import Int64

    view = FeatureView(
        name="windows",
        entities=[Entity(name="user", join_keys=["user_id"])],
        schema=[Field(name="n_1h", dtype=Int64, tags={"window_minutes": "60"})],
        source=FileSource(path="x.parquet", timestamp_field="event_timestamp"),
    )
    ages = FeatureAges.of([view])
    latest = 60.0 * 1000 + 59  # the last second of minute 1000
    # The agent's window ends with the latest event's minute: minute 1000 drops out of it at minute 1060.
    assert ages.value("n_1h", 4, latest, now=60.0 * 1059 + 59) == 4
    assert ages.value("n_1h", 4, latest, now=60.0 * 1060) == 0


def test_a_views_ttl_is_applied_on_online_reads() -> None:
    from feast import Entity, FeatureView, Field, FileSource
    from feast.types import Int64

    view = FeatureView(
        name="expiring",
        entities=[Entity(name="user", join_keys=["user_id"])],
        ttl=timedelta(hours=2),
        schema=[Field(name="level", dtype=Int64)],
        source=FileSource(path="x.parquet", timestamp_field="event_timestamp"),
    )
    ages = FeatureAges.of([view])
    assert ages.value("level", 3, T0, now=T0 + 7200) == 3
    assert ages.value("level", 3, T0, now=T0 + 7201) is None
    assert ages.ttl_s == {"level": 7200.0}


def test_the_repos_windowed_counts_carry_their_window(two_stores: tuple[FeaturePusher, FeaturePusher]) -> None:
    ages = FeatureAges.of([two_stores[0].store.get_feature_view("user_preferences")])
    assert ages.window_minutes == {
        f"{kind}_{window}": minutes
        for kind in ("impressions", "clicks", "orders", "returns")
        for window, minutes in (("1h", 60), ("1d", 1440))
    }
    assert ages.ttl_s == {}  # all-time state: the views themselves never expire


# -------------------------------------------------------------------------------------------- feature service


def test_the_user_vector_service_is_what_the_user_vector_reads(
    two_stores: tuple[FeaturePusher, FeaturePusher],
) -> None:
    from perfusion.user_features import USER_FEATURE_REFS

    service = two_stores[0].store.get_feature_service(USER_VECTOR_SERVICE)
    refs = [
        f"{projection.name}:{feature.name}"
        for projection in service.feature_view_projections
        for feature in projection.features
    ]
    assert sorted(refs) == sorted(USER_FEATURE_REFS)


# ------------------------------------------------------------------------------------------------- the feast CLI


def _clean_environment() -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "FEAST_USAGE": "False"}


def test_the_definitions_read_no_environment() -> None:
    code = (
        "import runpy, sys; namespace = runpy.run_path(sys.argv[1]); print(namespace['user_preferences_history'].path)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(FEATURE_REPO_DIR / "definitions.py")],
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "offline/user_preferences.parquet"


def _applied_checkout(tmp_path: Path) -> Path:
    """The repo folder beside a default state folder (``../.state/feast``), as in a checkout, applied by PerFusion;
    returns the repo folder."""
    checkout = tmp_path / "checkout"
    shutil.copytree(FEATURE_REPO_DIR, checkout / "features", ignore=shutil.ignore_patterns("__pycache__"))
    apply_feature_repo(FeatureStoreSettings(feast_dir=checkout / ".state" / "feast"))
    return checkout / "features"


def test_feast_cli_in_the_repo_folder_lists_the_views_without_variables(tmp_path: Path) -> None:
    from feast.repo_config import load_repo_config

    repo = _applied_checkout(tmp_path)
    yaml_config = load_repo_config(repo, repo / "feature_store.yaml")
    code_config = repo_config(FeatureStoreSettings(feast_dir=repo.parent / ".state" / "feast"))
    for name in ("project", "provider", "entity_key_serialization_version"):
        assert getattr(yaml_config, name) == getattr(code_config, name), name
    assert yaml_config.online_store.type == code_config.online_store.type == "sqlite"
    feast = Path(sys.executable).with_name("feast")
    result = subprocess.run(
        [str(feast), "feature-views", "list"],
        cwd=repo,
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for view in ("user_preferences", "user_profile", "merchant_profile"):
        assert view in result.stdout, result.stdout


def test_feast_ui_in_the_repo_folder_serves_the_views(tmp_path: Path) -> None:
    """``feast ui`` starts (its REST registry API imports the gRPC server: the grpcio extra) and lists the views."""
    import socket
    import time

    import httpx

    repo = _applied_checkout(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    feast = Path(sys.executable).with_name("feast")
    ui = subprocess.Popen(
        [str(feast), "ui", "--host", "127.0.0.1", "--port", str(port)],
        cwd=repo,
        env=_clean_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        names: list[str] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and ui.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/v1/feature_views", params={"project": "perfusion"})
            except httpx.TransportError:  # not listening yet
                time.sleep(1.0)
                continue
            assert response.status_code == 200, response.text[-2000:]
            names = sorted(view["spec"]["name"] for view in response.json()["featureViews"])
            break
        assert ui.poll() is None, (ui.stderr.read() if ui.stderr else b"")[-3000:]
        assert {"user_preferences", "user_profile", "merchant_profile"} <= set(names), names
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200  # the UI's page itself
    finally:
        ui.terminate()
        ui.wait(timeout=30)
