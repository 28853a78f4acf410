"""Audio as speech models take it: Whisper's log-mel features of decoded audio."""

from __future__ import annotations

from typing import Union

import numpy as np

from . import _native
from .document import Audio

#: Whisper's input rate, which every decoded ``Audio`` already has.
SAMPLE_RATE = 16_000
#: Frames of one 30 s window.
N_FRAMES = 3_000


def log_mel(audio: Union[Audio, np.ndarray], n_mels: int = 80) -> np.ndarray:
    """``[n_mels, 3000]`` float32 log-mel features of the first 30 s (zero-padded
    when shorter), as transformers' ``WhisperFeatureExtractor`` computes them: 80
    bins for Whisper up to large-v2, 128 for large-v3."""
    if isinstance(audio, Audio):
        if audio.sample_rate != SAMPLE_RATE:
            raise ValueError(f"log-mel features need {SAMPLE_RATE} Hz audio, not {audio.sample_rate} Hz")
        samples = audio.samples
    else:
        samples = audio
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"expected mono samples (one dimension), got shape {samples.shape}")
    return _native.log_mel(samples, n_mels)
