"""CLIP image and text embeddings in one space, on candle."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np

from . import _native
from .document import Image
from .embed import Chunker, ChunkStrategy, NativeModel

ImageInput = Union[Image, bytes]


class ImageEmbedder(NativeModel):
    """A CLIP model: ``embed_images`` and ``embed_texts`` return float32 ``[n, dim]``
    arrays in the same space, so text queries find images.

    Features are the projected outputs (``get_image_features`` / ``get_text_features``
    of transformers); ``normalize=True`` scales rows to unit length for cosine search.
    """

    def __init__(self, native: _native.ImageEmbedder) -> None:
        self._native = native

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, device: str = "cpu", dtype: str = "f32") -> ImageEmbedder:
        """Loads a Hugging Face-format CLIP directory (config.json, model.safetensors,
        tokenizer.json, preprocessor_config.json)."""
        return cls(_native.ImageEmbedder(os.fspath(path), device, dtype))

    def _decoded(self, images: Sequence[ImageInput]) -> list[tuple[int, int, bytes]]:
        from .extract import extract

        out = []
        for image in images:
            if isinstance(image, (bytes, bytearray, memoryview)):
                decoded = extract(bytes(image)).image  # isolated, under the pixel limits
                if decoded is None:
                    from .errors import ExtractionError

                    raise ExtractionError("unsupported_type", "bytes are not an image")
                image = decoded
            out.append((image.width, image.height, image.data))
        return out

    def embed_images(self, images: Sequence[ImageInput], *, normalize: bool = False) -> np.ndarray:
        """Images as :class:`~operators.Image` (decoded RGB) or encoded bytes."""
        return self._native.embed_images(self._decoded(images), normalize)

    def embed_texts(self, texts: Sequence[str], *, normalize: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("embed_texts() takes a sequence of strings, not a single string")
        return self._native.embed_texts(list(texts), normalize)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self._native.token_ids(list(texts))

    def pixel_values(self, image: ImageInput) -> np.ndarray:
        """The preprocessed input of the vision tower: float32 ``[3, height, width]``."""
        (width, height, data) = self._decoded([image])[0]
        values = np.asarray(self._native.pixel_values((width, height, data)), dtype=np.float32)
        return values.reshape(3, -1, int(np.sqrt(values.size // 3)))

    def chunker(
        self, max_tokens: Optional[int] = None, overlap_tokens: int = 0, strategy: ChunkStrategy = "greedy"
    ) -> Chunker:
        """A chunker counting CLIP tokens (for text documents embedded by the text tower)."""
        return Chunker(self._native.chunker(max_tokens or self.max_tokens, overlap_tokens, strategy))

    def text_embedder(self) -> ClipTextEmbedder:
        """This model's text tower with the ``Embedder`` interface the flow uses."""
        return ClipTextEmbedder(self)

    def __repr__(self) -> str:
        return f"ImageEmbedder(model_id={self.model_id!r}, revision={self.model_revision!r}, dim={self.dim})"


class ClipTextEmbedder:
    """CLIP's text tower behind the same interface as :class:`~operators.Embedder`;
    vectors are normalised, like those of the default text model."""

    dtype = "f32"
    device = "cpu"

    def __init__(self, clip: ImageEmbedder) -> None:
        self.clip = clip
        self.model_id = clip.model_id
        self.model_revision = clip.model_revision
        self.dim = clip.dim
        self.max_tokens = clip.max_tokens

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.clip.embed_texts(texts, normalize=True)

    def chunker(
        self, max_tokens: Optional[int] = None, overlap_tokens: int = 0, strategy: ChunkStrategy = "greedy"
    ) -> Chunker:
        return self.clip.chunker(max_tokens, overlap_tokens, strategy)
