"""Cross-encoder rerankers on candle against sentence-transformers' CrossEncoder: a tiny
random BertForSequenceClassification (ms-marco-MiniLM's shape, Identity activation, token
types that matter) and a tiny random XLMRobertaForSequenceClassification (bge-reranker's,
sigmoid), made by tests/fixtures/make_tiny_rerankers.py in a separate environment (CI
needs no PyTorch). No PyPI package ships real reranker weights that we could install."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import DATA

from operators import ModelError, ModelNotFoundError, Reranker

BERT = DATA / "tiny-reranker-bert"
XLMR = DATA / "tiny-reranker-xlm-roberta"
TOLERANCE = 1e-4


def reference(directory):
    lines = [json.loads(line) for line in open(directory / "reference.jsonl", encoding="utf-8")]
    return lines[0], lines[1:]


@pytest.mark.parametrize(
    ("directory", "activation"), [(BERT, "identity"), (XLMR, "sigmoid")], ids=["bert", "xlmr"]
)
def test_scores_match_sentence_transformers(directory, activation):
    reranker = Reranker.load(directory)
    header, rows = reference(directory)
    assert (reranker.activation, reranker.max_tokens) == (activation, 64)
    assert header["activation"].lower() == activation
    for row in rows:
        scores = reranker.score(row["query"], row["texts"])
        worst = max(abs(a - b) for a, b in zip(scores, row["scores"]))
        assert worst <= TOLERANCE, (row["query"][:20], worst)
        # The texts differ by far more than the tolerance, so a wrong score shows.
        assert max(row["scores"]) - min(row["scores"]) > 100 * TOLERANCE


@pytest.mark.parametrize("directory", [BERT, XLMR], ids=["bert", "xlmr"])
def test_batches_give_what_one_pair_at_a_time_gives(directory):
    reranker = Reranker.load(directory, max_batch_tokens=80)  # about one pair per batch
    _, rows = reference(directory)
    query, texts = rows[0]["query"], rows[0]["texts"] * 2
    together = reranker.score(query, texts)
    alone = [reranker.score(query, [text])[0] for text in texts]
    assert max(abs(a - b) for a, b in zip(together, alone)) <= 1e-5


def test_rank_orders_best_first():
    reranker = Reranker.load(XLMR)
    _, rows = reference(XLMR)
    row = rows[0]
    ranked = reranker.rank(row["query"], row["texts"], top_k=3)
    best = sorted(range(len(row["scores"])), key=lambda i: -row["scores"][i])[:3]
    assert [i for i, _ in ranked] == best
    assert reranker.rank(row["query"], []) == []


def test_the_activation_saved_with_the_model_is_applied(tmp_path):
    copy = tmp_path / "bert"
    shutil.copytree(BERT, copy)
    config = json.loads((copy / "config_sentence_transformers.json").read_text())
    config["activation_fn"] = "torch.nn.modules.activation.Sigmoid"
    (copy / "config_sentence_transformers.json").write_text(json.dumps(config))
    _, rows = reference(BERT)
    raw = Reranker.load(BERT).score(rows[0]["query"], rows[0]["texts"])
    sigmoid = Reranker.load(copy).score(rows[0]["query"], rows[0]["texts"])
    assert all(abs(s - 1 / (1 + 2.718281828459045**-r)) < 1e-6 for r, s in zip(raw, sigmoid))
    config["activation_fn"] = "my.module.Custom"
    (copy / "config_sentence_transformers.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"activation_fn .*my\.module\.Custom"):
        Reranker.load(copy)


def test_models_that_are_not_cross_encoders_are_refused(tmp_path):
    with pytest.raises(ModelError, match="not a cross-encoder"):
        Reranker.load(DATA / "tiny-xlm-roberta")  # a dense embedder
    with pytest.raises(ModelError, match="not a cross-encoder"):
        Reranker.load(DATA / "tiny-splade")  # a masked-LM model
    with pytest.raises(ModelNotFoundError):
        Reranker.load(tmp_path / "missing")


def test_score_takes_a_query_and_a_sequence():
    reranker = Reranker.load(BERT)
    with pytest.raises(TypeError, match="sequence of strings"):
        reranker.score("query", "one text")
    with pytest.raises(TypeError, match="query must be a string"):
        reranker.score(["query"], ["text"])
    assert reranker.score("query", []) == []
