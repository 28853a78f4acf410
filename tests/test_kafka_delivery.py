"""What the producers of embedstream do with a message Kafka never confirmed, on the
real local broker: it is an error, and nothing after it is committed."""

from __future__ import annotations

import pytest
from confluent_kafka import OFFSET_INVALID, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from kafka_helpers import FlowTopics

from flows import codecs
from flows.kafka import topics as kafka_topics
from flows.kafka.delivery import Delivery, DeliveryError
from flows.kafka.topics import redrive
from flows.settings import Settings

#: The local broker creates no topic on first write (auto.create.topics.enable=false).
#: With this the producer keeps a message for a missing topic queued, waiting for the
#: topic to appear, instead of failing it after 30 s: flush() ends with it unsent.
WAIT_FOR_THE_TOPIC = {"topic.metadata.propagation.max.ms": "600000"}


def dead_letter(topics: FlowTopics, offset: int, payload: bytes) -> bytes:
    return codecs.encode_single_object(
        "DeadLetter",
        {
            "stage": "extract",
            "reason": "corrupt",
            "message": "a test letter",
            "topic": topics.input,
            "partition": 0,
            "offset": offset,
            "key": f"doc-{offset}".encode(),
            "payload": payload,
            "payload_size": len(payload),
            "doc_id": f"doc-{offset}",
            "failed_at": codecs.now_ms(),
        },
    )


def test_redrive_to_a_topic_it_cannot_deliver_to_fails_and_commits_nothing(kafka_bootstrap, monkeypatch):
    # It once flushed for 60 s, ignored what was still unsent, and committed the
    # letters' offsets: they were lost.
    monkeypatch.setattr(kafka_topics, "CONFIRM_TIMEOUT_S", 3.0)
    topics = FlowTopics(kafka_bootstrap)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    payloads = [b"first payload", b"second payload"]
    for offset, payload in enumerate(payloads):
        letter = dead_letter(topics, offset, payload)
        producer.produce(topics.dlq, letter, headers=[(codecs.TYPE_HEADER, b"DeadLetter")])
    assert producer.flush(30) == 0
    nowhere = f"{topics.prefix}.nowhere"  # never created
    group = f"{topics.prefix}.redrive"

    unsent = Settings(
        brokers=kafka_bootstrap, input_topic=nowhere, dlq_topic=topics.dlq, kafka=WAIT_FOR_THE_TOPIC
    )
    with pytest.raises(DeliveryError, match="not confirmed"):
        redrive(unsent, group_id=group)
    assert topics.committed(topics.dlq, group) == [OFFSET_INVALID], "the letters were not delivered"

    # After the fix (a topic that takes them), the same letters go out, once.
    fixed = Settings(brokers=kafka_bootstrap, input_topic=topics.input, dlq_topic=topics.dlq)
    assert redrive(fixed, group_id=group)["sent"] == 2
    assert [m.value() for _, _, m in topics.read(topics.input, decode=False)] == payloads
    assert topics.committed(topics.dlq, group) == [2]


def test_a_message_flush_leaves_unsent_is_an_error(kafka_bootstrap):
    producer = Producer({"bootstrap.servers": kafka_bootstrap, **WAIT_FOR_THE_TOPIC})
    delivery = Delivery(producer, "test messages")
    delivery.produce(f"nowhere-{codecs.now_ms()}", b"value", b"key")
    with pytest.raises(DeliveryError, match="1 test messages not confirmed by Kafka in 2 s"):
        delivery.confirm(2.0)
    producer.purge()


def test_a_failed_delivery_report_is_an_error(kafka_bootstrap):
    topics = FlowTopics(kafka_bootstrap)
    small = f"{topics.prefix}.small"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(small, 1, 1, config={"max.message.bytes": "1024"})])[small].result(30)
    delivery = Delivery(Producer({"bootstrap.servers": kafka_bootstrap}), "test messages")
    delivery.produce(topics.input, b"fits")
    delivery.produce(small, b"x" * 4096)  # the producer sends it, the broker refuses it
    with pytest.raises(DeliveryError, match=rf"1 test messages were not delivered: \['{small}: "):
        delivery.confirm(30)
    delivery.produce(topics.input, b"fits too")
    delivery.confirm(30)  # the failure was reported once
    assert [m.value() for _, _, m in topics.read(topics.input, decode=False)] == [b"fits", b"fits too"]
