"""Failure paths on the real components: a write PostgreSQL rolls back."""

from __future__ import annotations

import pytest
from sink_helpers import DIM, MODEL, messages, record, version

from flows.sink import apply_ops, to_op
from flows.stores import StoreConfigError, StoreError, TableSpec, open_store

SPEC = TableSpec(MODEL["model_id"], MODEL["model_revision"], DIM, MODEL["dtype"], MODEL["prompt_name"])

# --- PostgreSQL: a rolled-back first write ------------------------------------------------------


def _ops(stream):
    return [to_op(m) for m in messages(stream)]


def test_postgres_a_refused_first_write_leaves_the_table_usable_on_the_same_connection(postgres_dsn):
    """The first write creates the table in its own transaction; when the server refuses
    the batch, the creation is rolled back too, and the store must not go on believing
    the table exists (every later batch would fail, and be dead-lettered, until a restart)."""
    store = open_store(postgres_dsn)
    try:
        bad = record("n", 0, 0, 1, "not a number")
        bad["embedding"][0] = float("nan")  # pgvector refuses NaN
        with pytest.raises(Exception) as e:
            apply_ops(store, _ops([("VectorRecord", bad)]))
        assert not isinstance(e.value, (StoreError, StoreConfigError))
        errors = []
        for i in range(3):
            try:
                apply_ops(store, _ops(version(f"good{i}", i + 1, [f"good {i}"])))
            except Exception as e:  # collected, so that the failure shows every batch
                errors.append(f"{type(e).__name__}: {e}")
        assert errors == []
        assert sorted(r["text"] for r in store.rows(SPEC)) == ["good 0", "good 1", "good 2"]
    finally:
        store.close()


def test_postgres_a_nul_in_text_or_metadata_is_dropped_and_nothing_after_it_fails(postgres_dsn):
    """PostgreSQL text and jsonb cannot hold U+0000. The PostgreSQL store writes such a
    chunk without its NULs (in text and in metadata strings, keys included); the
    batches after it, on the same connection, land as well."""
    store = open_store(postgres_dsn)
    try:
        errors = []
        batches = [
            version("nul", 0, ["a NUL \x00 inside", "clean"], metadata={"note": "a NUL \u0000 inside"})
        ]
        batches.append(version("key", 1, ["metadata key"], metadata={"k\x00ey": "v\x00"}))
        batches += [version(f"good{i}", 2 + i, [f"good {i}"]) for i in range(2)]
        for stream in batches:
            try:
                apply_ops(store, _ops(stream))
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
        assert errors == []
        got = {r["chunk_id"]: r for r in store.rows(SPEC)}
        assert sorted(got) == ["good0#0", "good1#0", "key#0", "nul#0", "nul#1"]
        assert got["nul#0"]["text"] == "a NUL  inside"
        assert got["nul#0"]["metadata"] == {"note": "a NUL  inside"}
        assert got["nul#1"]["text"] == "clean"
        assert got["key#0"]["metadata"] == {"key": "v"}
        # Found by a filter on the stored value, and by one on the value as it was sent.
        query = record("nul", 0, 0, 2, "a NUL \x00 inside")["embedding"]
        for note in ("a NUL  inside", "a NUL \x00 inside"):
            assert [
                h.chunk_index for h in store.search(SPEC, query, 1, {"note": note}) if h.doc_id == "nul"
            ] == [0]
    finally:
        store.close()
