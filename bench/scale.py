"""Horizontal scaling: the same 4-partition topic drained by 1 process, then by a
2-process Bytewax cluster, on the local broker. Prints docs/s of each and the ratio.

    python bench/scale.py [--docs 600]

On a small machine the processes share its cores: the ratio shows what a second
process buys there, not what a second machine would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from corpus import paragraphs  # noqa: E402
from kafka_helpers import FlowTopics, avro_event, free_port, run_args  # noqa: E402

from flows.kafka.local import LocalKafka  # noqa: E402


def drain(topics: FlowTopics, processes: int, group: str) -> float:
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    base = run_args(topics, "--until-end", "--from", "beginning")
    env = {**os.environ, "EMBEDSTREAM_GROUP_ID": group}
    started = time.perf_counter()
    cluster = ["-a", addresses] if processes > 1 else []
    procs = [
        subprocess.Popen(
            [*base, *(["-i", str(i)] if processes > 1 else []), *cluster],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(processes)
    ]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"a worker exited with {p.returncode}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=600)
    args = parser.parse_args()
    topics = FlowTopics(LocalKafka().start(), partitions=4)
    texts = paragraphs(args.docs)
    topics.produce(
        [
            (f"d{i}".encode(), avro_event(f"d{i}", content=t.encode(), filename="p.txt"))
            for i, t in enumerate(texts)
        ]
    )
    one = drain(topics, 1, f"scale-{uuid.uuid4().hex[:6]}")
    two = drain(topics, 2, f"scale-{uuid.uuid4().hex[:6]}")
    print(
        json.dumps(
            {
                "benchmark": "scale",
                "docs": args.docs,
                "partitions": 4,
                "cpus": os.cpu_count(),
                "one_process": {"seconds": round(one, 1), "docs_per_s": round(args.docs / one, 1)},
                "two_processes": {"seconds": round(two, 1), "docs_per_s": round(args.docs / two, 1)},
                "ratio_two_vs_one": round(one / two, 2),
                "note": "wall time includes process start and model load (a few seconds each run)",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
