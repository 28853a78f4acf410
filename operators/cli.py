"""The ``embedstream`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

SAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "samples"


def _files(paths: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        found.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return found


def _short(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def cmd_models(args: argparse.Namespace) -> int:
    from . import models

    if args.action == "pull":
        path = models.pull(force=args.force)
        print(f"{models.DEFAULT_MODEL_ID} ready in {path}")
    else:
        print(models.default_model_dir())
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from . import ExtractionError, extract

    failures = 0
    for path in _files(args.paths):
        try:
            doc = extract(path.read_bytes(), filename=path.name)
        except ExtractionError as e:
            failures += 1
            print(f"{path.name}: FAILED {e.reason}: {e.message}")
            continue
        what = f"{doc.image.width}x{doc.image.height} image" if doc.image else f"{len(doc.text)} chars"
        print(f"{path.name}: {doc.mime_type}, {what}, {len(doc.pages)} page(s), title={doc.title!r}")
        if doc.text:
            print(f"    {_short(doc.text)}")
    return 1 if failures and args.strict else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Extract → chunk → embed on files, printing a compact view of each chunk's vector."""
    from . import Embedder, ExtractionError, extract

    embedder = Embedder.load(args.model)
    chunker = embedder.chunker(args.max_tokens)
    print(embedder)
    started, n_chunks, n_tokens = time.perf_counter(), 0, 0
    for path in _files(args.paths or [str(SAMPLES)]):
        try:
            doc = extract(path.read_bytes(), filename=path.name)
        except ExtractionError as e:
            print(f"\n{path.name}: dead letter (extract, {e.reason}): {e.message}")
            continue
        if doc.image is not None:
            print(f"\n{path.name}: {doc.image.width}x{doc.image.height} image: no image model configured")
            continue
        chunks = chunker.chunk(doc)
        vectors = embedder.embed([c.text for c in chunks])
        print(f"\n{path.name}: {doc.mime_type}, title={doc.title!r}, {len(chunks)} chunk(s)")
        for chunk, vector in zip(chunks, vectors):
            head = ", ".join(f"{x:+.4f}" for x in vector[:4])
            page = f" p{chunk.page}" if chunk.page else ""
            print(
                f"  #{chunk.index}{page} [{chunk.char_start}:{chunk.char_end}] {chunk.n_tokens:>3} tok "
                f"[{head}, …] {_short(chunk.text, 48)!r}"
            )
        n_chunks += len(chunks)
        n_tokens += sum(c.n_tokens for c in chunks)
    elapsed = time.perf_counter() - started
    print(f"\n{n_chunks} chunks, {n_tokens} tokens in {elapsed:.2f} s ({n_tokens / elapsed:,.0f} tokens/s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedstream", description="Streaming embeddings: extract, chunk and embed documents."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="manage the model cache")
    models.add_argument("action", choices=["pull", "path"], help="pull the default model, or print its path")
    models.add_argument("--force", action="store_true", help="download again even if present")
    models.set_defaults(func=cmd_models)

    extract = sub.add_parser("extract", help="extract files and print a summary of each")
    extract.add_argument("paths", nargs="+", help="files or directories")
    extract.add_argument("--strict", action="store_true", help="exit 1 if any file fails")
    extract.set_defaults(func=cmd_extract)

    demo = sub.add_parser("demo", help="run extract → chunk → embed on files (default: the samples)")
    demo.add_argument("paths", nargs="*", help=f"files or directories (default: {SAMPLES})")
    demo.add_argument("--model", default="default", help="model directory or hub id (default: MiniLM)")
    demo.add_argument("--max-tokens", type=int, default=None, help="chunk size in tokens")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import EmbedstreamError

    try:
        return args.func(args)
    except EmbedstreamError as e:
        print(f"embedstream: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
