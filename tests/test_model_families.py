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


MODERNBERT = DATA / "tiny-modernbert"


@pytest.fixture(scope="module")
def modernbert() -> Embedder:
    return Embedder.load(MODERNBERT)


def _cosines(embedder: Embedder, directory) -> np.ndarray:
    rows = reference(directory)
    vectors = embedder.embed([r["text"] for r in rows])
    expected = np.array([r["embedding"] for r in rows], dtype=np.float32)
    return np.sum(vectors * expected, axis=1) / np.linalg.norm(expected, axis=1)


def _edited(tmp_path, directory, edit):
    model = tmp_path / "model"
    shutil.copytree(directory, model)
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_modernbert_matches_sentence_transformers(modernbert):
    """Global attention in layer 0, a ±4-token window in layers 1 and 2, each with its
    own rope theta, GeGLU, no biases; texts up to 128 tokens, one past it."""
    assert (modernbert.max_tokens, modernbert.dim) == (128, 32)
    cosine = _cosines(modernbert, MODERNBERT)
    assert cosine.min() >= 0.9999, cosine
    rows = reference(MODERNBERT)
    counts = modernbert.count_tokens([r["text"] for r in rows])
    assert [min(n, 128) for n in counts] == [r["n_tokens"] for r in rows]


def test_modernbert_reads_the_transformers_4_config(tmp_path, modernbert):
    def as_4x(config):
        del config["layer_types"], config["rope_parameters"]
        config.update(global_attn_every_n_layers=3, global_rope_theta=160000.0, local_rope_theta=10000.0)

    old = Embedder.load(_edited(tmp_path, MODERNBERT, as_4x))
    texts = [r["text"] for r in reference(MODERNBERT)]
    np.testing.assert_allclose(old.embed(texts), modernbert.embed(texts), atol=1e-6)


def _largest_error(embedder: Embedder, directory) -> float:
    rows = reference(directory)
    vectors = embedder.embed([r["text"] for r in rows])
    return float(np.abs(vectors - np.array([r["embedding"] for r in rows])).max())


def test_modernbert_sliding_window_matters(tmp_path, modernbert):
    # Tiny random weights keep cosines close whatever the window: compare values. The
    # right window is within 1e-5 of sentence-transformers; attending to every token in
    # the sliding layers misses by far more.
    assert _largest_error(modernbert, MODERNBERT) < 1e-5
    wide = Embedder.load(_edited(tmp_path, MODERNBERT, lambda c: c.update(local_attention=4096)))
    assert _largest_error(wide, MODERNBERT) > 5e-5


def test_modernbert_batch_equals_one_by_one(modernbert):
    texts = [r["text"] for r in reference(MODERNBERT)]
    batch = modernbert.embed(texts)
    for text, row in zip(texts, batch):
        np.testing.assert_allclose(modernbert.embed([text])[0], row, atol=2e-5)
