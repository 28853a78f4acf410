"""Delivery guarantees on a real broker: offsets committed after delivery, recovery
after kill -9, SIGTERM drains, a broker restart waited out, several processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from kafka_helpers import (
    FlowTopics,
    accounted,
    avro_event,
    check_outcomes,
    count,
    free_port,
    log_tail,
    mixed_events,
    run_args,
    start_flow,
    wait_for,
)

BODY = " ".join(f"Sentence {i} of a long document about stream processing and recovery." for i in range(120))


def events(n: int, prefix: str = "doc") -> list[tuple[bytes, bytes]]:
    return mixed_events(n, lambda i, doc_id: f"{doc_id}: {BODY}", prefix)


def test_offsets_are_committed_after_delivery_and_runs_resume_there(kafka_bootstrap):
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    topics.produce(events(10))
    topics.run()
    assert sum(topics.committed()) == 10  # lag tools see the group caught up
    before = count(topics)
    topics.run()  # nothing new: resumes at the committed offsets
    assert count(topics) == before
    topics.produce(events(3, prefix="late"))
    topics.run()
    assert sum(topics.committed()) == 13
    assert {d for d in accounted(topics) if d.startswith("late")} == {"late-0", "late-1", "late-2"}


def test_kill_9_loses_nothing(kafka_bootstrap, tmp_path):
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    batch = events(60)
    topics.produce(batch)
    args = ("--scaling", "cluster", "--recovery-dir", str(tmp_path / "recovery"), "--snapshot-s", "0.5")
    args += ("--batch-size", "2")
    worker = start_flow(topics, *args)
    try:
        assert wait_for(lambda: count(topics) >= 8, timeout=120), "the worker made no progress"
    finally:
        worker.kill()  # kill -9: no drain, no flush, no final snapshot
        worker.wait()
    processed_before = count(topics)
    topics.run(*args)
    check_outcomes(topics, [k.decode() for k, _ in batch])
    assert count(topics) >= processed_before


def test_sigterm_drains_and_exits_cleanly(kafka_bootstrap, tmp_path):
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    batch = events(40)
    topics.produce(batch)
    args = ("--scaling", "cluster", "--recovery-dir", str(tmp_path / "recovery"), "--snapshot-s", "1")
    args += ("--batch-size", "2")
    worker = start_flow(topics, *args)
    assert wait_for(lambda: count(topics) >= 5, timeout=120)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == 0, log_tail(worker)
    topics.run(*args)
    check_outcomes(topics, [k.decode() for k, _ in batch])


def test_the_local_brokers_cluster_id_is_never_taken_for_an_option():
    # One random id in 64 starts with '-': `kafka.tools.StorageTool format -t -…` failed.
    from flows.dev.kafka import base64_uuid

    ids = [base64_uuid() for _ in range(2000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids)


def test_broker_restart_is_waited_out(kafka_bootstrap):
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("restarts only the project's own local broker")
    from flows.dev.kafka import LocalKafka

    broker = LocalKafka()
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    first = events(10, prefix="before")
    topics.produce(first)
    worker = start_flow(topics, "--snapshot-s", "1")
    try:
        assert wait_for(lambda: count(topics) >= 10, timeout=120)
        broker.stop()
        assert wait_for(lambda: worker.poll() is None, timeout=3)
        broker.start()
        # The broker outlives whoever starts it, so it runs from its own directory, never
        # from the caller's (a CI clone that may be deleted under it).
        assert Path(os.readlink(f"/proc/{broker.pid()}/cwd")) == broker.home.resolve()
        second = events(10, prefix="after")
        topics.produce(second)
        ids = [k.decode() for k, _ in first + second]
        assert wait_for(lambda: sorted(accounted(topics)) == sorted(ids), timeout=180)
        assert worker.poll() is None, "the worker survived the broker restart"
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0, log_tail(worker)
    check_outcomes(topics, ids)


def test_two_processes_share_four_partitions_exactly_once(kafka_bootstrap):
    topics = FlowTopics(kafka_bootstrap, partitions=4)
    batch = events(40)
    topics.produce(batch)
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            run_args(topics, "--until-end", "-i", str(i), "-a", addresses),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=240) == 0, p.stderr.read()[-2000:]
    check_outcomes(topics, [k.decode() for k, _ in batch])
    outputs = topics.read(topics.output) + topics.read(topics.dlq)
    keys = [(kind, r.get("chunk_id") or r.get("doc_id") or r.get("offset")) for kind, r, _ in outputs]
    assert len(keys) == len(set(keys)), "nothing failed, so nothing is processed twice"


def test_redrive_after_a_fix(kafka_bootstrap):
    from flows.kafka.topics import redrive
    from flows.settings import Settings

    topics = FlowTopics(kafka_bootstrap)
    big = avro_event("big", content=b"word " * 2000, filename="big.txt")
    topics.produce([(b"ok", avro_event("ok", content=b"small", filename="a.txt")), (b"big", big)])
    strict = {"EMBEDSTREAM_MAX_DOCUMENT_BYTES": "5000", "EMBEDSTREAM_DLQ_PAYLOAD_MAX_BYTES": "100"}
    topics.run(env=strict)
    [(_, letter, _)] = topics.read(topics.dlq)
    assert (letter["reason"], letter["payload"]) == ("too_large", None)  # only coordinates travel

    settings = Settings(brokers=kafka_bootstrap, input_topic=topics.input, dlq_topic=topics.dlq)
    assert redrive(settings, reason="corrupt")["sent"] == 0
    stats = redrive(settings)
    assert (stats["sent"], stats["reread"], stats["lost"]) == (1, 1, 0)
    assert redrive(settings)["sent"] == 0  # progress is committed: nothing twice
    resent = topics.read(topics.input, decode=False)[-1][2]
    assert (resent.key(), resent.value()) == (b"big", big)

    topics.run()  # the fix: default limits; resumes at the committed offsets
    assert {r["doc_id"] for kind, r, _ in topics.read(topics.output) if kind == "VectorRecord"} == {
        "ok",
        "big",
    }


def test_metrics_endpoint_and_json_logs(kafka_bootstrap):
    import json
    import urllib.request

    topics = FlowTopics(kafka_bootstrap, partitions=2)
    topics.produce(events(10))
    port = free_port()
    worker = start_flow(topics, "--metrics-port", str(port), "--log-format", "json")
    try:
        assert wait_for(lambda: count(topics) >= 10, timeout=120)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0, log_tail(worker)
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['embedstream_events_total{outcome="embedded"}'] == 8
    assert samples['embedstream_events_total{outcome="deleted"}'] == 1
    assert samples['embedstream_dead_letters_total{reason="corrupt",stage="extract"}'] == 1
    assert samples["embedstream_chunks_total"] >= 8 and samples["embedstream_tokens_total"] > 1000
    assert samples['embedstream_stage_seconds_count{stage="embed"}'] >= 1
    assert samples["embedstream_end_to_end_seconds_count"] == 10
    lags = {k: v for k, v in samples.items() if k.startswith("embedstream_consumer_lag{")}
    assert len(lags) == 2 and all(v == 0 for v in lags.values())
    with open(worker.log) as f:
        lines = f.read().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(r["logger"] == "embedstream" and r["message"].startswith("settings:") for r in records)
    # librdkafka's own lines come through our logging too, never raw ('%6|…|BGQUEUE|…').
    assert not [line for line in lines if line.startswith("%")], lines


def _events_processed(port: int) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("embedstream_events_total{")
    )


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_throttled_output_applies_backpressure(kafka_bootstrap):
    """A broker quota throttles the sink to a few records a second: the worker must
    stop pulling input (processed events stay within a micro-batch of what was
    delivered) and its memory must not grow; lifting the quota drains the rest."""
    import uuid

    from flows.dev.kafka import LocalKafka

    tools = LocalKafka()
    client = f"throttled-{uuid.uuid4().hex[:8]}"

    throttled = False

    def quota(rate: int | None) -> None:
        nonlocal throttled
        change = (
            ["--add-config", f"producer_byte_rate={rate}"]
            if rate
            else ["--delete-config", "producer_byte_rate"]
        )
        tools.run_tool(
            "kafka.admin.ConfigCommand", "--bootstrap-server", kafka_bootstrap, "--alter",
            "--entity-type", "clients", "--entity-name", client, *change,
        )  # fmt: skip
        throttled = rate is not None

    topics = FlowTopics(kafka_bootstrap, partitions=1)

    def records(topics: FlowTopics) -> int:  # manifests are small: count what the quota holds back
        return sum(kind == "VectorRecord" for kind, _, _ in topics.read(topics.output))

    n, batch_size = 300, 8
    batch = [
        (
            f"bp-{i}".encode(),
            avro_event(f"bp-{i}", content=f"Short document number {i}.".encode(), filename="a.txt"),
        )
        for i in range(n)
    ]
    topics.produce(batch)
    quota(6000)  # bytes/s: about three 1.7 kB vector records a second
    port = free_port()
    worker = start_flow(
        topics, "--batch-size", str(batch_size), "--metrics-port", str(port),
        env={"EMBEDSTREAM_KAFKA_CLIENT_ID": client},
    )  # fmt: skip
    try:
        assert wait_for(lambda: records(topics) >= 5, timeout=120), log_tail(worker)
        samples = []
        for _ in range(4):
            time.sleep(4)
            samples.append((_events_processed(port), records(topics), _rss_mb(worker.pid)))
        for processed, delivered, _ in samples:
            # The batch in the sink plus the one the source may hand over next: no more.
            assert processed <= delivered + 2 * batch_size, samples
        assert samples[-1][1] < n / 2, f"the quota did not throttle: {samples}"
        assert samples[-1][2] - samples[0][2] < 64, f"memory grew under backpressure: {samples}"
        quota(None)
        assert wait_for(lambda: records(topics) >= n, timeout=180), log_tail(worker)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        if throttled:
            quota(None)
    assert {k.decode() for k, _ in batch} <= {record["doc_id"] for _, record, _ in topics.read(topics.output)}


def test_a_micro_batch_is_bounded_by_count_and_bytes_but_never_empty():
    from flows.kafka.io import InputMessage, take_batch

    def msgs(*sizes):
        return [InputMessage("t", 0, i, None, b"x" * n, None) for i, n in enumerate(sizes)]

    pending = msgs(10, 10, 10, 10)
    assert [m.offset for m in take_batch(pending, 3, 1000)] == [0, 1, 2]
    assert [m.offset for m in pending] == [3]
    pending = msgs(10, 10, 10)
    assert [m.offset for m in take_batch(pending, 10, 25)] == [0, 1]  # 30 bytes would be over
    pending = msgs(500, 1)
    assert [m.offset for m in take_batch(pending, 10, 100)] == [0]  # too big, but goes alone
    assert [m.offset for m in take_batch(pending, 10, 100)] == [1]
    assert take_batch(pending, 10, 100) == [] and pending == []
