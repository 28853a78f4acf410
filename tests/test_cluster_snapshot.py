"""Cluster mode's source snapshot is a concrete offset from the moment a partition is
assigned: a snapshot taken before its first message (or end-of-partition marker)
arrives must not skip what a restart from it should read."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import OFFSET_END
from kafka_helpers import FlowTopics

from flows.kafka.io import KafkaInput, ReadOptions


def _source(topics: FlowTopics, start_from: str) -> KafkaInput:
    return KafkaInput(
        {"bootstrap.servers": topics.bootstrap, "group.id": topics.group},
        topics.input,
        ReadOptions(start_from=start_from, batch_size=100),
    )


def _read(source: KafkaInput, resume: int, wanted: int, patience_s: float = 60.0) -> list[bytes]:
    part = source.build_part("documents", "0", resume)
    found: list[bytes] = []
    deadline = time.monotonic() + patience_s
    try:
        while len(found) < wanted and time.monotonic() < deadline:
            found.extend(m.value for m in part.next_batch())
        # Nothing more than wanted arrives.
        for _ in range(5):
            found.extend(m.value for m in part.next_batch())
    finally:
        part.close()
    return found


def _snapshot_before_first_message(source: KafkaInput) -> int:
    part = source.build_part("documents", "0", None)
    try:
        return part.snapshot()
    finally:
        part.close()


@pytest.mark.parametrize("start_from", ["beginning", "committed"])
def test_a_snapshot_before_the_first_message_resumes_at_the_backlog(kafka_bootstrap, start_from):
    topics = FlowTopics(kafka_bootstrap)
    backlog = [b"event-%d" % i for i in range(5)]
    topics.produce([(None, v) for v in backlog])
    source = _source(topics, start_from)

    snapshot = _snapshot_before_first_message(source)

    assert snapshot != OFFSET_END and snapshot >= 0, snapshot
    assert _read(source, snapshot, len(backlog)) == backlog


@pytest.mark.parametrize("start_from", ["latest", "a time after every event"])
def test_a_snapshot_at_the_end_resumes_at_the_end_seen_when_assigned(kafka_bootstrap, start_from):
    topics = FlowTopics(kafka_bootstrap)
    topics.produce([(None, b"old-%d" % i) for i in range(3)])
    if start_from != "latest":
        start_from = str(int(time.time() * 1000) + 3_600_000)
    source = _source(topics, start_from)

    snapshot = _snapshot_before_first_message(source)
    # Events that arrive while the worker is down come after the snapshot: a restart
    # must read them, not start at the end it finds then.
    later = [b"new-%d" % i for i in range(4)]
    topics.produce([(None, v) for v in later])

    assert snapshot == 3
    assert _read(source, snapshot, len(later)) == later
