"""``perfusion serve``: the generator service (FastAPI on uvicorn) with hot reload and the demand follower."""

from __future__ import annotations

import argparse
from typing import Any

from perfusion.settings import add_flags, flag_overrides
from service.settings import ServiceSettings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the generator service (designs, personalized candidates, events) on HTTP",
        description="Serve POST /designs, POST /designs/{id}/candidates, GET /images/{id}, POST /events, "
        "GET /designs/{id}, /healthz, /readyz and /metrics. Events go to Kafka, user features come from Feast "
        "online, and new model versions are loaded in place as the trainer publishes them.",
    )
    # One flag per field of the service's settings (--port, --steps, --generation-workers, ...), with its variable.
    add_flags(parser, ServiceSettings)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ops.cpu_threads import prefer_passive_openmp

    prefer_passive_openmp()  # before torch: sampling shares the cores with the loop's other processes
    import uvicorn

    from perfusion.checkpoints import ModelStore
    from perfusion.contracts.topics import TopicNames, ensure_topics
    from perfusion.feature_store import open_feature_store
    from perfusion.image_store import ImageStore
    from perfusion.paths import state_dir
    from perfusion.sampling import BASE_CHECKPOINT_DIR, base_text_encoder
    from service.app import create_app
    from service.designs import DemandFollower, DesignRegistry
    from service.events import KafkaEventSink
    from service.features import FeastFeatureReader
    from service.generator import load_serving_generator
    from service.metrics import ServiceMetrics
    from service.model_watcher import ModelWatcher
    from streams.settings import StreamSettings

    service = ServiceSettings.from_env(**flag_overrides(args, ServiceSettings))
    settings = StreamSettings.from_env()
    bootstrap = settings.resolved_bootstrap_servers()
    topics = TopicNames.for_prefix(settings.topic_prefix)
    ensure_topics(bootstrap, topics, settings.partitions, client=settings)

    base_folder = service.base or BASE_CHECKPOINT_DIR
    store_root = service.models or state_dir() / "models"
    text_encoder = base_text_encoder(base_folder)
    generator = load_serving_generator(base_folder, store_root, text_encoder, service.sampler(), service.best_of)
    metrics = ServiceMetrics()
    designs = DesignRegistry.default(service)
    watcher = ModelWatcher(
        ModelStore(store_root),
        generator,
        metrics,
        poll_interval_s=service.poll,
        bootstrap_servers=bootstrap,
        updates_topic=topics.model_updates,
        security=settings.kafka_security,
    )
    follower = DemandFollower(designs, bootstrap, topics.design_demand, security=settings.kafka_security)
    event_sink = KafkaEventSink(bootstrap, topics.events, security=settings.kafka_security)
    app = create_app(
        generator=generator,
        event_sink=event_sink,
        feature_reader=FeastFeatureReader(open_feature_store()),
        designs=designs,
        images=ImageStore(),
        events_topic=topics.events,
        production_topic=topics.production_orders,
        metrics=metrics,
        background=(watcher, follower),
        generation=service.generation,
        limits=service.limits,
        readiness=service.readiness,
        auth=service.auth,
    )
    print(
        f"serving model version {generator.model_version} on http://{service.host}:{service.port} (Kafka {bootstrap}); "
        f"sampler {generator.sampler.describe()}"
    )
    try:
        uvicorn.run(app, host=service.host, port=service.port, log_level="info")
    finally:
        event_sink.close()
        designs.close()
    return 0
