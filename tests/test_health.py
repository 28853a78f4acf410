"""Liveness and readiness on the real sink, the real broker and the real database:
``/healthz`` fails when a batch loop really stops advancing (a write stuck behind a lock
another session holds), and stays green while the loop waits out a database outage,
which ``/readyz`` reports instead. The worker's flow is probed the same way."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from kafka_helpers import FlowTopics, free_port, wait_for
from sink_helpers import random_stream
from test_sink import _stream_to_topic

STALL_S = 3


def probe(port: int, path: str) -> tuple[int, str]:
    """(HTTP status, body) of ``path``; (0, why) while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def start_sink(topics: FlowTopics, store: str, port: int) -> subprocess.Popen:
    log = tempfile.NamedTemporaryFile("w+", prefix="embedstream-sink-", suffix=".log", delete=False)
    args = [
        sys.executable, "-m", "flows.cli", "sink", "--brokers", topics.bootstrap,
        "--output-topic", topics.output, "--store", store, "--group-id", f"{topics.prefix}-sink",
        "--metrics-port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "EMBEDSTREAM_STALL_S": str(STALL_S)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log.name
    return proc


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with open(proc.log, errors="replace") as f:
        return f.read()[-3000:]


def test_a_sink_waiting_out_a_database_outage_is_alive_but_not_ready(kafka_bootstrap, postgres_dsn):
    from flows.dev import postgres as local_postgres

    if os.environ.get("EMBEDSTREAM_TEST_POSTGRES"):
        pytest.skip("stops the local server; $EMBEDSTREAM_TEST_POSTGRES points elsewhere")
    topics, port = FlowTopics(kafka_bootstrap), free_port()
    _stream_to_topic(topics, random_stream(seed=7, docs=4, events=12))
    local_postgres.stop()
    proc = start_sink(topics, postgres_dsn, port)
    try:
        try:
            assert wait_for(lambda: _not_ready_for_the_store(port), 90), probe(port, "/readyz")
            # Waiting several stall intervals: alive all along, never ready.
            deadline = time.monotonic() + 3 * STALL_S
            while time.monotonic() < deadline:
                assert probe(port, "/healthz")[0] == 200, probe(port, "/healthz")
                assert probe(port, "/readyz")[0] == 503, probe(port, "/readyz")
                time.sleep(0.5)
        finally:
            local_postgres.start()
        assert wait_for(lambda: probe(port, "/readyz")[0] == 200, 120), probe(port, "/readyz")
        assert probe(port, "/healthz")[0] == 200
        assert "embedstream_sink_messages" in probe(port, "/metrics")[1]  # still served alongside
    finally:
        log = stop(proc)
    assert "store unavailable" in log, log


def _not_ready_for_the_store(port: int) -> bool:
    status, body = probe(port, "/readyz")
    return status == 503 and "store unavailable" in body


def test_a_sink_stuck_in_the_database_fails_its_liveness(kafka_bootstrap, postgres_dsn):
    import psycopg

    topics, port = FlowTopics(kafka_bootstrap), free_port()
    stream = random_stream(seed=8, docs=4, events=12)
    _stream_to_topic(topics, stream[:6])
    proc = start_sink(topics, postgres_dsn, port)
    lock = None
    try:
        assert wait_for(lambda: probe(port, "/readyz")[0] == 200, 90), probe(port, "/readyz")
        assert probe(port, "/healthz")[0] == 200
        # Idle, polling for more: alive and ready for longer than the stall interval.
        time.sleep(STALL_S + 1)
        assert probe(port, "/healthz")[0] == 200 and probe(port, "/readyz")[0] == 200
        # Another session holds the sink's table: the next write waits on it forever.
        lock = psycopg.connect(postgres_dsn)
        lock.execute("LOCK TABLE embedstream_documents IN ACCESS EXCLUSIVE MODE")
        _stream_to_topic(topics, stream[6:])
        assert wait_for(lambda: probe(port, "/healthz")[0] == 503, 60), probe(port, "/healthz")
        assert "no progress" in probe(port, "/healthz")[1]
        assert probe(port, "/readyz")[0] == 503
        lock.rollback()  # the write goes through: alive again
        assert wait_for(lambda: probe(port, "/healthz")[0] == 200, 60), probe(port, "/healthz")
        assert wait_for(lambda: probe(port, "/readyz")[0] == 200, 60), probe(port, "/readyz")
    finally:
        if lock is not None:
            lock.close()
        log = stop(proc)
    assert proc.returncode == 0, log


def test_the_endpoints_listen_on_the_metrics_host_only(kafka_bootstrap, postgres_dsn):
    """127.0.0.1 by default: nothing answers on the host's other addresses."""
    import socket

    other = _non_loopback_address()
    if other is None:
        pytest.skip("this host has no address besides the loopback")
    topics, port = FlowTopics(kafka_bootstrap), free_port()
    proc = start_sink(topics, postgres_dsn, port)
    try:
        assert wait_for(lambda: probe(port, "/healthz")[0] == 200, 90), probe(port, "/healthz")
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((other, port)) != 0, f"{other}:{port} answers"
    finally:
        stop(proc)


def _non_loopback_address():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing address
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_a_worker_loop_stuck_in_a_step_fails_liveness_until_it_moves_on():
    """A real Bytewax dataflow whose step blocks on one item: the watched source's loop
    is stalled while it blocks, alive again once it moves on (group mode's kind of
    source; the sink tests above cover the partitioned kind)."""
    import threading

    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.inputs import DynamicSource, StatelessSourcePartition
    from bytewax.testing import TestingSink, run_main

    from flows import health

    class Counting(StatelessSourcePartition):
        n = 0

        def next_batch(self) -> list[int]:
            self.n += 1
            if self.n > 5:
                raise StopIteration
            return [self.n]

    class Source(DynamicSource):
        def build(self, step_id, worker_index, worker_count):
            return Counting()

    release, out = threading.Event(), []

    def step(x: int) -> int:
        if x == 3:
            release.wait(60)
        return x

    flow = Dataflow("stuck")
    op.output("out", op.map("step", op.input("in", flow, health.watched(Source())), step), TestingSink(out))
    stall_s, health.LOOPS.stall_s = health.LOOPS.stall_s, 0.5
    runner = threading.Thread(target=run_main, args=(flow,))
    try:
        runner.start()
        assert wait_for(lambda: not health.LOOPS.liveness()[0], 30, every=0.1)
        assert "no progress" in health.LOOPS.liveness()[1]
        assert not health.LOOPS.readiness()[0]
        release.set()
        runner.join(30)
        assert out == [1, 2, 3, 4, 5]
        assert health.LOOPS.liveness() == (True, "alive")  # the ended loop is no longer watched
    finally:
        release.set()
        runner.join(30)
        health.LOOPS.stall_s = stall_s


def test_an_outage_wait_outside_a_watched_loop_leaves_no_loop_behind():
    """A wait on a thread that runs no watched source (the CLI's main thread, a start-up
    check) is no batch loop: it once left an entry that looked stalled ever after, and
    failed every liveness probe of the process."""
    import time

    from flows import health, outage

    calls = []

    def attempt() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise outage.Outage("down for a moment")
        return "back"

    assert outage.wait_out("test dependency", attempt, first_delay_s=0.01, keep_alive=lambda: None) == "back"
    stall_s, health.LOOPS.stall_s = health.LOOPS.stall_s, 0.05
    try:
        time.sleep(0.2)
        assert health.LOOPS.liveness() == (True, "alive")
    finally:
        health.LOOPS.stall_s = stall_s
