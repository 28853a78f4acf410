"""PostgreSQL with pgvector: one transaction per batch.

Each model's chunks live in their own table with a ``vector(d)`` column and an HNSW
cosine index (pgvector cannot index more than 2,000 dimensions: above that the table
is searched exactly, and the sink says so once). ``embedstream_tables`` records each
table's model lineage; ``embedstream_documents`` the version applied per document.

PostgreSQL's ``text`` and ``jsonb`` cannot hold the NUL character (U+0000), which a
chunk's text or a metadata string may carry (an extractor passes it through; LanceDB
keeps it). This store writes such a chunk without its NULs: they are removed from the
text and from every string in the metadata, keys included, so ``"a\x00b"`` is stored
as ``"ab"`` and a metadata filter matches the value without them. Identifiers (doc and
chunk ids) are kept as they are; one that holds a NUL is refused as data.

pgvector 0.6 to 0.8 serve; the store reads the server's version when it connects
(``pgvector``, and a log line). From 0.8 on, searches scan the HNSW index iteratively
(``hnsw.iterative_scan``) until k rows pass the metadata filter. Before 0.8 the index
hands over its ``hnsw.ef_search`` nearest candidates (set to 4 k, 100 to 1,000) and the
filter applies to those alone, so a filter that few rows match can return fewer than k
hits; everything else works the same on every version.
"""

from __future__ import annotations

import json
import logging
import struct
from typing import Any

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
#: The first pgvector with iterative index scans.
ITERATIVE_SCAN_SINCE = (0, 8, 0)

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
                 time_start_ms, time_end_ms, text, metadata, embedded_at, embedding)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, to_timestamp(%s / 1000.0), %b)
ON CONFLICT (chunk_id) DO UPDATE SET
    doc_id = EXCLUDED.doc_id, doc_version = EXCLUDED.doc_version,
    chunk_index = EXCLUDED.chunk_index, page = EXCLUDED.page,
    char_start = EXCLUDED.char_start, char_end = EXCLUDED.char_end,
    time_start_ms = EXCLUDED.time_start_ms, time_end_ms = EXCLUDED.time_end_ms, text = EXCLUDED.text,
    metadata = EXCLUDED.metadata, embedded_at = EXCLUDED.embedded_at, embedding = EXCLUDED.embedding
"""


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
    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.Connection | None = None
        self._known: set[str] = set()
        #: The server's pgvector, read at each connect.
        self.pgvector: tuple[int, ...] = ()

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
            self._known.clear()
        return self.conn

    def _detect_pgvector(self, conn: psycopg.Connection) -> None:
        [text] = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        version = pgvector_version(text)
        if version != self.pgvector:
            log.info(
                "PostgreSQL %s with pgvector %s%s",
                conn.info.parameter_status("server_version"),
                text,
                ""
                if version >= ITERATIVE_SCAN_SINCE
                else " (no iterative index scans: a filtered search can return fewer than k hits)",
            )
        self.pgvector = version

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
        rows = self._run(
            lambda c: c.execute(
                "SELECT model_id, model_revision, dimension, dtype, prompt_name "
                "FROM embedstream_tables ORDER BY name"
            ).fetchall()
        )
        return [TableSpec(*r) for r in rows]

    def _ensure(self, conn: psycopg.Connection, spec: TableSpec, created: set[str]) -> None:
        """Creates ``spec``'s table if need be, in the caller's transaction. Its name goes
        into ``created``; the caller marks it known only once that transaction has
        committed (a rolled-back first write leaves no table behind)."""
        if spec.name in self._known or spec.name in created:
            return
        t = sql.Identifier(spec.name)
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
                    embedding vector({d}) NOT NULL
                )"""
            ).format(t=t, d=sql.Literal(spec.dimension))
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
        indexed = spec.dimension <= MAX_INDEXED_DIMENSIONS
        if indexed:
            conn.execute(
                sql.SQL(
                    "CREATE INDEX IF NOT EXISTS {i} ON {t} USING hnsw (embedding vector_cosine_ops) "
                    "WITH (m = {m}, ef_construction = {ef})"
                ).format(
                    i=sql.Identifier(spec.name + "_hnsw"),
                    t=t,
                    m=sql.Literal(HNSW_M),
                    ef=sql.Literal(HNSW_EF_CONSTRUCTION),
                )
            )
        else:
            log.warning(
                "%s: %d dimensions is over pgvector's index limit of %d: searches are exact scans",
                spec.name,
                spec.dimension,
                MAX_INDEXED_DIMENSIONS,
            )
        lineage = spec.lineage()
        conn.execute(
            """INSERT INTO embedstream_tables
                   (name, model_id, model_revision, dimension, dtype, prompt_name, indexed)
               VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING""",
            (
                spec.name,
                lineage["model_id"],
                lineage["model_revision"],
                spec.dimension,
                spec.dtype,
                spec.prompt_name,
                indexed,
            ),
        )
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

    def _write_table(self, conn: psycopg.Connection, ch: TableChanges, created: set[str]) -> None:
        spec = ch.spec
        self._ensure(conn, spec, created)
        t = sql.Identifier(spec.name)
        upsert = sql.SQL(_UPSERT).format(t=t)
        with conn.cursor() as cur:
            if ch.before:
                cur.executemany(upsert, map(_params, ch.before.values()))
            self._apply_finals(cur, t, ch)
            if ch.after:
                # A generator: executemany pipelines each row as it is made, so the
                # client's work overlaps the server's index inserts.
                cur.executemany(upsert, map(_params, ch.after.values()))
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
            "embedding": sql.SQL("embedding::real[]"),
        }
        columns = sql.SQL(", ").join(read_as.get(c, sql.Identifier(c)) for c in COLUMNS)
        query = sql.SQL("SELECT {c} FROM {t}").format(c=columns, t=sql.Identifier(spec.name))
        rows = [dict(zip(COLUMNS, r)) for r in self._run(lambda conn: conn.execute(query).fetchall())]
        for row in rows:
            row["embedding"] = list(row["embedding"])
        return rows

    def search(self, spec: TableSpec, vector: list[float], k: int, filters: dict[str, str]) -> list[Hit]:
        where = (
            sql.SQL(" AND ").join(sql.SQL("metadata ->> %s = %s") for _ in filters)
            if filters
            else sql.SQL("true")
        )
        params: list[Any] = [_vector(vector)]
        for key, value in filters.items():
            params += [_strip_nul(key), _strip_nul(value)]  # as the metadata was stored
        params += [_vector(vector), k]
        query = sql.SQL(
            """SELECT doc_id, page, chunk_index, text, metadata, 1 - (embedding <=> %s::vector) AS score,
                      time_start_ms, time_end_ms
               FROM {t} WHERE {where} ORDER BY embedding <=> %s::vector LIMIT %s"""
        ).format(t=sql.Identifier(spec.name), where=where)

        def run(conn):
            # HNSW returns at most ef_search candidates, filtered afterwards: ask for
            # enough that k hits survive a filter (pgvector's default is 40).
            ef_search = min(max(100, 4 * k), 1000)
            conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef_search)))
            if self.pgvector >= ITERATIVE_SCAN_SINCE:
                # Past the candidates, the index scan goes on until k rows pass the filter.
                conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            return conn.execute(query, params).fetchall()

        rows = self._run(run)
        return [Hit(i, float(r[5]), r[0], r[1], r[2], r[3], r[4], r[6], r[7]) for i, r in enumerate(rows, 1)]

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


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
