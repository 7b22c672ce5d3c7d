"""One sqlite file shared by the request threads (and a follower thread): the service's designs and its ledger."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class SqliteStore:
    """A sqlite file opened in autocommit and WAL mode with ``schema`` applied; ``self._lock`` guards the connection
    (sqlite connections are not safe to use from two threads at once)."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._connection.close()
