"""The Feast client: the store's settings, opening it, applying the repo, pushing micro-batches, reading online.

A store is a folder (:class:`FeatureStoreSettings`; default ``<state dir>/feast``): the registry, the sqlite online
store and the parquet offline history live in it, and Feast's config is built in code from the settings
(:func:`repo_config`; ``FeatureStore(config=RepoConfig(repo_path=<folder>), repo_path=<folder>)``), never from
``${VAR}`` in a YAML file. The repo's definitions (``features/``) name the history files relative to the store's
folder, so two stores in two folders can be open in one process, each with its own settings; nothing here sets a
variable. The online store is sqlite (in the folder) or Redis (``online_store="redis"``, at ``redis_url`` or the
project's redis-server, ``<state>/redis/url``).

Feast 0.67 does not enforce a view's ttl on online reads outside precomputed feature services (it does offline), and
a windowed count is only true until its window has passed: :func:`online_feature_rows` ages both from the event
time Feast returns with each value (docs/user-vector.md, "Ageing").

Feast is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from perfusion.errors import ConfigError, InfrastructureError
from perfusion.paths import FEATURE_REPO_DIR, state_dir
from perfusion.server_files import REDIS_ADDRESS_FILE, file_lock, redis_state_dir, running_server_address
from perfusion.settings import Settings

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore, FeatureView
    from feast.repo_config import RepoConfig

log = logging.getLogger(__name__)

PROJECT = "perfusion"
"""Feast's project name (features/feature_store.yaml says the same, for the CLI)."""
USER_PREFERENCES_PUSH = "user_preferences_push"
USER_PROFILE_PUSH = "user_profile_push"
USER_VECTOR_SERVICE = "user_vector"
"""The feature service of what the user vector u reads (features/definitions.py)."""
WINDOW_TAG = "window_minutes"
"""Field tag of a windowed count: its window in minutes (features/definitions.py)."""
EVENT_TIME_SUFFIX = "__ts"
"""Feast's column of a feature's event time in ``OnlineResponse.to_dict(include_event_timestamps=True)``."""
ONLINE_STORE_KINDS = ("sqlite", "redis")


class FeatureStoreSettings(Settings):
    """Which Feast store a process opens: its folder and its online store. Built in code, it reads only its
    arguments; :meth:`~perfusion.settings.Settings.from_env` reads ``PERFUSION_FEAST_DIR``,
    ``PERFUSION_ONLINE_STORE`` and ``REDIS_URL``."""

    feast_dir: Path | None = Field(
        default=None,
        description="the store's folder: registry, sqlite online store, offline history; empty = <state dir>/feast",
    )
    online_store: str = Field(
        default="sqlite", description="Feast online store: sqlite (a file in the store's folder) or redis"
    )
    redis_url: str = Field(
        default="",
        validation_alias="REDIS_URL",
        description="Redis of the redis online store, redis://host:port[/db]; empty = the project's redis-server",
    )

    @field_validator("online_store")
    @classmethod
    def _known_online_store(cls, kind: str) -> str:
        if kind not in ONLINE_STORE_KINDS:
            raise ValueError(f"online_store must be 'sqlite' or 'redis', got {kind!r}")
        return kind

    def resolved_feast_dir(self) -> Path:
        """The store's folder (created, with its ``offline`` folder, on first use)."""
        path = (self.feast_dir if self.feast_dir is not None else state_dir() / "feast").resolve()
        (path / "offline").mkdir(parents=True, exist_ok=True)
        return path

    def resolved_redis_connection(self) -> str:
        """Feast's connection string of the Redis online store: ``redis_url``, else the running redis-server's."""
        url = self.redis_url or running_server_address(redis_state_dir(), REDIS_ADDRESS_FILE)
        if not url:
            raise InfrastructureError(
                f"the redis online store needs Redis: the project's redis-server in {redis_state_dir()} is not "
                "running and redis_url is empty; run `perfusion redis up` or set REDIS_URL=redis://host:port/0"
            )
        return redis_connection_string(url)


def redis_connection_string(redis_url: str) -> str:
    """Feast's Redis connection string ("host:port,db=N,password=...") from a ``redis://`` URL."""
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


def repo_config(settings: FeatureStoreSettings) -> RepoConfig:
    """Feast's config of the store ``settings`` name, with the store's folder as its repo path."""
    from feast import RepoConfig

    folder = settings.resolved_feast_dir()
    online: dict[str, Any] = {"type": "sqlite", "path": str(folder / "online.db")}
    if settings.online_store == "redis":
        online = {"type": "redis", "connection_string": settings.resolved_redis_connection()}
    return RepoConfig(
        project=PROJECT,
        provider="local",
        registry=str(folder / "registry.db"),
        online_store=online,
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=folder,
    )


def _settings(settings: FeatureStoreSettings | None) -> FeatureStoreSettings:
    return FeatureStoreSettings.from_env() if settings is None else settings


def _store(settings: FeatureStoreSettings) -> FeatureStore:
    from feast import FeatureStore

    config = repo_config(settings)
    return FeatureStore(config=config, repo_path=str(config.repo_path))


def open_feature_store(settings: FeatureStoreSettings | None = None) -> FeatureStore:
    """The store ``settings`` name (default: from the environment); the repo must have been applied there
    (`perfusion features apply`)."""
    settings = _settings(settings)
    registry = settings.resolved_feast_dir() / "registry.db"
    if not registry.exists():
        raise InfrastructureError(f"the Feast registry {registry} does not exist; run `perfusion features apply`")
    return _store(settings)


@dataclass(frozen=True)
class ApplySummary:
    feast_dir: Path
    online_store: str
    feature_views: list[str]
    entities: list[str]
    feature_services: list[str]


def repo_objects(repo_dir: Path = FEATURE_REPO_DIR) -> list[Any]:
    """The Feast objects (entities, data sources, feature views, feature services) that the repo's modules define
    at module level, as `feast apply` finds them. Each module is loaded from its file under a private name, so
    nothing of the repo enters ``sys.modules``."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    objects: dict[int, Any] = {}
    for path in sorted(repo_dir.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_perfusion_feature_repo_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot load the feature repo module {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for value in vars(module).values():
            if isinstance(value, Entity | DataSource | FeatureView | FeatureService):
                objects.setdefault(id(value), value)
    return list(objects.values())


def apply_feature_repo(settings: FeatureStoreSettings | None = None) -> ApplySummary:
    """Apply ``features/`` to the store ``settings`` name (default: from the environment) with Feast's public
    ``FeatureStore.apply``, deleting what an earlier apply registered and the repo no longer defines (as `feast
    apply` does), and create an empty offline history file, with the view's schema, for each view that has none."""
    settings = _settings(settings)
    store = _store(settings)
    objects = repo_objects()
    names = {(type(value).__name__, value.name) for value in objects}
    registered: list[Any] = [
        *store.list_entities(),
        *store.list_feature_views(),
        *store.list_feature_services(),
        *store.list_data_sources(),
    ]
    stale = [
        value
        for value in registered
        if (type(value).__name__, value.name) not in names and not value.name.startswith("__")
    ]
    store.apply(objects, objects_to_delete=stale, partial=False)
    views = store.list_feature_views()
    for view in views:
        _create_history_file(store, view)
    return ApplySummary(
        feast_dir=settings.resolved_feast_dir(),
        online_store=settings.online_store,
        feature_views=sorted(view.name for view in views),
        entities=sorted(entity.name for entity in store.list_entities()),
        feature_services=sorted(service.name for service in store.list_feature_services()),
    )


HISTORY_PART_GLOB = "part-*.parquet"
HISTORY_MERGE_EVERY_S = 60.0
"""A pusher also merges the pending parts into the history file this often (wall-clock seconds)."""


class FeaturePusher:
    """Pushes micro-batches of rows to a push source: online through Feast, offline as a pending part of the view's
    history (:func:`append_history`)."""

    def __init__(self, store: FeatureStore, merge_every_s: float = HISTORY_MERGE_EVERY_S) -> None:
        self._store = store
        self._views_fed: dict[str, list[str]] = {}  # push source -> the feature views it feeds
        self._history_files: dict[str, Path] = {}
        self._history_schemas: dict[Path, Any] = {}  # pyarrow schema of each history file; merges keep it
        self._merge_every_s = merge_every_s
        self._last_merge = time.monotonic()
        self._unmerged: set[Path] = set()  # history files with parts written since the last merge

    def _history_schema(self, history_file: Path) -> Any:
        import pyarrow.parquet as pq

        if history_file not in self._history_schemas:
            self._history_schemas[history_file] = pq.read_schema(history_file)
        return self._history_schemas[history_file]

    def _history_file(self, push_source: str) -> Path:
        """The offline history file of the view fed by ``push_source``."""
        if push_source not in self._history_files:
            self._resolve(push_source)
        return self._history_files[push_source]

    def _resolve(self, push_source: str) -> None:
        """Find the views ``push_source`` feeds (what ``FeatureStore.push`` looks up from the registry on every
        call, a few milliseconds each) and the history file of the first with one."""
        views = [
            view
            for view in self._store.list_feature_views()
            if view.stream_source is not None and view.stream_source.name == push_source
        ]
        history_files = [path for path in (history_file_of(self._store, view) for view in views) if path]
        if not history_files:
            raise ConfigError(f"no feature view is fed by push source {push_source!r}")
        self._views_fed[push_source] = [view.name for view in views]
        self._history_files[push_source] = history_files[0]

    @classmethod
    def open(cls, settings: FeatureStoreSettings | None = None) -> FeaturePusher:
        """A pusher to the store ``settings`` name (default: from the environment)."""
        return cls(open_feature_store(settings))

    @property
    def store(self) -> FeatureStore:
        return self._store

    def push_user_preferences(self, rows: Sequence[dict[str, Any]], merge_due_history: bool = True) -> None:
        self.push(USER_PREFERENCES_PUSH, rows, merge_due_history=merge_due_history)

    def push(self, push_source: str, rows: Sequence[dict[str, Any]], merge_due_history: bool = True) -> None:
        """One Feast push of ``rows`` online, and one part file of offline history (blocking; the agent calls it in
        a thread). A retry after a failure may write a row twice offline, identically: harmless to point-in-time
        joins. ``merge_due_history=False`` leaves :meth:`merge_due_history` to the caller, to be run when nobody
        waits on the push (the worker's Feast writer process merges after it has answered)."""
        import pandas as pd

        if not rows:
            return
        frame = pd.DataFrame(list(rows))
        history_file = self._history_file(push_source)
        for view_name in self._views_fed[push_source]:  # FeatureStore.push(to=ONLINE), the views looked up once
            self._store.write_to_online_store(view_name, frame)
        append_history(history_file, frame, self._history_schema(history_file))
        self._unmerged.add(history_file)
        if merge_due_history:
            self.merge_due_history()
        log.debug("pushed %d rows to %s", len(rows), push_source)

    def merge_due_history(self) -> int:
        """Merge the pending parts of every history file this pusher wrote parts to, once ``merge_every_s`` has
        passed since its last merge; returns how many files it merged. Readers merge before they read anyway; this
        keeps the files themselves at most that far behind for readers that go to Feast directly (the `feast` CLI,
        a notebook). A merge reads and rewrites the whole file: 0.2 to 0.3 s at a few tens of thousands of rows."""
        if not self._unmerged or time.monotonic() - self._last_merge < self._merge_every_s:
            return 0
        files, self._unmerged = sorted(self._unmerged), set()
        try:
            for history_file in files:
                with _history_lock(history_file):
                    merge_pending_history(history_file)
        except BaseException:
            self._unmerged.update(files)  # parts stay pending, and are merged next time (or by a reader)
            raise
        self._last_merge = time.monotonic()
        return len(files)


# --------------------------------------------------------------------------------------------- online reads


@dataclass(frozen=True)
class FeatureAges:
    """How long after its row's event time each feature of some views holds: ``ttl_s`` for the features of a view
    with a ttl (its ttl, in seconds; Feast applies it offline only), ``window_minutes`` for a windowed count (its
    :data:`WINDOW_TAG`)."""

    ttl_s: Mapping[str, float]
    window_minutes: Mapping[str, int]

    @classmethod
    def of(cls, views: Sequence[FeatureView]) -> FeatureAges:
        ttl_s: dict[str, float] = {}
        windows: dict[str, int] = {}
        for view in views:
            seconds = view.ttl.total_seconds() if view.ttl is not None else 0.0
            for feature in view.features:
                if seconds > 0:
                    ttl_s[feature.name] = seconds
                if WINDOW_TAG in feature.tags:
                    windows[feature.name] = int(feature.tags[WINDOW_TAG])
        return cls(ttl_s, windows)

    def value(self, name: str, value: Any, event_ts: float, now: float) -> Any:
        """``value`` of feature ``name`` from a row stamped ``event_ts`` (seconds since the epoch), as read at
        ``now``: None past its view's ttl; 0 for a windowed count once its window has passed.

        A windowed count is the viewer's events in the minutes of the window that ends with the minute of their
        latest event (streams.preferences), and the row's event time is that event's. Nothing newer was pushed, so
        at ``now`` the window ending with ``now``'s minute holds none of them once it starts after that minute.
        """
        if value is None:
            return None
        if name in self.ttl_s and now - event_ts > self.ttl_s[name]:
            return None
        window = self.window_minutes.get(name)
        if window is not None and math.floor(now / 60.0) - math.floor(event_ts / 60.0) >= window:
            return 0
        return value


def feature_views_of(store: FeatureStore, features: Sequence[str] | FeatureService) -> list[FeatureView]:
    """The feature views that ``features`` ("view:feature" references, or a feature service) read from."""
    if isinstance(features, str):
        raise TypeError("features must be a sequence of 'view:feature' references or a FeatureService, not a str")
    if not isinstance(features, Sequence):
        names = [projection.name for projection in features.feature_view_projections]
    else:
        names = list(dict.fromkeys(reference.split(":", 1)[0] for reference in features))
    return [store.get_feature_view(name) for name in names]


def online_feature_rows(
    store: FeatureStore,
    features: Sequence[str] | FeatureService,
    entity_rows: Sequence[Mapping[str, Any]],
    now: float | None = None,
    ages: FeatureAges | None = None,
) -> list[dict[str, Any]]:
    """One dict per entity row (its keys, then feature name -> value, None where the store holds nothing), read
    online and aged to ``now`` (default: the clock) by :class:`FeatureAges` (of the views read, unless given)."""
    now = time.time() if now is None else now
    ages = FeatureAges.of(feature_views_of(store, features)) if ages is None else ages
    refs: list[str] | FeatureService = list(features) if isinstance(features, Sequence) else features
    columns = store.get_online_features(features=refs, entity_rows=[dict(row) for row in entity_rows]).to_dict(
        include_event_timestamps=True
    )
    names = [name for name in columns if not name.endswith(EVENT_TIME_SUFFIX)]
    rows: list[dict[str, Any]] = []
    for index in range(len(entity_rows)):
        row: dict[str, Any] = {}
        for name in names:
            value = columns[name][index]
            stamps = columns.get(name + EVENT_TIME_SUFFIX)
            row[name] = value if stamps is None else ages.value(name, value, float(stamps[index]), now)
        rows.append(row)
    return rows


def read_online_features(
    store: FeatureStore, feature_view: str, user_ids: Sequence[str], now: float | None = None
) -> list[dict[str, Any]]:
    """The online values of every feature of ``feature_view`` for each user, one dict a user (None = no value),
    aged to ``now`` (default: the clock): an idle viewer's 1 h and 1 d counts read 0 once their window has passed."""
    view = store.get_feature_view(feature_view)
    references = [f"{feature_view}:{feature.name}" for feature in view.features]
    return online_feature_rows(store, references, [{"user_id": u} for u in user_ids], now, FeatureAges.of([view]))


# ---------------------------------------------------------------------------------------------- offline history
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
    history_files = {history_file_of(store, view) for view in store.list_feature_views()}
    with contextlib.ExitStack() as locks:
        for history_file in sorted(path for path in history_files if path is not None and path.exists()):
            locks.enter_context(_history_lock(history_file))
            merge_pending_history(history_file)
        yield


def history_file_of(store: FeatureStore, view: Any) -> Path | None:
    """The offline history file of a feature view whose batch source is a file source (None otherwise): its path,
    relative to the store's folder unless absolute."""
    from feast import FileSource

    source = view.batch_source
    if not isinstance(source, FileSource):
        return None
    return Path(FileSource.get_uri_for_file_path(store.config.repo_path, source.path)).resolve()


def _history_lock(history_file: Path) -> contextlib.AbstractContextManager[None]:
    """Exclusive flock beside ``history_file``: one merge (and the read after it) at a time, across processes."""
    return file_lock(history_file.with_name(history_file.name + ".lock"))


def _create_history_file(store: FeatureStore, view: Any) -> None:
    """An empty parquet file with the view's columns (entity, features, timestamp): the history's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from feast.type_map import feast_value_type_to_pa

    path = history_file_of(store, view)
    if path is None or path.exists():
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
