"""Plain data types of extraction: what goes in (limits) and what comes out."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np


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
    #: Longest audio, declared by its container or decoded, in seconds. Decoded audio
    #: also counts against ``max_decompressed_bytes`` (4 bytes per sample at its own rate).
    max_audio_seconds: int = 3_600

    def native(self) -> dict[str, int]:
        """The limits the extractors apply, by name (``native/src/limits.rs``); the
        memory limit is the isolation pool's."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "max_memory_bytes"}


@dataclass(frozen=True)
class Image:
    """Decoded pixels: 8-bit RGB, row-major, ``width * height * 3`` bytes."""

    width: int
    height: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Audio:
    """Decoded audio: mono float32 samples in [-1, 1] at ``sample_rate`` (16 kHz,
    what speech models take, whatever the file's own rate)."""

    samples: np.ndarray = field(repr=False)
    sample_rate: int

    @property
    def duration_ms(self) -> int:
        return len(self.samples) * 1000 // self.sample_rate

    @classmethod
    def from_bytes(cls, sample_rate: int, data: bytes) -> Audio:
        return cls(np.frombuffer(data, dtype="<f4"), sample_rate)


@dataclass(frozen=True)
class Document:
    """Extracted text of one document.

    Offsets in ``pages`` are ``str`` indices (code points): ``text[a:b]`` is a page.
    PDFs have one span per page; other formats one span. Images have empty ``text``
    and their pixels in ``image``; audio has empty ``text`` and its samples in ``audio``.
    """

    text: str
    mime_type: str
    pages: list[tuple[int, int]]
    title: Optional[str] = None
    metadata: dict[str, str] = field(default_factory=dict)
    image: Optional[Image] = None
    audio: Optional[Audio] = None
    #: Transcripts: the start and end milliseconds of each span in ``pages``.
    times: Optional[list[tuple[int, int]]] = None

    @property
    def paged(self) -> bool:
        """Whether page numbers mean something (PDF)."""
        return self.mime_type == "application/pdf"

    @classmethod
    def from_native(cls, raw: dict) -> Document:
        image, audio = raw.get("image"), raw.get("audio")
        return cls(
            text=raw["text"],
            mime_type=raw["mime_type"],
            pages=[tuple(p) for p in raw["pages"]],
            title=raw.get("title"),
            metadata=dict(raw.get("metadata") or {}),
            image=Image(image[0], image[1], bytes(image[2])) if image else None,
            audio=Audio.from_bytes(audio[0], audio[1]) if audio else None,
        )
