"""Helpers for the sink tests: synthetic vector streams (records, manifests and
delete markers as the flow writes them) and store fixtures on the real stores."""

from __future__ import annotations

import hashlib
import random
import uuid
from typing import Any, Optional

import numpy as np

from flows import codecs
from flows.kafka.io import InputMessage

MODEL = {"model_id": "test/tiny-vectors", "model_revision": "r1", "dtype": "f32", "prompt_name": None}
DIM = 4


def record(
    doc_id: str,
    offset: int,
    index: int,
    count: int,
    text: str,
    *,
    chunk_id: Optional[str] = None,
    metadata: Optional[dict[str, str]] = None,
    dim: int = DIM,
    partition: int = 0,
    model: Optional[dict] = None,
) -> dict[str, Any]:
    # Seeded from the content (not hash(), which changes per process): the same
    # record gets the same vector in every run.
    rng = np.random.default_rng(
        int.from_bytes(hashlib.sha256(f"{doc_id}\x00{text}".encode()).digest()[:4], "big")
    )
    vector = rng.normal(size=dim).astype(np.float32)
    return {
        "chunk_id": chunk_id or f"{doc_id}#{index}",
        "doc_id": doc_id,
        "doc_version": {"topic": "in", "partition": partition, "offset": offset},
        "chunk_index": index,
        "chunk_count": count,
        "text": text,
        "char_start": index * 10,
        "char_end": index * 10 + len(text),
        "page": None,
        "embedding": [float(x) for x in vector / np.linalg.norm(vector)],
        **(model or MODEL),
        "chunker": {"max_tokens": 8, "overlap_tokens": 0},
        "metadata": metadata or {"v": str(offset)},
        "event_time": 1_700_000_000_000 + offset,
        "embedded_at": 1_700_000_100_000 + offset,
        "modality": "text",
        "dimension": dim,
    }


def manifest(records: list[dict[str, Any]]) -> dict[str, Any]:
    first = records[0]
    return {
        "doc_id": first["doc_id"],
        "doc_version": first["doc_version"],
        **{
            k: first[k]
            for k in ("model_id", "model_revision", "dtype", "dimension", "prompt_name", "modality")
        },
        "metadata": first["metadata"],
        "event_time": first["event_time"],
        "emitted_at": first["embedded_at"],
        "chunks": [
            {
                **{k: r[k] for k in ("chunk_id", "chunk_index", "char_start", "char_end", "page")},
                **{k: r.get(k) for k in ("time_start_ms", "time_end_ms")},
            }
            for r in records
        ],
    }


def delete(doc_id: str, offset: int, partition: int = 0) -> dict[str, Any]:
    return {
        "doc_id": doc_id,
        "doc_version": {"topic": "in", "partition": partition, "offset": offset},
        "metadata": {},
        "event_time": 1_700_000_000_000 + offset,
        "emitted_at": 1_700_000_100_000 + offset,
    }


def version(doc_id: str, offset: int, texts: list[str], **kw) -> list[tuple[str, dict[str, Any]]]:
    """The messages of one UPSERT as the flow writes them: its records, then its manifest."""
    records = [record(doc_id, offset, i, len(texts), t, **kw) for i, t in enumerate(texts)]
    return [("VectorRecord", r) for r in records] + [("DocManifest", manifest(records))]


def messages(stream: list[tuple[str, dict[str, Any]]], topic: str = "vectors") -> list[InputMessage]:
    return [
        InputMessage(
            topic,
            0,
            i,
            r["doc_id"].encode(),
            codecs.encode_single_object(kind, r),
            None,
            ((codecs.TYPE_HEADER, kind.encode()),),
        )
        for i, (kind, r) in enumerate(stream)
    ]


def random_stream(seed: int, docs: int = 12, events: int = 60) -> list[tuple[str, dict[str, Any]]]:
    """Upserts that grow and shrink documents, and deletes, interleaved; one input
    offset per event, as a partition of the input topic would give."""
    rng = random.Random(seed)
    stream = []
    for offset in range(events):
        doc_id = f"doc-{rng.randrange(docs)}"
        if rng.random() < 0.15:
            stream.append(("DeleteMarker", delete(doc_id, offset)))
        else:
            n = rng.randint(1, 6)
            stream += version(doc_id, offset, [f"{doc_id} v{offset} chunk {i}" for i in range(n)])
    return stream


def expected_store(stream: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """What the store must hold: for each document, the chunks of its newest manifest
    (by hand, independently of flows.stores.plan). A listed chunk's vector and text come
    from its newest record up to the manifest's version, which in incremental mode may
    belong to an earlier version; a delete forgets the records before it."""
    newest: dict[str, tuple[int, Optional[dict]]] = {}
    records: dict[str, dict[str, dict]] = {}
    for kind, r in stream:
        doc_id, offset = r["doc_id"], r["doc_version"]["offset"]
        if kind == "VectorRecord":
            known = records.setdefault(doc_id, {}).get(r["chunk_id"])
            if known is None or known["doc_version"]["offset"] <= offset:
                records[doc_id][r["chunk_id"]] = r
            continue
        if kind == "DeleteMarker":
            records[doc_id] = {
                c: rec for c, rec in records.get(doc_id, {}).items() if rec["doc_version"]["offset"] > offset
            }
        if offset >= newest.get(doc_id, (-1, None))[0]:
            newest[doc_id] = (offset, r if kind == "DocManifest" else None)
    rows = {}
    for doc_id, (offset, m) in newest.items():
        if m is None:
            continue
        for entry in m["chunks"]:
            r = records.get(doc_id, {}).get(entry["chunk_id"])
            if r is None or r["doc_version"]["offset"] > offset:
                continue  # never delivered: the sink has nothing to keep
            rows[entry["chunk_id"]] = {
                "doc_id": doc_id,
                "doc_version": offset,
                "chunk_index": entry["chunk_index"],
                "char_start": entry["char_start"],
                "char_end": entry["char_end"],
                "page": entry["page"],
                "time_start_ms": entry.get("time_start_ms"),
                "time_end_ms": entry.get("time_end_ms"),
                "text": r["text"],
                "metadata": m["metadata"],
                "embedding": r["embedding"],
            }
    return rows


def comparable(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Store rows keyed by chunk_id, without embedded_at; vectors as the float32 values
    both stores keep exactly."""
    out = {}
    for r in rows:
        row = {k: v for k, v in r.items() if k not in ("chunk_id", "embedded_at")}
        row["embedding"] = [float(np.float32(x)) for x in r["embedding"]]
        out[r["chunk_id"]] = row
    return out


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"
