"""The worker against a broker that asks for credentials, as a managed Kafka does: the project's broker started in a
state folder of its own, on free ports, with a SASL_PLAINTEXT listener (``KafkaBrokerConfig(sasl=True)``). A client
without credentials, or with a wrong password, is refused; `perfusion worker` given SCRAM-SHA-512 credentials
through the KAFKA_* variables turns the events into the group samples and production orders that the batch
recomputation gives. The shared broker is not used."""

from __future__ import annotations

import atexit
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.infra.kafka_broker import KafkaBroker, KafkaBrokerConfig
from perfusion.contracts.topics import TopicNames, ensure_topics
from perfusion.kafka_security import kafka_python_kwargs, security_environment
from perfusion.settings import KafkaClientSettings, KafkaSecuritySettings
from tests.streams.test_streams_integration import (
    IMPRESSIONS,
    PARTITIONS,
    WORKER_FLAGS,
    by_key,
    clock_events,
    expected_results,
    make_log,
    produce,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER = "perfusion-worker"
PASSWORD = secrets.token_hex(16)
WAIT_S = 600.0
"""Seconds the outputs may take: the worker opens Feast before it consumes, which takes minutes on a busy machine."""


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    config = KafkaBrokerConfig(
        state_dir=tmp_path_factory.mktemp("kafka-sasl"), heap="384m", sasl=True, sasl_username=USER,
        sasl_password=PASSWORD,
    )  # fmt: skip
    broker = KafkaBroker(config)
    atexit.register(broker.stop)  # also on an interrupted session; stop() is idempotent
    with broker:
        yield broker


def scram(password: str = PASSWORD) -> KafkaSecuritySettings:
    return KafkaSecuritySettings(
        protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username=USER, sasl_password=password
    )


def list_topics(bootstrap: str, **kwargs: Any) -> list[str]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, bootstrap_timeout_ms=6000, **kwargs)
    try:
        return list(admin.list_topics())
    finally:
        admin.close()


def test_the_sasl_listener_refuses_a_client_without_credentials_or_with_a_wrong_password(
    sasl_broker: KafkaBroker,
) -> None:
    from kafka.errors import KafkaError

    bootstrap = sasl_broker.sasl_bootstrap()
    assert bootstrap != sasl_broker.bootstrap()
    with pytest.raises(KafkaError):
        list_topics(bootstrap)
    with pytest.raises(KafkaError):
        list_topics(bootstrap, **kafka_python_kwargs(scram("not-the-password")))
    for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        security = scram().with_overrides(sasl_mechanism=mechanism)
        assert isinstance(list_topics(bootstrap, **kafka_python_kwargs(security)), list)
    properties = sasl_broker.properties_file
    assert properties.stat().st_mode & 0o077 == 0, "server.properties holds the password: owner only"


def read_until(
    bootstrap: str, topics: dict[str, str], expected: dict[str, set[str]]
) -> dict[str, list[tuple[str, dict]]]:
    """(key, value) of each of ``topics`` (topic -> kind) from the beginning, read with SCRAM credentials until
    every kind holds its ``expected`` keys or the timeout."""
    from kafka import KafkaConsumer, TopicPartition

    outputs: dict[str, list[tuple[str, dict]]] = {kind: [] for kind in topics.values()}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **kafka_python_kwargs(scram()))
    try:
        consumer.assign([TopicPartition(topic, p) for topic in topics for p in range(PARTITIONS)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if all({key for key, _ in outputs[kind]} >= keys for kind, keys in expected.items()):
                break
            for partition, records in consumer.poll(timeout_ms=500).items():
                outputs[topics[partition.topic]].extend((r.key.decode(), json.loads(r.value)) for r in records)
        return outputs
    finally:
        consumer.close()


def test_the_worker_with_scram_credentials_turns_events_into_group_samples_and_production_orders(
    sasl_broker: KafkaBroker, tmp_path: Path, topic_prefix: str
) -> None:
    from harness.loop import LoopPlace, cli_arguments, loop_process
    from perfusion.feature_store import apply_feature_repo

    bootstrap = sasl_broker.sasl_bootstrap()
    security = scram()
    place = LoopPlace(
        bootstrap, state_dir=tmp_path / "state", topic_prefix=topic_prefix, feast_dir=tmp_path / "feast",
        online_store="sqlite", extra_environment=security_environment(security),
    )  # fmt: skip
    apply_feature_repo(place.feature_store())  # before the worker starts: it opens the Feast store before consuming
    client = KafkaClientSettings(bootstrap_servers=bootstrap, topic_prefix=topic_prefix, kafka_security=security)
    names = TopicNames.for_prefix(topic_prefix)
    ensure_topics(bootstrap, names, PARTITIONS, client=client)
    log = make_log(seed=4, impressions=IMPRESSIONS, base_ts=time.time() - 1000.0)
    expected_samples, expected_orders = expected_results(log)
    assert expected_samples and expected_orders, "the log must give both samples and production orders"

    arguments = cli_arguments("worker", *WORKER_FLAGS, "--loglevel", "warning")
    with loop_process(place, "worker", arguments, tmp_path, stop_grace_s=60.0) as worker:
        produce(bootstrap, names.events, log, clock_events(max(event.ts for event in log)), scram())
        outputs = read_until(
            bootstrap,
            {names.group_samples: "samples", names.production_orders: "orders"},
            {"samples": set(expected_samples), "orders": set(expected_orders)},
        )
        assert worker.process.poll() is None, f"the worker exited:\n{worker.log_tail()}"
        print(worker.log_tail())  # shown when an assertion below fails
    assert by_key(outputs["samples"]) == expected_samples
    assert by_key(outputs["orders"]) == expected_orders
    assert topic_config(bootstrap, names.production_orders)["cleanup.policy"] == "compact"


def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **kafka_python_kwargs(scram()))
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        admin.close()
    return {name: entry["value"] for name, entry in described["topic"][topic].items()}
