"""Embeddings against sentence-transformers' own outputs, on the real models."""

from __future__ import annotations

import json
import re
import shutil
import threading

import numpy as np
import pytest
from conftest import DATA

import operators
from flows.settings import CPU_BATCH_SIZE, Settings
from operators import Embedder


def load_reference(path):
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    header, rows = (lines[0], lines[1:]) if "note" in lines[0] else ({}, lines)
    return header, [r["text"] for r in rows], np.array([r["embedding"] for r in rows], dtype=np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def minilm_reference():
    return load_reference(DATA / "all-MiniLM-L6-v2.sentence-transformers.jsonl")


def test_minilm_matches_sentence_transformers_in_one_batch(minilm, minilm_reference):
    _, texts, expected = minilm_reference
    got = minilm.embed(texts)
    assert got.dtype == np.float32 and got.shape == (200, 384)
    assert cosine(got, expected).min() >= 0.999


def test_q8_stays_within_its_documented_accuracy(minilm_reference):
    try:
        q8 = Embedder.load(dtype="q8")
    except operators.UnsupportedError as error:
        assert "AVX2" in str(error)
        pytest.skip("this CPU has no AVX2")
    _, texts, expected = minilm_reference
    assert q8.dtype == "q8"
    assert cosine(q8.embed(texts), expected).min() >= 0.995
    # Row order and batching must not matter in q8 either.
    assert cosine(q8.embed(texts[::-1])[::-1], expected).min() >= 0.995


def load_bf16(*args, **kwargs) -> Embedder:
    """``dtype="bf16"`` on the CPU, or a skip where the CPU has no AVX512_BF16 or
    EMBEDSTREAM_CPU_KERNELS forces a path without it (after checking that the refusal
    says which)."""
    try:
        return Embedder.load(*args, dtype="bf16", **kwargs)
    except operators.UnsupportedError as error:
        assert re.search("AVX512_BF16.*this CPU has none|EMBEDSTREAM_CPU_KERNELS selects", str(error)), error
        pytest.skip(str(error))


def test_bf16_stays_within_its_documented_accuracy(minilm, minilm_reference):
    bf16 = load_bf16()
    _, texts, expected = minilm_reference
    assert bf16.dtype == "bf16"
    f32 = minilm.embed(texts)
    got = bf16.embed(texts)
    assert cosine(got, f32).min() >= 0.9995
    assert cosine(got, expected).min() >= 0.999
    # The bf16 layers really run: close to f32's vectors, not equal to them.
    assert np.abs(got - f32).max() > 1e-5
    # Row order and batching must not matter in bf16 either.
    assert cosine(bf16.embed(texts[::-1])[::-1], f32).min() >= 0.9995


KERNEL_PATHS = ["portable", "avx2", "avx512"]


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_every_kernel_path_this_cpu_runs_matches_sentence_transformers(
    path, forced_kernels, minilm_reference
):
    from operators.embed import cpu_kernels

    forced_kernels(path)
    best = cpu_kernels()[1]
    if KERNEL_PATHS.index(path) > KERNEL_PATHS.index(best):
        with pytest.raises(operators.UnsupportedError, match=f"at most the {best} kernels"):
            Embedder.load()
        pytest.skip(f"this CPU runs at most the {best} kernels")
    _, texts, expected = minilm_reference
    f32 = Embedder.load()
    assert cpu_kernels()[0] == path
    assert cosine(f32.embed(texts), expected).min() >= 0.999
    if path != "avx512":
        # bf16 runs only on the AVX-512 path (with AVX512_BF16), and says so.
        with pytest.raises(operators.UnsupportedError, match=f"AVX512_BF16|selects the {path} ones"):
            Embedder.load(dtype="bf16")
    if path == "portable":
        with pytest.raises(operators.UnsupportedError, match="AVX2"):
            Embedder.load(dtype="q8")
        return
    q8 = Embedder.load(dtype="q8")
    got = q8.embed(texts)
    assert cosine(got, expected).min() >= 0.995
    # AVX2 quantizes the weights its own way (codes in ±64, a scale per block of 64
    # inputs); the two paths land close to each other, not on the same vectors.
    if path == "avx2" and best == "avx512":
        forced_kernels("avx512")
        vnni = Embedder.load(dtype="q8").embed(texts)
        assert cosine(vnni, got).min() >= 0.99
        assert np.abs(vnni - got).max() > 1e-4


def test_unknown_kernel_paths_are_refused(forced_kernels):
    forced_kernels("neon")
    with pytest.raises(operators.UnsupportedError, match="auto, portable, avx2 or avx512"):
        Embedder.load()


def test_minilm_matches_one_by_one(minilm, minilm_reference):
    _, texts, expected = minilm_reference
    got = np.vstack([minilm.embed([t]) for t in texts])
    assert cosine(got, expected).min() >= 0.999


def test_minilm_truncates_at_256_not_128(minilm, minilm_reference):
    _, texts, expected = minilm_reference
    header = json.loads(open(DATA / "all-MiniLM-L6-v2.sentence-transformers.jsonl").readline())
    assert header["max_seq_length"] == minilm.max_tokens == 256
    rows = [json.loads(line) for line in open(DATA / "all-MiniLM-L6-v2.sentence-transformers.jsonl")][1:]
    long = [i for i, r in enumerate(rows) if r["n_tokens"] >= 256]
    assert long, "the reference must contain texts past the limit"
    got = minilm.embed([texts[i] for i in long])
    assert cosine(got, expected[long]).min() >= 0.999


def test_count_tokens_matches_sentence_transformers(minilm):
    rows = [json.loads(line) for line in open(DATA / "all-MiniLM-L6-v2.sentence-transformers.jsonl")][1:]
    counts = minilm.count_tokens([r["text"] for r in rows])
    # The reference counts what the model saw, truncated at 256; ours are untruncated.
    assert [min(n, 256) for n in counts] == [r["n_tokens"] for r in rows]


def test_minilm_properties(minilm):
    assert minilm.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert minilm.model_revision == "53aa51172d142c89"
    assert (minilm.dim, minilm.max_tokens, minilm.pooling, minilm.normalize) == (384, 256, "mean", True)
    assert (minilm.device, minilm.dtype) == ("cpu", "f32")


def test_tiny_bert_cls_newer_layout_matches_raw(tiny_bert):
    _, texts, expected = load_reference(DATA / "tiny-bert-cls" / "reference.jsonl")
    assert (tiny_bert.pooling, tiny_bert.max_tokens, tiny_bert.dim) == ("cls", 64, 32)
    batch = tiny_bert.embed(texts)
    single = np.vstack([tiny_bert.embed([t]) for t in texts])
    for got in (batch, single):
        np.testing.assert_allclose(got, expected, atol=2e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(expected, axis=1), atol=1e-5)


def test_rows_follow_input_order_and_batching_does_not_matter(minilm, minilm_reference):
    _, texts, _ = minilm_reference
    texts = texts[:40]
    forward = minilm.embed(texts)
    backward = minilm.embed(texts[::-1])
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-5)
    tiny_batches = Embedder.load(max_batch_tokens=64).embed(texts)
    np.testing.assert_allclose(forward, tiny_batches, atol=1e-5)


def test_empty_and_blank_texts_embed_as_the_empty_sequence(minilm):
    vectors = minilm.embed(["", "   ", "\n\t", "text"])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    assert abs(np.linalg.norm(vectors[0]) - 1) < 1e-5
    assert cosine(vectors[:1], vectors[3:]).item() < 0.99
    assert minilm.embed([]).shape == (0, 384)


def test_embed_rejects_a_bare_string(minilm):
    with pytest.raises(TypeError):
        minilm.embed("not a list")


def test_gil_is_released_while_embedding(minilm):
    texts = ["a fairly long sentence about streaming embeddings " * 8] * 256
    done = threading.Event()
    ticks = 0

    def work():
        minilm.embed(texts)
        done.set()

    thread = threading.Thread(target=work)
    thread.start()
    while not done.is_set():
        ticks += 1
    thread.join()
    # Python code kept running in this thread during the whole native call.
    assert ticks > 10_000


def test_missing_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDSTREAM_MODEL_CACHE", str(tmp_path))
    with pytest.raises(operators.ModelNotFoundError, match="embedstream models pull"):
        Embedder.load()
    with pytest.raises(operators.ModelNotFoundError, match=r"tokenizer\.json"):
        d = tmp_path / "incomplete"
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
        Embedder.load(d)
    with pytest.raises(FileNotFoundError):
        Embedder.load(tmp_path / "nowhere")


def test_unsupported_settings_are_rejected_clearly():
    with pytest.raises(operators.UnsupportedError, match="needs a GPU"):
        Embedder.load(DATA / "tiny-bert-cls", dtype="f16")
    with pytest.raises(operators.UnsupportedError, match="dtype"):
        Embedder.load(DATA / "tiny-bert-cls", dtype="f64")
    with pytest.raises(operators.UnsupportedError, match="device"):
        Embedder.load(DATA / "tiny-bert-cls", device="tpu")
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Embedder.load(DATA / "tiny-bert-cls", max_batch_tokens=0)


@pytest.mark.skipif(operators._native.cuda_built(), reason="this build has CUDA")
def test_cpu_build_explains_how_to_get_cuda_and_auto_falls_back():
    with pytest.raises(operators.UnsupportedError, match=r"no CUDA support.*build-wheel\.sh"):
        Embedder.load(DATA / "tiny-bert-cls", device="cuda:0")
    auto = Embedder.load(DATA / "tiny-bert-cls", device="auto")
    assert (auto.device, auto.max_batch_tokens) == ("cpu", 2048)
    assert Settings(device="auto").micro_batch_size() == CPU_BATCH_SIZE
    assert Settings(device="auto", batch_size=7).micro_batch_size() == 7


def test_invalid_model_files(tmp_path):
    model = tmp_path / "bad"
    shutil.copytree(DATA / "tiny-bert-cls", model)
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(operators.ModelError, match="gpt2"):
        Embedder.load(model)
    (model / "config.json").write_text("{not json")
    with pytest.raises(operators.ModelError):
        Embedder.load(model)


def test_hub_cache_layout_offline(tmp_path, monkeypatch):
    snapshot = tmp_path / "models--acme--tiny-bert" / "snapshots" / "0123abcd"
    shutil.copytree(DATA / "tiny-bert-cls", snapshot)
    (tmp_path / "models--acme--tiny-bert" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-bert" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    embedder = Embedder.load("acme/tiny-bert")
    assert embedder.model_id == "acme/tiny-bert"
    assert embedder.model_revision == Embedder.load(DATA / "tiny-bert-cls").model_revision
    assert embedder.embed(["hello"]).shape == (1, 32)
