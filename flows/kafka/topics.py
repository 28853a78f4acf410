"""Topic administration, publishing files as events, and reading records back:
the plumbing behind ``embedstream topics|publish|tail``."""

from __future__ import annotations

import logging
import mimetypes
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from flows import codecs, outage
from flows.kafka.delivery import Delivery
from flows.records import PAYLOAD_TYPE_HEADER
from flows.settings import Settings

log = logging.getLogger("embedstream.kafka")

#: How long ``publish`` and ``redrive`` wait for Kafka to confirm what they sent.
CONFIRM_TIMEOUT_S = 60.0


def create(settings: Settings, name: str, partitions: int = 1, replication: int = 1) -> bool:
    """Creates a topic; False if it exists already."""
    admin = AdminClient(settings.kafka_common())
    future = admin.create_topics([NewTopic(name, partitions, replication)])[name]
    try:
        future.result(timeout=30)
        return True
    except Exception as e:
        if getattr(e.args[0], "code", lambda: None)() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        raise


def max_message_bytes(settings: Settings, topic: str) -> int:
    """The largest message ``topic`` accepts (its ``max.message.bytes``)."""
    from confluent_kafka.admin import ConfigResource, ResourceType

    resource = ConfigResource(ResourceType.TOPIC, topic)
    admin = AdminClient(settings.kafka_common())  # must outlive the future
    config = admin.describe_configs([resource])[resource].result(timeout=30)
    return int(config["max.message.bytes"].value)


#: librdkafka's default ``topic.metadata.propagation.max.ms``: how long a topic the brokers
#: do not list yet may take to appear before it counts as missing.
PROPAGATION_MS = 30_000

#: A metadata request that fails with one of these found no broker to answer: an outage.
_BROKER_AWAY = (
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._RESOLVE,
)


def check_exist(settings: Settings, names: Sequence[str]) -> None:
    """Returns once the brokers list every topic in ``names``; fails with a clear message
    if one is still missing after ``topic.metadata.propagation.max.ms`` (librdkafka's
    setting, 30 s by default; ``--kafka`` sets it). A topic just created takes a moment
    to reach a broker's metadata (seconds, on a broker that has just started), so a
    worker started right after its topics were created waits for them rather than
    exits; brokers here do not create topics on first write. A broker that does not
    answer is an outage, waited out for as long as it lasts."""
    window_s = int(settings.kafka.get("topic.metadata.propagation.max.ms", PROPAGATION_MS)) / 1000
    admin = AdminClient(settings.kafka_common())
    started, delay = time.monotonic(), 0.5
    missing_since: Optional[float] = None  # the window starts once a broker answers without them
    while True:
        listed = outage.wait_out("broker", lambda: _listed(admin, settings.brokers))
        missing = [n for n in names if n not in listed]
        now = time.monotonic()
        if not missing:
            if missing_since is not None:
                log.info("topic(s) %s listed after %.1f s", ", ".join(names), now - started)
            return
        missing_since = now if missing_since is None else missing_since
        if now - missing_since >= window_s:
            from operators.errors import EmbedstreamError

            raise EmbedstreamError(
                f"topic(s) {', '.join(missing)} do not exist on {settings.brokers}: still not listed "
                f"after {window_s:.0f} s (topic.metadata.propagation.max.ms); create them with "
                f"`embedstream topics create {' '.join(missing)} --partitions N`"
            )
        log.warning(
            "topic(s) %s not listed by %s yet (a topic just created takes a moment to reach the "
            "brokers' metadata); waiting up to %.0f s (topic.metadata.propagation.max.ms)",
            ", ".join(missing),
            settings.brokers,
            window_s,
        )
        time.sleep(min(delay, window_s - (now - missing_since)))
        delay = min(delay * 2, 5.0)


def _listed(admin: AdminClient, brokers: str) -> set[str]:
    """The topics the brokers list; :class:`flows.outage.Outage` while none answers."""
    try:
        return set(admin.list_topics(timeout=5).topics)
    except KafkaException as e:
        error = e.args[0]
        if error.fatal() or not (error.retriable() or error.code() in _BROKER_AWAY):
            raise
        raise outage.Outage(f"{brokers}: {error.str()}") from e


def group_members(settings: Settings, group_id: str) -> int:
    """How many live members the consumer group has (0 for a group that never ran)."""
    admin = AdminClient(settings.kafka_common())
    described = admin.describe_consumer_groups([group_id])[group_id].result(timeout=30)
    return len(described.members)


def delete(settings: Settings, names: Sequence[str], patience_s: float = 60.0) -> list[str]:
    """Deletes topics that exist and waits until the brokers no longer list them, so a
    topic created again under the same name right after is a new one; returns the
    names deleted."""
    import time

    admin = AdminClient(settings.kafka_common())
    existing = set(admin.list_topics(timeout=30).topics)
    doomed = [n for n in names if n in existing]
    if doomed:
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            future.result(timeout=60)
        deadline = time.monotonic() + patience_s
        while set(doomed) & set(admin.list_topics(timeout=30).topics) and time.monotonic() < deadline:
            time.sleep(0.2)
    return doomed


def document_event(path: Path, doc_id: str | None = None) -> dict[str, Any]:
    return {
        "doc_id": doc_id or path.name,
        "op": "UPSERT",
        "content": path.read_bytes(),
        "uri": None,
        "mime_type": mimetypes.guess_type(path.name)[0],
        "filename": path.name,
        "metadata": {"source": str(path)},
        "event_time": codecs.now_ms(),
    }


def encode_event(event: dict[str, Any], json_format: bool = False) -> bytes:
    if json_format:
        import base64

        payload = dict(event)
        if payload.get("content") is not None:
            payload["content"] = base64.b64encode(payload["content"]).decode()
            payload["content_encoding"] = "base64"
        return codecs.encode_json(payload)
    return codecs.encode_single_object("DocumentEvent", event)


def delete_event(doc_id: str) -> dict[str, Any]:
    return {
        "doc_id": doc_id,
        "op": "DELETE",
        "content": None,
        "uri": None,
        "mime_type": None,
        "filename": None,
        "metadata": {},
        "event_time": codecs.now_ms(),
    }


def publish_files(
    settings: Settings,
    topic: str,
    files: Sequence[Path | tuple[Path, str]],
    *,
    json_format: bool = False,
    progress: bool = True,
    delete: bool = False,
) -> int:
    """Publishes each file as an UPSERT (or, with ``delete``, a DELETE of its id). Files
    come alone (their id is their name) or as ``(path, doc_id)``."""
    files = [f if isinstance(f, tuple) else (f, f.name) for f in files]
    limit = max_message_bytes(settings, topic)
    producer = Producer(
        {
            **settings.kafka_common(),
            "enable.idempotence": "true",
            "message.max.bytes": str(max(limit, 1_000_000)),
        }
    )
    for path, _ in [] if delete else files:
        # Envelope and headers take a few hundred bytes; leave room for them.
        if path.stat().st_size > limit - 1024:
            from operators.errors import EmbedstreamError

            raise EmbedstreamError(
                f"{path} is {path.stat().st_size} bytes; topic {topic} accepts messages up to {limit} bytes. "
                "Raise the topic's max.message.bytes, or publish a file:// uri instead of the content."
            )

    delivery = Delivery(producer, "events")
    for i, (path, doc_id) in enumerate(files, 1):
        event = delete_event(doc_id) if delete else document_event(path, doc_id)
        delivery.produce(topic, encode_event(event, json_format), event["doc_id"].encode())
        producer.poll(0)
        if progress and sys.stderr.isatty():
            bar = "#" * (30 * i // len(files))
            print(f"\r[{bar:<30}] {i}/{len(files)} {path.name[:40]:<40}", end="", file=sys.stderr)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    delivery.confirm(CONFIRM_TIMEOUT_S)
    return len(files)


def read_all(
    settings: Settings, topic: str, *, timeout: float = 5.0, limit: int | None = None
) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """Every message of ``topic`` from the beginning, decoded; stops after ``timeout``
    seconds without a new message (or at ``limit``)."""
    consumer = Consumer(
        {
            # Committed transactions only (librdkafka's default), unless the settings say otherwise.
            "isolation.level": "read_committed",
            **settings.kafka_common(),
            "group.id": f"embedstream-tail-{codecs.now_ms()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": "false",
        }
    )
    consumer.subscribe([topic])
    seen = 0
    try:
        while limit is None or seen < limit:
            msg = consumer.poll(timeout)
            if msg is None:
                return
            if msg.error():
                continue
            if dict(msg.headers() or ()).get(codecs.TYPE_HEADER) is None:
                # An input topic: document events come from any producer, with no type header.
                kind = "DocumentEvent"
                record = codecs.decode_document_event(msg.value(), msg.key(), timestamp_ms=msg.timestamp()[1])
            else:
                kind, record = codecs.decode_output(msg.value(), msg.headers())
            seen += 1
            yield kind, record, msg
    finally:
        consumer.close()


def tail(settings: Settings, topic: str, n: int, timeout: float) -> Iterator[tuple[str, dict[str, Any], str]]:
    for kind, record, msg in read_all(settings, topic, timeout=timeout, limit=n):
        yield kind, record, f"{msg.partition()}@{msg.offset()}"


def describe(kind: str, r: dict[str, Any]) -> str:
    if kind == "VectorRecord":
        head = ", ".join(f"{x:+.4f}" for x in r["embedding"][:4])
        page = f" p{r['page']}" if r.get("page") else ""
        text = " ".join(r["text"].split())
        return (
            f"{r['doc_id']} #{r['chunk_index']}/{r['chunk_count']}{page} [{head}, …] "
            f"dim={len(r['embedding'])} {text[:50]!r}"
        )
    if kind == "DocManifest":
        return f"{r['doc_id']} MANIFEST {len(r['chunks'])} chunks, {r['model_id']} dim={r['dimension']}"
    if kind == "DeleteMarker":
        return f"{r['doc_id']} DELETE"
    if kind == "DeadLetter":
        source = f"{r['topic']}[{r['partition']}]@{r['offset']}"
        return f"DEAD LETTER {r['stage']}/{r['reason']}: {r['message'][:80]} ({source})"
    return f"{kind} {r}"


def _read_at(settings: Settings, topic: str, partition: int, offset: int) -> Optional[Message]:
    consumer = Consumer(
        {**settings.kafka_common(), "group.id": "embedstream-redrive-reader", "enable.auto.commit": "false"}
    )
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        msg = consumer.poll(10)
        if msg is None or msg.error() or msg.offset() != offset:
            return None
        return msg
    finally:
        consumer.close()


def redrive(
    settings: Settings,
    *,
    to_topic: Optional[str] = None,
    stage: Optional[str] = None,
    reason: Optional[str] = None,
    group_id: Optional[str] = None,
    timeout: float = 5.0,
) -> dict[str, int]:
    """Sends dead letters back to the input topic, e.g. after a fix. Payloads that were
    too large to travel with their letter are re-read from their source coordinates.

    Progress is committed under ``group_id``, so a letter is redriven once. Each filter
    (``stage``, ``reason``) keeps its own progress, so a filtered run does not use up
    the letters it skips; a later unfiltered run may resend what a filtered one sent
    (harmless: processing is at-least-once and chunk ids are deterministic).
    """
    target = to_topic or settings.input_topic
    if group_id is None:
        group_id = ".".join(["embedstream-redrive", settings.dlq_topic, stage or "*", reason or "*"])
    consumer = Consumer(
        {
            **settings.kafka_common(),
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": "false",
        }
    )
    producer = Producer({**settings.kafka_common(), "enable.idempotence": "true"})
    delivery = Delivery(producer, "redriven events")
    stats = {"sent": 0, "reread": 0, "skipped": 0, "lost": 0}
    consumer.subscribe([settings.dlq_topic])
    try:
        while True:
            msg = consumer.poll(timeout)
            if msg is None:
                break
            if msg.error():
                continue
            _kind, letter = codecs.decode_output(msg.value(), msg.headers())
            if (stage and letter["stage"] != stage) or (reason and letter["reason"] != reason):
                stats["skipped"] += 1
                continue
            payload, key = letter.get("payload"), letter.get("key")
            # A record of an output topic (a sink's letter) goes back with its type.
            payload_type = dict(msg.headers() or ()).get(PAYLOAD_TYPE_HEADER)
            headers = ((codecs.TYPE_HEADER, payload_type),) if payload_type else ()
            if payload is None:
                original = _read_at(settings, letter["topic"], letter["partition"], letter["offset"])
                if original is None:
                    stats["lost"] += 1  # retention removed it: say so, do not pretend
                    continue
                payload, key, headers = original.value(), original.key(), original.headers() or ()
                stats["reread"] += 1
            delivery.produce(target, payload, key, headers=headers)
            stats["sent"] += 1
            producer.poll(0)
        # Only once Kafka has every letter sent: progress past a letter not delivered
        # would lose it.
        delivery.confirm(CONFIRM_TIMEOUT_S)
        consumer.commit(asynchronous=False) if stats["sent"] + stats["skipped"] else None
    finally:
        consumer.close()
    return stats
