"""Embedding and chunking with the native candle models."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import numpy as np

from . import _native, models
from .document import Document


def resolve_device(device: str) -> str:
    """What ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``) names on this
    machine, e.g. ``"cuda:0"``; raises ``ModelError`` if it cannot be used here."""
    return _native.resolve_device(device)


def cpu_kernels() -> tuple[str, str]:
    """``(in force, the best this CPU runs)``, each ``"portable"``, ``"avx2"`` or
    ``"avx512"``. ``EMBEDSTREAM_CPU_KERNELS`` (``auto`` by default) forces a path; it
    is read at every model load and holds for the whole process."""
    return _native.cpu_kernels()


def cpu_info() -> dict[str, Any]:
    """What the CPU path runs, after reading ``EMBEDSTREAM_CPU_KERNELS`` as a model load
    does: ``processor`` (the CPU's model name), ``kernels`` and ``best_kernels`` (as
    :func:`cpu_kernels`), ``gemm`` (the f32 matrix products' instruction set:
    ``"avx512f"``, ``"fma"`` or ``"scalar"``), ``threads``, and ``features``: the CPU
    features those choices look for, of those this CPU has."""
    return {"processor": _processor(), **_native.cpu_info()}


def _processor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: How a chunker places its cuts: ``"greedy"`` fills every chunk as far as it can;
#: ``"stable"`` chooses among the last boundaries that fit by the text around them, so
#: that an edit changes the chunks near it and not every chunk after it.
ChunkStrategy = Literal["greedy", "stable"]


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: ``document.text[char_start:char_end] == text``."""

    text: str
    index: int
    char_start: int
    char_end: int
    #: 1-based page of paged documents (PDF), else None.
    page: Optional[int]
    #: Tokens the model sees, special tokens included; never above the chunker's max_tokens.
    n_tokens: int
    #: Transcripts: the milliseconds of the recording the chunk's segments cover.
    time_start_ms: Optional[int] = None
    time_end_ms: Optional[int] = None


class Chunker:
    """Cuts text into chunks of at most ``max_tokens`` model tokens, at the strongest
    boundary that fits: heading, paragraph, line, sentence, word. Deterministic.

    ``strategy`` ``"stable"`` (for incremental updates) ends each chunk among the last
    boundaries of that strength by a hash of the text around them: an edited paragraph
    changes about one chunk, where greedy packing changes every chunk after it, at the
    price of chunks a little shorter (see ``bench/incremental.py``)."""

    def __init__(self, native: _native.Chunker) -> None:
        self._native = native

    @property
    def max_tokens(self) -> int:
        return self._native.max_tokens

    @property
    def overlap_tokens(self) -> int:
        return self._native.overlap_tokens

    @property
    def strategy(self) -> ChunkStrategy:
        return self._native.strategy

    def chunk(self, doc: Union[Document, str]) -> list[Chunk]:
        """Chunks of a Document or a string. A transcript (a Document with ``times``)
        is cut at segment boundaries only: consecutive segments share a chunk while
        they fit, and only a segment too long for one chunk is cut inside."""
        if isinstance(doc, Document):
            if doc.times is not None:
                return self._chunk_segments(doc)
            text, pages = doc.text, (doc.pages if doc.paged else None)
        else:
            text, pages = doc, None
        return [
            Chunk(text[start:end], index, start, end, page, n_tokens)
            for index, start, end, page, n_tokens in self._native.chunk(text, pages)
        ]

    def _chunk_segments(self, doc: Document) -> list[Chunk]:
        times = doc.times or []
        if len(times) != len(doc.pages):
            raise ValueError(f"{len(doc.pages)} spans but {len(times)} times")
        pieces: list[tuple[int, int, int, int, int]] = []  # start, end, n_tokens, t0, t1
        group: Optional[tuple[int, int, int, int, int]] = None
        for (start, end), (t0, t1) in zip(doc.pages, times):
            alone = self._native.chunk(doc.text[start:end], None)
            if not alone:
                continue  # a segment without text
            if len(alone) > 1:  # too long for one chunk: cut inside it, times kept
                if group:
                    pieces.append(group)
                    group = None
                pieces += [(start + a, start + b, n, t0, t1) for _, a, b, _, n in alone]
                continue
            if group is not None:
                joined = self._native.chunk(doc.text[group[0] : end], None)
                if len(joined) == 1:
                    group = (group[0], end, joined[0][4], group[3], t1)
                    continue
                pieces.append(group)
            group = (start, end, alone[0][4], t0, t1)
        if group is not None:
            pieces.append(group)
        return [
            Chunk(doc.text[a:b], index, a, b, None, n, t0, t1)
            for index, (a, b, n, t0, t1) in enumerate(pieces)
        ]

    def settings(self) -> dict[str, int]:
        """The sizes recorded with each vector (``VectorRecord.chunker``)."""
        return {"max_tokens": self.max_tokens, "overlap_tokens": self.overlap_tokens}


class NativeModel:
    """What every model answers from its native half: which model it is, and the
    longest input it takes."""

    _native: Any

    @property
    def model_id(self) -> str:
        return self._native.model_id

    @property
    def model_revision(self) -> str:
        """First 16 hex digits of the weights' SHA-256."""
        return self._native.model_revision

    @property
    def dim(self) -> int:
        """Dimension of the vectors the model returns."""
        return self._native.dim

    @property
    def max_tokens(self) -> int:
        """Longest input in tokens, special tokens included."""
        return self._native.max_tokens


class Embedder(NativeModel):
    """A sentence-embedding model on candle (BERT, XLM-RoBERTa, ModernBERT, Qwen3,
    NomicBERT, GTE).

    Pooling, Dense layers, normalisation, prompts and the sequence limit come from the
    model's sentence-transformers files, so vectors match what sentence-transformers
    computes; the names follow sentence-transformers' own (``truncate_dim``,
    ``prompt_name``, ``prompt``, ``prompts``).
    """

    def __init__(self, native: _native.Embedder, truncate_dim: Optional[int] = None) -> None:
        self._native = native
        if truncate_dim is not None and not 0 < truncate_dim <= native.dim:
            raise ValueError(f"truncate_dim must be between 1 and the model's dimension {native.dim}")
        self._truncate_dim = truncate_dim

    @classmethod
    def load(
        cls,
        model: Union[str, os.PathLike] = "default",
        *,
        device: str = "cpu",
        dtype: str = "f32",
        max_batch_tokens: Optional[int] = None,
        truncate_dim: Optional[int] = None,
    ) -> Embedder:
        """Loads ``"default"`` (all-MiniLM-L6-v2, after ``embedstream models pull``), a
        local Hugging Face-format directory, or a hub id found in an offline HF cache.

        ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (the first GPU when
        the wheel was built with CUDA and one answers, else the CPU). ``dtype``:
        ``"f32"``; ``"q8"`` (int8 linear layers, on CPUs with AVX2, through AVX-512 VNNI
        where there is: about 2.2 times f32's speed there, cosine >= 0.995 to f32);
        ``"bf16"`` (on a CPU, bf16 linear layers on CPUs with AVX512_BF16, Intel Xeon since
        Cooper Lake and AMD since Zen 4: about twice f32's speed, cosine >= 0.9995 to f32;
        on a GPU, the whole model in bf16); on a GPU ``"f16"`` too.
        ``max_batch_tokens``: most tokens, padding included, in one forward pass
        (default: 2,048 on the CPU, 16,384 on a GPU). ``truncate_dim``: keep the first
        dimensions of every vector (Matryoshka models), as sentence-transformers does:
        after normalising, so rows are not re-normalised."""
        if max_batch_tokens is not None and max_batch_tokens <= 0:
            raise ValueError("max_batch_tokens must be positive")
        native = _native.Embedder(
            models.resolve(model), device, dtype, max_batch_tokens or 0, [str(p) for p in models.hub_caches()]
        )
        return cls(native, truncate_dim)

    def embed(
        self, texts: Sequence[str], prompt_name: Optional[str] = None, prompt: Optional[str] = None
    ) -> np.ndarray:
        """Embeds ``texts`` into a float32 array of shape ``[len(texts), dim]``, rows in
        input order. Runs without the GIL. Texts past ``max_tokens`` are truncated, as
        sentence-transformers does; an empty or blank text gets the embedding of the
        empty sequence (special tokens only).

        Each text follows ``prompt``, else the prompt named ``prompt_name``, else the
        model's default prompt (``default_prompt_name``), if any: as
        sentence-transformers' ``encode``."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not a single string")
        vectors = self._native.embed(list(texts), self.resolve_prompt(prompt_name, prompt))
        if self._truncate_dim is not None:
            vectors = np.ascontiguousarray(vectors[:, : self._truncate_dim])
        return vectors

    def resolve_prompt(
        self, prompt_name: Optional[str] = None, prompt: Optional[str] = None
    ) -> Optional[str]:
        """The prompt ``embed`` puts before each text for these arguments."""
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return None
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise ValueError(f"prompt_name {name!r} is not one of the model's prompts ({known})")
        return self.prompts[name]

    @property
    def prompts(self) -> dict[str, str]:
        """Named prompts of the model's ``config_sentence_transformers.json``."""
        return dict(self._native.prompts)

    @property
    def default_prompt_name(self) -> Optional[str]:
        return self._native.default_prompt_name

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text before truncation, special tokens included."""
        if isinstance(texts, str):
            raise TypeError("count_tokens() takes a sequence of strings, not a single string")
        return self._native.count_tokens(list(texts))

    def chunker(
        self,
        max_tokens: Optional[int] = None,
        overlap_tokens: int = 0,
        prompt_name: Optional[str] = None,
        prompt: Optional[str] = None,
        strategy: ChunkStrategy = "greedy",
    ) -> Chunker:
        """A chunker counting this model's tokens; ``max_tokens`` defaults to the model's
        limit. The prompt that ``embed`` would put before each chunk (same arguments)
        counts against it, so that prompt and chunk together are never truncated.
        ``strategy`` is ``"greedy"`` or ``"stable"`` (see :class:`Chunker`)."""
        limit = self.max_tokens if max_tokens is None else max_tokens
        if limit > self.max_tokens:
            from .errors import UnsupportedError

            raise UnsupportedError(f"max_tokens {limit} is over the model's limit of {self.max_tokens}")
        text = self.resolve_prompt(prompt_name, prompt)
        if text:
            with_prompt, without = self._native.count_tokens([text, ""])
            limit -= with_prompt - without
        return Chunker(self._native.chunker(limit, overlap_tokens, strategy))

    @property
    def dim(self) -> int:
        """Dimension of the vectors ``embed`` returns (``truncate_dim`` when set)."""
        return self._truncate_dim or self._native.dim

    @property
    def max_batch_tokens(self) -> int:
        return self._native.max_batch_tokens

    @property
    def device(self) -> str:
        return self._native.device

    @property
    def dtype(self) -> str:
        return self._native.dtype

    @property
    def pooling(self) -> str:
        return self._native.pooling

    @property
    def normalize(self) -> bool:
        return self._native.normalize

    def __repr__(self) -> str:
        return (
            f"Embedder(model_id={self.model_id!r}, revision={self.model_revision!r}, dim={self.dim}, "
            f"max_tokens={self.max_tokens}, pooling={self.pooling!r}, device={self.device!r}, "
            f"dtype={self.dtype!r})"
        )
