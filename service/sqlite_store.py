"""The service's store: one sqlite database, named by a URL, that every replica of the service opens.

Designs (:mod:`service.designs`), the demand followed from the worker, and the ledger (:mod:`service.ledger`) live
in one database, so that two ``perfusion serve`` processes pointed at the same URL (``ServiceSettings.store_url``)
serve one truth: a design created through one is listed, read and drawn through the other, and an impression
served by one is clicked and ordered through the other.

Supported URLs: ``sqlite:///<path>`` (``sqlite:////abs/path/service.sqlite``, or a path relative to the working
folder). Any other scheme is a :class:`~perfusion.errors.ConfigError` naming the setting.

Two processes share the file safely because it is opened

- in WAL mode (readers never block the writer, nor it them), with ``synchronous=NORMAL``;
- with a busy timeout (:data:`BUSY_TIMEOUT_S`): a writer that finds the database locked waits for it instead of
  failing;
- with every read-check-write in one ``BEGIN IMMEDIATE`` transaction (:meth:`SqliteStore.transaction`), which takes
  the database's write lock before the check: of two replicas admitting the same event id, or the last units of one
  order, the second waits for the first to commit and then sees what it wrote.

WAL needs the processes on one machine (its index is shared memory), or a filesystem whose locks and shared memory
work across machines; NFS is not one.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from perfusion.errors import ConfigError

SQLITE_SCHEME: Final = "sqlite:///"
SUPPORTED_STORES: Final = (
    "sqlite:///<path> (a sqlite database file, e.g. sqlite:////srv/perfusion/service.sqlite; "
    "sqlite:///relative/service.sqlite is relative to the working folder)"
)
# Seconds a statement waits for another process's write lock before sqlite gives up ("database is locked").
BUSY_TIMEOUT_S: Final = 30.0


def sqlite_path(url: str, setting: str = "store_url") -> Path:
    """The database file a store URL names; a URL of another kind is a ConfigError naming ``setting``."""
    if not url.startswith(SQLITE_SCHEME):
        scheme = url.split(":", 1)[0] if ":" in url else url
        raise ConfigError(
            f"{setting}: {url!r} is not a store this service supports (scheme {scheme!r}); supported: "
            f"{SUPPORTED_STORES}"
        )
    path = url.removeprefix(SQLITE_SCHEME).split("?", 1)[0]
    if not path or path == ":memory:":
        raise ConfigError(
            f"{setting}: {url!r} names no file (an in-memory database is not shared between replicas); supported: "
            f"{SUPPORTED_STORES}"
        )
    return Path(path)


def sqlite_url(path: Path) -> str:
    """The store URL of a database file (absolute)."""
    return SQLITE_SCHEME + str(path.resolve())


class SqliteStore:
    """A sqlite database opened for sharing between processes (WAL, busy timeout) with ``schema`` applied.

    ``self._lock`` guards the connection (sqlite connections are not safe to use from two threads at once);
    :meth:`transaction` holds it and the database's write lock around a read-check-write."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
        self._connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self._set_wal()
        self._connection.execute("PRAGMA synchronous = NORMAL")
        try:  # one transaction, so that two processes opening a new file do not interleave their CREATEs
            self._connection.executescript(f"BEGIN IMMEDIATE;\n{schema}\nCOMMIT;")
        except sqlite3.Error:
            if self._connection.in_transaction:
                self._connection.execute("ROLLBACK")
            raise

    @property
    def url(self) -> str:
        return sqlite_url(self.path)

    def _set_wal(self) -> None:
        """Switch the file to WAL (kept in the file); a second process switching it at the same moment may find
        it locked for a moment, which the busy handler does not cover for this pragma."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                (mode,) = self._connection.execute("PRAGMA journal_mode = WAL").fetchone()
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            if str(mode).lower() != "wal":
                raise ConfigError(f"store_url: {self.path} cannot be opened in WAL mode (it is in {mode!r} mode)")
            return

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` when the block raises), holding the
        thread lock: no other thread or process writes between the block's reads and its writes."""
        with self._lock, self._immediate():
            yield self._connection

    @contextmanager
    def _immediate(self) -> Iterator[None]:
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        self._connection.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._connection.close()
