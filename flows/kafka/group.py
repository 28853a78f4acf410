"""Group mode: each worker is one member of the Kafka consumer group.

Workers start and stop independently and Kafka moves partitions between them
(cooperative-sticky assignment: a rebalance moves only the partitions that change
owner; the others keep flowing). What makes that safe:

- **One batch in hand at a time.** The source hands a batch over, then does not poll
  again until the sink has delivered every record of it and committed its offsets
  through this member's own consumer (the broker accepts commits of a live group only
  from its members). Rebalance callbacks run only inside a poll, so when partitions
  are revoked nothing of theirs is in flight: the batch in hand was finished, flushed
  and committed before they go.
- **Revoked partitions leave nothing behind.** Messages fetched but not yet handed over
  are dropped (the next owner starts at the committed offset), offsets delivered but not
  yet committed are committed in the revoke callback, and the partition's per-document
  state is forgotten (``on_moved``); the next owner reads it back from its changelog.
- **Lost partitions** (this member was too slow and the group went on without it) are
  dropped without committing: their next owner processes the uncommitted events again,
  with identical records.
- **Each assignment of a partition is numbered** (``assignment``), uniquely in the
  process (its workers are members too), and every event carries the number it was
  read under, and its outputs too. A partition revoked and assigned back while a batch
  of it is still on its way (an outage wait polls the group) is a new assignment: the
  old batch's events of it are neither committed, nor read again from that batch's
  first offset, nor taken back by any member when the batch is cut, nor written into the
  chunk state (``on_moved`` tells it each partition's current assignment). The new
  assignment starts from the group's committed offset, which the owner in between may
  have moved past them.
- **Exactly-once** (``transactions``, :mod:`flows.kafka.transactions`): the sink hands a
  batch's outputs to :func:`transact` instead, and the member of the sink's own worker
  (the one that handed the batch over) commits them with the input offsets in one
  transaction. A partition revoked or lost while that transaction
  is open dooms it (aborted before the callback returns); an aborted batch is read
  again from its first offset by this member where it still owns the partition, by the
  next owner elsewhere; a fenced producer makes the member leave the group and rejoin
  with a new one.

Bytewax runs the dataflow unchanged: :class:`GroupInput` is a ``DynamicSource``, one
member per worker thread, and the sink finds the member of each partition through
:func:`commit`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Optional

from bytewax.inputs import DynamicSource, StatelessSourcePartition
from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaTopicPartition

from flows import metrics, outage
from flows.kafka.io import (
    STOP,
    InputMessage,
    Move,
    OutputMessage,
    ReadOptions,
    input_message,
    report_lag,
    take_batch,
)
from flows.kafka.transactions import Aborted, Fenced, Stuck, Transactions

log = logging.getLogger("embedstream.group")

#: Called with (topic, {partition: assignment number}, how) when partitions are assigned,
#: revoked or lost (``"ended"``), or a batch of them rewound: the flow's per-document state
#: follows (only a partition's current assignment may write it; what is cached of it may
#: be stale).
OnMoved = Callable[[str, dict[int, int], Move], None]

_members: list[GroupMember] = []
_members_lock = threading.Lock()

#: Numbers every assignment of a partition to a member of this process: unique across its
#: workers, so that a number names one member's one assignment (``give_back`` offers a
#: batch's leftover events to every member, and only the one that handed them over may
#: take them back). Larger numbers are later assignments.
_assignment_numbers = itertools.count(1)
_assignment_numbers_lock = threading.Lock()


def _next_assignment() -> int:
    with _assignment_numbers_lock:
        return next(_assignment_numbers)


class GroupMember:
    """One subscribing consumer and the bookkeeping that keeps rebalances exact."""

    def __init__(
        self,
        config: dict,
        topic: str,
        options: ReadOptions,
        *,
        on_moved: Optional[OnMoved] = None,
        transactions: Optional[Transactions] = None,
        worker_index: int = 0,
    ) -> None:
        self.topic = topic
        #: The Bytewax worker this member's batches flow through (its sink is that worker's).
        self.worker_index = worker_index
        self.config = config
        self.start_from = options.start_from
        self.batch_size, self.batch_bytes = options.batch_size, options.batch_bytes
        self.poll_s = options.poll_ms / 1000
        self.on_moved = on_moved
        self._lock = threading.RLock()
        #: Partitions this member owns; None until the group first assigned it some (or none).
        self.owned: Optional[set[int]] = None
        #: Per partition: the offset after the last event handed over and not yet delivered.
        self.in_flight: dict[int, int] = {}
        #: Per partition: the first offset of the batch in flight.
        self.batch_start: dict[int, int] = {}
        #: Per partition owned: the number of its current assignment to this member, unique
        #: within the process (:func:`_next_assignment`).
        self.assignment: dict[int, int] = {}
        #: Partitions paused while an outage wait keeps this member alive.
        self.paused: set[int] = set()
        #: Per partition: offsets delivered whose commit has not succeeded yet.
        self.uncommitted: dict[int, int] = {}
        #: Per partition: the next offset this member would hand over (for the lag metric).
        self.position: dict[int, int] = {}
        self.pending: list[InputMessage] = []
        #: Per partition: where the fetcher last found its end (nothing after it then).
        self.eof: dict[int, int] = {}
        #: Exactly-once: this member's transactional producer, and the consumer-group
        #: metadata of when it last handed a batch over or was assigned partitions.
        self.transactions = transactions
        self.group_metadata: object = None
        #: When the producer was fenced lately (more than a few: a duplicate member name).
        self._fenced_at: list[float] = []
        self.consumer = self._consumer()
        #: With ``tail=False``: each partition's first and end offsets when the worker started.
        self.starts: dict[int, int] = {}
        self.ends: Optional[dict[int, int]] = None if options.tail else self._end_offsets()
        self._next_drain_check = 0.0
        self._subscribe()
        with _members_lock:
            _members.append(self)
        outage.add_keeper(self.keep_alive)
        if self.transactions is not None:
            self.transactions.start()

    def _consumer(self) -> Consumer:
        reset = "latest" if self.start_from == "latest" else "earliest"
        config = {
            **self.config,
            "enable.auto.commit": "false",
            "enable.partition.eof": "true",
            "partition.assignment.strategy": "cooperative-sticky",
            "auto.offset.reset": reset,
        }
        if self.transactions is not None:
            # Offsets a member's open transaction is committing are "unstable": a new
            # owner waits for that transaction to end instead of starting before it.
            config["isolation.level"] = "read_committed"
        return Consumer(config)

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            [self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
        )

    # --- the source side -----------------------------------------------------------------

    def next_batch(self) -> list[InputMessage]:
        """The next micro-batch, or [] while the previous one is still on its way."""
        with self._lock:
            if self.in_flight:
                return []
            self._resume()
            self._commit_uncommitted()
            if STOP.is_set() or self.finished():
                raise StopIteration
            if len(self.pending) < self.batch_size:
                self._fetch(self.batch_size - len(self.pending))
            if self.uncommitted:
                # The broker refused the last commit (a rebalance in progress): the poll
                # above served the rebalance; hand nothing new over until it succeeds, so
                # never more than one batch is delivered but uncommitted.
                return []
            batch = take_batch(self.pending, self.batch_size, self.batch_bytes)
            if batch and self.transactions is not None:
                # The group's generation that owns these partitions now: the batch's
                # offsets are committed under it, or refused if the group moved on.
                self.group_metadata = self.consumer.consumer_group_metadata()
            self.batch_start.clear()
            for m in batch:
                self.batch_start.setdefault(m.partition, m.offset)
                self.in_flight[m.partition] = m.offset + 1
                self.position[m.partition] = m.offset + 1
            if batch:
                report_lag(
                    self.consumer, self.topic, {m.partition: self.position[m.partition] for m in batch}
                )
            return batch

    def _fetch(self, wanted: int) -> None:
        # Rebalance callbacks run inside this call, on this thread.
        for msg in self.consumer.consume(wanted, self.poll_s):
            err = msg.error()
            if err is None:
                if self.owned is not None and msg.partition() not in self.owned:
                    continue  # fetched just before its partition was revoked
                if self.ends is not None and msg.offset() >= self.ends.get(msg.partition(), 0):
                    continue  # past the end seen at start: left for the next run, uncommitted
                self.pending.append(input_message(msg, self.assignment.get(msg.partition(), 0)))
            elif err.code() == KafkaError._PARTITION_EOF:
                if self.owned is not None and msg.partition() in self.owned:
                    self.eof[msg.partition()] = msg.offset()
            elif err.fatal():
                raise KafkaException(err)
            else:  # transient (broker down, leader moved): librdkafka retries
                log.warning("group member of %s: %s", self.topic, err)

    def finished(self) -> bool:
        """With ``tail=False``: the group has committed every partition up to the end
        offset seen at start. Asked of the broker (at most twice a second) only while
        this member has nothing to do: a member that owns nothing, or has drained its
        partitions, stays until a rebalance gives it more or the others are done too."""
        if self.ends is None or self.owned is None or self.pending or self.in_flight or self.uncommitted:
            return False
        now = time.monotonic()
        if now < self._next_drain_check:
            return False
        self._next_drain_check = now + 0.5
        try:
            found = self.consumer.committed(
                [KafkaTopicPartition(self.topic, p) for p in self.ends], timeout=10
            )
        except KafkaException as e:
            log.warning("committed offsets of %s not available: %s", self.topic, e.args[0])
            return False
        # Where the fetcher found a partition's end ahead of the group's commit with
        # nothing in hand (this member started at `latest`, or its commit vanished),
        # there was nothing to do there: commit that, capped at the end seen at start,
        # so the group can finish.
        committed = {tp.partition: tp.offset for tp in found}
        for p in self.owned:
            if p in self.eof:
                target = min(self.eof[p], self.ends.get(p, 0))
                if target > committed.get(p, -1):
                    self.uncommitted[p] = target
        if self.uncommitted:
            self._commit_uncommitted()
            return False
        return all(
            tp.offset >= self.ends[tp.partition] or self.starts[tp.partition] >= self.ends[tp.partition]
            for tp in found
        )

    def take_back(self, messages: list[InputMessage]) -> None:
        """Events of the batch in flight that the flow did not take in (its time budget
        ran out), each the rest of its partition's share: handed over again first."""
        with self._lock:
            mine = [m for m in messages if self._in_hand(m.partition, m.assignment)]  # not moved meanwhile
            first: dict[int, int] = {}
            for m in mine:
                first.setdefault(m.partition, m.offset)
            for p, offset in first.items():
                if offset <= self.batch_start.get(p, offset):
                    del self.in_flight[p]  # nothing of it will be delivered
                else:
                    self.in_flight[p] = offset
                self.position[p] = offset
            self.pending[:0] = mine

    def keep_alive(self) -> None:
        """Run between the attempts of an outage wait. While this member's batch is in
        flight its thread does not poll, and Kafka would evict it after
        max.poll.interval.ms: poll here, with its partitions paused so that nothing new
        is fetched; they resume with the next batch."""
        if not self._lock.acquire(timeout=5):
            return
        try:
            if not self.in_flight or not self.owned:
                return
            fresh = self.owned - self.paused
            if fresh:
                self.consumer.pause([KafkaTopicPartition(self.topic, p) for p in sorted(fresh)])
                self.paused |= fresh
            # Serves the group; a partition assigned meanwhile may add to pending.
            self._fetch(self.batch_size)
        finally:
            self._lock.release()

    def _resume(self) -> None:
        paused, self.paused = self.paused & (self.owned or set()), set()
        if paused:
            self.consumer.resume([KafkaTopicPartition(self.topic, p) for p in sorted(paused)])

    # --- the sink side -------------------------------------------------------------------

    def delivered(self, offsets: dict[int, int]) -> None:
        """Every record up to these offsets (next offset per partition) is in Kafka:
        commit them, and let the source hand over the next batch."""
        with self._lock:
            for p, offset in offsets.items():
                if self.uncommitted.get(p, -1) < offset:
                    self.uncommitted[p] = offset
                if self.in_flight.get(p, offset + 1) <= offset:
                    del self.in_flight[p]
            self._commit_uncommitted()

    def transact(self, items: list[OutputMessage]) -> None:
        """Exactly-once: ``items`` (outputs of the batch this member has in flight) and
        their input offsets in one transaction. Committed, the batch is done; aborted,
        its partitions are read again from the batch's first offsets; fenced, the member
        rejoins with a new producer and reads them again too."""
        assert self.transactions is not None
        with self._lock:
            # Outputs of partitions revoked or lost since the batch was handed over are not
            # produced, even where the partition has been assigned to this member again:
            # their owner (another member, another worker of this process, or this member
            # under its new assignment) processes those events and commits them itself.
            mine = [
                i for i in items if i.source is not None and self._in_hand(i.source[1], i.source_assignment)
            ]
            if len(mine) < len(items):
                moved = sorted(
                    {i.source[1] for i in items if i.source is not None} - {i.source[1] for i in mine}
                )
                log.warning(
                    "%d outputs not produced: %s%s moved since their batch was handed over",
                    len(items) - len(mine),
                    self.topic,
                    moved,
                )
            if not mine:
                return
            items = mine
            offsets: dict[int, int] = {}
            handed: dict[int, int] = {}
            for item in items:
                _topic, partition, offset = item.source
                offsets[partition] = max(offsets.get(partition, -1), offset + 1)
                handed[partition] = item.source_assignment
            produced = [i for i in items if not i.commit_only]
            try:
                self.transactions.run(
                    produced,
                    [KafkaTopicPartition(self.topic, p, o) for p, o in sorted(offsets.items())],
                    self.group_metadata,
                )
            except Aborted as e:
                self._rewind(handed, f"its transaction was aborted ({e})")
                return
            except Fenced as e:
                self._rewind(handed, f"the producer was fenced or stuck ({e})")
                self._rejoin(str(e), fenced=not isinstance(e, Stuck))
                return
            for p, offset in offsets.items():
                if self.in_flight.get(p, offset + 1) <= offset:
                    del self.in_flight[p]

    def _in_hand(self, partition: int, assignment: int) -> bool:
        """Whether an event of ``partition`` read under ``assignment`` belongs to the batch
        this member has in flight: the partition is in flight and still under that
        assignment (not revoked or lost since, even if assigned back)."""
        return partition in self.in_flight and self.assignment.get(partition) == assignment

    def _rewind(self, handed: dict[int, int], why: str) -> None:
        """The batch's events of the partitions in ``handed`` (each with the assignment it
        was handed over under) are not done: handed over again from the batch's first
        offset where this member still owns the partition under that assignment (what
        was fetched after them is fetched again), and its chunk state of them is read
        back from the changelog (the batch's own updates to it were never committed). A
        partition assigned to this member again since is left alone: its new assignment
        reads from the group's committed offset, which the owner in between may have
        moved past the batch (reading from the batch's start would repeat its work)."""
        parts = sorted(p for p, n in handed.items() if self.assignment.get(p, n) == n)
        reassigned = sorted(set(handed) - set(parts))
        owned = self.owned or set()
        again = {p: self.batch_start[p] for p in parts if p in owned and p in self.batch_start}
        self.pending = [m for m in self.pending if m.partition not in parts]
        for p in parts:
            self.in_flight.pop(p, None)
            self.eof.pop(p, None)
        try:
            for p, offset in again.items():
                self.consumer.seek(KafkaTopicPartition(self.topic, p, offset))
                self.position[p] = offset
        except KafkaException as e:
            # Never go on past events that are not done: the next owner, this member
            # included, starts again from the group's committed offsets.
            log.warning("could not rewind %s%s (%s): leaving the group to rejoin", self.topic, parts, e)
            self._restart_consumer()
        self._moved({p: handed[p] for p in parts}, "rewound")
        log.warning(
            "batch of %s%s not committed: %s; %s%s",
            self.topic,
            sorted(handed),
            why,
            f"reading {sorted(again)} again from offsets {[again[p] for p in sorted(again)]}"
            if again
            else "its partitions have moved: their new owner processes it",
            f"; {reassigned} were assigned again since, and are read from the group's committed offsets"
            if reassigned
            else "",
        )

    def _rejoin(self, error: str, *, fenced: bool = True) -> None:
        """After the producer was fenced: leaves the group (its partitions go to the other
        members, or back to it), opens a new producer (which fences any older one of its
        transactional.id) and joins again. Fenced three times within ten minutes, it stops
        the worker: another worker is running under the same member name."""
        assert self.transactions is not None
        now = time.monotonic()
        self._fenced_at = [t for t in self._fenced_at if now - t < 600] + ([now] if fenced else [])
        if len(self._fenced_at) >= 3:
            raise RuntimeError(
                f"the transactional producer {self.transactions.transactional_id} was fenced "
                f"{len(self._fenced_at)} times in ten minutes ({error}): is another worker running "
                "under the same member name? Member names must be unique in the group"
            )
        log.error(
            "transactional producer %s %s (%s): this member leaves the group and joins again "
            "with a new producer",
            self.transactions.transactional_id,
            "fenced" if fenced else "stuck",
            error,
        )
        self.transactions.close()
        self._restart_consumer()
        self.transactions.start()

    def _restart_consumer(self) -> None:
        """Leaves the group and joins it again as a new member, with nothing in hand."""
        self.consumer.close()  # leaves the group: the revoke callback forgets every partition
        self._forget(sorted(self.owned or ()))
        self.owned, self.pending, self.in_flight, self.uncommitted = None, [], {}, {}
        self.consumer = self._consumer()
        self._subscribe()

    def _commit_uncommitted(self, partitions: Optional[Iterable[int]] = None) -> None:
        wanted = set(self.uncommitted) if partitions is None else set(partitions) & set(self.uncommitted)
        if not wanted:
            return
        offsets = [KafkaTopicPartition(self.topic, p, self.uncommitted[p]) for p in sorted(wanted)]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as e:
            # A rebalance in progress refuses commits for a moment: kept and retried before
            # the next poll, and in the revoke callback if the partition leaves.
            log.warning("commit of %s[%s] deferred: %s", self.topic, sorted(wanted), e.args[0])
            return
        for p in wanted:
            self.uncommitted.pop(p, None)

    # --- rebalance callbacks (inside consume, on the source's thread) -------------------

    def _assigned(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        parts = [tp.partition for tp in partitions]
        if self.transactions is not None:
            # A new generation: what this member still owns is committed under it.
            self.group_metadata = consumer.consumer_group_metadata()
        if not parts:  # a cooperative rebalance that gave this member nothing new
            with self._lock:
                self.owned = self.owned or set()
            return
        with self._lock:
            self.owned = (self.owned or set()) | set(parts)
            for p in parts:
                self.assignment[p] = _next_assignment()
                self.position.pop(p, None)
                self.eof.pop(p, None)
            # Told before any event of the new assignment is handed over.
            started = {p: self.assignment[p] for p in parts}
        if self.start_from.isdigit() and partitions:
            self._start_at_time(consumer, partitions)
        metrics.REBALANCES.labels("assigned").inc(len(parts))
        metrics.ASSIGNED_PARTITIONS.inc(len(parts))
        log.info("assigned %s%s; now owning %s", self.topic, sorted(parts), sorted(self.owned))
        self._moved(started, "assigned")  # state cached from an earlier ownership may be stale

    def _revoked(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        parts = [tp.partition for tp in partitions]
        if not parts:
            return
        with self._lock:
            self._doom(parts, "revoked")
            self._commit_uncommitted(parts)
            self._forget(parts)
        metrics.REBALANCES.labels("revoked").inc(len(parts))
        log.info("revoked %s%s; now owning %s", self.topic, sorted(parts), sorted(self.owned or ()))

    def _lost(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        parts = [tp.partition for tp in partitions]
        with self._lock:
            self._doom(parts, "lost")
            for p in parts:
                self.uncommitted.pop(p, None)
            self._forget(parts)
        metrics.REBALANCES.labels("lost").inc(len(parts))
        log.warning(
            "lost %s%s (this member missed the group's deadline): their next owner "
            "processes the uncommitted events again",
            self.topic,
            sorted(parts),
        )

    def _doom(self, parts: list[int], how: str) -> None:
        """A transaction open for these partitions (this callback runs inside its
        keep-alive) must never commit: their next owner starts from the last commit."""
        if self.transactions is not None and self.transactions.partitions & set(parts):
            self.transactions.doom(f"{self.topic}{sorted(parts)} {how}")

    def _forget(self, parts: list[int]) -> None:
        metrics.ASSIGNED_PARTITIONS.dec(len(set(parts) & (self.owned or set())))
        self.owned = (self.owned or set()) - set(parts)
        self.pending = [m for m in self.pending if m.partition not in parts]
        stale = sorted(self.paused & set(parts))
        if stale:
            # librdkafka keeps a partition paused through its revocation: assigned here
            # again later, it would never be fetched (seen after a broker restart).
            try:
                self.consumer.resume([KafkaTopicPartition(self.topic, p) for p in stale])
            except KafkaException as e:
                log.warning("could not resume %s%s as it leaves: %s", self.topic, stale, e)
        self.paused -= set(parts)
        ended = {p: self.assignment[p] for p in parts if p in self.assignment}
        for p in parts:
            self.in_flight.pop(p, None)
            self.assignment.pop(p, None)
            self.position.pop(p, None)
            self.eof.pop(p, None)
            metrics.forget_lag(self.topic, p)
        self._moved(ended, "ended")

    def _moved(self, assignments: dict[int, int], how: Move) -> None:
        if self.on_moved is not None and assignments:
            self.on_moved(self.topic, assignments, how)

    def _start_at_time(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        """``start_from`` epoch ms: partitions without a committed offset start at the
        first event at or after that time."""
        committed = consumer.committed(partitions, timeout=30)
        fresh = [
            KafkaTopicPartition(self.topic, tp.partition, int(self.start_from))
            for tp in committed
            if tp.offset < 0
        ]
        found = (
            {tp.partition: tp.offset for tp in consumer.offsets_for_times(fresh, timeout=30)} if fresh else {}
        )
        consumer.incremental_assign(
            [
                KafkaTopicPartition(self.topic, tp.partition, found.get(tp.partition, tp.offset))
                for tp in committed
            ]
        )

    # --- helpers -------------------------------------------------------------------------

    def _end_offsets(self) -> dict[int, int]:
        meta = self.consumer.list_topics(self.topic, timeout=30).topics.get(self.topic)
        if meta is None or meta.error is not None:
            raise RuntimeError(f"input topic {self.topic!r} is not available: {meta.error if meta else ''}")
        ends = {}
        for p in meta.partitions:
            low, high = self.consumer.get_watermark_offsets(KafkaTopicPartition(self.topic, p), timeout=30)
            self.starts[p], ends[p] = low, high
        return ends

    def close(self) -> None:
        outage.remove_keeper(self.keep_alive)
        with _members_lock:
            if self in _members:
                _members.remove(self)
        with self._lock:
            self._commit_uncommitted()
        started = time.monotonic()
        self.consumer.close()  # leaves the group: the revoke callback runs first
        log.info("left the group of %s in %.2f s", self.topic, time.monotonic() - started)
        if self.transactions is not None:
            self.transactions.close()


def commit(offsets: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
    """Hands delivered offsets (next offset per topic-partition) to the members that
    handed those events over; returns those no member of this process owns."""
    left = dict(offsets)
    with _members_lock:
        members = list(_members)
    # Where two members have a partition in flight, one was evicted without knowing it
    # yet: the offsets are the batch of the other, whose assignment is the later one
    # (numbers grow process-wide). The evicted one could not commit them anyway.
    owner: dict[tuple[str, int], GroupMember] = {}
    for member in members:
        for p in member.in_flight:
            key = (member.topic, p)
            if key in left and (
                key not in owner or member.assignment.get(p, 0) > owner[key].assignment.get(p, 0)
            ):
                owner[key] = member
    for member in members:
        mine = {p: o for (t, p), o in left.items() if owner.get((t, p)) is member}
        if mine:
            member.delivered(mine)
            for p in mine:
                left.pop((member.topic, p))
    return left


def transact(items: list[OutputMessage], worker_index: int) -> None:
    """Exactly-once's sink of one Bytewax worker: hands a batch's outputs to the member
    of that worker, which handed its events over (the flow never moves an item between
    workers), to commit them in one transaction. Never to another worker's member, even
    one that owns their partition now: its own batch covers those events, and it must
    commit only that, under its own group generation."""
    with _members_lock:
        member = next((m for m in _members if m.worker_index == worker_index), None)
    if member is None:
        log.warning("%d outputs not produced: worker %d has left the group", len(items), worker_index)
        return
    member.transact(items)


def give_back(messages: list[InputMessage]) -> None:
    """Hands events the flow did not take into its batch back to the members that
    handed them over (see :meth:`GroupMember.take_back`)."""
    with _members_lock:
        members = list(_members)
    for member in members:
        mine = [m for m in messages if m.topic == member.topic and m.partition in member.in_flight]
        if mine:
            member.take_back(mine)


class _GroupPartition(StatelessSourcePartition[InputMessage]):
    def __init__(self, member: GroupMember) -> None:
        self.member = member

    def next_batch(self) -> list[InputMessage]:
        return self.member.next_batch()

    def close(self) -> None:
        self.member.close()


class GroupInput(DynamicSource[InputMessage]):
    """The input topic read as a consumer group: one member per worker thread."""

    def __init__(
        self,
        config: dict,
        topic: str,
        options: ReadOptions,
        *,
        on_moved: Optional[OnMoved] = None,
        transactions: Optional[Callable[[int], Transactions]] = None,
    ) -> None:
        self.config, self.topic, self.options, self.on_moved = config, topic, options, on_moved
        #: Exactly-once: makes the transactional producer of a worker, by its index.
        self.transactions = transactions

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _GroupPartition:
        transactions = self.transactions(worker_index) if self.transactions is not None else None
        return _GroupPartition(
            GroupMember(
                self.config,
                self.topic,
                self.options,
                on_moved=self.on_moved,
                transactions=transactions,
                worker_index=worker_index,
            )
        )
