"""Encoder architectures beyond BERT, each a tiny random model with a tokenizer of its
own kind and reference vectors from sentence-transformers (made by the scripts in
tests/fixtures, in a separate environment: CI needs no PyTorch)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import DATA

import operators
from operators import Embedder

XLMR = DATA / "tiny-xlm-roberta"


def reference(directory):
    return [r for r in map(json.loads, open(directory / "reference.jsonl", encoding="utf-8")) if "text" in r]


@pytest.fixture(scope="module")
def xlmr() -> Embedder:
    return Embedder.load(XLMR)


def test_xlm_roberta_matches_sentence_transformers(xlmr):
    rows = reference(XLMR)
    # Positions start after padding_idx 1: 66 position embeddings hold 64 tokens.
    assert (xlmr.max_tokens, xlmr.dim, xlmr.pooling, xlmr.normalize) == (64, 32, "mean", True)
    vectors = xlmr.embed([r["text"] for r in rows])
    expected = np.array([r["embedding"] for r in rows], dtype=np.float32)
    cosine = np.sum(vectors * expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.9999, [(r["text"][:20], c) for r, c in zip(rows, cosine) if c < 0.9999]


def test_xlm_roberta_unigram_tokens_and_truncation(xlmr):
    rows = reference(XLMR)
    counts = xlmr.count_tokens([r["text"] for r in rows])
    assert [min(n, xlmr.max_tokens) for n in counts] == [len(r["input_ids"]) for r in rows]
    assert max(counts) > xlmr.max_tokens  # the long texts are truncated, as sentence-transformers does


def test_xlm_roberta_batch_equals_one_by_one(xlmr):
    texts = [r["text"] for r in reference(XLMR)]
    batch = xlmr.embed(texts)
    for text, row in zip(texts, batch):
        np.testing.assert_allclose(xlmr.embed([text])[0], row, atol=2e-5)


def test_xlm_roberta_chunks_fit_the_model(xlmr):
    text = "\n\n".join(r["text"] for r in reference(XLMR) if r["text"].strip())
    chunks = xlmr.chunker().chunk(text)
    assert len(chunks) > 1 and all(c.n_tokens <= xlmr.max_tokens for c in chunks)
    assert all(text[c.char_start : c.char_end] == c.text for c in chunks)


def test_unsupported_model_types_name_the_supported_ones(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(XLMR, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(config))
    named = r'"gpt2" is not supported; supported: bert, .*xlm-roberta'
    with pytest.raises(operators.ModelError, match=named):
        Embedder.load(model)
