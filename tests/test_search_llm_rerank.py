"""The LLM reranker (Qwen3-Reranker's shape: a Qwen3ForCausalLM scoring P("yes") of the
next token in its chat template) on a tiny random model, against the scores its model
card's code gives in transformers (tests/fixtures/make_tiny_qwen3_reranker.py), and as
search's reranker over a real store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors_io import read_safetensors, write_safetensors
from sink_helpers import MODEL, manifest, messages, record

from flows.search import Query, retrieve
from flows.sink import apply_ops, to_op
from flows.stores import TableSpec, open_store
from operators import ModelError, Reranker

LLM = Path(__file__).resolve().parent / "data" / "tiny-qwen3-reranker"
SPEC = TableSpec(MODEL["model_id"], MODEL["model_revision"], 4, "f32", None)


def reference() -> list[dict]:
    with open(LLM / "reference.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f][1:]


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    return Reranker.load(LLM)


def test_scores_match_the_model_cards_code(reranker):
    """Within 1e-6 of transformers, in batches of unequal lengths, one pair truncated."""
    assert reranker.activation == "sigmoid" and reranker.max_tokens == 400
    cases = reference()
    assert max(len(ids) for case in cases for ids in case["input_ids"]) == reranker.max_tokens
    for case in cases:
        scores = reranker.score(case["query"], case["texts"])
        assert scores == pytest.approx(case["scores"], abs=1e-6)
        assert len(set(round(s, 4) for s in scores)) > 1  # the texts are told apart
        # One at a time gives what the batch gives.
        assert [reranker.score(case["query"], [t])[0] for t in case["texts"]] == pytest.approx(
            scores, abs=1e-5
        )


def test_a_causal_lm_without_yes_and_no_tokens_is_refused(tmp_path):
    broken = tmp_path / "no-yes"
    shutil.copytree(LLM, broken)
    tokenizer = json.loads((broken / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["yes!"] = vocab.pop("yes")  # the id stays; no token is "yes" any more
    tokenizer["model"]["merges"] = [
        m for m in tokenizer["model"]["merges"] if "".join(m if isinstance(m, list) else m.split()) != "yes"
    ]
    (broken / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ModelError, match='answers "yes" or "no", but "yes" is not one token'):
        Reranker.load(broken)


def test_search_reranks_with_the_llm_reranker(store_url, reranker):
    texts = {
        "assert": "Assert statements are a convenient way to insert debugging assertions into a program",
        "raise": "The raise statement raises an exception; AssertionError when an assert fails",
        "loops": "The for statement iterates over the items of any sequence in order",
    }
    stream = []
    for offset, (doc_id, text) in enumerate(texts.items()):
        r = record(doc_id, offset, 0, 1, text)
        stream += [("VectorRecord", r), ("DocManifest", manifest([r]))]
    store = open_store(store_url)
    try:
        apply_ops(store, [to_op(m) for m in messages(stream)])
        query = "assert statement"
        hits = retrieve(store, SPEC, Query(query), 3, mode="text", reranker=reranker, rerank_k=3)
    finally:
        store.close()
    found = [h.doc_id for h in hits]
    expected = reranker.score(query, [texts[d] for d in found])
    assert [h.score for h in hits] == pytest.approx(expected) == sorted(expected, reverse=True)
    assert set(found) == set(texts)  # "statement" is in each


def _variant(into: Path, *, tie: bool, head: str) -> Path:
    """A copy of the fixture whose LM head is ``head``: ``"own"`` (lm_head.weight kept),
    ``"embeddings"`` (lm_head.weight set to the input embeddings) or ``"none"`` (no
    lm_head.weight), with ``tie_word_embeddings`` set to ``tie``."""
    shutil.copytree(LLM, into)
    tensors = read_safetensors(into / "model.safetensors")
    if head == "embeddings":
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    elif head == "none":
        del tensors["lm_head.weight"]
    write_safetensors(into / "model.safetensors", tensors)
    config = json.loads((into / "config.json").read_text())
    (into / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tie}))
    return into


def test_a_tied_checkpoint_scores_with_its_input_embeddings(tmp_path):
    """Qwen3-Reranker-0.6B ties its LM head to its input embeddings and stores no
    lm_head.weight: scored through the embeddings, as a checkpoint that stores them as
    its head is."""
    query, texts = reference()[0]["query"], reference()[0]["texts"]
    tied = Reranker.load(_variant(tmp_path / "tied", tie=True, head="none")).score(query, texts)
    stored = Reranker.load(_variant(tmp_path / "stored", tie=False, head="embeddings")).score(query, texts)
    assert tied == stored
    assert tied != pytest.approx(reference()[0]["scores"], abs=1e-3)  # another head than the fixture's


def test_an_untied_checkpoint_without_its_lm_head_is_refused(tmp_path):
    """A config that says the head is its own, with weights that lack it, is a broken
    checkpoint: refused, not scored with the input embeddings."""
    with pytest.raises(ModelError, match="tie_word_embeddings: false needs its LM head"):
        Reranker.load(_variant(tmp_path / "broken", tie=False, head="none"))
