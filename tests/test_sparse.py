"""Sparse encoders on candle against their references: SPLADE and inference-free SPLADE
against sentence-transformers' SparseEncoder, BGE-M3's sparse head against BGE-M3's own
code, each a tiny random model made by tests/fixtures/make_tiny_sparse.py in a separate
environment (CI needs no PyTorch). No PyPI package ships real SPLADE or BGE-M3 weights
that we could install, so the tiny models are the proof."""

from __future__ import annotations

import array
import json
import shutil
import struct
import zipfile

import pytest
from conftest import DATA

from operators import ModelError, ModelNotFoundError, SparseEmbedder, SparseVector

SPLADE = DATA / "tiny-splade"
INFERENCE_FREE = DATA / "tiny-splade-inference-free"
BGE_M3 = DATA / "tiny-bge-m3"
TOLERANCE = 1e-4


def reference(directory):
    return [r for r in map(json.loads, open(directory / "reference.jsonl", encoding="utf-8")) if "text" in r]


def special_ids(directory) -> set[int]:
    tokenizer = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    return {t["id"] for t in tokenizer["added_tokens"] if t["special"]}


def assert_matches(got: SparseVector, expected: dict, special: set[int], text: str) -> None:
    """Per weight within TOLERANCE, with the special tokens' entries left out."""
    want = {i: v for i, v in zip(expected["indices"], expected["values"]) if i not in special}
    assert set(got.indices) == set(want), (text[:30], sorted(set(got.indices) ^ set(want)))
    assert got.indices == sorted(got.indices)
    worst = max((abs(got.to_dict()[i] - v) for i, v in want.items()), default=0.0)
    assert worst <= TOLERANCE, (text[:30], worst)


@pytest.fixture(scope="module")
def splade() -> SparseEmbedder:
    return SparseEmbedder.load(SPLADE)


@pytest.fixture(scope="module")
def inference_free() -> SparseEmbedder:
    return SparseEmbedder.load(INFERENCE_FREE)


@pytest.fixture(scope="module")
def bge_m3() -> SparseEmbedder:
    return SparseEmbedder.load(BGE_M3)


def test_splade_matches_sentence_transformers(splade):
    rows = reference(SPLADE)
    assert (splade.family, splade.dim, splade.max_tokens) == ("splade", 1000, 64)
    special = special_ids(SPLADE)
    documents = splade.embed([r["text"] for r in rows])
    queries = splade.embed_query([r["text"] for r in rows])
    for row, document, query in zip(rows, documents, queries):
        assert_matches(document, row["document"], special, row["text"])
        assert query == document  # one model for both sides
    # The reference gives the special tokens weight: leaving them out is a choice.
    assert any(set(r["document"]["indices"]) & special for r in rows)
    assert not any(set(d.indices) & special for d in documents)


def test_inference_free_splade_documents_and_queries(inference_free):
    rows = reference(INFERENCE_FREE)
    assert inference_free.family == "splade-inference-free"
    special = special_ids(INFERENCE_FREE / "document_0_Transformer")
    texts = [r["text"] for r in rows]
    for row, document in zip(rows, inference_free.embed(texts)):
        assert_matches(document, row["document"], special, row["text"])  # log1p_relu
    for row, query in zip(rows, inference_free.embed_query(texts)):
        assert_matches(query, row["query"], special, row["text"])
    # A query's entries are its own tokens, each with its fixed weight.
    assert inference_free.embed_query(["", "   "]) == [SparseVector(), SparseVector()]


def test_bge_m3_sparse_head_matches_its_own_code(bge_m3):
    rows = reference(BGE_M3)
    assert (bge_m3.family, bge_m3.dim, bge_m3.max_tokens) == ("bge-m3", 600, 64)
    for row, vector in zip(rows, bge_m3.embed([r["text"] for r in rows])):
        assert_matches(vector, row, set(), row["text"])
    assert bge_m3.embed_query([rows[0]["text"]])[0] == bge_m3.embed([rows[0]["text"]])[0]


@pytest.mark.parametrize("directory", [SPLADE, INFERENCE_FREE, BGE_M3], ids=lambda d: d.name)
def test_batches_give_what_one_text_at_a_time_gives(directory):
    model = SparseEmbedder.load(directory, max_batch_tokens=100)  # many small batches
    texts = [r["text"] for r in reference(directory)] * 3
    batch = model.embed(texts)
    for text, vector in zip(texts, batch):
        alone = model.embed([text])[0]
        assert alone.indices == vector.indices
        assert max((abs(a - b) for a, b in zip(alone.values, vector.values)), default=0.0) <= 1e-5


def _write_safetensors(path, tensors: dict[str, tuple[list[int], bytes]]) -> None:
    """A safetensors file of f32 tensors, written by hand (the format is a JSON header)."""
    header, offset = {}, 0
    for name, (shape, data) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(d for _, d in tensors.values()))


def test_bge_m3_head_files_and_revision(tmp_path, bge_m3):
    copy = tmp_path / "bge-m3"
    shutil.copytree(BGE_M3, copy)
    assert SparseEmbedder.load(copy).model_revision == bge_m3.model_revision
    # The head as safetensors, twice the weights and bias: relu(2x) = 2 relu(x).
    with zipfile.ZipFile(BGE_M3 / "sparse_linear.pt") as archive:
        weight, bias = (archive.read(f"sparse_linear/data/{i}") for i in (0, 1))
    doubled = [array.array("f", w) for w in (weight, bias)]
    for values in doubled:
        values[:] = array.array("f", [2 * v for v in values])
    _write_safetensors(
        copy / "sparse_linear.safetensors",
        {"weight": ([1, 32], doubled[0].tobytes()), "bias": ([1], doubled[1].tobytes())},
    )
    twice = SparseEmbedder.load(copy)
    assert twice.model_revision != bge_m3.model_revision
    text = reference(BGE_M3)[0]["text"]
    once, two = bge_m3.embed([text])[0], twice.embed([text])[0]
    assert two.indices == once.indices
    assert max(abs(b - 2 * a) for a, b in zip(once.values, two.values)) <= 1e-5
    # A damaged head is named, not a crash.
    (copy / "sparse_linear.safetensors").unlink()
    (copy / "sparse_linear.pt").write_bytes((BGE_M3 / "sparse_linear.pt").read_bytes()[:300])
    with pytest.raises(ModelError, match=r"sparse_linear\.pt"):
        SparseEmbedder.load(copy)


def test_inference_free_revision_covers_both_sides(inference_free):
    document_side = SparseEmbedder.load(INFERENCE_FREE / "document_0_Transformer")
    assert document_side.family == "splade"  # the document route alone is a SPLADE model
    assert inference_free.model_revision != document_side.model_revision


def test_models_of_no_sparse_family_are_refused_by_name(tmp_path):
    with pytest.raises(ModelError, match=r"not a sparse model.*SPLADE.*inference-free.*BGE-M3"):
        SparseEmbedder.load(DATA / "tiny-xlm-roberta")  # a dense embedder
    with pytest.raises(ModelNotFoundError):
        SparseEmbedder.load(tmp_path / "missing")
    router = tmp_path / "router"
    shutil.copytree(INFERENCE_FREE, router)
    config = json.loads((router / "router_config.json").read_text())
    config["structure"]["query"] = ["document_0_Transformer", "document_1_SpladePooling"]
    (router / "router_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"router_config\.json.*SparseStaticEmbedding"):
        SparseEmbedder.load(router)
    pooling = tmp_path / "pooling"
    shutil.copytree(SPLADE, pooling)
    (pooling / "1_SpladePooling" / "config.json").write_text('{"pooling_strategy": "mean"}')
    with pytest.raises(ModelError, match='pooling_strategy "mean"'):
        SparseEmbedder.load(pooling)


def test_max_active_dims_keeps_the_largest_weights(tmp_path, splade):
    texts = [r["text"] for r in reference(SPLADE)]
    full = splade.embed(texts)
    assert splade.max_active_dims is None and max(map(len, full)) > 10
    capped = SparseEmbedder.load(SPLADE, max_active_dims=10)
    assert capped.embed(texts) == [v.top(10) for v in full]
    assert capped.embed_query(texts) == [v.top(10) for v in full]
    # The limit sentence-transformers saved with the model, as it applies it.
    copy = tmp_path / "capped"
    shutil.copytree(SPLADE, copy)
    config = json.loads((copy / "config_sentence_transformers.json").read_text())
    (copy / "config_sentence_transformers.json").write_text(json.dumps({**config, "max_active_dims": 7}))
    assert SparseEmbedder.load(copy).embed(texts) == [v.top(7) for v in full]
    (copy / "config_sentence_transformers.json").write_text(json.dumps({**config, "max_active_dims": 0}))
    with pytest.raises(ModelError, match="max_active_dims must be a positive integer"):
        SparseEmbedder.load(copy)
    with pytest.raises(ValueError, match="max_active_dims"):
        SparseEmbedder.load(SPLADE, max_active_dims=-1)


def test_embed_takes_a_sequence(splade):
    with pytest.raises(TypeError, match="sequence of strings"):
        splade.embed("one text")
    assert splade.embed([]) == []


def test_sparse_vector_top_and_dot():
    vector = SparseVector([1, 4, 7, 9], [0.5, 2.0, 0.5, 1.0])
    assert vector.top(2) == SparseVector([4, 9], [2.0, 1.0])
    assert vector.top(3) == SparseVector([1, 4, 9], [0.5, 2.0, 1.0])  # a tie goes to the lower id
    assert vector.top(10) is vector
    assert vector.dot(SparseVector([4, 8, 9], [1.0, 3.0, 2.0])) == 4.0
    with pytest.raises(ValueError):
        SparseVector([1, 2], [1.0])


def test_top_k_of_a_real_vector_keeps_the_heaviest(splade):
    vector = splade.embed(["KeyError: 'doc_id' raised by dict.__getitem__ in flows/embed.py"])[0]
    kept = vector.top(10)
    assert len(kept) == 10 and min(kept.values) >= sorted(vector.values)[-10]
