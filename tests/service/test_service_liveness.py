"""/healthz and /metrics answer while generation is saturated; candidate requests beyond the bounded generation
pool are refused at once with 503 and Retry-After, and those admitted finish once generation moves again."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray

from perfusion.image_store import ImageStore
from perfusion.text_encoder import TextEncoder
from service.app import create_app
from service.auth import KeyStore
from service.designs import DesignRegistry
from service.features import FeastFeatureReader
from service.generation_pool import GenerationPool, GenerationPoolSettings
from service.generator import GeneratedGroup, PersonalizedGenerator
from tests.service.test_service_api import PRODUCTION_TOPIC, RecordingSink, tiny_generator

# 48 concurrent candidate requests once held every thread of the default pool, and both endpoints timed out.
CONCURRENT_REQUESTS = 48
POOL = GenerationPoolSettings(workers=2, queue=3, retry_after_s=4)
# Only a bound on how long a test waits for something to happen, so that a regression fails instead of hanging.
GIVE_UP_S = 60.0


class HeldGenerator:
    """The tiny real generator, with each call held until the test releases generation."""

    def __init__(self, generator: PersonalizedGenerator) -> None:
        self.generator = generator
        self.release = threading.Event()
        self.started = 0
        self._lock = threading.Lock()

    @property
    def model_version(self) -> str:
        return self.generator.model_version

    @property
    def text_encoder(self) -> object:
        return self.generator.text_encoder

    def generate(self, prompt: str, user_vector: NDArray[np.float32] | None, k: int, seed: int) -> GeneratedGroup:
        with self._lock:
            self.started += 1
        self.release.wait(GIVE_UP_S)
        return self.generator.generate(prompt, user_vector, k, seed)


@pytest.fixture
def feature_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FeastFeatureReader:
    """A real Feast store with no rows: every user is served the base model."""
    from perfusion.feature_store import apply_feature_repo, open_feature_store

    monkeypatch.setenv("PERFUSION_FEAST_DIR", str(tmp_path / "feast"))
    apply_feature_repo()
    return FeastFeatureReader(open_feature_store())


async def wait_until(condition: Any) -> None:
    async with asyncio.timeout(GIVE_UP_S):
        while not condition():
            await asyncio.sleep(0.02)


def test_health_and_metrics_answer_while_generation_is_saturated(
    tmp_path: Path, text_encoder: TextEncoder, feature_reader: FeastFeatureReader
) -> None:
    generator = HeldGenerator(tiny_generator(text_encoder))
    designs = DesignRegistry(tmp_path / "designs.sqlite")
    design = designs.create("m-1", "a red dress", order_threshold=3)
    keys = KeyStore(tmp_path / "keys.json")
    operator = keys.create("operator", "ops-1")  # previews candidates for any viewer
    app = create_app(
        generator=generator,
        event_sink=RecordingSink(),
        feature_reader=feature_reader,
        designs=designs,
        images=ImageStore(tmp_path / "images"),
        events_topic="test.perfusion.events",
        production_topic=PRODUCTION_TOPIC,
        generation=POOL,
        keys=keys,
    )

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://service", headers=operator.authorization
        ) as client:
            requests = [
                asyncio.create_task(
                    client.post(f"/designs/{design.design_id}/candidates", json={"user_id": f"u-{n}", "k": 2})
                )
                for n in range(CONCURRENT_REQUESTS)
            ]
            try:
                await wait_until(lambda: generator.started == POOL.workers)
                admitted = POOL.workers + POOL.queue
                await wait_until(lambda: sum(task.done() for task in requests) == CONCURRENT_REQUESTS - admitted)

                # Generation is held on every worker and the queue is full: liveness, readiness and metrics answer.
                async with asyncio.timeout(GIVE_UP_S):
                    health = await client.get("/healthz")
                    metrics = await client.get("/metrics")
                    ready = await client.get("/readyz")
                assert health.status_code == 200 and health.json()["status"] == "ok"
                assert metrics.status_code == 200
                assert ready.status_code == 200, ready.text
                assert f"perfusion_generation_admitted {float(admitted)}" in metrics.text
                assert f"perfusion_generation_refused_total {float(CONCURRENT_REQUESTS - admitted)}" in metrics.text

                refused = [task.result() for task in requests if task.done()]
                assert all(response.status_code == 503 for response in refused)
                assert all(response.headers["retry-after"] == str(POOL.retry_after_s) for response in refused)
                assert "generation busy" in refused[0].json()["detail"]
                assert "PERFUSION_SERVE_GENERATION__QUEUE" in refused[0].json()["detail"]
                assert refused[0].headers["content-type"] == "application/problem+json"
            finally:
                generator.release.set()
            async with asyncio.timeout(GIVE_UP_S):
                responses = await asyncio.gather(*requests)
            served = [response for response in responses if response.status_code == 200]
            assert len(served) == POOL.workers + POOL.queue
            assert all(len(response.json()["candidates"]) == 2 for response in served)
            # The pool is free again: the next request is served.
            after = await client.post(f"/designs/{design.design_id}/candidates", json={"user_id": "u-late", "k": 1})
            assert after.status_code == 200, after.text

    asyncio.run(scenario())


def test_a_full_pool_refuses_at_once_and_frees_its_slots() -> None:
    pool = GenerationPool(GenerationPoolSettings(workers=1, queue=1, retry_after_s=1))
    release = threading.Event()

    async def scenario() -> list[object]:
        held = [asyncio.create_task(pool.run(lambda: release.wait(GIVE_UP_S))) for _ in range(2)]
        await wait_until(lambda: pool.admitted == 2)
        outcomes: list[object] = []
        try:
            await pool.run(lambda: True)
        except Exception as exc:
            outcomes.append(exc)
        release.set()
        outcomes.extend(await asyncio.gather(*held))
        outcomes.append(await pool.run(lambda: "after"))
        return outcomes

    try:
        refusal, first, second, after = asyncio.run(scenario())
    finally:
        pool.shutdown()
    assert type(refusal).__name__ == "GenerationBusy" and "retry in 1 s" in str(refusal)
    assert (first, second, after) == (True, True, "after")
    assert pool.admitted == 0
