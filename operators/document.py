"""Plain data types of extraction: what goes in (limits) and what comes out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Limits:
    """Bounds for one untrusted document; every one that trips raises
    ``ExtractionError`` with reason ``too_large`` (``timeout`` for the time budget)."""

    #: Largest input accepted.
    max_input_bytes: int = 64 * 1024 * 1024
    #: Most PDF pages.
    max_pages: int = 2_000
    #: Most bytes that compressed parts (DOCX zip members, PDF streams) may inflate to, summed.
    max_decompressed_bytes: int = 256 * 1024 * 1024
    #: Most pixels of an image.
    max_image_pixels: int = 40_000_000
    #: Time budget of one document, in milliseconds.
    timeout_ms: int = 30_000
    #: Address-space limit of an isolated extraction process, on top of what it uses at start.
    max_memory_bytes: int = 2 * 1024 * 1024 * 1024

    def native(self) -> tuple[int, int, int, int, int]:
        return (
            self.max_input_bytes,
            self.max_pages,
            self.max_decompressed_bytes,
            self.max_image_pixels,
            self.timeout_ms,
        )


@dataclass(frozen=True)
class Image:
    """Decoded pixels: 8-bit RGB, row-major, ``width * height * 3`` bytes."""

    width: int
    height: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Document:
    """Extracted text of one document.

    Offsets in ``pages`` are ``str`` indices (code points): ``text[a:b]`` is a page.
    PDFs have one span per page; other formats one span. Images have empty ``text``
    and their pixels in ``image``.
    """

    text: str
    mime_type: str
    pages: list[tuple[int, int]]
    title: Optional[str] = None
    metadata: dict[str, str] = field(default_factory=dict)
    image: Optional[Image] = None

    @property
    def paged(self) -> bool:
        """Whether page numbers mean something (PDF)."""
        return self.mime_type == "application/pdf"

    @classmethod
    def from_native(cls, raw: dict) -> Document:
        image = raw.get("image")
        return cls(
            text=raw["text"],
            mime_type=raw["mime_type"],
            pages=[tuple(p) for p in raw["pages"]],
            title=raw.get("title"),
            metadata=dict(raw.get("metadata") or {}),
            image=Image(image[0], image[1], bytes(image[2])) if image else None,
        )
