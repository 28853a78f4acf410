"""Audio documents: every container and codec we claim decodes (in the isolated pool)
to 16 kHz mono with the right content, and truncated, corrupt, oversized and
unsupported input ends as a typed error. The clips in tests/data/audio were made once
by tests/fixtures/make_audio.sh (espeak-ng speech, a sine sweep, noise)."""

from __future__ import annotations

import math
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from operators import Audio, ExtractionError, Limits, _native, extract

CLIPS = Path(__file__).resolve().parent / "data" / "audio"
SPEECH = {
    "speech.wav": "audio/wav",
    "speech.flac": "audio/flac",
    "speech.mp3": "audio/mpeg",
    "speech.ogg": "audio/ogg",
    "speech.m4a": "audio/mp4",
}


def clip(name: str) -> bytes:
    return (CLIPS / name).read_bytes()


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ExtractionError) as e:
        extract(data, **kwargs)
    return e.value.reason


def wav_source() -> tuple[np.ndarray, int]:
    """speech.wav as Python's own wave module reads it: the source at 22,050 Hz."""
    with wave.open(str(CLIPS / "speech.wav")) as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return frames.astype(np.float32) / 32768, w.getframerate()


@pytest.mark.parametrize("name, mime", SPEECH.items())
def test_each_container_and_codec_is_sniffed_and_decoded_to_16_khz_mono(name, mime):
    data = clip(name)
    assert _native.sniff(data, None) == mime
    doc = extract(data)  # sniffed, decoded in the isolated pool
    assert doc.mime_type == mime and doc.text == "" and doc.image is None
    audio = doc.audio
    assert isinstance(audio, Audio) and audio.sample_rate == 16_000
    assert audio.samples.dtype == np.float32 and np.abs(audio.samples).max() <= 1.0
    source, rate = wav_source()
    # Lossy encoders pad a few milliseconds at the edges.
    assert abs(audio.duration_ms - len(source) * 1000 / rate) < 120, audio.duration_ms
    assert doc.metadata["duration_ms"] == str(audio.duration_ms)
    assert int(doc.metadata["channels"]) == (2 if name.endswith((".mp3", ".ogg")) else 1)


def test_lossless_codecs_decode_to_the_same_samples():
    wav, flac = extract(clip("speech.wav")).audio, extract(clip("speech.flac")).audio
    assert np.array_equal(wav.samples, flac.samples)


@pytest.mark.parametrize("name", ["speech.mp3", "speech.ogg", "speech.m4a"])
def test_lossy_codecs_carry_the_same_speech(name):
    reference = extract(clip("speech.wav")).audio.samples
    decoded = extract(clip(name)).audio.samples
    # Encoders delay the signal by a few hundred samples: align by cross-correlation.
    n = 1 << math.ceil(math.log2(len(reference) + len(decoded)))
    xcorr = np.fft.irfft(np.fft.rfft(decoded, n) * np.conj(np.fft.rfft(reference, n)), n)
    lag = int(np.argmax(xcorr))
    lag = lag - n if lag > n // 2 else lag
    a = decoded[max(lag, 0) :]
    b = reference[max(-lag, 0) :]
    m = min(len(a), len(b))
    assert abs(lag) < 1600, lag  # under 0.1 s
    assert np.corrcoef(a[:m], b[:m])[0, 1] > 0.95


def test_resampling_is_band_limited_like_a_good_resampler():
    """The 48 kHz sweep (100 Hz to 15 kHz in 1 s) at 16 kHz: below 6 kHz it is the
    same sweep sampled at 16 kHz; above 8 kHz it is gone, not folded back."""
    audio = extract(clip("sweep.wav")).audio
    assert audio.sample_rate == 16_000 and len(audio.samples) == 16_000
    t = np.arange(16_000) / 16_000
    ideal = 0.5 * np.sin(2 * np.pi * 100 / np.log(150) * (np.exp(np.log(150) * t) - 1))
    below_6k = (t > 0.05) & (t < np.log(60) / np.log(150))
    assert np.abs(audio.samples[below_6k] - ideal[below_6k]).max() < 0.02
    above_8k = (t > np.log(85) / np.log(150)) & (t < 0.98)
    assert np.sqrt(np.mean(audio.samples[above_8k] ** 2)) < 0.01


def test_upsampling_keeps_the_signal():
    audio = extract(clip("noise.flac")).audio  # 1 s of noise at 8 kHz
    assert len(audio.samples) == 16_000
    with_source = _native.extract(clip("noise.flac"), None, None, Limits().native())
    assert with_source["metadata"]["source_sample_rate"] == "8000"
    rms = float(np.sqrt(np.mean(audio.samples**2)))
    assert 0.1 < rms < 0.3  # uniform noise of amplitude 0.3 has an RMS of 0.17


def test_opus_has_no_pure_rust_decoder_and_is_refused_cleanly():
    data = clip("speech.opus")
    assert _native.sniff(data, None) == "audio/ogg"
    assert reason_of(data) == "unsupported_type"


def test_truncated_streams_keep_what_decoded_and_headers_alone_are_errors():
    full = extract(clip("speech.mp3")).audio.duration_ms
    half = extract(clip("speech.mp3")[: len(clip("speech.mp3")) // 2]).audio.duration_ms
    assert 0.3 * full < half < 0.7 * full
    half_wav = extract(clip("speech.wav")[:20_000]).audio
    assert 0 < half_wav.duration_ms < full
    for name in SPEECH:
        assert reason_of(clip(name)[:24], filename=name) in ("corrupt", "empty"), name


@pytest.mark.parametrize("magic", [b"OggS", b"fLaC", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"ID3\x04\x00"])
def test_garbage_behind_audio_magic_is_a_typed_error(magic):
    rng = np.random.default_rng(3)
    data = magic + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    assert reason_of(data) in ("corrupt", "unsupported_type", "empty")


def wav_header(rate: int, data_bytes: int) -> bytes:
    """A 16-bit mono WAV header declaring ``data_bytes`` of samples."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", min(36 + data_bytes, 0xFFFF_FFFF))
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + (b"data" + struct.pack("<I", data_bytes))
    )


def test_a_bomb_declaring_hours_of_audio_is_refused_from_its_header():
    bomb = wav_header(8_000, 200_000_000) + b"\x00\x01" * 1000  # declares 3.5 hours, holds 0.25 s
    with pytest.raises(ExtractionError) as e:
        extract(bomb)
    assert e.value.reason == "too_large" and "declares 12500 s" in e.value.message
    # Declaring more than the file's own RIFF length says is malformed.
    assert reason_of(wav_header(8_000, 0xFFFF_FFF0) + b"\x00\x01" * 1000) == "corrupt"


def test_duration_decoded_bytes_and_time_are_limited():
    speech = clip("speech.wav")  # about 3 s at 22,050 Hz
    assert reason_of(speech, limits=Limits(max_audio_seconds=1)) == "too_large"
    assert (
        reason_of(clip("speech.mp3"), limits=Limits(max_audio_seconds=1)) == "too_large"
    )  # no declared length
    assert reason_of(clip("speech.ogg"), limits=Limits(max_decompressed_bytes=100_000)) == "too_large"
    assert reason_of(speech, limits=Limits(timeout_ms=0)) == "timeout"
    assert extract(speech, limits=Limits(max_audio_seconds=10)).audio.duration_ms > 2_000


def test_declared_types_and_aliases_are_understood():
    for alias in ("audio/x-wav", "audio/wave", "audio/wav"):
        assert extract(clip("speech.wav"), mime_type=alias).mime_type == "audio/wav"
    assert extract(clip("speech.mp3"), mime_type="audio/mp3").mime_type == "audio/mpeg"
    assert {"audio/wav", "audio/flac", "audio/mpeg", "audio/ogg", "audio/mp4"} <= set(_native.SUPPORTED_TYPES)
