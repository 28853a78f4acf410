"""The machine a benchmark ran on, named in every result: CPU model and count."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The CPU flags that decide our kernel paths (and GEMM's).
FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_bf16",
)


def cpu_flags() -> list[str]:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in FLAGS if f in present]
    except OSError:
        pass
    return []


def sgemm_gflops(n: int = 1024, repeat: int = 30) -> float:
    """numpy's float32 matrix product, best of ``repeat``: the f32 limit of this machine."""
    import time

    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n, n)).astype(np.float32), rng.normal(size=(n, n)).astype(np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return round(2 * n**3 / best / 1e9, 1)


def layer_shapes(model_dir: str | Path, rows: int = 2048) -> list[tuple[int, int, int]]:
    """The (rows, inputs, outputs) of one layer's linear products at ``rows`` tokens per
    batch: what the f32 limit should be read on, rather than one square product."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    gated = config.get("model_type", "bert") in {"modernbert", "nomic_bert", "qwen3"}
    return [
        (rows, hidden, head_dim * (heads + 2 * kv_heads)),  # q, k and v in one product
        (rows, heads * head_dim, hidden),  # attention output
        (rows, hidden, inner * (2 if gated else 1)),  # feed-forward up (and gate)
        (rows, inner, hidden),  # feed-forward down
    ]


def _timed_products(multiply, operands, repeat: int) -> float:
    """GFLOP/s of the products taken together: their FLOPs over the sum of each
    product's best time (``repeat`` tries each), so every shape weighs by its FLOPs."""
    import time

    flops = seconds = 0.0
    for a, b in operands:
        multiply(a, b)
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            multiply(a, b)
            best = min(best, time.perf_counter() - started)
        flops += 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        seconds += best
    return round(flops / seconds / 1e9, 1)


def sgemm_on_shapes(shapes: list[tuple[int, int, int]], repeat: int = 10) -> dict[str, object]:
    """The f32 limit on a model's own layer shapes, read with numpy's BLAS (OpenBLAS) and,
    where PyTorch is importable, with the BLAS that sentence-transformers runs on
    (``torch.matmul``: MKL on x86). The peer's BLAS is the bar the peer runs at."""
    import numpy as np

    rng = np.random.default_rng(0)
    operands = [
        (rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32))
        for m, k, n in shapes
    ]
    limits: dict[str, object] = {"shapes": [list(s) for s in shapes]}
    limits["numpy_gflops"] = _timed_products(np.matmul, operands, repeat)
    try:
        import torch
    except ImportError:
        limits["torch_gflops"] = "not installed"
        return limits
    tensors = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in operands]
    limits["torch_gflops"] = _timed_products(torch.matmul, tensors, repeat)
    limits["torch_threads"] = torch.get_num_threads()
    limits["torch_blas"] = "mkl" if torch.backends.mkl.is_available() else "other"
    return limits


def peer_limit(before: dict[str, object], after: dict[str, object]) -> dict[str, object]:
    """The faster of two readings, one on either side of a run (the shared machine drifts),
    and the limit the shares are taken against: the peer's BLAS where it ran, else numpy's."""
    best = dict(before)
    for key in ("numpy_gflops", "torch_gflops"):
        if isinstance(after.get(key), float) and isinstance(before.get(key), float):
            best[key] = max(before[key], after[key])
    source = "torch" if isinstance(best.get("torch_gflops"), float) else "numpy"
    best["limit_gflops"], best["limit_from"] = best[f"{source}_gflops"], source
    return best


def describe() -> dict[str, object]:
    described: dict[str, object] = {"cpus": os.cpu_count(), "processor": cpu_name(), "flags": cpu_flags()}
    try:
        from operators.embed import cpu_kernels

        described["kernels"] = cpu_kernels()[0]
    except ImportError:  # a peer's environment without embedstream
        pass
    # The peers' versions, where this environment has them: their speed moves with them.
    from importlib import metadata

    for peer in ("torch", "transformers", "sentence-transformers"):
        try:
            described.setdefault("peers", {})[peer] = metadata.version(peer)
        except metadata.PackageNotFoundError:
            pass
    return described
