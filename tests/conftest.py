from __future__ import annotations

import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def minilm():
    """The real default model (installed by `embedstream models pull`, which setup runs)."""
    import operators

    return operators.Embedder.load()


@pytest.fixture(scope="session")
def tiny_bert():
    import operators

    return operators.Embedder.load(DATA / "tiny-bert-cls")
