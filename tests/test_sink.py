"""`embedstream sink` and `embedstream search` end to end: the real flow on the real
broker writes the vector topic, the sink keeps each real store exactly in step with it
(also across updates, deletes, bad records and `kill -9`), and search finds the
documents by meaning."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka_helpers import FlowTopics, avro_event
from sink_helpers import comparable, expected_store, random_stream, record
from test_stores import apply, rows

from flows.settings import Settings
from flows.stores import TableSpec, open_store

SAMPLES = Path(__file__).resolve().parent.parent / "flows" / "samples"
TEXT_SAMPLES = ["faq.html", "guide.md", "notes.txt", "onboarding.docx", "report.pdf"]


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    return result


def run_sink(topics: FlowTopics, store: str, *args: str) -> subprocess.CompletedProcess:
    result = cli(
        "sink",
        "--until-end",
        "--brokers",
        topics.bootstrap,
        "--output-topic",
        topics.output,
        "--store",
        store,
        "--group-id",
        f"{topics.prefix}-sink",
        "--metrics-port",
        "0",
        *args,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def topic_stream(topics: FlowTopics) -> list[tuple[str, dict]]:
    return [(kind, r) for kind, r, _ in topics.read(topics.output) if kind != "DeadLetter"]


def store_rows(url: str) -> dict[str, dict]:
    store = open_store(url)
    try:
        [spec] = store.tables()
        return comparable(store.rows(spec))
    finally:
        store.close()


def expected(topics: FlowTopics) -> dict[str, dict]:
    return comparable([{"chunk_id": c, **r} for c, r in expected_store(topic_stream(topics)).items()])


def test_the_sink_keeps_the_store_exact_through_updates_and_deletes(kafka_bootstrap, store_url, minilm):
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    topics.produce(
        [
            (
                name.encode(),
                avro_event(
                    name,
                    content=(SAMPLES / name).read_bytes(),
                    filename=name,
                    metadata={"team": "docs" if i % 2 else "ops"},
                ),
            )
            for i, name in enumerate(TEXT_SAMPLES)
        ]
    )
    topics.run("--max-tokens", "48")
    run_sink(topics, store_url, "--from", "beginning")
    first = store_rows(store_url)
    assert {r["doc_id"] for r in first.values()} == set(TEXT_SAMPLES)
    assert first == expected(topics)

    # The table records its model: search embeds the query with it.
    hits = cli("search", "onboarding checklist for a new team member", "--store", store_url, "--k", "3")
    assert hits.returncode == 0, hits.stderr
    assert hits.stdout.splitlines()[0].split()[2] == "onboarding.docx", hits.stdout
    only_ops = cli("search", "quarterly report", "--store", store_url, "--k", "10", "--filter", "team=ops")
    docs = {line.split()[2] for line in only_ops.stdout.splitlines()}
    assert docs and docs <= {n for i, n in enumerate(TEXT_SAMPLES) if i % 2 == 0}, only_ops.stdout

    # The same search from Python.
    from flows.search import search

    [hit] = search("onboarding checklist for a new team member", k=1, store=store_url)
    assert (hit.rank, hit.doc_id, hit.metadata["team"]) == (1, "onboarding.docx", "docs")
    assert 0 < hit.score <= 1 and "Onboarding" in hit.text

    # guide.md shrinks to one chunk, notes.txt is deleted; the sink resumes where it stopped.
    topics.produce(
        [
            (b"guide.md", avro_event("guide.md", content=b"Just one short line now.", filename="guide.md")),
            (b"notes.txt", avro_event("notes.txt", op="DELETE")),
        ]
    )
    topics.run("--max-tokens", "48")
    run_sink(topics, store_url)
    second = store_rows(store_url)
    assert second == expected(topics)
    assert {r["doc_id"] for r in second.values()} == set(TEXT_SAMPLES) - {"notes.txt"}
    assert [r["text"] for r in second.values() if r["doc_id"] == "guide.md"] == ["Just one short line now."]
    # A replay of the whole topic changes nothing.
    run_sink(topics, store_url, "--from", "beginning", "--group-id", f"{topics.prefix}-replay")
    assert store_rows(store_url) == second


def test_records_the_sink_cannot_write_become_sink_dead_letters(kafka_bootstrap, tmp_path):
    from confluent_kafka import Producer
    from sink_helpers import record, version

    from flows import codecs

    topics = FlowTopics(kafka_bootstrap)
    wrong = record("b", 1, 0, 1, "x")
    wrong["dimension"] = 9
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for kind, r in version("a", 0, ["fine"]):
        producer.produce(
            topics.output,
            codecs.encode_single_object(kind, r),
            b"a",
            headers=[(codecs.TYPE_HEADER, kind.encode())],
        )
    producer.produce(topics.output, b"\xc3\x01not avro at all", b"junk")
    producer.produce(
        topics.output,
        codecs.encode_single_object("VectorRecord", wrong),
        b"b",
        headers=[(codecs.TYPE_HEADER, b"VectorRecord")],
    )
    assert producer.flush(30) == 0
    store = f"lancedb:{tmp_path / 'lance'}"
    done = run_sink(topics, store, "--from", "beginning")
    assert "sink worker done: 1 records, 1 manifests, 0 deletes, 2 dead letters" in done.stderr, done.stderr[
        -2000:
    ]
    letters = [r for kind, r, _ in topics.read(f"{topics.output}.sink-dlq") if kind == "DeadLetter"]
    assert sorted((r["stage"], r["reason"], r["offset"]) for r in letters) == [
        ("sink", "bad_payload", 2),
        ("sink", "dimension_mismatch", 3),
    ]
    assert all(r["topic"] == topics.output and r["payload"] for r in letters)
    assert [r["text"] for r in store_rows(store).values()] == ["fine"]  # the rest was written


def _stream_to_topic(topics: FlowTopics, stream) -> None:
    from confluent_kafka import Producer

    from flows import codecs

    producer = Producer({"bootstrap.servers": topics.bootstrap, "linger.ms": "20"})
    for kind, r in stream:
        producer.produce(
            topics.output,
            codecs.encode_single_object(kind, r),
            r["doc_id"].encode(),
            headers=[(codecs.TYPE_HEADER, kind.encode())],
        )
    assert producer.flush(60) == 0


def _rows_so_far(url: str) -> dict[str, dict]:
    """The store's rows; none before the sink has made its table."""
    store = open_store(url)
    try:
        made = bool(store.tables())
    finally:
        store.close()
    return rows(url) if made else {}


def test_kill_9_at_any_moment_leaves_the_store_of_an_uninterrupted_run(kafka_bootstrap, store_url, tmp_path):
    topics = FlowTopics(kafka_bootstrap, partitions=3)
    stream = random_stream(seed=9, docs=60, events=2500)
    _stream_to_topic(topics, stream)
    reference = f"lancedb:{tmp_path / 'reference'}"
    apply(reference, stream)  # no Kafka, no interruption: the store as it must end
    want = rows(reference)
    assert want == comparable([{"chunk_id": c, **r} for c, r in expected_store(stream).items()])

    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "sink",
        "--until-end",
        "--brokers",
        kafka_bootstrap,
        "--output-topic",
        topics.output,
        "--store",
        store_url,
        "--group-id",
        f"{topics.prefix}-sink",
        "--metrics-port",
        "0",
    ]
    env = {**os.environ, "EMBEDSTREAM_SINK_BATCH_SIZE": "50"}  # many small commits to land in
    # Each run dies at a moment set by its progress, not by the clock (a faster sink
    # once finished the stream between two fixed delays): once its first writes show
    # in the store, after a random pause of up to 0.3 s.
    pauses = random.Random(9)
    kills = 0
    for _ in range(4):
        before = _rows_so_far(store_url)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _rows_so_far(store_url) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(pauses.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(30)
    assert kills >= 2, "the sink finished before the kills: use a longer stream"
    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert rows(store_url) == want


def test_search_needs_a_table_choice_when_there_are_several_and_names_them(tmp_path, minilm):
    from sink_helpers import MODEL, version

    store = f"lancedb:{tmp_path / 'lance'}"
    other = {**MODEL, "model_id": "test/other"}
    apply(store, version("a", 0, ["x"]) + version("b", 1, ["y"], model=other))
    found = cli("search", "anything", "--store", store)
    assert found.returncode == 2
    assert "--table" in found.stderr and "test/other" in found.stderr and "test/tiny-vectors" in found.stderr
    name = TableSpec(other["model_id"], "r1", 4).name
    missing = cli("search", "anything", "--store", store, "--table", name)
    assert missing.returncode == 2 and "test/other" in missing.stderr and "--model" in missing.stderr
    empty = cli("search", "anything", "--store", f"lancedb:{tmp_path / 'nothing'}")
    assert empty.returncode == 2 and "no tables" in empty.stderr


def test_publish_gives_unique_path_ids_and_sends_deletes(kafka_bootstrap, tmp_path):
    (tmp_path / "docs" / "a").mkdir(parents=True)
    (tmp_path / "docs" / "b").mkdir()
    for sub in ("a", "b"):
        (tmp_path / "docs" / sub / "README.md").write_text(f"# {sub}\n\nreadme of {sub}")
    topics = FlowTopics(kafka_bootstrap)
    common = ["--brokers", kafka_bootstrap, "--topic", topics.input, "--quiet"]
    sent = cli("publish", str(tmp_path / "docs"), "--doc-id-prefix", "wiki/", *common)
    assert sent.returncode == 0, sent.stderr
    gone = cli(
        "publish",
        "--delete",
        "--root",
        str(tmp_path / "docs"),
        "--doc-id-prefix",
        "wiki/",
        str(tmp_path / "docs" / "a" / "README.md"),
        *common,
    )
    assert gone.returncode == 0, gone.stderr
    from flows.kafka.topics import read_all

    events = [(r["doc_id"], r["op"]) for _, r, _ in read_all(Settings(brokers=kafka_bootstrap), topics.input)]
    assert events == [
        ("wiki/a/README.md", "UPSERT"),
        ("wiki/b/README.md", "UPSERT"),
        ("wiki/a/README.md", "DELETE"),
    ]


def test_search_says_which_model_is_missing(tmp_path):
    from sink_helpers import version

    store = f"lancedb:{tmp_path / 'lance'}"
    apply(store, version("a", 0, ["x"]))
    found = cli("search", "anything", "--store", store)
    assert found.returncode == 2
    assert "test/tiny-vectors" in found.stderr and "r1" in found.stderr and "--model" in found.stderr


def test_the_sink_reads_json_output_too(kafka_bootstrap, tmp_path, minilm):
    topics = FlowTopics(kafka_bootstrap)
    topics.produce(
        [
            (b"a", avro_event("a", content=b"First document. " * 40, filename="a.txt")),
            (b"b", avro_event("b", content=b"Second one.", filename="b.txt")),
            (b"a", avro_event("a", content=b"First, shorter.", filename="a.txt")),
        ]
    )
    topics.run("--format", "json", "--max-tokens", "32")
    assert all(msg.value()[:1] == b"{" for _, _, msg in topics.read(topics.output))
    store = f"lancedb:{tmp_path / 'lance'}"
    run_sink(topics, store, "--from", "beginning")
    got = store_rows(store)
    assert got == expected(topics)
    assert sorted(r["text"] for r in got.values()) == ["First, shorter.", "Second one."]


def test_the_sink_waits_out_a_database_restart(kafka_bootstrap, postgres_dsn):
    from flows.dev import postgres as local_postgres

    if os.environ.get("EMBEDSTREAM_TEST_POSTGRES"):
        pytest.skip("restarts the local server; $EMBEDSTREAM_TEST_POSTGRES points elsewhere")
    topics = FlowTopics(kafka_bootstrap)
    stream = random_stream(seed=4, docs=10, events=80)
    _stream_to_topic(topics, stream)
    local_postgres.stop()
    try:
        args = [
            sys.executable, "-m", "flows.cli", "sink", "--until-end", "--brokers", kafka_bootstrap,
            "--output-topic", topics.output, "--store", postgres_dsn, "--group-id", f"{topics.prefix}-sink",
            "--metrics-port", "0",
        ]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(8)
        assert proc.poll() is None, "the sink must wait for the database, not exit"
    finally:
        local_postgres.start()
    _, log = proc.communicate(timeout=180)
    assert proc.returncode == 0, log[-3000:]
    assert "store unavailable" in log
    assert rows(postgres_dsn) == comparable([{"chunk_id": c, **r} for c, r in expected_store(stream).items()])


def test_search_embeds_the_query_with_the_tables_model_and_its_query_prompt(tmp_path):
    import numpy as np
    from conftest import DATA
    from sink_helpers import manifest

    from flows.search import search
    from operators import Embedder

    model_dir = DATA / "tiny-prompted"  # prompts: document "passage: ", query "query: "
    embedder = Embedder.load(model_dir)
    texts = [
        "Kafka topics hold events.",
        "Vectors live in a store.",
        "Chunks are small.",
        "Tokens cost time.",
    ]
    vectors = embedder.embed(texts)  # the model's default prompt: "document"
    lineage = {"model_id": embedder.model_id, "model_revision": embedder.model_revision, "dtype": "f32"}
    stream = []
    for i, (text, vector) in enumerate(zip(texts, vectors)):
        r = record(f"d{i}", i, 0, 1, text, model={**lineage, "prompt_name": "document"}, dim=embedder.dim)
        r["embedding"] = [float(x) for x in vector]
        stream += [("VectorRecord", r), ("DocManifest", manifest([r]))]
    store = f"lancedb:{tmp_path / 'lance'}"
    apply(store, stream)

    query = "where do vectors go?"
    hits = search(query, k=4, store=store, model=str(model_dir), mode="dense")  # cosine scores
    q = embedder.embed([query], prompt_name="query")[0]
    want = sorted(
        ((float(q @ v / np.linalg.norm(v) / np.linalg.norm(q)), f"d{i}") for i, v in enumerate(vectors))
    )[::-1]
    assert [h.doc_id for h in hits] == [d for _, d in want]
    assert [h.score for h in hits] == pytest.approx([s for s, _ in want], abs=1e-5)
    plain = embedder.embed([query], prompt="")[0]
    assert not np.allclose(q, plain, atol=1e-3)  # the prompt made a difference that search kept

    # Without --model the table's model, "tiny-prompted" by its id, is not found here: the error says so.
    missing = cli("search", query, "--store", store)
    assert missing.returncode == 2
    assert "tiny-prompted" in missing.stderr and embedder.model_revision in missing.stderr
    assert "--model" in missing.stderr
