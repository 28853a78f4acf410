"""Audio in the streaming flow, on the real broker: with `--audio-model` a recording is
transcribed (the tiny random Whisper of tests/data/tiny-whisper), its transcript
chunked at segment boundaries and embedded with the default model, and every chunk
carries the milliseconds of speech it covers; without one, audio is a dead letter."""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka_helpers import FlowTopics, avro_event

import operators

DATA = Path(__file__).parent / "data"
WHISPER = DATA / "tiny-whisper"


def test_audio_is_transcribed_and_its_chunks_carry_their_times(kafka_bootstrap):
    topics = FlowTopics(kafka_bootstrap)
    speech = (DATA / "audio" / "speech.mp3").read_bytes()
    topics.produce(
        [
            (b"call", avro_event("call", content=speech, filename="call.mp3")),
            (b"note", avro_event("note", content=b"A plain text document.", filename="n.txt")),
            (b"silence", avro_event("silence", content=b"", filename="s.wav")),
        ]
    )
    topics.run("--audio-model", str(WHISPER), "--audio-language", "en")

    out = topics.read(topics.output)
    records = [r for kind, r, _ in out if kind == "VectorRecord"]
    manifests = {r["doc_id"]: r for kind, r, _ in out if kind == "DocManifest"}
    call = sorted((r for r in records if r["doc_id"] == "call"), key=lambda r: r["chunk_index"])
    [note] = [r for r in records if r["doc_id"] == "note"]

    # What the library gives for the same recording, with the flow's own chunker.
    transcriber = operators.Transcriber.load(WHISPER)
    transcript = transcriber.transcribe(operators.extract(speech, filename="call.mp3"), language="en")
    chunker = operators.Embedder.load().chunker()
    chunks = chunker.chunk(transcript.document())
    assert chunks
    assert [(r["text"], r["time_start_ms"], r["time_end_ms"]) for r in call] == [
        (c.text, c.time_start_ms, c.time_end_ms) for c in chunks
    ]
    # Chunks cut at segment boundaries: each starts where a segment starts and ends
    # where one ends.
    starts = {s.start_ms for s in transcript.segments}
    ends = {s.end_ms for s in transcript.segments}
    assert all(r["time_start_ms"] in starts and r["time_end_ms"] in ends for r in call)
    assert all(r["modality"] == "text" and r["dimension"] == 384 for r in call)
    entries = manifests["call"]["chunks"]
    assert [(e["time_start_ms"], e["time_end_ms"]) for e in entries] == [
        (r["time_start_ms"], r["time_end_ms"]) for r in call
    ]
    assert call[0]["metadata"]["doc.language"] == "en" and "doc.duration_ms" in call[0]["metadata"]
    # Other documents carry no times.
    assert note["time_start_ms"] is None and note["time_end_ms"] is None
    assert manifests["note"]["chunks"][0]["time_start_ms"] is None
    letters = [r for kind, r, _ in topics.read(topics.dlq) if kind == "DeadLetter"]
    dead = {r["key"]: (r["stage"], r["reason"]) for r in letters}
    assert dead == {b"silence": ("extract", "empty")}


def test_segments_share_a_chunk_while_they_fit_and_a_long_one_is_cut_inside():
    chunker = operators.Embedder.load().chunker(max_tokens=16)
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    transcript = operators.Transcript(
        segments=[
            operators.Segment(0, 1000, "Hello there."),
            operators.Segment(1000, 2000, "How are you?"),
            operators.Segment(2000, 9000, f"{words} {words}"),
            operators.Segment(9000, 9500, "Fine."),
        ],
        language="en",
        duration_ms=9500,
    )
    doc = transcript.document()
    chunks = chunker.chunk(doc)
    assert chunks[0].text == "Hello there.\nHow are you?"
    assert (chunks[0].time_start_ms, chunks[0].time_end_ms) == (0, 2000)
    long = [c for c in chunks if c.time_start_ms == 2000]
    assert len(long) >= 2 and all(c.time_end_ms == 9000 for c in long)
    assert (chunks[-1].text, chunks[-1].time_start_ms) == ("Fine.", 9000)
    assert all(c.n_tokens <= 16 for c in chunks)
    assert all(doc.text[c.char_start : c.char_end] == c.text for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_an_audio_language_the_model_does_not_know_is_refused_at_start():
    from flows.embed_steps import Pipeline
    from flows.settings import Settings

    settings = Settings.from_env({}, audio_model=str(WHISPER), audio_language="xx")
    with pytest.raises(ValueError, match="not one of the audio model's languages: en, zh, de"):
        Pipeline(settings, operators.Embedder.load(), transcriber=operators.Transcriber.load(WHISPER))
