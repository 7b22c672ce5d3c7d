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
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from perfusion.errors import ConfigError, InfrastructureError
from perfusion.paths import FEATURE_REPO_DIR, state_dir
from perfusion.server_files import file_lock

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

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
        from perfusion.server_files import redis_url as project_redis_url

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


HISTORY_PART_GLOB = "part-*.parquet"
HISTORY_MERGE_EVERY_S = 60.0
"""A pusher also merges the pending parts into the history file this often (wall-clock seconds)."""


class FeaturePusher:
    """Pushes micro-batches of rows to a push source: online through Feast, offline as a pending part of the view's
    history (:func:`append_history`)."""

    def __init__(self, store: FeatureStore, merge_every_s: float = HISTORY_MERGE_EVERY_S) -> None:
        self._store = store
        self._history_files: dict[str, Path] = {}
        self._history_schemas: dict[Path, Any] = {}  # pyarrow schema of each history file; merges keep it
        self._merge_every_s = merge_every_s
        self._last_merge = time.monotonic()

    def _history_schema(self, history_file: Path) -> Any:
        import pyarrow.parquet as pq

        if history_file not in self._history_schemas:
            self._history_schemas[history_file] = pq.read_schema(history_file)
        return self._history_schemas[history_file]

    def _history_file(self, push_source: str) -> Path:
        """The offline history file of the view fed by ``push_source``."""
        if push_source not in self._history_files:
            for view in self._store.list_feature_views():
                history_file = history_file_of(view)
                if view.stream_source is not None and view.stream_source.name == push_source and history_file:
                    self._history_files[push_source] = history_file
                    break
            else:
                raise ConfigError(f"no feature view is fed by push source {push_source!r}")
        return self._history_files[push_source]

    @classmethod
    def open(cls) -> FeaturePusher:
        return cls(open_feature_store())

    @property
    def store(self) -> FeatureStore:
        return self._store

    def push_user_preferences(self, rows: Sequence[dict[str, Any]]) -> None:
        self.push(USER_PREFERENCES_PUSH, rows)

    def push(self, push_source: str, rows: Sequence[dict[str, Any]]) -> None:
        """One Feast push of ``rows`` online, and one part file of offline history (blocking; the agent calls it in
        a thread). A retry after a failure may write a row twice offline, identically: harmless to point-in-time
        joins."""
        import pandas as pd
        from feast.data_source import PushMode

        if not rows:
            return
        frame = pd.DataFrame(list(rows))
        self._store.push(push_source, frame, to=PushMode.ONLINE)
        history_file = self._history_file(push_source)
        append_history(history_file, frame, self._history_schema(history_file))
        if time.monotonic() - self._last_merge >= self._merge_every_s:
            # Readers merge before they read anyway; this keeps the file itself at most a minute behind for
            # readers that go to Feast directly (the `feast` CLI, a notebook).
            with _history_lock(history_file):
                merge_pending_history(history_file)
            self._last_merge = time.monotonic()
        log.debug("pushed %d rows to %s", len(rows), push_source)


def read_online_features(store: FeatureStore, feature_view: str, user_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The online values of every feature of ``feature_view`` for each user, one dict a user (None = no value)."""
    view = store.get_feature_view(feature_view)
    references = [f"{feature_view}:{feature.name}" for feature in view.features]
    response = store.get_online_features(features=references, entity_rows=[{"user_id": u} for u in user_ids])
    columns = response.to_dict()
    return [{name: values[index] for name, values in columns.items()} for index in range(len(user_ids))]


def pending_parts_folder(history_file: Path) -> Path:
    """Where pushes leave their offline rows until the next read merges them into ``history_file``."""
    return history_file.with_name(history_file.name + ".pending")


def append_history(history_file: Path, frame: Any, schema: Any = None) -> Path:
    """Add ``frame`` to the offline history of a view as one pending part file; returns its path.

    Feast's file offline store appends by reading the whole history file and writing it again, so a push cost grew
    with the history (after hours of pushes each one would take seconds). Here a push writes only its rows, as a
    small parquet file beside the history (written under a hidden name and renamed, so no reader sees half a file),
    and :func:`merged_history` folds the pending parts into the history file before Feast reads it: the trainer
    pays one merge per training update instead of the worker paying one rewrite per push. A pusher also merges once
    every ``HISTORY_MERGE_EVERY_S``, so the file alone is never far behind.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(history_file) if schema is None else schema
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    folder = pending_parts_folder(history_file)
    folder.mkdir(exist_ok=True)
    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    hidden = folder / f".{name}.tmp"
    pq.write_table(table, hidden)
    os.replace(hidden, folder / name)
    return folder / name


def merge_pending_history(history_file: Path) -> int:
    """Fold the pending parts into ``history_file`` (rewritten atomically); returns how many parts were merged.
    The caller holds the history's lock (:func:`merged_history`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(pending_parts_folder(history_file).glob(HISTORY_PART_GLOB))
    if not parts:
        return 0
    history = pq.read_table(history_file)
    merged = pa.concat_tables([history, *(pq.read_table(part).cast(history.schema) for part in parts)])
    hidden = history_file.with_name(f".{history_file.name}.tmp")
    pq.write_table(merged, hidden)
    os.replace(hidden, history_file)
    for part in parts:
        part.unlink()
    log.debug("merged %d pending parts into %s (%d rows)", len(parts), history_file, merged.num_rows)
    return len(parts)


@contextlib.contextmanager
def merged_history(store: FeatureStore) -> Iterator[None]:
    """Hold while reading offline history through Feast (``get_historical_features(...).to_df()``): every view's
    pending parts are merged into its history file first, and no other reader merges meanwhile."""
    with contextlib.ExitStack() as locks:
        for view in sorted(store.list_feature_views(), key=lambda view: view.name):
            history_file = history_file_of(view)
            if history_file is None or not history_file.exists():
                continue
            locks.enter_context(_history_lock(history_file))
            merge_pending_history(history_file)
        yield


def history_file_of(view: Any) -> Path | None:
    """The offline history file of a feature view whose batch source is a file source (None otherwise)."""
    from feast import FileSource

    source = view.batch_source
    return Path(source.path) if isinstance(source, FileSource) else None


def _history_lock(history_file: Path) -> contextlib.AbstractContextManager[None]:
    """Exclusive flock beside ``history_file``: one merge (and the read after it) at a time, across processes."""
    return file_lock(history_file.with_name(history_file.name + ".lock"))


def _create_history_file(view: Any) -> None:
    """An empty parquet file with the view's columns (entity, features, timestamp): the history's schema."""
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
