"""Settings: defaults, environment, flags, librdkafka pass-through, secrets masked."""

from __future__ import annotations

import pytest

from flows.settings import Settings


def test_defaults_validate():
    s = Settings.from_env({})
    assert (s.input_topic, s.output_topic, s.dlq_topic, s.output_format) == (
        "documents",
        "vectors",
        "documents.dlq",
        "avro",
    )
    assert s.tail and s.max_tokens is None and s.allowed_roots == ()


def test_environment_then_overrides():
    env = {
        "EMBEDSTREAM_BROKERS": "kafka-1:9092,kafka-2:9092",
        "EMBEDSTREAM_BATCH_SIZE": "16",
        "EMBEDSTREAM_TAIL": "false",
        "EMBEDSTREAM_MAX_TOKENS": "128",
        "EMBEDSTREAM_ALLOWED_ROOTS": "/data/a:/data/b",
        "EMBEDSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "EMBEDSTREAM_KAFKA_SASL_PASSWORD": "hunter2",
        "EMBEDSTREAM_KAFKA_HOME": "/not/a/kafka/setting",
    }
    s = Settings.from_env(env, batch_size=8, kafka={"linger.ms": "20"})
    assert s.brokers == "kafka-1:9092,kafka-2:9092"
    assert s.batch_size == 8 and s.tail is False and s.max_tokens == 128
    assert s.allowed_roots == ("/data/a", "/data/b")
    assert s.kafka == {"security.protocol": "SASL_SSL", "sasl.password": "hunter2", "linger.ms": "20"}
    assert s.kafka_common()["bootstrap.servers"] == "kafka-1:9092,kafka-2:9092"


def test_secrets_are_masked():
    s = Settings.from_env(
        {"EMBEDSTREAM_SCHEMA_REGISTRY_URL": "https://user:pass@registry:8081"},
        kafka={"sasl.password": "hunter2", "ssl.key.password": "k", "sasl.username": "me"},
    )
    shown = s.redacted()
    assert "hunter2" not in repr(shown) and "pass@" not in repr(shown)
    assert shown["kafka"]["sasl.username"] == "me"
    assert shown["schema_registry_url"] == "https://***@registry:8081"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EMBEDSTREAM_OUTPUT_FORMAT": "xml"}, "output_format"),
        ({"EMBEDSTREAM_OUTPUT_FORMAT": "confluent"}, "schema_registry_url"),
        ({"EMBEDSTREAM_START_FROM": "yesterday"}, "start_from"),
        ({"EMBEDSTREAM_BATCH_SIZE": "0"}, "batch_size"),
        ({"EMBEDSTREAM_TAIL": "maybe"}, "boolean"),
        ({"EMBEDSTREAM_AUDIO_LANGUAGE": "en"}, "audio_model"),
    ],
)
def test_invalid_settings_are_refused(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_statefulset_pods_derive_their_cluster_place():
    s = Settings.from_env({"EMBEDSTREAM_REPLICAS": "3", "EMBEDSTREAM_SERVICE": "embedstream-workers"})
    assert s.cluster("embedstream-2") == (
        2,
        [f"embedstream-{i}.embedstream-workers:2101" for i in range(3)],
    )
    assert Settings.from_env({}).cluster("embedstream-2") == (None, None)
    with pytest.raises(ValueError):
        s.cluster("embedstream-7")
    with pytest.raises(ValueError):
        s.cluster("laptop")
