"""The GPU check: embedstream's CUDA build against sentence-transformers on one GPU.

Run through ``bench/gpu_check.sh`` on a machine with an NVIDIA GPU, PyTorch and
sentence-transformers (no network, no Rust). The real MiniLM weights (87 MiB) cannot
travel there, so this builds a seeded random BERT with all-MiniLM-L6-v2's exact
configuration and real tokenizer (``bench/gpu/minilm-shape``): the same shapes and the
same cost per token. It then

1. compares our vectors with sentence-transformers' (f32 on the GPU) on the reference
   texts: cosine >= 0.999 in f32 and >= 0.995 in bf16 on every row;
2. times both on the same GPU and texts, sentence-transformers in the same dtype,

and prints one JSON object (also written to $OUT/gpu_check.json when OUT is set).
``--cpu-smoke`` runs the same code on the CPU at a small size: the check of the check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAPE = ROOT / "bench" / "gpu" / "minilm-shape"
REFERENCE = ROOT / "tests" / "data" / "all-MiniLM-L6-v2.sentence-transformers.jsonl"
MINILM_FLOP_PER_TOKEN = 23e6  # the round figure; `flop_per_token` below is exact


def build_random_minilm(dst: Path, seed: int = 0) -> None:
    """A seeded random BertModel with MiniLM's config, in sentence-transformers layout."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig.from_pretrained(SHAPE))
    model.save_pretrained(dst, safe_serialization=True)
    for item in SHAPE.iterdir():
        if item.name == "config.json":
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy(item, dst / item.name)


def reference_texts() -> list[str]:
    rows = [json.loads(line) for line in REFERENCE.read_text().splitlines()]
    return [r["text"] for r in rows if "text" in r]


def corpus(n: int) -> list[str]:
    sys.path.insert(0, str(ROOT / "bench"))
    from corpus import paragraphs

    base = paragraphs(1000)
    return (base * (n // len(base) + 1))[:n]


def flop_per_token(config: dict, tokens: list[int]) -> float:
    """Matrix FLOPs per real token: projections and FFN, plus attention over each text."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    dense = 2 * (4 * h * h + 2 * h * i)
    attention = 2 * 2 * h * (sum(t * t for t in tokens) / sum(tokens))
    return layers * (dense + attention)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def bf16_matmul_tflops(torch, device: str) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=20000, help="texts timed per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU, small, f32 only")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    import operators

    device = "cpu" if args.cpu_smoke else "cuda"
    ours_device = "cpu" if args.cpu_smoke else "cuda:0"
    dtypes = ["f32"] if args.cpu_smoke else ["f32", "bf16"]
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}
    result: dict = {"device": device, "torch": torch.__version__}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "minilm-random"
        build_random_minilm(model_dir)
        config = json.loads((model_dir / "config.json").read_text())

        st = {d: SentenceTransformer(str(model_dir), device=device).to(torch_dtype[d]) for d in dtypes}
        ours = {d: operators.Embedder.load(model_dir, device=ours_device, dtype=d) for d in dtypes}
        result["ours"] = {"device": ours["f32"].device, "cuda_built": operators._native.cuda_built()}

        # 1. Agreement on the reference texts, against sentence-transformers in f32.
        texts = reference_texts()
        truth = st["f32"].encode(texts, batch_size=64, convert_to_numpy=True)
        agreement = {}
        for d in dtypes:
            agreement[f"ours_{d}_min_cosine"] = float(cosines(ours[d].embed(texts), truth).min())
            if d != "f32":
                st_rows = st[d].encode(texts, batch_size=64, convert_to_numpy=True).astype(np.float32)
                agreement[f"st_{d}_min_cosine"] = float(cosines(st_rows, truth).min())
        if device == "cuda":
            # f16 too (agreement only): its padding bias differs from bf16's.
            f16 = operators.Embedder.load(model_dir, device=ours_device, dtype="f16")
            agreement["ours_f16_min_cosine"] = float(cosines(f16.embed(texts), truth).min())
        agreement["pass"] = agreement["ours_f32_min_cosine"] >= 0.999 and all(
            value >= 0.995 for key, value in agreement.items() if key.startswith("ours_")
        )
        result["agreement"] = agreement

        # 2. Throughput on the same texts, both in the same dtype.
        bench_texts = corpus(args.texts)
        lengths = [min(n, ours["f32"].max_tokens) for n in ours["f32"].count_tokens(bench_texts)]
        tokens = sum(lengths)
        per_token = flop_per_token(config, lengths)
        result["texts"] = {
            "count": len(bench_texts),
            "tokens": tokens,
            "avg_tokens": tokens / len(bench_texts),
        }
        result["flop_per_token"] = per_token
        speed: dict = {}
        for d in dtypes:
            ours_s = timed(lambda d=d: ours[d].embed(bench_texts), args.repeats)
            speed[f"ours_{d}_tokens_per_s"] = tokens / ours_s
            for batch in (32, 256):
                st_s = timed(
                    lambda d=d, b=batch: st[d].encode(bench_texts, batch_size=b, convert_to_numpy=True),
                    args.repeats,
                )
                speed[f"st_{d}_batch{batch}_tokens_per_s"] = tokens / st_s
            best_st = max(speed[f"st_{d}_batch{b}_tokens_per_s"] for b in (32, 256))
            speed[f"ratio_{d}_vs_best_st"] = speed[f"ours_{d}_tokens_per_s"] / best_st
            speed[f"ratio_{d}_vs_st_batch32"] = (
                speed[f"ours_{d}_tokens_per_s"] / speed[f"st_{d}_batch32_tokens_per_s"]
            )
        # What bounds us: tokenization alone (CPU), and the GPU token budget per pass.
        fast = dtypes[-1]
        speed["tokenize_only_tokens_per_s"] = tokens / timed(
            lambda: ours[fast].count_tokens(bench_texts), args.repeats
        )
        for budget in (8192, 65536):
            other = operators.Embedder.load(
                model_dir, device=ours_device, dtype=fast, max_batch_tokens=budget
            )
            speed[f"ours_{fast}_budget{budget}_tokens_per_s"] = tokens / timed(
                lambda e=other: e.embed(bench_texts), args.repeats
            )
        result["speed"] = speed
        if device == "cuda":
            peak = bf16_matmul_tflops(torch, device)
            achieved = speed["ours_bf16_tokens_per_s"] * per_token / 1e12
            result["roofline"] = {
                "measured_bf16_matmul_tflops": peak,
                "ours_bf16_tflops": achieved,
                "fraction_of_measured_bf16": achieved / peak,
                "fraction_of_989_tflops_datasheet": achieved / 989,
            }

    text = json.dumps(result, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    return 0 if agreement["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
