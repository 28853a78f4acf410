"""Soak: sustained load on the local broker for N minutes, sampling the worker's memory
(RSS of the worker and its extraction children) and its consumer lag.

    python bench/soak.py [--minutes 10] [--rate 20]

Prints one JSON object: the samples and the RSS trend over the second half (flat is
good), and whether every event came out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import docgen  # noqa: E402
from corpus import paragraphs  # noqa: E402
from kafka_helpers import avro_event  # noqa: E402

from flows.dev.kafka import LocalKafka  # noqa: E402
from flows.kafka.topics import create  # noqa: E402
from flows.settings import Settings  # noqa: E402


def rss_kb(pid: int) -> int:
    """RSS of a process and its children (the extraction pool)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if int(entry) != pid and ppid != pid:
                continue
            with open(f"/proc/{entry}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=20, help="documents per second")
    parser.add_argument("--every", type=float, default=15, help="seconds between samples")
    args = parser.parse_args()

    bootstrap = LocalKafka().start()
    prefix = f"soak{uuid.uuid4().hex[:6]}"
    settings = Settings(brokers=bootstrap)
    for name in (f"{prefix}.documents", f"{prefix}.vectors", f"{prefix}.dlq"):
        create(settings, name, 2)
    texts = paragraphs(1000)
    pdf = docgen.make_pdf(["A page of a report.\nWith two lines."] * 3)
    port = 9471
    log = open(f"/tmp/{prefix}.log", "w")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--brokers",
            bootstrap,
            "--input-topic",
            f"{prefix}.documents",
            "--output-topic",
            f"{prefix}.vectors",
            "--dlq-topic",
            f"{prefix}.dlq",
            "--metrics-port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": "true"})
    sent = [0]
    stop = threading.Event()

    def produce() -> None:
        interval = 1 / args.rate
        next_at = time.monotonic()
        while not stop.is_set():
            i = sent[0]
            if i % 10 == 9:
                value = avro_event(f"d{i}", content=pdf, filename="r.pdf")
            else:
                value = avro_event(f"d{i}", content=texts[i % len(texts)].encode(), filename="p.txt")
            producer.produce(f"{prefix}.documents", value, f"d{i}".encode())
            producer.poll(0)
            sent[0] += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        producer.flush(30)

    time.sleep(8)  # model load
    thread = threading.Thread(target=produce, daemon=True)
    started = time.monotonic()
    thread.start()
    samples = []
    while time.monotonic() - started < args.minutes * 60:
        time.sleep(args.every)
        try:
            m = scrape(port)
        except OSError:
            continue
        lag = sum(v for k, v in m.items() if k.startswith("embedstream_consumer_lag{"))
        events = sum(v for k, v in m.items() if k.startswith("embedstream_events_total{"))
        rss_mb = round(rss_kb(worker.pid) / 1024, 1)
        t_s = round(time.monotonic() - started)
        samples.append({"t_s": t_s, "rss_mb": rss_mb, "lag": lag, "events_out": events, "events_in": sent[0]})
        print(json.dumps(samples[-1]), file=sys.stderr)
    stop.set()
    thread.join()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = scrape(port)
        if sum(v for k, v in m.items() if k.startswith("embedstream_events_total{")) >= sent[0]:
            break
        time.sleep(2)
    final = scrape(port)
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(timeout=120)
    # RSS swings with each batch's tensors (freed memory goes back to the OS), so the
    # trend is a least-squares slope over all samples, and halves are compared by median.
    import statistics

    slope = 0.0
    if len(samples) >= 2:
        ts = [s["t_s"] / 60 for s in samples]
        rs = [s["rss_mb"] for s in samples]
        mt, mr = statistics.fmean(ts), statistics.fmean(rs)
        slope = sum((t - mt) * (r - mr) for t, r in zip(ts, rs)) / sum((t - mt) ** 2 for t in ts)
    half = len(samples) // 2
    print(
        json.dumps(
            {
                "benchmark": "soak",
                "minutes": args.minutes,
                "rate_docs_per_s": args.rate,
                "events_in": sent[0],
                "events_out": sum(v for k, v in final.items() if k.startswith("embedstream_events_total{")),
                "dead_letters": sum(
                    v for k, v in final.items() if k.startswith("embedstream_dead_letters_total{")
                ),
                "rss_mb_first": samples[0]["rss_mb"] if samples else None,
                "rss_mb_max": max(s["rss_mb"] for s in samples) if samples else None,
                "rss_mb_last": samples[-1]["rss_mb"] if samples else None,
                "rss_slope_mb_per_min": round(slope, 2),
                "rss_mb_median_first_half": statistics.median(s["rss_mb"] for s in samples[:half])
                if half
                else None,
                "rss_mb_median_second_half": statistics.median(s["rss_mb"] for s in samples[half:])
                if half
                else None,
                "lag_max": max(s["lag"] for s in samples) if samples else None,
                "worker_exit": code,
                "samples": samples,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
