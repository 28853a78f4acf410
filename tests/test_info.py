"""`embedstream info` says what the CPU path runs: the kernels and the GEMM follow
EMBEDSTREAM_CPU_KERNELS and the CPU's own features."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _info(kernels: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMBEDSTREAM_CPU_KERNELS": kernels}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "info", "--json"], env=env, capture_output=True, text=True
    )


def _cpuinfo(*keys: str) -> tuple[str, ...]:
    found: dict[str, str] = {}
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            found.setdefault(key.strip(), value.strip())
    return tuple(found.get(k, "") for k in keys)


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


#: Rust's feature names against the kernel's /proc/cpuinfo names.
CPUINFO_NAMES = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16"}


def test_info_names_the_cpu_its_features_and_the_kernels_in_force():
    found = _info("auto")
    assert found.returncode == 0, found.stderr
    info = json.loads(found.stdout)
    cpu = info["cpu"]
    assert cpu["processor"]
    assert {CPUINFO_NAMES.get(f, f) for f in cpu["features"]} <= _cpu_flags()
    assert cpu["kernels"] == cpu["best_kernels"]
    assert cpu["threads"] >= 1
    assert info["devices"][0] == "cpu"
    # Under auto the GEMM is 512-bit wherever AVX-512F runs at full width, whatever our
    # own kernels need; AMD Zen 3 and 4 (family 25) split it, and take the AVX2 GEMM.
    full_width = "avx512f" in _cpu_flags() and _cpuinfo("vendor_id", "cpu family") != ("AuthenticAMD", "25")
    expected = "avx512f" if full_width else "fma" if "avx2" in _cpu_flags() else "scalar"
    assert cpu["gemm"] == expected


@pytest.mark.parametrize(
    ("kernels", "gemm"), [("avx2", "fma"), ("portable", "scalar"), ("avx512", "avx512f")]
)
def test_a_forced_kernel_path_takes_its_own_gemm(kernels, gemm):
    flags = _cpu_flags()
    if kernels == "avx2" and not {"avx2", "fma"} <= flags:
        pytest.skip("this CPU has no AVX2 and FMA")
    if kernels == "avx512" and not {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
        pytest.skip("this CPU lacks the AVX-512 path's features")
    found = _info(kernels)
    assert found.returncode == 0, found.stderr
    cpu = json.loads(found.stdout)["cpu"]
    assert (cpu["kernels"], cpu["gemm"]) == (kernels, gemm)


def test_an_unknown_kernel_path_is_a_clear_error():
    found = _info("sse9")
    assert found.returncode == 2
    assert "EMBEDSTREAM_CPU_KERNELS" in found.stderr and "sse9" in found.stderr
