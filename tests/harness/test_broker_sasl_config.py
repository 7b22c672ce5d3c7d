"""The local broker's SASL listener as it is configured, without starting a broker: the listener, its mechanisms and
JAAS configs in server.properties (readable by its owner only), the SCRAM credentials for the storage format, the
ports kept across restarts, and the settings refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.infra.kafka_broker import KafkaBroker, KafkaBrokerConfig
from perfusion.errors import ConfigError

PASSWORD = "pa55-w0rd"


def properties(broker: KafkaBroker) -> dict[str, str]:
    lines = broker.properties_file.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def sasl_broker(tmp_path: Path) -> KafkaBroker:
    config = KafkaBrokerConfig(state_dir=tmp_path, sasl=True, sasl_username="loop", sasl_password=PASSWORD)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return KafkaBroker(config)


def test_a_sasl_broker_listens_with_plain_and_scram_and_keeps_its_password_private(tmp_path: Path) -> None:
    broker = sasl_broker(tmp_path)
    broker._write_config(41001, 41002, 41003)
    written = properties(broker)
    assert written["listeners"].split(",") == [
        "PLAINTEXT://127.0.0.1:41001",
        "CONTROLLER://127.0.0.1:41002",
        "SASL_PLAINTEXT://127.0.0.1:41003",
    ]
    assert written["advertised.listeners"] == "PLAINTEXT://127.0.0.1:41001,SASL_PLAINTEXT://127.0.0.1:41003"
    assert "SASL_PLAINTEXT:SASL_PLAINTEXT" in written["listener.security.protocol.map"].split(",")
    assert written["inter.broker.listener.name"] == "PLAINTEXT"
    assert written["sasl.enabled.mechanisms"] == "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
    plain = written["listener.name.sasl_plaintext.plain.sasl.jaas.config"]
    assert plain.startswith("org.apache.kafka.common.security.plain.PlainLoginModule required")
    assert f'user_loop="{PASSWORD}"' in plain
    for mechanism in ("scram-sha-256", "scram-sha-512"):
        jaas = written[f"listener.name.sasl_plaintext.{mechanism}.sasl.jaas.config"]
        assert jaas == "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    assert broker.properties_file.stat().st_mode & 0o777 == 0o600
    assert broker._scram_arguments() == [
        f"SCRAM-SHA-256=[name=loop,password={PASSWORD}]",
        f"SCRAM-SHA-512=[name=loop,password={PASSWORD}]",
    ]
    assert broker._previous_ports() == {"port": 41001, "sasl_port": 41003, "controller_port": 41002}


def test_without_sasl_the_broker_has_no_sasl_listener(tmp_path: Path) -> None:
    broker = KafkaBroker(KafkaBrokerConfig(state_dir=tmp_path))
    broker._write_config(41001, 41002)
    written = properties(broker)
    assert "SASL" not in written["listeners"] and "sasl.enabled.mechanisms" not in written
    assert broker._previous_ports() == {"port": 41001, "controller_port": 41002}
    assert broker._choose_ports()[2] == 0


def test_the_ports_of_the_last_run_are_kept_when_free(tmp_path: Path) -> None:
    from harness.infra.process import free_port

    broker = sasl_broker(tmp_path)
    ports = (free_port("127.0.0.1"), free_port("127.0.0.1"), free_port("127.0.0.1"))
    if len(set(ports)) < 3:
        pytest.skip("the system gave one free port twice")
    broker._write_config(*ports)
    assert broker._choose_ports() == ports
    port, controller_port, sasl_port = sasl_broker(tmp_path / "fresh")._choose_ports()
    assert len({port, controller_port, sasl_port}) == 3 and sasl_port > 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sasl": True}, "sasl_password must be set when sasl is on (PERFUSION_BROKER_SASL_PASSWORD)"),
        ({"sasl": True, "sasl_password": 'a"b'}, "sasl_password may hold only letters, digits and ._@+-"),
        ({"sasl": True, "sasl_password": PASSWORD, "sasl_username": "a,b"}, "sasl_username"),
    ],
)
def test_unusable_sasl_settings_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        KafkaBrokerConfig(**values)
    assert message in str(raised.value)
    assert 'a"b' not in str(raised.value)
