"""Test helpers for the real-Kafka tests: unique topics, producing events, running the
flow as the `embedstream run` command, and reading what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from flows import codecs
from flows.kafka.topics import create
from flows.settings import Settings


@dataclass
class FlowTopics:
    bootstrap: str
    partitions: int = 1
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    #: False: the topics are only named; :meth:`create` makes them later.
    created: bool = True

    def __post_init__(self) -> None:
        if self.created:
            self.create()

    def create(self) -> None:
        settings = Settings(brokers=self.bootstrap)
        for name in (self.input, self.output, self.dlq):
            create(settings, name, self.partitions)
        self.created = True

    @property
    def group(self) -> str:
        """The consumer group of the flows run on these topics (unless a test names
        another): a member that a test kills lingers in its group for a session timeout,
        and must not hold up the next test's rebalance."""
        return self.prefix

    @property
    def input(self) -> str:
        return f"{self.prefix}.documents"

    @property
    def output(self) -> str:
        return f"{self.prefix}.vectors"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    def produce(self, messages: list[tuple[Optional[bytes], bytes]], partition: Optional[int] = None) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": "true"})
        for key, value in messages:
            kwargs = {"partition": partition} if partition is not None else {}
            producer.produce(self.input, value, key, **kwargs)
        assert producer.flush(30) == 0

    def committed(self, topic: Optional[str] = None, group: Optional[str] = None) -> list[int]:
        """The offset committed for each partition of ``topic`` (default: the input) under
        ``group`` (default: the flows'); negative where there is none."""
        topic = topic or self.input
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group or self.group})
        try:
            found = consumer.committed([TopicPartition(topic, p) for p in range(self.partitions)], timeout=30)
        finally:
            consumer.close()
        return [tp.offset for tp in found]

    def run(
        self,
        *args: str,
        env: Optional[dict[str, str]] = None,
        output: Optional[str] = None,
        timeout: float = 240,
    ) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--until-end",
            "--epoch-s",
            "1",
            "--brokers",
            self.bootstrap,
            "--input-topic",
            self.input,
            "--output-topic",
            output or self.output,
            "--dlq-topic",
            self.dlq,
            "--metrics-port",
            "0",
            *_group(self, args),
        ]
        result = subprocess.run(
            cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def read(
        self, topic: str, timeout: float = 30.0, decode: bool = True
    ) -> list[tuple[str, dict[str, Any], Any]]:
        """Every message now in the topic, in partition order: (type, record, raw message).
        Reads each partition up to its current end offset (no consumer group, no waiting)."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "embedstream-tests",
                "enable.auto.commit": "false",
            }
        )
        found = []
        try:
            partitions = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
            ends = {}
            for p in partitions:
                _low, high = _watermarks(consumer, TopicPartition(topic, p), timeout)
                if high > 0:
                    ends[p] = high
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
            remaining = dict(ends)
            deadline = time.monotonic() + timeout
            while remaining and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                assert msg.error() is None, msg.error()
                if decode:
                    kind, record = codecs.decode_output(msg.value(), msg.headers())
                    found.append((kind, record, msg))
                else:
                    found.append(("raw", {}, msg))
                if msg.offset() + 1 >= ends[msg.partition()]:
                    remaining.pop(msg.partition(), None)
            assert not remaining, f"could not read {topic} to its end"
        finally:
            consumer.close()
        return sorted(found, key=lambda f: (f[2].partition(), f[2].offset()))


_TRANSIENT = (
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
)


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout: float) -> tuple[int, int]:
    """A restarted broker answers "not leader" for a moment: retried until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=timeout)
        except KafkaException as e:
            error = e.args[0]
            transient = error.retriable() or error.code() in _TRANSIENT
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def avro_event(
    doc_id: str,
    *,
    content: Optional[bytes] = None,
    op: str = "UPSERT",
    uri: Optional[str] = None,
    filename: Optional[str] = None,
    metadata: Optional[dict[str, str]] = None,
    mime_type: Optional[str] = None,
) -> bytes:
    return codecs.encode_single_object(
        "DocumentEvent",
        {
            "doc_id": doc_id,
            "op": op,
            "content": content,
            "uri": uri,
            "mime_type": mime_type,
            "filename": filename,
            "metadata": metadata or {},
            "event_time": 1_700_000_000_000,
        },
    )


def mixed_events(
    n: int, text: Callable[[int, str], str], prefix: str = "doc", dead_every: int = 10
) -> list[tuple[bytes, bytes]]:
    """``(key, event)`` of ``n`` documents: one in ``dead_every`` a broken PDF (a dead
    letter, at ``i % dead_every == 7``), every tenth else a DELETE (``i % 10 == 9``),
    the rest plain text ``text(i, doc_id)``."""
    out = []
    for i in range(n):
        doc_id = f"{prefix}-{i}"
        if i % dead_every == 7:
            value = avro_event(doc_id, content=b"%PDF-1.4 broken", filename="x.pdf")
        elif i % 10 == 9:
            value = avro_event(doc_id, op="DELETE")
        else:
            value = avro_event(doc_id, content=text(i, doc_id).encode(), filename="a.txt")
        out.append((doc_id.encode(), value))
    return out


def mixed_outcome(doc_id: str, dead_every: int = 10) -> str:
    """What :func:`mixed_events` makes of a document: its last message's type."""
    i = int(doc_id.rsplit("-", 1)[1])
    return "DeadLetter" if i % dead_every == 7 else "DeleteMarker" if i % 10 == 9 else "DocManifest"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(topics: FlowTopics, *args: str) -> list[str]:
    if "--metrics-port" not in args:
        args = (*args, "--metrics-port", "0")  # several workers share this host
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--brokers",
        topics.bootstrap,
        "--input-topic",
        topics.input,
        "--output-topic",
        topics.output,
        "--dlq-topic",
        topics.dlq,
        *_group(topics, args),
    ]


def _group(topics: FlowTopics, args: tuple[str, ...]) -> tuple[str, ...]:
    return args if "--group-id" in args else (*args, "--group-id", topics.group)


def start_flow(topics: FlowTopics, *args: str, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    """The flow in tail mode, as a long-running worker would run. Its log goes to a
    file (``proc.log``): an undrained pipe would block a chatty worker."""
    import tempfile

    log = tempfile.NamedTemporaryFile("w+", prefix="embedstream-flow-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        run_args(topics, *args), env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log
    )
    proc.log = log.name
    return proc


def log_tail(proc: subprocess.Popen) -> str:
    with open(proc.log, errors="replace") as f:
        return f.read()[-3000:]


def count(topics: FlowTopics) -> int:
    return len(topics.read(topics.output)) + len(topics.read(topics.dlq))


def wait_for(predicate, timeout: float, every: float = 0.5) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def accounted(topics: FlowTopics) -> dict[str, set[str]]:
    """Per doc_id: which kinds of output it got (VectorRecord, DeleteMarker, DeadLetter)."""
    found: dict[str, set[str]] = {}
    for kind, record, msg in topics.read(topics.output) + topics.read(topics.dlq):
        doc_id = record.get("doc_id") or (msg.key() or b"").decode()
        found.setdefault(doc_id, set()).add(kind)
    return found


def check_outcomes(
    topics: FlowTopics, ids: list[str], dead_every: int = 10, min_cosine: float = 0.9999
) -> dict[str, Counter]:
    """Every event of :func:`mixed_events` in ``ids`` ended as its outcome, with every
    chunk of a document; one processed more than once (at-least-once) gave the same
    records again: same chunk ids, text, spans, chunk count and version, vectors within
    ``min_cosine``. Returns the kinds of output per doc_id, counted."""
    kinds: dict[str, Counter] = defaultdict(Counter)
    first: dict[str, dict] = {}
    chunks: dict[str, set[int]] = defaultdict(set)
    for kind, r, msg in topics.read(topics.output, timeout=60) + topics.read(topics.dlq, timeout=60):
        doc_id = r.get("doc_id") or (msg.key() or b"").decode()
        kinds[doc_id][kind] += 1
        if kind != "VectorRecord":
            continue
        chunks[doc_id].add(r["chunk_index"])
        seen = first.setdefault(r["chunk_id"], r)
        fields = ("text", "char_start", "char_end", "chunk_count", "doc_version")
        assert [seen[f] for f in fields] == [r[f] for f in fields], r["chunk_id"]
        a, b = np.array(seen["embedding"]), np.array(r["embedding"])
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= min_cosine
    assert sorted(kinds) == sorted(ids), "every event ends as records, a delete marker or a dead letter"
    for doc_id in ids:
        outcome = mixed_outcome(doc_id, dead_every)
        # An UPSERT's records are followed by its manifest.
        assert set(kinds[doc_id]) == ({"VectorRecord", outcome} if outcome == "DocManifest" else {outcome}), (
            doc_id
        )
    for doc_id, indexes in chunks.items():
        assert indexes == set(range(len(indexes))), f"{doc_id}: every chunk present"
    return kinds
