"""Search a store the sink keeps, in one of four modes (docs/search-modes.md):

- ``dense``: the query embedded with the table's own model (from the lineage the table
  records), chunks by cosine similarity;
- ``sparse``: the query's sparse vector (the table's sparse model), chunks by the inner
  product of the sparse vectors;
- ``text``: the store's full-text index on the chunk text;
- ``hybrid``: the result lists of every signal the table has, fused by one of two
  functions (``fusion``):

  - ``rrf`` (the default), reciprocal rank fusion: a chunk scores the sum of
    ``1 / (rrf_k + rank)`` over the lists it is in (``rrf_k`` = 60 by default, as in
    Cormack et al., 2009); it reads ranks only;
  - ``relative``, relative score fusion (Weaviate's ``relativeScoreFusion``; Bruch, Gai
    and Ingber, 2023, "convex combination" of min-max normalised scores): each list's
    scores are scaled to [0, 1] over that list's own hits, a chunk missing from a list
    gets 0 there, and a chunk scores the mean over the lists (equal weights). It keeps
    how far ahead a list's best hits are, which ranks discard.

With ``per_document`` (``--per-document``) a search returns one hit per document:
each signal's list is collapsed to its documents (a document ranks where its best chunk
does), hybrid fuses documents instead of chunks, and each document is shown by its best
chunk.

Any mode can be followed by a cross-encoder (``--rerank``) that reads the query with
each of the ``rerank_k`` best chunks and orders them by its score. ``embedstream
search`` and ``embedstream serve``'s ``/search`` both come through :func:`retrieve`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from flows.stores import Hit, Store, StoreConfigError, TableSpec, open_store
from operators import Embedder, EmbedstreamError, models

log = logging.getLogger("embedstream.search")

#: Prompt names models give their query side (sentence-transformers' conventions).
QUERY_PROMPTS = ("query", "search_query", "retrieval.query")
#: The signals a table may offer, in the order hybrid fuses them.
SIGNALS = ("dense", "sparse", "text")
MODES = (*SIGNALS, "hybrid")
#: Reciprocal rank fusion's constant: larger flattens the difference between ranks.
RRF_K = 60
#: Hybrid's fusion functions: reciprocal rank (the default) and relative score.
FUSIONS = ("rrf", "relative")
#: Candidates per signal for fusion, and the chunks a reranker scores.
RERANK_K = 50


class SearchError(RuntimeError):
    """A search that cannot run as asked: no table, an ambiguous table, a missing model."""


def choose_table(store: Store, table: Optional[str] = None) -> TableSpec:
    tables = store.tables()
    if not tables:
        raise SearchError(f"{store.url} has no tables yet: run `embedstream sink` first")
    if table is None:
        if len(tables) > 1:
            listed = ", ".join(f"{t.name} ({t.model_id}, dim {t.dimension})" for t in tables)
            raise SearchError(f"{store.url} has {len(tables)} tables; choose one with --table: {listed}")
        return tables[0]
    for t in tables:
        if t.name == table:
            return t
    raise SearchError(f"no table {table!r} in {store.url}; tables: {', '.join(t.name for t in tables)}")


def query_embedder(
    spec: TableSpec, model: Optional[str] = None, *, device: str = "cpu", dtype: str = "f32"
) -> Embedder:
    """The table's model: ``model`` if given, else the default model or the model id
    found in the local Hugging Face cache; on ``device`` in ``dtype``."""
    truncate = spec.dimension
    source = model or ("default" if spec.model_id == models.DEFAULT_MODEL_ID else spec.model_id)
    try:
        embedder = Embedder.load(source, device=device, dtype=dtype)
    except EmbedstreamError as e:
        raise SearchError(
            f"the model of table {spec.name}, {spec.model_id} (revision {spec.model_revision}), is not "
            f"available here ({e}); pass its directory with --model"
        ) from None
    if embedder.model_revision != spec.model_revision:
        message = (
            f"{source} has revision {embedder.model_revision}, but table {spec.name} was embedded "
            f"with {spec.model_revision}"
        )
        if model is None:
            raise SearchError(message + "; pass the right model with --model")
        log.warning("%s: the scores may not mean much", message)
    if truncate < embedder.dim:
        embedder = Embedder.load(source, device=device, dtype=dtype, truncate_dim=truncate)
    elif truncate > embedder.dim:
        raise SearchError(
            f"table {spec.name} holds {truncate}-dimensional vectors; {source} makes {embedder.dim}"
        )
    return embedder


def query_sparse_encoder(
    spec: TableSpec, model: Optional[str] = None, *, device: str = "cpu", dtype: Optional[str] = None
) -> Any:
    """The table's sparse model (``operators.SparseEmbedder``): ``model`` if given, else
    the model id of its lineage, found in the local Hugging Face cache."""
    from operators import SparseEmbedder

    if spec.sparse is None:
        raise SearchError(f"table {spec.name} has no sparse vectors: its flow ran without --sparse-model")
    source = model or spec.sparse.model_id
    try:
        encoder = SparseEmbedder.load(source, device=device, dtype=dtype or spec.sparse.dtype)
    except EmbedstreamError as e:
        raise SearchError(
            f"the sparse model of table {spec.name}, {spec.sparse.model_id} (revision "
            f"{spec.sparse.model_revision}), is not available here ({e}); pass its directory with "
            "--sparse-model, or search with --mode dense or text"
        ) from None
    if encoder.model_revision != spec.sparse.model_revision:
        message = (
            f"{source} has revision {encoder.model_revision}, but the sparse vectors of table "
            f"{spec.name} were made with {spec.sparse.model_revision}"
        )
        if model is None:
            raise SearchError(message + "; pass the right model with --sparse-model")
        log.warning("%s: the sparse scores may not mean much", message)
    return encoder


@dataclass
class Query:
    """A query as each signal needs it: its text, and its dense and sparse vectors
    where the mode uses them."""

    text: str
    vector: Optional[Sequence[float]] = None
    sparse: Optional[Any] = None


@dataclass
class Timings:
    """Seconds spent per step of one search (encoding, each signal, fusion, reranking)."""

    steps: dict[str, float] = field(default_factory=dict)

    def add(self, step: str, started: float) -> None:
        self.steps[step] = self.steps.get(step, 0.0) + time.perf_counter() - started


def signals(opened: Store, spec: TableSpec, mode: Optional[str]) -> tuple[str, list[str]]:
    """The mode a search runs in (``mode``, or hybrid where the table has a second
    signal, else dense) and the signals it asks. Raises :class:`SearchError` for a mode
    the table cannot serve, saying why."""
    available = opened.modes(spec)
    usable = [s for s in SIGNALS if available.get(s) is None]
    if mode is None:
        mode = "hybrid" if len(usable) > 1 else "dense"
    if mode not in MODES:
        raise SearchError(f"unknown search mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "hybrid":
        if len(usable) < 2:
            reasons = "; ".join(f"{s}: {available[s]}" for s in SIGNALS if available.get(s))
            raise SearchError(
                f"hybrid search needs two signals, table {spec.name} has only dense ({reasons})"
            )
        return mode, usable
    if available.get(mode) is not None:
        raise SearchError(f"--mode {mode} is not available on table {spec.name}: {available[mode]}")
    return mode, [mode]


def retrieve(
    opened: Store,
    spec: TableSpec,
    query: Query,
    k: int,
    filters: Optional[dict[str, str]] = None,
    *,
    mode: str = "dense",
    used: Optional[list[str]] = None,
    rrf_k: int = RRF_K,
    fusion: str = "rrf",
    depth: int = RERANK_K,
    reranker: Any = None,
    rerank_k: int = RERANK_K,
    timings: Optional[Timings] = None,
    per_document: bool = False,
) -> list[Hit]:
    """The ``k`` best chunks for ``query`` in ``mode``, best first: hybrid fuses the
    top ``max(k, depth)`` of each signal in ``used`` (default: each the table has); a
    ``reranker`` then scores the best ``rerank_k`` again and orders them by its score.
    ``per_document``: the best chunk of each of the ``k`` best documents found among
    each signal's top ``max(k, depth)`` chunks (see :func:`fuse`). ``fusion``: ``rrf``
    or ``relative`` (hybrid only)."""
    if fusion not in FUSIONS:
        raise SearchError(f"unknown fusion {fusion!r}: use one of {', '.join(FUSIONS)}")
    filters = dict(filters or {})
    timings = timings if timings is not None else Timings()
    used = used or ([mode] if mode != "hybrid" else signals(opened, spec, "hybrid")[1])
    wanted = max(k, rerank_k) if reranker is not None else k
    # A document's chunks take several places in a list: collapsing needs the depth.
    per_signal = max(wanted, depth) if mode == "hybrid" or per_document else wanted
    lists = []
    for signal in used:
        started = time.perf_counter()
        if signal == "dense":
            if query.vector is None:
                raise SearchError("a dense search needs the query's vector")
            lists.append(opened.search(spec, [float(x) for x in query.vector], per_signal, filters))
        elif signal == "sparse":
            if query.sparse is None:
                raise SearchError("a sparse search needs the query's sparse vector")
            indices, values = list(query.sparse.indices), list(query.sparse.values)
            lists.append(opened.search_sparse(spec, indices, values, per_signal, filters))
        elif signal == "text":
            lists.append(opened.search_text(spec, query.text, per_signal, filters))
        else:
            raise SearchError(f"unknown signal {signal!r}")
        timings.add(signal, started)
    if mode == "hybrid":
        started = time.perf_counter()
        hits = fuse(lists, rrf_k, per_document=per_document, fusion=fusion)[:wanted]
        timings.add("fusion", started)
    else:
        hits = (collapse(lists[0]) if per_document else lists[0])[:wanted]
    if reranker is not None:
        started = time.perf_counter()
        hits = rerank(reranker, query.text, hits[:rerank_k])
        timings.add("rerank", started)
    return hits[:k]


def fuse(
    lists: Sequence[Sequence[Hit]],
    rrf_k: int = RRF_K,
    *,
    per_document: bool = False,
    fusion: str = "rrf",
) -> list[Hit]:
    """The lists fused into one, best first, each hit with its fused score.

    ``fusion="rrf"``, reciprocal rank fusion: each chunk scores the sum of
    ``1 / (rrf_k + rank)`` over the lists it is in (ranks from 1).
    ``fusion="relative"``, relative score fusion: each list's scores are min-max
    normalised over its own hits (its best 1, its worst 0; a list of one hit, or of equal
    scores, all 1), a chunk missing from a list counts 0 there, and a chunk scores the
    mean of its normalised scores over the lists (equal weights; empty lists count
    too, as a signal that found nothing). Every store's scores are higher-is-better
    (cosine similarity, inner product, BM25), as normalising needs. In both, ties go to
    the chunk with the better best rank, then to the earlier list.

    ``per_document``: documents are fused instead, each ranked in each list where its
    best chunk is among the list's documents (:func:`collapse`), with that chunk's score
    (relative: normalised over the list's documents), so that two signals that find one
    document by different chunks agree on it. Each document is shown by its chunk that
    fuses best, with the document's score."""
    if fusion not in FUSIONS:
        raise SearchError(f"unknown fusion {fusion!r}: use one of {', '.join(FUSIONS)}")
    chunks = _fused([[(_chunk_key(h), h) for h in hits] for hits in lists], rrf_k, fusion)
    if not per_document:
        return [replace(hit, rank=i, score=score) for i, (hit, score) in enumerate(chunks, 1)]
    shown: dict[str, Hit] = {}
    for hit, _ in chunks:
        shown.setdefault(hit.doc_id, hit)
    documents = _fused([[(h.doc_id, h) for h in collapse(hits)] for hits in lists], rrf_k, fusion)
    return [replace(shown[hit.doc_id], rank=i, score=score) for i, (hit, score) in enumerate(documents, 1)]


def collapse(hits: Sequence[Hit]) -> list[Hit]:
    """Each document's first (best) hit, in order: a ranking of documents."""
    seen: set[str] = set()
    kept = []
    for hit in hits:
        if hit.doc_id not in seen:
            seen.add(hit.doc_id)
            kept.append(hit)
    return kept


def _chunk_key(hit: Hit) -> str:
    return hit.chunk_id or f"{hit.doc_id}\x00{hit.chunk_index}"


def _fused(lists: Sequence[Sequence[tuple[str, Hit]]], rrf_k: int, fusion: str) -> list[tuple[Hit, float]]:
    """Ranked lists of (key, hit) fused by ``fusion``: each key's first hit and its
    score, best first."""
    scores: dict[str, float] = {}
    best: dict[str, tuple[int, int]] = {}
    first: dict[str, Hit] = {}
    for at, items in enumerate(lists):
        if fusion == "rrf":
            contributions = [1.0 / (rrf_k + rank) for rank in range(1, len(items) + 1)]
        else:
            contributions = [share / len(lists) for share in _min_max([hit.score for _, hit in items])]
        for rank, ((key, hit), contribution) in enumerate(zip(items, contributions), 1):
            scores[key] = scores.get(key, 0.0) + contribution
            best[key] = min(best.get(key, (rank, at)), (rank, at))
            first.setdefault(key, hit)
    order = sorted(scores, key=lambda key: (-scores[key], best[key]))
    return [(first[key], scores[key]) for key in order]


def _min_max(scores: Sequence[float]) -> list[float]:
    """``scores`` scaled to [0, 1]: the highest 1, the lowest 0; all 1 where they are
    equal (one hit, or ties throughout), since each is then the list's best."""
    if not scores:
        return []
    low, high = min(scores), max(scores)
    if high - low <= 0.0:
        return [1.0] * len(scores)
    return [(s - low) / (high - low) for s in scores]


def rerank(reranker: Any, query: str, hits: Sequence[Hit]) -> list[Hit]:
    """``hits`` ordered by a cross-encoder's score of (query, chunk text), which becomes
    their score; ties keep the order they came in."""
    if not hits:
        return []
    try:
        scores = reranker.score(query, [h.text for h in hits])
    except EmbedstreamError as e:
        raise SearchError(f"the reranker failed: {e}") from None
    order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))
    return [replace(hits[i], rank=n, score=float(scores[i])) for n, i in enumerate(order, 1)]


def load_reranker(directory: str, *, device: str = "cpu", dtype: str = "f32") -> Any:
    """``operators.Reranker`` from ``directory``, or a :class:`SearchError` saying why not."""
    from operators import Reranker

    try:
        return Reranker.load(directory, device=device, dtype=dtype)
    except EmbedstreamError as e:
        raise SearchError(f"cannot load the reranker {directory}: {e}") from None


def search(
    query: str,
    k: int = 5,
    store: Optional[str] = None,
    table: Optional[str] = None,
    model: Optional[str] = None,
    filters: Optional[dict[str, str]] = None,
    *,
    mode: Optional[str] = None,
    sparse_model: Optional[str] = None,
    rerank: Optional[str] = None,
    rerank_k: Optional[int] = None,
    rrf_k: Optional[int] = None,
    fusion: Optional[str] = None,
    per_document: bool = False,
) -> list[Hit]:
    """The ``k`` best chunks for ``query`` in a table of ``store`` (default: the
    configured store), best first, optionally only those whose metadata has every
    ``key=value`` of ``filters``; in ``mode`` (default: hybrid where the table has a
    second signal, else dense), reranked by the cross-encoder in ``rerank``; hybrid
    fuses by ``fusion`` (``rrf`` or ``relative``; default: the setting, ``rrf``);
    ``per_document``: the best chunk of each of the ``k`` best documents."""
    from flows.settings import Settings

    if k < 1:
        raise ValueError("k must be at least 1")
    settings = Settings.from_env()
    rerank_k = settings.rerank_k if rerank_k is None else rerank_k
    rrf_k = settings.rrf_k if rrf_k is None else rrf_k
    fusion = settings.fusion if fusion is None else fusion
    if fusion not in FUSIONS:
        raise SearchError(f"unknown fusion {fusion!r}: use one of {', '.join(FUSIONS)}")
    if rerank_k < 1 or rrf_k < 0:
        raise SearchError("--rerank-k must be 1 or more and --rrf-k 0 or more")
    opened = open_store(store or settings.store)
    try:
        spec = choose_table(opened, table)
        mode, used = signals(opened, spec, mode)
        reranker = load_reranker(rerank) if rerank else None
        q = Query(query)
        if "dense" in used:
            embedder = query_embedder(spec, model)
            q.vector = embedder.embed([query], prompt_name=query_prompt_name(embedder))[0]
        if "sparse" in used:
            encoder = query_sparse_encoder(spec, sparse_model or settings.sparse_model)
            q.sparse = encoder.embed_query([query])[0]
        return retrieve(
            opened,
            spec,
            q,
            k,
            filters,
            mode=mode,
            used=used,
            rrf_k=rrf_k,
            fusion=fusion,
            depth=rerank_k,
            reranker=reranker,
            rerank_k=rerank_k,
            per_document=per_document,
        )
    finally:
        opened.close()


def query_prompt_name(embedder: Embedder) -> Optional[str]:
    """The model's prompt for queries, if it has one (else its default prompt applies)."""
    return next((p for p in QUERY_PROMPTS if p in embedder.prompts), None)


def nearest(
    opened: Store, spec: TableSpec, vector: Sequence[float], k: int, filters: Optional[dict[str, str]] = None
) -> list[Hit]:
    """The ``k`` chunks of table ``spec`` nearest to the query ``vector``, best first
    (``embedstream serve``'s /search embeds the query in its batcher, then comes here)."""
    return opened.search(spec, [float(x) for x in vector], k, dict(filters or {}))


__all__ = [
    "FUSIONS",
    "MODES",
    "Hit",
    "Query",
    "SearchError",
    "StoreConfigError",
    "Timings",
    "choose_table",
    "collapse",
    "fuse",
    "load_reranker",
    "nearest",
    "query_embedder",
    "query_prompt_name",
    "query_sparse_encoder",
    "rerank",
    "retrieve",
    "search",
    "signals",
]
