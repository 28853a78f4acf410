"""`embedstream run` at start, against a broker that does not list its topics yet: a
topic just created takes a moment to reach the broker's metadata (seconds, on a broker
that has just started: issue 35's flake, where both exactly-once members exited with
"do not exist" right after the test created their topics), and a broker may be down.
Both are waited out; a topic still missing after librdkafka's
``topic.metadata.propagation.max.ms`` is reported clearly, in both delivery modes."""

from __future__ import annotations

import subprocess

from eos_helpers import TINY_MODEL, Expected, check_exactly_once, committed_total, read_as, start_member
from kafka_helpers import FlowTopics, avro_event, free_port, run_args, start_flow, wait_for

FAST_GROUP = ("--kafka", "session.timeout.ms=6000", "--kafka", "heartbeat.interval.ms=1000")


def test_a_member_started_before_its_topics_exist_waits_for_them_then_delivers_each_record_once(
    kafka_bootstrap, tmp_path
):
    topics = FlowTopics(kafka_bootstrap, partitions=2, created=False)
    member = start_member(topics, "early", tmp_path, "--batch-size", "8", *FAST_GROUP)
    try:
        waiting = lambda: "not listed by" in member.text() or member.proc.poll() is not None  # noqa: E731
        assert wait_for(waiting, timeout=60), member.tail()
        assert member.proc.poll() is None, member.tail()
        topics.create()
        events = [
            (f"e-{i}".encode(), avro_event(f"e-{i}", content=f"Early {i}.".encode(), filename="a.txt"))
            for i in range(20)
        ]
        topics.produce(events)
        assert wait_for(lambda: committed_total(topics) == len(events), timeout=120), member.tail()
    finally:
        code = member.stop()
    assert code == 0, member.tail()
    text = member.text()
    assert "listed after" in text, text[-3000:]
    expected = [
        Expected(msg.key().decode(), msg.partition(), msg.offset(), "DocManifest")
        for _, _, msg in read_as(kafka_bootstrap, topics.input, "read_uncommitted")
    ]
    assert check_exactly_once(topics, expected, incremental=False)["records"] == len(events)


def test_a_topic_still_missing_after_the_propagation_window_is_reported_clearly(kafka_bootstrap):
    topics = FlowTopics(kafka_bootstrap, created=False)
    result = subprocess.run(
        run_args(topics, "--model", TINY_MODEL, "--kafka", "topic.metadata.propagation.max.ms=2000"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    names = f"{topics.input}, {topics.output}, {topics.dlq}"
    assert last.startswith(f"embedstream: topic(s) {names} do not exist"), last
    assert "still not listed after 2 s (topic.metadata.propagation.max.ms)" in last, last
    assert f"create them with `embedstream topics create {topics.input}" in last, last
    # It waited the window out, retrying, before it said so.
    assert result.stderr.count("not listed by") >= 2, result.stderr[-3000:]


def test_a_broker_down_at_start_is_waited_out(tmp_path):
    """Nothing listens on the brokers' address: an outage, waited out (alive, retrying,
    saying so), never a crash after the metadata request's timeout."""
    topics = FlowTopics(f"127.0.0.1:{free_port()}", created=False)
    flow = start_flow(topics, "--model", TINY_MODEL)
    try:
        waiting = lambda: "broker unavailable" in _text(flow) or flow.poll() is not None  # noqa: E731
        assert wait_for(waiting, timeout=30), _text(flow)[-3000:]
        assert wait_for(lambda: _text(flow).count("broker unavailable") >= 3, timeout=40), _text(flow)[-3000:]
        assert flow.poll() is None, _text(flow)[-3000:]
    finally:
        flow.kill()
        flow.wait()


def _text(proc: subprocess.Popen) -> str:
    with open(proc.log, errors="replace") as f:
        return f.read()
