"""The machine a benchmark ran on, named in every result: CPU model and count."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The CPU flags that decide our kernel paths.
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni")


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


def describe() -> dict[str, object]:
    described: dict[str, object] = {"cpus": os.cpu_count(), "processor": cpu_name(), "flags": cpu_flags()}
    try:
        from operators.embed import cpu_kernels

        described["kernels"] = cpu_kernels()[0]
    except ImportError:  # a peer's environment without embedstream
        pass
    return described
