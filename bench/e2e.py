"""End to end: Kafka in → vector records out on the local broker, against the raw
``Embedder.embed`` throughput on the same texts, in the same run.

    python bench/e2e.py [--docs 3000]

The documents are paragraphs of CPython's documentation as plain-text events. The
flow runs as `embedstream run --until-end`, once on the documents and once on an
empty topic; the difference of the two wall times is the processing time, so
process start, model load and shutdown are not counted against the flow. Prints
one JSON object with tokens/s of both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from corpus import paragraphs  # noqa: E402
from kafka_helpers import FlowTopics, avro_event, run_args  # noqa: E402

import operators  # noqa: E402
from flows.dev.kafka import LocalKafka  # noqa: E402


def drain(topics: FlowTopics, *extra: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        run_args(topics, "--until-end", "--from", "beginning", *extra),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=1800,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, help="the flow's micro-batch (default: its own)")
    args = parser.parse_args()
    extra = ["--batch-size", str(args.batch_size)] if args.batch_size else []
    base = paragraphs(1000)
    texts = [base[i % len(base)] for i in range(args.docs)]

    # The raw baseline embeds exactly the chunks the flow will embed.
    embedder = operators.Embedder.load()
    chunker = embedder.chunker()
    chunks = [c.text for t in texts for c in chunker.chunk(operators.extract(t.encode(), filename="p.txt"))]
    tokens = sum(min(n, embedder.max_tokens) for n in embedder.count_tokens(chunks))
    embedder.embed(chunks[:32])
    started = time.perf_counter()
    embedder.embed(chunks)
    raw_seconds = time.perf_counter() - started

    bootstrap = LocalKafka().start()
    empty = FlowTopics(bootstrap, partitions=2)
    overhead = drain(empty, *extra)
    topics = FlowTopics(bootstrap, partitions=2)
    topics.produce(
        [
            (f"d{i}".encode(), avro_event(f"d{i}", content=t.encode(), filename="p.txt"))
            for i, t in enumerate(texts)
        ]
    )
    total = drain(topics, *extra)
    records = len(topics.read(topics.output))
    flow_seconds = total - overhead
    print(
        json.dumps(
            {
                "benchmark": "e2e",
                "docs": args.docs,
                "chunks": len(chunks),
                "batch_size": args.batch_size or "default",
                "tokens": tokens,
                "records_out": records,
                "cpus": os.cpu_count(),
                "raw_embed": {"seconds": round(raw_seconds, 2), "tokens_per_s": round(tokens / raw_seconds)},
                "flow": {
                    "seconds": round(flow_seconds, 2),
                    "wall_seconds": round(total, 2),
                    "startup_and_shutdown_seconds": round(overhead, 2),
                    "tokens_per_s": round(tokens / flow_seconds),
                },
                "ratio_flow_vs_raw_embed": round(raw_seconds / flow_seconds, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
