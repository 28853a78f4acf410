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
changelog back the first time it sees a batch of that partition.

Correctness never depends on the state being there: the changelog is written only
after the records of the batch were delivered, so the state never claims a chunk
that the output topic lacks, and a chunk the state does not know (no changelog yet,
a new worker, a replay) is simply embedded again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaTopicPartition

from flows import metrics
from flows.kafka.io import OutputMessage
from flows.settings import Settings

if TYPE_CHECKING:
    from flows.embed_steps import Batch, Work

log = logging.getLogger("embedstream.state")

#: Bytes of each chunk id the state keeps: enough that two chunks of one document
#: never share a prefix by chance (2^-64 per pair).
ID_PREFIX_BYTES = 8
#: First byte of a changelog value: its layout, for readers of later releases.
_FORMAT = b"\x01"


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


class ChunkState:
    """The packed chunk ids per doc_id, per input partition, read back from the
    changelog on first use of a partition (``restore=False``: start empty)."""

    def __init__(self, settings: Settings, *, restore: bool = True) -> None:
        self.topic = settings.chunk_state_topic()
        self.settings = settings
        self.restore_enabled = restore
        self._partitions: dict[tuple[str, int], dict[str, bytes]] = {}
        self._lock = threading.Lock()

    def partition(self, topic: str, partition: int) -> dict[str, bytes]:
        """doc_id → packed ids of one input partition, restored on first use."""
        key = (topic, partition)
        with self._lock:
            docs = self._partitions.get(key)
            if docs is None:
                docs = self._restore(partition) if self.restore_enabled else {}
                self._partitions[key] = docs
                metrics.STATE_DOCUMENTS.set(self.documents())
            return docs

    def drop(self, topic: str, partition: int) -> None:
        """Forgets a partition (revoked: another worker owns its changelog now)."""
        with self._lock:
            self._partitions.pop((topic, partition), None)
            metrics.STATE_DOCUMENTS.set(self.documents())

    def documents(self) -> int:
        return sum(len(d) for d in self._partitions.values())

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
                packed = self.partition(w.message.topic, w.message.partition).get(doc_id)
                if packed is not None:
                    known = unpack(packed)
                    w.fresh = [prefix(i) not in known for i in w.ids]
            seen.add(doc_id)

    def remember(self, batch: Batch) -> list[OutputMessage]:
        """Each document's ids after the batch, in memory now and, once the batch's
        records are delivered, in the changelog (messages the sink produces last)."""
        latest: dict[tuple[str, int, str], tuple[Work, Optional[bytes]]] = {}
        for w in batch:
            if w.failure is not None:
                continue  # the document keeps what it had
            m, doc_id = w.message, w.event["doc_id"]
            docs = self.partition(m.topic, m.partition)
            if w.event["op"] == "DELETE":
                docs.pop(doc_id, None)
                value = None
            else:
                value = docs[doc_id] = pack(w.ids)
            latest[(m.topic, m.partition, doc_id)] = (w, value)
        metrics.STATE_DOCUMENTS.set(self.documents())
        return [
            OutputMessage(
                self.topic,
                doc_id.encode(),
                value,
                source=(w.message.topic, w.message.partition, w.message.offset),
                partition=partition,
                after_delivery=True,
            )
            for (_, partition, doc_id), (w, value) in latest.items()
        ]

    def _restore(self, partition: int) -> dict[str, bytes]:
        started = time.monotonic()
        docs: dict[str, bytes] = {}
        consumer = Consumer(
            {
                **self.settings.kafka_common(),
                "group.id": f"{self.settings.group_id}.state-restore",
                "enable.auto.commit": "false",
                "enable.partition.eof": "true",
            }
        )
        try:
            tp = KafkaTopicPartition(self.topic, partition)
            low, high = consumer.get_watermark_offsets(tp, timeout=30, cached=False)
            if high > low:
                consumer.assign([KafkaTopicPartition(self.topic, partition, OFFSET_BEGINNING)])
                done = False
                while not done:
                    for msg in consumer.consume(10_000, 1.0):
                        err = msg.error()
                        if err is not None:
                            if err.code() == KafkaError._PARTITION_EOF:
                                done = True
                                break
                            if err.fatal():
                                raise KafkaException(err)
                            continue
                        doc_id = msg.key().decode() if msg.key() else None
                        if doc_id is not None:
                            if msg.value() is None:
                                docs.pop(doc_id, None)
                            else:
                                docs[doc_id] = msg.value()
                        if msg.offset() >= high - 1:
                            done = True
        finally:
            consumer.close()
        metrics.STATE_RESTORES.inc()
        log.info(
            "chunk state of input partition %d: %d documents from %s[%d] in %.2f s",
            partition,
            len(docs),
            self.topic,
            partition,
            time.monotonic() - started,
        )
        return docs


def ensure_topic(settings: Settings) -> None:
    """Creates the changelog (compacted, one partition per input partition) if it is
    missing; fails clearly if an existing one cannot serve: too few partitions, or not
    compacted (old states would expire)."""
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

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
