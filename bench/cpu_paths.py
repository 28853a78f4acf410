"""Our CPU paths against each other, in one process, timed in turn: each
``EMBEDSTREAM_CPU_KERNELS`` setting (our kernels and the GEMM's instruction set) and
each dtype, on the same model and texts. It answers "does AVX-512 GEMM lose anything
on this CPU?" and "how much faster than our f32 is bf16 here?" without the peer.

    python bench/cpu_paths.py [--texts 1000] [--repeat 5] [--paths auto:f32,avx2:f32,auto:bf16]

Each path is a ``KERNELS:DTYPE`` pair; the first is the baseline of the ratios. The
model is reloaded before every timed pass, since the kernel setting is read at load
and holds for the whole process. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine
from corpus import paragraphs
from embed import cosine_min

import operators
from operators.embed import cpu_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model", default="default")
    parser.add_argument("--paths", default="auto:f32,avx2:f32", help="comma-separated KERNELS:DTYPE")
    args = parser.parse_args()
    texts = paragraphs(args.texts)
    paths = [tuple(p.split(":")) for p in args.paths.split(",")]

    def load(kernels: str, dtype: str) -> operators.Embedder:
        os.environ["EMBEDSTREAM_CPU_KERNELS"] = kernels
        return operators.Embedder.load(args.model, dtype=dtype)

    host = machine.describe()  # before any path's setting is in force
    first = load(*paths[0])
    tokens = sum(min(n, first.max_tokens) for n in first.count_tokens(texts))
    described: dict[str, dict] = {}
    vectors = {}
    for kernels, dtype in paths:  # warm-up, and what each path runs
        embedder = load(kernels, dtype)
        vectors[(kernels, dtype)] = embedder.embed(texts)
        info = cpu_info()
        described[f"{kernels}:{dtype}"] = {"kernels": info["kernels"], "gemm": info["gemm"], "seconds": []}
    for _ in range(args.repeat):
        for kernels, dtype in paths:
            embedder = load(kernels, dtype)
            started = time.perf_counter()
            embedder.embed(texts)
            described[f"{kernels}:{dtype}"]["seconds"].append(time.perf_counter() - started)
    baseline_key = f"{paths[0][0]}:{paths[0][1]}"
    baseline = statistics.median(described[baseline_key]["seconds"])
    for (kernels, dtype), row in zip(paths, described.values()):
        median = statistics.median(row["seconds"])
        row["tokens_per_s"] = round(tokens / median, 1)
        row["tokens_per_s_range"] = [
            round(tokens / max(row["seconds"]), 1),
            round(tokens / min(row["seconds"]), 1),
        ]
        row["ratio_to_" + baseline_key] = round(baseline / median, 3)
        row["cosine_min_to_" + baseline_key] = round(
            cosine_min(vectors[(kernels, dtype)], vectors[paths[0]]), 6
        )
        row["seconds"] = [round(s, 3) for s in row["seconds"]]
    print(
        json.dumps(
            {
                "benchmark": "cpu_paths",
                "model": args.model,
                "texts": len(texts),
                "tokens": tokens,
                "repeat": args.repeat,
                "unit": "tokens/s: median of the timed passes, with their range",
                "machine": host,
                "paths": described,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
