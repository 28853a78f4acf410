"""LanceDB, embedded in a directory: the default store.

A batch is one ``merge_insert`` per chunk table (upserts by ``chunk_id``, and through
``when_not_matched_by_source_delete`` the removal of the chunks its manifests no longer
list and of deleted documents) in one commit, then one ``merge_insert`` of the document
states. A kill between the two leaves states behind the rows; the sink's offsets are
committed after both, so a restart replays the batch and converges.

Search signals besides the dense vectors:

- ``text``: LanceDB's own full-text index (``FTS``, BM25) on ``text``, made with the
  table in the language of ``EMBEDSTREAM_TEXT_SEARCH_LANGUAGE`` (stemmed, stop words
  removed, PostgreSQL's list for English; ``simple``: neither), lower-cased, accents
  folded, with positions: a query's identifiers (``os.path.join``) are also asked as
  phrases. An index made with other options is made again when the sink first opens the
  table. Rows written after the index was last updated (compaction updates it) are
  searched without it, so every row is found.
- ``sparse``: LanceDB has no sparse vector type or index (as of 0.40), so a sparse
  vector is stored as two list columns, ``sparse_indices`` and ``sparse_values``, and a
  sparse search scores every row (a brute-force inner product over the columns, in
  numpy): exact, and linear in the table's size.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from datetime import timedelta
from typing import Any, Optional

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import FTS, IvfHnswSq
from lancedb.query import BooleanQuery, MatchQuery, Occur, PhraseQuery

from flows.stores import (
    DocState,
    Hit,
    StoreConfigError,
    StoreError,
    TableChanges,
    TableSpec,
    Version,
    apply_final,
    metadata_json,
)

log = logging.getLogger("embedstream.sink")

#: Rows from which a table gets a vector index (IVF_HNSW_SQ, cosine); below it an exact
#: scan is fast, and an index needs that many rows to train its partitions well.
INDEX_MIN_ROWS = 50_000
#: Seconds between compactions (``optimize``): every batch commits a new version with
#: small fragments; compaction merges them, indexes new rows and drops old versions.
OPTIMIZE_EVERY_S = 300.0
#: Table versions younger than this survive compaction (readers may still use them).
KEEP_VERSIONS = timedelta(minutes=30)

CATALOG = "embedstream_tables"
DOCUMENTS = "embedstream_documents"

CATALOG_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("model_id", pa.string()),
        ("model_revision", pa.string()),
        ("dimension", pa.int32()),
        ("dtype", pa.string()),
        ("prompt_name", pa.string()),
        ("sparse_model_id", pa.string()),
        ("sparse_model_revision", pa.string()),
        ("sparse_dtype", pa.string()),
        ("sparse_dimension", pa.int32()),
        ("text_language", pa.string()),
    ]
)
#: Catalog columns added since the first catalogs (v1.6 of the schemas), with their SQL type.
CATALOG_ADDED = {
    "sparse_model_id": "STRING",
    "sparse_model_revision": "STRING",
    "sparse_dtype": "STRING",
    "sparse_dimension": "INT",
    "text_language": "STRING",
}
#: LanceDB's name of each stemming language, by PostgreSQL's text search configuration.
LANGUAGES = {
    "simple": None,
    "arabic": "Arabic",
    "danish": "Danish",
    "dutch": "Dutch",
    "english": "English",
    "finnish": "Finnish",
    "french": "French",
    "german": "German",
    "greek": "Greek",
    "hungarian": "Hungarian",
    "italian": "Italian",
    "norwegian": "Norwegian",
    "portuguese": "Portuguese",
    "romanian": "Romanian",
    "russian": "Russian",
    "spanish": "Spanish",
    "swedish": "Swedish",
    "tamil": "Tamil",
    "turkish": "Turkish",
}
#: PostgreSQL's ``english.stop`` (Snowball's English list), which its ``english``
#: configuration drops: the same list makes LanceDB's index match the same words.
POSTGRES_ENGLISH_STOP_WORDS = (
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself "
    "she her hers herself it its itself they them their theirs themselves what which who whom "
    "this that these those am is are was were be been being have has had having do does did "
    "doing a an the and but if or because as until while of at by for with about against "
    "between into through during before after above below to from up down in out on off over "
    "under again further then once here there when where why how all any both each few more "
    "most other some such no nor not only own same so than too very s t can will just don "
    "should now"
).split()
DOCUMENTS_SCHEMA = pa.schema(
    [
        ("table_name", pa.string()),
        ("doc_id", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("deleted", pa.bool_()),
    ]
)


def chunk_schema(dimension: int, sparse: bool = False) -> pa.Schema:
    extra = [("sparse_indices", pa.list_(pa.int32())), ("sparse_values", pa.list_(pa.float32()))]
    return pa.schema(
        [
            ("chunk_id", pa.string()),
            ("doc_id", pa.string()),
            ("doc_version", pa.int64()),
            ("chunk_index", pa.int32()),
            ("page", pa.int32()),
            ("char_start", pa.int32()),
            ("char_end", pa.int32()),
            ("time_start_ms", pa.int64()),
            ("time_end_ms", pa.int64()),
            ("text", pa.string()),
            ("metadata", pa.string()),
            ("embedded_at", pa.timestamp("ms", tz="UTC")),
            ("embedding", pa.list_(pa.float32(), dimension)),
            *(extra if sparse else []),
        ]
    )


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _in_list(values) -> str:
    return ", ".join(_quote(v) for v in values)


def _rows_of_docs(table, doc_ids: list[str]) -> list[dict[str, Any]]:
    """The rows of ``table`` whose ``doc_id`` is one of ``doc_ids`` (a thousand per query,
    to keep each filter short)."""
    rows = []
    for start in range(0, len(doc_ids), 1000):
        where = f"doc_id IN ({_in_list(doc_ids[start : start + 1000])})"
        rows.extend(table.search().where(where).limit(None).to_arrow().to_pylist())
    return rows


@functools.cache
def _english_stop_words() -> tuple[str, ...]:
    """PostgreSQL's English stop words and their stems: LanceDB drops stop words after
    stemming, so its own list lets "because" through as "becaus" (and drops NLTK's "d",
    "won", "ma")."""
    stems = lancedb.tokenize(
        " ".join(POSTGRES_ENGLISH_STOP_WORDS), language="English", remove_stop_words=False
    )
    return tuple(sorted(set(POSTGRES_ENGLISH_STOP_WORDS) | {t.text for t in stems}))


def fts_config(language: str) -> FTS:
    """The full-text index of a table whose text is in ``language`` (a PostgreSQL text
    search configuration name): words split at every character that is not a letter or
    digit, lower-cased, accents folded (café is cafe), stemmed and stop words dropped as
    PostgreSQL's configuration of that name does (``simple``: neither), with positions,
    so an identifier such as ``os.path.join`` is asked as a phrase (``search_text``)."""
    if language not in LANGUAGES:
        raise StoreConfigError(
            f"LanceDB's full-text index has no language {language!r} (EMBEDSTREAM_TEXT_SEARCH_LANGUAGE); "
            f"use one of {', '.join(LANGUAGES)}"
        )
    name = LANGUAGES[language]
    common: dict[str, Any] = {
        "base_tokenizer": "simple",
        "with_position": True,
        "lower_case": True,
        "ascii_folding": True,
    }
    if name is None:
        return FTS(**common, stem=False, remove_stop_words=False)
    stop_words = list(_english_stop_words()) if name == "English" else None
    return FTS(**common, language=name, stem=True, remove_stop_words=True, custom_stop_words=stop_words)


#: The options of a full-text index that change what it matches: an index made with
#: other values than :func:`fts_config`'s is made again (``_ensure``).
FTS_OPTIONS = (
    "base_tokenizer",
    "language",
    "with_position",
    "lower_case",
    "stem",
    "remove_stop_words",
    "custom_stop_words",
    "ascii_folding",
)


def _fts_options(details: dict[str, Any]) -> dict[str, Any]:
    out = {k: details.get(k) for k in FTS_OPTIONS}
    if out["custom_stop_words"] is not None:
        out["custom_stop_words"] = sorted(out["custom_stop_words"])
    if not out["stem"] and not out["remove_stop_words"]:
        out["language"] = None  # no stemmer and no stop words: the language does nothing
    return out


class LanceStore:
    def __init__(self, path: str, *, text_language: str = "english") -> None:
        fts_config(text_language)  # an unknown language fails here, before any write
        self.text_language = text_language
        self.path = os.path.abspath(path)
        self.url = f"lancedb:{path}"
        self.db = lancedb.connect(self.path)
        self._open: dict[str, Any] = {}
        self._indexed: set[str] = set()
        #: Whether each table's full-text index has positions, as first seen.
        self._phrases: dict[str, bool] = {}
        #: Tables whose columns are known to be current.
        self._current: set[str] = set()
        self._last_optimize = time.monotonic()
        self._wrote = False

    # --- tables ------------------------------------------------------------------------------

    def _names(self) -> set[str]:
        listed = self.db.list_tables()
        return set(getattr(listed, "tables", listed))

    def _table(self, name: str, schema: pa.Schema | None = None):
        table = self._open.get(name)
        if table is None:
            if name in self._names():
                table = self.db.open_table(name)
            elif schema is not None:
                table = self.db.create_table(name, schema=schema, exist_ok=True)
            else:
                return None
            self._open[name] = table
        return table

    def _catalog_rows(self) -> list[dict[str, Any]]:
        catalog = self._table(CATALOG)
        return [] if catalog is None else catalog.to_arrow().to_pylist()

    def tables(self) -> list[TableSpec]:
        names = self._names()
        specs = [TableSpec.from_lineage(row) for row in self._catalog_rows()]
        return [spec for spec in specs if spec.name in names]

    def _catalog(self):
        """The catalog, with the columns of this version."""
        catalog = self._table(CATALOG, CATALOG_SCHEMA)
        missing = {c: t for c, t in CATALOG_ADDED.items() if c not in catalog.schema.names}
        if missing:
            catalog.add_columns({c: f"CAST(NULL AS {t})" for c, t in missing.items()})
            self._open.pop(CATALOG, None)
            catalog = self._table(CATALOG)
        return catalog

    def _language(self, name: str) -> str:
        row = next((r for r in self._catalog_rows() if r["name"] == name), None)
        return (row or {}).get("text_language") or self.text_language

    def _ensure(self, spec: TableSpec):
        table = self._table(spec.name)
        if table is not None and spec.name not in self._current:
            # Tables from before v1.5 of the schemas lack the time columns.
            missing = [c for c in ("time_start_ms", "time_end_ms") if c not in table.schema.names]
            if missing:
                table.add_columns({c: "CAST(NULL AS BIGINT)" for c in missing})
                log.info("%s: added columns %s", spec.name, ", ".join(missing))
            # ... tables from before v1.6 the full-text index, and an index made with other
            # options (before positions and PostgreSQL's stop words) is made again, once.
            wanted = fts_config(self._language(spec.name))
            details = _text_index(table)
            if details is None or _fts_options(details) != _fts_options(vars(wanted)):
                started = time.monotonic()
                table.create_index("text", config=wanted, replace=True)
                log.info(
                    "%s: full-text index on text %s in %.1f s",
                    spec.name,
                    "built" if details is None else "made again with the current options",
                    time.monotonic() - started,
                )
            self._current.add(spec.name)
        if table is None:
            table = self._table(spec.name, chunk_schema(spec.dimension, spec.sparse is not None))
            table.create_index("text", config=fts_config(self.text_language))
            lineage = {**spec.lineage(), "text_language": self.text_language}
            self._catalog().merge_insert(
                "name"
            ).when_matched_update_all().when_not_matched_insert_all().execute(
                pa.Table.from_pylist([lineage], schema=CATALOG_SCHEMA)
            )
            log.info("created LanceDB table %s for %s (dim %d)", spec.name, spec.model_id, spec.dimension)
            self._current.add(spec.name)
        return table

    # --- sink --------------------------------------------------------------------------------

    def states(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], DocState]:
        documents = self._table(DOCUMENTS)
        if documents is None or not keys:
            return {}
        found = {}
        for r in _rows_of_docs(documents, sorted({d for _, d in keys})):
            key = (r["table_name"], r["doc_id"])
            if key in keys:
                found[key] = DocState(Version(r["topic"], r["partition"], r["offset"]), r["deleted"])
        return found

    def chunk_ids(self, spec: TableSpec, doc_ids: list[str]) -> dict[str, set[str]]:
        table = self._table(spec.name)
        found: dict[str, set[str]] = {}
        if table is None:
            return found
        for start in range(0, len(doc_ids), 1000):
            where = f"doc_id IN ({_in_list(doc_ids[start : start + 1000])})"
            query = table.search().where(where).select(["doc_id", "chunk_id"]).limit(None)
            for r in query.to_arrow().to_pylist():
                found.setdefault(r["doc_id"], set()).add(r["chunk_id"])
        return found

    def write(self, changes: list[TableChanges]) -> None:
        self._wrote = True
        try:
            states = []
            for ch in changes:
                if ch.spec is not None and (ch.before or ch.after or ch.finals):
                    self._write_chunks(ch)
                states.extend(
                    {
                        "table_name": ch.spec.name,
                        "doc_id": doc_id,
                        "topic": s.version.topic,
                        "partition": s.version.partition,
                        "offset": s.version.offset,
                        "deleted": s.deleted,
                    }
                    for doc_id, s in ch.states.items()
                )
            if states:
                documents = self._table(DOCUMENTS, DOCUMENTS_SCHEMA)
                documents.merge_insert(
                    ["table_name", "doc_id"]
                ).when_matched_update_all().when_not_matched_insert_all().execute(
                    pa.Table.from_pylist(states, schema=DOCUMENTS_SCHEMA)
                )
        except (OSError, RuntimeError) as e:
            raise StoreError(f"LanceDB write failed: {e}") from e

    def _write_chunks(self, ch: TableChanges) -> None:
        table = self._ensure(ch.spec)
        source: dict[str, dict[str, Any]] = {}
        if ch.finals:
            existing: dict[str, dict[str, dict[str, Any]]] = {d: {} for d in ch.finals}
            for row in self._doc_rows(table, list(ch.finals)):
                existing[row["doc_id"]][row["chunk_id"]] = row
            for chunk_id, row in ch.before.items():
                existing.setdefault(row["doc_id"], {})[chunk_id] = row
            for doc_id, rows in existing.items():
                final = ch.finals.get(doc_id)
                source.update(apply_final(rows, final) if final else rows)
        else:
            source.update(ch.before)
        source.update(ch.after)
        sparse = ch.spec.sparse is not None
        data = pa.Table.from_pylist(
            [_to_lance(r, sparse) for r in source.values()], schema=chunk_schema(ch.spec.dimension, sparse)
        )
        merge = table.merge_insert("chunk_id").when_matched_update_all().when_not_matched_insert_all()
        if ch.finals:
            merge = merge.when_not_matched_by_source_delete(f"doc_id IN ({_in_list(ch.finals)})")
        merge.execute(data)
        self._maintain(ch.spec.name, table)

    def _maintain(self, name: str, table) -> None:
        """Indexes a table once it is large enough, and compacts every few minutes."""
        if name not in self._indexed:
            if any(i.name == "embedding_idx" or "embedding" in i.columns for i in table.list_indices()):
                self._indexed.add(name)
            elif table.count_rows() >= INDEX_MIN_ROWS:
                started = time.monotonic()
                table.create_index(
                    "embedding", config=IvfHnswSq(distance_type="cosine"), name="embedding_idx"
                )
                self._indexed.add(name)
                log.info(
                    "%s: vector index (IVF_HNSW_SQ, cosine) built in %.1f s", name, time.monotonic() - started
                )
        if time.monotonic() - self._last_optimize >= OPTIMIZE_EVERY_S:
            self._last_optimize = time.monotonic()
            for open_name, open_table in self._open.items():
                if open_name.startswith("chunks_") or open_name == DOCUMENTS:
                    open_table.optimize(cleanup_older_than=KEEP_VERSIONS)

    def _doc_rows(self, table, doc_ids: list[str]) -> list[dict[str, Any]]:
        return [_from_lance(r) for r in _rows_of_docs(table, doc_ids)]

    # --- reading -----------------------------------------------------------------------------

    def rows(self, spec: TableSpec) -> list[dict[str, Any]]:
        table = self._table(spec.name)
        return [] if table is None else [_from_lance(r) for r in table.to_arrow().to_pylist()]

    def modes(self, spec: TableSpec) -> dict[str, Optional[str]]:
        table = self._table(spec.name)
        sparse = None
        if spec.sparse is None:
            sparse = "its chunks have no sparse vectors (the flow ran without --sparse-model)"
        text = (
            None
            if table is not None and _text_index(table) is not None
            else "the table has no full-text index yet"
        )
        return {"dense": None, "sparse": sparse, "text": text}

    def search(self, spec: TableSpec, vector: list[float], k: int, filters: dict[str, str]) -> list[Hit]:
        table = self._table(spec.name)
        query = table.search(vector, vector_column_name="embedding").metric("cosine")
        if filters:
            query = query.where(_where(filters), prefilter=True)
        return [
            _hit(rank, 1.0 - float(r["_distance"]), r) for rank, r in enumerate(query.limit(k).to_list(), 1)
        ]

    def search_text(self, spec: TableSpec, query: str, k: int, filters: dict[str, str]) -> list[Hit]:
        table = self._table(spec.name)
        if table is None or not query.strip():
            return []
        # The query as words, any of them (no query syntax: quotes, AND, field:value are text),
        # and each identifier in it also as a phrase, so a chunk that holds ``os.path.join``
        # as written outranks one with "os", "path" and "join" apart (PostgreSQL's parser
        # keeps such a name as one term).
        clauses: list[tuple[Occur, Any]] = [(Occur.SHOULD, MatchQuery(query, "text"))]
        if self._positions(spec.name, table):
            clauses += [(Occur.SHOULD, PhraseQuery(name, "text")) for name in identifiers(query)]
        asked = clauses[0][1] if len(clauses) == 1 else BooleanQuery(clauses)
        found = table.search(asked, query_type="fts")
        if filters:
            found = found.where(_where(filters), prefilter=True)
        return [_hit(rank, float(r["_score"]), r) for rank, r in enumerate(found.limit(k).to_list(), 1)]

    def _positions(self, name: str, table) -> bool:
        """Whether the table's full-text index keeps positions (phrases need them; an index
        made before them has none until the sink makes it again)."""
        if name not in self._phrases:
            self._phrases[name] = bool((_text_index(table) or {}).get("with_position"))
        return self._phrases[name]

    def search_sparse(
        self, spec: TableSpec, indices: list[int], values: list[float], k: int, filters: dict[str, str]
    ) -> list[Hit]:
        table = self._table(spec.name)
        if table is None or spec.sparse is None or not len(indices):
            return []
        # The query as a dense array over the vocabulary: each row's score is then a
        # gather and a sum over its non-zeros.
        weights = np.zeros(spec.sparse.dimension, dtype=np.float32)
        weights[np.asarray(indices, dtype=np.int64)] = np.asarray(values, dtype=np.float32)
        scan = table.search().select(["chunk_id", "sparse_indices", "sparse_values"]).limit(None)
        if filters:
            scan = scan.where(_where(filters))
        data = scan.to_arrow()
        if data.num_rows == 0:
            return []
        ids = data.column("chunk_id").to_numpy(zero_copy_only=False)
        scores = np.zeros(data.num_rows, dtype=np.float64)
        at = 0
        for chunk in data.column("sparse_indices").chunks:
            values_chunk = data.column("sparse_values").slice(at, len(chunk)).combine_chunks()
            offsets = chunk.offsets.to_numpy()
            flat = chunk.values.to_numpy(zero_copy_only=False).astype(np.int64)
            products = weights[flat] * values_chunk.values.to_numpy(zero_copy_only=False)
            # Sums between consecutive offsets (empty lists sum to 0).
            sums = np.concatenate(([0.0], np.cumsum(products, dtype=np.float64)))
            scores[at : at + len(chunk)] = sums[offsets[1:]] - sums[offsets[:-1]]
            at += len(chunk)
        positive = np.flatnonzero(scores > 0)
        best = positive[np.argsort(-scores[positive], kind="stable")[:k]]
        if not len(best):
            return []
        chosen = [str(ids[i]) for i in best]
        rows = {
            r["chunk_id"]: r
            for r in table.search().where(f"chunk_id IN ({_in_list(chosen)})").limit(None).to_list()
        }
        return [_hit(rank, float(scores[i]), rows[str(ids[i])]) for rank, i in enumerate(best, 1)]

    def close(self) -> None:
        # A run that ends (--until-end, SIGTERM) leaves its tables compacted and indexed.
        if self._wrote:
            for name, table in self._open.items():
                if name.startswith("chunks_") or name == DOCUMENTS:
                    table.optimize(cleanup_older_than=KEEP_VERSIONS)
        self._open.clear()


#: A member of a canonical JSON object sits after ``{`` or ``,`` and before ``,`` or ``}``.
_AROUND = [("%{", ",%"), ("%{", "}"), ("%,", ",%"), ("%,", "}")]


def _where(filters: dict[str, str]) -> str:
    """Metadata is canonical JSON text: a key and value pair matches as a member."""
    clauses = []
    for key, value in filters.items():
        member = metadata_json({key: value})[1:-1]
        escaped = member.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("'", "''")
        clauses.append(
            "(" + " OR ".join(f"metadata LIKE '{a}{escaped}{b}' ESCAPE '\\'" for a, b in _AROUND) + ")"
        )
    return " AND ".join(clauses)


def _hit(rank: int, score: float, r: dict[str, Any]) -> Hit:
    return Hit(
        rank,
        score,
        r["doc_id"],
        r["page"],
        r["chunk_index"],
        r["text"],
        json.loads(r["metadata"]),
        r.get("time_start_ms"),
        r.get("time_end_ms"),
        r["chunk_id"],
    )


#: Phrases asked per query at most: each is one more posting-list intersection.
MAX_PHRASES = 8
_EDGES = re.compile(r"^[\W_]+|[\W_]+$")


def identifiers(query: str) -> list[str]:
    """The words of ``query`` that the index splits into several terms (``str.join``,
    ``sys.exc_info``, ``utf-8``), without the punctuation around them (``(os.path)``).
    An apostrophe does not make one (``Python's``, ``don't``): PostgreSQL splits those
    too, and a phrase would only weigh their first part twice."""
    found: list[str] = []
    for word in query.split():
        word = _EDGES.sub("", word)
        if re.search(r"[^\w'\u2019]|_", word) and word not in found:
            found.append(word)
    return found[:MAX_PHRASES]


def _text_index(table) -> Optional[dict[str, Any]]:
    """The options of the table's full-text index on ``text``, None without one."""
    for index in table.list_indices():
        if index.columns == ["text"] and index.index_type == "FTS":
            return dict(getattr(index, "index_details", None) or {})
    return None


def _to_lance(row: dict[str, Any], sparse: bool = False) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k != "sparse"}
    out["metadata"] = metadata_json(row["metadata"])
    if sparse:
        vector = row.get("sparse")
        out["sparse_indices"] = None if vector is None else vector["indices"]
        out["sparse_values"] = None if vector is None else vector["values"]
    return out


def _from_lance(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("sparse_indices", "sparse_values")}
    out["metadata"] = json.loads(row["metadata"])
    at = row["embedded_at"]
    out["embedded_at"] = int(at.timestamp() * 1000) if hasattr(at, "timestamp") else at
    out["embedding"] = list(row["embedding"])
    if "sparse_indices" in row:
        indices = row["sparse_indices"]
        out["sparse"] = (
            None if indices is None else {"indices": list(indices), "values": list(row["sparse_values"])}
        )
    return out
