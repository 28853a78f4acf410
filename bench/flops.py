"""The arithmetic one forward pass needs: multiply-adds x2 per token, from a model's
config.json and the texts' token counts. With numpy's sgemm speed on the same machine
it gives the f32 limit: the tokens/s a model would reach if every FLOP ran as fast as
one large matrix product, which no implementation beats in f32.

Counted: every linear layer of every transformer layer, and attention over the keys
each query may see (its whole sequence, ModernBERT's window in local layers, the keys
before it in a decoder). Not counted: embeddings, norms, activations and pooling,
which are element-wise and a few percent at most.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Architectures whose feed-forward layer is gated: two input projections of `intermediate_size`.
GATED = {"modernbert", "nomic_bert", "qwen3"}


def flops_per_token(model_dir: str | Path, lengths: list[int]) -> float:
    """FLOPs per token of one forward pass over sequences of these lengths, averaged."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    kind = config.get("model_type", "bert")
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    width = heads * head_dim  # what attention reads and writes per token
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, k, v and out
    feed_forward = hidden * inner * (3 if kind in GATED else 2)
    tokens = sum(lengths)
    if tokens == 0:
        return 0.0
    seen = sum(keys_seen(length, reach) for reach in _reaches(config) for length in lengths)
    # Scores and the weighted sum of values: `width` multiply-adds per (query, key) each.
    multiply_adds = layers * (projections + feed_forward) * tokens + 2 * width * seen
    return 2 * multiply_adds / tokens


def keys_seen(length: int, reach: str | int) -> int:
    """(query, key) pairs of one sequence: `reach` is "all", "causal" or a half-window."""
    if reach == "all":
        return length * length
    if reach == "causal":
        return length * (length + 1) // 2
    return sum(min(i + reach, length - 1) - max(i - reach, 0) + 1 for i in range(length))


def _reaches(config: dict) -> list[str | int]:
    """Each layer's attention reach."""
    layers = config["num_hidden_layers"]
    kind = config.get("model_type")
    if kind == "qwen3":
        return ["causal"] * layers
    if kind == "modernbert":
        half = config.get("local_attention", 128) // 2
        types = config.get("layer_types") or [
            "full_attention" if i % config.get("global_attn_every_n_layers", 1) == 0 else "sliding_attention"
            for i in range(layers)
        ]
        return ["all" if t == "full_attention" else half for t in types]
    return ["all"] * layers
