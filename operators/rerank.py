"""Cross-encoder rerankers on candle: the query and each text read together, one
relevance score per text."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional, Union

from . import _native, models


class Reranker:
    """A cross-encoder from a Hugging Face-format directory (or a hub id found in an
    offline HF cache): ``BertForSequenceClassification`` (ms-marco-MiniLM style) or
    ``XLMRobertaForSequenceClassification`` (bge-reranker style), with one label; or an
    LLM reranker (Qwen3-Reranker: a ``Qwen3ForCausalLM`` scoring P("yes") of the next
    token in the chat template of its model card, which is its score, 0 to 1).

    Scores are what sentence-transformers' ``CrossEncoder.predict`` returns (within
    1e-4): the logit after the activation saved with the model (``activation``: ms-marco
    models save ``identity``, so raw logits), else a sigmoid (bge-reranker: 0 to 1).
    Scores of one query compare with each other; across models they do not.
    """

    def __init__(self, native: _native.Reranker) -> None:
        self._native = native

    @classmethod
    def load(
        cls,
        model: Union[str, os.PathLike],
        *,
        device: str = "cpu",
        dtype: str = "f32",
        max_batch_tokens: Optional[int] = None,
    ) -> Reranker:
        """Loads a reranker; ``device``, ``dtype`` and ``max_batch_tokens`` as for
        :meth:`operators.Embedder.load`. Raises ``ModelNotFoundError`` for a missing
        directory or file and ``ModelError`` for a model that is not a one-label
        cross-encoder."""
        if max_batch_tokens is not None and max_batch_tokens <= 0:
            raise ValueError("max_batch_tokens must be positive")
        native = _native.Reranker(
            models.resolve(model), device, dtype, max_batch_tokens or 0, [str(p) for p in models.hub_caches()]
        )
        return cls(native)

    def score(self, query: str, texts: Sequence[str]) -> list[float]:
        """The relevance of each text to ``query``, in input order; runs without the GIL.
        A pair longer than ``max_tokens`` is truncated, the longer of the two first."""
        if not isinstance(query, str):
            raise TypeError("query must be a string")
        if isinstance(texts, str):
            raise TypeError("score() takes a sequence of strings, not a single string")
        return self._native.score(query, list(texts))

    def rank(self, query: str, texts: Sequence[str], top_k: Optional[int] = None) -> list[tuple[int, float]]:
        """``(index, score)`` of the texts, best first (ties in input order), at most
        ``top_k`` of them."""
        scores = self.score(query, texts)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(i, scores[i]) for i in order[:top_k]]

    @property
    def activation(self) -> str:
        """``"identity"``, ``"sigmoid"`` or ``"tanh"``: applied to the logit."""
        return self._native.activation

    @property
    def model_id(self) -> str:
        return self._native.model_id

    @property
    def model_revision(self) -> str:
        """First 16 hex digits of the weights' SHA-256."""
        return self._native.model_revision

    @property
    def max_tokens(self) -> int:
        """Longest query and text pair in tokens, special tokens included."""
        return self._native.max_tokens

    @property
    def max_batch_tokens(self) -> int:
        return self._native.max_batch_tokens

    @property
    def device(self) -> str:
        return self._native.device

    @property
    def dtype(self) -> str:
        return self._native.dtype

    def __repr__(self) -> str:
        return (
            f"Reranker(model_id={self.model_id!r}, revision={self.model_revision!r}, "
            f"activation={self.activation!r}, max_tokens={self.max_tokens}, device={self.device!r}, "
            f"dtype={self.dtype!r})"
        )
