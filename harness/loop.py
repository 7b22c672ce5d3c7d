"""The loop harness: where one run of the loop lives, the broker it talks to, and its processes.

A run of the loop is a :class:`LoopPlace`: a broker address, a state folder (Faust data, the Feast registry and
stores, published models, images, logs) and a topic prefix. Every process of the run gets the place through its
environment (:meth:`LoopPlace.environment`), so two runs on one machine (two evaluation arms, a test and the demo)
never share state. :func:`running_broker` gives a broker's address, starting the project's own when none is
configured; :func:`loop_process` runs one ``perfusion`` command (worker, trainer, service) for the length of a
``with`` block, and :class:`harness.processes.ProcessSupervisor` runs several and watches them.

The demo, the streams benchmark, the evaluation and the integration tests all start the loop through here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.processes import ProcessSupervisor, SupervisedProcess
from perfusion.errors import InfrastructureError
from perfusion.feature_store import FeatureStoreSettings
from perfusion.paths import REPO_ROOT
from perfusion.server_files import KAFKA_BOOTSTRAP_ENV

log = logging.getLogger(__name__)

CLI_MODULE = "ops"
"""``python -m ops <command>`` is the ``perfusion`` console script, run with this virtualenv's interpreter."""


def cli_arguments(command: str, *flags: str) -> list[str]:
    """The interpreter's arguments that run ``perfusion <command> <flags>``."""
    return ["-m", CLI_MODULE, command, *flags]


@dataclass(frozen=True)
class LoopPlace:
    """Where one run of the loop keeps its state and finds its broker, passed to every process explicitly."""

    bootstrap: str
    state_dir: Path
    topic_prefix: str = ""
    partitions: int | None = None
    feast_dir: Path | None = None
    online_store: str | None = None  # sqlite or redis; None: as the environment says (sqlite by default)
    extra_environment: Mapping[str, str] = field(default_factory=dict)

    @property
    def resolved_feast_dir(self) -> Path:
        return self.feast_dir if self.feast_dir is not None else self.state_dir / "feast"

    def feature_store(self) -> FeatureStoreSettings:
        """The settings of the place's Feast store, for what this process itself opens there (its processes get
        the same through their environment); an online store the place leaves open is as the environment says."""
        return FeatureStoreSettings.from_env(feast_dir=self.resolved_feast_dir, online_store=self.online_store)

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with the place's variables set."""
        inherited = dict(os.environ if base is None else base)
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), inherited.get("PYTHONPATH", "")]))
        place = {
            "PYTHONPATH": python_path,
            "PERFUSION_STATE_DIR": str(self.state_dir),
            "PERFUSION_FEAST_DIR": str(self.resolved_feast_dir),
            KAFKA_BOOTSTRAP_ENV: self.bootstrap,
            "PERFUSION_TOPIC_PREFIX": self.topic_prefix,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "FEAST_USAGE": "False",
            "PYTHONUNBUFFERED": "1",
        }
        if self.online_store is not None:
            place["PERFUSION_ONLINE_STORE"] = self.online_store
        if self.partitions is not None:
            place["PERFUSION_PARTITIONS"] = str(self.partitions)
        return {**inherited, **place, **self.extra_environment}


@contextlib.contextmanager
def process_environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables of this process for the block, and restore them afterwards (for what this process
    itself reads of a place from the environment; Feast needs none: :meth:`LoopPlace.feature_store`)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def loop_process(
    place: LoopPlace,
    name: str,
    arguments: Sequence[str],
    log_dir: Path,
    stop_grace_s: float = 30.0,
    environment: Mapping[str, str] | None = None,
) -> Iterator[SupervisedProcess]:
    """Run ``python <arguments>`` (see :func:`cli_arguments`) in ``place`` until the block ends; then SIGTERM, and
    SIGKILL after ``stop_grace_s``. Its output goes to ``<log_dir>/<name>.log``."""
    env = place.environment(environment)
    with ProcessSupervisor(log_dir, env, stop_grace_s=stop_grace_s) as supervisor:
        supervised = supervisor.start(name, arguments)
        yield supervised
    if supervised.process.returncode not in (0, -signal.SIGTERM):
        log.warning(
            "the %s exited with %s; its log %s ends with:\n%s",
            name,
            supervised.process.returncode,
            supervised.log_path,
            supervised.log_tail(),
        )


@contextlib.contextmanager
def running_broker(announce: Callable[[str], None] | None = None, keep_running: bool = False) -> Iterator[str]:
    """A broker's ``host:port``: ``KAFKA_BOOTSTRAP_SERVERS`` when set; else the project's broker, started here
    when it is not running and stopped again at the end of the block, unless ``keep_running`` (then it stays up as
    after ``perfusion broker up``, for commands that may be using it by then)."""
    configured = os.environ.get(KAFKA_BOOTSTRAP_ENV, "").strip()
    if configured:
        yield configured
        return
    from harness.infra.kafka_broker import KafkaBroker

    broker = KafkaBroker()
    was_running = broker.status().running
    started = time.monotonic()
    address = broker.start().address
    if address is None:
        raise InfrastructureError(f"the Kafka broker in {broker.state_dir} started without an address")
    if not was_running and announce is not None:
        announce(f"started Kafka in {time.monotonic() - started:.1f} s")
    try:
        yield address
    finally:
        if not was_running and not keep_running:
            broker.stop()
            if announce is not None:
                announce("stopped Kafka")
