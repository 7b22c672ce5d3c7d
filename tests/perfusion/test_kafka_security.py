"""Kafka security settings: validated once (a ConfigError naming the setting), read from the KAFKA_* variables, the
password never shown; and what each kind of client is given: kafka-python's producer (the service's event sink),
consumer (the topic follower) and admin client (topic creation, with replication, min.insync.replicas and
compaction), and aiokafka's consumer (the streams benchmark's raw consumer)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import certifi
import pytest

from perfusion.contracts.records import Click
from perfusion.contracts.topics import TopicNames, ensure_topics, topic_options
from perfusion.errors import ConfigError
from perfusion.kafka_security import aiokafka_kwargs, kafka_python_kwargs, security_environment, ssl_context
from perfusion.settings import KafkaClientSettings, KafkaSecuritySettings

PASSWORD = "pa55-w0rd"
SCRAM = {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "loop", "sasl_password": PASSWORD}
KAFKA_VARIABLES = {
    "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "KAFKA_SASL_MECHANISM": "scram-sha-256",
    "KAFKA_SASL_USERNAME": "loop",
    "KAFKA_SASL_PASSWORD": PASSWORD,
}


def sasl_plaintext() -> KafkaSecuritySettings:
    return KafkaSecuritySettings(**{**SCRAM, "protocol": "SASL_PLAINTEXT"})


# ------------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"protocol": "SASL_PLAINTEXT"}, "kafka_security.sasl_mechanism must be set for protocol SASL_PLAINTEXT"),
        ({"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}, "sasl_username and sasl_password must both be set"),
        ({**SCRAM, "sasl_password": ""}, "sasl_username and sasl_password must both be set"),
        ({"sasl_mechanism": "PLAIN"}, "kafka_security.sasl_mechanism needs protocol SASL_PLAINTEXT or SASL_SSL"),
        ({"sasl_username": "loop"}, "kafka_security.sasl_username needs protocol SASL_PLAINTEXT or SASL_SSL"),
        ({"protocol": "TLS"}, "kafka_security.protocol must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
        ({**SCRAM, "sasl_mechanism": "GSSAPI"}, "kafka_security.sasl_mechanism must be one of PLAIN, SCRAM-SHA-256"),
        ({"protocol": "SSL", "ssl_cafile": "/no/such/ca.pem"}, "kafka_security.ssl_cafile /no/such/ca.pem does not"),
        ({"ssl_cafile": certifi.where()}, "kafka_security.ssl_cafile needs protocol SSL or SASL_SSL, got PLAINTEXT"),
        ({"protocol": "SSL", "ssl_keyfile": certifi.where()}, "kafka_security.ssl_keyfile needs ssl_certfile"),
    ],
)
def test_an_invalid_combination_is_a_config_error_naming_the_setting(values: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        KafkaClientSettings(kafka_security=values)
    assert named in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_min_insync_replicas_above_the_replication_factor_is_refused() -> None:
    with pytest.raises(ConfigError, match="topic_min_insync_replicas must be at most topic_replication_factor"):
        KafkaClientSettings(topic_replication_factor=2, topic_min_insync_replicas=3)
    assert KafkaClientSettings(topic_replication_factor=3, topic_min_insync_replicas=2).topic_min_insync_replicas == 2


def test_the_kafka_variables_are_read_and_a_perfusion_section_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KAFKA_VARIABLES.items():
        monkeypatch.setenv(name, value)
    security = KafkaClientSettings.from_env().kafka_security
    assert (security.protocol, security.sasl_mechanism, security.sasl_username) == (
        "SASL_PLAINTEXT",
        "SCRAM-SHA-256",
        "loop",
    )
    assert security.sasl_password is not None and security.sasl_password.get_secret_value() == PASSWORD
    monkeypatch.setenv("PERFUSION_KAFKA_SECURITY__SASL_USERNAME", "other")
    assert KafkaClientSettings.from_env().kafka_security.sasl_username == "other"
    assert KafkaClientSettings().kafka_security.protocol == "PLAINTEXT", "settings built in code read no variable"


def test_the_password_is_never_shown() -> None:
    settings = KafkaClientSettings(kafka_security=sasl_plaintext())
    for shown in (repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump(mode="json"))):
        assert PASSWORD not in shown


def test_a_child_process_gets_the_same_settings_from_its_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    security = KafkaSecuritySettings(**SCRAM, ssl_cafile=certifi.where(), ssl_check_hostname=False)
    for name, value in security_environment(security).items():
        monkeypatch.setenv(name, value)
    assert KafkaClientSettings.from_env().kafka_security == security


# --------------------------------------------------------------------------------------------------- conversions


def test_plaintext_gives_no_arguments() -> None:
    assert kafka_python_kwargs(None) == kafka_python_kwargs(KafkaSecuritySettings()) == {}
    assert aiokafka_kwargs(KafkaSecuritySettings()) == {}
    assert ssl_context(KafkaSecuritySettings()) is None


def test_sasl_ssl_for_kafka_python_and_aiokafka() -> None:
    security = KafkaSecuritySettings(**SCRAM, ssl_cafile=certifi.where(), ssl_check_hostname=False)
    sasl = {"sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "loop", "sasl_plain_password": PASSWORD}
    assert kafka_python_kwargs(security) == {
        "security_protocol": "SASL_SSL",
        **sasl,
        "ssl_check_hostname": False,
        "ssl_cafile": certifi.where(),
    }
    kwargs = aiokafka_kwargs(security)
    context = kwargs.pop("ssl_context")
    assert kwargs == {"security_protocol": "SASL_SSL", **sasl}
    assert isinstance(context, ssl.SSLContext) and context.check_hostname is False
    assert context.cert_store_stats()["x509_ca"] > 0, "the CA file's certificates are loaded"


def test_aiokafka_takes_the_arguments() -> None:
    from aiokafka import AIOKafkaConsumer

    async def client_of_a_consumer() -> Any:
        consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", **aiokafka_kwargs(sasl_plaintext()))
        return consumer._client

    client = asyncio.run(client_of_a_consumer())
    assert (client._security_protocol, client._sasl_mechanism) == ("SASL_PLAINTEXT", "SCRAM-SHA-512")
    assert (client._sasl_plain_username, client._sasl_plain_password) == ("loop", PASSWORD)


# ------------------------------------------------------------------------------------------------- the clients


class Recorder:
    """Stands in for a client class: records the keyword arguments of each construction."""

    built: list[dict[str, Any]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        type(self).built.append(kwargs)


def recorder(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, **methods: Any) -> type[Recorder]:
    cls = type(name, (Recorder,), {"built": [], **methods})
    monkeypatch.setattr(module, name, cls)
    return cls


def assert_sasl(kwargs: dict[str, Any]) -> None:
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"]) == ("SCRAM-SHA-512", "loop")
    assert kwargs["sasl_plain_password"] == PASSWORD


def test_the_event_sink_producer_and_readiness_admin_get_the_security(monkeypatch: pytest.MonkeyPatch) -> None:
    import kafka
    import kafka.admin

    from service.events import KafkaEventSink

    class Future:
        def get(self, timeout: float) -> None:
            return None

    producer = recorder(monkeypatch, kafka, "KafkaProducer", send=lambda self, *a, **k: Future())
    admin = recorder(
        monkeypatch,
        kafka.admin,
        "KafkaAdminClient",
        describe_topics=lambda self, topics: [{"topic": topics[0], "partitions": [0]}],
        close=lambda self: None,
    )
    sink = KafkaEventSink("broker:9093", "t.perfusion.events", security=sasl_plaintext())
    sink.send(Click(event_id="e", ts=1.0, user_id="u", impression_id="i", design_id="d", image_id="x"))
    sink.check_reachable(1.0)
    assert_sasl(producer.built[0])
    assert_sasl(admin.built[0])


def test_the_topic_follower_consumer_gets_the_security(monkeypatch: pytest.MonkeyPatch) -> None:
    import kafka

    from perfusion.follower import TopicFollower

    consumer = recorder(monkeypatch, kafka, "KafkaConsumer")
    follower = TopicFollower("f", "broker:9093", ["t"], lambda record: None, security=sasl_plaintext())
    follower._connect()
    assert_sasl(consumer.built[0])
    assert consumer.built[0]["group_id"] is None


def test_topics_are_created_with_the_security_replication_and_compaction(monkeypatch: pytest.MonkeyPatch) -> None:
    import kafka.admin

    created: dict[str, dict[str, Any]] = {}

    def create_topics(self: Any, topics: dict[str, dict[str, Any]], wait_for_metadata: bool) -> None:
        created.update(topics)

    admin = recorder(
        monkeypatch,
        kafka.admin,
        "KafkaAdminClient",
        list_topics=lambda self: [],
        create_topics=create_topics,
        close=lambda self: None,
    )
    names = TopicNames.for_prefix("p.")
    client = KafkaClientSettings(
        kafka_security=sasl_plaintext(), topic_replication_factor=3, topic_min_insync_replicas=2
    )
    assert sorted(ensure_topics("broker:9093", names, 6, client=client)) == sorted(names.all())
    assert_sasl(admin.built[0])
    compacted = {names.design_demand, names.production_orders, names.model_updates}
    for name, options in created.items():
        assert (options["num_partitions"], options["replication_factor"]) == (6, 3)
        assert options["configs"]["min.insync.replicas"] == "2"
        assert options["configs"].get("cleanup.policy") == ("compact" if name in compacted else None), name
    assert topic_options(names, names.events, 4) == {
        "num_partitions": 4,
        "replication_factor": 1,
        "configs": {"min.insync.replicas": "1"},
    }


def test_the_traffic_producer_gets_the_security(monkeypatch: pytest.MonkeyPatch) -> None:
    import kafka

    from simulator.traffic import produce_events

    class Future:
        def get(self, timeout: float) -> None:
            return None

    producer = recorder(
        monkeypatch,
        kafka,
        "KafkaProducer",
        send=lambda self, *a, **k: Future(),
        flush=lambda self: None,
        close=lambda self: None,
    )
    assert produce_events([(b"u", b"{}")], "broker:9093", "t", security=sasl_plaintext()) == 1
    assert_sasl(producer.built[0])


def test_the_raw_aiokafka_consumer_gets_the_security(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiokafka

    from ops.bench.stream_rates import raw_consumer_rate

    class Refused(Exception):
        pass

    async def start(self: Any) -> None:
        raise Refused  # as far as this test needs the consumer to go

    consumer = recorder(monkeypatch, aiokafka, "AIOKafkaConsumer", start=start)
    with pytest.raises(Refused):
        asyncio.run(raw_consumer_rate("broker:9093", "t", 1, 1, 1.0, sasl_plaintext()))
    assert_sasl(consumer.built[0])


def test_a_missing_file_named_by_a_variable_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"kafka_security\.ssl_cafile .*missing\.pem does not exist"):
        KafkaClientSettings.from_env()


def test_the_services_demand_follower_connects_with_the_security_it_is_given(tmp_path: Path) -> None:
    from service.designs import DemandFollower, DesignRegistry

    security = sasl_plaintext()
    follower = DemandFollower(
        DesignRegistry(tmp_path / "service.sqlite"), "broker:9093", "t.perfusion.events", security=security
    )
    assert follower.follower.security is security
    assert (
        DemandFollower(DesignRegistry(tmp_path / "other.sqlite"), "broker:9093", "t.perfusion.events").follower.security
        is None
    )
