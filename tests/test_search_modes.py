"""Search modes on the real stores (PostgreSQL 18 with pgvector 0.8, LanceDB): dense,
sparse, full-text and hybrid (reciprocal rank fusion), the sparse field of VectorRecord
v1.6 from codec to column, halfvec tables, and what a server with an older pgvector
cannot do, named."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sink_helpers import MODEL, manifest, messages, record, version

from flows import codecs
from flows.search import Query, SearchError, fuse, retrieve, signals
from flows.sink import Rejected, apply_ops, to_op
from flows.stores import Hit, SparseModel, TableSpec, open_store

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 30522
SPARSE = {"model_id": "test/tiny-sparse", "model_revision": "s1", "dtype": "f32", "dimension": VOCAB}
SPEC = TableSpec(MODEL["model_id"], MODEL["model_revision"], 4, "f32", None)
SPARSE_SPEC = TableSpec(MODEL["model_id"], MODEL["model_revision"], 4, "f32", None, SparseModel.of(SPARSE))

TEXTS = {
    "paths": "os.path.join joins one or more path components intelligently",
    "errors": "KeyError is raised when a mapping key is not found in the set of existing keys",
    "loops": "The for statement iterates over the items of any sequence in order",
    "classes": "Classes provide a means of bundling data and functionality together",
    "files": "open returns a file object; reading and writing files in text or binary mode",
}


def sparse_of(text: str) -> dict[str, list]:
    """A deterministic sparse vector for ``text``: a token id per distinct word, its
    weight growing with the word's length (long words are rarer)."""
    weights: dict[int, float] = {}
    for word in text.lower().replace(";", " ").split():
        token = int.from_bytes(word.encode()[:8].ljust(8, b"\0"), "big") % VOCAB
        weights[token] = max(weights.get(token, 0.0), len(word) / 10)
    indices = sorted(weights)
    return {"indices": indices, "values": [weights[i] for i in indices]}


def stream_of(texts: dict[str, str], *, sparse: bool, metadata=None) -> list:
    stream = []
    for offset, (doc_id, text) in enumerate(texts.items()):
        r = record(doc_id, offset, 0, 1, text, metadata=(metadata or {}).get(doc_id))
        if sparse:
            r["sparse"] = sparse_of(text)
            r["sparse_model"] = SPARSE
        m = manifest([r])
        if sparse:
            m["sparse_model"] = SPARSE
        stream += [("VectorRecord", r), ("DocManifest", m)]
    return stream


def write(url: str, stream: list) -> None:
    store = open_store(url)
    try:
        apply_ops(store, [to_op(m) for m in messages(stream)])
    finally:
        store.close()


@pytest.fixture
def opened(store_url):
    write(store_url, stream_of(TEXTS, sparse=True))
    store = open_store(store_url)
    yield store
    store.close()


def test_a_sparse_vector_travels_in_avro_and_old_records_read_as_none():
    r = record("d", 1, 0, 1, "KeyError raised")
    r["sparse"] = {"indices": [3, 17, 29999], "values": [0.5, 1.25, 2.0]}
    r["sparse_model"] = SPARSE
    name, back = codecs.decode_single_object(codecs.encode_single_object("VectorRecord", r))
    assert name == "VectorRecord" and back["sparse"] == r["sparse"] and back["sparse_model"] == SPARSE
    old = codecs.Schema(
        "VectorRecord", json.loads((codecs.SCHEMA_DIR / "history" / "VectorRecord-1.5.avsc").read_text())
    )
    plain = record("d", 1, 0, 1, "no sparse")
    data = codecs.SINGLE_OBJECT_MAGIC + old.fingerprint + old.write(plain)
    assert codecs.decode_single_object(data)[1]["sparse"] is None
    assert TableSpec.of(back) == SPARSE_SPEC and TableSpec.of(plain) == SPEC
    # Sparse vectors live in a table of their own: adding a sparse model changes the name.
    assert SPARSE_SPEC.name != SPEC.name


@pytest.mark.parametrize(
    "sparse, reason",
    [
        ({"indices": [5, 3], "values": [1.0, 1.0]}, "do not ascend"),
        ({"indices": [3, 3], "values": [1.0, 1.0]}, "do not ascend"),
        ({"indices": [1, VOCAB], "values": [1.0, 1.0]}, "outside 0..30521"),
        ({"indices": [1, 2], "values": [1.0]}, "2 indices and 1 values"),
        ({"indices": [1], "values": [float("nan")]}, "not a finite number"),
        (None, "no sparse vector"),
    ],
)
def test_a_malformed_sparse_vector_is_a_dead_letter_with_its_reason(sparse, reason):
    r = record("d", 1, 0, 1, "text")
    r["sparse"], r["sparse_model"] = sparse, SPARSE
    [message] = messages([("VectorRecord", r)])
    with pytest.raises(Rejected) as info:
        to_op(message)
    assert info.value.reason == "bad_sparse_vector" and reason in str(info.value)


def test_sparse_vectors_are_stored_and_read_back(opened):
    stored = {r["doc_id"]: r["sparse"] for r in opened.rows(SPARSE_SPEC)}
    for doc_id, text in TEXTS.items():
        expected = sparse_of(text)
        assert stored[doc_id]["indices"] == expected["indices"]
        np.testing.assert_array_equal(np.float32(stored[doc_id]["values"]), np.float32(expected["values"]))


def test_sparse_search_ranks_by_the_inner_product(opened):
    query = sparse_of("KeyError key not found mapping")
    hits = opened.search_sparse(SPARSE_SPEC, query["indices"], query["values"], 3, {})
    q = dict(zip(query["indices"], query["values"]))
    expected = sorted(
        (
            (sum(q.get(i, 0.0) * v for i, v in zip(s["indices"], s["values"])), d)
            for d, s in ((d, sparse_of(t)) for d, t in TEXTS.items())
        ),
        reverse=True,
    )
    expected = [(score, d) for score, d in expected if score > 0][:3]
    assert [h.doc_id for h in hits] == [d for _, d in expected]
    assert [h.score for h in hits] == pytest.approx([s for s, _ in expected], rel=1e-5)
    assert hits[0].doc_id == "errors" and hits[0].chunk_id == "errors#0"


def test_text_search_finds_exact_identifiers_and_stems(opened):
    hits = opened.search_text(SPARSE_SPEC, "KeyError", 3, {})
    assert [h.doc_id for h in hits] == ["errors"]
    # English stemming: "iterating" finds "iterates"; any of the terms is enough.
    hits = opened.search_text(SPARSE_SPEC, "iterating bundling", 5, {})
    assert sorted(h.doc_id for h in hits) == ["classes", "loops"]
    assert all(h.score > 0 for h in hits)
    assert opened.search_text(SPARSE_SPEC, "the of and", 5, {}) == []  # stop words only
    # Query syntax is text: quotes, operators and fields are words like any other.
    for query in ('"KeyError" raised', "KeyError AND (", "text:KeyError", "KeyError~ key*"):
        assert [h.doc_id for h in opened.search_text(SPARSE_SPEC, query, 5, {})][:1] == ["errors"], query


def test_text_search_weighs_rare_terms_over_frequent_ones(store_url):
    """As BM25 does (LanceDB's index; PostgreSQL's ranking here, with each term's inverse
    document frequency): a chunk with the query's rare term beats one that repeats its
    common term."""
    texts = {f"c{i}": f"the kafka broker number {i} stores events" for i in range(8)}
    texts["many"] = "kafka kafka kafka kafka kafka broker broker broker"
    texts["rare"] = "the zookeeper ensemble elected a leader"
    write(store_url, stream_of(texts, sparse=False))
    store = open_store(store_url)
    try:
        hits = store.search_text(SPEC, "kafka zookeeper", 10, {})
    finally:
        store.close()
    assert hits[0].doc_id == "rare" and hits[1].doc_id == "many"
    assert len(hits) == 10 and all(h.score > 0 for h in hits)
    if store_url.startswith("postgresql"):
        # The weights are BM25's IDF over the table's rows, before and after ANALYZE.
        import math

        import psycopg

        store = open_store(store_url)
        try:
            for analyzed in (False, True):
                if analyzed:
                    with psycopg.connect(store_url, autocommit=True) as conn:
                        conn.execute(f'ANALYZE "{SPEC.name}"')
                weights = store._run(
                    lambda c: dict(store._term_weights(c, SPEC, "english", "kafka zookeeper"))
                )
                n = len(texts)
                assert weights == pytest.approx(
                    {
                        "kafka": math.log(1 + (n - 9 + 0.5) / 9.5),
                        "zookeep": math.log(1 + (n - 1 + 0.5) / 1.5),
                    }
                ), analyzed
        finally:
            store.close()


#: Chunks of different lengths, without stop words (so that every word is a position
#: in both stores' indexes), repeating the query's terms a different number of times.
BM25_TEXTS = {
    "short": "kafka broker",
    "long": "kafka partitions replicate segments brokers producers append records consumers fetch "
    "batches kafka",
    "repeats": "kafka kafka kafka kafka logs",
    "rare": "zookeeper quorum elected leader",
    "both": "zookeeper kafka migration guide covers controller quorum configuration",
    "none": "postgres vacuum reclaims storage",
}


def okapi_bm25(texts: dict[str, str], query: list[str], k1: float = 1.2, b: float = 0.75) -> dict[str, float]:
    """BM25 of each text for the query's words, computed here from the words: each term's
    IDF ``ln(1 + (N - df + 0.5) / (df + 0.5))`` times its saturated, length-normalised
    frequency (texts of words that are their own stems, no stop words)."""
    words = {d: t.split() for d, t in texts.items()}
    avgdl = sum(len(w) for w in words.values()) / len(words)
    scores = {}
    for d, w in words.items():
        score = 0.0
        for term in query:
            df = sum(term in other for other in words.values())
            tf = w.count(term)
            if tf:
                idf = math.log(1 + (len(texts) - df + 0.5) / (df + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(w) / avgdl))
        if score:
            scores[d] = score
    return scores


def test_text_search_scores_are_okapi_bm25_on_both_stores(store_url):
    """PostgreSQL has no BM25 of its own (ts_rank has no document frequencies, and
    normalises length by a logarithm): the store computes it from the tsvector's
    positions, so its scores are LanceDB's (tantivy's BM25, k1 1.2, b 0.75)."""
    write(store_url, stream_of(BM25_TEXTS, sparse=False))
    store = open_store(store_url)
    try:
        hits = store.search_text(SPEC, "kafka zookeeper", 10, {})
    finally:
        store.close()
    expected = okapi_bm25(BM25_TEXTS, ["kafka", "zookeeper"])
    assert {h.doc_id: h.score for h in hits} == pytest.approx(expected, rel=1e-4)
    assert [h.doc_id for h in hits] == sorted(expected, key=lambda d: -expected[d])
    # Length matters linearly against the average: the two-word chunk beats the one that
    # says "kafka" twice in twelve words, and repeating a term saturates.
    assert expected["short"] > expected["long"] and expected["repeats"] < 2.2 * expected["short"]


def test_every_mode_filters_on_metadata(store_url):
    metadata = {d: {"team": "a" if d in ("errors", "loops") else "b"} for d in TEXTS}
    write(store_url, stream_of(TEXTS, sparse=True, metadata=metadata))
    store = open_store(store_url)
    try:
        query = sparse_of("KeyError for items in order")
        vector = record("errors", 1, 0, 1, TEXTS["errors"])["embedding"]
        for hits in (
            store.search_text(SPARSE_SPEC, "KeyError statement classes files", 5, {"team": "b"}),
            store.search_sparse(SPARSE_SPEC, query["indices"], query["values"], 5, {"team": "b"}),
            store.search(SPARSE_SPEC, vector, 5, {"team": "b"}),
        ):
            assert hits and {h.doc_id for h in hits} <= {"paths", "classes", "files"}
    finally:
        store.close()


def test_hybrid_is_the_default_where_a_second_signal_exists(opened, store_url):
    assert signals(opened, SPARSE_SPEC, None) == ("hybrid", ["dense", "sparse", "text"])
    plain = store_url + "-plain" if store_url.startswith("lancedb:") else store_url
    write(plain, stream_of(TEXTS, sparse=False))
    store = open_store(plain)
    try:
        assert signals(store, SPEC, None) == ("hybrid", ["dense", "text"])
        with pytest.raises(SearchError, match=r"--mode sparse is not available.*without --sparse-model"):
            signals(store, SPEC, "sparse")
    finally:
        store.close()
    with pytest.raises(SearchError, match="unknown search mode 'bm25'"):
        signals(opened, SPARSE_SPEC, "bm25")


def test_hybrid_fuses_the_lists_by_reciprocal_rank(opened):
    vector = record("files", 4, 0, 1, TEXTS["files"])["embedding"]  # dense: "files" first
    sparse = sparse_of("KeyError mapping key")
    # indices and values, as operators.SparseVector has them
    query = Query("KeyError mapping key", vector=vector, sparse=SimpleNamespace(**sparse))
    lists = {
        "dense": opened.search(SPARSE_SPEC, vector, 5, {}),
        "sparse": opened.search_sparse(SPARSE_SPEC, sparse["indices"], sparse["values"], 5, {}),
        "text": opened.search_text(SPARSE_SPEC, "KeyError mapping key", 5, {}),
    }
    hits = retrieve(opened, SPARSE_SPEC, query, 5, mode="hybrid", rrf_k=60, depth=5)
    expected: dict[str, float] = {}
    for found in lists.values():
        for rank, h in enumerate(found, 1):
            expected[h.doc_id] = expected.get(h.doc_id, 0.0) + 1 / (60 + rank)
    assert {h.doc_id: h.score for h in hits} == pytest.approx(expected)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Two lists agree on "errors": it beats the chunk that dense alone ranks first.
    assert hits[0].doc_id == "errors" and lists["dense"][0].doc_id == "files"
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))


def test_per_document_fusion_agrees_on_a_document_found_by_different_chunks(store_url):
    """Dense finds the guide by its second chunk, text by its first: chunk fusion ranks
    neither above the FAQ's one chunk that both lists hold second, document fusion ranks
    the guide first (first in both lists), shown by its best fused chunk."""
    guide = [
        "kafka consumer groups rebalance partitions between members",
        "offsets are committed after processing",
    ]
    others = {
        "faq": ["kafka questions answered"],
        "pets": ["cats sleep most of the day"],
        "tea": ["green tea is steeped briefly"],
    }
    stream = version("guide", 0, guide)
    for offset, (doc_id, texts) in enumerate(others.items(), 1):
        stream += version(doc_id, offset, texts)
    write(store_url, stream)
    dense_of = {doc_id: record(doc_id, 0, 0, 1, texts[0])["embedding"] for doc_id, texts in others.items()}
    second = np.asarray(record("guide", 0, 1, 2, guide[1])["embedding"])
    vector = second + 0.9 * np.asarray(dense_of["faq"])  # nearest: guide#1, then faq#0
    query = Query("kafka rebalance", vector=[float(x) for x in vector / np.linalg.norm(vector)])
    store = open_store(store_url)
    try:
        dense = store.search(SPEC, list(query.vector), 10, {})
        text = store.search_text(SPEC, query.text, 10, {})
        assert [h.chunk_id for h in dense[:2]] == ["guide#1", "faq#0"]
        assert [h.chunk_id for h in text] == ["guide#0", "faq#0"]
        # Each signal's best two chunks.
        fused = {"mode": "hybrid", "used": ["dense", "text"], "depth": 2}
        by_chunk = retrieve(store, SPEC, query, 2, **fused)
        by_doc = retrieve(store, SPEC, query, 2, **fused, per_document=True)
        relative_chunks = retrieve(store, SPEC, query, 2, **fused, fusion="relative")
        relative_docs = retrieve(store, SPEC, query, 2, **fused, fusion="relative", per_document=True)
        dense_docs = retrieve(store, SPEC, query, 10, mode="dense", per_document=True)
    finally:
        store.close()
    assert [h.chunk_id for h in by_chunk] == ["faq#0", "guide#1"]
    assert [h.score for h in by_chunk] == pytest.approx([2 / 62, 1 / 61])
    # Each document once, by its rank among the list's documents: the guide is first in
    # both (2/61), the FAQ second in both; the guide's chunks tie (1/61 each), and the
    # one from the earlier list, dense, shows it.
    assert [(h.doc_id, h.chunk_id) for h in by_doc] == [("guide", "guide#1"), ("faq", "faq#0")]
    assert [h.score for h in by_doc] == pytest.approx([2 / 61, 2 / 62])
    assert [h.rank for h in by_doc] == [1, 2]
    # Relative score fusion of two-hit lists: each list's best 1, its worst 0. By chunks,
    # the guide's two chunks (each best in one list) share the top, above the FAQ that
    # reciprocal rank put first (second in both lists: each list's worst, 0). By
    # documents, the guide is best in both (1.0), shown by its chunk from the earlier list.
    assert [(h.chunk_id, h.score) for h in relative_chunks] == [("guide#1", 0.5), ("guide#0", 0.5)]
    assert [(h.doc_id, h.chunk_id, h.score) for h in relative_docs] == [
        ("guide", "guide#1", 1.0),
        ("faq", "faq#0", 0.0),
    ]
    # A single signal collapses the same way: its documents, each by its best chunk.
    assert [h.doc_id for h in dense_docs] == list(dict.fromkeys(h.doc_id for h in dense))
    assert [h.chunk_id for h in dense_docs][:2] == ["guide#1", "faq#0"]


def unit(cosine: float) -> list[float]:
    """A 4-dimensional unit vector at ``cosine`` to the first axis (the queries' vector)."""
    return [cosine, math.sqrt(1.0 - cosine * cosine), 0.0, 0.0]


def relative_of(lists: list[list[Hit]], key=lambda h: h.doc_id) -> dict[str, float]:
    """Relative score fusion written out: each list min-max normalised over its own
    hits (all 1 where its scores are equal), a missing hit 0, the mean over the lists."""
    fused: dict[str, float] = {}
    for found in lists:
        low, high = min(h.score for h in found), max(h.score for h in found)
        for h in found:
            share = 1.0 if high == low else (h.score - low) / (high - low)
            fused[key(h)] = fused.get(key(h), 0.0) + share / len(lists)
    return fused


def test_relative_fusion_weighs_how_close_a_hit_comes_to_its_lists_best(store_url):
    """The consensus chunk is second in both lists: reciprocal rank fusion, which reads
    ranks only, puts it first. But it lies far behind each list's best (dense: cosine
    0.4 against alpha's 1.0; text: one query term against lexical's two, the list's
    lowest), so relative score fusion puts the lists' own best hits above it: lexical
    (text's best, and mid-way in dense), then alpha (dense's best, absent from text)."""
    cosines = {"alpha": 1.0, "consensus": 0.4, "cats": 0.35, "lexical": 0.3, "rivers": -0.2}
    texts = {
        "alpha": "green tea is steeped briefly",
        "consensus": "kafka consumer groups and their members",
        "cats": "cats sleep most of the day",
        "lexical": "kafka rebalance explained",
        "rivers": "rivers flow to the sea",
    }
    stream = []
    for offset, (doc_id, cosine) in enumerate(cosines.items()):
        r = record(doc_id, offset, 0, 1, texts[doc_id])
        r["embedding"] = unit(cosine)
        stream += [("VectorRecord", r), ("DocManifest", manifest([r]))]
    write(store_url, stream)
    query = Query("kafka rebalance", vector=unit(1.0))
    fused = {"mode": "hybrid", "used": ["dense", "text"], "depth": 5}
    store = open_store(store_url)
    try:
        dense = store.search(SPEC, unit(1.0), 5, {})
        text = store.search_text(SPEC, query.text, 5, {})
        by_rank = retrieve(store, SPEC, query, 5, **fused)
        by_score = retrieve(store, SPEC, query, 5, **fused, fusion="relative")
        by_score_docs = retrieve(store, SPEC, query, 5, **fused, fusion="relative", per_document=True)
    finally:
        store.close()
    # Both stores score higher-is-better: cosine similarity, BM25.
    assert [(h.doc_id, round(h.score, 5)) for h in dense] == [(d, c) for d, c in cosines.items()]
    assert [h.doc_id for h in text] == ["lexical", "consensus"] and text[0].score > text[1].score > 0
    assert [h.doc_id for h in by_rank][:3] == ["consensus", "lexical", "alpha"]
    assert by_rank[0].score == pytest.approx(2 / 62)
    assert [h.doc_id for h in by_score] == ["lexical", "alpha", "consensus", "cats", "rivers"]
    expected = relative_of([dense, text])
    assert {h.doc_id: h.score for h in by_score} == pytest.approx(expected, abs=1e-6)
    # lexical: 0.5 * 1 (text's best) + 0.5 * (0.3 + 0.2) / 1.2; alpha 0.5 * 1 + 0; rivers,
    # dense's worst and absent from text, 0.
    assert [h.score for h in by_score] == pytest.approx(
        [0.5 + 0.5 * 0.5 / 1.2, 0.5, 0.25, 0.5 * 0.55 / 1.2, 0.0], abs=1e-6
    )
    assert [h.rank for h in by_score] == [1, 2, 3, 4, 5]
    # One chunk per document: the same ranking by documents.
    assert [(h.doc_id, h.score) for h in by_score_docs] == [(h.doc_id, h.score) for h in by_score]


def test_relative_fusion_of_three_signals_and_a_single_hit_list(opened):
    """Dense, sparse and text fused on the real store, each list normalised over its own
    hits; text finds one chunk for "KeyError", which scores 1 there (its list's best
    and worst at once), not 0."""
    vector = record("files", 4, 0, 1, TEXTS["files"])["embedding"]
    sparse = sparse_of("KeyError mapping key")
    query = Query("KeyError", vector=vector, sparse=SimpleNamespace(**sparse))
    lists = [
        opened.search(SPARSE_SPEC, vector, 5, {}),
        opened.search_sparse(SPARSE_SPEC, sparse["indices"], sparse["values"], 5, {}),
        opened.search_text(SPARSE_SPEC, "KeyError", 5, {}),
    ]
    assert [h.doc_id for h in lists[2]] == ["errors"]
    hits = retrieve(opened, SPARSE_SPEC, query, 5, mode="hybrid", fusion="relative", depth=5)
    expected = relative_of(lists)
    assert {h.doc_id: h.score for h in hits} == pytest.approx(expected, abs=1e-6)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Text alone gives "errors" a full third.
    assert next(h for h in hits if h.doc_id == "errors").score >= 1 / 3 - 1e-6
    with pytest.raises(SearchError, match="unknown fusion 'borda': use one of rrf, relative"):
        retrieve(opened, SPARSE_SPEC, query, 5, mode="hybrid", fusion="borda")


def test_fusion_constant_and_ties():
    def hit(doc_id: str) -> Hit:
        return Hit(0, 0.0, doc_id, None, 0, doc_id, {}, chunk_id=doc_id)

    a, b, c = hit("a"), hit("b"), hit("c")
    fused = fuse([[a, b], [b, c]], rrf_k=0)
    assert [(h.doc_id, h.score) for h in fused] == [("b", 1.5), ("a", 1.0), ("c", 0.5)]
    # Equal scores: the better best rank, then the earlier list.
    assert [h.doc_id for h in fuse([[a, b], [c, a], [b, c]], rrf_k=60)] == ["a", "c", "b"]
    assert fuse([]) == []


def test_relative_fusion_ties_single_hits_and_missing_hits():
    def hit(doc_id: str, score: float) -> Hit:
        return Hit(0, score, doc_id, None, 0, doc_id, {}, chunk_id=doc_id)

    def relative(*lists: list[Hit]) -> list[tuple[str, float]]:
        return [(h.doc_id, round(h.score, 9)) for h in fuse(lists, fusion="relative")]

    # A list of one hit, or of equal scores, gives each hit 1: each is its list's best.
    # Equal fused scores go to the better best rank, then to the earlier list.
    assert relative([hit("a", 0.2)], [hit("b", 7.0), hit("c", 7.0)]) == [("a", 0.5), ("b", 0.5), ("c", 0.5)]
    # Min-max over the list: the worst hit gets 0 there, as a hit missing from it.
    assert relative([hit("a", 0.9), hit("b", 0.6), hit("c", 0.3)], [hit("c", 12.0), hit("b", 3.0)]) == [
        ("a", 0.5),
        ("c", 0.5),
        ("b", 0.25),
    ]
    # An empty list is a signal that found nothing: it still takes its share of the mean.
    fused = fuse([[hit("a", 1.0), hit("b", 0.0)], [], [hit("c", 5.0), hit("a", 1.0)]], fusion="relative")
    assert [h.doc_id for h in fused] == ["a", "c", "b"]
    assert [h.score for h in fused] == pytest.approx([1 / 3, 1 / 3, 0.0])
    assert relative([hit("a", 1.0)], [hit("c", 1.0)]) == [("a", 0.5), ("c", 0.5)]
    # Negative scores (cosine similarity below 0) normalise like any other.
    assert relative([hit("a", -0.1), hit("b", -0.5)]) == [("a", 1.0), ("b", 0.0)]
    assert fuse([], fusion="relative") == []
    with pytest.raises(SearchError, match="unknown fusion"):
        fuse([[hit("a", 1.0)]], fusion="RRF")


def test_a_sparse_vector_over_pgvectors_index_limit_keeps_its_largest_weights(postgres_dsn):
    r = record("big", 1, 0, 1, "many terms")
    rng = np.random.default_rng(7)
    indices = sorted(rng.choice(VOCAB, size=1500, replace=False).tolist())
    values = rng.uniform(0.01, 3.0, size=1500).astype(np.float32).tolist()
    r["sparse"], r["sparse_model"] = {"indices": indices, "values": values}, SPARSE
    m = manifest([r])
    m["sparse_model"] = SPARSE
    write(postgres_dsn, [("VectorRecord", r), ("DocManifest", m)])
    store = open_store(postgres_dsn)
    try:
        [row] = store.rows(SPARSE_SPEC)
    finally:
        store.close()
    kept = np.argsort(values)[-1000:]
    assert row["sparse"]["indices"] == sorted(indices[i] for i in kept)
    assert min(row["sparse"]["values"]) >= max(v for i, v in enumerate(values) if i not in set(kept))


def test_postgres_tables_have_the_text_and_sparse_columns_and_indexes(postgres_dsn):
    import psycopg

    write(postgres_dsn, stream_of(TEXTS, sparse=True))
    with psycopg.connect(postgres_dsn) as conn:
        columns = dict(
            conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0",
                (SPARSE_SPEC.name,),
            ).fetchall()
        )
        indexes = [
            r[0]
            for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (SPARSE_SPEC.name,))
        ]
        generated = conn.execute(
            "SELECT generation_expression FROM information_schema.columns "
            "WHERE table_name = %s AND column_name = 'text_tsv'",
            (SPARSE_SPEC.name,),
        ).fetchone()[0]
    assert columns["embedding"] == "vector(4)" and columns["sparse"] == f"sparsevec({VOCAB})"
    assert columns["text_tsv"] == "tsvector" and "'english'::regconfig" in generated
    assert any("USING gin (text_tsv)" in i for i in indexes)
    assert any("USING hnsw (sparse sparsevec_ip_ops)" in i for i in indexes)
    assert any("USING hnsw (embedding vector_cosine_ops)" in i for i in indexes)


def test_the_text_search_language_is_a_setting_fixed_per_table(postgres_dsn, tmp_path):
    stream = stream_of({"run": "running runners ran"}, sparse=False)
    store = open_store(postgres_dsn, text_language="simple")
    try:
        apply_ops(store, [to_op(m) for m in messages(stream)])
        # simple: no stemming, so only the word as written matches.
        assert [h.doc_id for h in store.search_text(SPEC, "running", 5, {})] == ["run"]
        assert store.search_text(SPEC, "run", 5, {}) == []
    finally:
        store.close()
    english = open_store(postgres_dsn)  # the table keeps its language
    try:
        assert english.search_text(SPEC, "run", 5, {}) == []
    finally:
        english.close()
    lance = open_store(f"lancedb:{tmp_path / 'l'}", text_language="simple")
    try:
        apply_ops(lance, [to_op(m) for m in messages(stream)])
        assert [h.doc_id for h in lance.search_text(SPEC, "running", 5, {})] == ["run"]
        assert lance.search_text(SPEC, "run", 5, {}) == []
    finally:
        lance.close()
    from flows.stores import StoreConfigError

    with pytest.raises(StoreConfigError, match="no text search configuration 'klingon'"):
        open_store(postgres_dsn, text_language="klingon").tables()
    with pytest.raises(StoreConfigError, match="no language 'klingon'"):
        open_store(f"lancedb:{tmp_path / 'k'}", text_language="klingon")


def test_qwen3_4b_sized_vectors_are_halfvec_with_an_hnsw_index(postgres_dsn, caplog):
    import psycopg

    wide = {**MODEL, "model_id": "test/qwen3-4b-sized"}
    stream = []
    for i in range(6):
        r = record(f"w{i}", i, 0, 1, f"wide {i}", dim=2560, model=wide)
        stream += [("VectorRecord", r), ("DocManifest", manifest([r]))]
    with caplog.at_level("WARNING", logger="embedstream.sink"):
        write(postgres_dsn, stream)
    assert not any("index limit" in r.getMessage() for r in caplog.records)
    spec = TableSpec("test/qwen3-4b-sized", "r1", 2560)
    with psycopg.connect(postgres_dsn) as conn:
        [kind] = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attname = 'embedding'",
            (spec.name,),
        ).fetchone()
        indexes = [
            r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (spec.name,))
        ]
    assert kind == "halfvec(2560)"
    assert any("USING hnsw (embedding halfvec_cosine_ops)" in i for i in indexes)
    store = open_store(postgres_dsn + "&options=-c%20enable_seqscan%3Doff")  # through the index
    try:
        target = record("w4", 4, 0, 1, "wide 4", dim=2560, model=wide)["embedding"]
        hits = store.search(spec, target, 3, {})
        assert hits[0].doc_id == "w4" and hits[0].score == pytest.approx(1.0, abs=1e-3)
        # 16-bit floats: each value within half a unit in the last place of a half.
        stored = {r["doc_id"]: r["embedding"] for r in store.rows(spec)}
        np.testing.assert_allclose(stored["w4"], target, rtol=1e-3, atol=1e-4)
    finally:
        store.close()


def test_an_older_pgvector_is_reported_by_feature_and_dense_and_text_keep_working(
    postgres_dsn, monkeypatch, caplog
):
    """A server whose pgvector is 0.6.2 (as pgserver bundles): no sparsevec, halfvec or
    iterative scans. The store reads the version from pg_extension; here it is told 0.6.2
    while the server runs 0.8, so every statement it sends must be one 0.6 knows."""
    from flows.stores import postgres

    monkeypatch.setattr(postgres, "pgvector_version", lambda text: (0, 6, 2))
    with caplog.at_level("INFO", logger="embedstream.sink"):
        write(postgres_dsn, stream_of(TEXTS, sparse=True))
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "pgvector 0.8" in said  # the version as the server spells it
    [line] = [r for r in caplog.records if "not available before a newer pgvector" in r.getMessage()]
    assert line.levelname == "WARNING"
    for feature in ("sparsevec", "halfvec", "hnsw.iterative_scan"):
        assert feature in said
    assert "sparse vectors of test/tiny-sparse are not stored" in said
    store = open_store(postgres_dsn)
    try:
        assert "sparse" not in store.rows(SPARSE_SPEC)[0]
        assert store.pgvector == (0, 6, 2)
        reasons = store.modes(SPARSE_SPEC)
        assert reasons["dense"] is None and reasons["text"] is None
        assert "no sparsevec (0.7 and later)" in reasons["sparse"]
        assert signals(store, SPARSE_SPEC, None) == ("hybrid", ["dense", "text"])
        vector = record("loops", 2, 0, 1, TEXTS["loops"])["embedding"]
        assert store.search(SPARSE_SPEC, vector, 1, {})[0].doc_id == "loops"
        assert [h.doc_id for h in store.search_text(SPARSE_SPEC, "KeyError", 5, {})] == ["errors"]
    finally:
        store.close()


def test_embedstream_search_modes_on_the_command_line(opened, store_url, tmp_path):
    """The real CLI: text mode needs no model; an unavailable mode is an error that says why."""

    def search(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "flows.cli", "search", *args, "--store", store_url],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )

    done = search("KeyError", "--mode", "text", "--k", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split()[2] == "errors"
    done = search("KeyError", "--mode", "text", "--per-document")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split()[2] == "errors"
    done = search("anything", "--mode", "sparse", "--sparse-model", str(tmp_path / "missing"))
    assert done.returncode == 2 and "pass its directory with --sparse-model" in done.stderr
    done = search("x", "--mode", "bm25")
    assert done.returncode == 2 and "invalid choice: 'bm25'" in done.stderr
    done = search("x", "--mode", "hybrid", "--rrf-k", "-1")
    assert done.returncode == 2 and "--rrf-k" in done.stderr
    done = search("x", "--fusion", "borda")
    assert done.returncode == 2 and "invalid choice: 'borda'" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "search", "x", "--store", store_url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "EMBEDSTREAM_FUSION": "borda"},
    )
    assert done.returncode == 2 and "fusion must be rrf or relative, not 'borda'" in done.stderr


# --- embedstream serve: /search's modes and TEI's /rerank ------------------------------------------


@pytest.fixture(scope="module")
def served_store(tmp_path_factory):
    """A LanceDB store of the tiny prompted model's vectors, and `embedstream serve` on it."""
    from test_serve import PROMPTED, Server

    from operators import Embedder

    embedder = Embedder.load(PROMPTED)
    url = f"lancedb:{tmp_path_factory.mktemp('served') / 'lance'}"
    lineage = {"model_id": embedder.model_id, "model_revision": embedder.model_revision, "dtype": "f32"}
    stream = []
    vectors = embedder.embed(list(TEXTS.values()), prompt_name="document")
    for offset, ((doc_id, text), vector) in enumerate(zip(TEXTS.items(), vectors)):
        r = record(doc_id, offset, 0, 1, text, model={**lineage, "prompt_name": "document"}, dim=embedder.dim)
        r["embedding"] = [float(x) for x in vector]
        stream += [("VectorRecord", r), ("DocManifest", manifest([r]))]
    write(url, stream)
    server = Server("--store", url, "--model", str(PROMPTED))
    yield url, server
    assert server.stop() == 0


def test_serve_searches_in_every_mode_as_the_library_does(served_store):
    from test_serve import PROMPTED, error_of, request

    from flows.search import search as library_search

    url, server = served_store
    for mode in ("dense", "text", "hybrid", None):
        body = {"query": "KeyError mapping", "k": 5, **({"mode": mode} if mode else {})}
        status, _, raw = request(server.url + "/search", body)
        assert status == 200, raw
        answer = json.loads(raw)
        assert answer["mode"] == (mode or "hybrid")
        library = library_search("KeyError mapping", k=5, store=url, model=str(PROMPTED), mode=mode)
        assert [(h["doc_id"], h["rank"]) for h in answer["data"]] == [(h.doc_id, h.rank) for h in library]
        assert [h["score"] for h in answer["data"]] == pytest.approx([h.score for h in library], abs=1e-6)
    status, _, raw = request(server.url + "/search", {"query": "KeyError", "mode": "text", "k": 5})
    assert [h["doc_id"] for h in json.loads(raw)["data"]] == ["errors"]
    status, _, raw = request(server.url + "/search", {"query": "x", "mode": "bm25"})
    assert status == 400 and error_of(raw)["param"] == "mode"
    for per_document in (False, True):
        body = {"query": "KeyError mapping", "k": 5, "fusion": "relative", "per_document": per_document}
        status, _, raw = request(server.url + "/search", body)
        assert status == 200, raw
        answer = json.loads(raw)
        assert answer["mode"] == "hybrid" and answer["fusion"] == "relative"
        library = library_search(
            "KeyError mapping",
            k=5,
            store=url,
            model=str(PROMPTED),
            fusion="relative",
            per_document=per_document,
        )
        assert [(h["doc_id"], h["chunk_index"]) for h in answer["data"]] == [
            (h.doc_id, h.chunk_index) for h in library
        ]
        assert [h["score"] for h in answer["data"]] == pytest.approx([h.score for h in library], abs=1e-6)
        # Relative scores are means of [0, 1] shares: the best hit of both lists would be 1.
        assert all(0.0 <= h["score"] <= 1.0 for h in answer["data"])
    status, _, raw = request(server.url + "/search", {"query": "KeyError mapping", "k": 5})
    assert json.loads(raw)["fusion"] == "rrf"
    for bad in ("borda", 1, ["rrf"]):
        status, _, raw = request(server.url + "/search", {"query": "x", "fusion": bad})
        assert status == 400 and error_of(raw)["param"] == "fusion", raw
        assert "fusion must be one of rrf, relative" in error_of(raw)["message"]
    status, _, raw = request(server.url + "/search", {"query": "x", "mode": "sparse"})
    assert status == 400 and error_of(raw)["code"] == "mode_unavailable"
    assert "without --sparse-model" in error_of(raw)["message"]


def test_serve_without_a_reranker_says_how_to_get_one(served_store):
    from test_serve import error_of, request

    _, server = served_store
    status, _, raw = request(server.url + "/rerank", {"query": "q", "texts": ["a"]})
    assert status == 404 and error_of(raw)["code"] == "no_reranker" and "--rerank" in error_of(raw)["message"]
    status, _, raw = request(server.url + "/search", {"query": "q", "rerank": True})
    assert status == 400 and error_of(raw)["code"] == "no_reranker"


def test_serve_reranks_as_the_reranker_does(served_store):
    from conftest import DATA
    from test_serve import PROMPTED, Server, error_of, request

    from operators import Reranker

    url, _ = served_store
    reranker = Reranker.load(DATA / "tiny-reranker-bert")
    server = Server("--store", url, "--model", str(PROMPTED), "--rerank", str(DATA / "tiny-reranker-bert"))
    try:
        texts = list(TEXTS.values())
        status, _, raw = request(server.url + "/rerank", {"query": "missing key", "texts": texts})
        assert status == 200, raw
        answer = json.loads(raw)
        scores = reranker.score("missing key", texts)
        assert sorted(a["index"] for a in answer) == list(range(len(texts)))
        assert [a["score"] for a in answer] == pytest.approx(sorted(scores, reverse=True), abs=1e-6)
        assert {a["index"]: a["score"] for a in answer} == pytest.approx(dict(enumerate(scores)), abs=1e-6)
        status, _, raw = request(server.url + "/rerank", {"query": "q", "texts": ["a"], "return_text": True})
        [one] = json.loads(raw)
        assert one["index"] == 0 and one["text"] == "a"
        assert one["score"] == pytest.approx(reranker.score("q", ["a"])[0], abs=1e-6)
        for bad in (
            {"query": "q"},
            {"query": "q", "texts": []},
            {"query": "q", "texts": [1]},
            {"texts": ["a"]},
        ):
            status, _, raw = request(server.url + "/rerank", bad)
            assert status == 400, bad
            error_of(raw)
        # /search with rerank: the hits come ordered by the reranker's scores of their texts.
        status, _, raw = request(server.url + "/search", {"query": "missing key", "k": 5, "rerank": True})
        hits = json.loads(raw)["data"]
        assert [h["score"] for h in hits] == pytest.approx(
            sorted(reranker.score("missing key", [h["text"] for h in hits]), reverse=True), abs=1e-6
        )
    finally:
        assert server.stop() == 0


# --- the flow with a sparse model: records, chunk ids, store, search ------------------------------


def test_the_flow_adds_each_chunks_sparse_vector_and_search_finds_it(tiny_bert, tmp_path):
    """The flow's steps with the tiny SPLADE fixture beside the dense model: every record
    carries the sparse vector SparseEmbedder gives its text and the model's lineage, which
    changes the chunk ids; the sink stores them and sparse search ranks by them."""
    from conftest import DATA

    from flows.embed_steps import Pipeline
    from flows.kafka.io import InputMessage
    from flows.settings import Settings
    from operators import ExtractorPool, SparseEmbedder

    sparse = SparseEmbedder.load(DATA / "tiny-splade")
    docs = {"errors.txt": " ".join(TEXTS.values()), "loops.txt": " ".join(reversed(list(TEXTS.values())))}
    messages_in = [
        InputMessage("documents", 0, i, k.encode(), codecs.encode_json({"doc_id": k, "content": v}), 1)
        for i, (k, v) in enumerate(docs.items())
    ]
    with ExtractorPool(1) as pool:
        with_sparse = Pipeline(Settings(max_tokens=32), tiny_bert, pool=pool, sparse_embedder=sparse)
        plain = Pipeline(Settings(max_tokens=32), tiny_bert, pool=pool)
        out = [codecs.decode_output(m.value, m.headers) for m in with_sparse.process(messages_in)]
        ids_plain = {
            r["chunk_id"]
            for kind, r in (codecs.decode_output(m.value, m.headers) for m in plain.process(messages_in))
            if kind == "VectorRecord"
        }
    vector_records = [r for kind, r in out if kind == "VectorRecord"]
    assert len(vector_records) > 2
    lineage = {
        "model_id": sparse.model_id,
        "model_revision": sparse.model_revision,
        "dtype": "f32",
        "dimension": sparse.dim,
    }
    expected = sparse.embed([r["text"] for r in vector_records])
    for r, want in zip(vector_records, expected):
        assert r["sparse_model"] == lineage
        assert r["sparse"]["indices"] == want.indices
        assert r["sparse"]["values"] == pytest.approx(want.values, rel=1e-6)
    assert all(r["sparse_model"] == lineage for kind, r in out if kind == "DocManifest")
    # The sparse model is part of the lineage: every chunk id differs from the plain run's.
    assert ids_plain and not ids_plain & {r["chunk_id"] for r in vector_records}

    url = f"lancedb:{tmp_path / 'lance'}"
    store = open_store(url)
    try:
        apply_ops(store, [to_op(m) for m in with_sparse_messages(out)])
        [spec] = store.tables()
        assert spec.sparse == SparseModel.of(lineage)
        query = sparse.embed_query(["KeyError missing key"])[0]
        hits = store.search_sparse(spec, query.indices, query.values, 3, {})
    finally:
        store.close()
    scores = {r["chunk_id"]: query.dot(e) for r, e in zip(vector_records, expected)}
    assert [h.chunk_id for h in hits] == sorted(scores, key=lambda c: -scores[c])[: len(hits)]
    assert [h.score for h in hits] == pytest.approx(
        sorted(scores.values(), reverse=True)[: len(hits)], rel=1e-5
    )
    # embedstream search's function: the query through the table's sparse model, alone
    # and fused with the dense and text signals.
    from flows.search import search

    models = {"model": str(DATA / "tiny-bert-cls"), "sparse_model": str(DATA / "tiny-splade")}
    found = search("KeyError missing key", k=3, store=url, mode="sparse", **models)
    assert [(h.chunk_id, h.score) for h in found] == [(h.chunk_id, h.score) for h in hits]
    fused = search("KeyError missing key", k=3, store=url, **models)
    assert len(fused) == 3 and 0 < fused[0].score <= 3 / 61


def with_sparse_messages(out: list) -> list:
    return messages([(kind, r) for kind, r in out])


def test_embedstream_run_with_a_sparse_model_on_kafka(kafka_bootstrap, tmp_path):
    """The real command on the real broker: `embedstream run --sparse-model` (the setting
    the workers load the model from), then the sink's operations into a store and a
    sparse search through embedstream search's function."""
    from conftest import DATA
    from kafka_helpers import FlowTopics

    from flows.kafka.io import InputMessage
    from flows.search import search
    from operators import SparseEmbedder

    topics = FlowTopics(kafka_bootstrap)
    topics.produce(
        [(d.encode(), codecs.encode_json({"doc_id": d, "content": text})) for d, text in TEXTS.items()]
    )
    done = topics.run("--model", str(DATA / "tiny-bert-cls"), "--sparse-model", str(DATA / "tiny-splade"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = topics.read(topics.output)
    sparse = SparseEmbedder.load(DATA / "tiny-splade")
    vector_records = [r for kind, r, _ in out if kind == "VectorRecord"]
    assert {r["doc_id"] for r in vector_records} == set(TEXTS)
    for r, want in zip(vector_records, sparse.embed([r["text"] for r in vector_records])):
        assert r["sparse"]["indices"] == want.indices and r["sparse_model"]["model_id"] == sparse.model_id
    url = f"lancedb:{tmp_path / 'lance'}"
    store = open_store(url)
    try:
        read = [
            InputMessage(
                m.topic(), m.partition(), m.offset(), m.key(), m.value(), 0, tuple(m.headers() or ())
            )
            for _, _, m in out
        ]
        apply_ops(store, [to_op(m) for m in read])
    finally:
        store.close()
    models = {"model": str(DATA / "tiny-bert-cls"), "sparse_model": str(DATA / "tiny-splade")}
    hits = search("KeyError missing key", k=5, store=url, mode="sparse", **models)
    assert hits and all(h.score > 0 for h in hits)


def test_serve_searches_a_sparse_table_with_its_sparse_model(tiny_bert, tmp_path):
    """/search over a table of the tiny SPLADE's vectors: `serve --sparse-model` encodes
    queries as the library does, in sparse mode and in hybrid over three signals."""
    from conftest import DATA
    from test_serve import Server, request

    from flows.embed_steps import Pipeline
    from flows.kafka.io import InputMessage
    from flows.search import search as library_search
    from flows.settings import Settings
    from operators import ExtractorPool, SparseEmbedder

    sparse = SparseEmbedder.load(DATA / "tiny-splade")
    events = [
        InputMessage("documents", 0, i, d.encode(), codecs.encode_json({"doc_id": d, "content": t}), 1)
        for i, (d, t) in enumerate(TEXTS.items())
    ]
    with ExtractorPool(1) as pool:
        out = Pipeline(Settings(), tiny_bert, pool=pool, sparse_embedder=sparse).process(events)
    url = f"lancedb:{tmp_path / 'lance'}"
    store = open_store(url)
    try:
        apply_ops(
            store, [to_op(m) for m in messages([codecs.decode_output(m.value, m.headers) for m in out])]
        )
    finally:
        store.close()
    models = {"model": str(DATA / "tiny-bert-cls"), "sparse_model": str(DATA / "tiny-splade")}
    server = Server("--store", url, "--model", models["model"], "--sparse-model", models["sparse_model"])
    try:
        for mode in ("sparse", None):
            body = {"query": "KeyError missing key", "k": 5, **({"mode": mode} if mode else {})}
            status, _, raw = request(server.url + "/search", body)
            assert status == 200, raw
            answer = json.loads(raw)
            assert answer["mode"] == (mode or "hybrid")
            library = library_search("KeyError missing key", k=5, store=url, mode=mode, **models)
            assert [h["doc_id"] for h in answer["data"]] == [h.doc_id for h in library]
            assert [h["score"] for h in answer["data"]] == pytest.approx([h.score for h in library], abs=1e-6)
    finally:
        assert server.stop() == 0
