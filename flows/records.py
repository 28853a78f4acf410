"""The records the jobs write, as dictionaries of their schemas (``schemas/``): vector
records and the DocManifest of a document version, delete markers, and the dead
letters of both jobs. What to write is the steps' choice; how each record looks is
decided here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from flows import codecs
from flows.kafka.io import InputMessage

if TYPE_CHECKING:  # the sink builds dead letters without loading the models' library
    import numpy as np

    from operators import Chunk, Document


class Lineage(NamedTuple):
    """What made a vector besides its text, as every record and manifest states it."""

    model_id: str
    model_revision: str
    dtype: str
    dimension: int
    prompt_name: Optional[str]
    #: The sparse model's lineage (``SparseModel`` of the schemas), where one runs.
    sparse: Optional[dict[str, Any]] = None


def version(source: InputMessage) -> dict[str, Any]:
    """A ``doc_version``: where the event of the version was read."""
    return {"topic": source.topic, "partition": source.partition, "offset": source.offset}


def metadata(event: dict[str, Any], document: Document) -> dict[str, str]:
    """The event's metadata, and what extraction found under ``doc.``."""
    found = dict(event["metadata"])
    found["doc.mime_type"] = document.mime_type
    if document.title:
        found["doc.title"] = document.title
    for k, v in document.metadata.items():
        found[f"doc.{k}"] = v
    return found


def delete_marker(event: dict[str, Any], source: InputMessage) -> dict[str, Any]:
    return {
        "doc_id": event["doc_id"],
        "doc_version": version(source),
        "metadata": event["metadata"],
        "event_time": event["event_time"],
        "emitted_at": codecs.now_ms(),
    }


def text_records(
    event: dict[str, Any],
    source: InputMessage,
    chunks: Sequence[tuple[Chunk, str]],
    vectors: np.ndarray,
    chunk_count: int,
    lineage: Lineage,
    chunker: dict[str, int],
    metadata: dict[str, str],
    sparse: Optional[Sequence[Any]] = None,
) -> list[dict[str, Any]]:
    """A VectorRecord for each ``(chunk, chunk id)`` with its row of ``vectors`` (and
    its item of ``sparse``: ``indices`` and ``values``, where a sparse model ran)."""
    embedded_at = codecs.now_ms()
    sparse = sparse if sparse is not None else [None] * len(chunks)
    return [
        {
            "chunk_id": chunk_id,
            "doc_id": event["doc_id"],
            "doc_version": version(source),
            "chunk_index": chunk.index,
            "chunk_count": chunk_count,
            "text": chunk.text,
            "char_start": chunk.char_start,
            "char_end": chunk.char_end,
            "page": chunk.page,
            "embedding": vector.tolist(),
            "model_id": lineage.model_id,
            "model_revision": lineage.model_revision,
            "dtype": lineage.dtype,
            "chunker": chunker,
            "metadata": metadata,
            "event_time": event["event_time"],
            "embedded_at": embedded_at,
            "modality": "text",
            "prompt_name": lineage.prompt_name,
            "dimension": lineage.dimension,
            "time_start_ms": chunk.time_start_ms,
            "time_end_ms": chunk.time_end_ms,
            "sparse": None
            if s is None
            else {"indices": [int(i) for i in s.indices], "values": [float(v) for v in s.values]},
            "sparse_model": lineage.sparse,
        }
        for (chunk, chunk_id), vector, s in zip(chunks, vectors, sparse)
    ]


def image_record(
    event: dict[str, Any],
    source: InputMessage,
    chunk_id: str,
    vector: np.ndarray,
    lineage: Lineage,
    metadata: dict[str, str],
) -> dict[str, Any]:
    """The one VectorRecord of an image."""
    return {
        "chunk_id": chunk_id,
        "doc_id": event["doc_id"],
        "doc_version": version(source),
        "chunk_index": 0,
        "chunk_count": 1,
        "text": "",
        "char_start": 0,
        "char_end": 0,
        "page": None,
        "embedding": vector.tolist(),
        "model_id": lineage.model_id,
        "model_revision": lineage.model_revision,
        "dtype": lineage.dtype,
        "chunker": {"max_tokens": 0, "overlap_tokens": 0},
        "metadata": metadata,
        "event_time": event["event_time"],
        "embedded_at": codecs.now_ms(),
        "modality": "image",
        "prompt_name": lineage.prompt_name,
        "dimension": lineage.dimension,
    }


def text_entries(chunks: Sequence[Chunk], ids: Sequence[str]) -> list[dict[str, Any]]:
    """The DocManifest's entry of each chunk of a text version."""
    return [
        {
            "chunk_id": chunk_id,
            "chunk_index": c.index,
            "char_start": c.char_start,
            "char_end": c.char_end,
            "page": c.page,
            "time_start_ms": c.time_start_ms,
            "time_end_ms": c.time_end_ms,
        }
        for c, chunk_id in zip(chunks, ids)
    ]


def image_entries(chunk_id: str) -> list[dict[str, Any]]:
    """The DocManifest's one entry of an image."""
    return [{"chunk_id": chunk_id, "chunk_index": 0, "char_start": 0, "char_end": 0, "page": None}]


def manifest(
    event: dict[str, Any],
    source: InputMessage,
    lineage: Lineage,
    modality: str,
    metadata: dict[str, str],
    entries: list[dict[str, Any]],
) -> dict[str, Any]:
    """The DocManifest of a version: every chunk of it, also those not sent again."""
    return {
        "doc_id": event["doc_id"],
        "doc_version": version(source),
        "model_id": lineage.model_id,
        "model_revision": lineage.model_revision,
        "dtype": lineage.dtype,
        "dimension": lineage.dimension,
        "prompt_name": lineage.prompt_name,
        "modality": modality,
        "metadata": metadata,
        "event_time": event["event_time"],
        "emitted_at": codecs.now_ms(),
        "chunks": entries,
        "sparse_model": lineage.sparse,
    }


#: On a dead letter of the sink: the ``embedstream.type`` its payload had, so that a
#: redrive sends the record back as the type it was.
PAYLOAD_TYPE_HEADER = "embedstream.payload-type"


def dead_letter_headers(source: InputMessage) -> tuple[tuple[str, bytes], ...]:
    """The headers of the dead letter of ``source``: its own type, and its payload's."""
    payload_type = dict(source.headers or ()).get(codecs.TYPE_HEADER)
    own = ((codecs.TYPE_HEADER, b"DeadLetter"),)
    return own if payload_type is None else (*own, (PAYLOAD_TYPE_HEADER, payload_type))


def dead_letter(
    source: InputMessage,
    stage: str,
    reason: str,
    text: str,
    *,
    payload: Optional[bytes],
    payload_cap: int,
    doc_id: Optional[str],
) -> dict[str, Any]:
    """The DeadLetter of the message read at ``source``. ``payload`` (the message's, as
    the job read it) travels while it is at most ``payload_cap`` bytes; past that only
    its coordinates do, and ``redrive`` reads it back from there."""
    return {
        "stage": stage,
        "reason": reason,
        "message": text[:4000],
        "topic": source.topic,
        "partition": source.partition,
        "offset": source.offset,
        "key": source.key,
        "payload": payload if payload is not None and len(payload) <= payload_cap else None,
        "payload_size": len(payload or b""),
        "doc_id": doc_id,
        "failed_at": codecs.now_ms(),
    }
