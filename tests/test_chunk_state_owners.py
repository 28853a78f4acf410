"""Incremental mode's chunk state in group mode: only a partition's current assignment
writes it. The workers of a process (``-w N``) share the state by input partition, and a
batch whose partition moved after it was handed over (an outage wait polls the group,
so this can happen in any step) is never committed by its worker: its outcome must not
reach the state the partition's next owner reads. Group members report each move with
the assignment's number (process-wide, later ones higher); each event carries the number
it was handed over under."""

from __future__ import annotations

from flows import runtime
from flows.chunk_state import OWNERS, ChunkState, Owners, _Recent, pack
from flows.embed_steps import Batch, Work
from flows.kafka.io import InputMessage
from flows.settings import Settings

IDS = ["ab" * 32, "cd" * 32]


def state() -> ChunkState:
    return ChunkState(Settings(incremental=True), restore=False, owners=Owners())


def batch(offset: int, assignment: int, topic: str = "docs") -> Batch:
    """One UPSERT of document "d" on partition 0, handed over under ``assignment``."""
    message = InputMessage(topic, 0, offset, b"d", b"", None, assignment=assignment)
    return Batch([Work(message, event={"doc_id": "d", "op": "UPSERT"}, ids=IDS, fresh=[True, True])])


def test_a_partition_that_moves_between_hand_over_and_the_chunk_step_leaves_the_state_alone():
    """Issue 35, finding B: the partition is revoked and assigned back (here or to another
    worker of the process) while the batch waits out an object-store outage in its fetch
    step, before it reads the state. Its outcome is never committed (its assignment
    ended), so it writes neither the state nor a changelog entry; the new assignment,
    reading the same event again, embeds every chunk."""
    s = state()
    s.moved("docs", 0, 1, "assigned")
    held = batch(5, assignment=1)  # handed over
    s.moved("docs", 0, 1, "ended")  # revoked during the fetch step's outage wait
    s.moved("docs", 0, 2, "assigned")  # and assigned back
    s.mark_fresh(held)
    assert s.remember(held) == [], "a batch of an ended assignment wrote a changelog entry"
    again = batch(5, assignment=2)
    s.mark_fresh(again)
    assert again[0].fresh == [True, True], "the ended assignment's outcome reached the state"
    assert len(s.remember(again)) == 1
    after = batch(6, assignment=2)
    s.mark_fresh(after)
    assert after[0].fresh == [False, False], "the current assignment's own outcome is remembered"


def test_a_batch_whose_partition_moved_after_it_read_the_state_leaves_it_alone():
    """Worker 0 reads the state for a batch; the partition then moves to worker 1 before
    worker 0's batch is encoded: worker 0 writes nothing, worker 1 embeds every chunk."""
    s = state()
    s.moved("docs", 0, 1, "assigned")
    held = batch(5, assignment=1)
    s.mark_fresh(held)
    s.moved("docs", 0, 1, "ended")  # revoked from worker 0
    s.moved("docs", 0, 2, "assigned")  # assigned to worker 1
    assert s.remember(held) == []
    taken = batch(5, assignment=2)
    s.mark_fresh(taken)
    assert taken[0].fresh == [True, True]
    assert len(s.remember(taken)) == 1


def test_an_evicted_worker_learning_of_its_loss_late_neither_writes_nor_disturbs_the_new_owner():
    """Worker 0 is evicted (past max.poll.interval.ms) and learns it only at its next poll,
    after worker 1 was assigned the partition and remembered a version. Worker 0's batch,
    though its member still thinks it owns the partition, must not write; its late "lost"
    must neither stop worker 1's writes nor drop worker 1's state."""
    s = state()
    s.moved("docs", 0, 1, "assigned")  # worker 0
    stale = batch(5, assignment=1)
    s.moved("docs", 0, 2, "assigned")  # worker 1, while worker 0 does not know yet
    taken = batch(5, assignment=2)
    s.mark_fresh(taken)
    assert len(s.remember(taken)) == 1
    s.mark_fresh(stale)
    assert s.remember(stale) == [], "an overtaken assignment wrote the state"
    s.moved("docs", 0, 1, "ended")  # worker 0 learns it lost the partition
    s.moved("docs", 0, 1, "rewound")  # and its transaction aborts
    after = batch(6, assignment=2)
    s.mark_fresh(after)
    assert after[0].fresh == [False, False], "worker 0's late move dropped worker 1's state"
    assert len(s.remember(after)) == 1, "worker 0's late move stopped worker 1's writes"


def test_a_rewound_batch_drops_what_it_wrote_and_its_assignment_writes_on():
    """An aborted transaction: the batch's writes never reached the changelog, so the
    state in memory is dropped (read back on next use); the same assignment reads the
    batch again and writes it."""
    s = state()
    s.moved("docs", 0, 1, "assigned")
    first = batch(5, assignment=1)
    s.mark_fresh(first)
    assert len(s.remember(first)) == 1
    s.moved("docs", 0, 1, "rewound")
    again = batch(5, assignment=1)
    s.mark_fresh(again)
    assert again[0].fresh == [True, True], "an aborted batch's outcome stayed in the state"
    assert len(s.remember(again)) == 1


def test_events_of_cluster_mode_and_of_unreported_partitions_are_not_guarded():
    s = state()
    plain = batch(1, assignment=0)
    s.mark_fresh(plain)
    assert len(s.remember(plain)) == 1
    s.moved("docs", 0, 3, "ended")  # ended: even number 0 writes on (cluster mode never moves)
    assert len(s.remember(batch(2, assignment=0))) == 1
    assert len(s.remember(batch(3, assignment=7, topic="other"))) == 1


def test_moves_reported_before_the_pipeline_exists_guard_its_state(monkeypatch):
    """Members are assigned partitions before a worker builds the pipeline (and its
    state): those moves are recorded process-wide all the same."""
    monkeypatch.setattr(runtime, "_pipeline", None)  # no worker has built it yet
    topic = "owners-before-the-pipeline"
    runtime.forget_state(topic, {0: 11}, "assigned")
    runtime.forget_state(topic, {0: 11}, "ended")
    late = ChunkState(Settings(incremental=True), restore=False)
    assert late.owners is OWNERS
    assert late.remember(batch(1, assignment=11, topic=topic)) == []
    runtime.forget_state(topic, {0: 12}, "assigned")
    assert len(late.remember(batch(1, assignment=12, topic=topic))) == 1


def test_a_restore_that_was_reading_when_its_partition_moved_does_not_install_what_it_read():
    """A batch's first use of a partition reads its changelog back; the partition is
    revoked, another process commits a newer version (removing a chunk), and the
    partition comes back, all while that read runs. The read's result is older than the
    changelog now: installed, the next batch would take the removed chunk for known and
    send a manifest without its vector. The restore reads again instead."""
    reads: list[dict[str, list[str]]] = []
    changelog = {"d": IDS}  # v1, what the first read finds

    class Restoring(ChunkState):
        def _read_back(self, topic, partition):
            docs = _Recent(1 << 20)
            for doc_id, ids in changelog.items():
                docs.put((topic, partition, doc_id), pack(ids))
            reads.append(dict(changelog))
            if len(reads) == 1:  # the moves arrive while this read is under way
                self.moved(topic, partition, 1, "ended")
                changelog["d"] = IDS[:1]  # another process's v2, without the second chunk
                self.moved(topic, partition, 2, "assigned")
            return docs

    s = Restoring(Settings(incremental=True), restore=True, owners=Owners())
    s.moved("docs", 0, 1, "assigned")
    s.mark_fresh(batch(5, assignment=1))
    taken = batch(7, assignment=2)
    s.mark_fresh(taken)
    assert len(reads) == 2, "the restore kept a read that began before the partition moved"
    assert taken[0].fresh == [False, True], "the second chunk, removed by v2, was taken for known"
