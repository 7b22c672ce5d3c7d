"""Opening the Feast feature store, applying the repo, and pushing micro-batches of feature rows.

The repo (``features/``) has one ``feature_store.yaml`` per online store: sqlite by default, Redis when
``PERFUSION_ONLINE_STORE=redis``. Feast expands ``${VAR}`` in those files; :func:`prepare_environment` sets the two
they use: ``PERFUSION_FEAST_DIR`` (registry, sqlite store and parquet history; default ``<state dir>/feast``) and,
for Redis, ``PERFUSION_REDIS_CONNECTION`` from ``REDIS_URL`` or the project's redis-server (``<state>/redis/url``).

Feast is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from perfusion.errors import ConfigError, InfrastructureError
from perfusion.paths import FEATURE_REPO_DIR, state_dir

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

FeatureSink = Callable[[list[dict[str, Any]]], Awaitable[None]]
"""Pushes a micro-batch of ``user_preferences`` rows (entity key, features, ``event_timestamp``)."""

USER_PREFERENCES_PUSH = "user_preferences_push"
USER_PROFILE_PUSH = "user_profile_push"
OnlineStoreKind = Literal["sqlite", "redis"]
_YAML_BY_STORE: dict[str, str] = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml"}


def feast_dir() -> Path:
    """Registry, sqlite online store and offline parquet files live here (never inside the repo folder)."""
    path = Path(os.environ.get("PERFUSION_FEAST_DIR") or state_dir() / "feast").resolve()
    (path / "offline").mkdir(parents=True, exist_ok=True)
    return path


def online_store_kind() -> OnlineStoreKind:
    kind = os.environ.get("PERFUSION_ONLINE_STORE", "sqlite")
    if kind == "sqlite":
        return "sqlite"
    if kind == "redis":
        return "redis"
    raise ConfigError(f"PERFUSION_ONLINE_STORE must be 'sqlite' or 'redis', got {kind!r}")


def redis_connection_string(redis_url: str | None = None) -> str:
    """Feast's Redis connection string ("host:port,db=N,password=...") from a ``redis://`` URL: the argument,
    else ``REDIS_URL``, else the project's running redis-server."""
    if redis_url is None:
        from perfusion.infra.redis_server import redis_url as project_redis_url

        redis_url = project_redis_url()
    url = redis_url if "://" in redis_url else f"redis://{redis_url}"
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"Redis URL must look like redis://host:port[/db], got {url!r}")
    connection = f"{parts.hostname}:{parts.port or 6379}"
    db = parts.path.lstrip("/")
    if db:
        connection += f",db={db}"
    if parts.password:
        connection += f",password={parts.password}"
    if parts.scheme == "rediss":
        connection += ",ssl=true"
    return connection


def prepare_environment() -> Path:
    """Set the variables the repo's YAML refers to; returns the YAML file for the chosen online store."""
    os.environ["PERFUSION_FEAST_DIR"] = str(feast_dir())
    kind = online_store_kind()
    if kind == "redis":
        os.environ["PERFUSION_REDIS_CONNECTION"] = redis_connection_string()
    return FEATURE_REPO_DIR / _YAML_BY_STORE[kind]


def open_feature_store() -> FeatureStore:
    """The project's Feast store (the repo must have been applied: `perfusion features apply`)."""
    from feast import FeatureStore

    yaml_file = prepare_environment()
    if not (feast_dir() / "registry.db").exists():
        raise InfrastructureError(
            f"the Feast registry {feast_dir() / 'registry.db'} does not exist; run `perfusion features apply`"
        )
    return FeatureStore(repo_path=str(FEATURE_REPO_DIR), fs_yaml_file=yaml_file)


@dataclass(frozen=True)
class ApplySummary:
    feast_dir: Path
    online_store: OnlineStoreKind
    feature_views: list[str]
    entities: list[str]


def apply_feature_repo() -> ApplySummary:
    """Run `feast apply` on ``features/`` and create empty offline history files with each view's schema."""
    from feast.repo_config import load_repo_config
    from feast.repo_operations import apply_total

    yaml_file = prepare_environment()
    config = load_repo_config(FEATURE_REPO_DIR, yaml_file)
    # The repo's modules read PERFUSION_FEAST_DIR when imported: forget earlier imports so this apply sees it.
    for name, module in list(sys.modules.items()):
        module_file = getattr(module, "__file__", None)
        if module_file and Path(module_file).resolve().is_relative_to(FEATURE_REPO_DIR.resolve()):
            del sys.modules[name]
    # apply_total changes directory into the repo and imports its modules by name, as `feast apply` run there does.
    with _working_directory(FEATURE_REPO_DIR), _on_import_path(FEATURE_REPO_DIR):
        apply_total(config, FEATURE_REPO_DIR, skip_source_validation=True)
    store = open_feature_store()
    views = store.list_feature_views()
    for view in views:
        _create_history_file(view)
    return ApplySummary(
        feast_dir=feast_dir(),
        online_store=online_store_kind(),
        feature_views=sorted(view.name for view in views),
        entities=sorted(entity.name for entity in store.list_entities()),
    )


class FeaturePusher:
    """Pushes micro-batches of rows to a push source, online and offline (``PushMode.ONLINE_AND_OFFLINE``)."""

    def __init__(self, store: FeatureStore) -> None:
        self._store = store

    @classmethod
    def open(cls) -> FeaturePusher:
        return cls(open_feature_store())

    @property
    def store(self) -> FeatureStore:
        return self._store

    def push_user_preferences(self, rows: Sequence[dict[str, Any]]) -> None:
        self.push(USER_PREFERENCES_PUSH, rows)

    def push(self, push_source: str, rows: Sequence[dict[str, Any]]) -> None:
        """One Feast push of ``rows`` (blocking; the agent calls it in a thread)."""
        import pandas as pd
        from feast.data_source import PushMode

        if not rows:
            return
        frame = pd.DataFrame(list(rows))
        with _offline_write_lock():
            self._store.push(push_source, frame, to=PushMode.ONLINE_AND_OFFLINE)
        log.debug("pushed %d rows to %s", len(rows), push_source)


def read_online_features(store: FeatureStore, feature_view: str, user_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The online values of every feature of ``feature_view`` for each user, one dict a user (None = no value)."""
    view = store.get_feature_view(feature_view)
    references = [f"{feature_view}:{feature.name}" for feature in view.features]
    response = store.get_online_features(features=references, entity_rows=[{"user_id": u} for u in user_ids])
    columns = response.to_dict()
    return [{name: values[index] for name, values in columns.items()} for index in range(len(user_ids))]


def _create_history_file(view: Any) -> None:
    """An empty parquet file with the view's columns (entity, features, timestamp), so offline pushes can append."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from feast.type_map import feast_value_type_to_pa

    path = Path(view.batch_source.path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [
        pa.field(column.name, feast_value_type_to_pa(column.dtype.to_value_type())) for column in view.entity_columns
    ]
    columns += [pa.field(field.name, feast_value_type_to_pa(field.dtype.to_value_type())) for field in view.features]
    columns.append(pa.field(view.batch_source.timestamp_field, pa.timestamp("us", tz="UTC")))
    schema = pa.schema(columns)
    pq.write_table(schema.empty_table(), path)
    log.info("created offline history %s", path)


@contextlib.contextmanager
def _offline_write_lock() -> Iterator[None]:
    """Serialize pushes of every process on this machine that shares the Feast folder.

    The file offline store appends by reading the whole parquet history and writing it again, so two workers
    pushing at once would corrupt it. An exclusive flock on a file beside the history makes them take turns.
    """
    import fcntl

    lock_path = feast_dir() / "offline" / ".push.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _on_import_path(path: Path) -> Iterator[None]:
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
