"""Horizontal scaling: the same 4-partition topic drained by 1 process, by 2 members
of a consumer group (group mode, the default), and by a 2-process Bytewax cluster, on
the local broker; then a member joining a running one. Prints docs/s of each, the
ratios, and how long the joining member took to own partitions.

    python bench/scale.py [--docs 600]

On a small machine the processes share its cores: the ratios show what a second
process buys there, not what a second machine would.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import machine  # noqa: E402
from corpus import paragraphs  # noqa: E402
from kafka_helpers import FlowTopics, avro_event, free_port, run_args  # noqa: E402

from flows.dev.kafka import LocalKafka  # noqa: E402


def drain(topics: FlowTopics, processes: int, scaling: str) -> float:
    group = f"scale-{uuid.uuid4().hex[:6]}"
    base = run_args(topics, "--until-end", "--from", "beginning", "--group-id", group, "--scaling", scaling)
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*base, *(["-i", str(i), "-a", addresses] if scaling == "cluster" else [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(processes)
    ]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"a worker exited with {p.returncode}")
    return time.perf_counter() - started


def _stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def join(topics: FlowTopics) -> dict[str, float]:
    """A second member joins a running one: seconds from its start to owning partitions
    (process start and imports included), and the first member's partitions moved."""
    group = f"scale-{uuid.uuid4().hex[:6]}"
    base = run_args(topics, "--from", "beginning", "--group-id", group, "--scaling", "group")
    logs = [tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) for _ in range(2)]
    first = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=logs[0])
    try:
        while "assigned " not in Path(logs[0].name).read_text():
            time.sleep(0.2)
        time.sleep(5)  # the first member is busy embedding
        joined_at = time.time()
        second = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=logs[1])
        try:
            while "assigned " not in Path(logs[1].name).read_text():
                time.sleep(0.1)
            assigned = next(ln for ln in Path(logs[1].name).read_text().splitlines() if "assigned " in ln)
        finally:
            second.terminate()
            second.wait(timeout=300)
    finally:
        first.terminate()
        first.wait(timeout=300)
    revoked = [ln for ln in Path(logs[0].name).read_text().splitlines() if "revoked " in ln]
    moved = len(re.search(r"\[([\d, ]*)\]", revoked[0]).group(1).split(",")) if revoked else 0
    return {"join_to_owning_s": round(_stamp(assigned) - joined_at, 2), "partitions_moved": moved}


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
    one = drain(topics, 1, "group")
    two_members = drain(topics, 2, "group")
    two_cluster = drain(topics, 2, "cluster")
    print(
        json.dumps(
            {
                "benchmark": "scale",
                "machine": machine.describe(),
                "docs": args.docs,
                "partitions": 4,
                "one_process": {"seconds": round(one, 1), "docs_per_s": round(args.docs / one, 1)},
                "two_group_members": {
                    "seconds": round(two_members, 1),
                    "docs_per_s": round(args.docs / two_members, 1),
                },
                "two_process_cluster": {
                    "seconds": round(two_cluster, 1),
                    "docs_per_s": round(args.docs / two_cluster, 1),
                },
                "ratio_two_members_vs_one": round(one / two_members, 2),
                "ratio_two_members_vs_cluster": round(two_cluster / two_members, 2),
                "joining_member": join(topics),
                "note": "wall time includes process start and model load (a few seconds each run)",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
