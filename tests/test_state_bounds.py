"""Incremental mode's chunk state under pressure: its memory stays under
EMBEDSTREAM_STATE_MAX_BYTES however many documents come, a document it evicted is
embedded again in full (and right), and the changelog restore of one partition neither
waits for another's nor outlives its deadline."""

from __future__ import annotations

import gc
import hashlib
import logging
import random
import socket
import threading
import time
import tracemalloc

import numpy as np
from test_incremental import MAX_TOKENS, doc_text, edited, upsert

from flows import codecs, metrics
from flows.chunk_state import ChunkState, chunk_ids, lineage_key
from flows.embed_steps import Pipeline, Work
from flows.kafka.io import InputMessage
from flows.settings import Settings
from operators import ExtractorPool


def work(doc_id: str, ids: list[str], topic: str = "documents", partition: int = 0, offset: int = 0) -> Work:
    """One UPSERT of the batch step, as far as the state sees it."""
    message = InputMessage(topic, partition, offset, doc_id.encode(), b"", None)
    return Work(message, event={"doc_id": doc_id, "op": "UPSERT"}, ids=ids, fresh=[True] * len(ids))


def ids_of(doc: int, chunks: int = 38) -> list[str]:
    return [hashlib.sha256(f"{doc}/{c}".encode()).hexdigest() for c in range(chunks)]


def unreachable_broker() -> str:
    """host:port where nothing listens: a restore from it can never finish."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_the_state_stays_under_its_bound_while_documents_keep_coming():
    bound = 2 * 1024 * 1024  # about 3,500 documents of 38 chunks
    settings = Settings.from_env({"EMBEDSTREAM_STATE_MAX_BYTES": str(bound)}, incremental=True)
    state = ChunkState(settings, restore=False)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        highest = 0
        for start in range(0, 20_000, 500):  # 20,000 documents: 5 times the bound
            batch = [
                work(f"tenant-7/docs/document-{d:08d}.pdf", ids_of(d)) for d in range(start, start + 500)
            ]
            state.mark_fresh(batch)
            state.remember(batch)
            del batch
            highest = max(highest, tracemalloc.get_traced_memory()[0] - before)
    finally:
        tracemalloc.stop()
    # What the process really holds (the dict, its keys, the packed ids), not only
    # what the state counts; a little slack for the allocator's own bookkeeping.
    assert highest <= bound * 1.1, f"the state grew to {highest / 2**20:.1f} MiB over a bound of 2 MiB"
    assert state.bytes() <= bound
    assert metrics.STATE_BYTES._value.get() == state.bytes()
    assert metrics.STATE_DOCUMENTS._value.get() == state.documents()
    assert 2_500 < state.documents() < 5_000
    # The least recently used went first: the newest document is still known, the first is not.
    newest, first = (
        work("tenant-7/docs/document-00019999.pdf", ids_of(19_999)),
        work("tenant-7/docs/document-00000000.pdf", ids_of(0)),
    )
    state.mark_fresh([newest, first])
    assert not any(newest.fresh) and all(first.fresh)


def test_an_evicted_document_is_embedded_again_in_full_and_right(minilm):
    """Room for about one document: after another one came, an edit of the first embeds
    every chunk, and each vector equals a full-mode run's."""
    env = {"EMBEDSTREAM_STATE_MAX_BYTES": "700"}
    settings = Settings.from_env(env, incremental=True, max_tokens=int(MAX_TOKENS))
    first = doc_text(1)
    second = edited(first, random.Random(3))
    messages = [
        InputMessage("documents", 0, offset, *upsert(doc_id, text), None)
        for offset, (doc_id, text) in enumerate(
            [("doc-1", first), ("doc-2", doc_text(2)), ("doc-1", second), ("doc-1", second)]
        )
    ]
    with ExtractorPool(1) as pool:
        incremental = Pipeline(settings, minilm, pool=pool, state=ChunkState(settings, restore=False))
        full = Pipeline(Settings(max_tokens=int(MAX_TOKENS), chunking="stable"), minilm, pool=pool)
        incremental.process(messages[:2])  # doc-2 evicts doc-1
        assert incremental.state.documents() == 1
        got = records(incremental.process(messages[2:3]))
        want = records(full.process(messages[2:3]))
        # The document it now holds stays incremental: published again unchanged, no record.
        again = records(incremental.process(messages[3:]))
    lineage = lineage_key(minilm.model_id, minilm.model_revision, "f32", None, minilm.dim)
    chunks = incremental.chunker.chunk("\n\n".join(second))
    assert set(got) == set(want) == set(chunk_ids("doc-1", [c.text.encode() for c in chunks], lineage))
    for chunk_id, record in want.items():
        a, b = np.asarray(got[chunk_id]["embedding"]), np.asarray(record["embedding"])
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.99999
        assert got[chunk_id]["text"] == record["text"]
    assert again == {}


def records(out) -> dict[str, dict]:
    found = {}
    for m in out:
        if m.value is None or m.topic != "vectors":
            continue
        kind, record = codecs.decode_output(m.value, m.headers)
        if kind == "VectorRecord":
            found[record["chunk_id"]] = record
    return found


def test_a_restore_that_cannot_finish_in_its_deadline_reports_an_error(caplog):
    env = {"EMBEDSTREAM_STATE_RESTORE_DEADLINE_S": "3"}
    state = ChunkState(Settings.from_env(env, brokers=unreachable_broker(), incremental=True))
    failures = metrics.STATE_RESTORE_FAILURES._value.get()
    item = work("doc-0", ids_of(0, chunks=4), partition=5)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="embedstream.state"):
        state.mark_fresh([item])
    took = time.monotonic() - started
    assert took < 3 + 20, f"the restore took {took:.1f} s past a deadline of 3 s"
    assert any(
        "chunk state of input partition 5" in r.getMessage() and "3 s" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert metrics.STATE_RESTORE_FAILURES._value.get() == failures + 1
    assert item.fresh == [True] * 4  # nothing known: embedded in full, never wrong
    # The partition goes on with what this worker learns; it is not read again on each batch.
    state.remember([item])
    again = work("doc-0", ids_of(0, chunks=4), partition=5)
    started = time.monotonic()
    state.mark_fresh([again])
    assert time.monotonic() - started < 2 and again.fresh == [False] * 4


def test_restores_of_two_partitions_do_not_wait_for_each_other(caplog):
    """Both restores hang until their deadline: side by side, each begins before the
    other ends (one lock for the process would run them one after the other)."""
    env = {"EMBEDSTREAM_STATE_RESTORE_DEADLINE_S": "4"}
    state = ChunkState(Settings.from_env(env, brokers=unreachable_broker(), incremental=True))
    errors: list[BaseException] = []

    def restore(partition: int) -> None:
        try:
            state.mark_fresh([work(f"doc-{partition}", ids_of(partition, chunks=2), partition=partition)])
        except BaseException as e:  # reported by the test
            errors.append(e)

    with caplog.at_level(logging.INFO, logger="embedstream.state"):
        threads = [threading.Thread(target=restore, args=(p,)) for p in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    began = {p: _when(caplog, f"reading back the chunk state of input partition {p}") for p in (0, 1)}
    ended = {p: _when(caplog, f"the chunk state of input partition {p} could not be") for p in (0, 1)}
    assert max(began.values()) < min(ended.values()), (began, ended)


def _when(caplog, text: str) -> float:
    found = [r.created for r in caplog.records if text in r.getMessage()]
    assert found, f"no log line with {text!r}: {[r.getMessage() for r in caplog.records]}"
    return found[0]
