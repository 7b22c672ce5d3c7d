"""A local Redis server (Debian's ``redis-server``) for Feast's Redis online store.

``start()`` installs ``redis-server`` with apt-get when it is missing and we are root, starts it on a free
loopback port and waits for PING. The state folder (default ``state_dir()/redis``) holds ``redis.conf``,
``data/``, ``redis.log``, ``pid`` and ``url`` (``redis://127.0.0.1:PORT/0``, read by :func:`redis_url`).
"""

from __future__ import annotations

import logging
import socket
import time
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
from perfusion import server_files
from perfusion.errors import InfrastructureError
from perfusion.settings import Settings

logger = logging.getLogger(__name__)

REDIS_URL_ENV = server_files.REDIS_URL_ENV


default_redis_state_dir = server_files.redis_state_dir


class RedisServerConfig(Settings):
    """Where and how the local Redis server runs.

    :meth:`from_env` reads ``PERFUSION_REDIS_<FIELD>`` (``PERFUSION_STATE_DIR`` is the whole state folder's).
    """

    model_config = SettingsConfigDict(env_prefix="PERFUSION_REDIS_")

    host: str = Field(default="127.0.0.1", description="address Redis binds to")
    port: int = Field(default=0, ge=0, le=65535, description="TCP port; 0 picks a free one")
    state_dir: Path = Field(default_factory=default_redis_state_dir, description="config, data, log, pid")
    max_memory: str = Field(default="256mb", description="Redis maxmemory")
    start_timeout_s: float = Field(default=30.0, description="seconds to wait for PING to answer")


class RedisServer(LocalServer):
    """Start, stop and inspect the project's local Redis server; usable as a context manager."""

    name = "redis"
    stop_grace_s = 10.0

    def __init__(self, config: RedisServerConfig | None = None) -> None:
        super().__init__()
        self.config = config or RedisServerConfig()

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def config_file(self) -> Path:
        return self.state_dir / "redis.conf"

    @property
    def marker_file(self) -> Path:
        return self.config_file

    @property
    def url_file(self) -> Path:
        return self.state_dir / "url"

    @property
    def address_file(self) -> Path:
        return self.url_file

    @property
    def log_file(self) -> Path:
        return self.state_dir / "redis.log"

    def status(self) -> ServerStatus:
        """Running or stopped; a pid file whose process is gone (or is not this server) is removed as stale."""
        pid = read_pid(self.pid_file)
        if pid is None:
            return ServerStatus(self.name, running=False, pid=None, address=None)
        if is_owned_process(pid, str(self.config_file)):
            url = self.url_file.read_text().strip() if self.url_file.exists() else None
            return ServerStatus(self.name, running=True, pid=pid, address=url)
        self._remove_runtime_files()
        return ServerStatus(self.name, running=False, pid=pid, address=None, stale_pid=True)

    def _start_unlocked(self) -> ServerStatus:
        current = self.status()
        if current.running:
            return current
        binary = require_binary("redis-server", "redis-server")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = self.config.port or free_port(self.config.host)
        if not port_is_free(self.config.host, port):
            raise InfrastructureError(f"port {port} on {self.config.host} is in use; choose another or pass 0")
        self._write_config(port)
        # The config path is the only argument, so that status()/stop() can recognise this very process.
        self._process = start_detached([binary, str(self.config_file)], self.log_file)
        write_atomically(self.pid_file, f"{self._process.pid}\n")
        self._started_here = True
        self._wait_for_pong(port)
        url = f"redis://{self.config.host}:{port}/0"
        write_atomically(self.url_file, url + "\n")
        logger.info("Redis answered on %s", url)
        return ServerStatus(self.name, running=True, pid=self._process.pid, address=url)

    def _write_config(self, port: int) -> None:
        lines = {
            "bind": self.config.host,
            "port": str(port),
            "protected-mode": "yes",
            "daemonize": "no",
            # Redis rewrites its argv as a process title by default, which would hide the config path.
            "set-proc-title": "no",
            "dir": str(self.data_dir),
            "logfile": '""',  # log to stdout, which start_detached sends to redis.log
            "save": "60 1000",
            "appendonly": "no",
            "maxmemory": self.config.max_memory,
            "maxmemory-policy": "noeviction",
        }
        text = "# Written by harness.infra.redis_server on every start.\n"
        text += "".join(f"{key} {value}\n" for key, value in lines.items())
        write_atomically(self.config_file, text)

    def _wait_for_pong(self, port: int) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                self._remove_runtime_files()
                raise InfrastructureError(
                    f"redis-server exited with code {self._process.returncode} while starting.\n"
                    + log_tail(self.log_file)
                )
            try:
                if _ping(self.config.host, port):
                    return
                last_error = "unexpected reply to PING"
            except OSError as exc:
                last_error = repr(exc)
            time.sleep(0.1)
        self.stop()
        raise InfrastructureError(
            f"redis-server did not answer PING on {self.config.host}:{port} within {self.config.start_timeout_s:.0f} s"
            f" (last error: {last_error}).\n" + log_tail(self.log_file)
        )


def _ping(host: str, port: int) -> bool:
    """One RESP PING over a plain socket, so that starting needs no Redis client library."""
    with socket.create_connection((host, port), timeout=1.0) as connection:
        connection.sendall(b"*1\r\n$4\r\nPING\r\n")
        return connection.recv(64).startswith(b"+PONG")


redis_url = server_files.redis_url  # the one discovery, shared with processes that never start Redis
