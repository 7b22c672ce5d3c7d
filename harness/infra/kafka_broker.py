"""A single-node Apache Kafka broker (KRaft mode, combined broker and controller) run as a local JVM process.

``install()`` resolves ``org.apache.kafka:kafka_2.13`` and its runtime dependencies from Maven Central into
``cache_dir()/kafka-<version>/libs`` (once per machine). ``start()`` writes ``server.properties``, formats the
storage on first use, launches ``java kafka.Kafka`` detached and waits until an admin client lists topics.
The state folder (default ``state_dir()/kafka``) holds:

- ``bootstrap``: ``host:port`` of the PLAINTEXT listener, read by the worker, the CLI and :func:`bootstrap_servers`
- ``sasl_bootstrap``: ``host:port`` of the SASL_PLAINTEXT listener, when ``sasl`` is on (below)
- ``pid``: the JVM's pid; ``stop()`` signals it only when that pid's command line names this folder's config
- ``server.log`` (the broker's log4j output), ``jvm.log`` (stdout/stderr), ``data/`` (the log dirs)

With ``sasl`` (``PERFUSION_BROKER_SASL=true``) the broker also listens with SASL_PLAINTEXT on ``sasl_port``, where a
client must authenticate as the configured user (``sasl_username``, ``sasl_password``) with PLAIN, SCRAM-SHA-256 or
SCRAM-SHA-512, as on a managed Kafka: the PLAIN user is in the listener's JAAS config, the SCRAM credentials are
written into the KRaft metadata by ``kafka-storage format --add-scram`` (a state folder formatted before, or a
changed password, gets them through the admin API's AlterUserScramCredentials once the broker answers). The
PLAINTEXT listener stays for the broker itself (inter-broker traffic, the start probe). ``server.properties`` holds
the password and is readable by its owner only.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
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
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
SASL_CREDENTIAL_PATTERN = r"^[A-Za-z0-9._@+-]*$"
"""What a SASL user name or password of the local broker may hold: nothing that JAAS's quoting or the
``[name=...,password=...]`` syntax of ``--add-scram`` would read otherwise."""


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
    sasl: bool = Field(
        default=False,
        description="also listen with SASL_PLAINTEXT (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) on sasl_port",
    )
    sasl_port: int = Field(default=0, ge=0, le=65535, description="SASL_PLAINTEXT port when sasl is on; 0 picks one")
    sasl_username: str = Field(
        default="perfusion",
        min_length=1,
        pattern=SASL_CREDENTIAL_PATTERN,
        description="the user the SASL listener accepts (PLAIN and both SCRAM mechanisms)",
    )
    sasl_password: SecretStr | None = Field(
        default=None, description="that user's password; required with sasl (letters, digits, ._@+-)"
    )

    @model_validator(mode="after")
    def _sasl_password_given(self) -> KafkaBrokerConfig:
        password = self.sasl_password.get_secret_value() if self.sasl_password is not None else ""
        if self.sasl and not password:
            raise ValueError("sasl_password must be set when sasl is on (PERFUSION_BROKER_SASL_PASSWORD)")
        if not re.fullmatch(SASL_CREDENTIAL_PATTERN, password):
            raise ValueError("sasl_password may hold only letters, digits and ._@+- (it is written into JAAS config)")
        return self

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
    def sasl_bootstrap_file(self) -> Path:
        return self.state_dir / "sasl_bootstrap"

    @property
    def _sasl_credentials_file(self) -> Path:
        """A digest of the SCRAM user and password the metadata holds (not the password), to provision them once."""
        return self.state_dir / "sasl_credentials.sha256"

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
            throwaway = KafkaBroker(
                self.config.with_overrides(state_dir=Path(scratch), port=0, controller_port=0, sasl=False)
            )
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

    def _remove_runtime_files(self) -> None:
        super()._remove_runtime_files()
        self.sasl_bootstrap_file.unlink(missing_ok=True)

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

    def sasl_bootstrap(self) -> str:
        """``host:port`` of the running broker's SASL_PLAINTEXT listener; raises when there is none."""
        self.bootstrap()
        if not self.sasl_bootstrap_file.exists():
            raise InfrastructureError(
                f"the Kafka broker in {self.state_dir} has no SASL listener; start it with sasl on "
                "(PERFUSION_BROKER_SASL=true and PERFUSION_BROKER_SASL_PASSWORD)"
            )
        return self.sasl_bootstrap_file.read_text().strip()

    # -- start ------------------------------------------------------------------------------------------------
    def _start_unlocked(self) -> ServerStatus:
        current = self.status()
        if current.running:
            return current
        libs = self._resolve_jars() if self._archive_classes_to else self.install()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        port, controller_port, sasl_port = self._choose_ports()
        self.sasl_bootstrap_file.unlink(missing_ok=True)
        self._write_config(port, controller_port, sasl_port)
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
        if sasl_port:
            self._provision_scram_credentials(address)
            write_atomically(self.sasl_bootstrap_file, f"{self.config.host}:{sasl_port}\n")
        write_atomically(self.bootstrap_file, address + "\n")
        logger.info("Kafka %s answered on %s after %.1f s", self.config.version, address, time.monotonic() - started)
        return ServerStatus(self.name, running=True, pid=self._process.pid, address=address)

    def _choose_ports(self) -> tuple[int, int, int]:
        """The PLAINTEXT, CONTROLLER and SASL_PLAINTEXT ports (the last 0 without sasl): as configured, else the last
        run's when free, else free ones; never two the same."""
        host = self.config.host
        previous = self._previous_ports()
        wanted = {
            "port": self.config.port,
            "controller_port": self.config.controller_port,
            "sasl_port": self.config.sasl_port if self.config.sasl else -1,
        }
        chosen: dict[str, int] = {}
        for name, configured in wanted.items():
            if configured < 0:
                chosen[name] = 0
                continue
            if configured:
                chosen[name] = configured
                continue
            last = previous.get(name)
            if last and last not in chosen.values() and port_is_free(host, last):
                chosen[name] = last
                continue
            candidate = free_port(host)
            while candidate in chosen.values():
                candidate = free_port(host)
            chosen[name] = candidate
        for name, value in chosen.items():
            if value and not port_is_free(host, value):
                raise InfrastructureError(f"{name} {value} on {host} is in use; choose another or pass 0 to pick one")
        return chosen["port"], chosen["controller_port"], chosen["sasl_port"]

    def _previous_ports(self) -> dict[str, int]:
        """The ports of the last run by name, so that the addresses stay the same across down/up when possible."""
        if not self.properties_file.exists():
            return {}
        values = dict(
            line.split("=", 1)
            for line in self.properties_file.read_text().splitlines()
            if "=" in line and line[0] != "#"
        )
        ports: dict[str, int] = {}
        for listener in values.get("advertised.listeners", "").split(","):
            name, _, address = listener.partition("://")
            key = {"PLAINTEXT": "port", "SASL_PLAINTEXT": "sasl_port"}.get(name)
            if key is not None and address.rsplit(":", 1)[-1].isdigit():
                ports[key] = int(address.rsplit(":", 1)[1])
        voters = values.get("controller.quorum.voters", "")
        if voters.rsplit(":", 1)[-1].isdigit():
            ports["controller_port"] = int(voters.rsplit(":", 1)[1])
        return ports

    def _write_config(self, port: int, controller_port: int, sasl_port: int = 0) -> None:
        host = self.config.host
        listeners = f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}"
        advertised = f"PLAINTEXT://{host}:{port}"
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        if sasl_port:
            listeners += f",SASL_PLAINTEXT://{host}:{sasl_port}"
            advertised += f",SASL_PLAINTEXT://{host}:{sasl_port}"
            protocols += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{host}:{controller_port}",
            "listeners": listeners,
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": protocols,
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
            **(self._sasl_properties() if sasl_port else {}),
        }
        text = "# Written by harness.infra.kafka_broker on every start.\n"
        text += "".join(f"{key}={value}\n" for key, value in properties.items())
        write_private(self.properties_file, text)
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

    def _sasl_properties(self) -> dict[str, str]:
        """The SASL_PLAINTEXT listener's mechanisms and JAAS configs: the PLAIN user inline, SCRAM from metadata."""
        user, password = self._sasl_user()
        plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{user}" password="{password}" user_{user}="{password}";'
        )
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        properties = {
            "sasl.enabled.mechanisms": ",".join(("PLAIN", *SCRAM_MECHANISMS)),
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": plain,
        }
        for mechanism in SCRAM_MECHANISMS:
            properties[f"listener.name.sasl_plaintext.{mechanism.lower()}.sasl.jaas.config"] = scram
        return properties

    def _sasl_user(self) -> tuple[str, str]:
        password = self.config.sasl_password
        return self.config.sasl_username, password.get_secret_value() if password is not None else ""

    def _scram_digest(self) -> str:
        user, password = self._sasl_user()
        return hashlib.sha256(f"{user}\0{password}".encode()).hexdigest()

    def _scram_arguments(self) -> list[str]:
        user, password = self._sasl_user()
        return [f"{mechanism}=[name={user},password={password}]" for mechanism in SCRAM_MECHANISMS]

    def _provision_scram_credentials(self, address: str) -> None:
        """Give the SCRAM user its credentials through the running broker's PLAINTEXT listener, unless the metadata
        has them already (written by ``format --add-scram``, or by an earlier call with the same password)."""
        from kafka import KafkaAdminClient
        from kafka.admin import UserScramCredentialUpsertion
        from kafka.errors import KafkaError

        if self._sasl_credentials_file.exists() and self._sasl_credentials_file.read_text().strip() == (
            self._scram_digest()
        ):
            return
        user, password = self._sasl_user()
        try:
            admin = KafkaAdminClient(bootstrap_servers=address, request_timeout_ms=10_000, client_id="perfusion-scram")
            try:
                upserts = [UserScramCredentialUpsertion(user, mechanism, password) for mechanism in SCRAM_MECHANISMS]
                errors = admin.alter_user_scram_credentials(upserts)
            finally:
                admin.close()
        except KafkaError as exc:
            errors = {user: f"{type(exc).__name__}: {exc}"}
        if any(errors.values()):
            raise InfrastructureError(f"giving SASL user {user!r} its SCRAM credentials failed: {errors}")
        write_private(self._sasl_credentials_file, self._scram_digest() + "\n")

    def _format_storage(self, java: str, classpath: str) -> None:
        """``kafka-storage format`` on first use (with the SCRAM credentials when sasl is on); data written by an
        earlier run is kept."""
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = new_cluster_id()
        command = [java, "-Xmx256m", "-XX:TieredStopAtLevel=1", "-cp", classpath, "kafka.tools.StorageTool", "format"]
        command += ["--cluster-id", cluster_id, "--config", str(self.properties_file)]
        if self.config.sasl:
            for credentials in self._scram_arguments():
                command += ["--add-scram", credentials]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-2000:]
            if self.config.sasl:
                output = output.replace(self._sasl_user()[1], "***")
            raise InfrastructureError(
                f"formatting Kafka storage in {self.data_dir} failed (exit {result.returncode}); delete "
                f"{self.data_dir} and retry, or {self.config.libs_dir.parent} and run `perfusion broker install` "
                f"when the jars are damaged.\n{output}"
            )
        if self.config.sasl:
            write_private(self._sasl_credentials_file, self._scram_digest() + "\n")

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


def write_private(path: Path, text: str) -> None:
    """:func:`write_atomically`, readable and writable by the owner only (the file may hold a password)."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    partial.replace(path)


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
