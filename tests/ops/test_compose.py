"""compose.yaml: validated by Docker Compose where a client is installed, and always checked structurally; the
monitoring it runs (Prometheus scraping the processes where they serve /metrics, Grafana provisioned with the
dashboard of ops/grafana/) checked against compose's ports and the metrics the code exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.infra.kafka_broker import KAFKA_VERSION
from perfusion.paths import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "compose.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
MONITORING_DIR = REPO_ROOT / "ops" / "grafana"
PROMETHEUS_CONFIG = MONITORING_DIR / "prometheus.yml"
DASHBOARD = MONITORING_DIR / "perfusion-dashboard.json"
METRIC_NAME = re.compile(r"\bperfusion_[a-z0-9_]+\b")
APP_SERVICES = {"worker": ["perfusion", "worker"], "trainer": ["perfusion", "train"]}


def compose_clients() -> list[list[str]]:
    """Compose clients on this machine: the docker CLI plugin (v2) and the standalone docker-compose."""
    clients = []
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        clients.append([docker, "compose"])
    standalone = shutil.which("docker-compose")
    if standalone:
        clients.append([standalone])
    return clients


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def test_docker_compose_config_accepts_the_file() -> None:
    clients = compose_clients()
    if not clients:
        pytest.skip("no Docker Compose client on this machine; the structural tests below still check the file")
    for client in clients:
        # `config` parses, interpolates and validates against the schema; it needs no running engine.
        result = subprocess.run(
            [*client, "-f", str(COMPOSE_FILE), "config", "--quiet"], capture_output=True, text=True, cwd=REPO_ROOT
        )
        assert result.returncode == 0, f"{' '.join(client)} config rejected compose.yaml:\n{result.stderr}"


def test_every_part_of_the_loop_is_a_service(services: dict[str, dict[str, Any]]) -> None:
    assert {"kafka", "redis", "worker", "trainer", "generator"} <= set(services)


def test_kafka_is_the_official_image_in_kraft_mode(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    environment = kafka["environment"]
    assert environment["KAFKA_PROCESS_ROLES"] == "broker,controller"
    voter_id, voter_address = environment["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert int(voter_id) == environment["KAFKA_NODE_ID"]
    assert voter_address.startswith("kafka:")
    assert "CONTROLLER" in environment["KAFKA_LISTENERS"]
    assert "PLAINTEXT://kafka:9092" in environment["KAFKA_ADVERTISED_LISTENERS"]
    assert environment["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert "29092:29092" in kafka["ports"]
    assert "healthcheck" in kafka


def test_redis_is_reachable_and_checked(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert "6379:6379" in redis["ports"]
    assert redis["healthcheck"]["test"][-1] == "ping"


@pytest.mark.parametrize("name", ["worker", "trainer", "generator"])
def test_app_services_build_the_image_and_reach_kafka_and_redis(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    assert service["build"]["dockerfile"] == "Dockerfile"
    environment = service["environment"]
    assert environment["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert environment["PERFUSION_ONLINE_STORE"] == "redis"
    assert environment["REDIS_URL"].startswith("redis://redis:6379")
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert any(volume.endswith(":" + environment["PERFUSION_STATE_DIR"]) for volume in service["volumes"])


def test_app_service_commands(services: dict[str, dict[str, Any]]) -> None:
    for name, command in APP_SERVICES.items():
        assert services[name]["command"] == command
    generator = services["generator"]
    assert generator["command"][:2] == ["perfusion", "serve"]
    assert generator["command"][generator["command"].index("--port") + 1] == "8000"
    assert "8000:8000" in generator["ports"]


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes") or {})
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"volume {source!r} is used but not declared under volumes:"


def test_dockerfile_installs_the_lock_and_the_console_script() -> None:
    text = DOCKERFILE.read_text()
    assert text.startswith("#") and "\nFROM python:3.11" in text
    assert "pip install -r requirements.lock" in text
    assert "pip install --no-deps -e ." in text
    assert (REPO_ROOT / "requirements.lock").exists()
    assert Path(REPO_ROOT / "pyproject.toml").read_text().count('perfusion = "ops.cli:main"') == 1


def mounted_file(service: dict[str, Any], target: str) -> Path:
    """The repository file that ``service`` mounts at ``target``."""
    for volume in service["volumes"]:
        source, mounted, *_ = volume.split(":")
        if mounted == target:
            return REPO_ROOT / source
    raise AssertionError(f"nothing is mounted at {target}")


def scrape_targets() -> dict[str, list[str]]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return {
        job["job_name"]: [target for group in job["static_configs"] for target in group["targets"]]
        for job in config["scrape_configs"]
    }


def test_prometheus_scrapes_the_generator_the_worker_and_the_trainer_where_they_serve_metrics(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    assert mounted_file(prometheus, "/etc/prometheus/prometheus.yml") == PROMETHEUS_CONFIG
    generator_port = services["generator"]["command"][services["generator"]["command"].index("--port") + 1]
    worker, trainer = services["worker"]["environment"], services["trainer"]["environment"]
    assert worker["PERFUSION_HTTP_HOST"] == "0.0.0.0" and trainer["PERFUSION_METRICS_HOST"] == "0.0.0.0"
    assert scrape_targets() == {
        "generator": [f"generator:{generator_port}"],
        "worker": [f"worker:{worker['PERFUSION_HTTP_PORT']}"],
        "trainer": [f"trainer:{trainer['PERFUSION_METRICS_PORT']}"],
    }
    assert str(worker["PERFUSION_HTTP_PORT"]) in " ".join(services["worker"]["healthcheck"]["test"])


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    provisioning = mounted_file(grafana, "/etc/grafana/provisioning")
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "perfusion.yaml").read_text())["providers"]
    dashboards_folder = provider["options"]["path"]
    assert mounted_file(grafana, f"{dashboards_folder}/{DASHBOARD.name}") == DASHBOARD
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            assert panel["datasource"]["uid"] == target["datasource"]["uid"] == datasource["uid"], panel["title"]


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]


def exported_families() -> dict[str, dict[str, str]]:
    """Process -> metric family -> type, read from the metric objects of the worker, the trainer and the service."""
    from service.metrics import ServiceMetrics
    from streams.metrics import WorkerMetrics
    from trainer.metrics import TrainerMetrics

    service = ServiceMetrics()
    service.follow_counts_of(lambda: [])
    registries = {
        "worker": WorkerMetrics().registry,
        "trainer": TrainerMetrics().registry,
        "generator": service.registry,
    }
    return {
        process: {family.name: family.type for family in registry.collect()} for process, registry in registries.items()
    }


SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_sample_names(families: dict[str, str]) -> set[str]:
    return {name + suffix for name, kind in families.items() for suffix in SAMPLE_SUFFIXES[kind]}


def test_every_metric_the_dashboard_queries_is_one_the_code_exports() -> None:
    exported = set().union(*(exported_sample_names(families) for families in exported_families().values()))
    queries = dashboard_queries()
    assert queries
    used = {name for query in queries for name in METRIC_NAME.findall(query)}
    assert used, "the dashboard queries no perfusion metric"
    assert used <= exported, f"queried but exported by no process: {sorted(used - exported)}"


def test_every_metric_of_the_worker_and_the_trainer_is_on_the_dashboard() -> None:
    used = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    families = exported_families()
    for process in ("worker", "trainer"):
        for name, kind in families[process].items():
            samples = exported_sample_names({name: kind})
            assert samples & used, f"the {process}'s {name} is on no panel of {DASHBOARD.name}"
