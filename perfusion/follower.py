"""Follow Kafka topics on a background thread: one record at a time to a handler, through broker outages and bad data.

The service's demand view, its model-update wake-ups and the demo's observer all read topics the same way: a
kafka-python consumer without a consumer group (nothing is committed; each start reads from ``start_at``), a daemon
thread, and a handler per record. :class:`TopicFollower` is that loop, with two rules:

- **Data never stops it.** Any exception raised while handling one record (decoding included: a handler that
  parses JSON nested thousands of levels deep raises ``RecursionError``, a 5,000-digit number ``ValueError``) is
  logged with ``topic[partition]@offset``, counted in :attr:`FollowerCounts.failed`, and the follower goes on with
  the next record. Without this a single poison record would stop the thread, and since a restart reads from the
  beginning again it would stop at the same offset every time.
- **The broker going away does not stop it either.** An error from the consumer itself (connecting, polling) closes
  the consumer, waits (exponential backoff, reset by the next successful poll) and connects again. The new consumer
  starts at ``start_at`` again; records at offsets this follower has already handed over are skipped, so with
  ``"earliest"`` each record reaches the handler once per follower, and with ``"latest"`` records produced while
  the broker was unreachable are not seen.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from perfusion.errors import ConfigError
from perfusion.kafka_security import kafka_python_kwargs

if TYPE_CHECKING:
    from kafka import KafkaConsumer

    from perfusion.settings import KafkaSecuritySettings

logger = logging.getLogger(__name__)

# Exception messages can quote the whole offending input (a 5,000-digit number); the log keeps this much of them.
MAX_LOGGED_REASON_CHARS = 300


@dataclass(frozen=True)
class FollowedRecord:
    """One record of a followed topic, as the handler receives it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True)
class ReconnectBackoff:
    """How long the follower waits before connecting again after a broker error."""

    initial_s: float = field(default=0.5, metadata={"help": "wait after the first error, seconds"})
    factor: float = field(default=2.0, metadata={"help": "each further error in a row multiplies the wait by this"})
    max_s: float = field(default=10.0, metadata={"help": "the wait never grows beyond this many seconds"})

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ConfigError(
                f"backoff needs 0 < initial_s <= max_s, got initial_s={self.initial_s}, max_s={self.max_s}"
            )
        if self.factor < 1:
            raise ConfigError(f"backoff factor must be at least 1, got {self.factor}")

    def delay_s(self, errors_in_a_row: int) -> float:
        """The wait after the ``errors_in_a_row``-th consecutive broker error (1 for the first)."""
        return min(self.max_s, self.initial_s * self.factor ** max(0, errors_in_a_row - 1))


@dataclass(frozen=True)
class FollowerCounts:
    """What a follower has done since it was built."""

    handled: int
    failed: int
    broker_errors: int


@dataclass(frozen=True)
class RecordFailure:
    """The last record whose handling raised."""

    where: str
    error: str


RecordHandler = Callable[[FollowedRecord], None]
BrokerErrorHook = Callable[[Exception], None]


class TopicFollower:
    """Reads ``topics`` from ``start_at`` on a daemon thread and calls ``handler`` once per record, in offset order
    within each partition.

    ``on_broker_error`` (optional) is told of every consumer error, for a metric; ``consumer_options`` go to
    ``KafkaConsumer`` as given (for example ``metadata_max_age_ms``, to see partitions created later sooner);
    ``security`` is how the consumer authenticates (None: PLAINTEXT).
    """

    def __init__(
        self,
        name: str,
        bootstrap_servers: str,
        topics: Sequence[str],
        handler: RecordHandler,
        *,
        start_at: Literal["earliest", "latest"] = "earliest",
        poll_timeout_s: float = 0.5,
        backoff: ReconnectBackoff | None = None,
        on_broker_error: BrokerErrorHook | None = None,
        consumer_options: dict[str, object] | None = None,
        security: KafkaSecuritySettings | None = None,
    ) -> None:
        if not topics:
            raise ConfigError(f"follower {name!r} was given no topics; name at least one")
        if poll_timeout_s <= 0:
            raise ConfigError(f"poll_timeout_s must be positive, got {poll_timeout_s}")
        self.name = name
        self.bootstrap_servers = bootstrap_servers
        self.topics = tuple(topics)
        self.handler = handler
        self.start_at = start_at
        self.poll_timeout_s = poll_timeout_s
        self.backoff = backoff if backoff is not None else ReconnectBackoff()
        self.on_broker_error = on_broker_error
        self.consumer_options = dict(consumer_options or {})
        self.security = security
        self.last_failure: RecordFailure | None = None
        self._handled = 0
        self._failed = 0
        self._broker_errors = 0
        self._counts_lock = threading.Lock()
        self._positioned = threading.Event()
        # (topic, partition) -> the offset after the last record handed to the handler, for skipping re-reads.
        self._next_offsets: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------------------------- control

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"follower {self.name!r} was started already; build a new one to follow again")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the thread to finish (within about one poll timeout) and wait up to ``timeout_s`` for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_positioned(self, timeout_s: float) -> bool:
        """True once every partition of the followed topics has a read position: records produced after this are
        seen even with ``start_at="latest"``. False if that did not happen within ``timeout_s``."""
        return self._positioned.wait(timeout_s)

    def counts(self) -> FollowerCounts:
        with self._counts_lock:
            return FollowerCounts(handled=self._handled, failed=self._failed, broker_errors=self._broker_errors)

    # -------------------------------------------------------------------------------------------------- one record

    def handle(self, record: FollowedRecord) -> bool:
        """Give one record to the handler under the error policy; False if the handler raised."""
        try:
            self.handler(record)
        except Exception as exc:  # the policy: no record, however malformed, stops the follower
            reason = f"{type(exc).__name__}: {exc}"
            if len(reason) > MAX_LOGGED_REASON_CHARS:
                reason = reason[:MAX_LOGGED_REASON_CHARS] + f"... ({len(reason)} characters)"
            with self._counts_lock:
                self._failed += 1
            self.last_failure = RecordFailure(where=record.where, error=reason)
            logger.warning("%s skips %s: %s", self.name, record.where, reason)
            return False
        with self._counts_lock:
            self._handled += 1
        return True

    # -------------------------------------------------------------------------------------------------- the thread

    def _connect(self) -> KafkaConsumer:
        from kafka import KafkaConsumer

        return KafkaConsumer(
            *self.topics,
            bootstrap_servers=self.bootstrap_servers,
            group_id=None,
            auto_offset_reset=self.start_at,
            enable_auto_commit=False,
            client_id=f"perfusion-{self.name}",
            **kafka_python_kwargs(self.security),
            **self.consumer_options,
        )

    def _poll_once(self, consumer: KafkaConsumer) -> None:
        batches = consumer.poll(timeout_ms=int(self.poll_timeout_s * 1000))
        for partition, messages in batches.items():
            position = (partition.topic, partition.partition)
            for message in messages:
                if self._stop.is_set():
                    return
                if message.offset < self._next_offsets.get(position, 0):
                    continue  # handled before a reconnect made the consumer read from start_at again
                self._next_offsets[position] = message.offset + 1
                self.handle(
                    FollowedRecord(
                        topic=partition.topic,
                        partition=partition.partition,
                        offset=message.offset,
                        key=message.key,
                        value=message.value,
                    )
                )
        if not self._positioned.is_set():
            assignment = consumer.assignment()
            if assignment:
                for partition in assignment:
                    consumer.position(partition)  # resolves start_at to an offset now, not at the next fetch
                self._positioned.set()

    def _run(self) -> None:
        consumer: KafkaConsumer | None = None
        errors_in_a_row = 0
        try:
            while not self._stop.is_set():
                try:
                    if consumer is None:
                        consumer = self._connect()
                    self._poll_once(consumer)
                    errors_in_a_row = 0
                except Exception as exc:  # the consumer's own failure: broker away, metadata, a client bug
                    errors_in_a_row += 1
                    with self._counts_lock:
                        self._broker_errors += 1
                    delay_s = self.backoff.delay_s(errors_in_a_row)
                    logger.warning(
                        "%s lost Kafka at %s (%s: %s); reconnecting in %.1f s",
                        self.name,
                        self.bootstrap_servers,
                        type(exc).__name__,
                        exc,
                        delay_s,
                    )
                    self._tell_broker_error(exc)
                    if consumer is not None:
                        _close_quietly(consumer)
                        consumer = None
                        self._positioned.clear()
                    self._stop.wait(delay_s)
        finally:
            if consumer is not None:
                _close_quietly(consumer)

    def _tell_broker_error(self, exc: Exception) -> None:
        if self.on_broker_error is None:
            return
        try:
            self.on_broker_error(exc)
        except Exception as hook_error:  # a failing metric hook must not end the thread it reports on
            logger.warning("%s: on_broker_error raised %s: %s", self.name, type(hook_error).__name__, hook_error)


def _close_quietly(consumer: KafkaConsumer) -> None:
    try:
        consumer.close()
    except Exception as exc:  # closing a consumer whose broker is gone may fail; the follower goes on regardless
        logger.debug("closing a Kafka consumer failed: %s", exc)
