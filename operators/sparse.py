"""Sparse embeddings on candle: SPLADE, inference-free SPLADE and BGE-M3's sparse head.

A sparse vector holds a weight per vocabulary entry (token id), nearly all zero: the
entries kept are the terms a text is about, with its own terms among them, so exact
identifiers (function names, error strings, product codes) match as they do in a
lexical index, and learned expansions match what dense vectors miss.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from . import _native, models
from .embed import NativeModel
from .errors import ModelError

#: ``"splade"``: a masked-LM model with SPLADE pooling, for queries and documents alike;
#: ``"splade-inference-free"``: a SPLADE document encoder whose queries get a fixed
#: weight per token without running a model; ``"bge-m3"``: BGE-M3's sparse head.
SparseFamily = Literal["splade", "splade-inference-free", "bge-m3"]


@dataclass(frozen=True)
class SparseVector:
    """Token ids (``indices``, ascending, distinct) and their weights (``values``, all
    positive). The similarity of two sparse vectors is their dot product."""

    indices: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.values):
            raise ValueError(f"{len(self.indices)} indices but {len(self.values)} values")

    def __len__(self) -> int:
        """The entries kept (non-zero weights)."""
        return len(self.indices)

    def to_dict(self) -> dict[int, float]:
        return dict(zip(self.indices, self.values))

    def dot(self, other: SparseVector) -> float:
        """The dot product: the score of a document vector for a query vector."""
        small, large = (self, other) if len(self) <= len(other) else (other, self)
        weights = large.to_dict()
        return float(sum(v * weights.get(i, 0.0) for i, v in zip(small.indices, small.values)))

    def top(self, k: int) -> SparseVector:
        """The ``k`` largest weights (ties to the lower token id), indices ascending: for
        stores that cap the entries of an indexed vector (pgvector's HNSW index on
        ``sparsevec`` takes at most 1,000). What it drops is the smallest weights, so the
        score against any query drops by at most their sum times the query's largest
        weight."""
        if k < 0:
            raise ValueError("k must not be negative")
        if len(self) <= k:
            return self
        kept = heapq.nsmallest(k, zip(self.indices, self.values), key=lambda p: (-p[1], p[0]))
        kept.sort()
        return SparseVector([i for i, _ in kept], [v for _, v in kept])


def _vectors(rows: list[tuple[list[int], list[float]]]) -> list[SparseVector]:
    return [SparseVector(indices, values) for indices, values in rows]


def _saved_max_active_dims(directory: os.PathLike) -> Optional[int]:
    """The ``max_active_dims`` that sentence-transformers saved with the model, if any."""
    path = os.path.join(directory, "config_sentence_transformers.json")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("max_active_dims")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{path}: {e}") from e
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ModelError(f"{path}: max_active_dims must be a positive integer, not {value!r}")
    return value


def _texts(texts: Sequence[str], method: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{method}() takes a sequence of strings, not a single string")
    return list(texts)


class SparseEmbedder(NativeModel):
    """A sparse encoder on candle, from a Hugging Face-format directory (or a hub id
    found in an offline HF cache) in one of three families (:data:`SparseFamily`):

    - SPLADE: ``BertForMaskedLM`` (or ``RobertaForMaskedLM``) saved by
      sentence-transformers' ``SparseEncoder`` with ``SpladePooling``, or a bare
      masked-LM checkpoint (max pooling, relu): ``log(1 + relu(logits))`` pooled over the
      tokens;
    - inference-free SPLADE: a ``SparseEncoder`` with a ``Router`` whose query route is a
      ``SparseStaticEmbedding`` (token weights, no model) and whose document route is a
      SPLADE model;
    - BGE-M3: the XLM-RoBERTa checkpoint with ``sparse_linear.pt`` beside it:
      ``relu(sparse_linear(h))`` per token, the largest per token id.

    Weights match sentence-transformers' ``SparseEncoder`` (BGE-M3: its own code) within
    1e-4, except that special tokens (``[CLS]``, ``[SEP]``, ``<s>``, padding…) are never
    entries: they mark structure, not content, and BGE-M3's code drops them too.
    """

    def __init__(self, native: _native.SparseEmbedder, max_active_dims: Optional[int] = None) -> None:
        self._native = native
        if max_active_dims is not None and (
            isinstance(max_active_dims, bool) or not isinstance(max_active_dims, int) or max_active_dims <= 0
        ):
            raise ValueError(f"max_active_dims must be a positive integer, not {max_active_dims!r}")
        self._max_active_dims = max_active_dims

    @classmethod
    def load(
        cls,
        model: Union[str, os.PathLike],
        *,
        device: str = "cpu",
        dtype: str = "f32",
        max_batch_tokens: Optional[int] = None,
        max_active_dims: Optional[int] = None,
    ) -> SparseEmbedder:
        """Loads a sparse model; ``device``, ``dtype`` and ``max_batch_tokens`` as for
        :meth:`operators.Embedder.load` (the heads run in f32 on the CPU).
        ``max_active_dims`` keeps each vector's largest weights only, as
        sentence-transformers does; by default the model's own
        (``config_sentence_transformers.json``), else all. Raises ``ModelNotFoundError``
        for a missing directory or file and ``ModelError`` for a model of no sparse
        family, naming what was expected."""
        if max_batch_tokens is not None and max_batch_tokens <= 0:
            raise ValueError("max_batch_tokens must be positive")
        native = _native.SparseEmbedder(
            models.resolve(model), device, dtype, max_batch_tokens or 0, [str(p) for p in models.hub_caches()]
        )
        if max_active_dims is None:
            max_active_dims = _saved_max_active_dims(native.path)
        return cls(native, max_active_dims)

    def embed(self, texts: Sequence[str]) -> list[SparseVector]:
        """Sparse vectors of documents (or passages, chunks), in input order; runs without
        the GIL. Texts past ``max_tokens`` are truncated; an empty text gives what its
        special tokens alone give, which may be nothing."""
        return self._capped(self._native.embed(_texts(texts, "embed")))

    def embed_query(self, texts: Sequence[str]) -> list[SparseVector]:
        """Sparse vectors of search queries: as :meth:`embed`, except for inference-free
        SPLADE, where each of a query's tokens gets its fixed weight."""
        return self._capped(self._native.embed_queries(_texts(texts, "embed_query")))

    def _capped(self, rows: list[tuple[list[int], list[float]]]) -> list[SparseVector]:
        vectors = _vectors(rows)
        if self._max_active_dims is None:
            return vectors
        return [v.top(self._max_active_dims) for v in vectors]

    @property
    def max_active_dims(self) -> Optional[int]:
        """Most entries of a vector, or None for no limit."""
        return self._max_active_dims

    @property
    def family(self) -> SparseFamily:
        return self._native.family

    @property
    def dim(self) -> int:
        """The vocabulary size: every index is below it (pgvector's ``sparsevec(dim)``)."""
        return self._native.vocab_size

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
            f"SparseEmbedder(model_id={self.model_id!r}, revision={self.model_revision!r}, "
            f"family={self.family!r}, dim={self.dim}, max_tokens={self.max_tokens}, "
            f"device={self.device!r}, dtype={self.dtype!r})"
        )
