"""The real Kafka broker: the session fixture's broker answers both Python clients; KafkaBroker's lifecycle."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from harness.infra import kafka_broker
from harness.infra.kafka_broker import KafkaBroker, KafkaBrokerConfig, bootstrap_servers, new_cluster_id
from perfusion.errors import ConfigError, InfrastructureError
from perfusion.server_files import is_owned_process, process_command_line

MESSAGES = [(f"user-{index % 2}".encode(), f"event-{index}".encode()) for index in range(5)]


def test_fixture_broker_lists_topics(kafka_bootstrap: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10_000)
    try:
        assert isinstance(admin.list_topics(), list)
    finally:
        admin.close()


def test_kafka_python_roundtrip(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = topic_prefix + "roundtrip"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for key, value in MESSAGES:
        producer.send(topic, key=key, value=value)
    producer.flush(timeout=30)
    producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=topic_prefix + "group",
        auto_offset_reset="earliest",
        consumer_timeout_ms=15_000,
    )
    try:
        received = []
        for record in consumer:
            received.append((record.key, record.value))
            if len(received) == len(MESSAGES):
                break
    finally:
        consumer.close()
    # Order holds per key (per partition), not across keys.
    assert sorted(received) == sorted(MESSAGES)
    for user in (b"user-0", b"user-1"):
        assert [value for key, value in received if key == user] == [value for key, value in MESSAGES if key == user]


def test_aiokafka_roundtrip(kafka_bootstrap: str, topic_prefix: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = topic_prefix + "aio"

    async def roundtrip() -> list[tuple[bytes | None, bytes | None]]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for key, value in MESSAGES:
                await producer.send_and_wait(topic, value=value, key=key)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=kafka_bootstrap, group_id=topic_prefix + "aio-group", auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            received: list[tuple[bytes | None, bytes | None]] = []
            while len(received) < len(MESSAGES):
                record = await asyncio.wait_for(consumer.getone(), timeout=30)
                received.append((record.key, record.value))
            return received
        finally:
            await consumer.stop()

    assert sorted(asyncio.run(roundtrip()), key=repr) == sorted(MESSAGES, key=repr)


def test_create_topic_with_four_partitions(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = topic_prefix + "partitioned"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)], wait_for_metadata=True)
        assert topic in admin.list_topics()
    finally:
        admin.close()
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        assert consumer.partitions_for_topic(topic) == {0, 1, 2, 3}
    finally:
        consumer.close()


@pytest.fixture
def second_broker(tmp_path: Path, kafka_bootstrap: str) -> KafkaBroker:
    """A broker of its own in a temporary state folder (the session broker keeps running beside it)."""
    return KafkaBroker(KafkaBrokerConfig(state_dir=tmp_path / "kafka", heap="384m"))


def test_broker_up_status_down(second_broker: KafkaBroker) -> None:
    assert not second_broker.status().running
    with second_broker:
        status = second_broker.status()
        assert status.running and status.pid is not None and status.address is not None
        assert second_broker.bootstrap_file.read_text().strip() == status.address
        assert second_broker.start() == status  # already running: a no-op
        admin = KafkaAdminClient(bootstrap_servers=status.address, request_timeout_ms=10_000)
        admin.close()
        pid = status.pid
    assert process_command_line(pid) is None  # the JVM is gone
    assert not second_broker.status().running
    assert not second_broker.pid_file.exists() and not second_broker.bootstrap_file.exists()
    assert second_broker.stop() is False  # stopping twice is harmless


def test_stale_pid_file_is_detected_and_never_signalled(tmp_path: Path) -> None:
    broker = KafkaBroker(KafkaBrokerConfig(state_dir=tmp_path / "kafka"))
    broker.state_dir.mkdir(parents=True)
    # A live process that is not this broker: its pid must not be taken for the broker's.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        broker.pid_file.write_text(f"{bystander.pid}\n")
        status = broker.status()
        assert not status.running and status.stale_pid and status.pid == bystander.pid
        assert not broker.pid_file.exists()
        broker.pid_file.write_text(f"{bystander.pid}\n")
        assert broker.stop() is False
        assert bystander.poll() is None  # still alive
        assert not is_owned_process(bystander.pid, str(broker.properties_file))
    finally:
        bystander.kill()
        bystander.wait()


def test_bootstrap_servers_prefers_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.example:9092")
    assert bootstrap_servers() == "kafka.example:9092"


def test_bootstrap_servers_without_broker_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path))
    with pytest.raises(InfrastructureError, match="perfusion broker up"):
        bootstrap_servers()


def test_config_rejects_bad_port() -> None:
    with pytest.raises(ConfigError, match="between 0 and 65535, got 70000"):
        KafkaBrokerConfig(port=70000)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"port": -1}, "port must be between 0 and 65535, got -1"),
        ({"controller_port": 65536}, "controller_port must be between 0 and 65535, got 65536"),
        ({"controller_port": -1}, "controller_port must be between 0 and 65535, got -1"),
        ({"num_partitions": 0}, "num_partitions must be at least 1, got 0"),
    ],
)
def test_config_bounds_name_the_field(values: dict[str, int], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        KafkaBrokerConfig(state_dir=tmp_path, **values)
    edge = KafkaBrokerConfig(state_dir=tmp_path, port=65535, controller_port=0, num_partitions=1)
    assert (edge.port, edge.controller_port, edge.num_partitions) == (65535, 0, 1)


def test_config_from_env_reads_only_broker_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path))  # the whole state folder, not the broker's
    monkeypatch.setenv("PERFUSION_PORT", "9")
    monkeypatch.setenv("PERFUSION_BROKER_PORT", "19092")
    config = KafkaBrokerConfig.from_env()
    assert config.port == 19092 and config.state_dir == tmp_path / "kafka"
    assert KafkaBrokerConfig().port == 0  # built in code: its arguments only


def test_fixture_fails_rather_than_skips_when_the_broker_cannot_start(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A cache whose broker jar is an empty file: the JVM cannot even format the storage.
    libs = tmp_path / "cache" / f"kafka-{kafka_broker.KAFKA_VERSION}" / "libs"
    libs.mkdir(parents=True)
    (libs / ".installed").write_text("broken\n")
    (libs / f"kafka_2.13-{kafka_broker.KAFKA_VERSION}.jar").write_bytes(b"")
    broken_cache = libs.parent.parent
    monkeypatch.setenv("PERFUSION_CACHE_DIR", str(broken_cache))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    pytester.makeconftest(Path(__file__).parents[1].joinpath("fixtures.py").read_text())
    pytester.makepyfile(test_needs_kafka="def test_needs_kafka(kafka_bootstrap):\n    assert kafka_bootstrap\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the project's Kafka broker could not start*"])


def test_pom_ships_with_the_package() -> None:
    pom = Path(kafka_broker.__file__).with_name("kafka-pom.xml")
    assert pom.exists() and "kafka_2.13" in pom.read_text()
    assert os.access(pom, os.R_OK)


def test_cluster_ids_never_start_with_a_dash_and_hold_16_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import uuid

    # The first draw encodes to an id starting with '-' (0xf8 -> '-' in URL-safe base64); it must be redrawn.
    draws = iter([uuid.UUID(bytes=b"\xf8" + b"\x00" * 15), uuid.UUID(int=7)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(draws))
    cluster_id = new_cluster_id()
    assert not cluster_id.startswith("-")
    assert base64.urlsafe_b64decode(cluster_id + "==") == uuid.UUID(int=7).bytes
