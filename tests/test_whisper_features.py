"""Whisper's log-mel features against transformers' WhisperFeatureExtractor, on three
real clips (speech, a sweep, noise) at 80 and 128 bins. The references were computed
once by tests/fixtures/make_whisper_features.py (stored as float16)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from operators import Audio, extract
from operators.audio import N_FRAMES, log_mel

DATA = Path(__file__).resolve().parent / "data"
REFERENCE = DATA / "whisper-features"


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "features.npz") as npz:
        return {k: npz[k].astype(np.float32) for k in npz.files}


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("name", ["speech.wav", "sweep.wav", "noise.flac"])
def test_features_match_the_whisper_feature_extractor(reference, name, n_mels):
    audio = extract((DATA / "audio" / name).read_bytes()).audio
    digest = hashlib.sha256(audio.samples.astype("<f4").tobytes()).hexdigest()
    inputs = json.loads((REFERENCE / "inputs.json").read_text())["input_sha256"]
    assert digest == inputs[name], "the decoder's output changed: run tests/fixtures/make_whisper_features.py"
    ours = log_mel(audio, n_mels)
    want = reference[f"{name}.{n_mels}"]
    assert ours.shape == want.shape == (n_mels, N_FRAMES) and ours.dtype == np.float32
    for t in range(0, N_FRAMES, 50):  # every frame's column, speech and padding alike
        a, b = ours[:, t], want[:, t]
        cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert cosine >= 0.9999, (t, cosine)
    assert np.abs(ours - want).max() < 2e-3  # the reference is stored as float16 (measured: 4.9e-4)


def test_input_checks():
    with pytest.raises(ValueError, match="16000 Hz"):
        log_mel(Audio(np.zeros(8000, dtype=np.float32), 8_000))
    with pytest.raises(ValueError, match="mono"):
        log_mel(np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="n_mels"):
        log_mel(np.zeros(100, dtype=np.float32), n_mels=0)
    longer = log_mel(np.ones(40 * 16_000, dtype=np.float32) * 0.1)
    assert longer.shape == (80, N_FRAMES)  # the first 30 s
