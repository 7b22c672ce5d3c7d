"""The generator service's costs on this machine, measured through its HTTP API in process (the app
``perfusion serve`` builds, from the same real components: base checkpoint, Feast online store, Kafka event sink,
model store with its watcher), on a fresh state folder:

- ``candidates``: wall time of ``POST /designs/{id}/candidates`` with K candidates at the serving sampler
  (:data:`perfusion.sampler_config.SERVING_SAMPLER`), for a user Feast knows nothing about (``base``: the frozen
  base U-Net alone) and for a user with features (the adaptive network on top), run alternately so that load on the
  machine hits both alike (target < 1 s a group each); the ratio personalized / base (target <= 1.3);
- ``best_of_n``: the same user's request with best-of-N on (:class:`service.settings.BestOfSettings`): N
  candidates drawn in one batch, scored by the version's reward model, the K best shown; its latency a group and
  its ratio to the K-only ``personalized`` arm (no target: it is what ranking costs). The bench's reward model is
  untrained and its manifest records a held-out GAUC interval at the floor so that the ranking runs: the arm
  measures the cost of ranking, not what it gains (``docs/results.md`` is where gains are measured);
- ``forwards``: the U-Net forward passes one request makes and the rows of each: one a model-evaluated step, with
  the K candidates and both guidance branches in it (2K rows; 2N for ``best_of_n``);
- ``floor``: the ceiling measured in the same run: those forward passes alone (2K random rows, or 2N, the U-Net,
  and the adaptive network for ``personalized`` and ``best_of_n``; no scheduler, text encoder, reward model,
  classifier, Feast or HTTP), and each arm's request latency over its floor;
- ``publish_to_serve``: a new version published to the model store (atomic LATEST switch, as the trainer does)
  and announced on Kafka with ModelUpdated, while a client sends candidate requests back to back: seconds until
  the generator swapped it in (``swap``, target < 1 s median) and until the first response stamped with it
  (``first_response``, which also waits for the request in flight); requests that failed during swaps;
- ``feast_read``: every online read of the user's features inside the request path, p50 / p99 / max, with the
  service's own ``perfusion_feast_read_seconds`` and ``perfusion_generation_seconds`` histograms beside them.

Needs a Kafka broker (KAFKA_BOOTSTRAP_SERVERS or ``perfusion broker up``). Heavy imports happen inside
:func:`run_serve_benchmark` (this module is imported to build the CLI parser).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from perfusion.errors import ConfigError
from perfusion.sampler_config import SERVING_SAMPLER, SamplerConfig
from perfusion.settings import Settings
from service.settings import BestOfSettings

if TYPE_CHECKING:
    from service.features import FeatureReader

HELP = (
    "time K candidates base vs personalized vs best-of-N, publish -> served on the new version, and Feast reads in "
    "the request"
)

PERSONALIZED_USER = "bench-shopper-with-profile"
UNKNOWN_USER = "bench-shopper-unknown"
TARGET_RATIO = 1.3
TARGET_GROUP_S = 1.0
TARGET_SWAP_MEDIAN_S = 1.0
# The held-out GAUC interval the bench's versions record: at the default floor, so that best-of-N ranks.
BENCH_GAUC_INTERVAL = (0.55, 0.65)


class ServeBenchConfig(Settings):
    """What to measure; the defaults are ``perfusion serve``'s sampling settings."""

    k: int = Field(default=4, ge=1, le=16, description="candidates per request")
    best_of_n: int = Field(default=16, description="N of the best-of-N arm: candidates drawn to show the K best")
    steps: int = Field(
        default=SERVING_SAMPLER.steps, ge=1, description="steps of the serving sampler (trailing DDIM) per group"
    )
    guidance: float = Field(default=SERVING_SAMPLER.guidance_scale, description="classifier-free guidance scale")
    repeats: int = Field(default=8, ge=1, description="timed requests per arm (base, personalized)")
    warmup: int = Field(default=1, ge=0, description="untimed requests per arm first")
    publishes: int = Field(default=5, ge=1, description="versions published while requests run")
    poll: float = Field(default=0.25, gt=0, description="seconds between the watcher's checks of LATEST")
    base: Path | None = Field(default=None, description="base checkpoint folder (default: assets/base)")
    seed: int = Field(default=0, description="noise seed of every request")

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(
            kind=SERVING_SAMPLER.kind, spacing=SERVING_SAMPLER.spacing, steps=self.steps, guidance_scale=self.guidance
        )

    @model_validator(mode="after")
    def _best_of_n_within_its_bounds(self) -> ServeBenchConfig:
        try:
            self.best_of()  # N within its bounds and at least K
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def best_of(self) -> BestOfSettings:
        """The best-of-N arm's settings: on, for this N and this K."""
        try:
            return BestOfSettings(enabled=True, n=self.best_of_n, max_k=self.k)
        except ConfigError as exc:
            raise ConfigError(f"--best-of-n {self.best_of_n} with --k {self.k}: best-of-N's {exc}") from None


class TimedFeatureReader:
    """Delegates to the real reader and keeps each read's wall time in seconds."""

    def __init__(self, reader: FeatureReader) -> None:
        self.reader = reader
        self.seconds: list[float] = []
        self._lock = threading.Lock()

    def read(self, user_id: str) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return self.reader.read(user_id)
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.seconds.append(elapsed)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` with linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def describe(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values) if values else float("nan"),
        "p90": quantile(values, 0.9),
        "max": max(values) if values else float("nan"),
        "samples": values,
    }


def _publish_version(store: Any, unet: Any, image_size: int, seed: int) -> str:
    """Publish an adaptive network with small random zero-conv weights (a distinct version) and an untrained reward
    model for ``image_size`` pixels, with a held-out GAUC record that lets best-of-N rank; return its name."""
    import torch

    from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork
    from perfusion.models.reward import PerFusionRM, RewardModelConfig
    from service.generator import ADAPTIVE_COMPONENT, GAUC_HIGH_METRIC, GAUC_LOW_METRIC, REWARD_COMPONENT

    torch.manual_seed(seed)
    network = AdaptiveNetwork(unet, AdaptiveConfig())
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "zero" in name:  # ControlNet's zero convolutions: make the version's output differ from the base
                parameter.add_(torch.randn_like(parameter) * 1e-3)
    reward_model = PerFusionRM(RewardModelConfig(image_size=image_size))
    low, high = BENCH_GAUC_INTERVAL
    manifest = {"bench": "serve", "seed": seed, "metrics": {GAUC_LOW_METRIC: low, GAUC_HIGH_METRIC: high}}
    components = {
        ADAPTIVE_COMPONENT: (network, network.config.to_dict()),
        REWARD_COMPONENT: (reward_model, reward_model.config.to_dict()),
    }
    return str(store.publish(components, manifest))


def run_serve_benchmark(config: ServeBenchConfig, bootstrap_servers: str | None = None) -> dict[str, Any]:
    """Measure the three costs on a fresh state folder; see the module docstring."""
    import torch
    from fastapi.testclient import TestClient
    from kafka import KafkaProducer

    from harness.loop import process_environment
    from ops.demo.client import histogram_mean
    from perfusion.checkpoints import ModelStore
    from perfusion.contracts.topics import TopicNames, ensure_topics
    from perfusion.feature_store import FeatureStoreSettings, apply_feature_repo, open_feature_store
    from perfusion.image_store import ImageStore
    from perfusion.sampling import BASE_CHECKPOINT_DIR, base_text_encoder
    from perfusion.user_features import push_sign_up_profiles
    from service.app import create_app
    from service.auth import KeyStore
    from service.designs import DesignRegistry
    from service.events import KafkaEventSink
    from service.features import FeastFeatureReader
    from service.generator import load_serving_generator
    from service.metrics import ServiceMetrics
    from service.model_watcher import ModelWatcher
    from streams.settings import StreamSettings

    base_folder = config.base or BASE_CHECKPOINT_DIR
    from perfusion.kafka_security import kafka_python_kwargs

    kafka = StreamSettings.from_env()
    bootstrap = bootstrap_servers or kafka.resolved_bootstrap_servers()
    topics = TopicNames.for_prefix(f"bench-serve-{int(time.time())}.")
    ensure_topics(bootstrap, topics, 1, client=kafka)
    with tempfile.TemporaryDirectory(prefix="perfusion-bench-serve-") as tmp:
        state = Path(tmp)
        feature_store = FeatureStoreSettings.from_env(feast_dir=state / "feast")
        with process_environment({"PERFUSION_STATE_DIR": str(state)}):
            apply_feature_repo(feature_store)
            push_sign_up_profiles(
                {PERSONALIZED_USER: _OneProfile().profile(PERSONALIZED_USER)}, {}, time.time() - 86_400.0, feature_store
            )
            store = ModelStore(state / "models")
            text_encoder = base_text_encoder(base_folder)
            # Best-of-N on while the first version loads, so that its reward model loads with it; the arms then
            # switch it per request (_measure), and the versions of the publish phase load as with it off.
            generator = load_serving_generator(base_folder, store.root, text_encoder, config.sampler, config.best_of())
            _publish_version(store, generator.unet, generator.config.sample_size, seed=config.seed)
            metrics = ServiceMetrics()
            watcher = ModelWatcher(
                store, generator, metrics, config.poll, bootstrap_servers=bootstrap, updates_topic=topics.model_updates
            )
            watcher.check_now()  # serve the first published version from the start
            reader = TimedFeatureReader(FeastFeatureReader(open_feature_store(feature_store)))
            sink = KafkaEventSink(bootstrap, topics.events, security=kafka.kafka_security)
            designs = DesignRegistry(state / "service" / "designs.sqlite")
            keys = KeyStore(state / "service" / "keys.json")
            operator = keys.create("operator", "bench")  # may create designs and ask candidates for any user
            app = create_app(
                generator=generator,
                event_sink=sink,
                feature_reader=reader,
                designs=designs,
                images=ImageStore(state / "images"),
                events_topic=topics.events,
                production_topic=topics.production_orders,
                metrics=metrics,
                background=(watcher,),
                keys=keys,
            )
            producer = KafkaProducer(
                bootstrap_servers=bootstrap, acks="all", **kafka_python_kwargs(kafka.kafka_security)
            )
            try:
                with TestClient(app, headers=operator.authorization) as client:
                    report = _measure(config, client, generator, store, producer, topics.model_updates, reader)
                    metrics_text = client.get("/metrics").text
                report.update(_floor(config, generator, report["candidates_latency_seconds"]))
            finally:
                producer.close()
                sink.close()
                designs.close()
    feast_mean, feast_count = histogram_mean(metrics_text, "perfusion_feast_read_seconds")
    generation_mean, generation_count = histogram_mean(metrics_text, "perfusion_generation_seconds")
    report.update(
        benchmark="serve",
        config={**config.model_dump(mode="json"), "base": str(base_folder)},
        device="cpu",
        torch_threads=torch.get_num_threads(),
        service_metrics={
            "perfusion_feast_read_seconds": {"mean": feast_mean, "count": feast_count},
            "perfusion_generation_seconds": {"mean": generation_mean, "count": generation_count},
        },
    )
    return report


class _OneProfile:
    """The profile pushed for the personalized user (features of a shop's sign-up form)."""

    def profile(self, user_id: str) -> dict[str, int]:
        return {"age_group": 2, "region": 1}

    def user_ids(self) -> list[str]:
        return [PERSONALIZED_USER]

    def utilities(self, user_id: str, images: Any) -> Any:
        raise ConfigError("the serve benchmark has no shoppers who judge images")


def _measure(
    config: ServeBenchConfig,
    client: Any,
    generator: Any,
    store: Any,
    producer: Any,
    updates_topic: str,
    reader: TimedFeatureReader,
) -> dict[str, Any]:
    from perfusion.contracts.records import ModelUpdated

    created = client.post("/designs", json={"merchant_id": "bench", "prompt": "a red dress", "order_threshold": 99})
    created.raise_for_status()
    path = f"/designs/{created.json()['design_id']}/candidates"
    failures: list[str] = []

    def request(user_id: str) -> tuple[float, str, str]:
        started = time.perf_counter()
        response = client.post(path, json={"user_id": user_id, "k": config.k, "seed": config.seed})
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            failures.append(f"{response.status_code}: {response.text[:200]}")
            return elapsed, "", ""
        body = response.json()
        return elapsed, body["model_version"], body["personalization"]

    unranked, ranked = BestOfSettings(), config.best_of()

    def arm_request(arm: str, user_id: str) -> tuple[float, str, str]:
        # Requests of the arms run one at a time here, so switching the generator's best-of-N between them is safe.
        generator.best_of = ranked if arm == "best_of_n" else unranked
        try:
            return request(user_id)
        finally:
            generator.best_of = unranked

    latencies: dict[str, list[float]] = {arm: [] for arm, _ in ARMS}
    kinds: dict[str, set[str]] = {arm: set() for arm, _ in ARMS}
    for round_index in range(config.warmup + config.repeats):
        for arm, user in ARMS:
            elapsed, _, kind = arm_request(arm, user)
            kinds[arm].add(kind)
            if round_index >= config.warmup:
                latencies[arm].append(elapsed)

    forwards = {
        arm: _forward_rows(generator.unet, lambda arm=arm, user=user: arm_request(arm, user)) for arm, user in ARMS
    }
    # A ranked group is one sampling call of N candidates (2N rows with guidance); K rows would mean it fell back.
    guidance_rows = 2 if generator.sampler.guidance_scale != 1.0 else 1
    best_of_ranked = forwards["best_of_n"]["rows"] == [guidance_rows * config.best_of_n]

    swaps: list[float] = []
    first_responses: list[float] = []
    completed: list[tuple[float, str]] = []  # (perf_counter at completion, version) of background requests
    stop = threading.Event()

    def tracked_request() -> None:
        while not stop.is_set():
            _, version, _ = request(PERSONALIZED_USER)
            completed.append((time.perf_counter(), version))

    background = threading.Thread(target=tracked_request, name="bench-requests", daemon=True)
    background.start()
    try:
        for index in range(config.publishes):
            version = _publish_version(
                store, generator.unet, generator.config.sample_size, seed=config.seed + 1 + index
            )
            published = time.perf_counter()
            event = ModelUpdated(version=version, path=str(store.path(version)), ts=time.time())
            producer.send(updates_topic, key=version.encode(), value=event.to_bytes()).get(timeout=10)
            while generator.model_version != version:
                time.sleep(0.002)
            swaps.append(time.perf_counter() - published)
            deadline = time.monotonic() + 600.0
            while not any(v == version and t > published for t, v in completed):
                if time.monotonic() > deadline or not background.is_alive():
                    raise ConfigError(f"no request was served on {version} within 600 s; see the service's log")
                time.sleep(0.005)
            first_responses.append(min(t for t, v in completed if v == version and t > published) - published)
    finally:
        stop.set()
        background.join(timeout=600)

    base_median = statistics.median(latencies["base"])
    personalized_median = statistics.median(latencies["personalized"])
    ratio = personalized_median / base_median
    best_of_median = statistics.median(latencies["best_of_n"])
    return {
        "sampler": generator.sampler.describe(),
        "candidates_latency_seconds": {arm: describe(values) for arm, values in latencies.items()},
        "personalization_kinds": {arm: sorted(values) for arm, values in kinds.items()},
        "forwards": forwards,
        "personalized_over_base": ratio,
        "target_personalized_over_base": TARGET_RATIO,
        "best_of_n": {
            "n": config.best_of_n,
            "k": config.k,
            "ranked": best_of_ranked,
            "group_seconds": best_of_median,
            "over_personalized": best_of_median / personalized_median,
        },
        "targets": {
            "base_group_seconds": _target(f"< {TARGET_GROUP_S:g} s", base_median, base_median < TARGET_GROUP_S),
            "personalized_group_seconds": _target(
                f"< {TARGET_GROUP_S:g} s", personalized_median, personalized_median < TARGET_GROUP_S
            ),
            "personalized_over_base": _target(f"<= {TARGET_RATIO:g}", ratio, ratio <= TARGET_RATIO),
        },
        "publish_to_serve_seconds": {"swap": describe(swaps), "first_response": describe(first_responses)},
        "target_swap_median_seconds": TARGET_SWAP_MEDIAN_S,
        "feast_read_seconds": {
            "p50": quantile(reader.seconds, 0.5),
            "p99": quantile(reader.seconds, 0.99),
            "max": max(reader.seconds),
            "count": len(reader.seconds),
        },
        "failed_requests": failures,
    }


ARMS = (("base", UNKNOWN_USER), ("personalized", PERSONALIZED_USER), ("best_of_n", PERSONALIZED_USER))


def _target(target: str, measured: float, met: bool) -> dict[str, Any]:
    return {"target": target, "measured": round(measured, 4), "met": bool(met)}


def _forward_rows(unet: Any, action: Any) -> dict[str, Any]:
    """The U-Net forward passes ``action`` makes and the rows of each (the service's pool threads included)."""
    rows: list[int] = []
    handle = unet.register_forward_hook(lambda _module, inputs, _output: rows.append(int(inputs[0].shape[0])))
    try:
        action()
    finally:
        handle.remove()
    return {"count": len(rows), "rows": sorted(set(rows))}


def _floor(config: ServeBenchConfig, generator: Any, latencies: dict[str, Any]) -> dict[str, Any]:
    """The forward passes of one group alone, per arm: the ceiling the service's latency is measured against."""
    import torch

    from perfusion.models.adaptive import personalized_noise_prediction
    from perfusion.sampling import model_timesteps
    from perfusion.user_features import USER_DIM

    model_config = generator.config
    timesteps = model_timesteps(generator.sampler, model_config)
    guidance_rows = 2 if generator.sampler.guidance_scale != 1.0 else 1
    rows_of = {"base": guidance_rows * config.k, "personalized": guidance_rows * config.k}
    rows_of["best_of_n"] = guidance_rows * config.best_of_n
    adaptive = generator._active.network  # the published version the personalized requests ran on

    def group(arm: str) -> None:
        rows = rows_of[arm]
        shape = (rows, model_config.channels, model_config.sample_size, model_config.sample_size)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(config.seed))
        states = torch.randn(rows, model_config.text_max_length, model_config.cross_attention_dim)
        users = torch.rand(rows, USER_DIM)
        with torch.no_grad():
            for timestep in timesteps:
                t = torch.full((rows,), timestep, dtype=torch.long)
                if arm == "base":
                    personalized_noise_prediction(generator.unet, None, x, t, states, None)
                else:
                    personalized_noise_prediction(generator.unet, adaptive, x, t, states, users)

    samples: dict[str, list[float]] = {arm: [] for arm in rows_of}
    for repeat in range(config.warmup + config.repeats):
        for arm in samples:  # alternately, as the requests
            started = time.perf_counter()
            group(arm)
            if repeat >= config.warmup:
                samples[arm].append(time.perf_counter() - started)
    floor = {arm: statistics.median(values) for arm, values in samples.items()}
    return {
        "floor_seconds": floor,
        "floor_forwards": {"count": len(timesteps), "rows": rows_of["base"], "rows_best_of_n": rows_of["best_of_n"]},
        "latency_over_floor": {arm: latencies[arm]["median"] / floor[arm] for arm in floor},
        "floor_personalized_over_base": floor["personalized"] / floor["base"],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServeBenchConfig()
    for name in ("k", "best_of_n", "steps", "repeats", "warmup", "publishes", "seed"):
        help_text = ServeBenchConfig.model_fields[name].description
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=int, default=getattr(defaults, name), help=help_text)
    for name in ("guidance", "poll"):
        help_text = ServeBenchConfig.model_fields[name].description
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name), help=help_text)
    parser.add_argument("--base", type=Path, default=None, help="base checkpoint folder (default: assets/base)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ops.cpu_threads import prefer_passive_openmp

    prefer_passive_openmp()  # as perfusion serve does, before torch
    config = ServeBenchConfig(
        k=args.k,
        best_of_n=args.best_of_n,
        steps=args.steps,
        guidance=args.guidance,
        repeats=args.repeats,
        warmup=args.warmup,
        publishes=args.publishes,
        poll=args.poll,
        base=args.base,
        seed=args.seed,
    )
    return run_serve_benchmark(config)


def summary(report: dict[str, Any]) -> str:
    latency, publish = report["candidates_latency_seconds"], report["publish_to_serve_seconds"]
    feast, config = report["feast_read_seconds"], report["config"]
    floor, forwards, best_of = report["floor_seconds"], report["forwards"], report["best_of_n"]
    targets = [
        f"  target {name}: {target['target']} -> {target['measured']} {'met' if target['met'] else 'MISSED'}"
        for name, target in report["targets"].items()
    ]
    return "\n".join(
        [
            f"serve benchmark: K={config['k']}, {report['sampler']}, {report['torch_threads']} torch threads on "
            f"{report['device']}",
            f"  candidates  base {latency['base']['median'] * 1000:8.1f} ms, personalized "
            f"{latency['personalized']['median'] * 1000:8.1f} ms (median); ratio "
            f"{report['personalized_over_base']:.2f} (target <= {report['target_personalized_over_base']})",
            f"  best-of-{best_of['n']} {latency['best_of_n']['median'] * 1000:8.1f} ms (median), "
            f"{best_of['over_personalized']:.2f}x the K-only personalized group"
            + ("" if best_of["ranked"] else " (NOT RANKED: drawn as K)"),
            f"  forwards    base {forwards['base']['count']} of {forwards['base']['rows']} rows, personalized "
            f"{forwards['personalized']['count']} of {forwards['personalized']['rows']} rows, best-of-N "
            f"{forwards['best_of_n']['count']} of {forwards['best_of_n']['rows']} rows a group",
            f"  floor       base {floor['base'] * 1000:8.1f} ms, personalized {floor['personalized'] * 1000:8.1f} ms, "
            f"best-of-N {floor['best_of_n'] * 1000:8.1f} ms (the forward passes alone); latency / floor "
            + ", ".join(f"{arm} {value:.2f}" for arm, value in report["latency_over_floor"].items()),
            *targets,
            f"  publish ->  swapped in {publish['swap']['median'] * 1000:.1f} ms (median, target < "
            f"{report['target_swap_median_seconds'] * 1000:.0f} ms), first response on it "
            f"{publish['first_response']['median'] * 1000:.1f} ms (median)",
            f"  Feast read  p50 {feast['p50'] * 1000:.2f} ms, p99 {feast['p99'] * 1000:.2f} ms over "
            f"{feast['count']} requests",
            f"  failed requests: {len(report['failed_requests'])}",
        ]
    )
