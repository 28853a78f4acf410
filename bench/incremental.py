"""Re-embedding after edits: incremental mode against full mode, same documents, same run.

200 multi-page documents (by default): half are several of CPython's pydoc topics
concatenated (plain text), half are PDFs of such topics laid out as pages of wrapped
lines with a blank line between paragraphs. Every document gets one random
one-paragraph edit (a sentence inserted, deleted or changed) and is published again.
The second pass runs through the flow's own pipeline (extraction, chunking, the real
model) in three configurations:

- **full** — today's default: greedy chunking, every chunk embedded again;
- **incremental + greedy** — content-derived ids with today's chunker;
- **incremental + stable** — content-derived ids with the edit-stable chunker (the
  default of ``--incremental``).

It reports, for the second pass, chunks re-embedded (per document and as a fraction),
tokens embedded and seconds, the chunk-size distributions of both chunkers (first
pass), and the chunk state's size: bytes per document in memory and in the changelog,
and the memory of 1M documents' states.

    python bench/incremental.py [--docs 200] [--max-tokens N] [--seed 1]

Prints one JSON object. No broker: the state starts empty in memory, as a fresh worker's.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus
import docgen
import machine

from flows import codecs
from flows.chunk_state import ChunkState, pack
from flows.embed_steps import Pipeline
from flows.kafka.io import InputMessage
from flows.settings import Settings
from operators import Embedder, ExtractorPool

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def documents(n: int, rng: random.Random) -> list[tuple[str, list[str], bool]]:
    """``(doc_id, paragraphs, is_pdf)``: four pydoc topics each, every other one a PDF."""
    topics = list(corpus.topics().values())
    docs = []
    for i in range(n):
        paragraphs = [" ".join(p.split()) for t in rng.sample(topics, 4) for p in t.split("\n\n")]
        docs.append((f"doc-{i:04d}", [p for p in paragraphs if p], i % 2 == 1))
    return docs


def edit(paragraphs: list[str], rng: random.Random) -> tuple[list[str], str]:
    """One sentence inserted, deleted or changed in one paragraph of some length."""
    out = list(paragraphs)
    i = rng.choice([k for k, p in enumerate(out) if len(p) > 80])
    sentences = _SENTENCE_END.split(out[i])
    j = rng.randrange(len(sentences))
    kind = rng.choice(["insert", "delete", "modify"])
    if kind == "delete" and len(sentences) < 2:
        kind = "modify"
    if kind == "insert":
        sentences.insert(j, f"An editor added this sentence, number {rng.randrange(10**6)}, to the text.")
    elif kind == "delete":
        del sentences[j]
    else:
        words = sentences[j].split(" ")
        k = rng.randrange(len(words))
        words[k] = f"{words[k]} (revised)"
        sentences[j] = " ".join(words)
    out[i] = " ".join(sentences)
    return out, kind


def render(paragraphs: list[str], pdf: bool) -> tuple[bytes, str]:
    """The document's bytes and filename. PDF pages hold a fixed run of paragraphs
    (wrapped at 90 characters, blank lines between them): an edit grows or shrinks its
    own page and does not reflow the later ones."""
    if not pdf:
        return "\n\n".join(paragraphs).encode(), "doc.txt"
    pages = []
    for start in range(0, len(paragraphs), 6):
        pages.append("\n\n".join(textwrap.fill(p, 90) for p in paragraphs[start : start + 6]))
    return docgen.make_pdf(pages), "doc.pdf"


def messages(docs: list[tuple[str, list[str], bool]], first_offset: int) -> list[InputMessage]:
    out = []
    for n, (doc_id, paragraphs, pdf) in enumerate(docs):
        content, filename = render(paragraphs, pdf)
        event = {
            "doc_id": doc_id,
            "op": "UPSERT",
            "content": content,
            "uri": None,
            "mime_type": None,
            "filename": filename,
            "metadata": {},
            "event_time": codecs.now_ms(),
        }
        value = codecs.encode_single_object("DocumentEvent", event)
        out.append(InputMessage("documents", 0, first_offset + n, doc_id.encode(), value, None))
    return out


def run_pass(pipeline: Pipeline, batch: list[InputMessage], batch_size: int) -> dict[str, Any]:
    pipeline.counters = type(pipeline.counters)()
    started = time.perf_counter()
    for at in range(0, len(batch), batch_size):
        pipeline.process(batch[at : at + batch_size])
    seconds = time.perf_counter() - started
    c = pipeline.counters
    assert c.dead_letters == 0, "a document failed"
    return {"chunks": c.chunks + c.reused, "embedded": c.chunks, "tokens": c.tokens, "seconds": seconds}


def chunk_sizes(embedder: Embedder, max_tokens: Optional[int], strategy: str, docs, pool) -> dict[str, float]:
    from operators import extract

    chunker = embedder.chunker(max_tokens, strategy=strategy)
    sizes = []
    for _, paragraphs, pdf in docs:
        content, filename = render(paragraphs, pdf)
        sizes += [c.n_tokens for c in chunker.chunk(extract(content, filename=filename, pool=pool))]
    q = statistics.quantiles(sizes, n=10)
    return {
        "chunks": len(sizes),
        "mean_tokens": round(statistics.mean(sizes), 1),
        "p10": round(q[0], 1),
        "median": statistics.median(sizes),
        "p90": round(q[-1], 1),
    }


def state_size(docs: int, chunks_per_doc: int) -> dict[str, float]:
    """Memory of the state of ``docs`` documents of ``chunks_per_doc`` chunks (as a
    worker holds it: doc_id → packed id prefixes), measured with tracemalloc."""
    import hashlib

    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(chunks_per_doc)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state = {f"tenant-7/docs/document-{i:08d}.pdf": pack(ids) for i in range(docs)}
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    key = len(next(iter(state)).encode())
    del state
    return {
        "documents": docs,
        "chunks_per_document": chunks_per_doc,
        "memory_bytes_per_document": round(used / docs, 1),
        "memory_mib_per_1m_documents": round(used / docs * 1e6 / 2**20, 1),
        "changelog_bytes_per_document": key + len(pack(ids)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, help="chunk size (default: the model's limit)")
    parser.add_argument("--batch-size", type=int, default=64, help="events per micro-batch")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    before = documents(args.docs, rng)
    kinds: dict[str, int] = {}
    after = []
    for doc_id, paragraphs, pdf in before:
        edited, kind = edit(paragraphs, rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        after.append((doc_id, edited, pdf))
    first, second = messages(before, 0), messages(after, len(before))

    embedder = Embedder.load(args.model)
    pool = ExtractorPool(2)
    result: dict[str, Any] = {
        "benchmark": "incremental",
        "machine": machine.describe(),
        "model": embedder.model_id,
        "documents": args.docs,
        "pdfs": sum(pdf for _, _, pdf in before),
        "edits": kinds,
        "max_tokens": args.max_tokens or embedder.max_tokens,
    }
    modes = {
        "full": Settings(max_tokens=args.max_tokens),
        "incremental_greedy": Settings(max_tokens=args.max_tokens, incremental=True, chunking="greedy"),
        "incremental_stable": Settings(max_tokens=args.max_tokens, incremental=True),
    }
    for name, settings in modes.items():
        state = ChunkState(settings, restore=False) if settings.incremental else None
        pipeline = Pipeline(settings, embedder, pool=pool, state=state)
        run_pass(pipeline, first, args.batch_size)
        second_pass = run_pass(pipeline, second, args.batch_size)
        result[name] = {
            "chunking": settings.chunk_strategy(),
            "second_pass_chunks": second_pass["chunks"],
            "second_pass_embedded": second_pass["embedded"],
            "embedded_per_edit": round(second_pass["embedded"] / args.docs, 2),
            "fraction_embedded": round(second_pass["embedded"] / second_pass["chunks"], 4),
            "tokens_embedded": second_pass["tokens"],
            "second_pass_s": round(second_pass["seconds"], 2),
        }
        pipeline.threads.shutdown()
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)

    full, stable = result["full"], result["incremental_stable"]
    result["ratios"] = {
        "tokens_full_over_incremental": round(full["tokens_embedded"] / max(stable["tokens_embedded"], 1), 1),
        "second_pass_speedup": round(full["second_pass_s"] / stable["second_pass_s"], 1),
    }
    sizes = {s: chunk_sizes(embedder, args.max_tokens, s, before, pool) for s in ("greedy", "stable")}
    ratio = sizes["stable"]["mean_tokens"] / sizes["greedy"]["mean_tokens"]
    sizes["stable_mean_over_greedy"] = round(ratio, 3)
    result["chunk_sizes"] = sizes
    result["state"] = state_size(100_000, round(full["second_pass_chunks"] / args.docs))
    pool.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
