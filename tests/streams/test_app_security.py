"""The worker's Faust app connects with the Kafka security settings (its broker credentials, as aiokafka gets them)
and creates its own topics (table changelogs, repartition and leader topics) with the settings' replication factor
and min.insync.replicas."""

from __future__ import annotations

from pathlib import Path

from perfusion.kafka_security import aiokafka_kwargs
from perfusion.settings import KafkaSecuritySettings
from streams.app import create_app
from streams.settings import StreamSettings

SECURITY = KafkaSecuritySettings(
    protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256", sasl_username="worker", sasl_password="pa55-w0rd"
)


def test_the_app_has_the_credentials_and_replicates_its_own_topics_as_configured(tmp_path: Path) -> None:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    settings = StreamSettings(
        bootstrap_servers="broker:9093",
        data_dir=tmp_path,
        kafka_security=SECURITY,
        topic_replication_factor=3,
        topic_min_insync_replicas=2,
    )
    app = create_app(settings, agent_modules=()).app
    assert credentials_to_aiokafka_auth(app.conf.broker_credentials) == {
        **aiokafka_kwargs(SECURITY),
        "ssl_context": None,
    }
    assert "pa55-w0rd" not in repr(app.conf.broker_credentials)
    assert app.conf.topic_replication_factor == 3
    changelog = app.Table("counts", partitions=2).changelog_topic
    assert changelog.config is not None and changelog.config["min.insync.replicas"] == "2"
    internal = app.topic("repartitioned", internal=True, config={"retention.ms": "1000"})
    assert internal.config == {"min.insync.replicas": "2", "retention.ms": "1000"}
    assert not app.topic("perfusion.events").config, "the loop's own topics are created by ensure_topics"


def test_plaintext_gives_the_app_no_credentials(tmp_path: Path) -> None:
    app = create_app(StreamSettings(bootstrap_servers="broker:9093", data_dir=tmp_path), agent_modules=()).app
    assert app.conf.broker_credentials is None
    assert app.conf.topic_replication_factor == 1
    assert app.Table("counts", partitions=2).changelog_topic.config["min.insync.replicas"] == "1"
