"""Hot reload: notice a new published model version and have the generator load it in place, without a restart.

The LATEST pointer of the model store is the truth; a ModelUpdated record on ``perfusion.model-updates`` is only a
wake-up that makes the watcher look at once instead of at its next poll. So a rollback (LATEST moved back) is
followed as well as a publish, and a missed or early event changes nothing.

For each new version the watcher verifies it in the store (checksums, every component present), then asks the
generator to load it off to the side and swap it in between requests. A version that fails either step is
refused: the reason is logged and counted in ``perfusion_model_reloads_refused_total``, the current version keeps
serving, and the refused version is not retried until LATEST names another one.

ModelUpdated records are read by a :class:`~perfusion.follower.TopicFollower` from the topic's end: a malformed
record is logged and skipped, a lost broker is retried with backoff and counted in
``perfusion_kafka_errors_total{operation="consume_model_updates"}``; meanwhile the poll of LATEST goes on.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from perfusion.contracts.records import ModelUpdated
from perfusion.errors import PerfusionError
from perfusion.follower import FollowedRecord, TopicFollower
from service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from perfusion.settings import KafkaSecuritySettings

logger = logging.getLogger(__name__)


class VersionSource(Protocol):
    """The part of ``perfusion.checkpoints.ModelStore`` the watcher reads."""

    def latest(self) -> str | None: ...

    def path(self, version: str) -> Path: ...

    def verify(self, version: str) -> object: ...


class ReloadableGenerator(Protocol):
    @property
    def model_version(self) -> str: ...

    def load_version(self, version: str, folder: Path) -> None: ...


class ModelWatcher:
    """Polls the store's LATEST every ``poll_interval_s`` (and on ModelUpdated events) and reloads the generator."""

    def __init__(
        self,
        store: VersionSource,
        generator: ReloadableGenerator,
        metrics: ServiceMetrics,
        poll_interval_s: float = 0.25,
        bootstrap_servers: str | None = None,
        updates_topic: str | None = None,
        security: KafkaSecuritySettings | None = None,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self.store = store
        self.generator = generator
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.bootstrap_servers = bootstrap_servers
        self.updates_topic = updates_topic
        self.security = security
        self.refused: dict[str, str] = {}  # version -> reason
        self._check_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.updates_follower: TopicFollower | None = None

    def check_now(self) -> str | None:
        """Load LATEST if it is new; returns the version loaded, or None if nothing changed or it was refused."""
        with self._check_lock:
            try:
                latest = self.store.latest()
            except (PerfusionError, OSError) as exc:
                logger.warning("cannot read the model store's LATEST pointer: %s", exc)
                return None
            if latest is None or latest == self.generator.model_version or latest in self.refused:
                return None
            try:
                self.store.verify(latest)
                self.generator.load_version(latest, self.store.path(latest))
            except (PerfusionError, OSError, ValueError, RuntimeError, KeyError) as exc:
                reason = type(exc).__name__
                self.refused[latest] = f"{reason}: {exc}"
                self.metrics.reloads_refused.labels(reason=reason).inc()
                logger.error(
                    "refused model version %s (%s: %s); still serving %s",
                    latest,
                    reason,
                    exc,
                    self.generator.model_version,
                )
                return None
            self.metrics.reloads.inc()
            self.metrics.set_model_version(latest)
            logger.info("now serving model version %s", latest)
            return latest

    def wake(self) -> None:
        """Look at LATEST now instead of at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._poll_loop, name="model-watcher", daemon=True)]
        for thread in self._threads:
            thread.start()
        if self.bootstrap_servers and self.updates_topic:
            # Only updates from now on matter: LATEST is checked at every poll anyway, so a missed update (the
            # broker away, a malformed record) only delays the reload to the next poll.
            self.updates_follower = TopicFollower(
                "model-updates",
                self.bootstrap_servers,
                [self.updates_topic],
                self._on_update,
                start_at="latest",
                on_broker_error=lambda _: self.metrics.kafka_errors.labels(operation="consume_model_updates").inc(),
                security=self.security,
            )
            self.updates_follower.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self.updates_follower is not None:
            self.updates_follower.stop(timeout_s)
        for thread in self._threads:
            thread.join(timeout_s)

    def topic_followers(self) -> list[TopicFollower]:
        return [] if self.updates_follower is None else [self.updates_follower]

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self.check_now()
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()

    def _on_update(self, record: FollowedRecord) -> None:
        update = ModelUpdated.model_validate_json(record.value)  # a malformed one is logged and skipped
        logger.info("ModelUpdated %s received; checking LATEST", update.version)
        self.wake()
