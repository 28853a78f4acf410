"""Every encoder family on every CPU path this CPU runs: our kernels and the GEMM's
instruction set follow EMBEDSTREAM_CPU_KERNELS, so an AVX-512 machine also checks the
AVX2 and portable paths (and their GEMMs) that other CPUs take."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA

import operators
from operators import Embedder
from operators.embed import cpu_info

FAMILIES = [
    "tiny-bert-cls",
    "tiny-xlm-roberta",
    "tiny-modernbert",
    "tiny-qwen3",
    "tiny-nomic-bert",
    "tiny-gte",
]
PATHS = ["portable", "avx2", "avx512"]
GEMM_OF_PATH = {"portable": "scalar", "avx2": "fma", "avx512": "avx512f"}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_matches_its_reference_on_every_path(family, path, forced_kernels):
    forced_kernels(path)
    directory = DATA / family
    try:
        embedder = Embedder.load(str(directory))
    except operators.UnsupportedError as error:
        assert "this CPU runs at most" in str(error)
        pytest.skip(f"this CPU does not run the {path} path")
    assert (cpu_info()["kernels"], cpu_info()["gemm"]) == (path, GEMM_OF_PATH[path])
    rows = [json.loads(line) for line in open(directory / "reference.jsonl", encoding="utf-8")]
    rows = [r for r in rows if r.get("text")]
    got = embedder.embed([r["text"] for r in rows])
    expected = np.array([r["embedding"] for r in rows], dtype=np.float32)
    cosines = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosines.min() >= 0.9999, f"{family} on {path}: {cosines.min()}"
