"""End to end: Kafka in → vector records out on the local broker, against the raw
``Embedder.embed`` throughput on the same texts, in the same run.

    python bench/e2e.py [--docs 3000]

The documents are paragraphs of CPython's documentation as plain-text events. The
flow runs as `embedstream run --until-end`, once on the documents and once on an
empty topic; the difference of the two wall times is the processing time, so
process start, model load and shutdown are not counted against the flow. Prints
one JSON object with tokens/s of both and their ratio.

    python bench/e2e.py --exactly-once-compare [--docs 1200] [--batch-sizes 8,32,128,512]

compares the same drain at-least-once and with ``--exactly-once`` (one Kafka
transaction per micro-batch), alternating the two, at each batch size (the flow's
default included): throughput, and the end-to-end latency a read_committed consumer
sees (event time to the record's arrival) while a member takes a steady trickle of
events. Reports the smallest batch size where exactly-once costs under 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import machine  # noqa: E402
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


#: What --exactly-once adds to a run's flags.
EXACTLY_ONCE = ("--exactly-once", "--member-name", "bench")


def drain_rate(topics: FlowTopics, docs: int, overhead_s: float, *extra: str) -> float:
    """Docs/s of one drain of ``topics`` under a fresh group, less ``overhead_s``
    (process start, model load and shutdown: a drain of a one-document topic)."""
    total = drain(topics, "--group-id", f"bench-{uuid.uuid4().hex[:8]}", *extra)
    return docs / max(total - overhead_s, 1e-3)


def latencies(bootstrap: str, texts: list[str], rate: float, *extra: str) -> dict[str, float]:
    """A running member takes ``rate`` events a second; a read_committed consumer notes
    when each document's manifest arrives. Returns the median and 95th percentile of
    event time to arrival, in seconds."""
    from confluent_kafka import Consumer

    from flows import codecs

    topics = FlowTopics(bootstrap, partitions=2)
    member = subprocess.Popen(
        run_args(topics, "--from", "beginning", *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topics.output])
    arrived: dict[str, float] = {}
    sent: dict[str, float] = {}
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            msg = consumer.poll(0.05)
            if msg is None or msg.error():
                continue
            kind, record = codecs.decode_output(msg.value(), msg.headers())
            if kind == "DocManifest":
                arrived.setdefault(record["doc_id"], time.time())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        time.sleep(8)  # the member starts, loads the model and joins
        for i, text in enumerate(texts):
            doc_id = f"l{i}"
            sent[doc_id] = time.time()
            topics.produce([(doc_id.encode(), avro_event(doc_id, content=text.encode(), filename="p.txt"))])
            time.sleep(max(0.0, sent[doc_id] + 1 / rate - time.time()))
        deadline = time.time() + 120
        while len(arrived) < len(sent) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        done.set()
        reader.join()
        consumer.close()
        member.terminate()
        member.wait(timeout=300)
    seconds = sorted(arrived[d] - sent[d] for d in sent if d in arrived)
    return {
        "median_s": round(statistics.median(seconds), 3),
        "p95_s": round(seconds[int(0.95 * (len(seconds) - 1))], 3),
        "received": len(seconds),
        "sent": len(sent),
    }


def compare_exactly_once(docs: int, batch_sizes: list[int], trickle_docs: int = 60, repeats: int = 2) -> dict:
    from flows.settings import CPU_BATCH_SIZE

    bootstrap = LocalKafka().start()
    base = paragraphs(1000)
    texts = [base[i % len(base)] for i in range(docs)]
    topics = FlowTopics(bootstrap, partitions=2)
    topics.produce(
        [
            (f"d{i}".encode(), avro_event(f"d{i}", content=t.encode(), filename="p.txt"))
            for i, t in enumerate(texts)
        ]
    )
    sizes = sorted(set(batch_sizes) | {CPU_BATCH_SIZE})
    # Start, model load and shutdown do not depend on the batch size: measured once each,
    # as the drain of one document (the model loads on the first batch).
    empty = FlowTopics(bootstrap, partitions=2)
    empty.produce([(b"one", avro_event("one", content=texts[0].encode(), filename="p.txt"))])
    overhead = {
        "at_least_once": drain(empty, "--group-id", f"bench-{uuid.uuid4().hex[:8]}"),
        "exactly_once": drain(empty, "--group-id", f"bench-{uuid.uuid4().hex[:8]}", *EXACTLY_ONCE),
    }
    throughput = {}
    for size in sizes:
        flags = ("--batch-size", str(size))
        runs: dict[str, list[float]] = {"at_least_once": [], "exactly_once": []}
        for _ in range(repeats if size == CPU_BATCH_SIZE else 1):  # alternated: the CPU is shared
            runs["at_least_once"].append(drain_rate(topics, docs, overhead["at_least_once"], *flags))
            runs["exactly_once"].append(
                drain_rate(topics, docs, overhead["exactly_once"], *flags, *EXACTLY_ONCE)
            )
        alo, eos = (statistics.median(runs[k]) for k in ("at_least_once", "exactly_once"))
        throughput[str(size)] = {
            "at_least_once_docs_per_s": [round(r, 1) for r in runs["at_least_once"]],
            "exactly_once_docs_per_s": [round(r, 1) for r in runs["exactly_once"]],
            "ratio_exactly_once_vs_at_least_once": round(eos / alo, 3),
        }
    under_5 = [s for s in sizes if throughput[str(s)]["ratio_exactly_once_vs_at_least_once"] >= 0.95]
    trickle = base[:trickle_docs]
    return {
        "benchmark": "e2e-exactly-once",
        "machine": machine.describe(),
        "docs": docs,
        "partitions": 2,
        "default_batch_size": CPU_BATCH_SIZE,
        "startup_and_shutdown_seconds": {k: round(v, 2) for k, v in overhead.items()},
        "throughput_by_batch_size": throughput,
        "batch_sizes_costing_under_5_percent": under_5,
        "latency_at_4_docs_per_s_default_batch": {
            "at_least_once": latencies(bootstrap, trickle, 4.0),
            "exactly_once": latencies(bootstrap, trickle, 4.0, *EXACTLY_ONCE),
        },
        "note": "one member on the local broker; docs/s less process start and model load; "
        "latency from produce to a read_committed consumer receiving the manifest",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, help="the flow's micro-batch (default: its own)")
    parser.add_argument(
        "--exactly-once-compare", action="store_true", help="at-least-once against --exactly-once"
    )
    parser.add_argument("--batch-sizes", default="8,32,128", help="with --exactly-once-compare")
    parser.add_argument("--trickle-docs", type=int, default=60, help="latency: events sent at 4 a second")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode at the default batch size")
    args = parser.parse_args()
    if args.exactly_once_compare:
        sizes = [int(s) for s in args.batch_sizes.split(",") if s]
        print(json.dumps(compare_exactly_once(args.docs, sizes, args.trickle_docs, args.repeats), indent=2))
        return
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
