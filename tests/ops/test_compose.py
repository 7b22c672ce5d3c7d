"""compose.yaml: validated by Docker Compose where a client is installed, and always checked structurally."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.infra.kafka_broker import KAFKA_VERSION
from perfusion.paths import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "compose.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
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
