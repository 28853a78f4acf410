"""Vector stores that ``embedstream sink`` keeps in step with the vector topic, and that
``embedstream search`` queries: PostgreSQL with pgvector, and LanceDB embedded.

A store holds one table of chunks per model (model id, revision, dimension), a catalog
of those tables with their model lineage, and per table and document the version last
applied (so older records and manifests are ignored, also after a delete). What a batch
of the topic does to a store is worked out here, once for both stores
(:func:`plan`); each store only writes the result, atomically where it can.

A manifest is applied only once the store has every chunk it lists. One that lists a
chunk whose record never arrived (the sink dead-lettered it, or it was never read) is
:class:`Incomplete`: the document keeps its previous version and the sink dead-letters
the manifest, naming the chunks; a redrive of the missing records and the manifest
completes it. Never silently: in incremental mode the worker does not send an unchanged
chunk again, so a manifest applied without it would leave the hole for good.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Union

#: Columns of a chunk table, in order (``embedding`` last).
COLUMNS = (
    "chunk_id",
    "doc_id",
    "doc_version",
    "chunk_index",
    "page",
    "char_start",
    "char_end",
    "time_start_ms",
    "time_end_ms",
    "text",
    "metadata",
    "embedded_at",
    "embedding",
)


class StoreError(RuntimeError):
    """The store refused or lost a write; the sink retries the batch."""


class StoreConfigError(ValueError):
    """A store URL or table that cannot be used as given (a user error: no retry)."""


@dataclass(frozen=True)
class Version:
    """Where the event of a document version was read. Offsets order the versions of one
    document within its input partition; across partitions (after the input topic was
    repartitioned) the later arrival wins."""

    topic: str
    partition: int
    offset: int

    @classmethod
    def of(cls, record: dict[str, Any]) -> Version:
        v = record["doc_version"]
        return cls(v["topic"], int(v["partition"]), int(v["offset"]))

    def older_than(self, other: Optional[Version]) -> bool:
        return (
            other is not None
            and (self.topic, self.partition) == (other.topic, other.partition)
            and self.offset < other.offset
        )


@dataclass(frozen=True)
class SparseModel:
    """The sparse model of a table's chunks (``VectorRecord.sparse_model``)."""

    model_id: str
    model_revision: str
    dtype: str
    #: Its vocabulary size: every token id is below it.
    dimension: int

    @classmethod
    def of(cls, record: Optional[dict[str, Any]]) -> Optional[SparseModel]:
        if not record:
            return None
        return cls(record["model_id"], record["model_revision"], record["dtype"], int(record["dimension"]))


@dataclass(frozen=True)
class TableSpec:
    """One table per model (and sparse model, where one ran): its lineage is what search
    needs to encode a query."""

    model_id: str
    model_revision: str
    dimension: int
    dtype: str = "f32"
    prompt_name: Optional[str] = None
    sparse: Optional[SparseModel] = None

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "_", self.model_id.rsplit("/", 1)[-1].lower()).strip("_")[:40]
        key = f"{self.model_id}\x00{self.model_revision}\x00{self.dimension}"
        if self.sparse is not None:
            # Sparse vectors need columns of their own: another table (names without one
            # stay what they were before sparse models).
            s = self.sparse
            key += f"\x00sparse\x00{s.model_id}\x00{s.model_revision}\x00{s.dimension}"
        digest = hashlib.sha256(key.encode())
        return f"chunks_{slug or 'model'}_{self.dimension}_{digest.hexdigest()[:8]}"

    @classmethod
    def of(cls, record: dict[str, Any]) -> TableSpec:
        dimension = record.get("dimension") or len(record.get("embedding") or ())
        return cls(
            record["model_id"],
            record["model_revision"],
            int(dimension),
            record["dtype"],
            record.get("prompt_name"),
            SparseModel.of(record.get("sparse_model")),
        )

    def lineage(self) -> dict[str, Any]:
        s = self.sparse
        return {
            "name": self.name,
            "model_id": self.model_id,
            "model_revision": self.model_revision,
            "dimension": self.dimension,
            "dtype": self.dtype,
            "prompt_name": self.prompt_name,
            "sparse_model_id": s.model_id if s else None,
            "sparse_model_revision": s.model_revision if s else None,
            "sparse_dtype": s.dtype if s else None,
            "sparse_dimension": s.dimension if s else None,
        }

    @classmethod
    def from_lineage(cls, row: dict[str, Any]) -> TableSpec:
        """The spec a catalog row (:meth:`lineage`) describes."""
        sparse = None
        if row.get("sparse_model_id"):
            sparse = SparseModel(
                row["sparse_model_id"],
                row["sparse_model_revision"],
                row["sparse_dtype"],
                int(row["sparse_dimension"]),
            )
        return cls(
            row["model_id"],
            row["model_revision"],
            int(row["dimension"]),
            row["dtype"],
            row["prompt_name"],
            sparse,
        )


@dataclass
class DocState:
    version: Version
    deleted: bool = False


@dataclass
class Final:
    """The last manifest (``chunks`` set) or delete (``chunks`` None) of a document in a batch."""

    version: Version
    chunks: Optional[list[dict[str, Any]]] = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: Rows of a later version of the same input partition stay (a manifest governs its
    #: version and older ones): they wait for their own manifest, e.g. when a redrive
    #: applies an older manifest after a newer version's records.
    keeps_newer: bool = True

    def drops(self, row: dict[str, Any]) -> bool:
        """Whether the final removes ``row``, one of its document's rows that it does not list."""
        return not (self.keeps_newer and self.chunks is not None and row["doc_version"] > self.version.offset)


@dataclass
class TableChanges:
    """What one batch does to one table, in the order a store applies it:
    ``before`` rows (versions up to each document's final one), then the ``finals``
    (keep exactly the listed chunks with their positions, or drop the document), then
    ``after`` rows (newer versions whose manifests are still to come), then ``states``."""

    spec: Optional[TableSpec]
    before: dict[str, dict[str, Any]] = field(default_factory=dict)
    finals: dict[str, Final] = field(default_factory=dict)
    after: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: dict[str, DocState] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.before or self.finals or self.after or self.states)


@dataclass(frozen=True)
class RecordOp:
    spec: TableSpec
    version: Version
    row: dict[str, Any]


@dataclass(frozen=True)
class ManifestOp:
    spec: TableSpec
    version: Version
    doc_id: str
    chunks: list[dict[str, Any]]
    metadata: dict[str, str]


@dataclass(frozen=True)
class DeleteOp:
    version: Version
    doc_id: str


Op = Union[RecordOp, ManifestOp, DeleteOp]


@dataclass(frozen=True)
class Incomplete:
    """A manifest left unapplied: the store lacks chunks it lists."""

    op: ManifestOp
    missing: list[str]

    def describe(self, shown: int = 20) -> str:
        o = self.op
        v = o.version
        ids = ", ".join(self.missing[:shown]) + (
            f" and {len(self.missing) - shown} more" if len(self.missing) > shown else ""
        )
        return (
            f"the manifest of {o.doc_id!r} at {v.topic}[{v.partition}]@{v.offset} lists "
            f"{len(self.missing)} chunk(s) the store does not have: {ids}. The document keeps its "
            "previous version; redrive the sink's dead letters (the records come before this "
            "manifest) to complete it"
        )


def row_of(record: dict[str, Any]) -> dict[str, Any]:
    """A VectorRecord as a row of its table (``sparse`` only where a sparse model ran)."""
    row = {
        "chunk_id": record["chunk_id"],
        "doc_id": record["doc_id"],
        "doc_version": int(record["doc_version"]["offset"]),
        "chunk_index": int(record["chunk_index"]),
        "page": record.get("page"),
        "char_start": int(record["char_start"]),
        "char_end": int(record["char_end"]),
        "time_start_ms": record.get("time_start_ms"),
        "time_end_ms": record.get("time_end_ms"),
        "text": record["text"],
        "metadata": dict(record.get("metadata") or {}),
        "embedded_at": int(record["embedded_at"]),
        "embedding": list(record["embedding"]),
    }
    if record.get("sparse_model"):
        sparse = record.get("sparse") or {"indices": [], "values": []}
        row["sparse"] = {"indices": list(sparse["indices"]), "values": list(sparse["values"])}
    return row


def check_sparse(record: dict[str, Any]) -> Optional[str]:
    """Why a VectorRecord's sparse vector cannot be stored (None: it can): token ids
    must ascend, each once, below the vocabulary size, with a finite weight each."""
    sparse, model = record.get("sparse"), record.get("sparse_model")
    if sparse is None:
        return "the record names a sparse model but carries no sparse vector" if model else None
    if not model:
        return "the record carries a sparse vector but no sparse_model"
    indices, values = sparse["indices"], sparse["values"]
    if len(indices) != len(values):
        return f"the sparse vector has {len(indices)} indices and {len(values)} values"
    if any(b <= a for a, b in zip(indices, indices[1:])):
        return "the sparse vector's token ids do not ascend (each once)"
    if indices and (indices[0] < 0 or indices[-1] >= int(model["dimension"])):
        return f"a token id of the sparse vector is outside 0..{int(model['dimension']) - 1}"
    if not all(math.isfinite(v) for v in values):
        return "the sparse vector has a weight that is not a finite number"
    return None


def metadata_json(metadata: dict[str, str]) -> str:
    """One canonical text per metadata map: sorted keys, ASCII, no spaces (LanceDB
    filters match on it)."""
    return json.dumps(metadata, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def plan(
    ops: list[Op],
    tables: list[TableSpec],
    states: dict[tuple[str, str], DocState],
    stored: dict[tuple[str, str], set[str]],
) -> tuple[list[TableChanges], list[Incomplete]]:
    """The changes a batch of operations makes, given the applied states of the
    documents it touches (``(table name, doc_id)`` → state) and the chunk ids the store
    has of each document a manifest names; and the manifests it leaves unapplied. A
    DeleteMarker applies to every table: ``tables`` are those the store has, plus those
    the batch creates."""
    changes: dict[str, TableChanges] = {t.name: TableChanges(t) for t in tables}
    working = dict(states)
    # The chunks each document will have to position: the store's, and the batch's records.
    present = {key: set(ids) for key, ids in stored.items()}
    incomplete: list[Incomplete] = []

    def table(spec: TableSpec) -> TableChanges:
        return changes.setdefault(spec.name, TableChanges(spec))

    for op in ops:
        if isinstance(op, DeleteOp):
            for name, ch in changes.items():
                key = (name, op.doc_id)
                current = working.get(key)
                if op.version.older_than(current.version if current else None):
                    continue
                working[key] = ch.states[op.doc_id] = DocState(op.version, deleted=True)
                ch.finals[op.doc_id] = Final(op.version)
                present[key] = set()
                _drop_rows(ch, op.doc_id)
            continue
        ch = table(op.spec)
        doc_id = op.row["doc_id"] if isinstance(op, RecordOp) else op.doc_id
        key = (op.spec.name, doc_id)
        current = working.get(key)
        if op.version.older_than(current.version if current else None):
            continue
        if isinstance(op, RecordOp):
            ch.after[op.row["chunk_id"]] = op.row
            present.setdefault(key, set()).add(op.row["chunk_id"])
            continue
        have = present.get(key, set())
        missing = [c["chunk_id"] for c in op.chunks if c["chunk_id"] not in have]
        if missing:
            incomplete.append(Incomplete(op, missing))
            continue
        # A manifest: the rows of this version (and older) move before it, and it
        # becomes the document's final state in this batch.
        for chunk_id, row in list(ch.after.items()):
            if row["doc_id"] == doc_id and row["doc_version"] <= op.version.offset:
                ch.before[chunk_id] = ch.after.pop(chunk_id)
        # After a repartitioning of the input, offsets of the old partition say nothing.
        same_partition = current is None or (current.version.topic, current.version.partition) == (
            op.version.topic,
            op.version.partition,
        )
        working[key] = ch.states[doc_id] = DocState(op.version)
        ch.finals[doc_id] = Final(op.version, op.chunks, op.metadata, keeps_newer=same_partition)
    return [c for c in changes.values() if not c.empty()], incomplete


def _drop_rows(ch: TableChanges, doc_id: str) -> None:
    for rows in (ch.before, ch.after):
        for chunk_id in [c for c, r in rows.items() if r["doc_id"] == doc_id]:
            del rows[chunk_id]


def apply_final(rows: dict[str, dict[str, Any]], final: Final) -> dict[str, dict[str, Any]]:
    """A document's rows (chunk_id → row) after its final: the listed chunks, at the
    listed positions, with the manifest's metadata, and rows of later versions; none
    after a delete. :func:`plan` applies a manifest only when every listed row is there."""
    if final.chunks is None:
        return {}
    kept = {c: row for c, row in rows.items() if not final.drops(row)}
    for entry in final.chunks:
        row = rows[entry["chunk_id"]]
        kept[entry["chunk_id"]] = {
            **row,
            "doc_version": final.version.offset,
            "chunk_index": int(entry["chunk_index"]),
            "page": entry.get("page"),
            "char_start": int(entry["char_start"]),
            "char_end": int(entry["char_end"]),
            "time_start_ms": entry.get("time_start_ms"),
            "time_end_ms": entry.get("time_end_ms"),
            "metadata": dict(final.metadata),
        }
    return kept


@dataclass
class Hit:
    rank: int
    score: float
    doc_id: str
    page: Optional[int]
    chunk_index: int
    text: str
    metadata: dict[str, str]
    #: Audio: the milliseconds of the recording the chunk's speech covers.
    time_start_ms: Optional[int] = None
    time_end_ms: Optional[int] = None
    #: Identifies the chunk across result lists (fusion, reranking).
    chunk_id: Optional[str] = None


class Store(Protocol):
    url: str

    def tables(self) -> list[TableSpec]: ...

    def states(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], DocState]: ...

    def chunk_ids(self, spec: TableSpec, doc_ids: list[str]) -> dict[str, set[str]]:
        """The ids of the chunks the table holds of each of ``doc_ids``."""
        ...

    def write(self, changes: list[TableChanges]) -> None: ...

    def search(self, spec: TableSpec, vector: list[float], k: int, filters: dict[str, str]) -> list[Hit]:
        """Dense: by cosine similarity (the score), best first."""
        ...

    def modes(self, spec: TableSpec) -> dict[str, Optional[str]]:
        """Each search signal (``dense``, ``sparse``, ``text``) and why the table cannot
        serve it (None: it can)."""
        ...

    def search_sparse(
        self, spec: TableSpec, indices: list[int], values: list[float], k: int, filters: dict[str, str]
    ) -> list[Hit]:
        """By the inner product of the sparse vectors (the score), best first."""
        ...

    def search_text(self, spec: TableSpec, query: str, k: int, filters: dict[str, str]) -> list[Hit]:
        """Full-text: chunks with any of the query's terms, by the store's text rank."""
        ...

    def rows(self, spec: TableSpec) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def open_store(url: str, *, text_language: str = "english") -> Store:
    """``postgresql://…`` (or ``postgres://``) or ``lancedb:DIR``. ``text_language``: the
    full-text index's language for the tables this store creates (a PostgreSQL text
    search configuration: english, simple, german…)."""
    if url.startswith(("postgresql://", "postgres://")):
        from flows.stores.postgres import PostgresStore

        return PostgresStore(url, text_language=text_language)
    if url.startswith("lancedb:"):
        from flows.stores.lance import LanceStore

        path = url[len("lancedb:") :]
        if not path:
            raise StoreConfigError("lancedb: needs a directory, as in lancedb:./vectors")
        return LanceStore(path, text_language=text_language)
    raise StoreConfigError(f"unknown store {url!r}: use postgresql://… or lancedb:DIR")
