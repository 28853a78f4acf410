"""One short query through the library, in-process, in each CPU dtype: the model call
that ``embedstream serve`` makes for a single query at concurrency 1, without the
server. A one-text forward pass reads every weight once for a few rows of work, so its
time follows the weights' size (f32, bf16, q8) more than their FLOPs.

    python bench/single_query.py [--calls 400] > result.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import machine

from operators import Embedder, UnsupportedError

QUERY = "how does the sink keep the vector store in step?"  # bench/serve.py's query


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--dtypes", default="f32,bf16,q8")
    args = parser.parse_args()
    result: dict[str, object] = {"benchmark": "single_query", "machine": machine.describe(), "query": QUERY}
    for dtype in args.dtypes.split(","):
        try:
            embedder = Embedder.load("default", dtype=dtype)
        except UnsupportedError as error:
            result[dtype] = f"unsupported: {error}"
            continue
        result["tokens"] = embedder.count_tokens([QUERY])[0]
        for _ in range(30):  # warm-up
            embedder.embed([QUERY])
        times = []
        for _ in range(args.calls):
            started = time.perf_counter()
            embedder.embed([QUERY])
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        result[dtype] = {
            "calls": args.calls,
            "median_ms": round(statistics.median(times), 2),
            "p10_ms": round(times[len(times) // 10], 2),
            "p90_ms": round(times[9 * len(times) // 10], 2),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
