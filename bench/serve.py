"""``embedstream serve`` under load, against Infinity (``infinity-emb`` on PyTorch CPU)
serving the same model files on the same machine in the same run, servers timed in
turn; and, with ``--stack``, the ASGI servers it could run on, serving a trivial
Starlette app.

The load comes from a separate process (this script with ``--client``): asyncio
workers, one keep-alive HTTP/1.1 connection each, a closed loop (each worker sends its
next request when the last is answered). A configuration is measured in a steady
state: the window opens after a warm-up and once every worker has had its first answer,
and closes after its length once it holds two answers per worker; requests/s are the
answers completed in the window over its length, latencies (p50, p99) those answers'
times at the client. Workers finish their last request before the next configuration
starts, so none inherits a backlog.

Both servers get the same threads (``--threads``: RAYON_NUM_THREADS for ours,
OMP/MKL threads and torch's for Infinity) on the same cores as the client.

Setup of the peers' environments (never the project's .venv)::

    python3 -m venv ~/.cache/embedstream/serve-bench-venv
    ~/.cache/embedstream/serve-bench-venv/bin/pip install "infinity-emb[server,torch]==0.0.78"
    python3 -m venv ~/.cache/embedstream/asgi-bench-venv
    ~/.cache/embedstream/asgi-bench-venv/bin/pip install starlette==1.10.0 uvicorn==0.55.0 \\
        httptools==0.9.0 uvloop==0.23.0 granian==2.8.9

    python bench/serve.py [--stack] [--dtypes f32,bf16] > bench/results/serve-amd-epyc-avx512.json

Before and after a change, on the same minutes of a shared machine: the other version in
a worktree (with the native library the main tree built), both servers up at once::

    git worktree add /tmp/serve-base HEAD~1
    cp operators/_native*.so /tmp/serve-base/operators/
    python bench/serve.py --no-peer --baseline /tmp/serve-base --loads single_query,c64_texts32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CACHE = Path.home() / ".cache" / "embedstream"
#: About 12 tokens with MiniLM's tokenizer, special tokens included.
QUERY = "how does the sink keep the vector store in step?"
#: (concurrency, texts per request, seconds measured).
LOADS = [(1, 1, 5), (16, 1, 5), (64, 1, 6), (1, 32, 5), (16, 32, 8), (64, 32, 12)]
WARMUP_S = 2.0
#: Longest a load runs, warm-up included, however slow the server.
MAX_LOAD_S = 240.0


# --- the load generator (its own process) -------------------------------------------------------


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes) -> int:
    writer.write(head + body)
    status = int((await reader.readline()).split()[1])
    length, chunked = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
    if not chunked:
        await reader.readexactly(length)
        return status
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return status


async def _load(url: str, bodies: list[bytes], concurrency: int, warmup_s: float, window_s: float) -> dict:
    """The window opens after the warm-up and once every worker has had its first answer
    (until then the server works off the first burst of ``concurrency`` requests sent at
    once, not a steady state), and closes after ``window_s`` once it holds at least two
    answers per worker. A fixed window would keep only the answers that came back inside
    it: a slow server's long latencies would fall out of its p99."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    started = time.perf_counter()
    give_up = started + MAX_LOAD_S
    window: list[float] = []  # [start, end] once every worker has had an answer
    first_answers = 0
    answered: list[tuple[float, float, int]] = []  # (sent, answered, status)

    def open_window(now: float) -> None:
        start = max(now, started + warmup_s)
        window.extend([start, start + window_s])

    def measuring(now: float) -> bool:
        if not window:
            return now < give_up
        inside = sum(1 for _, a, _ in answered if a >= window[0])
        return now < give_up and (now < window[1] or inside < 2 * concurrency)

    async def worker(n: int) -> None:
        nonlocal first_answers
        reader, writer = await asyncio.open_connection(host, int(port))
        i = n
        while measuring(time.perf_counter()):
            body = bodies[i % len(bodies)]
            i += concurrency
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            sent = time.perf_counter()
            status = await _one(reader, writer, head, body)
            now = time.perf_counter()
            answered.append((sent, now, status))
            if i - concurrency == n:  # this worker's first answer
                first_answers += 1
                if first_answers == concurrency:
                    open_window(now)
        writer.close()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    if not window:
        return {"requests": 0, "errors": 0}
    start = window[0]
    end = max(window[1], max(a for _, a, _ in answered))
    inside = [(s, a, st) for s, a, st in answered if a >= start]
    latencies = sorted(a - s for s, a, st in inside if st == 200)
    errors = sum(1 for _, _, st in inside if st != 200)
    if not latencies:
        return {"requests": 0, "errors": errors}
    return {
        "requests": len(latencies),
        "errors": errors,
        "window_s": round(end - start, 2),
        "warmup_s": round(start - started, 2),
        "requests_per_s": round(len(latencies) / (end - start), 2),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
    }


def client_main(args: argparse.Namespace) -> None:
    bodies = [line.encode() for line in Path(args.bodies).read_text().splitlines() if line]
    result = asyncio.run(_load(args.client, bodies, args.concurrency, args.warmup, args.window))
    print(json.dumps(result))


def run_client(
    url: str, bodies: list[dict], concurrency: int, window_s: float, warmup_s: float = WARMUP_S
) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("\n".join(json.dumps(b) for b in bodies))
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--client", url, "--bodies", f.name, "--concurrency", str(concurrency),
             "--warmup", str(warmup_s), "--window", str(window_s)],
            capture_output=True, text=True, timeout=MAX_LOAD_S + 300,
        )  # fmt: skip
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout)


# --- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    from kafka_helpers import free_port as free

    return free()


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready in {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def thread_env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "RAYON_NUM_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    }


def start_ours(
    port: int, dtype: str, threads: int, tree: Optional[Path] = None
) -> tuple[subprocess.Popen, str]:
    """``embedstream serve`` of this checkout, or of the checkout ``tree``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--dtype", dtype],
        env=thread_env(threads),
        cwd=tree,  # `python -m` imports flows and operators from the working directory first
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    return proc, f"http://127.0.0.1:{port}/v1/embeddings"


def start_infinity(port: int, venv: Path, model_dir: str, threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", model_dir, "--port", str(port),
         "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu", "--no-bettertransformer"],
        env=thread_env(threads),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"http://127.0.0.1:{port}/embeddings"


def vectors(url: str, model: str, texts: list[str]) -> Any:
    import numpy as np

    req = urllib.request.Request(
        url,
        data=json.dumps({"model": model, "input": texts, "encoding_format": "float"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return np.array([d["embedding"] for d in json.loads(r.read())["data"]], dtype=np.float32)


# --- the ASGI stack -----------------------------------------------------------------------------

TRIVIAL_APP = """
import json
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

BODY = json.dumps({"object": "list", "data": [{"object": "embedding", "index": 0,
                   "embedding": [0.0123456789] * 96}]}).encode()

async def embeddings(request):
    await request.body()
    return Response(BODY, media_type="application/json")

app = Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"])])
"""


def stack(venv: Path) -> dict[str, Any]:
    """Requests/s of a trivial Starlette app at concurrency 64 on each server."""
    py, granian = str(venv / "bin" / "python"), str(venv / "bin" / "granian")
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "trivial.py").write_text(TRIVIAL_APP)
        for name, command in {
            "uvicorn-h11-asyncio": [py, "-m", "uvicorn", "--http", "h11", "--loop", "asyncio"],
            "uvicorn-httptools-asyncio": [py, "-m", "uvicorn", "--http", "httptools", "--loop", "asyncio"],
            "uvicorn-httptools-uvloop": [py, "-m", "uvicorn", "--http", "httptools", "--loop", "uvloop"],
            "granian-asgi": [granian, "--interface", "asgi", "--workers", "1", "--no-ws"],
        }.items():
            port = free_port()
            tail = (
                ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"] if "uvicorn" in name else []
            )
            if "granian" in name:
                tail = ["--host", "127.0.0.1", "--port", str(port)]
            proc = subprocess.Popen(
                [*command, *tail, "trivial:app"],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                url = f"http://127.0.0.1:{port}/v1/embeddings"
                deadline = time.monotonic() + 30
                while True:
                    try:
                        vectors_ready = urllib.request.urlopen(
                            urllib.request.Request(url, data=b"{}", method="POST"), timeout=2
                        )
                        vectors_ready.close()
                        break
                    except OSError:
                        if time.monotonic() > deadline or proc.poll() is not None:
                            raise RuntimeError(f"{name} did not start") from None
                        time.sleep(0.2)
                body = {"model": "m", "input": QUERY}
                found[name] = run_client(url, [body], 64, 6)
                print(f"  {name}: {found[name]}", file=sys.stderr)
            finally:
                stop(proc)
    return found


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--bodies", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=float, default=WARMUP_S, help=argparse.SUPPRESS)
    p.add_argument("--window", type=float, default=5, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of each server")
    p.add_argument("--dtypes", default="f32", help="dtypes of embedstream to measure (f32 first)")
    p.add_argument("--peer-venv", type=Path, default=CACHE / "serve-bench-venv", help="infinity-emb's venv")
    p.add_argument("--stack", action="store_true", help="also measure the ASGI servers on a trivial app")
    p.add_argument("--asgi-venv", type=Path, default=CACHE / "asgi-bench-venv")
    p.add_argument("--no-peer", action="store_true", help="embedstream only")
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also serve from the checkout DIR (a git worktree of another version), as embedstream-base-f32",
    )
    p.add_argument(
        "--loads",
        help="only these loads, comma-separated: c1_texts1, c16_texts1, c64_texts1, c1_texts32, c16_texts32, "
        "c64_texts32, single_query (default: all)",
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds over every load and server")
    p.add_argument(
        "--quick", action="store_true", help="one-second windows: checks the script, measures nothing"
    )
    args = p.parse_args()
    if args.client:
        client_main(args)
        return

    loads = [(1, 1, 1), (4, 32, 1)] if args.quick else LOADS
    single_s = 1 if args.quick else 6
    every = [*loads, (1, 0, single_s)]
    if args.loads:
        wanted = set(args.loads.split(","))
        unknown = wanted - {load_key(c, n) for c, n, _ in every}
        if unknown:
            p.error(f"unknown loads: {', '.join(sorted(unknown))}")
        every = [(c, n, w) for c, n, w in every if load_key(c, n) in wanted]
    import corpus
    import machine
    import numpy as np

    from operators import Embedder, models

    model_dir = models.resolve("default")
    embedder = Embedder.load(model_dir)
    # Texts of 8 to 40 words: queries and short chunks.
    texts = [" ".join(t.split()[: 8 + i % 33]) for i, t in enumerate(corpus.paragraphs(1500))]
    tokens = embedder.count_tokens(texts)
    result: dict[str, Any] = {
        "benchmark": "serve",
        "machine": machine.describe(),
        "model": embedder.model_id,
        "threads_per_server": args.threads,
        "loads": "closed loop, one keep-alive connection per concurrent client, client in its own process",
        "texts": {"count": len(texts), "tokens_mean": round(float(np.mean(tokens)), 1)},
        "query": {"text": QUERY, "tokens": embedder.count_tokens([QUERY])[0]},
        "servers": {},
        # A shared machine: what else ran, as the load average (1, 5, 15 min) before and after.
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    if args.stack:
        print("ASGI servers, trivial Starlette app, concurrency 64:", file=sys.stderr)
        result["asgi_stack"] = stack(args.asgi_venv)
    sample = texts[:64]
    reference = embedder.embed(sample)
    # Every server up at once, each load run on each in turn and the rounds in rotated
    # order: the shared machine drifts, and this spreads the drift over all of them.
    servers: dict[str, tuple[subprocess.Popen, str, str]] = {}
    try:
        for dtype in args.dtypes.split(","):
            proc, url = start_ours(free_port(), dtype, args.threads)
            servers[f"embedstream-{dtype}"] = (proc, url, "default")
            result["servers"][f"embedstream-{dtype}"] = {"stack": our_stack()}
        if args.baseline:
            proc, url = start_ours(free_port(), "f32", args.threads, args.baseline.resolve())
            servers["embedstream-base-f32"] = (proc, url, "default")
            result["servers"]["embedstream-base-f32"] = {
                "tree": str(args.baseline),
                "commit": commit_of(args.baseline),
            }
        if not args.no_peer:
            proc, url = start_infinity(free_port(), args.peer_venv, model_dir, args.threads)
            servers["infinity"] = (proc, url, model_dir)
            peer_version = subprocess.run(
                [str(args.peer_venv / "bin" / "python"), "-c",
                 "import importlib.metadata as m; print(m.version('infinity-emb'), m.version('torch'))"],
                capture_output=True, text=True,
            ).stdout.split()  # fmt: skip
            result["servers"]["infinity"] = {
                "version": {"infinity-emb": peer_version[0], "torch": peer_version[1]},
                "settings": "v2 --engine torch --device cpu --no-bettertransformer, else defaults",
            }
        for name, (_, url, model) in servers.items():
            got = vectors(url, model, sample)
            result["servers"][name]["cosine_min_to_library_f32"] = round(
                float(np.min((got * reference).sum(1))), 6
            )
        runs: dict[str, dict[str, list[dict]]] = {name: {} for name in servers}
        names = list(servers)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for concurrency, size, window in every:
                key = load_key(concurrency, size)
                for name in order:
                    _, url, model = servers[name]
                    bodies = (
                        [{"model": model, "input": [texts[(i * size + j) % len(texts)] for j in range(size)]}
                         for i in range(256)]
                        if size else [{"model": model, "input": QUERY}]
                    )  # fmt: skip
                    got_run = run_client(url, bodies, concurrency, window)
                    runs[name].setdefault(key, []).append(got_run)
                    print(f"  round {round_ + 1} {key} {name}: {got_run}", file=sys.stderr)
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
    for name, by_key in runs.items():
        for key, measured in by_key.items():
            result["servers"][name][key] = summary(measured)
    for peer, name in (
        ("infinity", "ratios_f32_to_infinity"),
        ("embedstream-base-f32", "ratios_f32_to_base"),
    ):
        if peer in runs:
            result[name] = ratios(result["servers"]["embedstream-f32"], result["servers"][peer], runs[peer])
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["embedstream_version"] = version_of("embedstream")
    result["commit"] = commit_of(Path(__file__).resolve().parent.parent)
    print(json.dumps(result, indent=2))


def ratios(ours: dict[str, Any], peer: dict[str, Any], keys: Any) -> dict[str, Any]:
    """Our requests/s and p99 over the peer's, per load."""
    return {
        key: {
            "throughput": round(ours[key]["requests_per_s"] / peer[key]["requests_per_s"], 2),
            "p50": round(ours[key]["p50_ms"] / peer[key]["p50_ms"], 2),
            "p99": round(ours[key]["p99_ms"] / peer[key]["p99_ms"], 2),
        }
        for key in keys
        if ours[key].get("requests_per_s") and peer[key].get("requests_per_s")
    }


def load_key(concurrency: int, size: int) -> str:
    return f"c{concurrency}_texts{size}" if size else "single_query"


def commit_of(tree: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


def summary(runs: list[dict]) -> dict[str, Any]:
    """The median of each figure over the rounds, and the rounds themselves."""
    done = [r for r in runs if r.get("requests")]
    if not done:
        return {"runs": runs}
    return {
        **{
            k: round(statistics.median(r[k] for r in done), 2) for k in ("requests_per_s", "p50_ms", "p99_ms")
        },
        "errors": sum(r["errors"] for r in runs),
        "runs": runs,
    }


def our_stack() -> str:
    """What uvicorn's "auto" picks in this environment, as `embedstream serve` runs it."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"starlette {version_of('starlette')}, uvicorn {version_of('uvicorn')}, {http}, {loop}"


def version_of(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
