"""A schema registry outage is waited out, never dead-lettered: a real Apicurio Registry
(its Confluent-compatible API) stopped and started under the decoder and under a worker."""

from __future__ import annotations

import threading
import time

from kafka_helpers import FlowTopics, log_tail, start_flow, wait_for
from test_codecs import frame_older_event, older_document_event, register

from flows import metrics
from flows.codecs import decode_document_event
from flows.registry import SchemaRegistry


def retries() -> float:
    return metrics.OUTAGE_RETRIES.labels("registry")._value.get()


def test_the_decoder_waits_for_a_registry_that_is_down(schema_registry):
    schema_id = register(schema_registry, "outage-decoder-value", older_document_event())
    registry = SchemaRegistry.from_url(schema_registry.url)  # has not seen schema_id
    schema_registry.stop()
    outcome: dict = {}

    def decode() -> None:
        try:
            outcome["event"] = decode_document_event(frame_older_event(schema_id), registry=registry)
        except Exception as e:
            outcome["error"] = e

    before = retries()
    thread = threading.Thread(target=decode, daemon=True)
    try:
        thread.start()
        # Retried, not given up on: still waiting after two retries.
        assert wait_for(lambda: retries() >= before + 2 or not thread.is_alive(), 60)
        assert thread.is_alive(), f"gave up on a registry that is only down: {outcome}"
    finally:
        schema_registry.start()
    thread.join(120)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert outcome["event"]["doc_id"] == "doc-1"


def test_a_worker_waits_out_a_registry_stopped_mid_stream(kafka_bootstrap, schema_registry, minilm):
    topics = FlowTopics(kafka_bootstrap)
    first = register(schema_registry, f"{topics.prefix}-a", older_document_event())
    # A second writer schema, which the worker first meets during the outage.
    later = dict(older_document_event(), doc="the same fields, another schema id")
    second = register(schema_registry, f"{topics.prefix}-b", later)
    assert first != second
    before = [(f"before-{i}".encode(), frame_older_event(first, f"before-{i}")) for i in range(5)]
    during = [(f"during-{i}".encode(), frame_older_event(second, f"during-{i}")) for i in range(5)]
    env = {
        "EMBEDSTREAM_SCHEMA_REGISTRY_URL": schema_registry.url,
        # A group member's deadlines near their minimum: a 30 s outage far outlasts them,
        # so the member lives through it only by polling while it waits.
        "EMBEDSTREAM_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "EMBEDSTREAM_KAFKA_MAX_POLL_INTERVAL_MS": "6000",
        "EMBEDSTREAM_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    }
    proc = start_flow(topics, "--batch-size", "4", env=env)
    try:
        topics.produce(before)
        assert wait_for(lambda: _docs(topics) >= {k.decode() for k, _ in before}, 180), log_tail(proc)
        schema_registry.stop()
        topics.produce(during)
        assert wait_for(lambda: "registry unavailable" in log_tail(proc), 120), log_tail(proc)
        time.sleep(30)  # the outage goes on: nothing may be dead-lettered, no member evicted
        assert topics.read(topics.dlq) == []
        assert not _evicted(proc), log_tail(proc)
        schema_registry.start()
        want = {k.decode() for k, _ in before + during}
        assert wait_for(lambda: _docs(topics) >= want, 180), log_tail(proc)
        assert topics.read(topics.dlq) == [], log_tail(proc)
        assert proc.poll() is None, log_tail(proc)
        assert not _evicted(proc), log_tail(proc)
        # Evicted members redo their batch: each event would then have its records twice.
        manifests = [r["doc_id"] for kind, r, _ in topics.read(topics.output) if kind == "DocManifest"]
        assert sorted(manifests) == sorted(want)
    finally:
        proc.terminate()
        proc.wait(60)
        if schema_registry.pid() is None:
            schema_registry.start()


def _evicted(proc) -> bool:
    with open(proc.log, errors="replace") as log:
        text = log.read()
    return "missed the group's deadline" in text or "revoked" in text


def _docs(topics: FlowTopics) -> set[str]:
    return {r["doc_id"] for kind, r, _ in topics.read(topics.output) if kind == "VectorRecord"}
