"""The second job: the vector topic into a vector store, exactly.

    Kafka source (the output topic, group ``embedstream-sink``) → store sink

Each batch the source hands over is decoded, planned against the versions the store
has applied (:func:`flows.stores.plan`), written in one transaction (PostgreSQL) or
one merge per table (LanceDB), and only then are its offsets committed under the
sink's group; the sink resumes from them. It reads with ``isolation.level=read_committed``:
of an exactly-once flow it sees committed batches only. A replay therefore rewrites what is there
and changes nothing. Records that cannot be written go to the sink's dead-letter
topic with stage ``sink``. A store that is down blocks the batch (and so the
consumption) until it is back.

    python -m bytewax.run flows.sink:flow      (configured by EMBEDSTREAM_* variables)
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition

from flows import codecs, health, metrics, outage, records
from flows.kafka.delivery import Delivery
from flows.kafka.io import InputMessage, KafkaInput, ReadOptions
from flows.settings import Settings
from flows.stores import (
    DeleteOp,
    Incomplete,
    ManifestOp,
    Op,
    RecordOp,
    Store,
    StoreConfigError,
    StoreError,
    TableSpec,
    Version,
    check_sparse,
    open_store,
    plan,
    row_of,
)

log = logging.getLogger("embedstream.sink")


#: How the log and the metrics name each operation.
_KINDS = {RecordOp: "records", ManifestOp: "manifests", DeleteOp: "deletes"}


class Rejected(Exception):
    """A message the sink cannot write; it becomes a dead letter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def to_op(message: InputMessage, registry: Any = None) -> Optional[Op]:
    """One output message as a store operation; None for one the sink has no use for
    (a dead letter routed to the same topic). Raises :class:`Rejected`."""
    if message.value is None:
        raise Rejected("bad_payload", "a message without a value (a tombstone) is not an embedstream record")
    try:
        kind, record = codecs.decode_output(message.value, message.headers, registry)
    except (codecs.DecodeError, ValueError, KeyError, EOFError) as e:
        raise Rejected("bad_payload", f"undecodable record: {type(e).__name__}: {e}") from None
    try:
        version = Version.of(record)
        if kind == "VectorRecord":
            spec = TableSpec.of(record)
            if record.get("dimension") and len(record["embedding"]) != record["dimension"]:
                raise Rejected(
                    "dimension_mismatch",
                    f"the vector has {len(record['embedding'])} dimensions, "
                    f"the record says {record['dimension']}",
                )
            problem = check_sparse(record)
            if problem is not None:
                raise Rejected("bad_sparse_vector", problem)
            return RecordOp(spec, version, row_of(record))
        if kind == "DocManifest":
            return ManifestOp(
                TableSpec.of(record), version, record["doc_id"], record["chunks"], dict(record["metadata"])
            )
        if kind == "DeleteMarker":
            return DeleteOp(version, record["doc_id"])
    except (KeyError, TypeError, ValueError) as e:
        raise Rejected("bad_payload", f"malformed {kind}: {type(e).__name__}: {e}") from None
    if kind == "DeadLetter":
        return None
    raise Rejected("bad_payload", f"a {kind} does not belong on a vector topic")


def apply_ops(store: Store, ops: list[Op]) -> list[Incomplete]:
    """One batch of operations into ``store``: planned against the versions it has
    applied and the chunks it holds, then written in one go. Returns the manifests left
    unapplied for want of chunks."""
    tables = {t.name: t for t in store.tables()}
    for o in ops:
        if not isinstance(o, DeleteOp):
            tables.setdefault(o.spec.name, o.spec)
    keys = set()
    for o in ops:
        doc_id = o.row["doc_id"] if isinstance(o, RecordOp) else o.doc_id
        names = list(tables) if isinstance(o, DeleteOp) else [o.spec.name]
        keys.update((name, doc_id) for name in names)
    changes, incomplete = plan(ops, list(tables.values()), store.states(keys), _stored_chunks(store, ops))
    if changes:
        store.write(changes)
    return incomplete


def _stored_chunks(store: Store, ops: list[Op]) -> dict[tuple[str, str], set[str]]:
    """The chunk ids the store holds of each document that a manifest of ``ops`` names."""
    wanted: dict[str, tuple[TableSpec, set[str]]] = {}
    for o in ops:
        if isinstance(o, ManifestOp):
            wanted.setdefault(o.spec.name, (o.spec, set()))[1].add(o.doc_id)
    found = {}
    for name, (spec, doc_ids) in wanted.items():
        for doc_id, ids in store.chunk_ids(spec, sorted(doc_ids)).items():
            found[(name, doc_id)] = ids
    return found


def _missing_chunks(
    ops: list[tuple[InputMessage, Op]], incomplete: list[Incomplete]
) -> list[tuple[InputMessage, str, str]]:
    """The dead letters of the manifests left unapplied, naming the chunks they miss."""
    message_of = {id(o): m for m, o in ops}
    return [(message_of[id(i.op)], "missing_chunks", i.describe()) for i in incomplete]


class _StorePartition(StatelessSinkPartition[InputMessage]):
    def __init__(self, settings: Settings, store: Store, retry_s: float) -> None:
        self.settings = settings
        self.store = store
        self.retry_s = retry_s
        kafka = settings.kafka_common()
        self.producer = Producer({"enable.idempotence": "true", "acks": "all", "linger.ms": "5", **kafka})
        self.delivery = Delivery(self.producer, "sink dead letters")
        self.committer = Consumer(
            {**kafka, "group.id": settings.sink_group_id, "enable.auto.commit": "false"}
        )
        #: Messages written by type, and dead letters.
        self.counts = dict.fromkeys([*_KINDS.values(), "dead letters"], 0)
        # Confluent-framed records name their schema by a registry id.
        self.registry = None
        if settings.schema_registry_url:
            from flows.registry import SchemaRegistry

            self.registry = SchemaRegistry.from_url(settings.schema_registry_url)

    def write_batch(self, messages: list[InputMessage]) -> None:
        ops: list[tuple[InputMessage, Op]] = []
        letters: list[tuple[InputMessage, str, str]] = []
        for m in messages:
            try:
                found = to_op(m, self.registry)
            except Rejected as e:
                letters.append((m, e.reason, str(e)))
                continue
            if found is not None:
                ops.append((m, found))
        with metrics.SINK_BATCH_SECONDS.time():
            letters += self._write(ops)
        self._dead_letters(letters)
        self._commit(messages)
        rejected = {id(m) for m, _, _ in letters}
        for m, o in ops:
            if id(m) not in rejected:
                kind = _KINDS[type(o)]
                self.counts[kind] += 1
                metrics.SINK_MESSAGES.labels(kind).inc()
        for _, reason, _ in letters:
            self.counts["dead letters"] += 1
            metrics.SINK_DEAD_LETTERS.labels(reason).inc()

    def _write(self, ops: list[tuple[InputMessage, Op]]) -> list[tuple[InputMessage, str, str]]:
        """Writes all ops as one batch, waiting out an unavailable store. A batch the
        store refuses for its data is written again one message at a time, so that only
        the messages it refuses become dead letters."""
        if not ops:
            return []
        try:
            return _missing_chunks(ops, self._with_retry(lambda: self._apply([o for _, o in ops])))
        except StoreConfigError:
            raise
        except StoreError:
            raise
        except Exception as e:
            log.warning("the store refused a batch of %d (%s); writing one at a time", len(ops), e)
        letters = []
        for m, o in ops:
            try:
                letters += _missing_chunks([(m, o)], self._with_retry(lambda o=o: self._apply([o])))
            except (StoreError, StoreConfigError):
                raise
            except Exception as e:
                letters.append((m, "store_rejected", f"{type(e).__name__}: {e}"))
        return letters

    def _apply(self, ops: list[Op]) -> list[Incomplete]:
        return apply_ops(self.store, ops)

    def _with_retry(self, fn: Any) -> Any:
        return outage.wait_out("store", fn, transient=(StoreError,), give_up_s=self.retry_s)

    def _dead_letters(self, letters: list[tuple[InputMessage, str, str]]) -> None:
        if not letters:
            return
        topic = self.settings.sink_dlq()
        for m, reason, text in letters:
            log.warning("dead letter %s[%d]@%d: %s: %s", m.topic, m.partition, m.offset, reason, text)
            letter = records.dead_letter(
                m,
                "sink",
                reason,
                text,
                payload=m.value,
                payload_cap=1_000_000,
                doc_id=(m.key or b"").decode("utf-8", "replace") or None,
            )
            self.delivery.produce(
                topic,
                codecs.encode_single_object("DeadLetter", letter),
                m.key,
                headers=records.dead_letter_headers(m),
            )
        self.delivery.confirm(300)

    def _commit(self, messages: list[InputMessage]) -> None:
        """The store has everything up to these messages: the sink resumes after them."""
        done: dict[tuple[str, int], int] = {}
        for m in messages:
            done[(m.topic, m.partition)] = max(done.get((m.topic, m.partition), -1), m.offset + 1)
        if not done:
            return
        offsets = [KafkaTopicPartition(t, p, o) for (t, p), o in done.items()]
        for attempt in range(10):
            try:
                self.committer.commit(offsets=offsets, asynchronous=False)
                return
            except KafkaException as e:
                log.warning("could not commit sink offsets %s (attempt %d): %s", done, attempt + 1, e)
                time.sleep(min(2**attempt * 0.2, 5))
        # Not fatal: the store is ahead of the offsets, and a replay changes nothing.

    def close(self) -> None:
        log.info("sink worker done: %s", ", ".join(f"{n} {kind}" for kind, n in self.counts.items()))
        self.producer.flush(30)
        self.committer.close()
        self.store.close()


class StoreOutput(DynamicSink[InputMessage]):
    def __init__(self, settings: Settings, retry_s: float = 3600.0) -> None:
        self.settings = settings
        self.retry_s = retry_s

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _StorePartition:
        store = open_store(self.settings.store, text_language=self.settings.text_search_language)
        return _StorePartition(self.settings, store, self.retry_s)


def build(settings: Optional[Settings] = None) -> Dataflow:
    settings = settings or Settings.from_env()
    flow = Dataflow("embedstream-sink")
    messages = op.input(
        "vectors",
        flow,
        health.watched(
            KafkaInput(
                # Records of aborted transactions (exactly-once flows) are never read;
                # on a topic written without transactions this changes nothing.
                {
                    **settings.kafka_common(),
                    "group.id": settings.sink_group_id,
                    "isolation.level": "read_committed",
                },
                settings.output_topic,
                ReadOptions.of(settings, settings.sink_batch_size),
            )
        ),
    )
    op.output("store", messages, StoreOutput(settings))
    return flow


def __getattr__(name: str) -> Dataflow:
    if name == "flow":
        return build()
    raise AttributeError(name)
