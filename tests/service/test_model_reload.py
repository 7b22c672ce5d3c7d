"""Hot reload on tiny seeded models: in-place swap, requests in flight, a version of another adaptive config built
and served, corrupt, partial and mislabelled versions refused."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from perfusion.checkpoints import ModelStore
from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork
from perfusion.models.attribute_classifier import AttributeClassifier, AttributeClassifierConfig
from perfusion.models.base import QUICK_CONFIG, build_unet
from perfusion.sampler_config import SamplerConfig
from perfusion.text_encoder import TextEncoder
from perfusion.user_features import USER_DIM
from service.generator import ADAPTIVE_COMPONENT, GeneratedGroup, PersonalizedGenerator, VersionRefused
from service.metrics import ServiceMetrics
from service.model_watcher import ModelWatcher

ADAPTIVE_CONFIG = AdaptiveConfig(condition_hidden=16, condition_channels=4)
ZERO_INIT_PARTS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
USER = np.linspace(0.0, 1.0, USER_DIM, dtype=np.float32)
PROMPT = "a blue dotted dress"


def trained_like_adaptive(unet: torch.nn.Module, seed: int) -> AdaptiveNetwork:
    """An adaptive network as a trainer might publish it: zero convolutions moved away from zero."""
    adaptive = AdaptiveNetwork(unet, ADAPTIVE_CONFIG)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adaptive.named_parameters():
            if any(part in name for part in ZERO_INIT_PARTS):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return adaptive


def publish(store: ModelStore, adaptive: AdaptiveNetwork) -> str:
    return store.publish({ADAPTIVE_COMPONENT: (adaptive, adaptive.config.to_dict())}, {"note": "test"})


def build_generator(text_encoder: TextEncoder, uses_adaptive: bool = True) -> PersonalizedGenerator:
    torch.manual_seed(0)
    unet = build_unet(QUICK_CONFIG)
    classifier = AttributeClassifier(AttributeClassifierConfig(channels=(8, 16)))
    adaptive = AdaptiveNetwork(unet, ADAPTIVE_CONFIG)
    return PersonalizedGenerator(
        unet,
        adaptive,
        text_encoder,
        classifier,
        QUICK_CONFIG,
        uses_adaptive=uses_adaptive,
        sampler=SamplerConfig(steps=2),
    )


def test_base_served_without_the_network_until_a_version_loads(text_encoder: TextEncoder, store: ModelStore) -> None:
    # load_serving_generator starts this way: the zero-initialised network would add exactly 0, at a cost.
    without = build_generator(text_encoder, uses_adaptive=False)
    with_network = build_generator(text_encoder, uses_adaptive=True)
    base = without.generate(PROMPT, USER, k=2, seed=3).images
    np.testing.assert_array_equal(base, with_network.generate(PROMPT, USER, k=2, seed=3).images)

    version = publish(store, trained_like_adaptive(with_network.unet, seed=11))
    without.load_version(version, store.path(version))
    with_network.load_version(version, store.path(version))
    personalized = without.generate(PROMPT, USER, k=2, seed=3).images
    assert not np.array_equal(personalized, base)
    np.testing.assert_array_equal(personalized, with_network.generate(PROMPT, USER, k=2, seed=3).images)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_reload_in_place_keeps_outputs_until_the_swap_then_serves_the_new_version(
    text_encoder: TextEncoder, store: ModelStore
) -> None:
    generator = build_generator(text_encoder)
    before = generator.generate(PROMPT, USER, k=2, seed=3)
    assert before.model_version == "base"

    version = publish(store, trained_like_adaptive(generator.unet, seed=11))
    # Published but not loaded: the generator still serves the same pixels.
    np.testing.assert_array_equal(generator.generate(PROMPT, USER, k=2, seed=3).images, before.images)

    parameters_before = [id(p) for p in generator._active.network.parameters()]
    parameters_before += [id(p) for p in generator._standby.network.parameters()]
    generator.load_version(version, store.path(version))
    after = generator.generate(PROMPT, USER, k=2, seed=3)
    assert after.model_version == version
    assert not np.array_equal(after.images, before.images)
    # In place: the same allocated tensors, no new modules.
    parameters_after = [id(p) for p in generator._active.network.parameters()]
    parameters_after += [id(p) for p in generator._standby.network.parameters()]
    assert sorted(parameters_after) == sorted(parameters_before)

    # The new version's outputs are those of a generator built fresh on that version.
    fresh = build_generator(text_encoder)
    fresh.load_version(version, store.path(version))
    np.testing.assert_array_equal(fresh.generate(PROMPT, USER, k=2, seed=3).images, after.images)
    # The unknown user is served by the base model, whatever the version.
    np.testing.assert_array_equal(
        generator.generate(PROMPT, None, k=2, seed=3).images,
        build_generator(text_encoder).generate(PROMPT, None, k=2, seed=3).images,
    )


def test_request_in_flight_finishes_on_the_version_it_started_with(
    text_encoder: TextEncoder, store: ModelStore
) -> None:
    generator = build_generator(text_encoder)
    expected_base = generator.generate(PROMPT, USER, k=2, seed=5)
    version = publish(store, trained_like_adaptive(generator.unet, seed=12))

    started = threading.Event()
    release = threading.Event()
    original_encode = text_encoder.encode

    class PausingEncoder:
        def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            started.set()
            release.wait(10)
            return original_encode(prompts)

    generator.text_encoder = PausingEncoder()
    results: dict[str, GeneratedGroup] = {}
    worker = threading.Thread(target=lambda: results.update(group=generator.generate(PROMPT, USER, k=2, seed=5)))
    worker.start()
    assert started.wait(10)
    generator.load_version(version, store.path(version))  # swaps while the request is in flight, without waiting
    assert generator.model_version == version
    release.set()
    worker.join(30)
    generator.text_encoder = text_encoder
    assert results["group"].model_version == "base"
    np.testing.assert_array_equal(results["group"].images, expected_base.images)


def test_corrupt_version_is_refused_and_the_current_one_keeps_serving(
    text_encoder: TextEncoder, store: ModelStore
) -> None:
    generator = build_generator(text_encoder)
    metrics = ServiceMetrics()
    watcher = ModelWatcher(store, generator, metrics)
    good = publish(store, trained_like_adaptive(generator.unet, seed=13))
    assert watcher.check_now() == good
    serving = generator.generate(PROMPT, USER, k=2, seed=1)

    bad = publish(store, trained_like_adaptive(generator.unet, seed=14))
    weights = store.path(bad) / ADAPTIVE_COMPONENT / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)
    assert watcher.check_now() is None
    assert generator.model_version == good
    assert "sha256" in watcher.refused[bad]
    np.testing.assert_array_equal(generator.generate(PROMPT, USER, k=2, seed=1).images, serving.images)
    assert 'perfusion_model_reloads_refused_total{reason="CheckpointError"} 1.0' in metrics.render().decode()
    assert watcher.check_now() is None  # not retried

    # Rolling LATEST back to the good version is followed; a partial one (weights missing) is refused too.
    partial = publish(store, trained_like_adaptive(generator.unet, seed=15))
    (store.path(partial) / ADAPTIVE_COMPONENT / "model.safetensors").unlink()
    assert watcher.check_now() is None and "partial" in watcher.refused[partial]
    assert generator.model_version == good


def test_a_version_of_another_adaptive_config_is_built_and_served(text_encoder: TextEncoder, store: ModelStore) -> None:
    generator = build_generator(text_encoder)
    wider_config = AdaptiveConfig(condition_hidden=32, condition_channels=4)
    assert wider_config != ADAPTIVE_CONFIG
    torch.manual_seed(1)
    wider = AdaptiveNetwork(build_unet(QUICK_CONFIG), wider_config)
    with torch.no_grad():
        for name, parameter in wider.named_parameters():
            if any(part in name for part in ZERO_INIT_PARTS):
                parameter.normal_(std=0.05)
    version = publish(store, wider)
    generator.load_version(version, store.path(version))
    assert generator.model_version == version
    assert generator._active.network.config == wider_config
    served = generator.generate(PROMPT, USER, k=2, seed=3).images

    # The same pixels as a generator allocated for that config from the start.
    torch.manual_seed(0)
    unet = build_unet(QUICK_CONFIG)
    fresh = PersonalizedGenerator(
        unet,
        AdaptiveNetwork(unet, wider_config),
        text_encoder,
        AttributeClassifier(AttributeClassifierConfig(channels=(8, 16))),
        QUICK_CONFIG,
        sampler=SamplerConfig(steps=2),
    )
    fresh.load_version(version, store.path(version))
    np.testing.assert_array_equal(fresh.generate(PROMPT, USER, k=2, seed=3).images, served)

    # And back: a version of the first config loads into the other slot, rebuilt for it.
    narrow = publish(store, trained_like_adaptive(generator.unet, seed=16))
    generator.load_version(narrow, store.path(narrow))
    assert generator.model_version == narrow and generator._active.network.config == ADAPTIVE_CONFIG


def test_weights_that_do_not_fit_their_config_are_refused_before_the_swap(
    text_encoder: TextEncoder, store: ModelStore
) -> None:
    generator = build_generator(text_encoder)
    torch.manual_seed(1)
    wider = AdaptiveNetwork(build_unet(QUICK_CONFIG), AdaptiveConfig(condition_hidden=32, condition_channels=4))
    # Its config.json says the serving config, its weights are of another shape.
    mislabelled = store.publish({ADAPTIVE_COMPONENT: (wider, ADAPTIVE_CONFIG.to_dict())}, {"note": "test"})
    with pytest.raises(VersionRefused, match=r"does not load into a network of its config\.json"):
        generator.load_version(mislabelled, store.path(mislabelled))
    unknown_key = store.publish(
        {ADAPTIVE_COMPONENT: (wider, {**ADAPTIVE_CONFIG.to_dict(), "hidden_layers": 3})}, {"note": "test"}
    )
    with pytest.raises(VersionRefused, match=r"is not an adaptive network config.*hidden_layers"):
        generator.load_version(unknown_key, store.path(unknown_key))
    assert generator.model_version == "base"
    # The failed loads touched only the standby network: the next good version still loads.
    good = publish(store, trained_like_adaptive(generator.unet, seed=16))
    generator.load_version(good, store.path(good))
    assert generator.model_version == good


def test_watcher_thread_picks_up_a_publish(text_encoder: TextEncoder, store: ModelStore) -> None:
    generator = build_generator(text_encoder)
    watcher = ModelWatcher(store, generator, ServiceMetrics(), poll_interval_s=0.05)
    watcher.start()
    try:
        version = publish(store, trained_like_adaptive(generator.unet, seed=17))
        for _ in range(200):
            if generator.model_version == version:
                break
            threading.Event().wait(0.05)
        assert generator.model_version == version
    finally:
        watcher.stop()


def test_a_model_update_wakes_the_watcher_past_a_malformed_record(
    text_encoder: TextEncoder, store: ModelStore, kafka_bootstrap: str, topic_prefix: str
) -> None:
    from kafka import KafkaProducer

    from perfusion.contracts.records import ModelUpdated
    from perfusion.contracts.topics import TopicNames, ensure_topics

    topics = TopicNames.for_prefix(topic_prefix)
    ensure_topics(kafka_bootstrap, topics, partitions=1)
    generator = build_generator(text_encoder)
    # Polls LATEST once at start and then only when woken: the reload below can only come from the update record.
    watcher = ModelWatcher(
        store,
        generator,
        ServiceMetrics(),
        poll_interval_s=3600,
        bootstrap_servers=kafka_bootstrap,
        updates_topic=topics.model_updates,
    )
    watcher.start()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        assert watcher.updates_follower is not None and watcher.updates_follower.wait_positioned(30)
        version = publish(store, trained_like_adaptive(generator.unet, seed=18))
        update = ModelUpdated(version=version, path=str(store.path(version)), ts=1.0)
        # Keyed as the trainer keys its updates (by version): the compacted topic refuses a record without a key.
        poison = b'{"version": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
        producer.send(topics.model_updates, key=b"poison", value=poison)
        producer.send(topics.model_updates, key=version.encode(), value=update.to_bytes())
        producer.flush(timeout=10)
        for _ in range(600):
            if generator.model_version == version:
                break
            threading.Event().wait(0.05)
        assert generator.model_version == version
        assert watcher.updates_follower.counts().failed == 1
    finally:
        producer.close()
        watcher.stop()
