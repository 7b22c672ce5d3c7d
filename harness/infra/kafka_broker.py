"""A single-node Apache Kafka broker (KRaft mode, combined broker and controller) run as a local JVM process.

``install()`` resolves ``org.apache.kafka:kafka_2.13`` and its runtime dependencies from Maven Central into
``cache_dir()/kafka-<version>/libs`` (once per machine). ``start()`` writes ``server.properties``, formats the
storage on first use, launches ``java kafka.Kafka`` detached and waits until an admin client lists topics.
The state folder (default ``state_dir()/kafka``) holds:

- ``bootstrap``: ``host:port`` of the PLAINTEXT listener, read by the worker, the CLI and :func:`bootstrap_servers`
- ``pid``: the JVM's pid; ``stop()`` signals it only when that pid's command line names this folder's config
- ``server.log`` (the broker's log4j output), ``jvm.log`` (stdout/stderr), ``data/`` (the log dirs)
"""

from __future__ import annotations

import base64
import importlib.resources
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from harness.infra.process import (
    LocalServer,
    ServerStatus,
    free_port,
    is_owned_process,
    log_tail,
    port_is_free,
    read_pid,
    require_binary,
    start_detached,
    write_atomically,
)
from perfusion.errors import InfrastructureError
from perfusion.paths import cache_dir
from perfusion.server_files import KAFKA_BOOTSTRAP_ENV, kafka_bootstrap_servers, kafka_state_dir
from perfusion.settings import Settings

logger = logging.getLogger(__name__)

KAFKA_VERSION = "4.4.0"
BOOTSTRAP_ENV = KAFKA_BOOTSTRAP_ENV
_INSTALLED_MARKER = ".installed"


default_kafka_state_dir = kafka_state_dir


class KafkaBrokerConfig(Settings):
    """Where and how the local broker runs. Ports of 0 mean: reuse the last ones if free, else pick free ones.

    :meth:`from_env` reads ``PERFUSION_BROKER_<FIELD>`` (``PERFUSION_STATE_DIR`` is the whole state folder's).
    """

    model_config = SettingsConfigDict(env_prefix="PERFUSION_BROKER_")

    version: str = Field(default=KAFKA_VERSION, description="Apache Kafka release resolved from Maven")
    host: str = Field(default="127.0.0.1", description="address both listeners bind to")
    port: int = Field(default=0, ge=0, le=65535, description="PLAINTEXT (client) port; 0 picks one")
    controller_port: int = Field(default=0, ge=0, le=65535, description="KRaft CONTROLLER port; 0 picks one")
    state_dir: Path = Field(default_factory=default_kafka_state_dir, description="config, data, logs, pid")
    heap: str = Field(default="512m", description="JVM -Xmx")
    num_partitions: int = Field(default=4, ge=1, description="partitions of auto-created topics")
    start_timeout_s: float = Field(default=120.0, description="seconds to wait for the broker to answer")
    quick_jit: bool = Field(
        default=True,
        description="C1 JIT only (-XX:TieredStopAtLevel=1): starts in about half the time on 2 cores, "
        "lower peak throughput; turn off for load tests",
    )

    @property
    def libs_dir(self) -> Path:
        return cache_dir() / f"kafka-{self.version}" / "libs"


class KafkaBroker(LocalServer):
    """Install, start, stop and inspect the project's local Kafka broker; usable as a context manager."""

    name = "kafka"

    def __init__(self, config: KafkaBrokerConfig | None = None) -> None:
        super().__init__()
        self.config = config or KafkaBrokerConfig()
        self._archive_classes_to: Path | None = None

    # -- files under the state folder -------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def properties_file(self) -> Path:
        return self.state_dir / "server.properties"

    @property
    def marker_file(self) -> Path:
        return self.properties_file

    @property
    def bootstrap_file(self) -> Path:
        return self.state_dir / "bootstrap"

    @property
    def address_file(self) -> Path:
        return self.bootstrap_file

    @property
    def server_log(self) -> Path:
        return self.state_dir / "server.log"

    @property
    def jvm_log(self) -> Path:
        return self.state_dir / "jvm.log"

    # -- install ----------------------------------------------------------------------------------------------
    def install(self) -> Path:
        """Resolve the broker's jars and build its class archive in the machine cache (no-op when present).

        Returns the libs folder.
        """
        libs = self._resolve_jars()
        if not self._class_archive().exists():
            self._build_class_archive()
        return libs

    def _resolve_jars(self) -> Path:
        libs = self.config.libs_dir
        if self._jars_present():
            return libs
        require_binary("java", "openjdk-17-jre-headless")
        mvn = require_binary("mvn", "maven")
        version_dir = libs.parent
        version_dir.mkdir(parents=True, exist_ok=True)
        # Per-process staging: two sessions installing at once on a fresh machine must not share a folder.
        staging = version_dir / f"libs.{os.getpid()}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        pom = importlib.resources.files("harness.infra") / "kafka-pom.xml"
        with importlib.resources.as_file(pom) as pom_path:
            command = [
                mvn,
                "-B",
                "-q",
                "-f",
                str(pom_path),
                f"-Dkafka.version={self.config.version}",
                f"-Dmaven.repo.local={cache_dir() / 'maven-repository'}",
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
            ]
            logger.info("resolving Apache Kafka %s from Maven Central into %s", self.config.version, libs)
            result = subprocess.run(command, capture_output=True, text=True, cwd=version_dir)
        if result.returncode != 0 or not any(staging.glob(f"kafka_2.13-{self.config.version}.jar")):
            output = (result.stdout + result.stderr).strip()[-2000:]
            raise InfrastructureError(
                f"could not resolve org.apache.kafka:kafka_2.13:{self.config.version} with Maven "
                f"(exit {result.returncode}); check that Maven Central is reachable and the version exists.\n{output}"
            )
        (staging / _INSTALLED_MARKER).write_text(self.config.version + "\n")
        if self._jars_present():  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
            return libs
        shutil.rmtree(libs, ignore_errors=True)
        staging.replace(libs)
        return libs

    def _jars_present(self) -> bool:
        libs = self.config.libs_dir
        return (libs / _INSTALLED_MARKER).exists() and (libs / f"kafka_2.13-{self.config.version}.jar").exists()

    def _class_archive(self) -> Path:
        """The JVM class-data-sharing archive of the broker's classes, one per Kafka version and java binary.

        Loading the broker's classes from it instead of from 45 jars takes about a third off the start time.
        """
        java = Path(require_binary("java", "openjdk-17-jre-headless")).resolve()
        jvm_key = f"{java.stat().st_mtime_ns:x}"
        return self.config.libs_dir.parent / f"classes-{jvm_key}.jsa"

    def _build_class_archive(self) -> None:
        """Start and stop a throwaway broker once with -XX:ArchiveClassesAtExit; optional, so failures only warn."""
        archive = self._class_archive()
        partial = archive.with_name(f"{archive.name}.{os.getpid()}.partial")
        logger.info("building the broker's class archive %s (one throwaway start)", archive)
        with tempfile.TemporaryDirectory(prefix="perfusion-kafka-archive-") as scratch:
            throwaway = KafkaBroker(self.config.with_overrides(state_dir=Path(scratch), port=0, controller_port=0))
            throwaway._archive_classes_to = partial
            try:
                throwaway.start()
                throwaway.stop()
            except InfrastructureError as exc:
                logger.warning("no class archive, the broker starts without it: %s", exc)
                partial.unlink(missing_ok=True)
                return
        if partial.exists():
            partial.replace(archive)

    # -- status -----------------------------------------------------------------------------------------------
    def status(self) -> ServerStatus:
        """Running or stopped; a pid file whose process is gone (or is not this broker) is removed as stale."""
        pid = read_pid(self.pid_file)
        if pid is None:
            return ServerStatus(self.name, running=False, pid=None, address=None)
        if is_owned_process(pid, str(self.properties_file)):
            address = self.bootstrap_file.read_text().strip() if self.bootstrap_file.exists() else None
            return ServerStatus(self.name, running=True, pid=pid, address=address)
        self._remove_runtime_files()
        return ServerStatus(self.name, running=False, pid=pid, address=None, stale_pid=True)

    def bootstrap(self) -> str:
        """``host:port`` of the running broker; raises when it is not running."""
        current = self.status()
        if not current.running or current.address is None:
            raise InfrastructureError(f"the Kafka broker in {self.state_dir} is not running; run `perfusion broker up`")
        return current.address

    # -- start ------------------------------------------------------------------------------------------------
    def _start_unlocked(self) -> ServerStatus:
        current = self.status()
        if current.running:
            return current
        libs = self._resolve_jars() if self._archive_classes_to else self.install()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        port, controller_port = self._choose_ports()
        self._write_config(port, controller_port)
        java = require_binary("java", "openjdk-17-jre-headless")
        classpath = f"{libs}/*"
        self._format_storage(java, classpath)
        command = [java, f"-Xmx{self.config.heap}", "-Xms128m", "-XX:+ExitOnOutOfMemoryError"]
        if self.config.quick_jit:
            command.append("-XX:TieredStopAtLevel=1")
        if self._archive_classes_to is not None:
            command.append(f"-XX:ArchiveClassesAtExit={self._archive_classes_to}")
        elif self._class_archive().exists():
            command.append(f"-XX:SharedArchiveFile={self._class_archive()}")
        command += [
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.state_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.state_dir}",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(self.properties_file),
        ]
        address = f"{self.config.host}:{port}"
        started = time.monotonic()
        self._process = start_detached(command, self.jvm_log)
        write_atomically(self.pid_file, f"{self._process.pid}\n")
        self._started_here = True
        self._wait_until_answering(address)
        write_atomically(self.bootstrap_file, address + "\n")
        logger.info("Kafka %s answered on %s after %.1f s", self.config.version, address, time.monotonic() - started)
        return ServerStatus(self.name, running=True, pid=self._process.pid, address=address)

    def _choose_ports(self) -> tuple[int, int]:
        host = self.config.host
        previous = self._previous_ports()
        port = self.config.port or (previous[0] if previous and port_is_free(host, previous[0]) else free_port(host))
        controller_port = self.config.controller_port
        if not controller_port:
            reuse = previous and previous[1] != port and port_is_free(host, previous[1])
            controller_port = previous[1] if previous and reuse else free_port(host)
            while controller_port == port:
                controller_port = free_port(host)
        for name, value in (("port", port), ("controller_port", controller_port)):
            if not port_is_free(host, value):
                raise InfrastructureError(f"{name} {value} on {host} is in use; choose another or pass 0 to pick one")
        return port, controller_port

    def _previous_ports(self) -> tuple[int, int] | None:
        """The ports of the last run, so that the address stays the same across down/up when possible."""
        if not self.properties_file.exists():
            return None
        values = dict(
            line.split("=", 1)
            for line in self.properties_file.read_text().splitlines()
            if "=" in line and line[0] != "#"
        )
        try:
            port = int(values["advertised.listeners"].rsplit(":", 1)[1])
            controller_port = int(values["controller.quorum.voters"].rsplit(":", 1)[1])
        except (KeyError, ValueError, IndexError):
            return None
        return port, controller_port

    def _write_config(self, port: int, controller_port: int) -> None:
        host = self.config.host
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{host}:{controller_port}",
            "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{host}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self.config.num_partitions),
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            # 50 by default: creating that many on the first consumer group costs seconds on a small machine.
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.retention.hours": "168",
        }
        text = "# Written by harness.infra.kafka_broker on every start.\n"
        text += "".join(f"{key}={value}\n" for key, value in properties.items())
        write_atomically(self.properties_file, text)
        log4j = (
            "status = warn\n"
            "appender.file.type = File\n"
            "appender.file.name = file\n"
            f"appender.file.fileName = {self.server_log}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.file.ref = file\n"
        )
        write_atomically(self.state_dir / "log4j2.properties", log4j)

    def _format_storage(self, java: str, classpath: str) -> None:
        """``kafka-storage format`` on first use; data written by an earlier run is kept."""
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = new_cluster_id()
        command = [java, "-Xmx256m", "-XX:TieredStopAtLevel=1", "-cp", classpath, "kafka.tools.StorageTool", "format"]
        command += ["--cluster-id", cluster_id, "--config", str(self.properties_file)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-2000:]
            raise InfrastructureError(
                f"formatting Kafka storage in {self.data_dir} failed (exit {result.returncode}); delete "
                f"{self.data_dir} and retry, or {self.config.libs_dir.parent} and run `perfusion broker install` "
                f"when the jars are damaged.\n{output}"
            )

    def _wait_until_answering(self, address: str) -> None:
        # The probe's connection attempts are expected to fail a few times; keep kafka-python's INFO chatter out.
        kafka_logger = logging.getLogger("kafka")
        previous_level = kafka_logger.level
        kafka_logger.setLevel(max(previous_level, logging.WARNING))
        try:
            self._probe_until_answering(address)
        finally:
            kafka_logger.setLevel(previous_level)

    def _probe_until_answering(self, address: str) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + self.config.start_timeout_s
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                self._remove_runtime_files()
                raise InfrastructureError(
                    f"the Kafka broker exited with code {self._process.returncode} while starting.\n"
                    + log_tail(self.jvm_log, self.server_log)
                )
            if not _accepts_connections(address):
                last_error = f"nothing listens on {address} yet"
                # kafka-python's own bootstrap backs off for up to half a minute; probe the port cheaply first.
                time.sleep(0.2)
                continue
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=address, request_timeout_ms=5000, client_id="perfusion-probe"
                )
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except KafkaError as exc:
                last_error = repr(exc)
            time.sleep(0.5)
        self.stop()
        raise InfrastructureError(
            f"the Kafka broker did not answer on {address} within {self.config.start_timeout_s:.0f} s "
            f"(last error: {last_error}); raise start_timeout_s or read the logs.\n"
            + log_tail(self.jvm_log, self.server_log)
        )

    # -- stop -------------------------------------------------------------------------------------------------


def new_cluster_id() -> str:
    """A random KRaft cluster id: 16 bytes in URL-safe base64 without padding, as ``kafka-storage random-uuid``
    prints it. Like Kafka's Uuid.randomUuid it never starts with '-', which the tool's parser would take for an
    option (one id in 64 did, and the broker's first start then failed)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _accepts_connections(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


bootstrap_servers = kafka_bootstrap_servers  # the one discovery, shared with processes that never start a broker
