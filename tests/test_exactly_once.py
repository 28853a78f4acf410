"""Exactly-once into the output topics (``--exactly-once``) on a real broker: members
killed at random moments and between produce and commit, a member added and removed,
the broker restarted, a zombie member resumed after its partitions moved, and an
outage inside a transaction; a read_committed consumer sees every chunk exactly once,
and the chunk-state changelog matches the committed records."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from eos_helpers import (
    TINY_MODEL,
    Expected,
    Member,
    check_changelog,
    check_exactly_once,
    committed_total,
    metric,
    open_transaction_ends,
    read_as,
    stable_past,
    start_member,
)
from kafka_helpers import FlowTopics, avro_event, free_port, run_args, wait_for
from test_incremental import doc_text, edited, upsert

from flows.settings import Settings

PARTITIONS = 8
BATCH = "16"
#: Events produced at a time: a fault follows each wave, while it is processed.
WAVE = 200
#: A killed member leaves the group after this; the default (45 s) would stall the test.
FAST_GROUP = ("--kafka", "session.timeout.ms=6000", "--kafka", "heartbeat.interval.ms=1000")
#: Longer than any wait here, so only a fenced producer (a restart) ends a transaction early.
TXN_TIMEOUT = ("--kafka", "transaction.timeout.ms=120000")


def scenario_events(docs: int = 1000) -> list[tuple[bytes, bytes, str]]:
    """2,000 events: a first version of each document (one in 50 a broken PDF: a dead
    letter), then an edit of each (one in ten a DELETE; the broken ones fixed), as
    (key, value, outcome)."""
    rng = random.Random(35)
    first, second = [], []
    for i in range(docs):
        doc_id = f"doc-{i}"
        text = doc_text(i, paragraphs=2)
        if i % 50 == 7:
            broken = avro_event(doc_id, content=b"%PDF-1.4 broken", filename="x.pdf")
            first.append((doc_id.encode(), broken, "DeadLetter"))
            second.append((*upsert(doc_id, text), "DocManifest"))
            continue
        first.append((*upsert(doc_id, text), "DocManifest"))
        if i % 10 == 9:
            second.append((doc_id.encode(), avro_event(doc_id, op="DELETE"), "DeleteMarker"))
        else:
            second.append((*upsert(doc_id, edited(text, rng)), "DocManifest"))
    return first + second


def expected_outcomes(topics: FlowTopics, events: list[tuple[bytes, bytes, str]]) -> list[Expected]:
    """Each input event, where the broker put it, with the outcome it must have."""
    outcome = {(key, value): kind for key, value, kind in events}
    found = []
    for _, _, msg in read_as(topics.bootstrap, topics.input, "read_uncommitted"):
        kind = outcome[(msg.key(), msg.value())]
        found.append(Expected(msg.key().decode(), msg.partition(), msg.offset(), kind))
    assert len(found) == len(events)
    return found


def progress(topics: FlowTopics, at_least: int, members: dict[str, Member], timeout: float = 240) -> None:
    def done() -> bool:
        # A member that failed ends the wait at once (one stopped on purpose exits 0).
        failed = [name for name, m in members.items() if m.proc.poll() not in (None, 0)]
        assert not failed, f"{failed} failed\n" + "\n".join(m.tail() for m in members.values())
        return committed_total(topics) >= at_least

    assert wait_for(done, timeout=timeout, every=0.5), (
        f"stuck below {at_least} committed events ({committed_total(topics)})\n"
        + "\n".join(m.tail() for m in members.values())
    )


class Churn:
    """The members of one scenario and the faults done to them, each logged."""

    def __init__(self, topics: FlowTopics, gates: Path, args: tuple[str, ...], seed: str) -> None:
        self.topics, self.gates, self.args = topics, gates, args
        self.rng = random.Random(seed)
        self.members = {name: start_member(topics, name, gates, *args) for name in ("a", "b")}
        self.log: list[str] = []

    def restart(self, name: str) -> Member:
        self.members[name] = start_member(self.topics, name, self.gates, *self.args)
        return self.members[name]

    def kill(self) -> None:
        """kill -9 at whatever moment this is, and the member restarted under its name."""
        name = self.rng.choice(["a", "b"])
        self.members[name].kill()
        self.restart(name)
        self.log.append(f"kill -9 {name} at {committed_total(self.topics)} committed")

    def arm_between_produce_and_commit(self) -> None:
        """Before a wave: each running member's next transaction waits before its commit.
        A member chosen after the wave could have committed its share of it already, and
        the test then waited for a commit that never came (seen: 120 s, every event done)."""
        for m in self.running():
            m.hold("_commit")

    def running(self) -> list[Member]:
        return [m for m in self.members.values() if m.proc.poll() is None]

    def kill_between_produce_and_commit(self) -> None:
        """kill -9 a member held between produce and commit (armed before the wave)."""
        assert wait_for(lambda: any(m.reached("_commit") for m in self.running()), timeout=120), "\n".join(
            m.tail() for m in self.running()
        )
        held = self.rng.choice([m for m in self.running() if m.reached("_commit")])
        name = held.name
        # Its records are in the topic and its offsets in the transaction, uncommitted.
        bootstrap, output = self.topics.bootstrap, self.topics.output
        open_ends = open_transaction_ends(bootstrap, output)
        assert open_ends, "the held member's transaction is open"
        held.kill()
        for m in self.members.values():
            m.release("_commit")
        restarted = self.restart(name)
        # The restart under the same name fences the dead member and aborts what it left
        # open, long before transaction.timeout.ms (120 s) would have.
        started = time.monotonic()
        assert wait_for(lambda: stable_past(bootstrap, output, open_ends), timeout=45), (
            "the killed member's open transaction stalled read_committed consumers\n" + restarted.tail()
        )
        self.log.append(
            f"kill -9 {name} between produce and commit; its transaction aborted "
            f"{time.monotonic() - started:.1f} s after the restart"
        )

    def add(self) -> None:
        joined = self.restart("c")
        assert wait_for(lambda: "assigned " in joined.text(), timeout=120), joined.tail()
        self.log.append("c joined")

    def remove(self) -> None:
        assert self.members["c"].stop() == 0, self.members["c"].tail()
        self.log.append("c left (SIGTERM)")

    def broker(self) -> None:
        from flows.dev.kafka import LocalKafka

        broker = LocalKafka()
        broker.stop()
        time.sleep(self.rng.uniform(1, 3))
        broker.start()
        self.log.append("broker restarted")

    def stop_all(self) -> dict[str, int]:
        for m in self.members.values():
            if m.proc.poll() is None:
                m.proc.terminate()
        return {name: m.proc.wait(timeout=120) for name, m in self.members.items()}


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_two_members_deliver_every_chunk_once_through_kills_churn_and_a_broker_restart(
    kafka_bootstrap, tmp_path, mode
):
    incremental = mode == "incremental"
    topics = FlowTopics(kafka_bootstrap, partitions=PARTITIONS)
    events = scenario_events()
    args = ("--batch-size", BATCH, "--max-tokens", "64", *FAST_GROUP, *TXN_TIMEOUT)
    if incremental:
        args += ("--incremental",)
    churn = Churn(topics, tmp_path, args, seed=f"issue-35-{mode}")
    faults = [churn.kill, churn.kill, churn.kill_between_produce_and_commit, churn.add, churn.kill]
    faults += [churn.remove, churn.kill]
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):  # restarts only the project's own broker
        faults.insert(churn.rng.randrange(len(faults) + 1), churn.broker)
    try:
        for number in range(0, len(events), WAVE):
            # The next wave once most of the last is done, so each fault lands mid-stream.
            progress(topics, number - WAVE // 4, churn.members)
            fault = faults.pop(0) if faults else None
            if fault == churn.kill_between_produce_and_commit:
                churn.arm_between_produce_and_commit()
            topics.produce([(k, v) for k, v, _ in events[number : number + WAVE]])
            if fault is not None:
                time.sleep(churn.rng.uniform(0.2, 1.5))  # a random moment of the wave's processing
                fault()
        progress(topics, len(events), churn.members)
    finally:
        codes = churn.stop_all()
    print("\n".join(churn.log))
    members = churn.members
    assert codes["a"] == 0 and codes["b"] == 0, "\n".join(m.tail() for m in members.values())

    expected = expected_outcomes(topics, events)
    found = check_exactly_once(topics, expected, incremental=incremental)
    uncommitted = len(read_as(kafka_bootstrap, topics.output, "read_uncommitted"))
    committed = len(read_as(kafka_bootstrap, topics.output))
    print(f"{mode}: {found['records']} records once each; {uncommitted - committed} aborted records")
    assert uncommitted > committed, "the transaction of the member killed before its commit was aborted"
    if incremental:
        state_topic = Settings(group_id=topics.group).chunk_state_topic()
        entries = check_changelog(topics, state_topic, expected, found["manifests"])
        assert entries == sum(e.outcome != "DeadLetter" for e in expected)
    logs = {name: m.text() for name, m in members.items()}
    assert "left the group" in logs["c"]
    assert all("transactional producer" in t for t in logs.values())


def test_a_zombie_member_is_refused_and_its_transaction_never_becomes_visible(kafka_bootstrap, tmp_path):
    """A member stopped (SIGSTOP) past its session timeout with a batch in hand; its
    partitions move and the other member processes them. Resumed (SIGCONT), it produces
    that batch, but the coordinator refuses its offsets (an old generation: KIP-447),
    the transaction aborts, and the member rejoins. A read_uncommitted consumer sees the
    aborted records; a read_committed one, every outcome exactly once."""
    topics = FlowTopics(kafka_bootstrap, partitions=4)
    events = [
        (f"z-{i}".encode(), avro_event(f"z-{i}", content=f"Zombie document {i}.".encode(), filename="a.txt"))
        for i in range(300)
    ]
    topics.produce(events)
    args = ("--batch-size", "8", *FAST_GROUP)
    zombie = start_member(topics, "zombie", tmp_path, *args)
    zombie.hold("_produce")
    assert wait_for(lambda: zombie.reached("_produce"), timeout=120), zombie.tail()
    other = start_member(topics, "other", tmp_path, *args)
    try:
        # Stopped with its batch computed and not yet produced.
        os.kill(zombie.proc.pid, signal.SIGSTOP)
        zombie.release("_produce")
        # Past the zombie's session timeout its partitions move; the other member does
        # all the work, the zombie's batch included.
        assert wait_for(lambda: committed_total(topics) == len(events), timeout=180), other.tail()
        assert re.search(r"now owning \[0, 1, 2, 3\]", other.text()), other.tail()
        before = len(read_as(kafka_bootstrap, topics.output, "read_uncommitted"))
        os.kill(zombie.proc.pid, signal.SIGCONT)
        assert wait_for(lambda: "not committed" in zombie.text(), timeout=60), zombie.tail()
        # It produced after the move: a read_uncommitted consumer sees those records.
        assert len(read_as(kafka_bootstrap, topics.output, "read_uncommitted")) > before
        # And it rejoins the group rather than stopping.
        assert wait_for(lambda: zombie.text().count("assigned ") >= 2, timeout=60), zombie.tail()
    finally:
        for m in (zombie, other):
            if m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGCONT)
        codes = [m.stop() for m in (zombie, other)]
    assert codes == [0, 0], zombie.tail() + other.tail()
    text = zombie.text()
    assert re.search(r"ILLEGAL_GENERATION|UNKNOWN_MEMBER_ID|generation|fenced", text, re.I), text[-3000:]
    committed = read_as(kafka_bootstrap, topics.output)
    expected = [
        Expected(msg.key().decode(), msg.partition(), msg.offset(), "DocManifest")
        for _, _, msg in read_as(kafka_bootstrap, topics.input, "read_uncommitted")
    ]
    found = check_exactly_once(topics, expected, incremental=False)
    assert found["records"] == len(events)
    aborted = len(read_as(kafka_bootstrap, topics.output, "read_uncommitted")) - len(committed)
    assert aborted > 0, "read_uncommitted consumers see the aborted records"
    # `embedstream tail` prints what a read_committed consumer reads: no aborted record.
    tail = subprocess.run(
        [sys.executable, "-m", "flows.cli", "tail", "--brokers", kafka_bootstrap, "--topic", topics.output,
         "-n", "100000", "--timeout", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert tail.returncode == 0, tail.stderr[-2000:]
    assert len(re.findall(r"^\d+@\d+ ", tail.stdout, re.M)) == len(committed), tail.stdout[-2000:]
    # The sink reads committed records only, and finds the end of a transactional topic
    # (its last offsets are commit markers, which no consumer receives).
    sink = subprocess.run(
        [
            sys.executable, "-m", "flows.cli", "sink", "--until-end", "--from", "beginning",
            "--brokers", kafka_bootstrap, "--output-topic", topics.output,
            "--store", f"lancedb:{tmp_path / 'lance'}", "--group-id", f"{topics.output}.sink",
            "--metrics-port", "0",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert sink.returncode == 0, sink.stderr[-3000:]
    assert f"sink worker done: {len(events)} records, {len(events)} manifests" in sink.stderr, sink.stderr[
        -2000:
    ]


@pytest.mark.parametrize("step", ["embed", "_produce"], ids=["before-its-sink", "inside-its-transaction"])
def test_a_partition_that_leaves_and_comes_back_while_a_batch_is_held_is_committed_once(
    kafka_bootstrap, tmp_path, step
):
    """Member "a" holds a batch of both partitions, polling the group as an outage wait
    does: before its sink (at the embed step) or inside its transaction (before
    producing). Member "b" joins and takes one of the partitions, commits its events and
    leaves, so the partition comes back to "a" while that batch is still held. Released,
    the batch must neither commit that partition's events nor, aborted, read them again:
    "b" committed them, under an earlier assignment. A read_committed consumer sees every
    event's outcome once."""
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    per_partition = 12
    for p in (0, 1):
        topics.produce(
            [
                (key.encode(), avro_event(key, content=f"Document {key}.".encode(), filename="a.txt"))
                for key in (f"p{p}-{i}" for i in range(per_partition))
            ],
            partition=p,
        )
    args = ("--batch-size", str(2 * per_partition), *FAST_GROUP, *TXN_TIMEOUT)
    # A batch waits up to 1 s to fill: a's first one takes every event of both partitions.
    a = start_member(topics, "a", tmp_path, *args, env={"EMBEDSTREAM_POLL_MS": "1000"})
    a.hold(step, polling=True)
    b = None
    try:
        assert wait_for(lambda: a.reached(step), timeout=120), a.tail()
        assert a.held_partitions(step) == {0, 1}, a.tail()
        b = start_member(topics, "b", tmp_path, *args)
        taken = re.compile(rf"assigned {re.escape(topics.input)}\[(\d)\]")
        assert wait_for(lambda: taken.search(b.text()), timeout=120), b.tail()
        moved = int(taken.search(b.text()).group(1))
        assert wait_for(lambda: topics.committed()[moved] == per_partition, timeout=120), b.tail()
        assert b.stop() == 0, b.tail()
        # Back to "a", whose batch is still held.
        back = f"assigned {topics.input}[{moved}];"
        assert wait_for(lambda: back in a.text(), timeout=120), a.tail()
        assert f"revoked {topics.input}[{moved}]" in a.text()
        a.release(step)
        assert wait_for(lambda: committed_total(topics) == 2 * per_partition, timeout=120), a.tail()
    finally:
        a.release(step)
        codes = [m.stop() for m in (a, b) if m is not None]
    assert codes == [0] * len(codes), a.tail() + (b.tail() if b else "")
    print(a.tail())
    expected = [
        Expected(msg.key().decode(), msg.partition(), msg.offset(), "DocManifest")
        for _, _, msg in read_as(kafka_bootstrap, topics.input, "read_uncommitted")
    ]
    found = check_exactly_once(topics, expected, incremental=False)
    assert found["records"] == 2 * per_partition


def test_a_fenced_producer_stops_producing_and_its_member_rejoins(kafka_bootstrap, tmp_path):
    """Another producer takes a member's transactional.id mid-batch: the member's
    producer is fenced, never produces again, and the member leaves the group and
    rejoins with a new producer (which fences the intruder in turn); every event's
    records are committed once."""
    from confluent_kafka import Producer

    topics = FlowTopics(kafka_bootstrap, partitions=2)
    events = [
        (f"f-{i}".encode(), avro_event(f"f-{i}", content=f"Fenced document {i}.".encode(), filename="a.txt"))
        for i in range(60)
    ]
    port = free_port()
    member = start_member(
        topics, "f", tmp_path, "--batch-size", "4", "--metrics-port", str(port), *FAST_GROUP
    )
    member.hold("_produce")
    topics.produce(events)
    try:
        assert wait_for(lambda: member.reached("_produce"), timeout=120), member.tail()
        intruder = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{topics.group}.f.0"})
        intruder.init_transactions(60)
        member.release("_produce")
        assert wait_for(lambda: committed_total(topics) == len(events), timeout=180), member.tail()
        samples = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        assert member.stop() == 0, member.tail()
    assert metric(samples, "embedstream_producer_fenced_total") == 1, samples
    assert metric(samples, 'embedstream_transactions_total{outcome="aborted"}') == 1, samples
    assert metric(samples, 'embedstream_transactions_total{outcome="committed"}') >= len(events) // 4
    text = member.text()
    assert re.search(r"transactional producer \S+\.f\.0 fenced", text), text[-3000:]
    assert text.count("transactional producer") >= 3  # ready, fenced, ready again
    expected = [
        Expected(msg.key().decode(), msg.partition(), msg.offset(), "DocManifest")
        for _, _, msg in read_as(kafka_bootstrap, topics.input, "read_uncommitted")
    ]
    check_exactly_once(topics, expected, incremental=False)


def test_a_broker_outage_inside_a_transaction_is_waited_out_without_aborting(kafka_bootstrap, tmp_path):
    """The broker goes away as a batch's transaction produces its records: the member
    waits for the records to be confirmed, polling the group meanwhile, and the same
    transaction commits once the broker is back; none is aborted."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("restarts only the project's own local broker")
    from flows.dev.kafka import LocalKafka

    topics = FlowTopics(kafka_bootstrap, partitions=2)
    events = [
        (f"o-{i}".encode(), avro_event(f"o-{i}", content=f"Outage document {i}.".encode(), filename="a.txt"))
        for i in range(40)
    ]
    port = free_port()
    # Session and transaction timeouts longer than any restart of a loaded broker: this
    # outage must be ridden out, neither the group nor the broker giving up on the member.
    patient = ("--kafka", "session.timeout.ms=180000", "--kafka", "transaction.timeout.ms=240000")
    member = start_member(
        topics, "solo", tmp_path, "--batch-size", "8", "--metrics-port", str(port), *patient
    )
    member.hold("_produce")
    topics.produce(events)
    broker = LocalKafka()
    try:
        assert wait_for(lambda: member.reached("_produce"), timeout=120), member.tail()
        broker.stop()
        member.release("_produce")
        time.sleep(6)
        broker.start()
        assert wait_for(lambda: committed_total(topics) == len(events), timeout=180), member.tail()
        samples = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        assert member.stop() == 0, member.tail()
    assert "waiting for Kafka to confirm" in member.text(), "the member waited the broker out"
    assert metric(samples, 'embedstream_transactions_total{outcome="aborted"}') == 0, member.tail()
    assert metric(samples, 'embedstream_transactions_total{outcome="committed"}') >= 5
    assert metric(samples, "embedstream_producer_fenced_total") == 0
    assert metric(samples, "embedstream_transaction_commit_seconds_count") >= 5
    assert "revoked" not in member.text().split("waiting for Kafka to confirm")[1].split("left the group")[0]
    expected = [
        Expected(msg.key().decode(), msg.partition(), msg.offset(), "DocManifest")
        for _, _, msg in read_as(kafka_bootstrap, topics.input, "read_uncommitted")
    ]
    check_exactly_once(topics, expected, incremental=False)


def test_the_local_brokers_transaction_log_has_one_replica_and_min_isr_one(kafka_bootstrap):
    """A single broker must be able to run transactions: its transaction state log is
    created with one replica and min.insync.replicas=1 (a production cluster: 3 and 2)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("checks the project's own local broker")
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    from flows.dev.kafka import LocalKafka

    config = (LocalKafka().home / f"server-{LocalKafka().port}.properties").read_text()
    assert "transaction.state.log.replication.factor=1" in config.splitlines()
    assert "transaction.state.log.min.isr=1" in config.splitlines()
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": "embedstream-tests.txnlog"}
    )
    producer.init_transactions(60)  # creates the log if no transaction ran yet
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    meta = admin.list_topics("__transaction_state", timeout=30).topics["__transaction_state"]
    assert meta.partitions and all(len(p.replicas) == 1 for p in meta.partitions.values())
    resource = ConfigResource(ResourceType.TOPIC, "__transaction_state")
    described = admin.describe_configs([resource])[resource].result(timeout=30)
    assert described["min.insync.replicas"].value == "1"


def test_exactly_once_refuses_cluster_mode_and_a_missing_member_name(kafka_bootstrap):
    topics = FlowTopics(kafka_bootstrap)
    env = {k: v for k, v in os.environ.items() if k not in ("POD_NAME", "KUBERNETES_SERVICE_HOST")}
    for args, extra_env, says in (
        (("--exactly-once", "--scaling", "cluster"), {}, "exactly_once needs scaling=group"),
        (("--exactly-once", "--member-name", "m", "-a", "127.0.0.1:2101"), {}, "needs scaling=group"),
        (("--exactly-once",), {}, "exactly_once needs a stable member name: --member-name"),
        (("--exactly-once", "--member-name", "a b"), {}, "member name 'a b'"),
        (
            ("--exactly-once", "--member-name", "m"),
            {"EMBEDSTREAM_FLUSH_TIMEOUT_S": "60"},
            "transaction.timeout.ms (60000) must exceed the flush timeout (60000 ms)",
        ),
        (
            ("--exactly-once", "--member-name", "m", "--kafka", "transactional.id=x"),
            {},
            "transactional.id is derived from the member name",
        ),
    ):
        result = subprocess.run(
            run_args(topics, "--model", TINY_MODEL, *args),
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, **extra_env},
        )
        assert result.returncode == 2 and says in result.stderr, (args, result.stderr[-2000:])
    # The flush timeout follows the transaction timeout, and a longer one is refused.
    settings = Settings(exactly_once=True, member_name="m", kafka={"transaction.timeout.ms": "90000"})
    assert settings.flush_timeout() == 72
    with pytest.raises(ValueError, match="must exceed the flush timeout"):
        Settings(exactly_once=True, member_name="m", flush_timeout_s=60).validate()
    assert Settings().flush_timeout() == 300  # at-least-once keeps its 300 s
    assert Settings(exactly_once=True).member({"POD_NAME": "embedstream-3"}) == "embedstream-3"
    in_pod = {"HOSTNAME": "embedstream-0", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert Settings(exactly_once=True).member(in_pod) == "embedstream-0"
    with pytest.raises(ValueError, match="stable member name"):
        Settings(exactly_once=True).member({"HOSTNAME": "laptop"})  # outside Kubernetes: not stable enough


def transactional_source(kafka_bootstrap: str, topics: FlowTopics, member: str, batch_size: int):
    """A GroupInput whose members are evicted 6 s after their last poll, each worker with
    its own transactional producer (``<group>.<member>.<worker>``): for tests that drive
    group members directly, without Bytewax."""
    from flows.kafka.group import GroupInput
    from flows.kafka.io import ReadOptions
    from flows.kafka.transactions import Transactions, transactional_id

    config = {
        "bootstrap.servers": kafka_bootstrap,
        "group.id": topics.group,
        "session.timeout.ms": "6000",
        "heartbeat.interval.ms": "1000",
        "max.poll.interval.ms": "6000",
    }
    return GroupInput(
        config,
        topics.input,
        ReadOptions(batch_size=batch_size, poll_ms=200),
        transactions=lambda worker: Transactions(
            {"bootstrap.servers": kafka_bootstrap},
            transactional_id(topics.group, member, worker),
            flush_timeout_s=30,
        ),
    )


def outputs_of(topics: FlowTopics, batch: list, prefix: bytes = b"") -> list:
    """One output record per event of ``batch``, its value ``prefix`` + the event's."""
    from flows.kafka.io import OutputMessage

    return [
        OutputMessage(
            topics.output,
            m.key,
            prefix + m.value,
            source=(m.topic, m.partition, m.offset),
            source_assignment=m.assignment,
        )
        for m in batch
    ]


def next_batch_of(member, timeout: float = 60) -> list:
    """The member's next non-empty batch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = member.next_batch()
        if batch:
            return batch
    raise AssertionError(f"no batch in {timeout:.0f} s")


def test_a_worker_commits_only_its_own_batch_never_one_whose_partition_moved(kafka_bootstrap):
    """The workers of one process (``-w 2``) are two members of the group, each with its
    own transactional producer. Worker 0 is evicted (past max.poll.interval.ms) with a
    batch in hand, and its partition moves to worker 1, which takes a batch of it. When
    worker 0's outputs then reach its sink, they are dropped (worker 1 processes those
    events), never committed through worker 1's transaction; worker 1 commits its own
    batch, with its own group metadata."""
    from flows.kafka import group
    from flows.kafka.io import KafkaOutput

    topics = FlowTopics(kafka_bootstrap, partitions=1)
    topics.produce([(f"k{i}".encode(), f"event {i}".encode()) for i in range(4)])
    source = transactional_source(kafka_bootstrap, topics, "w", batch_size=4)
    sink = KafkaOutput({}, 30, transact=group.transact)

    first = source.build("documents", 0, 2).member
    second = None
    try:
        held = next_batch_of(first)
        second = source.build("documents", 1, 2).member
        # Worker 0 spends longer on its batch than max.poll.interval.ms: the group goes on
        # without it, and worker 1 takes the partition from its committed offset.
        taken = next_batch_of(second)
        assert [m.offset for m in taken] == [m.offset for m in held]
        # An outage wait anywhere in the process polls every member (the keepers): worker 0
        # learns it lost the partition.
        assert wait_for(lambda: (first.keep_alive(), 0 not in first.in_flight)[1], timeout=30)
        sink.build("kafka", 0, 2).write_batch(outputs_of(topics, held, b"worker 0: "))
        sink.build("kafka", 1, 2).write_batch(outputs_of(topics, taken, b"worker 1: "))
    finally:
        for member in (first, second):
            if member is not None:
                member.close()
    values = [msg.value() for _, _, msg in read_as(kafka_bootstrap, topics.output)]
    assert values == [f"worker 1: event {i}".encode() for i in range(4)]
    assert topics.committed() == [4]


def test_a_batch_handed_over_before_its_partition_left_and_came_back_is_never_committed(kafka_bootstrap):
    """The window of issue 35, forced at the member: a batch is handed over, the member
    loses its partition (evicted past max.poll.interval.ms, learnt in an outage wait's
    poll), gets it back under a new assignment and hands over a longer batch of the same
    events, before the first batch reaches the sink. (Bytewax itself runs a worker's
    batch to its sink before it asks for the next; this holds even if it did not.) The
    first batch is not committed, though its partition is in flight again and the
    member's group metadata is current: each event's record is committed once."""
    from flows.kafka import group
    from flows.kafka.io import KafkaOutput

    topics = FlowTopics(kafka_bootstrap, partitions=1)
    topics.produce([(f"k{i}".encode(), f"event {i}".encode()) for i in range(4)])
    source = transactional_source(kafka_bootstrap, topics, "m", batch_size=8)
    sink = KafkaOutput({}, 30, transact=group.transact).build("kafka", 0, 1)

    member = source.build("documents", 0, 1).member
    try:
        old = next_batch_of(member)
        assert [m.offset for m in old] == [0, 1, 2, 3]
        time.sleep(8)  # past max.poll.interval.ms: the group goes on without the member
        assert wait_for(lambda: (member.keep_alive(), 0 not in member.in_flight)[1], timeout=30)
        topics.produce([(f"k{i}".encode(), f"event {i}".encode()) for i in range(4, 8)])
        new = next_batch_of(member)  # the partition back, from the committed offset
        assert [m.offset for m in new] == list(range(len(new))) and len(new) > len(old)
        assert new[0].assignment > old[0].assignment
        sink.write_batch(outputs_of(topics, old))
        sink.write_batch(outputs_of(topics, new))
    finally:
        member.close()
    values = [msg.value() for _, _, msg in read_as(kafka_bootstrap, topics.output)]
    assert values == [f"event {i}".encode() for i in range(len(new))]
    assert topics.committed() == [len(new)]


def test_events_given_back_go_only_to_the_worker_that_handed_them_over(kafka_bootstrap):
    """``-w 2``: worker 0 hands over a batch and is evicted (past max.poll.interval.ms);
    worker 1 takes the partition as its own first assignment and hands over its own batch
    of the same events. The flow's time budget then cuts worker 0's batch and gives its
    tail back. Worker 1 must not take it: it would hand those events over again after
    committing its own batch (duplicates for read_committed consumers). Assignment numbers
    are unique in the process, so worker 0's batch is never taken for worker 1's."""
    from flows.kafka import group

    topics = FlowTopics(kafka_bootstrap, partitions=1)
    topics.produce([(f"k{i}".encode(), f"event {i}".encode()) for i in range(4)])
    source = transactional_source(kafka_bootstrap, topics, "g", batch_size=4)

    first = source.build("documents", 0, 2).member
    second = None
    try:
        old = next_batch_of(first)
        assert [m.offset for m in old] == [0, 1, 2, 3]
        second = source.build("documents", 1, 2).member
        # Worker 0 is not polled: the group goes on without it, and worker 1 takes the
        # partition from the committed offset (none: the start).
        taken = next_batch_of(second)
        assert [m.offset for m in taken] == [0, 1, 2, 3]
        group.give_back(old[2:])  # worker 0's batch cut by its time budget
        group.transact(outputs_of(topics, taken), 1)
        assert topics.committed() == [4]
        again: list = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            again += second.next_batch()
        assert [m.offset for m in again] == [], "worker 1 handed worker 0's given-back events over again"
    finally:
        for member in (first, second):
            if member is not None:
                member.close()
    values = [msg.value() for _, _, msg in read_as(kafka_bootstrap, topics.output)]
    assert values == [f"event {i}".encode() for i in range(4)]
    assert topics.committed() == [4]


def test_at_least_once_offsets_go_to_the_worker_that_owns_the_partition_now(kafka_bootstrap):
    """At-least-once, ``-w 2``: worker 0 hands over a batch and is evicted; worker 1 takes
    the partition and hands over its own batch of the same events. The sink's offsets of
    worker 1's batch carry no worker: they must reach worker 1, the partition's latest
    assignment in the process, not worker 0, which still has the partition in flight
    without knowing it lost it. Taken by worker 0, they were committed through its dead
    membership, and worker 1, its batch never done, handed nothing over again."""
    from flows.kafka import group

    topics = FlowTopics(kafka_bootstrap, partitions=1)
    topics.produce([(f"k{i}".encode(), f"event {i}".encode()) for i in range(4)])
    source = transactional_source(kafka_bootstrap, topics, "alo", batch_size=4)
    source.transactions = None  # at-least-once: the group commits the offsets

    first = source.build("documents", 0, 2).member
    second = None
    try:
        assert [m.offset for m in next_batch_of(first)] == [0, 1, 2, 3]
        second = source.build("documents", 1, 2).member
        assert [m.offset for m in next_batch_of(second)] == [0, 1, 2, 3]
        assert group.commit({(topics.input, 0): 4}) == {}
        assert topics.committed() == [4], "worker 1's offsets were not committed"
        topics.produce([(b"k4", b"event 4")])
        assert [m.offset for m in next_batch_of(second, timeout=15)] == [4]
    finally:
        for member in (first, second):
            if member is not None:
                member.close()


def test_two_workers_of_a_member_are_both_fenced_after_kill_9_and_every_chunk_is_committed_once(
    kafka_bootstrap, tmp_path
):
    """``-w 2``: member "a" runs two workers, each a member of the group with its own
    transactional producer (``<group>.a.0``, ``<group>.a.1``), beside member "b" with one,
    in incremental mode on 6 partitions. "a" is killed (kill -9) while both its workers
    hold a transaction open, records produced and offsets sent. Restarted under its name,
    it fences both zombies at once, so read_committed consumers are not held up until
    transaction.timeout.ms. A read_committed consumer sees every chunk exactly once, and
    the changelog holds exactly the committed versions."""
    topics = FlowTopics(kafka_bootstrap, partitions=6)
    events = scenario_events(docs=160)
    topics.produce([(k, v) for k, v, _ in events[:60]])
    args = ("--batch-size", "8", "--max-tokens", "64", "--incremental", *FAST_GROUP, *TXN_TIMEOUT)
    members = {
        "a": start_member(topics, "a", tmp_path, "-w", "2", *args),
        "b": start_member(topics, "b", tmp_path, *args),
    }
    bootstrap, output = topics.bootstrap, topics.output
    try:
        # Everyone in the group and working, then the rest with both of a's workers held
        # with their records produced and their offsets in the transaction, uncommitted.
        progress(topics, 60, members)
        held = members["a"]
        held.hold("_commit")
        topics.produce([(k, v) for k, v, _ in events[60:]])
        assert wait_for(lambda: held.reached("_commit", 0) and held.reached("_commit", 1), timeout=120), (
            held.tail()
        )
        open_ends = open_transaction_ends(bootstrap, output)
        assert open_ends, "a's transactions are open"
        held.kill()
        held.release("_commit")
        members["a"] = start_member(topics, "a", tmp_path, "-w", "2", *args)
        # Both transactional ids are taken over at start: both open transactions abort
        # long before transaction.timeout.ms (120 s).
        assert wait_for(lambda: stable_past(bootstrap, output, open_ends), timeout=45), (
            "a killed worker's open transaction stalled read_committed consumers\n" + members["a"].tail()
        )
        progress(topics, len(events), members)
    finally:
        codes = {name: m.stop() for name, m in members.items()}
    assert codes == {"a": 0, "b": 0}, "\n".join(m.tail() for m in members.values())
    restarted = members["a"].text()
    # Its timeouts as it starts: the flush timeout under transaction.timeout.ms, and the
    # batch time budget (a fifth of max.poll.interval.ms) outside the transaction.
    assert "flush timeout 96 s; a batch's 60 s budget of work runs before its transaction opens" in restarted
    for worker in (0, 1):
        assert f"transactional producer {topics.group}.a.{worker} ready" in restarted, restarted[-3000:]

    expected = expected_outcomes(topics, events)
    found = check_exactly_once(topics, expected, incremental=True)
    state_topic = Settings(group_id=topics.group).chunk_state_topic()
    entries = check_changelog(topics, state_topic, expected, found["manifests"])
    assert entries == sum(e.outcome != "DeadLetter" for e in expected)
    aborted = len(read_as(bootstrap, output, "read_uncommitted")) - len(read_as(bootstrap, output))
    assert aborted > 0, "the killed workers' transactions were aborted, not committed"


def test_a_batch_whose_partition_left_and_came_back_during_its_fetch_leaves_the_chunk_state_alone(
    kafka_bootstrap, tmp_path
):
    """Incremental mode. Member "a" holds a batch of both partitions in its fetch step, as
    an object-store outage does (polling the group), before it reads the chunk state.
    Member "b" joins, takes one partition and is killed with that partition's events in
    hand, uncommitted; the partition comes back to "a" under a new assignment. Released,
    a's held batch must not write those events' chunk ids into the state: its outcome of
    them is never committed, and a's new assignment, reading them again, would find them
    known and send manifests without vectors. Every chunk is committed once, and the
    changelog matches."""
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    per_partition = 6
    for p in (0, 1):
        topics.produce(
            [upsert(f"p{p}-{i}", doc_text(10 * p + i, paragraphs=2)) for i in range(per_partition)],
            partition=p,
        )
    step = "fetch_and_extract"
    args = ("--batch-size", str(2 * per_partition), "--max-tokens", "64", "--incremental", *FAST_GROUP)
    args += TXN_TIMEOUT
    # A batch waits up to 1 s to fill: a's first one takes every event of both partitions.
    a = start_member(topics, "a", tmp_path, *args, env={"EMBEDSTREAM_POLL_MS": "1000"})
    a.hold(step, polling=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / step).write_text("")  # b holds its first batch, not polling
    b = None
    try:
        assert wait_for(lambda: a.reached(step), timeout=120), a.tail()
        assert a.held_partitions(step) == {0, 1}, a.tail()
        b = start_member(topics, "b", tmp_path, *args)
        assert wait_for(lambda: b.reached(step), timeout=120), b.tail()
        moved = b.held_partitions(step)
        assert len(moved) == 1, b.tail()
        b.kill()  # its batch never committed
        back = f"assigned {topics.input}[{moved.pop()}];"
        assert wait_for(lambda: back in a.text(), timeout=120), a.tail()
        a.release(step)
        assert wait_for(lambda: committed_total(topics) == 2 * per_partition, timeout=120), a.tail()
    finally:
        a.release(step)
        if b is not None and b.proc.poll() is None:
            b.kill()
        code = a.stop()
    assert code == 0, a.tail()
    expected = [
        Expected(msg.key().decode(), msg.partition(), msg.offset(), "DocManifest")
        for _, _, msg in read_as(kafka_bootstrap, topics.input, "read_uncommitted")
    ]
    found = check_exactly_once(topics, expected, incremental=True)
    state_topic = Settings(group_id=topics.group).chunk_state_topic()
    assert check_changelog(topics, state_topic, expected, found["manifests"]) == 2 * per_partition
