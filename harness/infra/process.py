"""Detached local server processes: free ports, pid files, ownership checks, stopping exactly one process.

The Kafka broker and the Redis server both run as background processes that outlive the command that started
them. Each keeps a pid file in its state folder; a pid is only ever signalled after its command line proves it
is the process this project started (a pid file can go stale and the pid can be reused by another program).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from perfusion.errors import InfrastructureError
from perfusion.server_files import file_lock, is_owned_process, read_pid

LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class ServerStatus:
    """What a pid file says about a server and whether that process is really running."""

    name: str
    running: bool
    pid: int | None
    address: str | None
    stale_pid: bool = False

    def describe(self) -> str:
        if self.running:
            return f"{self.name}: running, pid {self.pid}, address {self.address}"
        if self.stale_pid:
            return f"{self.name}: stopped (stale pid file for pid {self.pid} removed)"
        return f"{self.name}: stopped"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def stop_process(pid: int, marker: str, grace_s: float = 30.0, child: subprocess.Popen[bytes] | None = None) -> bool:
    """SIGTERM the process, wait up to ``grace_s`` seconds, then SIGKILL it.

    Returns False (signalling nothing) when ``pid`` is not the process ``marker`` identifies. ``child`` is the
    Popen handle when this Python process started it, so that it is reaped rather than left as a zombie.
    """
    if not is_owned_process(pid, marker):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            return True
        if not is_owned_process(pid, marker):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if child is not None:
        child.wait(timeout=10)
    return True


def start_detached(
    command: Sequence[str], log_file: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session (so Ctrl-C in the shell does not reach it), output to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as output:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def log_tail(*log_files: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of each existing log file, labelled, for error messages."""
    parts = []
    for log_file in log_files:
        if log_file.exists():
            tail = log_file.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- last {len(tail)} lines of {log_file} ---\n" + "\n".join(tail))
    return "\n".join(parts) if parts else "(no log output)"


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def require_binary(binary: str, debian_package: str) -> str:
    """The path of ``binary``; when it is missing and we are root, install ``debian_package`` with apt-get first."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise InfrastructureError(
            f"'{binary}' is not on PATH; install it (Debian/Ubuntu: sudo apt-get install -y {debian_package})"
        )
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", debian_package]
    if subprocess.run(install, env=apt_env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=apt_env, capture_output=True)
        result = subprocess.run(install, env=apt_env, capture_output=True, text=True)
        if result.returncode != 0:
            raise InfrastructureError(
                f"apt-get install {debian_package} failed (exit {result.returncode}): {result.stderr.strip()[-500:]}"
            )
    found = shutil.which(binary)
    if not found:
        raise InfrastructureError(f"installed {debian_package} but '{binary}' is still not on PATH")
    return found


def startup_lock(state_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold while checking whether a server runs and starting it: two commands starting the server of one state
    folder at once (two test sessions, a demo and a benchmark) would otherwise both start one, and the pid file
    would name only the second, leaving the first running unseen by ``down``."""
    return file_lock(state_dir / ".start.lock")


class LocalServer:
    """What the project's local servers (Kafka, Redis) share: files in a state folder, starting under
    :func:`startup_lock`, stopping exactly the process this project started, and use as a context manager that
    stops on exit only a server it started itself.

    A subclass sets ``name``, and provides ``state_dir``, ``marker_file`` (the file its process gets as an argument,
    which proves a pid is ours), ``address_file`` (where the running server's address is written) and
    ``_start_unlocked``.
    """

    name = "server"
    stop_grace_s = 30.0

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._started_here = False

    @property
    def state_dir(self) -> Path:
        raise NotImplementedError

    @property
    def marker_file(self) -> Path:
        raise NotImplementedError

    @property
    def address_file(self) -> Path:
        raise NotImplementedError

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "pid"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    def start(self) -> ServerStatus:
        """Start the server and wait until it answers; a no-op returning the status when it already runs."""
        with startup_lock(self.state_dir):
            return self._start_unlocked()

    def _start_unlocked(self) -> ServerStatus:
        raise NotImplementedError

    def stop(self, grace_s: float | None = None) -> bool:
        """Stop exactly this server's process (SIGTERM, then SIGKILL after ``grace_s``, default
        ``stop_grace_s``); False when it was not running."""
        pid = read_pid(self.pid_file)
        stopped = False
        if pid is not None:
            child = self._process if self._process is not None and self._process.pid == pid else None
            grace = self.stop_grace_s if grace_s is None else grace_s
            stopped = stop_process(pid, str(self.marker_file), grace_s=grace, child=child)
        self._remove_runtime_files()
        self._process = None
        return stopped

    def _remove_runtime_files(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        self.address_file.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        # Leave a server that was already running before ``__enter__`` alone.
        if self._started_here:
            self.stop()
            self._started_here = False
