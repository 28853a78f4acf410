"""embedstream operators: extraction, chunking and embedding on a Rust core.

>>> import operators
>>> doc = operators.extract(b"# Hello\\n\\nWorld", filename="a.md")
>>> embedder = operators.Embedder.load()          # after `embedstream models pull`
>>> vectors = embedder.embed([c.text for c in embedder.chunker().chunk(doc)])
"""

# First: a CUDA build of the native core may need its libraries loaded before import.
from . import _cuda_libs  # noqa: F401
from .document import Audio, Document, Image, Limits
from .embed import Chunk, Chunker, ChunkStrategy, Embedder
from .errors import (
    EXTRACTION_REASONS,
    EmbeddingError,
    EmbedstreamError,
    ExtractionError,
    ModelError,
    ModelNotFoundError,
    UnsupportedError,
)
from .extract import SUPPORTED_TYPES, extract
from .image_embed import ImageEmbedder
from .isolation import ExtractorPool
from .rerank import Reranker
from .sparse import SparseEmbedder, SparseVector
from .transcribe import Segment, Transcriber, Transcript

__all__ = [
    "EXTRACTION_REASONS",
    "SUPPORTED_TYPES",
    "Audio",
    "Chunk",
    "ChunkStrategy",
    "Chunker",
    "Document",
    "Embedder",
    "EmbeddingError",
    "EmbedstreamError",
    "ExtractionError",
    "ExtractorPool",
    "Image",
    "ImageEmbedder",
    "Limits",
    "ModelError",
    "ModelNotFoundError",
    "Reranker",
    "Segment",
    "SparseEmbedder",
    "SparseVector",
    "Transcriber",
    "Transcript",
    "UnsupportedError",
    "extract",
]
