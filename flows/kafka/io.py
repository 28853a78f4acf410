"""Kafka source and sink for Bytewax, written for the guarantees we promise.

Source (cluster mode, ``--scaling cluster``): one consumer per partition (``assign``,
no group rebalancing: Bytewax owns the partition-to-worker mapping), batches bounded in
count and bytes with a maximum poll wait, and a snapshot that is the next offset to hand
over. Group mode's source, a consumer-group member per worker, is in
:mod:`flows.kafka.group`.

Sink: an idempotent producer that checks every delivery report and flushes each batch
before returning (:mod:`flows.kafka.delivery`), so a snapshot never covers a record
that is not in Kafka. A full producer queue blocks (backpressure) instead of raising; a
failed or unconfirmed delivery raises, and the worker stops rather than lose a record.
With exactly-once (``transact``) the sink hands each batch to its group member's
transactional producer instead (:mod:`flows.kafka.transactions`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Optional, TypeVar

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition

from flows import outage
from flows.kafka.delivery import Delivery

if TYPE_CHECKING:
    from flows.settings import Settings

log = logging.getLogger("embedstream.kafka")

T = TypeVar("T")

#: Set on SIGTERM: sources stop handing out batches, so the flow finishes the batch in
#: hand, flushes, snapshots and exits.
STOP = threading.Event()


#: How an input partition moved in group mode: assigned to a member, its assignment ended
#: (revoked or lost), or a batch of it rewound (its transaction aborted: the same
#: assignment reads the batch again).
Move = Literal["assigned", "ended", "rewound"]


@dataclass(frozen=True)
class InputMessage:
    topic: str
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]
    timestamp_ms: Optional[int]
    headers: tuple[tuple[str, bytes], ...] = ()
    #: Group mode: which assignment of its partition to a member it was read under,
    #: numbered uniquely in the process (``GroupMember.assignment``); its outputs carry it
    #: as ``source_assignment``, and only the partition's current assignment writes the
    #: chunk state (:class:`flows.chunk_state.Owners`). 0: not numbered (cluster mode).
    assignment: int = 0

    @property
    def size(self) -> int:
        return len(self.value or b"") + len(self.key or b"")


@dataclass(frozen=True)
class OutputMessage:
    topic: str
    key: Optional[bytes]
    value: Optional[bytes]
    headers: tuple[tuple[str, bytes], ...] = ()
    #: (topic, partition, offset) of the input event it came from, for offset commits.
    source: Optional[tuple[str, int, int]] = None
    #: A partition of its own choosing (None: by key).
    partition: Optional[int] = None
    #: Produced only once every other message of its batch is confirmed (the chunk-state
    #: changelog must never get ahead of the records).
    after_delivery: bool = False
    #: Never produced: it only marks its input event done, for the offset commit (an
    #: event that yields nothing, such as an S3 test event).
    commit_only: bool = False
    #: The ``assignment`` of the input event it came from: exactly-once drops outputs of
    #: an assignment of their partition that has ended, even if it was assigned again.
    source_assignment: int = 0


@dataclass(frozen=True)
class ReadOptions:
    """How a source reads its topic: where a partition without saved progress starts
    (``start_from``), whether it keeps reading (``tail``) or stops at the end offsets
    seen at start, and the bounds of each micro-batch: events, payload bytes, and the
    longest wait for it to fill."""

    start_from: str = "committed"
    tail: bool = True
    batch_size: int = 64
    batch_bytes: int = 16 << 20
    poll_ms: int = 100

    @classmethod
    def of(cls, settings: Settings, batch_size: int) -> ReadOptions:
        """The options ``settings`` give, with the job's own micro-batch size."""
        return cls(settings.start_from, settings.tail, batch_size, settings.batch_bytes, settings.poll_ms)


def input_message(msg, assignment: int = 0) -> InputMessage:
    """A consumed confluent-kafka message as the flow sees it."""
    return InputMessage(
        msg.topic(),
        msg.partition(),
        msg.offset(),
        msg.key(),
        msg.value(),
        msg.timestamp()[1],
        tuple(msg.headers() or ()),
        assignment,
    )


def take_batch(pending: list[InputMessage], count: int, max_bytes: int) -> list[InputMessage]:
    """Takes a micro-batch off the front of ``pending``: at most ``count`` messages and
    ``max_bytes`` of payload, but always at least one (a message larger than the
    bound goes alone rather than never)."""
    size, n = 0, 0
    while n < len(pending) and n < count:
        if n and size + pending[n].size > max_bytes:
            break
        size += pending[n].size
        n += 1
    batch = pending[:n]
    del pending[:n]
    return batch


def report_lag(consumer: Consumer, topic: str, next_offsets: dict[int, int]) -> None:
    """Sets the lag metric of each partition: its end offset as the consumer last saw it
    (no request to the broker) less the next offset to hand over."""
    from flows import metrics

    for partition, offset in next_offsets.items():
        try:
            _low, high = consumer.get_watermark_offsets(KafkaTopicPartition(topic, partition), cached=True)
        except KafkaException:
            continue
        if high >= 0:
            metrics.CONSUMER_LAG.labels(topic, str(partition)).set(max(high - offset, 0))


#: Errors of a broker that is restarting, moving leaders or unreachable: waited out.
_TRANSIENT = (
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
)


def ask_broker(call: Callable[[], T], patience_s: float = 120.0) -> T:
    """``call()``, a request to the broker, retried while the broker is unavailable (up
    to ``patience_s``); any other error is raised at once."""

    def attempt() -> T:
        try:
            return call()
        except KafkaException as e:
            error = e.args[0] if e.args else None
            if isinstance(error, KafkaError) and (error.retriable() or error.code() in _TRANSIENT):
                raise outage.Outage(error.str()) from e
            raise

    return outage.wait_out("broker", attempt, give_up_s=patience_s)


#: Group mode's offset commit: delivered offsets (next offset per topic-partition) in,
#: those no group member of this process handed over out.
CommitFn = Callable[[dict[tuple[str, int], int]], dict[tuple[str, int], int]]
#: Exactly-once: a batch's outputs and the index of the worker whose sink has them,
#: produced and committed with their input offsets in one transaction.
TransactFn = Callable[[list["OutputMessage"], int], None]


class _Partition(StatefulSourcePartition[InputMessage, int]):
    def __init__(
        self,
        config: dict,
        topic: str,
        partition: int,
        start: int,
        options: ReadOptions,
    ) -> None:
        self.topic, self.partition = topic, partition
        self.batch_size, self.batch_bytes = options.batch_size, options.batch_bytes
        self.poll_s = options.poll_ms / 1000
        # An offset retention has deleted resumes at the oldest left, never at the end.
        self.consumer = Consumer(
            {
                **config,
                "enable.auto.commit": "false",
                "enable.partition.eof": "true",
                "auto.offset.reset": "earliest",
            }
        )
        low, high = ask_broker(
            lambda: self.consumer.get_watermark_offsets(
                KafkaTopicPartition(topic, partition), timeout=30, cached=False
            )
        )
        self.end: Optional[int] = None if options.tail else high
        # A logical start (beginning, end) is resolved now, so that every snapshot names
        # a real offset: a restart from "the end" would skip what arrived meanwhile.
        if start == OFFSET_BEGINNING:
            start = low
        elif start == OFFSET_END:
            start = high
        elif start < 0:
            raise ValueError(f"{topic}[{partition}]: cannot start at logical offset {start}")
        self.consumer.assign([KafkaTopicPartition(topic, partition, start)])
        #: The next offset to hand over (after those in ``pending``).
        self.next_offset = start
        self.pending: list[InputMessage] = []
        #: Where the fetcher last found the partition's end, nothing pending before it.
        self.eof_at: Optional[int] = None

    def next_batch(self) -> list[InputMessage]:
        if STOP.is_set():
            raise StopIteration
        if self.end is not None and self.next_offset >= self.end:
            raise StopIteration
        if len(self.pending) < self.batch_size:
            for msg in self.consumer.consume(self.batch_size - len(self.pending), self.poll_s):
                err = msg.error()
                if err is None:
                    self.pending.append(input_message(msg))
                elif err.code() == KafkaError._PARTITION_EOF:
                    self.eof_at = msg.offset()
                elif err.fatal():
                    raise KafkaException(err)
                else:  # transient (broker down, rebalance of leaders): librdkafka retries
                    log.warning("consumer %s[%d]: %s", self.topic, self.partition, err)
        if self.end is not None:
            self.pending = [m for m in self.pending if m.offset < self.end]
        batch = take_batch(self.pending, self.batch_size, self.batch_bytes)
        if batch:
            self.next_offset = batch[-1].offset + 1
            report_lag(self.consumer, self.topic, {self.partition: self.next_offset})
        if not self.pending and self.eof_at is not None:
            # A transactional topic ends in commit markers, which no consumer receives: past
            # the last record, the end is where the fetcher found it.
            # Never past the end seen at start: what came after it was not handed over.
            end = self.eof_at if self.end is None else min(self.eof_at, self.end)
            self.next_offset = max(self.next_offset, end)
            self.eof_at = None
        elif self.end is not None and self.end == 0:
            raise StopIteration
        return batch

    def snapshot(self) -> int:
        # Messages still pending were not handed over: resume at the first of them.
        if self.pending:
            return self.pending[0].offset
        return self.next_offset

    def close(self) -> None:
        self.consumer.close()


class KafkaInput(FixedPartitionedSource[InputMessage, int]):
    """All partitions of one topic; Bytewax spreads them over the workers."""

    def __init__(self, config: dict, topic: str, options: ReadOptions) -> None:
        self.config = {"group.id": "embedstream", **config}
        self.topic = topic
        self.options = options

    def list_parts(self) -> list[str]:
        consumer = Consumer(self.config)
        try:
            meta = consumer.list_topics(self.topic, timeout=30)
        finally:
            consumer.close()
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise RuntimeError(f"input topic {self.topic!r} is not available: {topic.error if topic else ''}")
        return [str(p) for p in sorted(topic.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[int]) -> _Partition:
        start = resume_state if resume_state is not None else self._start_offset(int(for_part))
        return _Partition(self.config, self.topic, int(for_part), start, self.options)

    def _committed(self, partition: int) -> int:
        """The group's committed offset (negative if none). A new or restarted broker
        answers "not coordinator" or "loading" for a while: those are waited out."""
        consumer = Consumer(self.config)
        try:
            [found] = ask_broker(
                lambda: consumer.committed([KafkaTopicPartition(self.topic, partition)], timeout=30)
            )
        finally:
            consumer.close()
        return found.offset

    def _start_offset(self, partition: int) -> int:
        if self.options.start_from == "committed":
            # Where this group's last run left off (offsets are committed after delivery);
            # the beginning for a group that never ran.
            committed = self._committed(partition)
            return committed if committed >= 0 else OFFSET_BEGINNING
        if self.options.start_from == "beginning":
            return OFFSET_BEGINNING
        if self.options.start_from == "latest":
            return OFFSET_END
        consumer = Consumer(self.config)  # a timestamp in epoch milliseconds
        try:
            found = consumer.offsets_for_times(
                [KafkaTopicPartition(self.topic, partition, int(self.options.start_from))], timeout=30
            )
        finally:
            consumer.close()
        return found[0].offset if found[0].offset >= 0 else OFFSET_END


class _SinkPartition(StatelessSinkPartition[OutputMessage]):
    def __init__(
        self,
        config: dict,
        flush_timeout_s: float,
        group_id: Optional[str],
        commit: Optional[CommitFn] = None,
        transact: Optional[TransactFn] = None,
        worker_index: int = 0,
    ) -> None:
        self.transact = transact
        self.worker_index = worker_index
        if transact is not None:
            return  # each group member produces through its own transactional producer
        self.producer = Producer(
            {
                "enable.idempotence": "true",
                "acks": "all",
                "linger.ms": "5",
                "compression.type": "lz4",
                **config,
            }
        )
        self.delivery = Delivery(self.producer, "records")
        self.flush_timeout_s = flush_timeout_s
        self.commit = commit
        # Cluster mode: commits consumer-group offsets for lag tooling; never subscribes
        # or consumes. (Group mode commits through the members, ``commit``.)
        self.committer = (
            Consumer({**config, "group.id": group_id, "enable.auto.commit": "false"})
            if group_id and commit is None
            else None
        )

    def write_batch(self, items: list[OutputMessage]) -> None:
        if self.transact is not None:
            self.transact(items, self.worker_index)
            return
        produced = [i for i in items if not i.commit_only]
        self._deliver([i for i in produced if not i.after_delivery])
        self._deliver([i for i in produced if i.after_delivery])
        self._commit(items)

    def _deliver(self, items: list[OutputMessage]) -> None:
        """Produces ``items`` and returns once Kafka confirmed every one."""
        for item in items:
            self.delivery.produce(
                item.topic, item.value, item.key, headers=item.headers, partition=item.partition
            )
        self.delivery.confirm(self.flush_timeout_s)

    def _commit(self, items: list[OutputMessage]) -> None:
        """Everything up to these events is in Kafka now: record it under the group. In
        cluster mode recovery snapshots stay the source of truth for resuming and this is
        for lag; in group mode the committed offsets are where the next owner starts."""
        done: dict[tuple[str, int], int] = {}
        for item in items:
            if item.source is not None:
                topic, partition, offset = item.source
                done[(topic, partition)] = max(done.get((topic, partition), -1), offset + 1)
        if not done:
            return
        if self.commit is not None:
            orphans = self.commit(done)
            if orphans:
                log.warning("delivered events no group member of this process handed over: %s", orphans)
            return
        if self.committer is None:
            return
        try:
            self.committer.commit(
                offsets=[KafkaTopicPartition(t, p, o) for (t, p), o in done.items()], asynchronous=False
            )
        except KafkaException as e:
            log.warning("could not commit offsets %s: %s", done, e)

    def close(self) -> None:
        if self.transact is not None:
            return
        self.producer.flush(self.flush_timeout_s)
        if self.committer is not None:
            self.committer.close()


class KafkaOutput(DynamicSink[OutputMessage]):
    """Writes each message to the topic it names. ``runtime_config`` gives defaults that
    need the broker, asked when a worker starts, so defining the flow needs none;
    ``config`` (the user's settings) wins over them."""

    def __init__(
        self,
        config: dict,
        flush_timeout_s: float = 300.0,
        group_id: Optional[str] = None,
        runtime_config: Optional[Callable[[], dict]] = None,
        commit: Optional[CommitFn] = None,
        transact: Optional[TransactFn] = None,
    ) -> None:
        self.config = config
        self.flush_timeout_s = flush_timeout_s
        self.group_id = group_id
        self.runtime_config = runtime_config
        self.commit = commit
        self.transact = transact

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _SinkPartition:
        if self.transact is not None:
            return _SinkPartition(
                {}, self.flush_timeout_s, None, transact=self.transact, worker_index=worker_index
            )
        config = {**(self.runtime_config() if self.runtime_config else {}), **self.config}
        return _SinkPartition(config, self.flush_timeout_s, self.group_id, self.commit)
