"""The worker against the real broker: events produced with kafka-python, the worker run as `perfusion worker`,
Feast's online values checked against a batch recomputation from the same events, malformed events found in the
dead-letter topic with their reasons; the worker's health, readiness and metrics endpoints and its JSON logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from perfusion.contracts.records import DeadLetter
from perfusion.contracts.topics import TopicNames, ensure_topics
from perfusion.paths import REPO_ROOT
from simulator.traffic import TrafficConfig, TrafficSimulator, encode, produce_events
from streams.dead_letters import original_bytes
from streams.settings import StreamSettings
from tests.streams.test_preferences_agent import assert_features_close, reference_features

WAIT_S = 240.0
VALID_CLICK = {
    "kind": "click", "event_id": "bad-0", "ts": 0.0, "user_id": "shopper-0", "impression_id": "i", "design_id": "d",
    "image_id": "x",
}  # fmt: skip


def malformed_messages(now: float) -> dict[str, bytes]:
    """Reason fragment -> message, one per kind of malformation."""
    click = {**VALID_CLICK, "ts": now - 60}
    return {
        "not JSON": b"{this is not json",
        "impression_id: Field required": json.dumps({k: v for k, v in click.items() if k != "impression_id"}).encode(),
        "ts: Input should be a valid number": json.dumps({**click, "event_id": "bad-2", "ts": "noon"}).encode(),
        "unknown schema_version 7": json.dumps({**click, "event_id": "bad-3", "schema_version": 7}).encode(),
        "in the future": json.dumps({**click, "event_id": "bad-4", "ts": now + 30 * 86_400}).encode(),
    }


@pytest.fixture
def worker_env(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PERFUSION_FEAST_DIR", str(tmp_path / "state" / "feast"))
    monkeypatch.setenv("PERFUSION_ONLINE_STORE", "sqlite")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("PERFUSION_TOPIC_PREFIX", topic_prefix)
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "FEAST_USAGE": "False"}


@pytest.fixture
def running_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    from harness.loop import LoopPlace, cli_arguments, loop_process
    from perfusion.feature_store import apply_feature_repo

    apply_feature_repo()  # before the worker starts: it opens the Feast store before consuming
    place = LoopPlace(
        worker_env["KAFKA_BOOTSTRAP_SERVERS"],
        state_dir=Path(worker_env["PERFUSION_STATE_DIR"]),
        topic_prefix=worker_env["PERFUSION_TOPIC_PREFIX"],
        feast_dir=Path(worker_env["PERFUSION_FEAST_DIR"]),
        online_store="sqlite",
    )
    with loop_process(
        place, "worker", cli_arguments("worker"), tmp_path, stop_grace_s=60.0, environment=worker_env
    ) as worker:
        yield worker.process
    print((tmp_path / "worker.log").read_text(errors="replace")[-4000:])


def read_dead_letters(bootstrap: str, topic: str, expected: int, deadline: float) -> list[DeadLetter]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    letters: list[DeadLetter] = []
    try:
        while len(letters) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                letters.extend(DeadLetter.model_validate_json(record.value) for record in records)
    finally:
        consumer.close()
    return letters


def online_features(user_ids: list[str], now: float) -> dict[str, dict[str, Any]]:
    """The online rows as of ``now`` (windowed counts read 0 once their window has passed ``now``)."""
    from perfusion.feature_store import open_feature_store, read_online_features

    rows = read_online_features(open_feature_store(), "user_preferences", user_ids, now=now)
    return {row["user_id"]: row for row in rows}


def test_worker_pushes_exact_features_to_feast_and_dead_letters_malformed_events(
    kafka_bootstrap: str, worker_env: dict[str, str], running_worker: subprocess.Popen[bytes]
) -> None:
    settings = StreamSettings.from_env()
    names = TopicNames.for_prefix(settings.topic_prefix)
    ensure_topics(kafka_bootstrap, names, settings.partitions)

    now = time.time()
    events = TrafficSimulator(TrafficConfig(seed=11, start_ts=now - 3 * 3600, mean_gap_s=40.0)).events(300)
    duplicates = events[:40]
    malformed = malformed_messages(now)
    messages = [encode(e) for e in events[:150]]
    messages += [(b"shopper-0", raw) for raw in malformed.values()]
    messages += [encode(e) for e in events[150:] + duplicates]
    assert produce_events(messages, kafka_bootstrap, names.events) == len(messages)

    expected = reference_features(events, settings)
    deadline = time.monotonic() + WAIT_S
    actual: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        assert running_worker.poll() is None, "the worker exited"
        # Read as of the first event: the exact values the worker pushed, before any window has passed (the
        # log spans hours, so at the wall clock the 1 h counts of users idle since have aged to 0).
        actual = online_features(sorted(expected), now=events[0].ts)
        if all(actual[u]["last_active_ts"] == pytest.approx(expected[u]["last_active_ts"]) for u in expected):
            break
        time.sleep(2.0)
    for user_id, row in expected.items():
        assert actual[user_id]["last_active_ts"] is not None, f"no features for {user_id}"
        assert_features_close(actual[user_id], row, tolerance=1e-5)  # float32 in Feast

    letters = read_dead_letters(kafka_bootstrap, names.dead_letters, len(malformed), deadline)
    assert len(letters) == len(malformed)
    by_original = {original_bytes(letter): letter for letter in letters}
    for reason_fragment, raw in malformed.items():
        letter = by_original[raw]
        assert reason_fragment in letter.reason
        assert letter.topic == names.events
    assert running_worker.poll() is None, "the worker must keep running after malformed events"


def json_lines(text: str) -> list[dict[str, Any]]:
    """The lines of a log that are JSON objects (Faust and the interpreter may print others)."""
    parsed = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            parsed.append(value)
    return parsed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_get(url: str) -> tuple[int, bytes]:
    """Status and body of a GET; (0, b"") while nothing answers on the port yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(url)
    assert status == 200, f"{url} answered {status}"
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def sample_value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def worker_with_endpoints(worker_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A `perfusion worker` with its HTTP endpoints on a free port, and their base URL."""
    from harness.loop import LoopPlace, cli_arguments, loop_process
    from perfusion.feature_store import apply_feature_repo

    apply_feature_repo()
    port = free_port()
    place = LoopPlace(
        worker_env["KAFKA_BOOTSTRAP_SERVERS"],
        state_dir=Path(worker_env["PERFUSION_STATE_DIR"]),
        topic_prefix=worker_env["PERFUSION_TOPIC_PREFIX"],
        feast_dir=Path(worker_env["PERFUSION_FEAST_DIR"]),
        online_store="sqlite",
    )
    environment = {**worker_env, "PERFUSION_HTTP_PORT": str(port), "PERFUSION_JSON_LOGS": "true"}
    with loop_process(
        place, "worker", cli_arguments("worker"), tmp_path, stop_grace_s=60.0, environment=environment
    ) as worker:
        yield worker.process, f"http://127.0.0.1:{port}"
    print((tmp_path / "worker.log").read_text(errors="replace")[-4000:])


def test_worker_answers_health_and_readiness_and_its_metrics_count_events_and_dead_letters(
    kafka_bootstrap: str, worker_with_endpoints: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    worker, base_url = worker_with_endpoints
    settings = StreamSettings.from_env()
    names = TopicNames.for_prefix(settings.topic_prefix)
    ensure_topics(kafka_bootstrap, names, settings.partitions)

    deadline = time.monotonic() + WAIT_S
    ready_status, ready_body = 0, b""
    while time.monotonic() < deadline and ready_status != 200:
        assert worker.poll() is None, "the worker exited"
        ready_status, ready_body = http_get(base_url + "/readyz")
        time.sleep(0.5)
    assert ready_status == 200, ready_body
    readiness = json.loads(ready_body)
    assert readiness["ready"] is True and readiness["assigned_partitions"] > 0
    health_status, health_body = http_get(base_url + "/healthz")
    assert health_status == 200 and json.loads(health_body)["status"] == "ok"

    now = time.time()
    events = TrafficSimulator(TrafficConfig(seed=5, start_ts=now - 3 * 3600, mean_gap_s=60.0)).events(60)
    messages = (
        [encode(e) for e in events[:30]] + [(b"shopper-0", b"{this is not json")] + [encode(e) for e in events[30:]]
    )
    assert produce_events(messages, kafka_bootstrap, names.events) == len(messages)

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the worker exited"
        samples = scrape(base_url + "/metrics")
        lags = [value for (name, _), value in samples.items() if name == "perfusion_worker_consumer_lag"]
        folded = sample_value(samples, "perfusion_worker_events_total", outcome="folded")
        if folded >= len(events) and lags and not any(lags):
            break
        time.sleep(1.0)
    assert sample_value(samples, "perfusion_worker_events_total", outcome="folded") == len(events)
    assert sample_value(samples, "perfusion_worker_events_total", outcome="dead_letter") == 1
    assert sample_value(samples, "perfusion_worker_dead_letters_total", topic=names.events, reason="not JSON") == 1
    lag_partitions = {
        dict(labels)["partition"]
        for (name, labels), _ in samples.items()
        if name == "perfusion_worker_consumer_lag" and dict(labels)["topic"] == names.events
    }
    assert lag_partitions == {str(p) for p in range(settings.partitions)}  # one worker owns every partition
    assert sample_value(samples, "perfusion_worker_feast_push_seconds_count") >= 1
    assert sample_value(samples, "perfusion_worker_feast_push_rows_total") >= 1

    # JSON logs: the dead letter's line names where the message was read.
    lines = json_lines((tmp_path / "worker.log").read_text(errors="replace"))
    dead_lettered = [line for line in lines if line["message"].startswith("dead-lettering invalid event")]
    assert len(dead_lettered) == 1
    [letter] = read_dead_letters(kafka_bootstrap, names.dead_letters, 1, deadline)
    position = {key: dead_lettered[0][key] for key in ("topic", "partition", "offset")}
    assert position == {"topic": letter.topic, "partition": letter.partition, "offset": letter.offset}
    assert dead_lettered[0]["level"] == "WARNING"
