"""Group mode under a tight poll deadline (``max.poll.interval.ms`` and
``session.timeout.ms`` at 6 s, about their minimum): a batch slower than the deadline
is cut by its time budget and every event ends once, without the evict-and-redo loop;
an outage waited out for 30 s keeps the member in its group."""

from __future__ import annotations

import time

from confluent_kafka import Producer
from kafka_helpers import FlowTopics, avro_event, log_tail, start_flow, wait_for

from flows import metrics, outage
from flows.kafka import group
from flows.kafka.group import GroupMember
from flows.kafka.io import ReadOptions

#: The tightest deadlines a broker accepts by default (group.min.session.timeout.ms).
TIGHT = {"session.timeout.ms": "6000", "max.poll.interval.ms": "6000", "heartbeat.interval.ms": "1000"}


def _moves(kind: str) -> float:
    return metrics.REBALANCES.labels(kind)._value.get()


def test_an_outage_wait_of_30_s_evicts_no_member(kafka_bootstrap):
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    values = [b"event-%02d" % i for i in range(20)]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i, v in enumerate(values):
        producer.produce(topics.input, v, partition=i % 2)
    assert producer.flush(30) == 0
    member = GroupMember(
        {"bootstrap.servers": kafka_bootstrap, "group.id": topics.group, **TIGHT},
        topics.input,
        ReadOptions(start_from="beginning", batch_size=4),
    )
    seen = []
    try:
        deadline = time.monotonic() + 60
        batch = []
        while not batch and time.monotonic() < deadline:
            batch = member.next_batch()
        assert batch, "the member was given no partition"
        lost, revoked = _moves("lost"), _moves("revoked")

        # The batch in hand waits for a dependency that is down for 30 s (a stand-in
        # that refuses until then): five poll deadlines.
        back_at = time.monotonic() + 30

        def dependency() -> str:
            if time.monotonic() < back_at:
                raise outage.Outage("connection refused")
            return "answer"

        assert outage.wait_out("stand-in", dependency) == "answer"
        assert not group.commit({(topics.input, m.partition): m.offset + 1 for m in batch})
        assert not member.uncommitted, "the group refused the commit: the member was evicted"
        seen += batch

        while len(seen) < len(values) and time.monotonic() < deadline + 30:
            batch = member.next_batch()
            if batch:
                seen += batch
                group.commit({(topics.input, m.partition): m.offset + 1 for m in batch})
        assert (_moves("lost"), _moves("revoked")) == (lost, revoked)
    finally:
        member.close()
    assert sorted(m.value for m in seen) == values  # each once: nothing skipped or redone
    assert topics.committed() == [10, 10]


def _calibrated_documents(minilm, work_s: float) -> list[str]:
    """Distinct one-chunk documents that take the real model about ``work_s`` seconds
    to embed on this machine now (measured, so that the batch is slow here too)."""

    def text(i: int) -> str:
        return " ".join(f"Document {i} sentence {j} on groups and poll deadlines." for j in range(18))

    sample = [text(-i) for i in range(1, 9)]
    started = time.monotonic()
    minilm.embed(sample)
    per_doc = (time.monotonic() - started) / len(sample)
    return [text(i) for i in range(max(int(work_s / per_doc), 16))]


def test_a_batch_slower_than_the_poll_deadline_ends_once(kafka_bootstrap, minilm):
    topics = FlowTopics(kafka_bootstrap, partitions=1)
    docs = _calibrated_documents(minilm, work_s=15.0)  # one batch of it: over two deadlines
    topics.produce(
        [(b"d%d" % i, avro_event(f"d{i}", content=t.encode(), filename="a.txt")) for i, t in enumerate(docs)]
    )
    args = ["--from", "beginning", "--batch-size", "2048"]
    for key, value in TIGHT.items():
        args += ["--kafka", f"{key}={value}"]
    worker = start_flow(topics, *args, env={"EMBEDSTREAM_BATCH_MAX_S": "1"})

    def log() -> str:
        with open(worker.log, errors="replace") as f:
            return f.read()

    def evicted(text: str) -> bool:
        return "missed the group's deadline" in text or "revoked" in text

    try:
        done = wait_for(lambda: topics.committed() == [len(docs)] or evicted(log()), timeout=150, every=1)
        full = log()  # before the worker leaves the group
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert not evicted(full), full[-3000:]
    assert done, f"not every event was committed: {topics.committed()} of {len(docs)}\n{log_tail(worker)}"
    manifests = [r["doc_id"] for kind, r, _ in topics.read(topics.output) if kind == "DocManifest"]
    assert sorted(manifests) == sorted(f"d{i}" for i in range(len(docs)))  # each once
    assert "go to the next batch" in full
