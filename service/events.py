"""Where the service sends the events it produces or accepts: Kafka's ``perfusion.events``, keyed by user id.

:class:`KafkaEventSink` waits for the broker's acknowledgement of every event before the request answers, so an
event is either on the topic or the request fails with 503 (:class:`EventSinkUnavailable`): nothing is dropped
silently. The app takes any :class:`EventSink`, so unit tests can pass a sink that records what it was given.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Protocol

from perfusion.contracts.records import Event
from perfusion.errors import InfrastructureError
from perfusion.kafka_security import kafka_python_kwargs

if TYPE_CHECKING:
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient

    from perfusion.settings import KafkaSecuritySettings

logger = logging.getLogger(__name__)


class EventSinkUnavailable(InfrastructureError):
    """The event could not be delivered; the caller should retry later (HTTP 503)."""


class EventSink(Protocol):
    def send(self, event: Event) -> None:
        """Deliver one event durably or raise :class:`EventSinkUnavailable`."""

    def close(self) -> None: ...


class KafkaEventSink:
    """A kafka-python producer that sends each event synchronously (acks=all) to one topic, keyed by user id; it and
    the readiness check's admin client connect with ``security`` (None: PLAINTEXT)."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        timeout_s: float = 5.0,
        security: KafkaSecuritySettings | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.timeout_s = timeout_s
        self.security = security
        self._producer: KafkaProducer | None = None
        self._admin: KafkaAdminClient | None = None
        self._lock = threading.Lock()

    def _connected(self) -> KafkaProducer:
        # Connect lazily, so a service started before the broker answers 503 until the broker is up.
        with self._lock:
            if self._producer is None:
                from kafka import KafkaProducer

                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap_servers,
                    acks="all",
                    linger_ms=0,
                    max_block_ms=int(self.timeout_s * 1000),
                    request_timeout_ms=int(self.timeout_s * 1000),
                    client_id="perfusion-service",
                    **kafka_python_kwargs(self.security),
                )
            return self._producer

    def send(self, event: Event) -> None:
        from kafka.errors import KafkaError

        try:
            future = self._connected().send(self.topic, key=event.user_id.encode(), value=event.to_bytes())
            future.get(timeout=self.timeout_s)
        except KafkaError as exc:
            raise EventSinkUnavailable(
                f"Kafka at {self.bootstrap_servers} did not accept {type(event).__name__} {event.event_id} "
                f"on {self.topic} ({type(exc).__name__}: {exc}); start the broker with `perfusion broker up` "
                "and retry"
            ) from exc

    def check_reachable(self, timeout_s: float) -> str:
        """Ask the broker for the metadata of this sink's topic, a new request each call (a producer's cached
        metadata would not notice a broker that went away); what it answered, or :class:`EventSinkUnavailable`."""
        from kafka.admin import KafkaAdminClient
        from kafka.errors import KafkaError

        timeout_ms = max(1, int(timeout_s * 1000))
        try:
            with self._lock:
                if self._admin is None:
                    self._admin = KafkaAdminClient(
                        bootstrap_servers=self.bootstrap_servers,
                        client_id="perfusion-service-readiness",
                        request_timeout_ms=timeout_ms,
                        bootstrap_timeout_ms=timeout_ms,
                        **kafka_python_kwargs(self.security),
                    )
                admin = self._admin
            described = admin.describe_topics([self.topic])
        except KafkaError as exc:
            self._drop_admin()  # the next check connects afresh
            raise EventSinkUnavailable(
                f"Kafka at {self.bootstrap_servers} did not answer a metadata request for {self.topic} within "
                f"{timeout_s:g} s ({type(exc).__name__}: {exc}); start the broker with `perfusion broker up`, or "
                "point KAFKA_BOOTSTRAP_SERVERS at a running one"
            ) from exc
        topic = next((found for found in described if found.get("topic", found.get("name")) == self.topic), None)
        if topic is None or topic.get("error_code"):
            raise EventSinkUnavailable(
                f"Kafka at {self.bootstrap_servers} answered, but has no topic {self.topic}; restart `perfusion "
                "serve` (it creates the loop's topics) or create it with the worker's partitions"
            )
        return f"{self.bootstrap_servers} answered: {self.topic} has {len(topic.get('partitions', []))} partitions"

    def _drop_admin(self) -> None:
        with self._lock:
            admin, self._admin = self._admin, None
        if admin is not None:
            admin.close()

    def close(self) -> None:
        self._drop_admin()
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=self.timeout_s)
                self._producer = None
