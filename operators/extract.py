"""``extract``: bytes of any supported format to a :class:`Document`."""

from __future__ import annotations

from typing import Optional

from . import _native
from .document import Document, Limits
from .isolation import ExtractorPool, default_pool

#: Formats parsed in the calling process: their parsers are linear-time scanners
#: over already-bounded input, with nothing to inflate and no recursion, so a child
#: process would buy no safety and cost a round trip. Everything else is isolated.
IN_PROCESS_TYPES = frozenset({"text/plain", "text/markdown", "text/html"})

SUPPORTED_TYPES: tuple[str, ...] = tuple(_native.SUPPORTED_TYPES)

_DEFAULT_LIMITS = Limits()


def extract(
    data: bytes,
    *,
    mime_type: Optional[str] = None,
    filename: Optional[str] = None,
    limits: Optional[Limits] = None,
    pool: Optional[ExtractorPool] = None,
) -> Document:
    """Extracts the text (or, for images, the pixels) of one document.

    ``mime_type`` wins over detection when given; otherwise the type is sniffed from
    magic bytes, with ``filename``'s extension as fallback. PDF, DOCX and images run
    in an isolated child process (``pool``, default: a shared pool of 2) so that a
    hostile file costs one document, never the caller.

    Raises :class:`~operators.ExtractionError` with a ``reason`` on failure.
    """
    limits = limits or _DEFAULT_LIMITS
    if len(data) > limits.max_input_bytes:
        # Refuse before copying the bytes anywhere.
        from .errors import ExtractionError

        raise ExtractionError(
            "too_large", f"input is {len(data)} bytes, over the limit of {limits.max_input_bytes}"
        )
    kind = _kind(data, mime_type, filename)
    if kind in IN_PROCESS_TYPES:
        return Document.from_native(_native.extract(data, mime_type, filename, limits.native()))
    return (pool or default_pool()).extract(data, mime_type=mime_type, filename=filename, limits=limits)


def _kind(data: bytes, mime_type: Optional[str], filename: Optional[str]) -> str:
    if mime_type:
        essence = mime_type.split(";")[0].strip().lower()
        if essence and essence != "application/octet-stream":
            return essence
    return _native.sniff(data, filename)
