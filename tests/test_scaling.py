"""Group mode on a real broker: workers join and leave the consumer group while it
runs, partitions move between them, and every event still ends as exactly one outcome
(twice only if it was in hand at a kill -9, and then identically)."""

from __future__ import annotations

import re
import signal
import subprocess
from collections import defaultdict

from kafka_helpers import (
    FlowTopics,
    check_outcomes,
    log_tail,
    mixed_events,
    mixed_outcome,
    run_args,
    start_flow,
    wait_for,
)

PARTITIONS = 8
BATCH = 16
#: A killed member leaves the group after this; the default (45 s) would stall the test.
FAST_GROUP = ("--kafka", "session.timeout.ms=6000", "--kafka", "heartbeat.interval.ms=1000")


def churn_text(i: int, doc_id: str) -> str:
    return (
        f"Document {i} is about partition {i % PARTITIONS} and worker churn. "
        f"Consumer groups move partition {i % 13} between members while batch {i // BATCH} runs. "
        f"Offsets are committed after delivery, number {i * 7919 % 10007}."
    )


def churn_events(n: int) -> list[tuple[bytes, bytes]]:
    return mixed_events(n, churn_text, dead_every=50)


def expected(doc_id: str) -> str:
    return mixed_outcome(doc_id, dead_every=50)


def committed_total(topics: FlowTopics) -> int:
    return sum(max(offset, 0) for offset in topics.committed())


def test_workers_join_leave_and_die_while_every_event_ends_once(kafka_bootstrap):
    topics = FlowTopics(kafka_bootstrap, partitions=PARTITIONS)
    events = churn_events(5000)
    topics.produce(events)
    args = ("--batch-size", str(BATCH), *FAST_GROUP)

    def progress(at_least: int) -> None:
        assert wait_for(lambda: committed_total(topics) >= at_least, timeout=300, every=1), (
            f"stuck below {at_least} committed events: {committed_total(topics)}"
        )

    workers: dict[str, subprocess.Popen] = {"w1": start_flow(topics, *args)}
    try:
        progress(300)
        workers["w2"] = start_flow(topics, *args)
        progress(900)
        workers["w3"] = start_flow(topics, *args)
        progress(1500)
        workers["w1"].kill()  # kill -9: its batch in hand is processed again by the next owner
        workers["w1"].wait()
        progress(2300)
        workers["w3"].send_signal(signal.SIGTERM)  # drains: finishes, flushes, commits, leaves
        assert workers["w3"].wait(timeout=120) == 0, log_tail(workers["w3"])
        progress(2900)
        workers["w4"] = start_flow(topics, *args, "-w", "2")  # two members in one process
        progress(len(events))
    finally:
        for w in workers.values():
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for name in ("w2", "w4"):
            assert workers[name].wait(timeout=120) == 0, log_tail(workers[name])

    # Every worker owned partitions at some point; the drained one left cleanly.
    logs = {name: open(w.log, errors="replace").read() for name, w in workers.items()}
    for name, text in logs.items():
        assert "assigned " in text, f"{name} never owned a partition:\n{text[-3000:]}"
    assert "left the group" in logs["w3"]

    # Every event ended as its outcome; one processed again gave identical records
    # (same chunk ids, text and spans, vectors within cosine 0.99999).
    ids = [k.decode() for k, _ in events]
    outcomes = check_outcomes(topics, ids, dead_every=50, min_cosine=0.99999)
    twice = []
    for doc_id in ids:
        kinds = outcomes[doc_id]
        done = kinds[expected(doc_id)]
        if done > 1:
            twice.append(doc_id)
        if expected(doc_id) == "DocManifest":
            assert kinds["VectorRecord"] == done, f"{doc_id}: each processing sent its vectors"
    # Twice only if in hand at the kill: at most one batch of the killed worker.
    print(
        f"processed twice: {len(twice)}; moves: "
        + ", ".join(
            f"{n}: {t.count('assigned ')} assigned, {t.count('revoked ')} revoked" for n, t in logs.items()
        )
    )
    assert len(twice) <= BATCH, f"{len(twice)} events processed twice: {twice[:20]}"
    assert committed_total(topics) == len(events)


def manifests(topics: FlowTopics) -> list[dict]:
    return [r for kind, r, _ in topics.read(topics.output) if kind == "DocManifest"]


def test_chunk_state_moves_with_its_partition_to_a_joining_worker(kafka_bootstrap):
    """Incremental mode: a partition that moves to a new member brings its per-document
    state (read back from the changelog on assignment), so updates there still embed
    only their new chunks."""
    import random

    from test_incremental import MAX_TOKENS, doc_text, edited, upsert

    topics = FlowTopics(kafka_bootstrap, partitions=2)
    docs = {f"doc-{i}": doc_text(i, paragraphs=8) for i in range(12)}
    topics.produce([upsert(d, p) for d, p in docs.items()])
    args = ("--incremental", "--max-tokens", MAX_TOKENS, "--batch-size", "4", *FAST_GROUP)
    first = start_flow(topics, *args)
    second = None
    try:
        assert wait_for(lambda: len(manifests(topics)) >= len(docs), timeout=300), log_tail(first)
        second = start_flow(topics, *args)
        # Cooperative-sticky: the first member gives one partition to the newcomer.
        assert wait_for(lambda: "assigned " in open(second.log).read(), timeout=120), log_tail(second)
        assert wait_for(lambda: "revoked " in open(first.log).read(), timeout=60), log_tail(first)
        rng = random.Random(7)
        topics.produce([upsert(d, edited(p, rng)) for d, p in docs.items()])
        assert wait_for(lambda: len(manifests(topics)) >= 2 * len(docs), timeout=300), log_tail(second)
    finally:
        for w in (first, second):
            if w is not None:
                w.send_signal(signal.SIGTERM)
        for w in (first, second):
            if w is not None:
                assert w.wait(timeout=120) == 0, log_tail(w)
    second_log = open(second.log).read()
    assert "chunk state of input partition" in second_log, "the newcomer read its partition's state back"
    first_assignment = re.search(r"assigned \S+\[([\d, ]+)\]", second_log).group(1)
    moved = {int(p) for p in first_assignment.split(",")}
    # Every update, on either partition, embedded only chunks its document did not have.
    records = [r for kind, r, _ in topics.read(topics.output) if kind == "VectorRecord"]
    versions: dict[str, list[dict]] = defaultdict(list)
    for m in manifests(topics):
        versions[m["doc_id"]].append(m)
    on_moved = 0
    for doc_id, ms in versions.items():
        update = max(ms, key=lambda m: m["doc_version"]["offset"])
        sent = [r for r in records if r["doc_id"] == doc_id and r["doc_version"] == update["doc_version"]]
        assert 0 < len(sent) < len(update["chunks"]) / 2, (
            f"{doc_id}: {len(sent)} of {len(update['chunks'])} chunks embedded again"
        )
        on_moved += update["doc_version"]["partition"] in moved
    assert on_moved > 0, "some updates went to the partition that moved"


def test_a_cluster_will_not_run_beside_live_group_members(kafka_bootstrap):
    """The mistake this mode fixes, caught when made the other way round: a Bytewax
    cluster does not join the group, so beside live members it would redo their work."""
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    member = start_flow(topics)
    try:
        assert wait_for(lambda: "assigned " in open(member.log).read(), timeout=120), log_tail(member)
        cluster = subprocess.run(
            run_args(topics, "--scaling", "cluster"), capture_output=True, text=True, timeout=120
        )
        assert cluster.returncode == 2
        assert f"consumer group {topics.group} has 1 live member" in cluster.stderr
    finally:
        member.send_signal(signal.SIGTERM)
        assert member.wait(timeout=120) == 0, log_tail(member)


def test_settings_that_belong_to_cluster_mode_are_clear_errors_in_group_mode(kafka_bootstrap, tmp_path):
    topics = FlowTopics(kafka_bootstrap)
    for args, says in (
        (("--scaling", "group", "-a", "127.0.0.1:2101"), "use --scaling cluster"),
        (("--recovery-dir", str(tmp_path)), "recovery_dir is for scaling=cluster"),
    ):
        result = subprocess.run(run_args(topics, *args), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and says in result.stderr, result.stderr[-2000:]


def test_until_end_from_latest_finishes_and_commits_the_end(kafka_bootstrap):
    """A new group told to start at the latest offsets has nothing to do before them:
    it commits where it stands (so the group is caught up) and stops."""
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    topics.produce(churn_events(10))
    topics.run("--from", "latest", timeout=120)
    assert topics.read(topics.output) == [] and topics.read(topics.dlq) == []
    assert sum(topics.committed()) == 10
