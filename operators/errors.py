"""Exceptions raised by embedstream. Native errors and panics are mapped to these in
one place (``native/src/python/errors.rs``); nothing else crosses from Rust."""

from __future__ import annotations

#: The closed set of extraction failure reasons; dead letters carry the same strings.
EXTRACTION_REASONS = frozenset({"unsupported_type", "corrupt", "encrypted", "too_large", "timeout", "empty"})


class EmbedstreamError(Exception):
    """Base class of every embedstream error."""


class ExtractionError(EmbedstreamError):
    """A document could not be turned into text.

    ``reason`` is one of :data:`EXTRACTION_REASONS`:

    - ``unsupported_type``: not a format embedstream reads;
    - ``corrupt``: the bytes do not parse (also a parser that crashed on them);
    - ``encrypted``: needs a password (PDFs with an empty user password are read);
    - ``too_large``: over a :class:`~operators.Limits` bound (size, pages,
      decompressed bytes, pixels, memory);
    - ``timeout``: over the per-document time budget;
    - ``empty``: no bytes, or no text in them.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in EXTRACTION_REASONS:
            raise ValueError(f"unknown extraction reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # keep reason and message across pickling
        return (type(self), (self.reason, self.message))


class ModelNotFoundError(EmbedstreamError, FileNotFoundError):
    """The model directory or one of its files is missing; the message says how to get it."""


class ModelError(EmbedstreamError, ValueError):
    """The model files exist but cannot be used (bad config, unsupported architecture)."""


class UnsupportedError(EmbedstreamError, ValueError):
    """A setting this build cannot honour: a device, a dtype, a chunk size."""


class EmbeddingError(EmbedstreamError):
    """Tokenization or inference failed."""
