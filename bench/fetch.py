"""Documents by URI from a local S3 server against the same documents inline, through the
flow's own steps in one process (decode, fetch and extract, chunk, embed, encode).

The documents are plain text made of CPython's documentation paragraphs, of 2 to 500 KB
(log-uniform, seeded): small enough to also travel inline in a Kafka message. They are
put into a bucket of the local S3 server (SeaweedFS, ``flows.dev.s3``); then the
pipeline runs over the same documents as Avro DocumentEvents, once with ``content`` and
once with an ``s3://`` ``uri``, in micro-batches as the source cuts them (at most the
flow's batch size and ``batch_bytes`` of messages), alternating for ``--repeat`` rounds.
It reports documents/s and MB/s of both (median and range), their ratio, the fetches
in flight (the largest value of the ``embedstream_fetches_in_flight`` gauge, sampled
every millisecond), the fetch latency p50 and p99 over every fetch, and each step's
seconds (median per round; ``extract`` is fetch and extract together), which show where
the time goes: on a small CPU, chunking and embedding, the same work either way.

With ``--libraries`` it also reads every object straight from the server, without the
flow, with the same number of threads: through obstore (what the flow uses) and, where
it is installed (``pip install 'embedstream[bench-fetch]'``), boto3, the AWS SDK.

    python bench/fetch.py [--docs 2000] [--model DIR|default] [--repeat 3] [--libraries]

The model defaults to tests/data/tiny-bert-cls (a 2-layer BERT), so that fetching and
extraction weigh as they would next to a GPU; ``--model default`` runs MiniLM. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from corpus import paragraphs  # noqa: E402
from kafka_helpers import avro_event  # noqa: E402
from machine import describe  # noqa: E402

import operators  # noqa: E402
from flows import embed_steps, metrics  # noqa: E402
from flows.dev.s3 import LocalS3, free_base_port  # noqa: E402
from flows.embed_steps import Pipeline  # noqa: E402
from flows.kafka.io import InputMessage  # noqa: E402
from flows.settings import Settings  # noqa: E402


def documents(n: int, seed: int) -> list[bytes]:
    """``n`` texts of 2 to 500 KB, log-uniform, of whole paragraphs."""
    rng = random.Random(seed)
    base = paragraphs(1000)
    out = []
    for _ in range(n):
        size = int(math.exp(rng.uniform(math.log(2_000), math.log(500_000))))
        parts, total = [], 0
        while total < size:
            p = base[rng.randrange(len(base))]
            parts.append(p)
            total += len(p) + 2
        out.append("\n\n".join(parts).encode()[:size])
    return out


def batches(messages: list[InputMessage], size: int, max_bytes: int) -> list[list[InputMessage]]:
    """As the source cuts them: at most ``size`` events and ``max_bytes`` of payload."""
    out: list[list[InputMessage]] = [[]]
    held = 0
    for m in messages:
        if out[-1] and (len(out[-1]) >= size or held + m.size > max_bytes):
            out.append([])
            held = 0
        out[-1].append(m)
        held += m.size
    return out


STAGES = ("decode", "extract", "chunk", "embed", "encode")


def stage_seconds() -> dict[str, float]:
    """Seconds spent in each step so far (``embedstream_stage_seconds``; extract is
    fetch and extract)."""
    return {s: metrics.STAGE_SECONDS.labels(s)._sum.get() for s in STAGES}


def run(pipeline: Pipeline, messages: list[InputMessage], settings: Settings, stages: list) -> float:
    before = stage_seconds()
    started = time.perf_counter()
    for batch in batches(messages, settings.micro_batch_size(), settings.batch_bytes):
        out = pipeline.process(batch)
        letters = [m for m in out if m.topic == settings.dlq_topic]
        if letters:
            raise RuntimeError(f"{len(letters)} dead letters, e.g. {letters[0].value[:300]!r}")
    seconds = time.perf_counter() - started
    after = stage_seconds()
    stages.append({s: after[s] - before[s] for s in STAGES})
    return seconds


class Sampler:
    """The largest value of the fetches-in-flight gauge, sampled every millisecond."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, metrics.FETCHES_IN_FLIGHT._value.get())
            time.sleep(0.001)


def timed_fetches(latencies: list[float]) -> Callable[..., bytes]:
    """The flow's fetch, timed call by call (the histogram's buckets are too coarse for p99)."""
    original = embed_steps.fetch

    def fetch(*args: Any, **kwargs: Any) -> bytes:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            latencies.append(time.perf_counter() - started)

    return fetch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(seconds: list[float], docs: int, total_bytes: int, stages: list) -> dict[str, Any]:
    rates = [docs / s for s in seconds]
    return {
        "stage_seconds_median": {s: round(statistics.median(r[s] for r in stages), 2) for s in STAGES},
        "seconds": [round(s, 2) for s in seconds],
        "docs_per_s_median": round(statistics.median(rates), 1),
        "docs_per_s_range": [round(min(rates), 1), round(max(rates), 1)],
        "mb_per_s_median": round(total_bytes / 1e6 / statistics.median(seconds), 1),
    }


def libraries(server: LocalS3, bucket: str, keys: list[str], threads: int) -> dict[str, Any]:
    """Every object read straight from the server with ``threads`` threads, per library."""
    import obstore
    from obstore.store import S3Store

    results: dict[str, Any] = {}
    store = S3Store(bucket, **server.store_options())
    readers: dict[str, Callable[[str], bytes]] = {"obstore": lambda k: bytes(obstore.get(store, k).bytes())}
    try:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
            region_name=server.region,
            config=Config(max_pool_connections=threads),
        )
        readers["boto3"] = lambda k: client.get_object(Bucket=bucket, Key=k)["Body"].read()
    except ImportError:
        results["boto3"] = "not installed (pip install 'embedstream[bench-fetch]')"
    for name, read in readers.items():
        runs = []
        for _ in range(3):
            latencies: list[float] = []

            def one(key: str, read: Callable[[str], bytes] = read, latencies: list[float] = latencies) -> int:
                started = time.perf_counter()
                n = len(read(key))
                latencies.append(time.perf_counter() - started)
                return n

            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                total = sum(pool.map(one, keys))
            runs.append((time.perf_counter() - started, latencies, total))
        seconds = [r[0] for r in runs]
        median_run = sorted(runs, key=lambda r: r[0])[1]
        results[name] = {
            "seconds": [round(s, 2) for s in seconds],
            "objects_per_s_median": round(len(keys) / statistics.median(seconds), 1),
            "mb_per_s_median": round(median_run[2] / 1e6 / statistics.median(seconds), 1),
            "latency_p50_ms": round(percentile(median_run[1], 0.5) * 1000, 2),
            "latency_p99_ms": round(percentile(median_run[1], 0.99) * 1000, 2),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--model", default=str(ROOT / "tests/data/tiny-bert-cls"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="EMBEDSTREAM_FETCH_CONCURRENCY")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--libraries", action="store_true", help="also read the objects without the flow")
    args = parser.parse_args()

    texts = documents(args.docs, args.seed)
    total_bytes = sum(len(t) for t in texts)
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        server = LocalS3(port=free_base_port(), storage=Path(tmp))
        server.start()
        try:
            import obstore
            from obstore.store import S3Store

            bucket = "bench-fetch"
            server.create_bucket(bucket, versioned=False)
            store = S3Store(bucket, **server.store_options())
            keys = [f"docs/{i:05}.txt" for i in range(len(texts))]
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda kv: obstore.put(store, *kv), zip(keys, texts)))

            os.environ.update(server.env())  # the standard variables, as a deployment's
            settings = Settings(allowed_uris=(f"s3://{bucket}/",), fetch_concurrency=args.concurrency)
            embedder = operators.Embedder.load(args.model)
            pipeline = Pipeline(settings, embedder)
            inline = [
                InputMessage("documents", 0, i, k.encode(), avro_event(k, content=t, filename="d.txt"), 0)
                for i, (k, t) in enumerate(zip(keys, texts))
            ]
            by_uri = [
                InputMessage(
                    "documents",
                    0,
                    i,
                    k.encode(),
                    avro_event(k, uri=f"s3://{bucket}/{k}", filename="d.txt"),
                    0,
                )
                for i, k in enumerate(keys)
            ]
            run(pipeline, inline[:50], settings, [])  # warm: the model, the extraction processes
            run(pipeline, by_uri[:50], settings, [])
            latencies: list[float] = []
            embed_steps.fetch = timed_fetches(latencies)
            inline_s, s3_s, inline_stages, s3_stages = [], [], [], []
            retried = metrics.FETCH_RETRIES.labels("s3")._value.get()
            waits = metrics.OUTAGE_WAITS.labels("object store")._value.get()
            with Sampler() as sampler:
                for _ in range(args.repeat):
                    inline_s.append(run(pipeline, inline, settings, inline_stages))
                    s3_s.append(run(pipeline, by_uri, settings, s3_stages))
            pipeline.close()
            result: dict[str, Any] = {
                "benchmark": "fetch",
                "machine": describe(),
                "model": embedder.model_id,
                "documents": len(texts),
                "bytes": total_bytes,
                "document_kb": {
                    "min": round(min(map(len, texts)) / 1000, 1),
                    "median": round(statistics.median(map(len, texts)) / 1000, 1),
                    "max": round(max(map(len, texts)) / 1000, 1),
                },
                "micro_batch_size": settings.micro_batch_size(),
                "fetch_concurrency": args.concurrency,
                "extract_workers": settings.extract_workers,
                "repeat": args.repeat,
                "inline": summary(inline_s, len(texts), total_bytes, inline_stages),
                "s3": summary(s3_s, len(texts), total_bytes, s3_stages),
                "s3_over_inline": round(statistics.median(inline_s) / statistics.median(s3_s), 3),
                "fetches_in_flight_peak": int(sampler.peak),
                "fetch_latency_ms": {
                    "p50": round(percentile(latencies, 0.5) * 1000, 2),
                    "p99": round(percentile(latencies, 0.99) * 1000, 2),
                    "fetches": len(latencies),
                },
                "fetch_retries": int(metrics.FETCH_RETRIES.labels("s3")._value.get() - retried),
                "outage_waits": int(metrics.OUTAGE_WAITS.labels("object store")._value.get() - waits),
            }
            if args.libraries:
                result["libraries"] = libraries(server, bucket, keys, args.concurrency)
        finally:
            server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
