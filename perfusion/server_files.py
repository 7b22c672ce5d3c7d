"""The files a local server (the project's Kafka broker, its Redis) keeps in its state folder, and finding a running
server through them.

A launcher (:mod:`harness.infra`) writes ``<state>/<server>/pid`` and an address file (``bootstrap`` for Kafka, ``url``
for Redis) once the server answers, and removes both when it stops it. Every other process finds the server by
reading those two files: an environment variable first (``KAFKA_BOOTSTRAP_SERVERS``, ``REDIS_URL``), else the
address file of a server whose pid is alive and whose command line names its state folder. Nothing here starts a
server, so the worker, the trainer and the service never import the launchers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from perfusion.errors import InfrastructureError
from perfusion.paths import state_dir

KAFKA_BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
REDIS_URL_ENV = "REDIS_URL"
PID_FILE = "pid"
KAFKA_ADDRESS_FILE = "bootstrap"
REDIS_ADDRESS_FILE = "url"


def kafka_state_dir() -> Path:
    return state_dir() / "kafka"


def redis_state_dir() -> Path:
    return state_dir() / "redis"


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def process_command_line(pid: int) -> list[str] | None:
    """The argv of a live, non-zombie process, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Field 3 of /proc/PID/stat is the state; it follows the parenthesised command name.
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_owned_process(pid: int | None, marker: str) -> bool:
    """True when ``pid`` is alive and ``marker`` (a path only this server's command line holds) is in its argv."""
    if pid is None:
        return False
    argv = process_command_line(pid)
    return argv is not None and any(marker in part for part in argv)


def running_server_address(server_dir: Path, address_file: str) -> str | None:
    """The address a running server of ``server_dir`` wrote, or None when none runs there."""
    address_path = server_dir / address_file
    if not address_path.exists() or not is_owned_process(read_pid(server_dir / PID_FILE), str(server_dir)):
        return None
    address = address_path.read_text().strip()
    return address or None


def kafka_bootstrap_servers() -> str:
    """``KAFKA_BOOTSTRAP_SERVERS`` when set, else the address of the project's running broker."""
    return _configured_or_running(
        KAFKA_BOOTSTRAP_ENV, kafka_state_dir(), KAFKA_ADDRESS_FILE, "Kafka broker", "broker", "host:port"
    )


def redis_url() -> str:
    """``REDIS_URL`` when set, else the URL of the project's running Redis server."""
    return _configured_or_running(
        REDIS_URL_ENV, redis_state_dir(), REDIS_ADDRESS_FILE, "Redis", "redis", "redis://host:port/0"
    )


def _configured_or_running(
    variable: str, server_dir: Path, address_file: str, server: str, command: str, example: str
) -> str:
    configured = os.environ.get(variable, "").strip()
    if configured:
        return configured
    address = running_server_address(server_dir, address_file)
    if address is not None:
        return address
    raise InfrastructureError(
        f"no {server}: {variable} is not set and the project's {server} in {server_dir} is not running; run "
        f"`perfusion {command} up` or set {variable}={example}"
    )


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on ``lock_path`` (created if missing), held across processes of this machine."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
