"""LanceDB, embedded in a directory: the default store.

A batch is one ``merge_insert`` per chunk table (upserts by ``chunk_id``, and through
``when_not_matched_by_source_delete`` the removal of the chunks its manifests no longer
list and of deleted documents) in one commit, then one ``merge_insert`` of the document
states. A kill between the two leaves states behind the rows; the sink's offsets are
committed after both, so a restart replays the batch and converges.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta
from typing import Any

import lancedb
import pyarrow as pa
from lancedb.index import IvfHnswSq

from flows.stores import (
    DocState,
    Hit,
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
    ]
)
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


def chunk_schema(dimension: int) -> pa.Schema:
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


class LanceStore:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.url = f"lancedb:{path}"
        self.db = lancedb.connect(self.path)
        self._open: dict[str, Any] = {}
        self._indexed: set[str] = set()
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

    def tables(self) -> list[TableSpec]:
        catalog = self._table(CATALOG)
        if catalog is None:
            return []
        specs = []
        for row in catalog.to_arrow().to_pylist():
            spec = TableSpec(
                row["model_id"], row["model_revision"], row["dimension"], row["dtype"], row["prompt_name"]
            )
            if spec.name in self._names():
                specs.append(spec)
        return specs

    def _ensure(self, spec: TableSpec):
        table = self._table(spec.name)
        if table is not None and spec.name not in self._current:
            # Tables from before v1.5 of the schemas lack the time columns.
            missing = [c for c in ("time_start_ms", "time_end_ms") if c not in table.schema.names]
            if missing:
                table.add_columns({c: "CAST(NULL AS BIGINT)" for c in missing})
                log.info("%s: added columns %s", spec.name, ", ".join(missing))
            self._current.add(spec.name)
        if table is None:
            table = self._table(spec.name, chunk_schema(spec.dimension))
            catalog = self._table(CATALOG, CATALOG_SCHEMA)
            catalog.merge_insert("name").when_matched_update_all().when_not_matched_insert_all().execute(
                pa.Table.from_pylist([spec.lineage()], schema=CATALOG_SCHEMA)
            )
            log.info("created LanceDB table %s for %s (dim %d)", spec.name, spec.model_id, spec.dimension)
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
        data = pa.Table.from_pylist(
            [_to_lance(r) for r in source.values()], schema=chunk_schema(ch.spec.dimension)
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

    def search(self, spec: TableSpec, vector: list[float], k: int, filters: dict[str, str]) -> list[Hit]:
        table = self._table(spec.name)
        query = table.search(vector, vector_column_name="embedding").metric("cosine")
        if filters:
            # Metadata is canonical JSON text: a key and value pair matches as a member.
            clauses = []
            for key, value in filters.items():
                member = metadata_json({key: value})[1:-1]
                escaped = (
                    member.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("'", "''")
                )
                clauses.append(
                    "("
                    + " OR ".join(f"metadata LIKE '{a}{escaped}{b}' ESCAPE '\\'" for a, b in _AROUND)
                    + ")"
                )
            query = query.where(" AND ".join(clauses), prefilter=True)
        hits = []
        for rank, r in enumerate(query.limit(k).to_list(), 1):
            hits.append(
                Hit(
                    rank,
                    1.0 - float(r["_distance"]),
                    r["doc_id"],
                    r["page"],
                    r["chunk_index"],
                    r["text"],
                    json.loads(r["metadata"]),
                    r.get("time_start_ms"),
                    r.get("time_end_ms"),
                )
            )
        return hits

    def close(self) -> None:
        # A run that ends (--until-end, SIGTERM) leaves its tables compacted and indexed.
        if self._wrote:
            for name, table in self._open.items():
                if name.startswith("chunks_") or name == DOCUMENTS:
                    table.optimize(cleanup_older_than=KEEP_VERSIONS)
        self._open.clear()


#: A member of a canonical JSON object sits after ``{`` or ``,`` and before ``,`` or ``}``.
_AROUND = [("%{", ",%"), ("%{", "}"), ("%,", ",%"), ("%,", "}")]


def _to_lance(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "metadata": metadata_json(row["metadata"])}


def _from_lance(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["metadata"] = json.loads(row["metadata"])
    at = row["embedded_at"]
    out["embedded_at"] = int(at.timestamp() * 1000) if hasattr(at, "timestamp") else at
    out["embedding"] = list(row["embedding"])
    return out
