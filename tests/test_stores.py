"""The stores of `embedstream sink`, on the real PostgreSQL with pgvector and the real
LanceDB: a vector stream, applied in batches of any size, leaves exactly the chunks of
each document's newest manifest."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sink_helpers import (
    DIM,
    MODEL,
    comparable,
    delete,
    expected_store,
    manifest,
    messages,
    random_stream,
    record,
    version,
)

from flows.sink import Rejected, apply_ops, to_op
from flows.stores import TableSpec, open_store

SPEC = TableSpec(MODEL["model_id"], MODEL["model_revision"], DIM, MODEL["dtype"], MODEL["prompt_name"])


def apply(url, stream, batch_size=None):
    store = open_store(url)
    try:
        ops = [to_op(m) for m in messages(stream)]
        size = batch_size or len(ops)
        for start in range(0, len(ops), size):
            apply_ops(store, ops[start : start + size])
    finally:
        store.close()


def rows(url, spec=SPEC):
    store = open_store(url)
    try:
        return comparable(store.rows(spec))
    finally:
        store.close()


def expected(stream):
    return comparable([{"chunk_id": c, **r} for c, r in expected_store(stream).items()])


def test_a_shrinking_document_keeps_no_stale_chunk(store_url):
    stream = version("a", 0, ["one", "two", "three"], metadata={"team": "x"})
    stream += version("a", 1, ["uno", "dos"], metadata={"team": "y"})
    apply(store_url, stream)
    got = rows(store_url)
    assert sorted(got) == ["a#0", "a#1"]
    assert [got[c]["text"] for c in ("a#0", "a#1")] == ["uno", "dos"]
    assert {r["doc_version"] for r in got.values()} == {1}
    assert {tuple(r["metadata"].items()) for r in got.values()} == {(("team", "y"),)}


def test_older_versions_are_ignored_also_after_a_delete(store_url):
    v2 = version("a", 2, ["new"])
    apply(store_url, v2)
    apply(store_url, version("a", 1, ["old", "older"]))  # late or replayed: older than what is applied
    assert [r["text"] for r in rows(store_url).values()] == ["new"]
    apply(store_url, [("DeleteMarker", delete("a", 3))])
    assert rows(store_url) == {}
    apply(store_url, v2)  # a replay of a version before the delete brings nothing back
    assert rows(store_url) == {}
    apply(store_url, version("a", 4, ["back"]))
    assert [r["text"] for r in rows(store_url).values()] == ["back"]


def test_records_whose_manifest_is_still_to_come_are_kept(store_url):
    stream = version("a", 0, ["one", "two", "three"])
    newer = version("a", 1, ["uno"])
    apply(store_url, stream + newer[:-1])  # the batch ends before version 1's manifest
    got = rows(store_url)
    assert got["a#0"]["text"] == "uno" and got["a#1"]["text"] == "two"
    apply(store_url, newer[-1:])
    assert [r["text"] for r in rows(store_url).values()] == ["uno"]


@pytest.mark.parametrize("seed", [1, 2])
def test_any_batching_and_any_replay_give_the_same_exact_store(store_url, seed, tmp_path):
    stream = random_stream(seed)
    want = expected(stream)
    assert want, "the stream must leave something"
    apply(store_url, stream, batch_size=7)
    assert rows(store_url) == want
    apply(store_url, stream[: len(stream) // 2], batch_size=5)  # a replay from an old offset
    apply(store_url, stream[len(stream) // 2 :], batch_size=3)
    assert rows(store_url) == want
    # One message at a time, and all at once, in fresh stores: the same rows.
    for size, name in ((1, "one"), (None, "all")):
        url = f"lancedb:{tmp_path / name}"
        apply(url, stream, batch_size=size)
        assert rows(url) == want


def test_a_table_per_model_with_its_lineage(store_url):
    other = {**MODEL, "model_id": "test/other", "model_revision": "r9"}
    apply(store_url, version("a", 0, ["x"]) + version("a", 1, ["y", "z"], model=other, dim=8))
    store = open_store(store_url)
    try:
        specs = {t.model_id: t for t in store.tables()}
        assert set(specs) == {"test/tiny-vectors", "test/other"}
        assert (specs["test/other"].model_revision, specs["test/other"].dimension) == ("r9", 8)
        assert specs["test/other"].name != specs["test/tiny-vectors"].name
    finally:
        store.close()
    assert [r["text"] for r in rows(store_url).values()] == ["x"]  # each table applies its own manifests
    apply(store_url, [("DeleteMarker", delete("a", 2))])  # a delete reaches every table
    assert rows(store_url) == {} and rows(store_url, specs["test/other"]) == {}


def test_search_ranks_by_cosine_and_filters_on_metadata(store_url):
    stream = []
    for i in range(20):
        stream += version(f"d{i}", i, [f"text {i}"], metadata={"team": "a" if i % 2 else "b", "n": str(i)})
    apply(store_url, stream)
    store = open_store(store_url)
    try:
        target = record("d7", 7, 0, 1, "text 7")["embedding"]
        hits = store.search(SPEC, target, 3, {})
        assert hits[0].doc_id == "d7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.rank for h in hits] == [1, 2, 3] and hits[0].score >= hits[1].score >= hits[2].score
        vectors = {f"d{i}": np.array(record(f"d{i}", i, 0, 1, f"text {i}")["embedding"]) for i in range(20)}
        best = sorted(vectors, key=lambda d: -float(vectors[d] @ np.array(target)))[:3]
        assert [h.doc_id for h in hits] == best
        filtered = store.search(SPEC, target, 20, {"team": "b"})
        assert filtered and all(h.metadata["team"] == "b" for h in filtered) and len(filtered) == 10
        assert store.search(SPEC, target, 5, {"team": "b", "n": "4"})[0].doc_id == "d4"
        assert store.search(SPEC, target, 5, {"team": "nobody"}) == []
    finally:
        store.close()


def test_vectors_are_stored_bit_exact(store_url):
    stream = version("a", 0, ["one", "two", "three"])
    apply(store_url, stream)
    store = open_store(store_url)
    try:
        stored = {r["chunk_id"]: np.float32(r["embedding"]) for r in store.rows(SPEC)}
    finally:
        store.close()
    sent = {r["chunk_id"]: np.float32(r["embedding"]) for kind, r in stream if kind == "VectorRecord"}
    assert stored.keys() == sent.keys()
    assert all(np.array_equal(stored[c], sent[c]) for c in sent)


def test_postgres_refuses_a_nan_vector_as_data_not_as_an_outage(postgres_dsn):
    """pgvector refuses NaN; the sink must see a refusal of the data (which it turns
    into a dead letter), not a StoreError (which it waits out forever)."""
    from flows.stores import StoreConfigError, StoreError

    bad = record("n", 0, 0, 1, "not a number")
    bad["embedding"][0] = float("nan")
    with pytest.raises(Exception) as e:
        apply(postgres_dsn, [("VectorRecord", bad)])
    assert not isinstance(e.value, (StoreError, StoreConfigError))
    assert "NaN" in str(e.value)
    apply(postgres_dsn, version("fine", 1, ["fine"]))  # the store goes on working
    assert [r["text"] for r in rows(postgres_dsn).values()] == ["fine"]


def test_undecodable_and_inconsistent_records_are_rejected_with_a_reason():
    [bad] = messages(version("a", 0, ["x"])[:1])
    with pytest.raises(Rejected) as e:
        to_op(dataclasses.replace(bad, value=b"\xc3\x01garbage!"))
    assert e.value.reason == "bad_payload"
    wrong = record("a", 0, 0, 1, "x")
    wrong["dimension"] = 7
    [msg] = messages([("VectorRecord", wrong)])
    with pytest.raises(Rejected) as e:
        to_op(msg)
    assert e.value.reason == "dimension_mismatch"


def test_postgres_over_pgvectors_index_limit_logs_and_searches_exactly(postgres_dsn, caplog):
    """Over 4,000 dimensions (halfvec's index limit; Qwen3-Embedding-8B's 4,096) the
    vectors are kept at full precision and scanned exactly."""
    big = {**MODEL, "model_id": "test/wide"}
    stream = []
    for i in range(5):
        stream += version(f"w{i}", i, [f"wide {i}"], model=big, dim=4096)
    with caplog.at_level("WARNING", logger="embedstream.sink"):
        apply(postgres_dsn, stream)
    assert any("over pgvector's index limit of 4000" in r.getMessage() for r in caplog.records)
    spec = TableSpec("test/wide", "r1", 4096)
    store = open_store(postgres_dsn)
    try:
        target = record("w3", 3, 0, 1, "wide 3", dim=4096)["embedding"]
        hits = store.search(spec, target, 2, {})
        assert hits[0].doc_id == "w3" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert rows(postgres_dsn, spec) == expected(stream)  # float32, bit for bit
    finally:
        store.close()


def test_lancedb_indexes_a_table_once_it_is_large_enough(tmp_path, monkeypatch):
    from flows.stores import lance

    monkeypatch.setattr(lance, "INDEX_MIN_ROWS", 400)
    url = f"lancedb:{tmp_path / 'lance'}"
    stream = []
    for i in range(300):
        stream += version(f"d{i}", i, [f"text {i} a", f"text {i} b"])
    apply(url, stream[:300])  # 100 documents: under the threshold, no index
    store = open_store(url)
    table = store.db.open_table(SPEC.name)
    # The full-text index is made with the table; the vector index waits for rows.
    assert [(i.index_type, i.columns) for i in table.list_indices()] == [("FTS", ["text"])]
    apply(url, stream[300:], batch_size=300)
    store = open_store(url)  # a fresh handle sees the latest version
    indices = [i for i in store.db.open_table(SPEC.name).list_indices() if i.index_type != "FTS"]
    assert [(i.name, i.columns) for i in indices] == [("embedding_idx", ["embedding"])]
    assert indices[0].index_details["metric_type"] == "COSINE"
    target = record("d42", 42, 1, 2, "text 42 b")["embedding"]
    # The index quantizes (SQ): among 4-dimensional vectors the exact match may trade
    # places with a near one, but it is never far down the list.
    assert "d42" in [h.doc_id for h in store.search(SPEC, target, 3, {})]
    assert rows(url) == expected(stream)


def test_search_returns_k_hits_past_the_indexes_default_candidate_list(store_url):
    stream = []
    for i in range(120):
        stream += version(f"d{i}", i, [f"text {i}"], metadata={"half": str(i % 2)})
    apply(store_url, stream)
    store = open_store(store_url)
    try:
        target = record("d5", 5, 0, 1, "text 5")["embedding"]
        assert len(store.search(SPEC, target, 100, {})) == 100  # pgvector's HNSW default gives 40
        assert len(store.search(SPEC, target, 50, {"half": "1"})) == 50
    finally:
        store.close()


def test_confluent_framed_records_become_the_same_operations(schema_registry):
    from flows.registry import SchemaRegistry

    registry = SchemaRegistry.from_url(schema_registry.url)
    stream = [*version("a", 0, ["one", "two"]), ("DeleteMarker", delete("b", 1))]
    framed = [
        dataclasses.replace(m, value=registry.encode(kind, r))
        for m, (kind, r) in zip(messages(stream), stream)
    ]
    assert all(m.value[:1] == b"\x00" for m in framed)
    assert [to_op(m, registry) for m in framed] == [to_op(m) for m in messages(stream)]


def test_audio_chunks_keep_their_times_and_search_returns_them(store_url):
    records = [record("call", 0, i, 2, f"spoken part {i}") for i in range(2)]
    for i, r in enumerate(records):
        r["time_start_ms"], r["time_end_ms"] = 1000 * i, 1000 * i + 900
    stream = [("VectorRecord", r) for r in records] + [("DocManifest", manifest(records))]
    apply(store_url, stream + version("text", 1, ["no times here"]))
    got = rows(store_url)
    assert got == expected(stream + version("text", 1, ["no times here"]))
    assert got["call#1"]["time_start_ms"] == 1000 and got["call#1"]["time_end_ms"] == 1900
    assert got["text#0"]["time_start_ms"] is None
    store = open_store(store_url)
    try:
        [hit] = store.search(SPEC, records[1]["embedding"], 1, {})
    finally:
        store.close()
    assert (hit.doc_id, hit.time_start_ms, hit.time_end_ms) == ("call", 1000, 1900)


def test_tables_from_before_the_time_columns_get_them(store_url):
    """A table written before schema v1.5 has no time columns: the sink adds them."""
    apply(store_url, version("old", 0, ["written before"]))
    if store_url.startswith("lancedb:"):
        import lancedb

        lancedb.connect(store_url[len("lancedb:") :]).open_table(SPEC.name).drop_columns(
            ["time_start_ms", "time_end_ms"]
        )
    else:
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute(f'ALTER TABLE "{SPEC.name}" DROP COLUMN time_start_ms, DROP COLUMN time_end_ms')
    r = record("new", 1, 0, 1, "written after")
    r["time_start_ms"], r["time_end_ms"] = 0, 500
    apply(store_url, [("VectorRecord", r), ("DocManifest", manifest([r]))])
    got = rows(store_url)
    assert got["new#0"]["time_end_ms"] == 500 and got["old#0"]["time_start_ms"] is None


# --- the local PostgreSQL and pgvector's versions ---------------------------------------------


def test_the_local_postgres_is_postgresql_18_with_pgvector_0_8(postgres_server):
    import os

    import psycopg

    if os.environ.get("EMBEDSTREAM_TEST_POSTGRES"):
        pytest.skip("$EMBEDSTREAM_TEST_POSTGRES points at another server")
    with psycopg.connect(postgres_server) as conn:
        server = conn.execute("SHOW server_version_num").fetchone()[0]
        [vector] = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    assert int(server) // 10000 == 18 and vector.startswith("0.8."), (server, vector)


def test_the_postgres_store_detects_and_records_the_pgvector_version(postgres_dsn):
    import psycopg

    from flows.stores.postgres import PostgresStore, pgvector_version

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        [text] = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    store = PostgresStore(postgres_dsn)
    try:
        assert store.tables() == []
        assert store.pgvector == pgvector_version(text) >= (0, 8, 0)
    finally:
        store.close()
    # The versions the sink supports, as pg_extension spells them.
    assert pgvector_version("0.6.2") == (0, 6, 2) and pgvector_version("0.7.4") == (0, 7, 4)
    assert pgvector_version("0.8.0") == (0, 8, 0) and pgvector_version("0.10.1") == (0, 10, 1)


def test_a_filtered_search_returns_k_hits_however_few_rows_match(postgres_dsn):
    """One row in a hundred matches: the HNSW candidate list alone (ef_search) finds
    about one of them; pgvector 0.8's iterative scan keeps going until k match. (The
    planner is told to take the index, as it does on a table of millions.)"""
    stream = []
    for i in range(2000):
        stream += version(f"d{i}", i, [f"text {i}"], metadata={"kind": "rare" if i % 100 == 7 else "common"})
    apply(postgres_dsn, stream)
    store = open_store(postgres_dsn + "&options=-c%20enable_seqscan%3Doff")
    try:
        target = record("d500", 500, 0, 1, "text 500")["embedding"]
        hits = store.search(SPEC, target, 20, {"kind": "rare"})
    finally:
        store.close()
    assert sorted(h.doc_id for h in hits) == sorted(f"d{i}" for i in range(7, 2000, 100))


def test_the_local_postgres_starts_and_stops_without_a_shell(tmp_path, monkeypatch):
    """Arguments go to the server as lists: a data directory whose name a shell would
    split or run ($(…)) is just a name."""
    import psycopg

    from flows.dev import postgres as local_postgres

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "my data $(touch pwned)"
    monkeypatch.setenv("EMBEDSTREAM_POSTGRES_DIR", str(data))
    dsn = local_postgres.start()
    try:
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert local_postgres.dsn() == dsn
    finally:
        stopped = local_postgres.stop()
    assert stopped and local_postgres.dsn() is None
    assert not (tmp_path / "pwned").exists() and not (data / "pwned").exists()
