"""A manifest whose chunks did not all reach the store is never applied silently: the
sink dead-letters it with the chunks it misses, the document keeps its previous version,
and a redrive of the sink's dead letters completes it. End to end in incremental mode,
where the worker never sends an unchanged chunk again, on the real broker, the real flow
and a real PostgreSQL that refuses one chunk until a fix; and on both stores directly."""

from __future__ import annotations

import subprocess
import sys

import psycopg
from kafka_helpers import FlowTopics
from sink_helpers import messages, version
from test_incremental import (
    MAX_TOKENS,
    assert_same_store,
    doc_text,
    full_reference,
    store_rows,
    upsert,
)
from test_sink import run_sink
from test_stores import SPEC, expected, rows

from flows.sink import apply_ops, to_op
from flows.stores import Incomplete, open_store

QUARANTINED = "This paragraph is quarantined by the database administrator until a review has ended."

REFUSE = """
CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.text LIKE '%quarantined%' THEN
        RAISE EXCEPTION 'quarantined text' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER {name} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {name}();
"""


def redrive(topics: FlowTopics) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "redrive",
            "--brokers",
            topics.bootstrap,
            "--dlq-topic",
            f"{topics.output}.sink-dlq",
            "--to",
            topics.output,
            "--stage",
            "sink",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def sink_letters(topics: FlowTopics, reason: str) -> list[str]:
    """The messages of the sink's dead letters of ``reason``."""
    letters = topics.read(f"{topics.output}.sink-dlq")
    return [r["message"] for kind, r, _ in letters if kind == "DeadLetter" and r["reason"] == reason]


def doc_state(url: str, doc_id: str):
    store = open_store(url)
    try:
        [spec] = store.tables()
        return store.states({(spec.name, doc_id)}).get((spec.name, doc_id))
    finally:
        store.close()


def test_a_chunk_the_store_never_got_is_named_and_a_redrive_heals_the_document(
    kafka_bootstrap, postgres_dsn, minilm, tmp_path
):
    topics = FlowTopics(kafka_bootstrap)
    group = f"{topics.prefix}.inc"
    args = ("--incremental", "--max-tokens", MAX_TOKENS, "--group-id", group)
    # A first document makes the table; then the database refuses one paragraph's chunk.
    topics.produce([upsert("warm", doc_text(1, 3))])
    topics.run(*args)
    run_sink(topics, postgres_dsn)
    store = open_store(postgres_dsn)
    [spec] = store.tables()
    store.close()
    trigger = f"refuse_{topics.prefix}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(REFUSE.format(name=trigger, table=f'"{spec.name}"'))

    v1 = doc_text(5, 6)
    v1.insert(3, QUARANTINED)
    topics.produce([upsert("doc", v1)])
    topics.run(*args)
    run_sink(topics, postgres_dsn)
    records = [r for kind, r, _ in topics.read(topics.output) if kind == "VectorRecord"]
    [quarantined] = [r["chunk_id"] for r in records if QUARANTINED in r["text"]]
    assert len(sink_letters(topics, "store_rejected")) == 1
    # Before: the manifest was applied without the chunk, silently.
    [letter] = sink_letters(topics, "missing_chunks")
    assert quarantined in letter and "'doc'" in letter, letter
    assert doc_state(postgres_dsn, "doc") is None  # the document keeps its previous version (none)
    assert quarantined not in store_rows(postgres_dsn)

    # The next version keeps that paragraph: incremental mode does not send its chunk
    # again, and the sink dead-letters this manifest too, naming the chunk again.
    v2 = list(v1)
    v2[0] = v2[0] + " An editor added this sentence."
    topics.produce([upsert("doc", v2)])
    second = topics.run(*args)
    assert " kept; " in second.stderr
    run_sink(topics, postgres_dsn)
    assert [quarantined in m for m in sink_letters(topics, "missing_chunks")] == [True, True]
    assert doc_state(postgres_dsn, "doc") is None

    # The fix, then a redrive of the sink's dead letters: the document is complete, as a
    # from-scratch full-mode run has it.
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP TRIGGER {trigger} ON "{spec.name}"')
    redrive(topics)
    run_sink(topics, postgres_dsn)
    assert_same_store(store_rows(postgres_dsn), full_reference(topics, tmp_path))
    assert len(sink_letters(topics, "missing_chunks")) == 2  # none more


def apply_each(url: str, stream) -> list[Incomplete]:
    """Each message as its own batch, as the sink writes them; the manifests left unapplied."""
    store = open_store(url)
    try:
        return [i for m in messages(stream) for i in apply_ops(store, [to_op(m)])]
    finally:
        store.close()


def test_a_manifest_missing_a_chunk_keeps_the_previous_version_until_a_redrive(store_url):
    v0 = version("doc", 0, ["zero", "one"])
    v1 = version("doc", 1, ["zero", "one", "two"])
    lost = v1[2]  # the record of "two", which never reached the store
    v2 = version("doc", 2, ["zero", "one", "two", "three"])
    # Incremental mode: version 2 sends only "three", and lists "two", which it believes sent.
    v2_sent = [v2[3], v2[4]]
    stream = [*v0, *(m for m in v1 if m is not lost), *v2_sent]
    incomplete = apply_each(store_url, stream)
    assert [(i.op.version.offset, i.missing) for i in incomplete] == [(1, ["doc#2"]), (2, ["doc#2"])]
    assert "doc#2" in incomplete[0].describe()
    store = open_store(store_url)
    try:
        state = store.states({(SPEC.name, "doc")})[(SPEC.name, "doc")]
    finally:
        store.close()
    assert state.version.offset == 0  # the document keeps its previous version
    assert {r["text"] for r in rows(store_url).values()} == {"zero", "one", "three"}

    # The redrive: the lost record, then both manifests, each in a batch of its own.
    # Version 1's manifest leaves version 2's record alone, and version 2's completes it.
    assert apply_each(store_url, [lost, v1[-1], v2_sent[-1]]) == []
    assert rows(store_url) == expected([*v0, *v1, *v2_sent])
    assert {r["text"] for r in rows(store_url).values()} == {"zero", "one", "two", "three"}
