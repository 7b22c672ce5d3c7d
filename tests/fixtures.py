"""The one fixtures module of the tests: offline Hugging Face, a real Kafka broker for integration tests, per-test
topic names, the tiny model configurations and the text encoder that many tests share.

``kafka_bootstrap`` gives ``host:port`` of a real broker, from the first of:
1. ``KAFKA_BOOTSTRAP_SERVERS`` when set (an external broker; nothing is started or stopped);
2. testcontainers' ``KafkaContainer`` when a Docker engine answers;
3. the project's own broker (``harness.infra.kafka_broker``) in a temporary state folder.
A broker that cannot start fails the tests that need it; it never skips them. Any test that uses the fixture is
marked ``integration`` automatically.
"""

from __future__ import annotations

import atexit
import os
import re
import uuid
from collections.abc import Generator, Iterator

import pytest

from perfusion.models.base import BaseModelConfig
from perfusion.text_encoder import TextEncoder

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
KAFKA_CONTAINER_IMAGE = "confluentinc/cp-kafka:7.6.0"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


def _docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no client library, no socket, engine down: all mean "no Docker here"
        return False


def _kafka_container_bootstrap() -> Generator[str, None, None]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # testcontainers < 4.10 keeps the module at its old place
        from testcontainers.kafka import KafkaContainer

    with KafkaContainer(KAFKA_CONTAINER_IMAGE).with_kraft() as container:
        yield container.get_bootstrap_server()


def _project_broker_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Generator[str, None, None]:
    from harness.infra.kafka_broker import KafkaBroker, KafkaBrokerConfig
    from perfusion.errors import PerfusionError

    broker = KafkaBroker(KafkaBrokerConfig(state_dir=tmp_path_factory.mktemp("kafka")))
    atexit.register(broker.stop)  # also on an interrupted session; stop() is idempotent
    failure = None
    try:
        status = broker.start()
    except PerfusionError as exc:
        failure = str(exc)
    if failure is not None:
        broker.stop()
        pytest.fail(f"the project's Kafka broker could not start for the integration tests: {failure}", pytrace=False)
    try:
        assert status.address is not None
        yield status.address
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a real Kafka broker, exported as KAFKA_BOOTSTRAP_SERVERS for subprocesses too."""
    configured = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if configured:
        yield configured
        return
    source = _kafka_container_bootstrap() if _docker_engine_answers() else _project_broker_bootstrap(tmp_path_factory)
    address = next(source)
    os.environ[BOOTSTRAP_ENV] = address
    try:
        yield address
    finally:
        os.environ.pop(BOOTSTRAP_ENV, None)
        source.close()  # runs the generator's cleanup: stops the container or the broker


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """A topic-name prefix unique to this test run of this test, e.g. ``t-test_roundtrip-1a2b3c4d.``."""
    test_name = re.sub(r"[^a-zA-Z0-9_-]", "_", request.node.name)[:80]
    return f"t-{test_name}-{uuid.uuid4().hex[:8]}."


TINY_BASE = BaseModelConfig(
    sample_size=8, block_out_channels=(16, 32), layers_per_block=1, attention_heads=2, norm_num_groups=8
)
"""A base U-Net small enough that an update step takes milliseconds on the CPU (8x8 pixels)."""


@pytest.fixture(scope="session")
def text_encoder() -> TextEncoder:
    """The MiniLM text encoder at its default length, loaded once per session (it takes about a second)."""
    return TextEncoder()
