"""``perfusion serve``: the generator service (FastAPI on uvicorn) with hot reload and the demand follower."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the generator service (designs, personalized candidates, events) on HTTP",
        description="Serve POST /designs, POST /designs/{id}/candidates, GET /images/{id}, POST /events, "
        "GET /designs/{id}, /healthz and /metrics. Events go to Kafka, user features come from Feast online, and "
        "new model versions are loaded in place as the trainer publishes them.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--base", type=Path, default=None, help="base checkpoint folder (default: assets/base)")
    parser.add_argument(
        "--models", type=Path, default=None, help="model store with published versions (default: <state>/models)"
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per candidate group")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between checks of the store's LATEST")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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

    settings = StreamSettings.from_env()
    bootstrap = settings.resolved_bootstrap_servers()
    topics = TopicNames.for_prefix(settings.topic_prefix)
    ensure_topics(bootstrap, topics, settings.partitions)

    base_folder = args.base or BASE_CHECKPOINT_DIR
    store_root = args.models or state_dir() / "models"
    text_encoder = base_text_encoder(base_folder)
    generator = load_serving_generator(
        base_folder, store_root, text_encoder, num_steps=args.steps, guidance_scale=args.guidance
    )
    metrics = ServiceMetrics()
    designs = DesignRegistry.default()
    watcher = ModelWatcher(
        ModelStore(store_root),
        generator,
        metrics,
        poll_interval_s=args.poll,
        bootstrap_servers=bootstrap,
        updates_topic=topics.model_updates,
    )
    follower = DemandFollower(designs, bootstrap, topics.events, topics.production_orders)
    event_sink = KafkaEventSink(bootstrap, topics.events)
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
    )
    print(f"serving model version {generator.model_version} on http://{args.host}:{args.port} (Kafka {bootstrap})")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        event_sink.close()
        designs.close()
    return 0
