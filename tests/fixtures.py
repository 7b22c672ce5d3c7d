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
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pytest
from numpy.typing import NDArray

from perfusion.models.base import BaseModelConfig
from perfusion.text_encoder import TextEncoder

if TYPE_CHECKING:
    from trainer.batches import GroupBatch
    from trainer.settings import TrainerSettings
    from trainer.updates import TrainingModels

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


def tiny_training_models(settings: TrainerSettings) -> TrainingModels:
    """The reward model and generator of ``settings`` around a fresh :data:`TINY_BASE` U-Net (seed 0)."""
    import torch

    from perfusion.models.base import build_train_scheduler, build_unet
    from trainer.updates import build_training_models

    torch.manual_seed(0)
    return build_training_models(build_unet(TINY_BASE), TINY_BASE, build_train_scheduler(TINY_BASE), settings)


def tiny_group_batch(
    num_groups: int,
    seed: int,
    grades_of: Callable[[int], list[int]],
    pixels_of: Callable[[np.random.Generator, int], NDArray[np.uint8]],
    prompt_of: Callable[[int], str] = lambda group: "a red t-shirt",
) -> GroupBatch:
    """``num_groups`` groups of 8x8 images for :data:`TINY_BASE`: group g has candidates graded ``grades_of(g)``,
    the image of a candidate of grade q is ``pixels_of(rng, q)``, and each user vector is uniform in [0, 1)."""
    from perfusion.attributes import DESCRIPTOR_DIM
    from perfusion.contracts.records import GradedCandidate, GroupSample
    from perfusion.user_features import USER_DIM
    from trainer.batches import collate_groups

    rng = np.random.default_rng(seed)
    samples, vectors, pixels = [], [], {}
    for group in range(num_groups):
        candidates = []
        for position, grade in enumerate(grades_of(group)):
            image_id = f"g{group}-p{position}"
            pixels[image_id] = pixels_of(rng, grade)
            candidates.append(
                GradedCandidate(image_id=image_id, position=position, descriptor=[0.0] * DESCRIPTOR_DIM, grade=grade)
            )
        samples.append(
            GroupSample(
                sample_id=f"s{group}",
                user_id=f"u{group}",
                design_id="d",
                prompt=prompt_of(group),
                model_version="base",
                impression_ts=1_700_000_000.0,
                candidates=candidates,
            )
        )
        vectors.append(rng.random(USER_DIM).tolist())
    return collate_groups(samples, vectors, pixels)
