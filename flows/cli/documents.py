"""``embedstream extract`` and ``demo``: the document library on local files, without Kafka."""

from __future__ import annotations

import argparse
import time

from flows.cli.shared import SAMPLES, Commands, files_in, short


def add_commands(sub: Commands) -> None:
    extract = sub.add_parser("extract", help="extract files and print a summary of each")
    extract.add_argument("paths", nargs="+", help="files or directories")
    extract.add_argument("--strict", action="store_true", help="exit 1 if any file fails")
    extract.set_defaults(func=cmd_extract)

    demo = sub.add_parser("demo", help="run extract → chunk → embed on files (default: the samples)")
    demo.add_argument("paths", nargs="*", help=f"files or directories (default: {SAMPLES})")
    demo.add_argument("--model", default="default", help="model directory or hub id (default: MiniLM)")
    demo.add_argument("--max-tokens", type=int, default=None, help="chunk size in tokens")
    demo.set_defaults(func=cmd_demo)


def cmd_extract(args: argparse.Namespace) -> int:
    from operators import ExtractionError, extract

    failures = 0
    for path in files_in(args.paths):
        try:
            doc = extract(path.read_bytes(), filename=path.name)
        except ExtractionError as e:
            failures += 1
            print(f"{path.name}: FAILED {e.reason}: {e.message}")
            continue
        if doc.image:
            what = f"{doc.image.width}x{doc.image.height} image"
        elif doc.audio:
            what = f"{doc.audio.duration_ms / 1000:.1f} s of audio"
        else:
            what = f"{len(doc.text)} chars"
        print(f"{path.name}: {doc.mime_type}, {what}, {len(doc.pages)} page(s), title={doc.title!r}")
        if doc.text:
            print(f"    {short(doc.text)}")
    return 1 if failures and args.strict else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Extract → chunk → embed on files, printing a compact view of each chunk's vector."""
    from operators import Embedder, ExtractionError, extract

    embedder = Embedder.load(args.model)
    chunker = embedder.chunker(args.max_tokens)
    print(embedder)
    started, n_chunks, n_tokens = time.perf_counter(), 0, 0
    for path in files_in(args.paths or [str(SAMPLES)]):
        try:
            doc = extract(path.read_bytes(), filename=path.name)
        except ExtractionError as e:
            print(f"\n{path.name}: dead letter (extract, {e.reason}): {e.message}")
            continue
        if doc.image is not None:
            print(f"\n{path.name}: {doc.image.width}x{doc.image.height} image: no image model configured")
            continue
        if doc.audio is not None:
            print(f"\n{path.name}: {doc.audio.duration_ms / 1000:.1f} s of audio: no audio model configured")
            continue
        chunks = chunker.chunk(doc)
        vectors = embedder.embed([c.text for c in chunks])
        print(f"\n{path.name}: {doc.mime_type}, title={doc.title!r}, {len(chunks)} chunk(s)")
        for chunk, vector in zip(chunks, vectors):
            head = ", ".join(f"{x:+.4f}" for x in vector[:4])
            page = f" p{chunk.page}" if chunk.page else ""
            print(
                f"  #{chunk.index}{page} [{chunk.char_start}:{chunk.char_end}] {chunk.n_tokens:>3} tok "
                f"[{head}, …] {short(chunk.text, 48)!r}"
            )
        n_chunks += len(chunks)
        n_tokens += sum(c.n_tokens for c in chunks)
    elapsed = time.perf_counter() - started
    print(f"\n{n_chunks} chunks, {n_tokens} tokens in {elapsed:.2f} s ({n_tokens / elapsed:,.0f} tokens/s)")
    return 0
