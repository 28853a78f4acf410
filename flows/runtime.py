"""Per-process state of a running flow: one model, one extraction pool, one pipeline,
shared by the worker threads of the process and created on first use (never pickled
into the dataflow)."""

from __future__ import annotations

import threading
from typing import Callable, Optional

from flows.chunk_state import OWNERS
from flows.embed_steps import Pipeline
from flows.kafka.io import InputMessage, Move
from flows.settings import Settings

_lock = threading.Lock()
_pipeline: Optional[Pipeline] = None
_output_limit: Optional[int] = None


def output_limit(settings: Settings) -> int:
    """The largest message every output topic accepts (their ``max.message.bytes``),
    asked of the broker once per process, when a worker starts: records must fit, and
    the producer must not refuse what the topics accept."""
    global _output_limit
    if _output_limit is None:
        from flows.kafka.topics import max_message_bytes

        topics = [settings.output_topic, settings.dlq_topic, settings.image_output_topic]
        _output_limit = min(max_message_bytes(settings, t) for t in topics if t)
    return _output_limit


def pipeline(settings: Settings) -> Pipeline:
    global _pipeline
    max_message_bytes = output_limit(settings)
    with _lock:
        if _pipeline is None:
            from operators.embed import Embedder

            registry = None
            if settings.schema_registry_url:
                from flows.registry import SchemaRegistry

                registry = SchemaRegistry.from_url(settings.schema_registry_url)
            image_embedder = None
            if settings.image_model:
                from operators.image_embed import ImageEmbedder

                image_embedder = ImageEmbedder.load(settings.image_model, device=settings.device)
            transcriber = None
            if settings.audio_model:
                from operators.transcribe import Transcriber

                transcriber = Transcriber.load(settings.audio_model, device=settings.device)
            embedder = Embedder.load(
                settings.model,
                device=settings.device,
                dtype=settings.dtype,
                truncate_dim=settings.truncate_dim,
            )
            sparse_embedder = None
            if settings.sparse_model:
                from operators import SparseEmbedder

                sparse_embedder = SparseEmbedder.load(
                    settings.sparse_model, device=settings.device, dtype=settings.dtype
                )
            state = None
            if settings.incremental:
                from flows.chunk_state import ChunkState, ensure_topic

                ensure_topic(settings)
                state = ChunkState(settings)
            _pipeline = Pipeline(
                settings,
                embedder,
                registry=registry,
                max_message_bytes=max_message_bytes,
                image_embedder=image_embedder,
                transcriber=transcriber,
                state=state,
                give_back=_give_back(settings),
                sparse_embedder=sparse_embedder,
            )
        return _pipeline


def _give_back(settings: Settings) -> Optional[Callable[[list[InputMessage]], None]]:
    """Where events a batch did not take in go back: the group member that handed them
    over. In cluster mode a batch is never cut (its snapshot already counts the events,
    and no member can be evicted), so there is none."""
    if settings.scaling_mode() != "group":
        return None
    from flows.kafka import group

    return group.give_back


def current() -> Optional[Pipeline]:
    """This process's pipeline, once a worker built it (None before)."""
    return _pipeline


def forget_state(topic: str, assignments: dict[int, int], how: Move) -> None:
    """Group mode moved these input partitions (``assignments``: partition to the number of
    the assignment that began, ended or was rewound): only a partition's current
    assignment may write its chunk state, and what is cached of it may be stale, so it is
    read back from the changelog on the partition's next batch. Recorded even before
    the pipeline (and its state) exists: members are assigned partitions first."""
    state = _pipeline.state if _pipeline is not None else None
    for p, n in assignments.items():
        if state is not None:
            state.moved(topic, p, n, how)
        else:
            OWNERS.moved(topic, p, n, how)
