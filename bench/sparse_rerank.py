"""Sparse encoding (SPLADE) and cross-encoder reranking throughput, against
sentence-transformers on the same files and texts, timed in turn in the same run.

    python bench/sparse_rerank.py [--texts 200] [--repeat 3] [--queries 5]

Needs an environment with sentence-transformers (and so PyTorch) next to embedstream:
PyTorch builds the random models once (cached under ~/.cache/embedstream/bench-models)
and runs the peer. Prints one JSON object.

No package we can install ships real SPLADE or reranker weights, so both models are
random with real shapes: all-MiniLM-L6-v2's encoder configuration (6 layers, 384 wide,
BERT's 30,522-token vocabulary and the real WordPiece tokenizer), as a BertForMaskedLM
under SPLADE pooling (splade-mini's shape), and as a one-label
BertForSequenceClassification (cross-encoder/ms-marco-MiniLM-L6-v2's shape). The
vectors and scores mean nothing, but they are compared with the peer's, on a real
vocabulary, as a check beside tests/test_sparse.py and tests/test_rerank.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine
from corpus import paragraphs
from embed import timed_in_turn

from operators import Reranker, SparseEmbedder
from operators import models as model_files

CACHE = Path(os.environ.get("EMBEDSTREAM_BENCH_MODELS", Path.home() / ".cache/embedstream/bench-models"))
SEED = 11
#: all-MiniLM-L6-v2's encoder.
CONFIG = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)
MAX_SEQ_LENGTH = 256
#: What `embedstream search --rerank` scores per query by default (--rerank-k).
RERANK_K = 50


def build(name: str) -> Path:
    """The random model ``name`` ("splade" or "reranker"), made once with PyTorch."""
    target = CACHE / f"{name}-minilm-l6-shape"
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from sentence_transformers import CrossEncoder, SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_files.resolve("default"))
    torch.manual_seed(SEED)
    tmp = CACHE / f".{name}-tmp"
    if name == "splade":
        model = BertForMaskedLM(BertConfig(**CONFIG))
        with torch.no_grad():  # a few hundred active terms per text, as trained SPLADE has
            model.cls.predictions.bias.add_(torch.randn_like(model.cls.predictions.bias) - 2.5)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        SparseEncoder(
            modules=[
                Transformer(str(tmp), transformer_task="fill-mask", max_seq_length=MAX_SEQ_LENGTH),
                SpladePooling("max"),
            ],
            device="cpu",
        ).save(str(target))
    else:
        model = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=1))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        identity = torch.nn.Identity()  # ms-marco-MiniLM's: raw logits
        cross = CrossEncoder(str(tmp), max_length=MAX_SEQ_LENGTH, device="cpu", activation_fn=identity)
        cross.save(str(target))
    return target


def splade(texts: list[str], repeat: int) -> dict[str, object]:
    from sentence_transformers import SparseEncoder

    directory = build("splade")
    ours = SparseEmbedder.load(directory)
    peer = SparseEncoder(str(directory), device="cpu")
    special = set(peer.tokenizer.all_special_ids)
    timed = timed_in_turn(
        {
            "embedstream": lambda warmup=False: ours.embed(texts[:16] if warmup else texts),
            "sentence_transformers": lambda warmup=False: peer.encode_document(
                texts[:16] if warmup else texts, batch_size=32, convert_to_sparse_tensor=True
            ),
        },
        repeat,
    )
    vectors, reference = timed["embedstream"][1], timed["sentence_transformers"][1].to_dense()
    # An entry on one side only is a logit at 0 that rounding put on either side of it.
    worst, one_side = 0.0, 0.0
    for vector, row in zip(vectors, reference):
        expected = {int(i): float(row[i]) for i in row.nonzero().flatten().tolist() if int(i) not in special}
        got = vector.to_dict()
        worst = max([worst, *(abs(got.get(i, 0.0) - v) for i, v in expected.items())])
        only = [got[i] for i in set(got) - set(expected)] + [expected[i] for i in set(expected) - set(got)]
        one_side = max([one_side, *only])
    seconds = {name: t for name, (t, _) in timed.items()}
    return {
        "model": "random BertForMaskedLM, all-MiniLM-L6-v2's shape, SPLADE max pooling",
        "texts": len(texts),
        "avg_entries": round(statistics.mean(len(v) for v in vectors), 1),
        "texts_per_s": {name: round(len(texts) / t, 1) for name, t in seconds.items()},
        "speedup": round(seconds["sentence_transformers"] / seconds["embedstream"], 2),
        "max_abs_weight_difference": worst,
        "largest_weight_on_one_side_only": one_side,
    }


def rerank(texts: list[str], queries: int, repeat: int) -> dict[str, object]:
    from sentence_transformers import CrossEncoder

    directory = build("reranker")
    ours = Reranker.load(directory)
    peer = CrossEncoder(str(directory), device="cpu")
    asked = [texts[i][:80] for i in range(queries)]
    candidates = texts[:RERANK_K]

    def embedstream(warmup: bool = False) -> list[list[float]]:
        return [ours.score(q, candidates) for q in (asked[:1] if warmup else asked)]

    def st(warmup: bool = False) -> list:
        pairs = [[(q, t) for t in candidates] for q in (asked[:1] if warmup else asked)]
        return [peer.predict(p, batch_size=32) for p in pairs]

    timed = timed_in_turn({"embedstream": embedstream, "sentence_transformers": st}, repeat)
    worst = max(
        abs(a - float(b))
        for got, want in zip(timed["embedstream"][1], timed["sentence_transformers"][1])
        for a, b in zip(got, want)
    )
    seconds = {name: t for name, (t, _) in timed.items()}
    return {
        "model": "random BertForSequenceClassification, cross-encoder/ms-marco-MiniLM-L6-v2's shape",
        "queries": queries,
        "candidates_per_query": RERANK_K,
        "ms_per_query": {name: round(1000 * t / queries, 1) for name, t in seconds.items()},
        "speedup": round(seconds["sentence_transformers"] / seconds["embedstream"], 2),
        "max_abs_score_difference": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--queries", type=int, default=5)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # both sides on every core
    texts = paragraphs(max(args.texts, RERANK_K))
    load_before = os.getloadavg()[0]
    result = {
        "benchmark": "sparse_rerank",
        "machine": machine.describe(),
        "splade": splade(texts[: args.texts], args.repeat),
        "rerank": rerank(texts, args.queries, args.repeat),
        # A shared machine: other work slows both sides, which run in turn.
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "note": "medians of --repeat rounds timed in turn; random weights of real shapes",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
