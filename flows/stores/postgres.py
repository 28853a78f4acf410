"""PostgreSQL with pgvector: one transaction per batch.

Each model's chunks live in their own table with an HNSW cosine index on the dense
vectors: ``vector(d)`` up to 2,000 dimensions (pgvector's limit for ``vector`` in an
index), ``halfvec(d)`` (16-bit floats) from 2,001 to 4,000 (the limit for ``halfvec``),
so Qwen3-Embedding-4B's 2,560 get an index; above 4,000 (Qwen3-Embedding-8B's 4,096
without ``--truncate-dim``) the vectors stay ``vector(d)`` at full precision and
every search is an exact scan, which the sink says once. ``embedstream_tables`` records
each table's model lineage; ``embedstream_documents`` the version applied per document.

Two more signals for ``embedstream search --mode``:

- ``text_tsv``: a ``tsvector`` generated from ``text`` in the table's text search
  configuration (``EMBEDSTREAM_TEXT_SEARCH_LANGUAGE``, default english, fixed when the
  table is made), with a GIN index.
- ``sparse``: the chunk's sparse vector as ``sparsevec(vocabulary size)`` with an HNSW
  inner-product index, in tables of a sparse model. pgvector indexes sparse vectors of
  at most 1,000 non-zero entries, so the column keeps a chunk's 1,000 largest weights
  (the record on the topic keeps them all). What that loses: a query term whose weight
  in the chunk was below those 1,000 adds nothing to the chunk's score. SPLADE and
  BGE-M3 give a chunk of 512 tokens far fewer non-zeros, so it rarely applies.

PostgreSQL's ``text`` and ``jsonb`` cannot hold the NUL character (U+0000), which a
chunk's text or a metadata string may carry (an extractor passes it through; LanceDB
keeps it). This store writes such a chunk without its NULs: they are removed from the
text and from every string in the metadata, keys included, so ``"a\x00b"`` is stored
as ``"ab"`` and a metadata filter matches the value without them. Identifiers (doc and
chunk ids) are kept as they are; one that holds a NUL is refused as data.

pgvector 0.6 to 0.8 serve; the store reads the server's version when it connects
(``pgvector``, and a log line naming what it cannot use: :func:`missing_features`).
From 0.8 on, searches scan the HNSW index iteratively (``hnsw.iterative_scan``) until
k rows pass the metadata filter. Before 0.8 the index hands over its
``hnsw.ef_search`` nearest candidates (set to 4 k, 100 to 1,000) and the filter applies
to those alone, so a filter that few rows match can return fewer than k hits. Before
0.7 there is no ``sparsevec`` (sparse vectors are not stored, and sparse search is
unavailable) and no ``halfvec`` (2,001 to 4,000 dimensions are scanned exactly). Dense
and full-text search work the same on every version.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import psycopg
from psycopg import sql
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.types import TypeInfo

from flows.stores import (
    COLUMNS,
    DocState,
    Hit,
    StoreConfigError,
    StoreError,
    TableChanges,
    TableSpec,
    Version,
)

log = logging.getLogger("embedstream.sink")

#: pgvector's HNSW (and IVFFlat) indexes take vectors of at most this many dimensions.
MAX_INDEXED_DIMENSIONS = 2000
#: ... and ``halfvec`` ones of at most this many.
MAX_INDEXED_HALFVEC_DIMENSIONS = 4000
#: pgvector's HNSW index takes sparse vectors of at most this many non-zero entries.
MAX_INDEXED_NONZEROS = 1000
#: Rows counted at most for a query term's document frequency (full-text search).
DF_COUNT_CAP = 100_000
#: Rows counted at most for a table's size when the planner has no estimate yet.
ROW_COUNT_CAP = 1_000_000
#: BM25's term-frequency saturation and length normalisation: Robertson's defaults, which
#: Lucene and tantivy (so LanceDB's full-text index) use too.
BM25_K1 = 1.2
BM25_B = 0.75
#: Rows read for a table's average chunk length (BM25's avgdl), the first ones stored,
#: and for how long a store keeps it (reading them costs more than a search).
AVGDL_SAMPLE = 1000
AVGDL_KEEP_S = 60.0
#: The first pgvector with iterative index scans.
ITERATIVE_SCAN_SINCE = (0, 8, 0)
#: The first pgvector with ``sparsevec`` and ``halfvec``.
SPARSEVEC_SINCE = HALFVEC_SINCE = (0, 7, 0)


def missing_features(version: tuple[int, ...]) -> list[str]:
    """What a server's pgvector cannot do that this store would use, by name."""
    missing = []
    if version < SPARSEVEC_SINCE:
        missing.append("sparsevec (sparse vectors are not stored; no sparse search)")
    if version < HALFVEC_SINCE:
        missing.append("halfvec (2,001 to 4,000 dimensions are scanned exactly, without an index)")
    if version < ITERATIVE_SCAN_SINCE:
        missing.append("hnsw.iterative_scan (a filtered search can return fewer than k hits)")
    return missing


#: The HNSW graph's build parameters. Each insert into the index costs about 20 times
#: the rest of a row's write, so they set the sink's speed. On 12,000 real MiniLM
#: vectors (bench/sink.py's texts; 200 held-out queries at our ef_search of 100),
#: pgvector's defaults m=16, ef_construction=64 insert 641 rows/s at recall@10 0.998;
#: m=12 keeps 0.994 and inserts 824 rows/s; m=12, ef_construction=40 gives 947 at
#: 0.988. An index of this name created before the sink's first write is kept as is.
HNSW_M = 12
HNSW_EF_CONSTRUCTION = 64

_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS embedstream_tables (
    name text PRIMARY KEY,
    model_id text NOT NULL,
    model_revision text NOT NULL,
    dimension integer NOT NULL,
    dtype text NOT NULL,
    prompt_name text,
    indexed boolean NOT NULL DEFAULT false
);
ALTER TABLE embedstream_tables
    ADD COLUMN IF NOT EXISTS sparse_model_id text,
    ADD COLUMN IF NOT EXISTS sparse_model_revision text,
    ADD COLUMN IF NOT EXISTS sparse_dtype text,
    ADD COLUMN IF NOT EXISTS sparse_dimension integer,
    ADD COLUMN IF NOT EXISTS text_language text;
CREATE TABLE IF NOT EXISTS embedstream_documents (
    table_name text NOT NULL,
    doc_id text NOT NULL,
    topic text NOT NULL,
    "partition" integer NOT NULL,
    "offset" bigint NOT NULL,
    deleted boolean NOT NULL,
    PRIMARY KEY (table_name, doc_id)
);
"""

_UPSERT = """
INSERT INTO {t} (chunk_id, doc_id, doc_version, chunk_index, page, char_start, char_end,
                 time_start_ms, time_end_ms, text, metadata, embedded_at, embedding{sparse_column})
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, to_timestamp(%s / 1000.0), %b{sparse_value})
ON CONFLICT (chunk_id) DO UPDATE SET
    doc_id = EXCLUDED.doc_id, doc_version = EXCLUDED.doc_version,
    chunk_index = EXCLUDED.chunk_index, page = EXCLUDED.page,
    char_start = EXCLUDED.char_start, char_end = EXCLUDED.char_end,
    time_start_ms = EXCLUDED.time_start_ms, time_end_ms = EXCLUDED.time_end_ms, text = EXCLUDED.text,
    metadata = EXCLUDED.metadata, embedded_at = EXCLUDED.embedded_at,
    embedding = EXCLUDED.embedding{sparse_set}
"""


@dataclass(frozen=True)
class _Layout:
    """What a chunk table has, as read from the server (tables made by older versions
    of the sink, or on an older pgvector, have less)."""

    #: The dense column's type: vector or halfvec.
    embedding: str
    #: The text search configuration of its ``text_tsv`` column (None: no such column).
    language: Optional[str]
    #: Whether it has the ``sparse`` column.
    sparse: bool


def sparse_literal(indices: list[int], values: list[float], dimension: int) -> str:
    """A sparse vector in pgvector's text form (1-based indices), keeping the
    :data:`MAX_INDEXED_NONZEROS` largest weights."""
    if len(values) > MAX_INDEXED_NONZEROS:
        top = sorted(np.argsort(np.asarray(values, dtype=np.float64))[-MAX_INDEXED_NONZEROS:])
        indices, values = [indices[i] for i in top], [values[i] for i in top]
    body = ",".join(f"{i + 1}:{float(v)!r}" for i, v in zip(indices, values))
    return "{" + body + "}/" + str(dimension)


def _vector(values: list[float]) -> str:
    return "[" + ",".join(repr(float(x)) for x in values) + "]"


class _Embedding:
    """A row's vector, sent in pgvector's binary format: written as text, its floats
    took a fifth of the sink's time in formatting alone."""

    __slots__ = ("values",)

    def __init__(self, values: list[float]) -> None:
        self.values = np.asarray(values, dtype=">f4")


class _EmbeddingDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: _Embedding) -> bytes:
        # vector_recv: int16 dimension, int16 unused, then big-endian float4s.
        return struct.pack(">HH", len(obj.values), 0) + obj.values.tobytes()


def pgvector_version(text: str) -> tuple[int, ...]:
    """pg_extension's ``extversion`` of pgvector (``"0.8.1"``) as numbers to compare."""
    return tuple(int(part) for part in text.split("."))


def _register_vector_type(conn: psycopg.Connection) -> None:
    info = TypeInfo.fetch(conn, "vector")
    if info is None:
        raise StoreConfigError("PostgreSQL has no vector type: install pgvector")
    dumper = type("VectorDumper", (_EmbeddingDumper,), {"oid": info.oid})
    conn.adapters.register_dumper(_Embedding, dumper)


class PostgresStore:
    def __init__(self, url: str, *, text_language: str = "english") -> None:
        self.url = url
        self.conn: psycopg.Connection | None = None
        self._known: set[str] = set()
        #: The server's pgvector, read at each connect.
        self.pgvector: tuple[int, ...] = ()
        #: The text search configuration of the tables this store creates.
        self.text_language = text_language
        self._layouts: dict[str, _Layout] = {}
        #: Each table's average chunk length and when it was read (monotonic seconds).
        self._avgdl: dict[str, tuple[float, float]] = {}

    def _connect(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed:
            try:
                self.conn = psycopg.connect(self.url, autocommit=False, connect_timeout=10)
            except psycopg.OperationalError as e:
                raise StoreError(f"cannot connect to PostgreSQL: {e}") from e
            except psycopg.ProgrammingError as e:
                raise StoreConfigError(f"bad PostgreSQL DSN: {e}") from e
            with self.conn.transaction():
                self.conn.execute(_SCHEMA)
                _register_vector_type(self.conn)
                self._detect_pgvector(self.conn)
                self._check_language(self.conn)
            self._known.clear()
            self._layouts.clear()
        return self.conn

    def _detect_pgvector(self, conn: psycopg.Connection) -> None:
        [text] = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        version = pgvector_version(text)
        if version != self.pgvector:
            missing = missing_features(version)
            log.log(
                logging.WARNING if missing else logging.INFO,
                "PostgreSQL %s with pgvector %s%s",
                conn.info.parameter_status("server_version"),
                text,
                f"; not available before a newer pgvector: {'; '.join(missing)}" if missing else "",
            )
        self.pgvector = version

    def _check_language(self, conn: psycopg.Connection) -> None:
        found = conn.execute(
            "SELECT 1 FROM pg_ts_config WHERE cfgname = %s", (self.text_language,)
        ).fetchone()
        if found is None:
            names = [r[0] for r in conn.execute("SELECT cfgname FROM pg_ts_config ORDER BY 1").fetchall()]
            raise StoreConfigError(
                f"PostgreSQL has no text search configuration {self.text_language!r} "
                f"(EMBEDSTREAM_TEXT_SEARCH_LANGUAGE); it has {', '.join(names)}"
            )

    @property
    def sparsevec(self) -> bool:
        return self.pgvector >= SPARSEVEC_SINCE

    @property
    def halfvec(self) -> bool:
        return self.pgvector >= HALFVEC_SINCE

    def _run(self, fn):
        """Runs ``fn(conn)`` in one transaction; a lost connection is a StoreError (the
        sink waits and retries) and the next call reconnects."""
        conn = self._connect()
        try:
            with conn.transaction():
                return fn(conn)
        except psycopg.OperationalError as e:
            self.close()
            raise StoreError(f"PostgreSQL: {e}") from e

    # --- tables ------------------------------------------------------------------------------

    def tables(self) -> list[TableSpec]:
        columns = (
            "model_id",
            "model_revision",
            "dimension",
            "dtype",
            "prompt_name",
            "sparse_model_id",
            "sparse_model_revision",
            "sparse_dtype",
            "sparse_dimension",
        )
        rows = self._run(
            lambda c: c.execute(
                f"SELECT {', '.join(columns)} FROM embedstream_tables ORDER BY name"
            ).fetchall()
        )
        return [TableSpec.from_lineage(dict(zip(columns, r))) for r in rows]

    def _layout(self, conn: psycopg.Connection, spec: TableSpec) -> _Layout:
        """The columns of ``spec``'s table, as the server has them."""
        layout = self._layouts.get(spec.name)
        if layout is None:
            types = dict(
                conn.execute(
                    """SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
                       WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped""",
                    (sql.Identifier(spec.name).as_string(conn),),
                ).fetchall()
            )
            language = None
            if "text_tsv" in types:
                row = conn.execute(
                    "SELECT coalesce(text_language, 'english') FROM embedstream_tables WHERE name = %s",
                    (spec.name,),
                ).fetchone()
                language = row[0] if row else "english"
            embedding = types.get("embedding", "vector").split("(")[0]
            layout = _Layout(embedding, language, "sparse" in types)
            self._layouts[spec.name] = layout
        return layout

    def _ensure(self, conn: psycopg.Connection, spec: TableSpec, created: set[str]) -> None:
        """Creates ``spec``'s table if need be, in the caller's transaction. Its name goes
        into ``created``; the caller marks it known only once that transaction has
        committed (a rolled-back first write leaves no table behind)."""
        if spec.name in self._known or spec.name in created:
            return
        t = sql.Identifier(spec.name)
        half = self.halfvec and MAX_INDEXED_DIMENSIONS < spec.dimension <= MAX_INDEXED_HALFVEC_DIMENSIONS
        kind = "halfvec" if half else "vector"
        conn.execute(
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {t} (
                    chunk_id text PRIMARY KEY,
                    doc_id text NOT NULL,
                    doc_version bigint NOT NULL,
                    chunk_index integer NOT NULL,
                    page integer,
                    char_start integer NOT NULL,
                    char_end integer NOT NULL,
                    time_start_ms bigint,
                    time_end_ms bigint,
                    text text NOT NULL,
                    metadata jsonb NOT NULL,
                    embedded_at timestamptz NOT NULL,
                    embedding {kind}({d}) NOT NULL
                )"""
            ).format(t=t, kind=sql.SQL(kind), d=sql.Literal(spec.dimension))
        )
        # Tables from before v1.5 of the schemas lack the time columns.
        conn.execute(
            sql.SQL(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS time_start_ms bigint, "
                "ADD COLUMN IF NOT EXISTS time_end_ms bigint"
            ).format(t=t)
        )
        conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (doc_id)").format(
                i=sql.Identifier(spec.name + "_doc"), t=t
            )
        )
        # The column's type as it is (a table made before halfvec keeps its vector).
        self._layouts.pop(spec.name, None)
        layout = self._layout(conn, spec)
        indexed = spec.dimension <= (
            MAX_INDEXED_HALFVEC_DIMENSIONS if layout.embedding == "halfvec" else MAX_INDEXED_DIMENSIONS
        )
        if indexed:
            conn.execute(
                sql.SQL(
                    "CREATE INDEX IF NOT EXISTS {i} ON {t} USING hnsw (embedding {ops}) "
                    "WITH (m = {m}, ef_construction = {ef})"
                ).format(
                    i=sql.Identifier(spec.name + "_hnsw"),
                    t=t,
                    ops=sql.SQL(f"{layout.embedding}_cosine_ops"),
                    m=sql.Literal(HNSW_M),
                    ef=sql.Literal(HNSW_EF_CONSTRUCTION),
                )
            )
        else:
            log.warning(
                "%s: %d dimensions is over pgvector's index limit of %d%s: searches are exact scans "
                "(embed with --truncate-dim %d or less for an index)",
                spec.name,
                spec.dimension,
                MAX_INDEXED_HALFVEC_DIMENSIONS if self.halfvec else MAX_INDEXED_DIMENSIONS,
                " (halfvec)" if self.halfvec else " (pgvector before 0.7 has no halfvec)",
                MAX_INDEXED_HALFVEC_DIMENSIONS if self.halfvec else MAX_INDEXED_DIMENSIONS,
            )
        language = layout.language or self.text_language
        if layout.language is None:
            # Tables from before the text signal get it (PostgreSQL rewrites the table once).
            conn.execute(
                sql.SQL(
                    "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS text_tsv tsvector "
                    "GENERATED ALWAYS AS (to_tsvector({lang}::regconfig, text)) STORED"
                ).format(t=t, lang=sql.Literal(language))
            )
        conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} USING gin (text_tsv)").format(
                i=sql.Identifier(spec.name + "_text"), t=t
            )
        )
        if spec.sparse is not None and not self.sparsevec:
            log.warning(
                "%s: pgvector %s has no sparsevec (0.7 and later): the sparse vectors of %s are not "
                "stored, and search --mode sparse is unavailable on this table",
                spec.name,
                ".".join(map(str, self.pgvector)),
                spec.sparse.model_id,
            )
        elif spec.sparse is not None:
            conn.execute(
                sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS sparse sparsevec({d})").format(
                    t=t, d=sql.Literal(spec.sparse.dimension)
                )
            )
            conn.execute(
                sql.SQL(
                    "CREATE INDEX IF NOT EXISTS {i} ON {t} USING hnsw (sparse sparsevec_ip_ops) "
                    "WITH (m = {m}, ef_construction = {ef})"
                ).format(
                    i=sql.Identifier(spec.name + "_sparse"),
                    t=t,
                    m=sql.Literal(HNSW_M),
                    ef=sql.Literal(HNSW_EF_CONSTRUCTION),
                )
            )
        lineage = spec.lineage()
        conn.execute(
            """INSERT INTO embedstream_tables
                   (name, model_id, model_revision, dimension, dtype, prompt_name, indexed,
                    sparse_model_id, sparse_model_revision, sparse_dtype, sparse_dimension, text_language)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (name) DO UPDATE SET text_language = coalesce(
                   embedstream_tables.text_language, EXCLUDED.text_language)""",
            (
                spec.name,
                lineage["model_id"],
                lineage["model_revision"],
                spec.dimension,
                spec.dtype,
                spec.prompt_name,
                indexed,
                lineage["sparse_model_id"],
                lineage["sparse_model_revision"],
                lineage["sparse_dtype"],
                lineage["sparse_dimension"],
                language,
            ),
        )
        self._layouts.pop(spec.name, None)
        created.add(spec.name)

    # --- sink --------------------------------------------------------------------------------

    def states(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], DocState]:
        if not keys:
            return {}
        names, doc_ids = zip(*sorted(keys))

        def read(conn):
            return conn.execute(
                """SELECT d.table_name, d.doc_id, d.topic, d."partition", d."offset", d.deleted
                   FROM embedstream_documents d
                   JOIN unnest(%s::text[], %s::text[]) AS k(table_name, doc_id)
                     ON d.table_name = k.table_name AND d.doc_id = k.doc_id""",
                (list(names), list(doc_ids)),
            ).fetchall()

        return {(r[0], r[1]): DocState(Version(r[2], r[3], r[4]), r[5]) for r in self._run(read)}

    def chunk_ids(self, spec: TableSpec, doc_ids: list[str]) -> dict[str, set[str]]:
        if spec.name not in {t.name for t in self.tables()}:
            return {}
        query = sql.SQL("SELECT doc_id, chunk_id FROM {t} WHERE doc_id = ANY(%s)").format(
            t=sql.Identifier(spec.name)
        )
        found: dict[str, set[str]] = {}
        for doc_id, chunk_id in self._run(lambda conn: conn.execute(query, (doc_ids,)).fetchall()):
            found.setdefault(doc_id, set()).add(chunk_id)
        return found

    def write(self, changes: list[TableChanges]) -> None:
        created: set[str] = set()
        self._run(lambda conn: [self._write_table(conn, ch, created) for ch in changes])
        # Only now, after the commit: a batch the server refused rolled the tables back.
        self._known |= created
        self._avgdl.clear()  # the chunks' lengths changed

    def _write_table(self, conn: psycopg.Connection, ch: TableChanges, created: set[str]) -> None:
        spec = ch.spec
        self._ensure(conn, spec, created)
        t = sql.Identifier(spec.name)
        sparse = self._layout(conn, spec).sparse and spec.sparse is not None
        upsert = sql.SQL(_UPSERT).format(
            t=t,
            sparse_column=sql.SQL(", sparse" if sparse else ""),
            sparse_value=sql.SQL(", %s::sparsevec" if sparse else ""),
            sparse_set=sql.SQL(", sparse = EXCLUDED.sparse" if sparse else ""),
        )

        def params(row: dict[str, Any]) -> tuple:
            if not sparse:
                return _params(row)
            vector = row.get("sparse")
            literal = (
                None
                if vector is None
                else sparse_literal(vector["indices"], vector["values"], spec.sparse.dimension)
            )
            return (*_params(row), literal)

        with conn.cursor() as cur:
            if ch.before:
                cur.executemany(upsert, map(params, ch.before.values()))
            self._apply_finals(cur, t, ch)
            if ch.after:
                # A generator: executemany pipelines each row as it is made, so the
                # client's work overlaps the server's index inserts.
                cur.executemany(upsert, map(params, ch.after.values()))
            if ch.states:
                cur.executemany(
                    """INSERT INTO embedstream_documents
                           (table_name, doc_id, topic, "partition", "offset", deleted)
                       VALUES (%s, %s, %s, %s, %s, %s)
                       ON CONFLICT (table_name, doc_id) DO UPDATE SET topic = EXCLUDED.topic,
                           "partition" = EXCLUDED."partition", "offset" = EXCLUDED."offset",
                           deleted = EXCLUDED.deleted""",
                    [
                        (spec.name, d, s.version.topic, s.version.partition, s.version.offset, s.deleted)
                        for d, s in ch.states.items()
                    ],
                )

    @staticmethod
    def _apply_finals(cur: psycopg.Cursor, t: sql.Identifier, ch: TableChanges) -> None:
        """Deletes, then manifests, each as one statement for the whole batch."""
        deleted = [d for d, f in ch.finals.items() if f.chunks is None]
        manifests = {d: f for d, f in ch.finals.items() if f.chunks is not None}
        if deleted:
            cur.execute(sql.SQL("DELETE FROM {t} WHERE doc_id = ANY(%s)").format(t=t), (deleted,))
        if not manifests:
            return
        entries = [(d, f, c) for d, f in manifests.items() for c in f.chunks]
        listed = ([d for d, _, _ in entries], [c["chunk_id"] for _, _, c in entries])
        # The chunks a manifest no longer lists, but for rows of later versions
        # (Final.drops): NULL keeps none.
        keep_above = [f.version.offset if f.keeps_newer else None for f in manifests.values()]
        cur.execute(
            sql.SQL(
                """DELETE FROM {t} AS c
                   USING unnest(%s::text[], %s::bigint[]) AS d(doc_id, keep_above)
                   WHERE c.doc_id = d.doc_id
                     AND (d.keep_above IS NULL OR c.doc_version <= d.keep_above)
                     AND NOT EXISTS (
                       SELECT 1 FROM unnest(%s::text[], %s::text[]) AS m(doc_id, chunk_id)
                       WHERE m.doc_id = c.doc_id AND m.chunk_id = c.chunk_id)"""
            ).format(t=t),
            (list(manifests), keep_above, *listed),
        )
        # Positions and metadata from the manifest, written only where they differ, so
        # an unchanged row keeps its tuple (no index entries rewritten).
        cur.execute(
            sql.SQL(
                """UPDATE {t} AS c SET doc_version = m.doc_version, chunk_index = m.chunk_index,
                       page = m.page, char_start = m.char_start, char_end = m.char_end,
                       time_start_ms = m.time_start_ms, time_end_ms = m.time_end_ms, metadata = m.metadata
                   FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::int[], %s::int[], %s::int[],
                               %s::int[], %s::bigint[], %s::bigint[], %s::jsonb[])
                        AS m(doc_id, chunk_id, doc_version, chunk_index, page, char_start, char_end,
                             time_start_ms, time_end_ms, metadata)
                   WHERE c.chunk_id = m.chunk_id AND c.doc_id = m.doc_id
                     AND (c.doc_version, c.chunk_index, c.page, c.char_start, c.char_end,
                          c.time_start_ms, c.time_end_ms, c.metadata)
                         IS DISTINCT FROM
                         (m.doc_version, m.chunk_index, m.page, m.char_start, m.char_end,
                          m.time_start_ms, m.time_end_ms, m.metadata)"""
            ).format(t=t),
            (
                *listed,
                [f.version.offset for _, f, _ in entries],
                [c["chunk_index"] for _, _, c in entries],
                [c.get("page") for _, _, c in entries],
                [c["char_start"] for _, _, c in entries],
                [c["char_end"] for _, _, c in entries],
                [c.get("time_start_ms") for _, _, c in entries],
                [c.get("time_end_ms") for _, _, c in entries],
                [_json(f.metadata) for _, f, _ in entries],
            ),
        )

    # --- reading -----------------------------------------------------------------------------

    def rows(self, spec: TableSpec) -> list[dict[str, Any]]:
        # Every column as a row holds it: embedded_at in epoch ms, the vector as floats.
        read_as = {
            "embedded_at": sql.SQL("(extract(epoch FROM embedded_at) * 1000)::bigint"),
            "embedding": sql.SQL("embedding::vector::real[]"),
        }

        def read(conn):
            names = list(COLUMNS)
            columns = [read_as.get(c, sql.Identifier(c)) for c in COLUMNS]
            if spec.sparse is not None and self._layout(conn, spec).sparse:
                names.append("sparse")
                columns.append(sql.SQL("sparse::text"))
            query = sql.SQL("SELECT {c} FROM {t}").format(
                c=sql.SQL(", ").join(columns), t=sql.Identifier(spec.name)
            )
            return [dict(zip(names, r)) for r in conn.execute(query).fetchall()]

        rows = self._run(read)
        for row in rows:
            row["embedding"] = list(row["embedding"])
            if "sparse" in row:
                row["sparse"] = _parse_sparse(row["sparse"])
        return rows

    def modes(self, spec: TableSpec) -> dict[str, Optional[str]]:
        layout = self._run(lambda conn: self._layout(conn, spec))
        sparse = None
        if spec.sparse is None:
            sparse = "its chunks have no sparse vectors (the flow ran without --sparse-model)"
        elif not layout.sparse:
            sparse = (
                f"pgvector {'.'.join(map(str, self.pgvector))} has no sparsevec (0.7 and later), "
                "so the sink stored no sparse vectors"
            )
        text = None if layout.language else "the table has no full-text column yet (the sink adds it)"
        return {"dense": None, "sparse": sparse, "text": text}

    def search(self, spec: TableSpec, vector: list[float], k: int, filters: dict[str, str]) -> list[Hit]:
        def run(conn):
            kind = sql.SQL(self._layout(conn, spec).embedding)
            literal = _vector(vector)
            score = sql.SQL("1 - (embedding <=> %s::{kind})").format(kind=kind)
            order = sql.SQL("embedding <=> %s::{kind}").format(kind=kind)
            return self._nearest(conn, spec, score, [literal], order, [literal], k, filters)

        return self._run(run)

    def search_sparse(
        self, spec: TableSpec, indices: list[int], values: list[float], k: int, filters: dict[str, str]
    ) -> list[Hit]:
        def run(conn):
            if spec.sparse is None or not self._layout(conn, spec).sparse:
                return []
            literal = sparse_literal(list(indices), list(values), spec.sparse.dimension)
            # <#> is the negative inner product (ascending is best first).
            score = sql.SQL("-(sparse <#> %s::sparsevec)")
            order = sql.SQL("sparse <#> %s::sparsevec")
            hits = self._nearest(
                conn, spec, score, [literal], order, [literal], k, filters, "sparse IS NOT NULL"
            )
            # A chunk that shares no term with the query is no match (as in text search).
            return [h for h in hits if h.score > 0]

        return self._run(run)

    def search_text(self, spec: TableSpec, query: str, k: int, filters: dict[str, str]) -> list[Hit]:
        def run(conn):
            language = self._layout(conn, spec).language
            if language is None:
                return []
            terms = self._term_weights(conn, spec, language, query)
            if not terms:
                return []
            # Chunks with any of the terms, scored by BM25 (Okapi, k1 1.2, b 0.75, as
            # LanceDB's index): per term, its inverse document frequency times its
            # saturated frequency in the chunk, normalised by the chunk's length against
            # the table's average. Frequencies and lengths are the tsvector's positions.
            # PostgreSQL's ts_rank has neither document frequencies nor this length norm.
            lexemes = [lexeme for lexeme, _ in terms]
            idfs = [idf for _, idf in terms]
            avgdl = self._average_length(conn, spec)
            score = sql.SQL(
                """(SELECT coalesce(sum(w.idf * u.tf * {k1_1}
                                        / (u.tf + {k1} * (1 - {b} + {b} * d.dl / %s))), 0)
                    FROM (SELECT sum(greatest(cardinality(positions), 1)) AS dl
                          FROM unnest(text_tsv)) d,
                         (SELECT lexeme, greatest(cardinality(positions), 1) AS tf
                          FROM unnest(text_tsv)) u
                    JOIN unnest(%s::text[], %s::float8[]) AS w(lexeme, idf) ON u.lexeme = w.lexeme)"""
            ).format(k1_1=sql.Literal(BM25_K1 + 1), k1=sql.Literal(BM25_K1), b=sql.Literal(BM25_B))
            where = sql.SQL("text_tsv @@ %s::tsquery")
            anyone = " | ".join(tsquery_literal(x) for x in lexemes)
            # By the output column, so that each row's score is computed once.
            order = sql.SQL("score DESC, chunk_id")
            return self._nearest(
                conn, spec, score, [avgdl, lexemes, idfs], order, [], k, filters, where, [anyone], ann=False
            )

        return self._run(run)

    def _average_length(self, conn: psycopg.Connection, spec: TableSpec) -> float:
        """The mean length, in lexeme positions, of a sample of :data:`AVGDL_SAMPLE`
        chunks, whichever the scan returns first (BM25's avgdl; stop words are not
        counted), read again after :data:`AVGDL_KEEP_S` seconds."""
        kept = self._avgdl.get(spec.name)
        if kept is not None and time.monotonic() - kept[1] < AVGDL_KEEP_S:
            return kept[0]
        [avgdl] = conn.execute(
            sql.SQL(
                """SELECT avg((SELECT sum(greatest(cardinality(positions), 1)) FROM unnest(text_tsv)))
                   FROM (SELECT text_tsv FROM {t} LIMIT {n}) s"""
            ).format(t=sql.Identifier(spec.name), n=sql.Literal(AVGDL_SAMPLE))
        ).fetchone()
        average = float(avgdl or 0.0) or 1.0
        self._avgdl[spec.name] = (average, time.monotonic())
        return average

    def _term_weights(
        self, conn: psycopg.Connection, spec: TableSpec, language: str, query: str
    ) -> list[tuple[str, float]]:
        """The query's terms (lexemes) with their inverse document frequency in the table,
        ``ln(1 + (N - df + 0.5) / (df + 0.5))``. A term's df is counted up to
        :data:`DF_COUNT_CAP` rows (through the GIN index); above that its weight is
        already small."""
        lexemes = [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT lexeme FROM unnest(to_tsvector(%s::regconfig, %s)) ORDER BY 1",
                (language, query),
            ).fetchall()
        ]
        if not lexemes:
            return []
        literals = [tsquery_literal(x) for x in lexemes]
        t = sql.Identifier(spec.name)
        # The planner's estimate of the rows now (its tuple density times the table's
        # pages); before the first ANALYZE there is none, and the table is counted.
        [rows] = conn.execute(
            """SELECT CASE WHEN relpages > 0 AND reltuples > 0
                           THEN reltuples / relpages
                                * (pg_relation_size(oid) / current_setting('block_size')::int)
                           ELSE -1 END
               FROM pg_class WHERE oid = to_regclass(%s)""",
            (t.as_string(conn),),
        ).fetchone()
        if rows < 0:
            [rows] = conn.execute(
                sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {t} LIMIT {cap}) s").format(
                    t=t, cap=sql.Literal(ROW_COUNT_CAP)
                )
            ).fetchone()
        counts = conn.execute(
            sql.SQL(
                """SELECT (SELECT count(*) FROM (
                             SELECT 1 FROM {t} WHERE text_tsv @@ q::tsquery LIMIT {cap}) s)
                   FROM unnest(%s::text[]) WITH ORDINALITY AS u(q, n) ORDER BY n"""
            ).format(t=t, cap=sql.Literal(DF_COUNT_CAP)),
            (literals,),
        ).fetchall()
        dfs = [int(c[0]) for c in counts]
        total = max(int(rows), max(dfs), 1)
        return [
            (lexeme, math.log(1 + (total - df + 0.5) / (df + 0.5)))
            for lexeme, df in zip(lexemes, dfs)
            if df > 0
        ]

    def _nearest(
        self,
        conn: psycopg.Connection,
        spec: TableSpec,
        score: sql.Composable,
        score_params: list[Any],
        order: sql.Composable,
        order_params: list[Any],
        k: int,
        filters: dict[str, str],
        condition: Any = None,
        condition_params: Optional[list[Any]] = None,
        ann: bool = True,
    ) -> list[Hit]:
        """The ``k`` rows first by ``order`` among those that pass ``condition`` and
        ``filters``, with their ``score``."""
        clauses: list[sql.Composable] = []
        params: list[Any] = list(score_params)
        if condition is not None:
            clauses.append(sql.SQL(condition) if isinstance(condition, str) else condition)
            params += condition_params or []
        for key, value in filters.items():
            clauses.append(sql.SQL("metadata ->> %s = %s"))
            params += [_strip_nul(key), _strip_nul(value)]  # as the metadata was stored
        params += [*order_params, k]
        where = sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("true")
        query = sql.SQL(
            """SELECT doc_id, page, chunk_index, text, metadata, {score} AS score,
                      time_start_ms, time_end_ms, chunk_id
               FROM {t} WHERE {where} ORDER BY {order} LIMIT %s"""
        ).format(score=score, t=sql.Identifier(spec.name), where=where, order=order)
        if ann:
            # HNSW returns at most ef_search candidates, filtered afterwards: ask for
            # enough that k hits survive a filter (pgvector's default is 40).
            ef_search = min(max(100, 4 * k), 1000)
            conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef_search)))
            if self.pgvector >= ITERATIVE_SCAN_SINCE:
                # Past the candidates, the index scan goes on until k rows pass the filter.
                conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
        rows = conn.execute(query, params).fetchall()
        return [
            Hit(i, float(r[5]), r[0], r[1], r[2], r[3], r[4], r[6], r[7], r[8]) for i, r in enumerate(rows, 1)
        ]

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


def tsquery_literal(lexeme: str) -> str:
    """``lexeme`` as a tsquery operand, taken as it is (no normalisation again): quoted,
    with quotes and backslashes doubled."""
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


def _params(r: dict[str, Any]) -> tuple:
    return (
        r["chunk_id"],
        r["doc_id"],
        r["doc_version"],
        r["chunk_index"],
        r["page"],
        r["char_start"],
        r["char_end"],
        r.get("time_start_ms"),
        r.get("time_end_ms"),
        _strip_nul(r["text"]),
        _json(r["metadata"]),
        r["embedded_at"],
        _Embedding(r["embedding"]),
    )


def _parse_sparse(text: Optional[str]) -> Optional[dict[str, list]]:
    """pgvector's text form of a sparse vector as ``indices`` (0-based) and ``values``."""
    if text is None:
        return None
    body = text[1 : text.index("}")]
    pairs = [p.split(":") for p in body.split(",") if p]
    return {"indices": [int(i) - 1 for i, _ in pairs], "values": [float(v) for _, v in pairs]}


def _strip_nul(value: Any) -> Any:
    """``value`` without U+0000 in any string (PostgreSQL text and jsonb refuse it)."""
    if isinstance(value, str):
        return value.replace("\x00", "") if "\x00" in value else value
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    return value


def _json(metadata: Any) -> str:
    return json.dumps(_strip_nul(metadata))
