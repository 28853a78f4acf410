"""An object store outage under a running worker is waited out, never dead-lettered: the
real local S3 server killed while a group member fetches, for longer than the member's
session and poll deadlines, then started again."""

from __future__ import annotations

import time

import obstore
from kafka_helpers import FlowTopics, avro_event, log_tail, start_flow, wait_for
from obstore.store import S3Store


def test_a_worker_waits_out_an_object_store_stopped_mid_stream(kafka_bootstrap, s3_server, s3_bucket, minilm):
    store = S3Store(s3_bucket, **s3_server.store_options())
    for i in range(10):
        obstore.put(store, f"docs/{i}.txt", f"document {i}, kept in a bucket through an outage".encode())
    topics = FlowTopics(kafka_bootstrap)

    def events(names):
        return [
            (n.encode(), avro_event(n, uri=f"s3://{s3_bucket}/docs/{n}.txt", filename="a.txt")) for n in names
        ]

    env = {
        **s3_server.env(),
        # A group member's deadlines near their minimum: a 15 s outage far outlasts them,
        # so the member lives through it only by polling while it waits.
        "EMBEDSTREAM_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "EMBEDSTREAM_KAFKA_MAX_POLL_INTERVAL_MS": "6000",
        "EMBEDSTREAM_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    }
    proc = start_flow(topics, "--batch-size", "4", "--allow-uri", f"s3://{s3_bucket}/", env=env)
    try:
        topics.produce(events(["0", "1", "2", "3", "4"]))
        assert wait_for(lambda: _docs(topics) >= {"0", "1", "2", "3", "4"}, 180), log_tail(proc)
        s3_server.stop(timeout=0)
        topics.produce(events(["5", "6", "7", "8", "9"]))
        assert wait_for(lambda: "object store unavailable" in log_tail(proc), 120), log_tail(proc)
        time.sleep(15)  # the outage goes on: nothing may be dead-lettered, no member evicted
        assert topics.read(topics.dlq) == []
        assert not _evicted(proc), log_tail(proc)
        s3_server.start()
        want = {str(i) for i in range(10)}
        assert wait_for(lambda: _docs(topics) >= want, 180), log_tail(proc)
        assert topics.read(topics.dlq) == [], log_tail(proc)
        assert proc.poll() is None and not _evicted(proc), log_tail(proc)
        # An evicted member redoes its batch: each document would then have two manifests.
        manifests = [r["doc_id"] for kind, r, _ in topics.read(topics.output) if kind == "DocManifest"]
        assert sorted(manifests) == sorted(want)
    finally:
        proc.terminate()
        proc.wait(60)
        if s3_server.pid() is None:
            s3_server.start()


def _evicted(proc) -> bool:
    with open(proc.log, errors="replace") as log:
        text = log.read()
    return "missed the group's deadline" in text or "revoked" in text


def _docs(topics: FlowTopics) -> set[str]:
    return {r["doc_id"] for kind, r, _ in topics.read(topics.output) if kind == "VectorRecord"}
