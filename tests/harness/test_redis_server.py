"""The project's local Redis server: start in a temporary state folder, PING with the redis client, stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.infra.redis_server import RedisServer, RedisServerConfig, redis_url
from perfusion.errors import ConfigError, InfrastructureError
from perfusion.server_files import process_command_line


@pytest.mark.integration
def test_redis_up_ping_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path))
    server = RedisServer()
    assert server.state_dir == tmp_path / "redis"
    with server:
        status = server.status()
        assert status.running and status.pid is not None
        assert redis_url() == status.address == server.url_file.read_text().strip()
        client = redis.Redis.from_url(redis_url())
        try:
            assert client.ping() is True
            client.set("perfusion:probe", b"1")
            assert client.get("perfusion:probe") == b"1"
        finally:
            client.close()
        assert server.start() == status  # already running: a no-op
        pid = status.pid
    assert process_command_line(pid) is None
    assert not server.status().running
    assert not server.pid_file.exists() and not server.url_file.exists()


@pytest.mark.parametrize("port", [-1, 65536])
def test_config_rejects_a_port_outside_tcp(port: int, tmp_path: Path) -> None:
    assert RedisServerConfig(state_dir=tmp_path, port=65535).port == 65535
    with pytest.raises(ConfigError, match=f"port must be between 0 and 65535, got {port}"):
        RedisServerConfig(state_dir=tmp_path, port=port)


def test_stale_pid_is_not_signalled(tmp_path: Path) -> None:
    server = RedisServer(RedisServerConfig(state_dir=tmp_path / "redis"))
    server.state_dir.mkdir(parents=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        server.pid_file.write_text(f"{bystander.pid}\n")
        status = server.status()
        assert not status.running and status.stale_pid and not server.pid_file.exists()
        server.pid_file.write_text(f"{bystander.pid}\n")
        assert server.stop() is False
        assert bystander.poll() is None  # a process that is not our Redis is never signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_redis_url_prefers_environment_and_explains_absence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache.example:6379/0")
    assert redis_url() == "redis://cache.example:6379/0"
    monkeypatch.delenv("REDIS_URL")
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path))
    with pytest.raises(InfrastructureError, match="perfusion redis up"):
        redis_url()
