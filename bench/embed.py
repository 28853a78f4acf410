"""Embedding throughput: embedstream's Embedder against sentence-transformers and
embed-anything on the same model files and texts, in the same run when importable.

    python bench/embed.py [--texts 1000] [--repeat 3] [--model default]

Prints one JSON object. Peers are benchmark-only extras, never dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine
from corpus import paragraphs
from flops import flops_per_token

import operators
from operators import models

REFERENCE = "all-MiniLM-L6-v2.sentence-transformers.jsonl"


def timed_in_turn(runners: dict[str, object], repeat: int) -> dict[str, tuple[float, object]]:
    """Median seconds and last result of each runner, warmed up once, then timed in
    turn (ours, then each peer, `repeat` rounds): a slow spell of a shared machine
    falls on every side alike instead of on whichever ran during it."""
    for run in runners.values():
        run(warmup=True)
    times: dict[str, list[float]] = {name: [] for name in runners}
    results: dict[str, object] = {}
    for _ in range(repeat):
        for name, run in runners.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in runners}


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def _hub_cache_for(model_dir: Path, repo_id: str) -> str:
    home = Path(tempfile.mkdtemp(prefix="embedstream-hf-"))
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "local"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("local")
    for item in model_dir.iterdir():
        (snapshot / item.name).symlink_to(item.resolve())
    return str(home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="f32")
    parser.add_argument(
        "--peers", default="sentence-transformers,embed-anything", help="comma-separated peers to run"
    )
    args = parser.parse_args()
    # The f32 limit on the model's own layer shapes, with numpy's BLAS and the peer's
    # (torch.matmul, MKL on x86), read on either side of the run: the machine drifts.
    shapes = machine.layer_shapes(models.resolve(args.model))
    before = machine.sgemm_on_shapes(shapes)
    result = measure(args.model, paragraphs(args.texts), args.repeat, args.dtype, set(args.peers.split(",")))
    sgemm = machine.peer_limit(before, machine.sgemm_on_shapes(shapes))
    result["machine"]["sgemm"] = sgemm
    ours = result["embedstream"]
    for name in ("limit", "numpy", "torch"):
        gflops = sgemm.get(f"{name}_gflops")
        if isinstance(gflops, float):
            limit = gflops * 1e3 / result["mflop_per_token"]
            key = "sgemm_limit" if name == "limit" else f"{name}_sgemm_limit"
            ours[f"{key}_tokens_per_s"] = round(limit, 1)
            ours[f"fraction_of_{key}"] = round(ours["tokens_per_s"] / limit, 3)
    print(json.dumps(result, indent=2))


def measure(model: str, texts: list[str], repeat: int, dtype: str, peers: set[str]) -> dict[str, object]:
    """Ours and each peer on the same model files and texts, timed in turn."""
    embedder = operators.Embedder.load(model, dtype=dtype)
    model_dir = models.resolve(model)
    lengths = [min(n, embedder.max_tokens) for n in embedder.count_tokens(texts)]
    tokens = sum(lengths)
    result: dict[str, object] = {
        "benchmark": "embed",
        "model": embedder.model_id,
        "texts": len(texts),
        "tokens": tokens,
        "avg_tokens": round(tokens / len(texts), 1),
        "mflop_per_token": round(flops_per_token(model_dir, lengths) / 1e6, 2),
        "machine": machine.describe(),
    }

    def ours(warmup: bool = False):
        return embedder.embed(texts[:32] if warmup else texts)

    runners: dict[str, object] = {"embedstream": ours}
    try:
        if "sentence-transformers" not in peers:
            raise ImportError(name="sentence_transformers (not asked for)")
        from sentence_transformers import SentenceTransformer

        st_model = SentenceTransformer(model_dir, device="cpu")

        def st(warmup: bool = False):
            return st_model.encode(texts[:32] if warmup else texts, batch_size=32, normalize_embeddings=True)

        runners["sentence_transformers"] = st
    except ImportError as e:
        result["sentence_transformers"] = f"not installed ({e.name})"

    try:
        if "embed-anything" not in peers:
            raise ImportError(name="embed_anything (not asked for)")
        import embed_anything

        # embed-anything loads only through the Hugging Face hub API; a hub-cache layout
        # whose snapshot links to the same files keeps it offline and on identical weights.
        os.environ["HF_HOME"] = _hub_cache_for(Path(model_dir), "embedstream-bench/model")
        os.environ["HF_HUB_OFFLINE"] = "1"
        ea_model = embed_anything.EmbeddingModel.from_pretrained_hf(model_id="embedstream-bench/model")

        def ea(warmup: bool = False):
            batch = texts[:32] if warmup else texts
            return [e.embedding for e in embed_anything.embed_query(batch, embedder=ea_model)]

        runners["embed_anything"] = ea
    except ImportError as e:
        result["embed_anything"] = f"not installed ({e.name})"
    except Exception as e:  # a peer's failure is a finding, not a crash of the benchmark
        result["embed_anything"] = f"failed: {type(e).__name__}: {e}"

    timings = timed_in_turn(runners, repeat)
    seconds, ours_vectors = timings.pop("embedstream")
    result["embedstream"] = {
        "dtype": dtype,
        "seconds": round(seconds, 3),
        "texts_per_s": round(len(texts) / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
    }
    for name, (peer_seconds, vectors) in timings.items():
        result[name] = {
            "seconds": round(peer_seconds, 3),
            "tokens_per_s": round(tokens / peer_seconds, 1),
            "cosine_min_vs_embedstream": round(cosine_min(np.asarray(vectors), ours_vectors), 6),
        }
        result[f"ratio_vs_{name}"] = round(peer_seconds / seconds, 2)

    # Agreement with the reference vectors computed by sentence-transformers.
    reference = Path(__file__).resolve().parent.parent / "tests" / "data" / REFERENCE
    if model == "default" and reference.exists():
        rows = [json.loads(line) for line in reference.read_text().splitlines()]
        rows = [r for r in rows if "embedding" in r]
        want = np.array([r["embedding"] for r in rows], dtype=np.float32)
        result["embedstream"]["reference_cosine_min"] = round(
            cosine_min(embedder.embed([r["text"] for r in rows]), want), 6
        )

    return result


if __name__ == "__main__":
    main()
