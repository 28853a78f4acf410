"""Speech to text with Whisper on the Rust core: segments with their times, and a
text Document whose spans are the segments, ready to chunk and embed.

>>> transcriber = operators.Transcriber.load("whisper-tiny/")   # a Hugging Face-format dir
>>> transcript = transcriber.transcribe(operators.extract(open("call.mp3", "rb").read()))
>>> [(s.start_ms, s.end_ms, s.text) for s in transcript.segments]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from . import _native, models
from .audio import SAMPLE_RATE
from .document import Audio, Document

#: Whisper's tasks: speech to text in its own language, or to English.
TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class Segment:
    """A stretch of speech: its text and where it lies in the recording."""

    start_ms: int
    end_ms: int
    text: str


@dataclass(frozen=True)
class Transcript:
    """What a recording says, segment by segment."""

    segments: list[Segment]
    language: Optional[str]
    duration_ms: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n".join(s.text.strip() for s in self.segments)

    def document(self, mime_type: str = "text/plain") -> Document:
        """A text Document of the segments, one line each: ``pages`` holds each
        segment's span of the text and ``times`` its milliseconds, so chunks can
        carry the time they come from."""
        text, spans, times = "", [], []
        for s in self.segments:
            line = s.text.strip()
            if text:
                text += "\n"
            spans.append((len(text), len(text) + len(line)))
            times.append((s.start_ms, s.end_ms))
            text += line
        metadata = dict(self.metadata)
        if self.language:
            metadata["language"] = self.language
        return Document(text=text, mime_type=mime_type, pages=spans, metadata=metadata, times=times)


class Transcriber:
    """Whisper (any transformers checkpoint: ``config.json``, ``model.safetensors``,
    ``tokenizer.json``, ``generation_config.json``), decoded greedily with timestamps.
    It runs in the calling process, the GIL released."""

    def __init__(self, native: _native.Transcriber) -> None:
        self._native = native

    @classmethod
    def load(cls, model: Union[str, os.PathLike], *, device: str = "cpu", dtype: str = "f32") -> Transcriber:
        """``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``; ``dtype``:
        ``"f32"``; ``"q8"`` (int8 linear layers and output projection, on CPUs with
        AVX2); ``"bf16"`` (on a CPU, bf16 linear layers and output projection, on CPUs
        with AVX512_BF16; on a GPU, the whole model); ``"f16"`` on a GPU."""
        return cls(_native.Transcriber(models.resolve(model), device, dtype))

    @property
    def languages(self) -> list[str]:
        """The language codes the model knows (empty for English-only models)."""
        return list(self._native.languages)

    @property
    def n_mels(self) -> int:
        return int(self._native.n_mels)

    def transcribe(
        self,
        audio: Union[Document, Audio, np.ndarray],
        *,
        language: Optional[str] = None,
        task: str = "transcribe",
        max_new_tokens: Optional[int] = None,
    ) -> Transcript:
        """Transcribes a decoded recording (``operators.extract`` of an audio file, its
        ``Audio``, or 16 kHz mono float32 samples), 30 s at a time. ``language``: a
        code such as ``"en"``; None detects it from the first 30 s.
        ``max_new_tokens``: most tokens per 30 s window (default 224)."""
        metadata: dict[str, str] = {}
        if isinstance(audio, Document):
            if audio.audio is None:
                raise ValueError(f"a {audio.mime_type} document has no audio to transcribe")
            metadata = dict(audio.metadata)
            audio = audio.audio
        samples = _samples(audio)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {task!r}")
        found, segments = self._native.transcribe(samples, language, task, max_new_tokens)
        return Transcript(
            segments=[Segment(int(a), int(b), t) for a, b, t in segments],
            language=found,
            duration_ms=len(samples) * 1000 // SAMPLE_RATE,
            metadata=metadata,
        )


def _samples(audio: Union[Audio, np.ndarray]) -> np.ndarray:
    if isinstance(audio, Audio):
        if audio.sample_rate != SAMPLE_RATE:
            raise ValueError(f"Whisper takes {SAMPLE_RATE} Hz audio, not {audio.sample_rate} Hz")
        audio = audio.samples
    samples = np.ascontiguousarray(audio, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"expected mono samples (one dimension), got shape {samples.shape}")
    return samples
