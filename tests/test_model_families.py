"""Encoder architectures beyond BERT, each a tiny random model with a tokenizer of its
own kind and reference vectors from sentence-transformers (made by the scripts in
tests/fixtures, in a separate environment: CI needs no PyTorch)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import DATA
from safetensors_io import read_safetensors, write_safetensors
from test_embed import load_bf16

import operators
from operators import Embedder

XLMR = DATA / "tiny-xlm-roberta"


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


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


QWEN3 = DATA / "tiny-qwen3"


@pytest.fixture(scope="module")
def qwen3() -> Embedder:
    return Embedder.load(QWEN3)


def test_qwen3_matches_sentence_transformers(qwen3):
    """A decoder as embedder: causal and padding masks, grouped-query attention with an
    explicit head_dim, q/k RMSNorm, last-token pooling of the appended end-of-text
    token. The reference batches were left-padded; ours are right-padded."""
    assert (qwen3.pooling, qwen3.normalize, qwen3.dim, qwen3.max_tokens) == ("lasttoken", True, 32, 96)
    # The fixture's end-of-text token is also its padding token, whose embedding row
    # transformers initialises to zero: "" (that token alone) is the zero vector on
    # both sides, so it is compared by value only.
    assert _largest_error(qwen3, QWEN3) < 1e-5
    rows = [r for r in reference(QWEN3) if r["text"]]
    vectors = qwen3.embed([r["text"] for r in rows])
    assert np.sum(vectors * np.array([r["embedding"] for r in rows]), axis=1).min() >= 0.9999


def test_qwen3_end_of_text_survives_truncation(qwen3):
    rows = reference(QWEN3)
    counts = qwen3.count_tokens([r["text"] for r in rows])
    assert [min(n, 96) for n in counts] == [len(r["input_ids"]) for r in rows]
    assert all(r["input_ids"][-1] == rows[0]["input_ids"][-1] for r in rows)  # <|endoftext|> last, always


def test_qwen3_batch_equals_one_by_one(qwen3):
    texts = [r["text"] for r in reference(QWEN3)]
    batch = qwen3.embed(texts)
    for text, row in zip(texts, batch):
        np.testing.assert_allclose(qwen3.embed([text])[0], row, atol=2e-5)


@pytest.mark.parametrize("mode", ["cls", "mean", "max", "mean_sqrt_len_tokens", "lasttoken"])
def test_every_pooling_mode_loads_and_differs(tmp_path, mode, qwen3):
    model = tmp_path / "model"
    shutil.copytree(QWEN3, model)
    (model / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 32, "pooling_mode": mode})
    )
    embedder = Embedder.load(model)
    assert embedder.pooling == mode
    texts = ["A short text.", "A somewhat longer text about streaming embeddings and Kafka."]
    vectors = embedder.embed(texts)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    if mode != "lasttoken":
        assert not np.allclose(vectors, qwen3.embed(texts), atol=1e-3)


def test_unsupported_pooling_is_named(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(QWEN3, model)
    (model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "weightedmean"}))
    with pytest.raises(operators.ModelError, match=r"weightedmean.*lasttoken"):
        Embedder.load(model)


NOMIC = DATA / "tiny-nomic-bert"
GTE = DATA / "tiny-gte"


def _as_transformers_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The runtime names of transformers' NomicBertModel / GteModel, from the hub names
    the files carry (transformers' conversion mapping, run the other way)."""
    renames = [
        ("encoder.layers.", "layers."), ("encoder.layer.", "layers."), ("emb_ln.", "embeddings.LayerNorm."),
        ("attn.out_proj.", "self_attn.o_proj."), ("attention.o_proj.", "self_attn.o_proj."),
        ("mlp.fc11.", "mlp.up_proj."), ("mlp.fc12.", "mlp.gate_proj."), ("mlp.fc2.", "mlp.down_proj."),
        ("norm1.", "post_attention_layernorm."), ("norm2.", "post_mlp_layernorm."),
        ("attn_ln.", "post_attention_layernorm."), ("mlp_ln.", "post_mlp_layernorm."),
    ]  # fmt: skip
    out = {}
    for name, array in tensors.items():
        for old, new in renames:
            name = name.replace(old, new)
        for fused, parts in (
            ("attn.Wqkv.", ["self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."]),
            ("attention.qkv_proj.", ["self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."]),
            ("mlp.up_gate_proj.", ["mlp.up_proj.", "mlp.gate_proj."]),
        ):
            if fused in name:
                for part, chunk in zip(parts, np.split(array, len(parts), axis=0)):
                    out[name.replace(fused, part)] = chunk
                break
        else:
            out[name] = array
    return out


@pytest.mark.parametrize("directory", [NOMIC, GTE], ids=["nomic_bert", "gte"])
def test_rotary_berts_match_sentence_transformers(directory):
    """NomicBERT (SwiGLU, no biases, mean pooling) and GTE (GeGLU, biased attention, CLS
    pooling), in the hub's naming that transformers writes back."""
    embedder = Embedder.load(directory)
    assert _largest_error(embedder, directory) < 1e-5
    assert _cosines(embedder, directory).min() >= 0.9999


@pytest.mark.parametrize("directory", [NOMIC, GTE], ids=["nomic_bert", "gte"])
def test_rotary_berts_load_transformers_names(tmp_path, directory):
    model = tmp_path / "model"
    shutil.copytree(directory, model)
    renamed = _as_transformers_names(read_safetensors(model / "model.safetensors"))
    assert "layers.0.self_attn.q_proj.weight" in renamed
    write_safetensors(model / "model.safetensors", renamed)
    assert _largest_error(Embedder.load(model), directory) < 1e-5


def test_hub_config_spellings(tmp_path):
    def nomic_hub(c):  # the GPT-2 style keys of nomic-embed-text's own config
        hub_keys = {
            "n_embd": "hidden_size",
            "n_layer": "num_hidden_layers",
            "n_head": "num_attention_heads",
            "n_inner": "intermediate_size",
            "n_positions": "max_position_embeddings",
            "layer_norm_epsilon": "layer_norm_eps",
        }
        for new, old in hub_keys.items():
            c[new] = c.pop(old)
        c.update(activation_function="swiglu", rotary_emb_base=c.pop("rope_parameters")["rope_theta"])
        c.pop("hidden_act")

    def gte_hub(c):  # GTE's remote code: model_type "new", rope_theta at the top
        c.update(model_type="new", rope_theta=c.pop("rope_parameters")["rope_theta"])

    for directory, edit in ((NOMIC, nomic_hub), (GTE, gte_hub)):
        model = _edited(tmp_path / directory.name, directory, edit)
        assert _largest_error(Embedder.load(model), directory) < 1e-5


PROMPTED = DATA / "tiny-prompted"


def _cases(directory) -> dict[str, list[dict]]:
    cases: dict[str, list[dict]] = {}
    for row in reference(directory):
        cases.setdefault(row["case"], []).append(row)
    return cases


def test_prompts_dense_and_include_prompt_match_sentence_transformers():
    """Prompts (a default one, named ones, literal ones), mean pooling that leaves the
    prompt's tokens out (include_prompt false), a Dense layer with tanh, Normalize."""
    embedder = Embedder.load(PROMPTED)
    assert embedder.prompts == {"query": "query: ", "document": "passage: "}
    assert (embedder.default_prompt_name, embedder.dim) == ("document", 16)
    cases = _cases(PROMPTED)
    arguments = {
        "default": {},
        "query": {"prompt_name": "query"},
        "literal": {"prompt": "Represent this sentence: "},
    }
    for case, kwargs in arguments.items():
        rows = cases[case]
        vectors = embedder.embed([r["text"] for r in rows], **kwargs)
        assert np.abs(vectors - np.array([r["embedding"] for r in rows])).max() < 1e-5, case
    # An empty prompt is no prompt: it overrides the default one, as in sentence-transformers.
    assert not np.allclose(embedder.embed(["x"], prompt=""), embedder.embed(["x"]), atol=1e-4)
    with pytest.raises(ValueError, match="not one of the model's prompts"):
        embedder.embed(["x"], prompt_name="passage")


def test_truncate_dim_keeps_the_first_dimensions():
    embedder = Embedder.load(PROMPTED, truncate_dim=8)
    rows = _cases(PROMPTED)["truncate_dim_8"]
    vectors = embedder.embed([r["text"] for r in rows])
    assert vectors.shape == (len(rows), 8) and embedder.dim == 8
    assert np.abs(vectors - np.array([r["embedding"] for r in rows])).max() < 1e-5
    with pytest.raises(ValueError, match="truncate_dim"):
        Embedder.load(PROMPTED, truncate_dim=17)


def test_the_chunker_leaves_room_for_the_document_prompt():
    embedder = Embedder.load(PROMPTED)  # the default prompt is "passage: "
    text = "\n\n".join(r["text"] for r in reference(XLMR) if r["text"].strip())
    prompt_tokens = embedder.count_tokens(["passage: "])[0] - embedder.count_tokens([""])[0]
    assert prompt_tokens > 0
    for chunk in embedder.chunker().chunk(text):
        # Prompt and chunk together fit the model: nothing is truncated when embedded.
        assert embedder.count_tokens(["passage: " + chunk.text])[0] <= embedder.max_tokens
        assert chunk.n_tokens <= embedder.max_tokens - prompt_tokens
    plain = embedder.chunker(prompt="")
    assert max(c.n_tokens for c in plain.chunk(text)) > embedder.max_tokens - prompt_tokens


@pytest.mark.parametrize("directory", [XLMR, MODERNBERT, QWEN3, NOMIC, GTE], ids=lambda d: d.name)
def test_q8_quantizes_every_family_within_its_accuracy(directory):
    try:
        q8 = Embedder.load(directory, dtype="q8")
    except operators.UnsupportedError as error:
        assert "AVX2" in str(error)
        pytest.skip("this CPU has no AVX2")
    rows = [r for r in reference(directory) if np.linalg.norm(r["embedding"]) > 0]
    texts, expected = [r["text"] for r in rows], np.array([r["embedding"] for r in rows])
    got = q8.embed(texts)
    assert q8.dtype == "q8"
    assert _cosine(got, expected).min() >= 0.999
    # The int8 layers really run: the vectors are close to f32's, not equal to them.
    assert np.abs(got - Embedder.load(directory).embed(texts)).max() > 1e-6


@pytest.mark.parametrize("directory", [XLMR, MODERNBERT, QWEN3, NOMIC, GTE], ids=lambda d: d.name)
def test_bf16_rounds_every_family_within_its_accuracy(directory):
    bf16 = load_bf16(directory)
    rows = [r for r in reference(directory) if np.linalg.norm(r["embedding"]) > 0]
    texts, expected = [r["text"] for r in rows], np.array([r["embedding"] for r in rows])
    got = bf16.embed(texts)
    f32 = Embedder.load(directory).embed(texts)
    assert bf16.dtype == "bf16"
    assert _cosine(got, f32).min() >= 0.9995
    assert _cosine(got, expected).min() >= 0.999
    # The bf16 layers really run: the vectors are close to f32's, not equal to them.
    assert np.abs(got - f32).max() > 1e-6
