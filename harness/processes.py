"""Subprocesses of the demo (worker, trainer, service): started with their logs in one folder, watched, stopped.

:class:`ProcessSupervisor` is a context manager: whatever happens inside it (an error, Ctrl-C), every process it
started receives SIGTERM, then SIGKILL if it has not exited within the grace period. A process that exits on its
own while the loop still needs it is reported with the tail of its log.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from perfusion.errors import InfrastructureError
from perfusion.paths import REPO_ROOT

LOG_TAIL_LINES = 20


class ProcessExited(InfrastructureError):
    """A supervised process exited while the loop still needed it."""


@dataclass
class SupervisedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    arguments: tuple[str, ...] = ()
    restarts_left: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class ProcessSupervisor:
    """Starts ``python -m perfusion ...`` style subprocesses and stops all of them on exit."""

    def __init__(self, log_dir: Path, env: dict[str, str], stop_grace_s: float = 30.0) -> None:
        self.log_dir = log_dir
        self.env = env
        self.stop_grace_s = stop_grace_s
        self.processes: list[SupervisedProcess] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> ProcessSupervisor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(self, name: str, arguments: Sequence[str], restarts: int = 0) -> SupervisedProcess:
        """Run ``python <arguments>`` from the repository root with this supervisor's environment; a process that
        exits is started again up to ``restarts`` times by :meth:`check_running` (for crash-safe processes)."""
        supervised = SupervisedProcess(name, self._spawn(name, arguments), self.log_dir / f"{name}.log")
        supervised.arguments, supervised.restarts_left = tuple(arguments), restarts
        self.processes.append(supervised)
        return supervised

    def _spawn(self, name: str, arguments: Sequence[str]) -> subprocess.Popen[bytes]:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, *arguments],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches the demo, which stops them in order
            )
        return process

    def check_running(self) -> list[str]:
        """Restart exited processes that have restarts left (returns what happened); raise :class:`ProcessExited`
        for one that has none."""
        restarted = []
        for supervised in self.processes:
            code = supervised.process.poll()
            if code is not None and supervised.restarts_left > 0:
                supervised.restarts_left -= 1
                restarted.append(
                    f"the {supervised.name} (pid {supervised.pid}) exited with {code}, restarted; last log line: "
                    f"{supervised.log_tail(1)}"
                )
                supervised.process = self._spawn(supervised.name, supervised.arguments)
            elif code is not None:
                raise ProcessExited(
                    f"the {supervised.name} (pid {supervised.pid}) exited with {code}; its log "
                    f"{supervised.log_path} ends with:\n{supervised.log_tail()}"
                )
        return restarted

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.5) -> None:
        """Poll ``condition`` until true; raise if a process exits or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            self.check_running()
            if time.monotonic() > deadline:
                logs = ", ".join(str(p.log_path) for p in self.processes)
                raise InfrastructureError(f"timed out after {timeout_s:.0f} s waiting for {what}; see {logs}")
            time.sleep(interval_s)

    def stop_all(self) -> list[str]:
        """SIGTERM every running process (newest first), SIGKILL those still running after the grace period."""
        stopped = []
        for supervised in reversed(self.processes):
            if supervised.process.poll() is None:
                supervised.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for supervised in reversed(self.processes):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                supervised.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                supervised.process.kill()
                supervised.process.wait()
            stopped.append(supervised.name)
        self.processes = []
        return stopped
