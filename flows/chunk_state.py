"""Incremental mode's memory: per document, the chunk ids of the version last emitted,
and the diff of each batch against it (which chunks are fresh, what is remembered).

Content-derived chunk ids (:func:`chunk_ids`) stay the same while a chunk's text and
the model's settings do, so an UPSERT needs vectors only for the ids its document did
not have before. What it had is kept here, per input partition, because that is where
a document's versions arrive in order and where the batch step runs.

The state holds ids, not vectors: the first 8 bytes of each id, packed into one
``bytes`` per document (about 100 bytes for 12 chunks). It is persisted in a compacted
changelog topic keyed by doc_id, one changelog partition per input partition, so it
follows its partition to whichever worker reads it next. A worker reads a partition's
changelog back the first time it sees a batch of that partition, each partition on
its own and within ``state_restore_deadline_s``: one that cannot be read back in time
(or at all) is reported and starts empty.

The state is bounded (``state_max_bytes``): past the bound the documents least recently
used are forgotten, so a worker's memory stays flat however many documents it sees.

Correctness never depends on the state being there: the changelog is written only
after the records of the batch were delivered, so the state never claims a chunk
that the output topic lacks, and a chunk the state does not know (no changelog yet,
a new worker, a replay, a document evicted or a restore that failed) is simply embedded
again. With exactly-once the changelog writes are part of the batch's transaction, so
the state moves with the outputs, atomically; it is read back with
``isolation.level=read_committed``, so an aborted batch's writes are never restored.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaTopicPartition

from flows import metrics
from flows.kafka.io import Move, OutputMessage
from flows.settings import Settings

if TYPE_CHECKING:
    from flows.embed_steps import Batch, Work

log = logging.getLogger("embedstream.state")

#: Bytes of each chunk id the state keeps: enough that two chunks of one document
#: never share a prefix by chance (2^-64 per pair).
ID_PREFIX_BYTES = 8
#: First byte of a changelog value: its layout, for readers of later releases.
_FORMAT = b"\x01"
#: Memory of one remembered document besides its doc_id and packed ids: its key and its
#: entry in the LRU, whose table tracemalloc measured at up to 175 bytes an entry while
#: documents come and go.
ENTRY_OVERHEAD_BYTES = 240


def lineage_key(
    model_id: str, model_revision: str, dtype: str, prompt_name: Optional[str], dimension: int
) -> str:
    """Everything besides the text that changes a chunk's vector."""
    return "\x00".join((model_id, model_revision, dtype, prompt_name or "", str(dimension)))


def chunk_ids(doc_id: str, contents: Sequence[bytes], lineage: str) -> list[str]:
    """The id of each chunk: hex SHA-256 of the doc_id, a SHA-256 of the chunk's content,
    its occurrence number among equal contents in the document, and the lineage. An
    unchanged chunk keeps its id across versions; another model, revision, dtype,
    prompt or dimension changes every id."""
    seen: Counter[bytes] = Counter()
    ids = []
    for content in contents:
        digest = hashlib.sha256(content).digest()
        occurrence = seen[digest]
        seen[digest] += 1
        ids.append(
            hashlib.sha256(f"{doc_id}\x00{digest.hex()}\x00{occurrence}\x00{lineage}".encode()).hexdigest()
        )
    return ids


def pack(ids: Sequence[str]) -> bytes:
    """A document's state as stored in memory and in the changelog."""
    return _FORMAT + b"".join(bytes.fromhex(i[: 2 * ID_PREFIX_BYTES]) for i in ids)


def unpack(value: bytes) -> set[bytes]:
    """The id prefixes of a packed state (empty for a layout this release cannot read)."""
    if value[:1] != _FORMAT:
        return set()
    body = value[1:]
    return {body[i : i + ID_PREFIX_BYTES] for i in range(0, len(body), ID_PREFIX_BYTES)}


def prefix(chunk_id: str) -> bytes:
    return bytes.fromhex(chunk_id[: 2 * ID_PREFIX_BYTES])


#: A remembered document: (input topic, input partition, doc_id).
_Key = tuple[str, int, str]


def _cost(key: _Key, value: bytes) -> int:
    return ENTRY_OVERHEAD_BYTES + sys.getsizeof(key[2]) + sys.getsizeof(value)


class _Recent:
    """Packed ids by document, least recently used first, holding at most ``max_bytes``
    as :func:`_cost` counts them: past it the oldest are evicted."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: OrderedDict[_Key, bytes] = OrderedDict()

    def get(self, key: _Key) -> Optional[bytes]:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: _Key, value: bytes) -> None:
        self.pop(key)
        self.items[key] = value
        self.bytes += _cost(key, value)
        while self.bytes > self.max_bytes:
            old_key, old_value = self.items.popitem(last=False)
            self.bytes -= _cost(old_key, old_value)
            metrics.STATE_EVICTIONS.inc()

    def pop(self, key: _Key) -> None:
        value = self.items.pop(key, None)
        if value is not None:
            self.bytes -= _cost(key, value)


class Owners:
    """Which assignment of each input partition may write the chunk state. Group mode
    numbers every assignment of a partition to a member of this process, later ones
    higher (:mod:`flows.kafka.group`), and each event carries the number it was handed
    over under. A batch whose assignment has ended, or been overtaken by a later one
    (another worker of the process took the partition before this one learnt it was
    evicted), is never committed by its worker: its outcome must not reach the state the
    partition's next owner reads, whenever in the batch's course the partition moved.
    Process-wide, like the numbers: members report moves before the state exists.
    Events numbered 0 (cluster mode) and partitions never reported are not guarded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Per (topic, partition): its latest assignment number, and whether it is live.
        self._latest: dict[tuple[str, int], tuple[int, bool]] = {}

    def moved(self, topic: str, partition: int, assignment: int, how: Move) -> bool:
        """Records a move of ``assignment``. Returns whether the partition's state in
        memory was that assignment's (stale now: to be dropped), not a later one's."""
        key = (topic, partition)
        with self._lock:
            latest = self._latest.get(key, (0, False))[0]
            if assignment < latest:
                return False  # overtaken: the state is that of a later assignment
            if how == "assigned":
                self._latest[key] = (assignment, True)
            elif how == "ended":
                self._latest[key] = (assignment, False)
            return True

    def may_write(self, topic: str, partition: int, assignment: int) -> bool:
        """Whether an event handed over under ``assignment`` may write the state."""
        if assignment == 0:
            return True
        with self._lock:
            found = self._latest.get((topic, partition))
        return found is None or found == (assignment, True)


#: The owners of this process's partitions, as its group members report them.
OWNERS = Owners()


class ChunkState:
    """The packed chunk ids per doc_id and input partition, at most
    ``state_max_bytes`` of them, read back from the changelog on first use of a
    partition (``restore=False``: start empty). Only a partition's current assignment
    writes it (``owners``, default :data:`OWNERS`)."""

    def __init__(self, settings: Settings, *, restore: bool = True, owners: Optional[Owners] = None) -> None:
        self.topic = settings.chunk_state_topic()
        self.settings = settings
        self.restore_enabled = restore
        self.owners = owners if owners is not None else OWNERS
        self._docs = _Recent(settings.state_max_bytes)
        #: Input partitions read back from the changelog (or whose restore failed).
        self._restored: set[tuple[str, int]] = set()
        #: Times each partition was dropped: a restore whose read began before a drop
        #: read a changelog that may have grown since, and reads again.
        self._drops: dict[tuple[str, int], int] = {}
        #: A lock per partition being restored: partitions restore side by side.
        self._restoring: dict[tuple[str, int], threading.Lock] = {}
        #: Guards the three above; never held while the changelog is read.
        self._lock = threading.Lock()

    def get(self, topic: str, partition: int, doc_id: str) -> Optional[bytes]:
        """A document's packed ids, if remembered; its partition is restored on first use."""
        self._restore_once(topic, partition)
        with self._lock:
            return self._docs.get((sys.intern(topic), partition, doc_id))

    def put(
        self, topic: str, partition: int, doc_id: str, value: Optional[bytes], assignment: int = 0
    ) -> bool:
        """Remembers a document's packed ids (None: forgets it, as after a DELETE), unless
        the event was handed over under an assignment of its partition that is no longer
        the current one (:class:`Owners`). Returns whether it was remembered."""
        if not self.owners.may_write(topic, partition, assignment):
            return False
        self._restore_once(topic, partition)
        key = (sys.intern(topic), partition, doc_id)
        with self._lock:
            # Again under the lock: a move records its owner before it drops the state
            # (which waits for this lock), so a write that passes here is dropped after.
            if not self.owners.may_write(topic, partition, assignment):
                return False
            if value is None:
                self._docs.pop(key)
            else:
                self._docs.put(key, value)
        return True

    def moved(self, topic: str, partition: int, assignment: int, how: Move) -> None:
        """Group mode moved a partition (:class:`Owners`): what is in memory of it is
        forgotten, and read back from the changelog on its next use, unless it is a later
        assignment's (an evicted worker learning of its loss after another took over)."""
        if self.owners.moved(topic, partition, assignment, how):
            self.drop(topic, partition)

    def drop(self, topic: str, partition: int) -> None:
        """Forgets a partition (revoked: another worker owns its changelog now)."""
        with self._lock:
            self._restored.discard((topic, partition))
            self._drops[(topic, partition)] = self._drops.get((topic, partition), 0) + 1
            for key in [k for k in self._docs.items if k[0] == topic and k[1] == partition]:
                self._docs.pop(key)
            self._publish()

    def documents(self) -> int:
        return len(self._docs.items)

    def bytes(self) -> int:
        """Memory the remembered documents take, as the bound counts it."""
        return self._docs.bytes

    def _publish(self) -> None:
        metrics.STATE_DOCUMENTS.set(self.documents())
        metrics.STATE_BYTES.set(self.bytes())

    # --- a batch against the state ---------------------------------------------------------

    def mark_fresh(self, batch: Batch) -> None:
        """Narrows each UPSERT's ``fresh`` to the chunks whose ids the state does not hold
        for its document. A document seen earlier in the batch is embedded whole, since
        what that earlier event leaves behind is not known yet."""
        seen: set[str] = set()
        for w in batch:
            if w.event is None:
                continue
            doc_id = w.event["doc_id"]
            if w.failure is None and w.event["op"] == "UPSERT" and doc_id not in seen:
                packed = self.get(w.message.topic, w.message.partition, doc_id)
                if packed is not None:
                    known = unpack(packed)
                    w.fresh = [prefix(i) not in known for i in w.ids]
            seen.add(doc_id)

    def remember(self, batch: Batch) -> list[OutputMessage]:
        """Each document's ids after the batch, in memory now and, once the batch's
        records are delivered, in the changelog (messages the sink produces last; with
        exactly-once, in the batch's transaction). Where that transaction aborts, the
        member drops the partition's state and reads it back from the changelog. An event
        whose partition moved since it was handed over leaves the state alone
        (:class:`Owners`): its new owner, maybe another worker of this process,
        processes it again."""
        latest: dict[tuple[str, int, str], tuple[Work, Optional[bytes]]] = {}
        for w in batch:
            if w.failure is not None or w.event is None:
                continue  # the document keeps what it had (or there is none)
            m, doc_id = w.message, w.event["doc_id"]
            value = None if w.event["op"] == "DELETE" else pack(w.ids)
            if self.put(m.topic, m.partition, doc_id, value, m.assignment):
                latest[(m.topic, m.partition, doc_id)] = (w, value)
        with self._lock:
            self._publish()
        return [
            OutputMessage(
                self.topic,
                doc_id.encode(),
                value,
                source=(w.message.topic, w.message.partition, w.message.offset),
                partition=partition,
                after_delivery=True,
                source_assignment=w.message.assignment,
            )
            for (_, partition, doc_id), (w, value) in latest.items()
        ]

    # --- reading the changelog back --------------------------------------------------------

    def _restore_once(self, topic: str, partition: int) -> None:
        """Reads a partition's changelog back on its first use. Each partition has its
        own lock, so a slow restore holds up only the batches of its own partition."""
        key = (topic, partition)
        with self._lock:
            if key in self._restored:
                return
            lock = self._restoring.setdefault(key, threading.Lock())
        with lock:
            while True:
                with self._lock:
                    if key in self._restored:
                        return
                    drops = self._drops.get(key, 0)
                docs = self._read_back(topic, partition) if self.restore_enabled else None
                with self._lock:
                    if self._drops.get(key, 0) != drops:
                        # The partition moved during the read: another owner may have
                        # written the changelog past what was read.
                        continue
                    if docs is not None:
                        for doc_key, value in docs.items.items():
                            self._docs.put(doc_key, value)
                    self._restored.add(key)
                    self._restoring.pop(key, None)
                    self._publish()
                    return

    def _read_back(self, topic: str, partition: int) -> Optional[_Recent]:
        """The partition's changelog, all of it or nothing: a restore that fails or
        outlives its deadline is reported, and the partition starts empty (a part of
        the changelog could hold a document's older ids, and claim chunks it lacks)."""
        deadline_s = self.settings.state_restore_deadline_s
        started = time.monotonic()
        deadline = started + deadline_s
        log.info(
            "reading back the chunk state of input partition %d from %s[%d]", partition, self.topic, partition
        )
        docs = _Recent(self.settings.state_max_bytes)  # never more than the state keeps
        consumer = Consumer(
            {
                **self.settings.kafka_common(),
                "group.id": f"{self.settings.group_id}.state-restore",
                "enable.auto.commit": "false",
                "enable.partition.eof": "true",
                # Up to the last stable offset: never the writes of an aborted (or still
                # open) transaction.
                "isolation.level": "read_committed",
            }
        )
        try:
            low, high = _watermarks(consumer, KafkaTopicPartition(self.topic, partition), deadline)
            if high > low:
                consumer.assign([KafkaTopicPartition(self.topic, partition, OFFSET_BEGINNING)])
                done, position = False, low
                while not done:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"read up to offset {position} of {high}")
                    for msg in consumer.consume(10_000, min(1.0, max(deadline - time.monotonic(), 0.01))):
                        err = msg.error()
                        if err is not None:
                            if err.code() == KafkaError._PARTITION_EOF:
                                done = True
                                break
                            if err.fatal():
                                raise KafkaException(err)
                            continue
                        position = msg.offset()
                        if msg.key():
                            key = (sys.intern(topic), partition, msg.key().decode())
                            if msg.value() is None:
                                docs.pop(key)
                            else:
                                docs.put(key, msg.value())
                        if msg.offset() >= high - 1:
                            done = True
        except (KafkaException, TimeoutError, UnicodeDecodeError) as e:
            late = isinstance(e, TimeoutError)
            metrics.STATE_RESTORE_FAILURES.inc()
            log.error(
                "the chunk state of input partition %d could not be read back from %s[%d]%s (%s): "
                "the partition starts empty, so its documents are embedded in full",
                partition,
                self.topic,
                partition,
                f" within its deadline of {deadline_s:g} s" if late else "",
                e,
            )
            return None
        finally:
            consumer.close()
        metrics.STATE_RESTORES.inc()
        log.info(
            "chunk state of input partition %d: %d documents from %s[%d] in %.2f s",
            partition,
            len(docs.items),
            self.topic,
            partition,
            time.monotonic() - started,
        )
        return docs


def _watermarks(consumer: Consumer, tp: KafkaTopicPartition, deadline: float) -> tuple[int, int]:
    """The partition's low and high offsets, asked again while the broker cannot answer
    (down, or the partition not known yet) until the deadline."""
    while True:
        try:
            return consumer.get_watermark_offsets(
                tp, timeout=max(deadline - time.monotonic(), 0.01), cached=False
            )
        except KafkaException as e:
            if e.args[0].fatal():
                raise
            if time.monotonic() + 1.0 >= deadline:
                raise TimeoutError(e.args[0].str()) from e
            time.sleep(1.0)


def ensure_topic(settings: Settings) -> None:
    """Creates the changelog (compacted, one partition per input partition) if it is
    missing; fails clearly if an existing one cannot serve: too few partitions, or not
    compacted (old states would expire)."""
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

    from flows.kafka.topics import check_exist
    from operators.errors import EmbedstreamError

    admin = AdminClient(settings.kafka_common())
    meta = admin.list_topics(timeout=30)
    source = meta.topics.get(settings.input_topic)
    if source is None or source.error is not None:
        raise EmbedstreamError(f"input topic {settings.input_topic!r} is not available")
    wanted = len(source.partitions)
    name = settings.chunk_state_topic()
    existing = meta.topics.get(name)
    if existing is None:
        future = admin.create_topics([NewTopic(name, wanted, -1, config={"cleanup.policy": "compact"})])[name]
        try:
            future.result(timeout=30)
            log.info("created the chunk-state changelog %s (%d partitions, compacted)", name, wanted)
            return
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        # Another member created it a moment ago: brokers list it a moment later.
        check_exist(settings, [name])
        existing = admin.list_topics(name, timeout=30).topics[name]
    if len(existing.partitions) < wanted:
        raise EmbedstreamError(
            f"the chunk-state changelog {name} has {len(existing.partitions)} partitions, "
            f"the input topic {settings.input_topic} {wanted}: give it as many "
            "(or name another with --state-topic)"
        )
    resource = ConfigResource(ResourceType.TOPIC, name)
    config = admin.describe_configs([resource])[resource].result(timeout=30)
    if "compact" not in config["cleanup.policy"].value:
        raise EmbedstreamError(
            f"the chunk-state changelog {name} must be compacted (cleanup.policy=compact), "
            f"not {config['cleanup.policy'].value}: states of documents not updated lately would expire"
        )
