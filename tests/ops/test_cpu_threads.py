"""The commands that sample on the CPU ask OpenMP for passive waits, unless the environment says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ops.cpu_threads import WAIT_POLICY, prefer_passive_openmp


def test_passive_unless_the_environment_names_a_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WAIT_POLICY, raising=False)
    prefer_passive_openmp()
    assert os.environ[WAIT_POLICY] == "PASSIVE"
    monkeypatch.setenv(WAIT_POLICY, "ACTIVE")
    prefer_passive_openmp()
    assert os.environ[WAIT_POLICY] == "ACTIVE"


def test_set_before_torch_in_a_fresh_process() -> None:
    code = (
        "import os, sys; from ops.cpu_threads import prefer_passive_openmp; prefer_passive_openmp(); "
        "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    )
    environment = {key: value for key, value in os.environ.items() if key != WAIT_POLICY}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)
    assert result.stdout.split() == ["PASSIVE", "False"]
