"""The sink's stores: records/s into PostgreSQL (pgvector) and LanceDB through
embedstream's batched, exact path, against the plain way (psycopg, one upsert per
message with autocommit; LanceDB ``add`` per message), and search latency over a
table of 100k vectors. Same machine, same run.

The written records are real: distinct paragraphs of Python's documentation and
docstrings, embedded with the default model (all-MiniLM-L6-v2, 384 dimensions) in
this run. That embedding, records/s of the embed step alone, is the yardstick: the
whole flow is slower than it, and the sink must stay 5x above it. (HNSW inserts cost
more or less depending on the vectors: random normal ones cost about twice as much
as real embeddings, so real ones are used.) The search half fills 100k synthetic rows.

    python bench/sink.py [--records 12000] [--search-rows 100000] [--batch 2000]

Needs the local-postgres extra (pgserver) and the default model. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus
import machine
from sink_helpers import manifest, messages

import operators
from flows.sink import apply_ops, to_op
from flows.stores import TableSpec, open_store, postgres

DIM = 384
#: The plain way and the bulk load get the same index as the sink's tables.
HNSW_WITH = f"WITH (m = {postgres.HNSW_M}, ef_construction = {postgres.HNSW_EF_CONSTRUCTION})"
MODEL = {"model_id": "bench/vectors", "model_revision": "r1", "dtype": "f32", "prompt_name": None}


def synthetic(records: int, seed: int) -> tuple[list[str], np.ndarray]:
    vectors = np.random.default_rng(seed).normal(size=(records, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [f"some words of text {i} " * 40 for i in range(records)], vectors


def stream(texts: list[str], vectors: np.ndarray, chunks_per_doc: int = 10) -> list[tuple[str, dict]]:
    """Documents of ``chunks_per_doc`` records, each followed by its manifest."""
    out = []
    for d in range(len(texts) // chunks_per_doc):
        doc = []
        for i in range(chunks_per_doc):
            at = d * chunks_per_doc + i
            doc.append(
                {
                    "chunk_id": f"doc-{d}#{i}",
                    "doc_id": f"doc-{d}",
                    "doc_version": {"topic": "in", "partition": 0, "offset": d},
                    "chunk_index": i,
                    "chunk_count": chunks_per_doc,
                    "text": texts[at],
                    "char_start": i * 800,
                    "char_end": i * 800 + 800,
                    "page": None,
                    "embedding": vectors[at].tolist(),
                    **MODEL,
                    "chunker": {"max_tokens": 256, "overlap_tokens": 0},
                    "metadata": {"team": f"t{d % 7}", "source": f"/docs/{d}.md"},
                    "event_time": 1_700_000_000_000,
                    "embedded_at": 1_700_000_000_000,
                    "modality": "text",
                    "dimension": DIM,
                }
            )
        out += [("VectorRecord", r) for r in doc] + [("DocManifest", manifest(doc))]
    return out


def postgres_dsn() -> str:
    import psycopg

    from flows.dev import postgres as local_postgres

    server = local_postgres.start()
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.replace("/postgres?", f"/{name}?", 1)


def ours(url: str, msgs, batch: int) -> float:
    """Decode, plan and write, batch by batch, as the sink does."""
    store = open_store(url)
    start = time.perf_counter()
    for at in range(0, len(msgs), batch):
        apply_ops(store, [to_op(m) for m in msgs[at : at + batch]])
    seconds = time.perf_counter() - start
    store.close()
    return seconds


def plain_postgres(dsn: str, records: list[dict]) -> float:
    import psycopg

    from flows.codecs import decode_output

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(
            f"""CREATE TABLE plain (chunk_id text PRIMARY KEY, doc_id text, doc_version bigint,
                chunk_index int, page int, char_start int, char_end int, text text, metadata jsonb,
                embedded_at timestamptz, embedding vector({DIM}))"""
        )
        conn.execute(f"CREATE INDEX ON plain USING hnsw (embedding vector_cosine_ops) {HNSW_WITH}")
        start = time.perf_counter()
        with conn.cursor() as cur:
            for m in records:
                _, r = decode_output(m.value, m.headers)
                if "embedding" not in r:
                    continue  # the plain way knows no manifests
                cur.execute(
                    """INSERT INTO plain VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb,
                       to_timestamp(%s / 1000.0), %s::vector)
                       ON CONFLICT (chunk_id)
                       DO UPDATE SET embedding = EXCLUDED.embedding, text = EXCLUDED.text""",
                    (
                        r["chunk_id"],
                        r["doc_id"],
                        r["doc_version"]["offset"],
                        r["chunk_index"],
                        r["page"],
                        r["char_start"],
                        r["char_end"],
                        r["text"],
                        json.dumps(r["metadata"]),
                        r["embedded_at"],
                        "[" + ",".join(map(str, r["embedding"])) + "]",
                    ),
                )
        return time.perf_counter() - start


def plain_lance(path: str, records: list) -> float:
    import lancedb

    from flows.codecs import decode_output
    from flows.stores.lance import chunk_schema

    db = lancedb.connect(path)
    table = db.create_table("plain", schema=chunk_schema(DIM))
    start = time.perf_counter()
    for m in records:
        _, r = decode_output(m.value, m.headers)
        if "embedding" not in r:
            continue
        table.add(
            [
                {
                    "chunk_id": r["chunk_id"],
                    "doc_id": r["doc_id"],
                    "doc_version": r["doc_version"]["offset"],
                    "chunk_index": r["chunk_index"],
                    "page": r["page"],
                    "char_start": r["char_start"],
                    "char_end": r["char_end"],
                    "text": r["text"],
                    "metadata": json.dumps(r["metadata"]),
                    "embedded_at": r["embedded_at"],
                    "embedding": r["embedding"],
                }
            ]
        )
    return time.perf_counter() - start


def bulk_fill_postgres(dsn: str, spec: TableSpec, first, msgs, batch: int) -> float:
    """Creates the table through the store (one document), drops its HNSW index,
    writes every row, and builds the index again; returns the build's seconds."""
    import psycopg

    ours(dsn, first, batch)
    index = f"{spec.name}_hnsw"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP INDEX "{index}"')
    store = open_store(dsn)
    store._ensure = lambda conn, spec: None  # the table exists: keep the store from indexing it again
    for at in range(0, len(msgs), batch):
        apply_ops(store, [to_op(m) for m in msgs[at : at + batch]])
    store.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '2GB'")
        conn.execute("SET max_parallel_maintenance_workers = 2")
        start = time.perf_counter()
        conn.execute(
            f'CREATE INDEX "{index}" ON "{spec.name}" USING hnsw (embedding vector_cosine_ops) {HNSW_WITH}'
        )
        return round(time.perf_counter() - start, 1)


def search_latency(url: str, spec: TableSpec, queries: np.ndarray, k: int = 10) -> dict[str, float]:
    store = open_store(url)
    times = []
    for i, q in enumerate(queries):
        start = time.perf_counter()
        hits = store.search(spec, q.tolist(), k, {"team": "t3"} if i % 2 else {})
        times.append(time.perf_counter() - start)
        assert hits
    store.close()
    times.sort()
    return {
        "p50_ms": round(1000 * statistics.median(times), 2),
        "p99_ms": round(1000 * times[int(0.99 * (len(times) - 1))], 2),
        "queries": len(times),
    }


def writes(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    texts = corpus.texts(args.records)
    embedder = operators.Embedder.load()
    embedder.embed(texts[:64])  # warm-up
    start = time.perf_counter()
    vectors = embedder.embed(texts)
    embed_rate = len(texts) / (time.perf_counter() - start)
    print(json.dumps({"embed_records_per_s": round(embed_rate, 1)}), file=sys.stderr, flush=True)
    msgs = messages(stream(texts, vectors))
    plain = messages(stream(texts[: args.plain_records], vectors[: args.plain_records]))
    n_records = sum(1 for m in msgs if dict(m.headers)["embedstream.type"] == b"VectorRecord")
    n_plain = sum(1 for m in plain if dict(m.headers)["embedstream.type"] == b"VectorRecord")
    result: dict[str, object] = {
        "records": n_records,
        "yardstick": {
            "what": "the flow's embed step alone: f32, default model, the same texts, this run",
            "records_per_s": round(embed_rate, 1),
        },
    }
    stores = {"lancedb": f"lancedb:{tmp / 'lance'}", "postgres": postgres_dsn()}
    for name, url in stores.items():
        seconds = ours(url, msgs, args.batch)
        plain_seconds = (
            plain_postgres(postgres_dsn(), plain)
            if name == "postgres"
            else plain_lance(str(tmp / "plain"), plain)
        )
        ours_rate, plain_rate = n_records / seconds, n_plain / plain_seconds
        result[name] = {
            "embedstream_records_per_s": round(ours_rate, 1),
            "plain_records_per_s": round(plain_rate, 1),
            "plain_way": "one upsert per message, autocommit"
            if name == "postgres"
            else "table.add per message",
            "ratio_vs_plain": round(ours_rate / plain_rate, 2),
            "ratio_vs_flow": round(ours_rate / embed_rate, 2),
        }
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=12_000, help="at most about 13,900 (real texts)")
    parser.add_argument("--plain-records", type=int, default=3_000, help="the plain ways are slow")
    parser.add_argument("--search-rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--only", choices=["writes", "search"], help="one half of the benchmark")
    args = parser.parse_args()

    # The tables (about 1 GB of LanceDB at the defaults) go when the run ends.
    with tempfile.TemporaryDirectory(prefix="embedstream-bench-sink-") as scratch:
        print(json.dumps(measure(args, Path(scratch)), indent=2))


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    spec = TableSpec(MODEL["model_id"], MODEL["model_revision"], DIM)
    result: dict[str, object] = {
        "benchmark": "sink",
        "machine": machine.describe(),
        "dimension": DIM,
        "batch": args.batch,
    }
    if args.only != "search":
        result.update(writes(args, tmp))
    # Search over a large table. LanceDB is filled through the sink's own path (it
    # builds its vector index on the way); PostgreSQL as a bulk load is (rows first,
    # then the HNSW index), since row-by-row HNSW inserts would take most of an hour.
    if args.only == "writes":
        return result
    result.setdefault("lancedb", {})
    result.setdefault("postgres", {})
    big = messages(stream(*synthetic(args.search_rows, seed=2)))
    queries = np.random.default_rng(3).normal(size=(200, DIM)).astype(np.float32)
    lance = f"lancedb:{tmp / 'big'}"
    seconds = ours(lance, big, args.batch)
    result["lancedb"]["fill_records_per_s"] = round(args.search_rows / seconds, 1)
    pg = postgres_dsn()
    result["postgres"]["index_build_s"] = bulk_fill_postgres(pg, spec, big[:11], big, args.batch)
    for name, url in (("lancedb", lance), ("postgres", pg)):
        result[name]["search_over"] = args.search_rows
        result[name]["search"] = search_latency(url, spec, queries)
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    main()
