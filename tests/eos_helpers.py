"""Helpers of the exactly-once tests (tests/test_exactly_once.py): group members that run
under gates (tests/eos_member.py), topics read as a read_committed or a
read_uncommitted consumer sees them, and the exactly-once checks of a run's outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from kafka_helpers import FlowTopics, run_args

from flows import codecs
from flows.chunk_state import pack

MEMBER = Path(__file__).parent / "eos_member.py"
TINY_MODEL = str(Path(__file__).parent / "data" / "tiny-bert-cls")


@dataclass
class Member:
    """One worker process of the group, started under its stable name."""

    name: str
    proc: subprocess.Popen
    gates: Path
    log: str

    def text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def tail(self) -> str:
        return f"--- {self.name} ---\n" + self.text()[-4000:]

    def hold(self, step: str, *, polling: bool = False) -> None:
        """The member's next transaction (of each of its workers), or its next batch at a
        pipeline step, waits before ``step`` until :meth:`release`; ``polling``: as an
        outage wait does, the member polling the group meanwhile."""
        for reached in self.gates.glob(f"{step}.*reached"):
            reached.unlink(missing_ok=True)
        (self.gates / step).write_text("poll" if polling else "")

    def reached(self, step: str, worker: Optional[int] = None) -> bool:
        """Whether a transaction of the member (of its worker ``worker``) waits before ``step``."""
        return (self.gates / (f"{step}.reached" if worker is None else f"{step}.{worker}.reached")).exists()

    def held_partitions(self, step: str) -> set[int]:
        """The input partitions of the batch held before ``step``."""
        text = (self.gates / f"{step}.reached").read_text()
        return {int(p) for p in text.split(",") if p}

    def release(self, step: str) -> None:
        (self.gates / step).unlink(missing_ok=True)

    def kill(self) -> None:
        """kill -9: no drain, no abort, no leaving the group."""
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM: finishes the batch in hand, commits it, leaves the group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_member(
    topics: FlowTopics, name: str, gates_root: Path, *args: str, env: Optional[dict[str, str]] = None
) -> Member:
    gates = gates_root / name
    gates.mkdir(parents=True, exist_ok=True)
    log = tempfile.NamedTemporaryFile("w+", prefix=f"eos-{name}-", suffix=".log", delete=False)
    cmd = run_args(topics, "--exactly-once", "--member-name", name, "--model", TINY_MODEL, *args)
    assert cmd[1:4] == ["-m", "flows.cli", "run"]
    cmd = [sys.executable, str(MEMBER), str(gates), *cmd[3:]]
    root = Path(__file__).parent.parent
    env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=root)
    return Member(name, proc, gates, log.name)


def read_as(
    bootstrap: str, topic: str, isolation: str = "read_committed", timeout: float = 60.0
) -> list[tuple[str, dict[str, Any], Any]]:
    """Every message a consumer with ``isolation.level=isolation`` reads from the
    beginning of ``topic`` up to its end now (read_committed: the last stable offset),
    decoded when it carries a record type: (type, record, message) in partition order."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "embedstream-eos-tests",
            "enable.auto.commit": "false",
            "enable.partition.eof": "true",
            "isolation.level": isolation,
        }
    )
    found = []
    try:
        partitions = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
        ends = {p: end_offset(consumer, TopicPartition(topic, p), timeout) for p in partitions}
        remaining = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in remaining])
        deadline = time.monotonic() + timeout
        while remaining and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF and msg.offset() >= ends[msg.partition()]:
                    remaining.discard(msg.partition())
                continue
            headers = dict(msg.headers() or ())
            if codecs.TYPE_HEADER in headers:
                kind, record = codecs.decode_output(msg.value(), msg.headers())
            else:
                kind, record = "raw", {}
            found.append((kind, record, msg))
        assert not remaining, f"could not read {topic} to its end as {isolation}"
    finally:
        consumer.close()
    return sorted(found, key=lambda f: (f[2].partition(), f[2].offset()))


def end_offset(consumer: Consumer, tp: TopicPartition, timeout: float = 60.0) -> int:
    """The partition's end for the consumer's isolation level (read_committed: the last
    stable offset), asked again while a restarting broker cannot answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1]
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def open_transaction_ends(bootstrap: str, topic: str) -> dict[int, int]:
    """Per partition of ``topic`` where a transaction is open now (its last stable
    offset behind its end): the end offset."""
    ends: dict[str, dict[int, int]] = {}
    for isolation in ("read_committed", "read_uncommitted"):
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "x", "isolation.level": isolation})
        try:
            partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
            ends[isolation] = {p: end_offset(consumer, TopicPartition(topic, p)) for p in partitions}
        finally:
            consumer.close()
    return {p: end for p, end in ends["read_uncommitted"].items() if ends["read_committed"][p] < end}


def stable_past(bootstrap: str, topic: str, offsets: dict[int, int]) -> bool:
    """Whether read_committed consumers of ``topic`` may read up to ``offsets`` (per
    partition): the transactions open there then have ended."""
    config = {"bootstrap.servers": bootstrap, "group.id": "x", "isolation.level": "read_committed"}
    consumer = Consumer(config)
    try:
        return all(end_offset(consumer, TopicPartition(topic, p)) >= o for p, o in offsets.items())
    finally:
        consumer.close()


def committed_total(topics: FlowTopics) -> int:
    """Events the group has committed; -1 while a restarting broker cannot say."""
    try:
        return sum(max(o, 0) for o in topics.committed())
    except KafkaException:
        return -1


# --- the checks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What one input event must end as: "DocManifest" (with its records),
    "DeleteMarker" or "DeadLetter"."""

    doc_id: str
    partition: int
    offset: int
    outcome: str


def check_exactly_once(topics: FlowTopics, expected: list[Expected], *, incremental: bool) -> dict[str, Any]:
    """Reads the output and dead-letter topics as read_committed consumers do and checks
    that each event's outcome is there exactly once: one manifest, delete marker or dead
    letter; the records of each version each once (full mode: every chunk of the
    manifest; incremental: exactly the chunks the document's previous committed version
    lacked). Returns the committed manifests by doc_id, in input order."""
    outputs = read_as(topics.bootstrap, topics.output) + read_as(topics.bootstrap, topics.dlq)
    outcomes: Counter = Counter()
    records: dict[tuple[int, int], list[str]] = defaultdict(list)
    manifests: dict[tuple[int, int], dict] = {}
    for kind, r, _ in outputs:
        if kind == "DeadLetter":
            outcomes[(kind, r["partition"], r["offset"])] += 1
            continue
        version = (r["doc_version"]["partition"], r["doc_version"]["offset"])
        if kind == "VectorRecord":
            records[version].append(r["chunk_id"])
        else:
            outcomes[(kind, *version)] += 1
            if kind == "DocManifest":
                manifests[version] = r
    wanted = Counter((e.outcome, e.partition, e.offset) for e in expected)
    assert not wanted - outcomes, f"missing: {sorted(wanted - outcomes)[:10]}"
    assert not outcomes - wanted, f"duplicated or unexpected: {sorted(outcomes - wanted)[:10]}"
    for version, ids in records.items():
        assert len(ids) == len(set(ids)), f"{version}: a chunk's record twice"
        assert version in manifests, f"{version}: records without a committed manifest"
    by_doc: dict[str, list[dict]] = defaultdict(list)
    last: dict[str, set[str]] = {}
    for e in sorted(expected, key=lambda e: (e.partition, e.offset)):
        if e.outcome == "DeleteMarker":
            last.pop(e.doc_id, None)
        if e.outcome != "DocManifest":
            continue
        manifest = manifests[(e.partition, e.offset)]
        ids = {c["chunk_id"] for c in manifest["chunks"]}
        sent = set(records.get((e.partition, e.offset), []))
        # Incremental: only what the previous committed version lacked. A state that ran
        # ahead of the outputs would send too few; one lost or rolled back, too many.
        wanted_ids = ids - last.get(e.doc_id, set()) if incremental else ids
        assert sent == wanted_ids, (
            f"{e.doc_id}@{e.partition}:{e.offset}: {len(sent)} records, {len(wanted_ids)} expected"
        )
        last[e.doc_id] = ids
        by_doc[e.doc_id].append(manifest)
    return {"manifests": by_doc, "records": sum(len(v) for v in records.values()), "outputs": len(outputs)}


def check_changelog(
    topics: FlowTopics, state_topic: str, expected: list[Expected], manifests: dict[str, list[dict]]
) -> int:
    """Incremental mode: the chunk-state changelog, as read_committed consumers (and a
    restoring member) read it, holds for each document exactly one entry per committed
    version, in order: the packed ids of its manifest, or a tombstone for a delete.
    Returns the number of entries."""
    entries: dict[str, list[Optional[bytes]]] = defaultdict(list)
    for _, _, msg in read_as(topics.bootstrap, state_topic):
        entries[msg.key().decode()].append(msg.value())
    wanted: dict[str, list[Optional[bytes]]] = defaultdict(list)
    at: dict[str, int] = defaultdict(int)
    for e in sorted(expected, key=lambda e: (e.partition, e.offset)):
        if e.outcome == "DeleteMarker":
            wanted[e.doc_id].append(None)
        elif e.outcome == "DocManifest":
            manifest = manifests[e.doc_id][at[e.doc_id]]
            at[e.doc_id] += 1
            wanted[e.doc_id].append(pack([c["chunk_id"] for c in manifest["chunks"]]))
    assert set(entries) <= set(wanted), f"entries of documents never committed: {set(entries) - set(wanted)}"
    for doc_id, values in wanted.items():
        assert entries.get(doc_id, []) == values, f"{doc_id}: the changelog disagrees with the records"
    return sum(len(v) for v in entries.values())


def metric(text: str, name: str) -> float:
    """The sum of a Prometheus sample family (all its labels) in a /metrics text."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))
