"""The steps of ``flows.embed``: decode → fetch and extract → chunk → embed → encode,
each a method of :class:`Pipeline` over one whole micro-batch (a :data:`Batch`).

The source's batch travels from step to step as one item, so the embed step sees
every chunk of it and makes one model call per batch, and no event ever waits in a
buffer that a snapshot cannot see. Every input message ends as vector records, a
delete marker or exactly one dead letter; outputs keep the input order, so within a
partition, a DELETE is published after the records of an earlier UPSERT of the same
document.

In incremental mode (``Settings.incremental``) the chunk step also decides which chunks
are new: chunk ids derive from content (:func:`flows.chunk_state.chunk_ids`), and only
ids the document's previous version lacked are embedded and published; the DocManifest
still lists every chunk. The ids of each version are remembered per input partition
(:class:`flows.chunk_state.ChunkState`) and written to a compacted changelog once the
batch's records are delivered.

In group mode a batch has a time budget (``Settings.batch_budget_s``): once it is
spent, the steps take in no more events, and those not taken in go back to the source,
which hands them over first in the next batch. The first event is always taken in, so
every batch makes progress.

Documents named by URI come through :mod:`flows.fetch`; the records, manifests and dead
letters are laid out by :mod:`flows.records`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from flows import codecs, metrics, outage, records, s3_events
from flows.allowlist import UriAllowlist
from flows.chunk_state import ChunkState, chunk_ids, lineage_key
from flows.fetch import FetchError, fetch, scheme_label
from flows.kafka.io import InputMessage, OutputMessage
from flows.object_store import ObjectStores
from flows.records import Lineage
from flows.settings import Settings
from operators import (
    Chunk,
    Chunker,
    Document,
    Embedder,
    EmbedstreamError,
    ExtractionError,
    ExtractorPool,
    ImageEmbedder,
    Limits,
    Transcriber,
    extract,
)

log = logging.getLogger("embedstream.pipeline")


class Failure(Exception):
    """A stage failed for one event; becomes its dead letter."""

    def __init__(self, stage: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.stage, self.reason, self.message = stage, reason, message


@dataclass
class Work:
    """What one input message became so far; an S3 event notification becomes one Work
    per record, all with the same message."""

    message: InputMessage
    event: Optional[dict[str, Any]] = None
    #: Which record of an S3 notification this is ("Records[1] of 3"); dead letters say it.
    record: Optional[str] = None
    #: What its dead letter carries instead of the message (its record alone).
    payload: Optional[bytes] = None
    #: Its outputs' key instead of the message's (an S3 object's bucket/key).
    key: Optional[bytes] = None
    #: Event types of its message's records that are not embedded, counted with it. A
    #: Work with these and neither event nor failure stands for a message of only such.
    skipped: list[str] = field(default_factory=list)
    document: Optional[Document] = None
    chunks: list[Chunk] = field(default_factory=list)
    #: Content-derived id of each chunk (of the image, for an image).
    ids: list[str] = field(default_factory=list)
    #: Which chunks need a vector: all of them, but in incremental mode only those
    #: the document's previous version did not have.
    fresh: list[bool] = field(default_factory=list)
    is_image: bool = False
    #: One row per fresh chunk, in order.
    vectors: Optional[np.ndarray] = None
    #: The sparse vector of each fresh chunk, where a sparse model runs.
    sparse: Optional[list[Any]] = None
    failure: Optional[Failure] = None


class BatchBudget:
    """The seconds of work a micro-batch may take (None: no bound). Time spent waiting
    out an outage does not count. Once spent, it stays spent."""

    def __init__(self, seconds: Optional[float] = None) -> None:
        self.seconds = seconds
        self._started = time.monotonic()
        self._waited = outage.waited_s()
        self._spent = False

    def spent(self) -> bool:
        if self.seconds is not None and not self._spent:
            worked = time.monotonic() - self._started - (outage.waited_s() - self._waited)
            self._spent = worked >= self.seconds
        return self._spent


class Batch(list):
    """One micro-batch of the source on its way through the steps: its :class:`Work`
    in input order, and its time budget."""

    def __init__(self, work: Iterable[Work] = (), budget: Optional[BatchBudget] = None) -> None:
        super().__init__(work)
        self.budget = budget or BatchBudget()


@dataclass
class Counters:
    events: int = 0
    documents: int = 0
    deletes: int = 0
    dead_letters: int = 0
    skipped: int = 0
    chunks: int = 0
    reused: int = 0
    tokens: int = 0
    #: Documents read from a URI (a file, an object store, a web server).
    fetched: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        s = max(time.monotonic() - self.started, 1e-9)
        return (
            f"{self.events} events ({self.documents} embedded, {self.deletes} deleted, "
            f"{self.dead_letters} dead letters{f', {self.skipped} skipped' if self.skipped else ''}), "
            f"{self.chunks} chunks embedded"
            f"{f', {self.reused} kept' if self.reused else ''}"
            f"{f', {self.fetched} documents fetched' if self.fetched else ''}; "
            f"{self.documents / s:.1f} docs/s, {self.chunks / s:.1f} chunks/s, "
            f"{self.tokens / s:,.0f} tokens/s"
        )


class Pipeline:
    """Holds the model, the chunker and the extraction pool of one worker process."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        pool: Optional[ExtractorPool] = None,
        registry: Any = None,
        max_message_bytes: int = 1_000_000,
        image_embedder: Optional[ImageEmbedder] = None,
        transcriber: Optional[Transcriber] = None,
        state: Optional[ChunkState] = None,
        give_back: Optional[Callable[[list[InputMessage]], None]] = None,
        sparse_embedder: Any = None,
    ) -> None:
        self.settings = settings
        #: ``operators.SparseEmbedder`` (--sparse-model): a sparse vector per text chunk.
        self.sparse_embedder = sparse_embedder
        #: Takes events not taken into their batch back to the source (group mode); the
        #: batch time budget applies only where they can go back.
        self.give_back = give_back
        self.budget_s = settings.batch_budget_s() if give_back is not None else None
        self.image_embedder = image_embedder
        self.transcriber = transcriber
        if transcriber is not None and settings.audio_language:
            known = transcriber.languages or ["en"]  # English-only models know one
            if settings.audio_language not in known:
                raise ValueError(
                    f"audio_language {settings.audio_language!r} is not one of the audio model's "
                    f"languages: {', '.join(known)}"
                )
        if settings.text_with_image_model and image_embedder is not None:
            embedder = image_embedder.text_embedder()  # one space for text and images
        self.embedder = embedder
        # The document-side prompt: --prompt-name, else the model's default prompt. The
        # chunker leaves room for it, so prompt and chunk are never truncated.
        self.prompt_options = {"prompt_name": settings.prompt_name} if settings.prompt_name else {}
        self.prompt_name = settings.prompt_name or getattr(embedder, "default_prompt_name", None)
        self.chunker: Chunker = embedder.chunker(
            settings.max_tokens,
            settings.overlap_tokens,
            **self.prompt_options,
            strategy=settings.chunk_strategy(),
        )
        #: What makes a vector besides its text, per modality.
        self.text_model = Lineage(
            embedder.model_id,
            embedder.model_revision,
            embedder.dtype,
            embedder.dim,
            self.prompt_name,
            sparse_lineage(sparse_embedder) if sparse_embedder is not None else None,
        )
        self.image_model = (
            Lineage(image_embedder.model_id, image_embedder.model_revision, "f32", image_embedder.dim, None)
            if image_embedder is not None
            else None
        )
        # Everything but the text that decides a vector goes into the chunk ids.
        self.text_lineage = _lineage_key(self.text_model)
        self.image_lineage = _lineage_key(self.image_model) if self.image_model else ""
        #: Incremental mode's chunk ids per document (None in full mode).
        self.state = state if state is not None or not settings.incremental else ChunkState(settings)
        self.pool = pool or ExtractorPool(settings.extract_workers)
        # Each thread fetches its document (GIL-free, in obstore or a socket) and then
        # waits for an extraction process: fetches overlap extraction, and at most
        # fetch_concurrency documents are fetched at once or held waiting.
        self.threads = ThreadPoolExecutor(
            max(self.pool.size, settings.fetch_concurrency, 1), thread_name_prefix="extract"
        )
        self.fetch_slots = threading.BoundedSemaphore(settings.fetch_concurrency)
        self.allowlist = UriAllowlist(settings.allowed_uris)
        self.stores = ObjectStores(settings.object_store_options(), timeout_s=settings.fetch_timeout_s)
        self.registry = registry
        self.encoder = codecs.OutputEncoder(settings.output_format, registry)
        self.limits = Limits(max_input_bytes=settings.max_document_bytes)
        self.roots = [Path(r).resolve() for r in settings.allowed_roots]
        #: Where image records go, and every topic that records go to (deletes go to all).
        self.image_topic = settings.image_output_topic or settings.output_topic
        self.record_topics = list(dict.fromkeys([settings.output_topic, self.image_topic]))
        #: Largest message the output topics accept; a record over it becomes a dead letter.
        self.max_message_bytes = max_message_bytes
        #: Payloads travel with dead letters only while the letter still fits a message.
        self.dlq_payload_cap = min(settings.dlq_payload_max_bytes, max_message_bytes - 64 * 1024)
        self.batch_size = settings.micro_batch_size()
        self.counters = Counters()
        self._count_lock = threading.Lock()
        self._last_report = time.monotonic()

    # --- the steps, one micro-batch each ---------------------------------------------------

    def decode(self, messages: list[InputMessage]) -> list[Batch]:
        """The source's batch becomes one item: later steps see it whole."""
        if not messages:
            return []
        metrics.BATCH_EVENTS.observe(len(messages))
        metrics.BATCH_FILL.observe(len(messages) / self.batch_size)
        batch = Batch((), BatchBudget(self.budget_s))
        with metrics.STAGE_SECONDS.labels("decode").time():
            for m in messages:
                batch.extend(self._decode_message(m))
        return [batch]

    def fetch_and_extract(self, batch: Batch) -> Batch:
        """Documents in parallel, in the isolated extraction processes, while the
        batch's budget lasts."""
        upserts = _upserts(batch)
        left_out: set[int] = set()
        #: Documents whose store or server did not answer, even after quick retries.
        unavailable: dict[int, tuple[Work, outage.Outage]] = {}

        def attempt(w: Work) -> None:
            # Out of the waiting set whatever this try ends in: a refusal (404, too large,
            # unreadable) is the document's dead letter, not a reason to wait on.
            unavailable.pop(id(w), None)
            try:
                self._fetch_and_extract(w)
            except outage.Outage as e:
                unavailable[id(w)] = (w, e)

        def extract(w: Work) -> None:
            if w.message is not upserts[0].message and batch.budget.spent():
                left_out.add(id(w))
                return
            self._guard(w, attempt)

        def again() -> None:
            """The documents still unavailable, tried again together."""
            list(self.threads.map(lambda w: self._guard(w, attempt), [w for w, _ in unavailable.values()]))
            if unavailable:
                _, error = next(iter(unavailable.values()))
                raise outage.Outage(
                    f"{len(unavailable)} documents of the batch cannot be fetched yet: {error}"
                )

        with metrics.STAGE_SECONDS.labels("extract").time():
            list(self.threads.map(extract, upserts))
            if unavailable:
                # The batch waits for the store (as the sink waits for its database): no
                # dead letter, nothing skipped; between tries the group member polls.
                outage.wait_out("object store", again)
        return self._cut(batch, next((w for w in upserts if id(w) in left_out), None))

    def chunk(self, batch: Batch) -> Batch:
        with metrics.STAGE_SECONDS.labels("chunk").time():
            upserts = _upserts(batch)
            for w in upserts:
                # A recording's transcription is slow: it waits for the next batch once
                # the budget is spent.
                first = w.message is upserts[0].message
                if not first and w.document.audio is not None and batch.budget.spent():
                    batch = self._cut(batch, w)
                    break
                self._guard(w, self._chunk)
            for w in batch:
                w.fresh = [True] * len(w.ids)
            if self.state is not None:
                self.state.mark_fresh(batch)
        return batch

    def embed(self, batch: Batch) -> Batch:
        """Every text chunk of the batch in one model call, every image in another;
        with a time budget, in input order, about one forward pass per call, until the
        budget is spent."""
        with metrics.STAGE_SECONDS.labels("embed").time():
            ready = _upserts(batch)
            if batch.budget.seconds is None:
                self._embed([w for w in ready if not w.is_image])
                self._embed_images([w for w in ready if w.is_image])
                return batch
            for i, group in enumerate(self._passes(ready)):
                if i and group[0].message is not ready[0].message and batch.budget.spent():
                    return self._cut(batch, group[0])
                if group[0].is_image:
                    self._embed_images(group)
                else:
                    self._embed(group)
        return batch

    def _passes(self, ready: list[Work]) -> list[list[Work]]:
        """``ready`` in input order, cut into runs of one modality of about one forward
        pass each (the text model's ``max_batch_tokens``, or 16 images)."""
        # CLIP's text tower does not say: 2,048 tokens, the CPU default.
        pass_tokens = getattr(self.embedder, "max_batch_tokens", 2048)
        groups: list[list[Work]] = []
        size = 0
        for w in ready:
            weight = 1 if w.is_image else sum(c.n_tokens for c in _fresh(w))
            full = size >= (16 if w.is_image else pass_tokens)
            if not groups or groups[-1][0].is_image != w.is_image or full:
                groups.append([])
                size = 0
            groups[-1].append(w)
            size += weight
        return groups

    def _cut(self, batch: Batch, first_left: Optional[Work]) -> Batch:
        """The batch up to ``first_left``; it and every event after it (in every
        partition, so each gives up a suffix of its events) go back to the source. The
        records of one message stay together: the cut moves to its first."""
        if first_left is None:
            return batch
        at = next(i for i, w in enumerate(batch) if w is first_left)
        while at and batch[at - 1].message is first_left.message:
            at -= 1
        left = batch[at:]
        self.give_back(list({id(w.message): w.message for w in left}.values()))
        metrics.BATCH_EVENTS_LEFT.inc(len(left))
        log.info(
            "batch budget of %.1f s spent: %d of %d events go to the next batch",
            batch.budget.seconds,
            len(left),
            len(batch),
        )
        return Batch(batch[:at], batch.budget)

    def encode(self, batch: Batch) -> list[OutputMessage]:
        """Records, delete markers and dead letters in input order: one sink routes each
        to its topic, so a dead letter's offset is committed in order with the rest."""
        with metrics.STAGE_SECONDS.labels("encode").time():
            out = self._encode_all(batch)
        if self.state is not None:
            out.extend(self.state.remember(batch))
        self._count(batch)
        return out

    def process(self, messages: list[InputMessage]) -> list[OutputMessage]:
        """All steps on one micro-batch, in memory (benchmarks, notebooks)."""
        out: list[OutputMessage] = []
        for batch in self.decode(messages):
            out.extend(self.encode(self.embed(self.chunk(self.fetch_and_extract(batch)))))
        return out

    def _encode_all(self, work: Batch) -> list[OutputMessage]:
        out: list[OutputMessage] = []
        for w in work:
            messages = self._outputs(w)
            if w.failure is None and any(len(m.value or b"") > self.max_message_bytes for m in messages):
                biggest = max(len(m.value) for m in messages)
                w.failure = Failure(
                    "produce",
                    "too_large",
                    f"a record of {biggest} bytes is over the output "
                    f"topic's limit of {self.max_message_bytes} bytes",
                )
                messages = self._outputs(w)
            out.extend(messages)
        return out

    def _guard(self, w: Work, step: Callable[[Work], None]) -> None:
        if w.failure is not None:
            return
        try:
            step(w)
        except Failure as f:
            w.failure = f
        except Exception as e:  # a bug must cost one event, not the worker
            log.exception(
                "unexpected error on %s[%d]@%d", w.message.topic, w.message.partition, w.message.offset
            )
            w.failure = Failure(
                "extract" if w.event else "decode", "internal_error", f"{type(e).__name__}: {e}"
            )

    # --- stages ------------------------------------------------------------------------------

    def _decode_message(self, m: InputMessage) -> list[Work]:
        """The Work of one input message: one, or one per record of an S3 notification."""
        mode = self.settings.input_events
        if mode == "s3" or (mode == "auto" and s3_events.looks_like(m.value)):
            try:
                return self._notification(m)
            except Exception as e:  # a bug must cost one message, not the worker
                log.exception("unexpected error on %s[%d]@%d", m.topic, m.partition, m.offset)
                return [Work(m, failure=Failure("decode", "internal_error", f"{type(e).__name__}: {e}"))]
        w = Work(m)
        self._guard(w, self._decode)
        return [w]

    def _notification(self, m: InputMessage) -> list[Work]:
        try:
            parsed = s3_events.parse(m.value, timestamp_ms=m.timestamp_ms or codecs.now_ms())
        except codecs.DecodeError as e:
            return [Work(m, failure=Failure("decode", e.reason, str(e)))]
        works: list[Work] = []
        skipped: list[str] = []
        for r in parsed:
            if r.skipped is not None:
                skipped.append(r.skipped)
                continue
            w = Work(m, event=r.event, record=r.label, payload=r.payload, key=r.object_key)
            if r.error is not None:
                w.failure = Failure("decode", r.error.reason, str(r.error))
            works.append(w)
        if not works:
            return [Work(m, skipped=skipped)]
        works[0].skipped = skipped
        return works

    def _decode(self, w: Work) -> None:
        m = w.message
        try:
            w.event = codecs.decode_document_event(
                m.value, m.key, timestamp_ms=m.timestamp_ms, registry=self.registry
            )
        except codecs.DecodeError as e:
            raise Failure("decode", e.reason, str(e)) from None

    def _fetch_and_extract(self, w: Work) -> None:
        event = w.event
        data = event.get("content")
        if data is None:
            data = self._fetch(event["uri"], event.get("version_id"))
        if len(data) > self.settings.max_document_bytes:
            raise Failure(
                "fetch",
                "too_large",
                f"document is {len(data)} bytes, over the limit of {self.settings.max_document_bytes}",
            )
        try:
            w.document = extract(
                data,
                mime_type=event.get("mime_type"),
                filename=event.get("filename"),
                limits=self.limits,
                pool=self.pool,
            )
        except ExtractionError as e:
            raise Failure("extract", e.reason, e.message) from None

    def _fetch(self, uri: str, version: Optional[str]) -> bytes:
        """The document at ``uri``, tried again a few times at once when its store or
        server does not answer; past those, :class:`flows.outage.Outage` (the batch
        waits). A refusal is the document's dead letter."""
        scheme = scheme_label(uri)
        delay = _FETCH_RETRY_S
        for tries_left in range(_FETCH_TRIES - 1, -1, -1):
            try:
                with self.fetch_slots:
                    data = fetch(
                        uri,
                        roots=self.roots,
                        max_bytes=self.settings.max_document_bytes,
                        allowlist=self.allowlist,
                        version=version,
                        timeout_s=self.settings.fetch_timeout_s,
                        stores=self.stores,
                    )
            except FetchError as e:
                raise Failure("fetch", e.reason, e.message) from None
            except outage.Outage as e:
                if not tries_left:
                    raise
                log.info("fetch of %s failed (%s); trying again in %.1f s", uri, e, delay)
                metrics.FETCH_RETRIES.labels(scheme).inc()
                time.sleep(delay)
                delay *= 2
                continue
            with self._count_lock:
                self.counters.fetched += 1
            return data
        raise AssertionError("unreachable")

    def _chunk(self, w: Work) -> None:
        doc = w.document
        if doc.audio is not None:
            if self.transcriber is None:
                raise Failure("embed", "no_model_for_type", f"no audio model configured for {doc.mime_type}")
            doc = w.document = self._transcribe(doc)
        if doc.image is not None:
            if self.image_embedder is None:
                raise Failure("embed", "no_model_for_type", f"no image model configured for {doc.mime_type}")
            w.is_image = True
            image = doc.image
            w.ids = chunk_ids(
                w.event["doc_id"], [b"%dx%d:" % (image.width, image.height) + image.data], self.image_lineage
            )
            return
        try:
            w.chunks = self.chunker.chunk(doc)
        except EmbedstreamError as e:
            raise Failure("chunk", "internal_error", str(e)) from None
        if not w.chunks:
            raise Failure("chunk", "empty", "the document has no text to chunk")
        if len(w.chunks) > self.settings.max_chunks:
            raise Failure(
                "chunk", "too_large", f"{len(w.chunks)} chunks, over the limit of {self.settings.max_chunks}"
            )
        w.ids = chunk_ids(w.event["doc_id"], [c.text.encode() for c in w.chunks], self.text_lineage)

    def _transcribe(self, doc: Document) -> Document:
        """The recording as a text Document whose spans are its transcript's segments."""
        try:
            transcript = self.transcriber.transcribe(doc, language=self.settings.audio_language)
        except EmbedstreamError as e:
            raise Failure("embed", "internal_error", f"transcription failed: {e}") from None
        metrics.AUDIO_SECONDS.inc(transcript.duration_ms / 1000)
        text = transcript.document(mime_type=doc.mime_type)
        if not text.text.strip():
            raise Failure("chunk", "empty", "no speech was recognised in the recording")
        return text

    def _embed(self, ready: list[Work]) -> None:
        """All fresh chunks of the batch in one call: the embedder packs them into
        token-budget batches."""
        texts = [c.text for w in ready for c in _fresh(w)]
        for w in ready:
            w.vectors = np.zeros((0, self.embedder.dim), dtype=np.float32)
        if not texts:
            return
        try:
            vectors = self.embedder.embed(texts, **self.prompt_options)
        except EmbedstreamError:
            # Find the document that fails; the others still get their vectors.
            for w in ready:
                try:
                    if any(w.fresh):
                        w.vectors = self.embedder.embed([c.text for c in _fresh(w)], **self.prompt_options)
                except EmbedstreamError as e:
                    w.failure = Failure("embed", "model_error", str(e))
        else:
            at = 0
            for w in ready:
                n = sum(w.fresh)
                w.vectors = vectors[at : at + n]
                at += n
        if self.sparse_embedder is not None:
            self._embed_sparse([w for w in ready if w.failure is None])

    def _embed_sparse(self, ready: list[Work]) -> None:
        """The sparse vector of every fresh chunk, in one call as the dense ones."""
        texts = [c.text for w in ready for c in _fresh(w)]
        try:
            found = self.sparse_embedder.embed(texts) if texts else []
        except EmbedstreamError:
            for w in ready:
                try:
                    w.sparse = self.sparse_embedder.embed([c.text for c in _fresh(w)])
                except EmbedstreamError as e:
                    w.failure = Failure("embed", "model_error", f"sparse model: {e}")
            return
        at = 0
        for w in ready:
            n = sum(w.fresh)
            w.sparse = list(found[at : at + n])
            at += n

    def _embed_images(self, ready: list[Work]) -> None:
        ready = [w for w in ready if w.fresh[0]]
        if not ready:
            return
        try:
            vectors = self.image_embedder.embed_images([w.document.image for w in ready], normalize=True)
        except (EmbedstreamError, ValueError):
            for w in ready:
                try:
                    w.vectors = self.image_embedder.embed_images([w.document.image], normalize=True)
                except (EmbedstreamError, ValueError) as e:
                    w.failure = Failure("embed", "model_error", str(e))
            return
        for i, w in enumerate(ready):
            w.vectors = vectors[i : i + 1]

    # --- outputs -----------------------------------------------------------------------------

    def _key(self, w: Work) -> Optional[bytes]:
        if w.key is not None:
            return w.key
        if w.message.key:
            return w.message.key
        return w.event["doc_id"].encode() if w.event else None

    def _message(
        self, w: Work, topic: str, key: Optional[bytes], name: str, record: dict[str, Any]
    ) -> OutputMessage:
        m = w.message
        return OutputMessage(
            topic,
            key,
            self.encoder.encode(name, record),
            ((codecs.TYPE_HEADER, name.encode()),),
            (m.topic, m.partition, m.offset),
            source_assignment=m.assignment,
        )

    def _outputs(self, w: Work) -> list[OutputMessage]:
        s = self.settings
        if w.failure is not None:
            return [self._message(w, s.dlq_topic, w.message.key, "DeadLetter", self.dead_letter(w))]
        if w.event is None:  # only records that are not embedded: its offset is done
            m = w.message
            source = (m.topic, m.partition, m.offset)
            return [
                OutputMessage("", None, None, source=source, commit_only=True, source_assignment=m.assignment)
            ]
        event = w.event
        if event["op"] == "DELETE":
            # Every topic that may hold the document's records gets its delete: which one
            # did is not known here (a document can change between image and text), and a
            # delete of a document a topic never had is harmless.
            marker = records.delete_marker(event, w.message)
            return [
                self._message(w, topic, self._key(w), "DeleteMarker", marker) for topic in self.record_topics
            ]
        metadata = records.metadata(event, w.document)
        if w.is_image:
            lineage = self.image_model
            entries = records.image_entries(w.ids[0])
            vectors = (
                [records.image_record(event, w.message, w.ids[0], w.vectors[0], lineage, metadata)]
                if w.fresh[0]
                else []
            )
            return self._with_manifest(w, self.image_topic, vectors, entries, lineage, "image", metadata)
        lineage = self.text_model
        entries = records.text_entries(w.chunks, w.ids)
        chunker = {"max_tokens": self.chunker.max_tokens, "overlap_tokens": self.chunker.overlap_tokens}
        fresh = [(c, cid) for c, cid, f in zip(w.chunks, w.ids, w.fresh) if f]
        vectors = records.text_records(
            event, w.message, fresh, w.vectors, len(w.chunks), lineage, chunker, metadata, w.sparse
        )
        return self._with_manifest(w, s.output_topic, vectors, entries, lineage, "text", metadata)

    def _with_manifest(
        self,
        w: Work,
        topic: str,
        vectors: list[dict[str, Any]],
        entries: list[dict[str, Any]],
        lineage: Lineage,
        modality: str,
        metadata: dict[str, str],
    ) -> list[OutputMessage]:
        """The version's records, then its DocManifest (every chunk of the version, also
        those not sent again) on the same topic and key, so it follows them in the
        partition: a consumer that applies it has every record."""
        manifest = records.manifest(w.event, w.message, lineage, modality, metadata, entries)
        key = self._key(w)
        out = [self._message(w, topic, key, "VectorRecord", r) for r in vectors]
        out.append(self._message(w, topic, key, "DocManifest", manifest))
        return out

    def dead_letter(self, w: Work) -> dict[str, Any]:
        m, f = w.message, w.failure
        return records.dead_letter(
            m,
            f.stage,
            f.reason,
            f"{w.record}: {f.message}" if w.record else f.message,
            # An empty message, or a tombstone, travels as empty bytes.
            payload=w.payload if w.payload is not None else m.value or b"",
            payload_cap=self.dlq_payload_cap,
            doc_id=w.event["doc_id"] if w.event else None,
        )

    def _count(self, work: list[Work]) -> None:
        with self._count_lock:
            self._count_locked(work)

    def _count_locked(self, work: list[Work]) -> None:
        c = self.counters
        now_ms = codecs.now_ms()
        for w in work:
            for name in w.skipped:
                metrics.S3_RECORDS_SKIPPED.labels(s3_events.skipped_kind(name)).inc()
                metrics.EVENTS.labels("skipped").inc()
            c.events += len(w.skipped)
            c.skipped += len(w.skipped)
            if w.event is None and w.failure is None:
                continue  # a message of only skipped records
            c.events += 1
            if w.event is not None:
                metrics.END_TO_END_SECONDS.observe(max(now_ms - w.event["event_time"], 0) / 1000)
            if w.failure is not None:
                c.dead_letters += 1
                metrics.EVENTS.labels("dead_letter").inc()
                metrics.DEAD_LETTERS.labels(w.failure.stage, w.failure.reason).inc()
            elif w.event["op"] == "DELETE":
                c.deletes += 1
                metrics.EVENTS.labels("deleted").inc()
            else:
                embedded = sum(w.fresh)
                tokens = sum(ch.n_tokens for ch, f in zip(w.chunks, w.fresh) if f)
                metrics.EVENTS.labels("embedded").inc()
                metrics.DOCUMENTS.inc()
                metrics.CHUNKS.inc(embedded)
                metrics.CHUNKS_REUSED.inc(len(w.fresh) - embedded)
                metrics.TOKENS.inc(tokens)
                c.documents += 1
                c.chunks += embedded
                c.reused += len(w.fresh) - embedded
                c.tokens += tokens
        now = time.monotonic()
        if now - self._last_report >= self.settings.report_every_s:
            self._last_report = now
            log.info("pid %d: %s", os.getpid(), c.line())

    def close(self) -> None:
        self.threads.shutdown()
        self.pool.close()


#: Tries of one fetch before the batch waits for its store, and the first pause between.
_FETCH_TRIES = 3
_FETCH_RETRY_S = 0.2


def _lineage_key(lineage: Lineage) -> str:
    key = lineage_key(
        lineage.model_id, lineage.model_revision, lineage.dtype, lineage.prompt_name, lineage.dimension
    )
    if lineage.sparse is not None:
        s = lineage.sparse
        key += "\x00sparse\x00" + "\x00".join(
            (s["model_id"], s["model_revision"], s["dtype"], str(s["dimension"]))
        )
    return key


def sparse_lineage(sparse_embedder: Any) -> dict[str, Any]:
    """The ``SparseModel`` record of a sparse embedder: what its vectors depend on."""
    return {
        "model_id": sparse_embedder.model_id,
        "model_revision": sparse_embedder.model_revision,
        "dtype": sparse_embedder.dtype,
        "dimension": int(sparse_embedder.dim),  # the vocabulary size
    }


def _fresh(w: Work) -> list[Chunk]:
    return [c for c, f in zip(w.chunks, w.fresh) if f]


def _upserts(batch: Batch) -> list[Work]:
    """The events of the batch still on their way to vectors."""
    return [w for w in batch if w.failure is None and w.event is not None and w.event["op"] == "UPSERT"]
