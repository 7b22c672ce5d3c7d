"""The worker's Feast sink: pushes land in the online store from the writer process as from a thread, a writer that
died is replaced and the push retried, and the writer never outlives the worker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from perfusion.feature_store import FeatureStoreSettings, apply_feature_repo, open_feature_store, read_online_features
from streams.feast_sink import FeastSink, FeastWriter
from streams.metrics import WorkerMetrics
from streams.preferences import PreferenceUpdater, UserPreferenceState, feature_row
from streams.settings import StreamSettings

NOW = time.time()


def rows_for(user_ids: list[str], clicks: int) -> list[dict[str, Any]]:
    updater = PreferenceUpdater(StreamSettings())
    rows = []
    for user_id in user_ids:
        state = UserPreferenceState(user_id=user_id, last_active_ts=NOW)
        state.totals["clicks"] = clicks
        rows.append(feature_row(user_id, updater.features(state), NOW))
    return rows


def online_clicks(settings: FeatureStoreSettings, user_ids: list[str]) -> list[Any]:
    store = open_feature_store(settings)
    return [row["clicks_total"] for row in read_online_features(store, "user_preferences", user_ids, now=NOW)]


@pytest.fixture(scope="module")
def feast_settings(tmp_path_factory: pytest.TempPathFactory) -> FeatureStoreSettings:
    settings = FeatureStoreSettings(feast_dir=tmp_path_factory.mktemp("feast") / "store")
    apply_feature_repo(settings)
    return settings


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_push_lands_in_the_online_store(feast_settings: FeatureStoreSettings, writer: FeastWriter) -> None:
    sink = FeastSink(writer=writer, feature_store=feast_settings)
    try:
        writer_pid = sink.open()
        assert (writer_pid != os.getpid()) == (writer == "process")
        users = [f"{writer}-a", f"{writer}-b"]
        asyncio.run(sink(rows_for(users, clicks=3)))
        assert online_clicks(feast_settings, users) == [3, 3]
    finally:
        sink.close()


def test_a_writer_process_that_died_is_replaced_and_the_push_retried(feast_settings: FeatureStoreSettings) -> None:
    metrics = WorkerMetrics()
    sink = FeastSink(metrics, writer="process", feature_store=feast_settings)
    try:
        first_pid = sink.open()
        os.kill(first_pid, signal.SIGKILL)
        psutil.Process(first_pid).wait(timeout=10)
        asyncio.run(sink(rows_for(["revived"], clicks=5)))
        assert online_clicks(feast_settings, ["revived"]) == [5]
        assert (metrics.registry.get_sample_value("perfusion_worker_feast_push_failures_total") or 0) >= 1
        assert sink.open() != first_pid
    finally:
        sink.close()


CHILD_SCRIPT = """
import sys, time
from pathlib import Path
from perfusion.feature_store import FeatureStoreSettings
from streams.feast_sink import FeastSink
if __name__ == "__main__":  # the writer is spawned: it imports this file again
    sink = FeastSink(writer="process", feature_store=FeatureStoreSettings(feast_dir=Path(sys.argv[1])))
    print(sink.open(), flush=True)
    if sys.argv[2] == "wait":
        time.sleep(600)
"""


def start_worker_like(feast_settings: FeatureStoreSettings, tmp_path: Path, then: str) -> tuple[Any, int]:
    """A process that opens a FeastSink and then waits (``then="wait"``) or exits; returns it and its writer's pid."""
    assert feast_settings.feast_dir is not None
    script = tmp_path / "worker_like.py"
    script.write_text(CHILD_SCRIPT)
    parent = subprocess.Popen(
        [sys.executable, str(script), str(feast_settings.feast_dir), then],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert parent.stdout is not None
    return parent, int(parent.stdout.readline())


def test_the_writer_process_dies_with_a_killed_worker(feast_settings: FeatureStoreSettings, tmp_path: Path) -> None:
    parent, writer_pid = start_worker_like(feast_settings, tmp_path, then="wait")
    try:
        writer = psutil.Process(writer_pid)
        assert writer.ppid() == parent.pid
        parent.send_signal(signal.SIGKILL)  # no cleanup runs: only the kernel can end the writer
        parent.wait(timeout=10)
        writer.wait(timeout=10)  # raises psutil.TimeoutExpired if it outlives the worker
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_worker_that_exits_ends_its_writer_and_is_not_held_up_by_it(
    feast_settings: FeatureStoreSettings, tmp_path: Path
) -> None:
    parent, writer_pid = start_worker_like(feast_settings, tmp_path, then="exit")
    try:
        writer = psutil.Process(writer_pid)
        assert parent.wait(timeout=60) == 0  # multiprocessing's exit handler would wait for ever on a live writer
        writer.wait(timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()
