"""The flow end to end on a real Kafka broker: events in, records, markers and dead
letters out, run as `embedstream run` in its own process."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import docgen
import numpy as np
from kafka_helpers import FlowTopics, avro_event, free_port

import operators

SAMPLES = Path(__file__).resolve().parent.parent / "flows" / "samples"
TEXT_SAMPLES = ["faq.html", "guide.md", "notes.txt", "onboarding.docx", "report.pdf"]


def by_doc(records):
    """VectorRecords per doc_id, after checking that each version's records are followed
    by its DocManifest, which lists exactly them, in order."""
    grouped, pending = defaultdict(list), defaultdict(list)
    for kind, record, _ in records:
        if kind == "DocManifest":
            listed = pending.pop(record["doc_id"])
            assert [c["chunk_id"] for c in record["chunks"]] == [r["chunk_id"] for r in listed]
            assert [c["chunk_index"] for c in record["chunks"]] == list(range(len(listed)))
            assert [(c["char_start"], c["char_end"], c["page"]) for c in record["chunks"]] == [
                (r["char_start"], r["char_end"], r["page"]) for r in listed
            ]
            first = listed[0]
            for field in ("doc_version", "model_id", "model_revision", "dtype", "dimension", "metadata"):
                assert record[field] == first[field], field
            continue
        assert kind == "VectorRecord"
        grouped[record["doc_id"]].append(record)
        pending[record["doc_id"]].append(record)
    assert not pending, f"records without a manifest: {sorted(pending)}"
    return grouped


def test_every_text_format_end_to_end(kafka_bootstrap, minilm):
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    files = {name: (SAMPLES / name).read_bytes() for name in TEXT_SAMPLES}
    topics.produce(
        [
            (name.encode(), avro_event(name, content=data, filename=name, metadata={"team": "docs"}))
            for name, data in files.items()
        ]
    )
    topics.run("--max-tokens", "48")
    first = topics.read(topics.output)
    assert all(msg.value()[:2] == b"\xc3\x01" for _, _, msg in first)  # Avro single-object on the wire
    got = by_doc(first)
    assert sorted(got) == sorted(files)

    chunker = minilm.chunker(48)
    for name, data in files.items():
        records = sorted(got[name], key=lambda r: r["chunk_index"])
        doc = operators.extract(data, filename=name)
        expected = chunker.chunk(doc)
        assert [r["text"] for r in records] == [c.text for c in expected]
        assert [(r["char_start"], r["char_end"], r["page"]) for r in records] == [
            (c.char_start, c.char_end, c.page) for c in expected
        ]
        assert {r["chunk_count"] for r in records} == {len(expected)}
        assert {(r["prompt_name"], r["dimension"]) for r in records} == {(None, 384)}
        direct = minilm.embed([c.text for c in expected])
        streamed = np.array([r["embedding"] for r in records], dtype=np.float32)
        cos = (direct * streamed).sum(1) / np.linalg.norm(direct, axis=1) / np.linalg.norm(streamed, axis=1)
        assert cos.min() >= 0.9999
        lineage = f"{minilm.model_id}\x00{minilm.model_revision}\x00f32\x00\x00384"
        for r in records:
            # Content-derived: doc_id, the text's digest, its occurrence (texts here are unique).
            text_digest = hashlib.sha256(r["text"].encode()).hexdigest()
            key = f"{name}\x00{text_digest}\x000\x00{lineage}"
            assert r["chunk_id"] == hashlib.sha256(key.encode()).hexdigest()
            assert r["metadata"]["team"] == "docs"
            assert r["metadata"]["doc.mime_type"] == doc.mime_type
            assert (r["model_id"], r["dtype"], r["chunker"]) == (
                minilm.model_id,
                "f32",
                {"max_tokens": 48, "overlap_tokens": 0},
            )
    assert any(r["page"] == 2 for r in got["report.pdf"])

    # A second run (a replay) gives the same chunk ids, texts and offsets.
    from flows.kafka.topics import create
    from flows.settings import Settings

    create(Settings(brokers=kafka_bootstrap), f"{topics.prefix}.replay", 2)
    replay = ("--from", "beginning", "--group-id", f"{topics.group}.replay")  # a group with no progress
    topics.run("--max-tokens", "48", *replay, output=f"{topics.prefix}.replay")
    again = by_doc(topics.read(f"{topics.prefix}.replay"))
    for name in files:
        a = sorted((r["chunk_id"], r["text"], r["char_start"]) for r in got[name])
        b = sorted((r["chunk_id"], r["text"], r["char_start"]) for r in again[name])
        assert a == b


def tiny_wav() -> bytes:
    """0.1 s of a 440 Hz tone, 8 kHz 16-bit mono: small enough for any payload limit."""
    import io
    import math
    import struct
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(
            b"".join(
                struct.pack("<h", int(8000 * math.sin(i * 440 * 2 * math.pi / 8000))) for i in range(800)
            )
        )
    return buf.getvalue()


#: JSON metadata of every type, and what the schema's map<string,string> holds of it.
LOOSE = {"s": "text", "n": 1, "f": 2.5, "t": True, "null": None, "o": {"b": 1}, "a": [1, "x"], "u": "é"}
LOOSE_AS_STRINGS = {"s": "text", "n": "1", "f": "2.5", "t": "true", "o": '{"b":1}', "a": '[1,"x"]', "u": "é"}


def test_bad_input_ends_in_the_dead_letter_topic(kafka_bootstrap, tmp_path):
    topics = FlowTopics(kafka_bootstrap)
    allowed = tmp_path / "docs"
    allowed.mkdir()
    (allowed / "ok.md").write_text("# Fetched\n\nRead from an allowed root.")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("x.txt", "not a docx")
    events = {
        "good-1": avro_event("good-1", content=b"A perfectly fine document.", filename="a.txt"),
        "good-uri": avro_event("good-uri", uri=(allowed / "ok.md").as_uri()),
        "delete-me": avro_event("delete-me", op="DELETE"),
        "corrupt": avro_event("corrupt", content=b"%PDF-1.7\nthis is no pdf", filename="c.pdf"),
        "unsupported": avro_event("unsupported", content=zipped.getvalue(), filename="x.zip"),
        "oversize": avro_event("oversize", content=b"x " * 3000, filename="big.txt"),
        "garbage": b"\x07\x08 neither avro nor json",
        "bad-op": json.dumps({"doc_id": "bad-op", "op": "MERGE", "content": "x"}).encode(),
        "outside": avro_event("outside", uri="file:///etc/hostname"),
        "missing": avro_event("missing", uri=(allowed / "nope.txt").as_uri()),
        "http": avro_event("http", uri="http://example.com/doc.pdf"),
        "image": avro_event("image", content=docgen.make_png(4, 4), filename="i.png"),
        "audio": avro_event("audio", content=tiny_wav(), filename="a.wav"),
        "encrypted": avro_event("encrypted", content=docgen.make_pdf(["x"], user_password="pw")),
        "rot13": json.dumps({"doc_id": "rot13", "content": "grkg", "content_encoding": "rot13"}).encode(),
        "both": avro_event("both", content=b"inline", uri=(allowed / "ok.md").as_uri()),
        "both-json": json.dumps({"doc_id": "both-json", "content": "x", "uri": "file:///tmp/x"}).encode(),
        "loose-metadata": json.dumps(
            {"doc_id": "loose-metadata", "content": "Metadata of every JSON type.", "metadata": LOOSE}
        ).encode(),
    }
    topics.produce([(k.encode(), v) for k, v in events.items()])
    topics.run("--allow-root", str(allowed), env={"EMBEDSTREAM_MAX_DOCUMENT_BYTES": "4000"})

    out = topics.read(topics.output)
    dead = {r["key"].decode(): r for kind, r, _ in topics.read(topics.dlq) if kind == "DeadLetter"}
    embedded = {r["doc_id"] for kind, r, _ in out if kind == "VectorRecord"}
    deleted = {r["doc_id"] for kind, r, _ in out if kind == "DeleteMarker"}
    assert embedded == {"good-1", "good-uri", "loose-metadata"}
    assert deleted == {"delete-me"}
    [loose] = [r for kind, r, _ in out if kind == "VectorRecord" and r["doc_id"] == "loose-metadata"]
    assert {k: v for k, v in loose["metadata"].items() if not k.startswith("doc.")} == LOOSE_AS_STRINGS
    expected = {
        "corrupt": ("extract", "corrupt"),
        "unsupported": ("extract", "unsupported_type"),
        "oversize": ("fetch", "too_large"),
        "garbage": ("decode", "bad_payload"),
        "bad-op": ("decode", "bad_payload"),
        "outside": ("fetch", "uri_not_allowed"),
        "missing": ("fetch", "not_found"),
        "http": ("fetch", "uri_not_allowed"),
        "image": ("embed", "no_model_for_type"),
        "audio": ("embed", "no_model_for_type"),
        "encrypted": ("extract", "encrypted"),
        "rot13": ("decode", "bad_payload"),
        "both": ("decode", "bad_payload"),
        "both-json": ("decode", "bad_payload"),
    }
    assert {k: (d["stage"], d["reason"]) for k, d in dead.items()} == expected
    assert "'base64'" in dead["rot13"]["message"] and "ambiguous" in dead["both"]["message"]
    # Nothing vanishes: every event is accounted for exactly once.
    assert len(events) == len(embedded) + len(deleted) + len(dead)
    for key, letter in dead.items():
        assert letter["payload"] == events[key]  # small payloads travel with the dead letter
        assert letter["payload_size"] == len(events[key])
        assert letter["topic"] == topics.input and letter["offset"] >= 0


def test_upsert_then_delete_keeps_order(kafka_bootstrap):
    topics = FlowTopics(kafka_bootstrap)
    body = ("Paragraph about ordering guarantees in streams. " * 30).encode()
    topics.produce(
        [
            (b"doc", avro_event("doc", content=body, filename="v1.txt")),
            (b"doc", avro_event("doc", op="DELETE")),
            (b"doc", avro_event("doc", content=b"version three", filename="v3.txt")),
        ]
    )
    topics.run("--max-tokens", "32")
    out = topics.read(topics.output)
    kinds = [kind for kind, _, _ in out]
    n_first = kinds.index("DeleteMarker")
    assert n_first > 2 and kinds[:n_first] == ["VectorRecord"] * (n_first - 1) + ["DocManifest"]
    assert kinds[n_first + 1 :] == ["VectorRecord", "DocManifest"]
    versions = [r["doc_version"]["offset"] for _, r, _ in out]
    assert versions == sorted(versions) and versions[0] == 0 and versions[-1] == 2


def test_missing_output_topic_is_a_clear_error(kafka_bootstrap):
    import subprocess
    import sys

    topics = FlowTopics(kafka_bootstrap)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--until-end",
            "--brokers",
            kafka_bootstrap,
            "--input-topic",
            topics.input,
            "--output-topic",
            f"{topics.prefix}.absent",
            "--dlq-topic",
            topics.dlq,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"{topics.prefix}.absent" in result.stderr and "topics create" in result.stderr


def test_json_input_and_json_output(kafka_bootstrap):
    import base64

    topics = FlowTopics(kafka_bootstrap)
    html = b"<html><body><h1>JSON</h1><p>Sent as base64.</p></body></html>"
    topics.produce(
        [
            (b"j1", json.dumps({"doc_id": "j1", "content": "Plain text sent as a JSON string."}).encode()),
            (
                None,
                json.dumps(
                    {
                        "doc_id": "j2",
                        "content": base64.b64encode(html).decode(),
                        "content_encoding": "base64",
                        "filename": "p.html",
                    }
                ).encode(),
            ),
        ]
    )
    topics.run("--format", "json")
    out = topics.read(topics.output)
    assert all(msg.value()[:1] == b"{" for _, _, msg in out)
    texts = {r["doc_id"]: r["text"] for kind, r, _ in out if kind == "VectorRecord"}
    assert [kind for kind, _, _ in out].count("DocManifest") == 2  # JSON manifests read back as such
    assert texts == {"j1": "Plain text sent as a JSON string.", "j2": "JSON\n\nSent as base64."}
    keys = {r["doc_id"]: msg.key() for _, r, msg in out}
    assert keys == {"j1": b"j1", "j2": b"j2"}  # a missing key falls back to the doc_id


def test_records_over_the_topic_limit_become_dead_letters(kafka_bootstrap):
    from confluent_kafka.admin import (
        AdminClient,
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        ResourceType,
    )

    topics = FlowTopics(kafka_bootstrap)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for name, limit in ((topics.output, 3000), (topics.dlq, 80_000)):
        entry = ConfigEntry("max.message.bytes", str(limit), incremental_operation=AlterConfigOpType.SET)
        res = ConfigResource(ResourceType.TOPIC, name, incremental_configs=[entry])
        admin.incremental_alter_configs([res])[res].result(timeout=30)
    long_text = ("word " * 5000).encode()  # ~25 KB: its dead letter drops the payload past the cap
    topics.produce(
        [
            (b"fits", avro_event("fits", content=b"short", filename="a.txt")),
            # One chunk of 256 tokens with its vector and metadata is over 3000 bytes.
            (b"big", avro_event("big", content=long_text, filename="b.txt", metadata={"pad": "x" * 2000})),
        ]
    )
    topics.run()
    assert {r["doc_id"] for _, r, _ in topics.read(topics.output)} == {"fits"}
    [(_, letter, _)] = topics.read(topics.dlq)
    assert (letter["doc_id"], letter["stage"], letter["reason"]) == ("big", "produce", "too_large")
    assert letter["payload"] is None and letter["payload_size"] > 25_000  # over the cap: coordinates only


def test_images_with_an_image_model(kafka_bootstrap):
    from conftest import DATA

    clip = operators.ImageEmbedder.load(DATA / "tiny-clip")
    topics = FlowTopics(kafka_bootstrap)
    from flows.kafka.topics import create
    from flows.settings import Settings

    image_topic = f"{topics.prefix}.images"
    create(Settings(brokers=kafka_bootstrap), image_topic, 1)
    photo = (DATA / "tiny-clip" / "images" / "big.jpg").read_bytes()
    topics.produce(
        [
            (b"photo", avro_event("photo", content=photo, filename="big.jpg")),
            (b"note", avro_event("note", content=b"red circles on a wide canvas", filename="n.txt")),
            (b"broken", avro_event("broken", content=photo[:200], filename="broken.jpg")),
        ]
    )
    topics.run(
        "--image-model",
        str(DATA / "tiny-clip"),
        "--image-output-topic",
        image_topic,
        "--text-with-image-model",
    )

    [(kind_a, image_record, _), (kind_b, image_manifest, _)] = topics.read(image_topic)
    assert (kind_a, kind_b) == ("VectorRecord", "DocManifest")
    assert [c["chunk_id"] for c in image_manifest["chunks"]] == [image_record["chunk_id"]]
    assert image_manifest["modality"] == "image"
    assert (image_record["doc_id"], image_record["modality"], image_record["text"]) == ("photo", "image", "")
    assert (image_record["char_start"], image_record["char_end"], image_record["chunk_count"]) == (0, 0, 1)
    expected = clip.embed_images([photo], normalize=True)[0]
    assert np.dot(expected, image_record["embedding"]) >= 0.9999

    [(kind_a, text_record, _), (kind_b, _, _)] = topics.read(topics.output)
    assert (kind_a, kind_b) == ("VectorRecord", "DocManifest")
    assert (text_record["doc_id"], text_record["modality"], text_record["model_id"]) == (
        "note",
        "text",
        "tiny-clip",
    )
    query = clip.embed_texts(["red circles on a wide canvas"], normalize=True)[0]
    assert np.dot(query, text_record["embedding"]) >= 0.9999  # text and images share CLIP's space

    [(_, letter, _)] = topics.read(topics.dlq)
    assert (letter["doc_id"], letter["stage"], letter["reason"]) == ("broken", "extract", "corrupt")


RAW_CLIENT_LINE = re.compile(r"^%\d\|")  # librdkafka's own format: %LEVEL|ts|FAC|client| …


def test_client_logs_go_through_our_logging(kafka_bootstrap, tmp_path):
    # Nothing listens on this port: librdkafka logs its connection failures (level 3).
    dead = f"127.0.0.1:{free_port()}"
    cli = [sys.executable, "-m", "flows.cli"]
    out = subprocess.run(
        [*cli, "tail", "--brokers", dead, "--topic", "absent", "-n", "1", "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = out.stderr.splitlines()
    assert any("Connection refused" in line for line in lines), out.stderr
    assert not [line for line in lines if RAW_CLIENT_LINE.match(line)], out.stderr
    # Publishing used to print a raw BGQUEUE purge line at every exit.
    (tmp_path / "a.txt").write_text("one small document")
    topics = FlowTopics(kafka_bootstrap)
    publish = ["publish", str(tmp_path / "a.txt"), "--topic", topics.input, "--brokers", kafka_bootstrap]
    out = subprocess.run(
        [*cli, *publish, "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert not [line for line in out.stderr.splitlines() if RAW_CLIENT_LINE.match(line)], out.stderr


def test_prompt_name_and_truncate_dim_in_the_flow(kafka_bootstrap):
    """--prompt-name and --truncate-dim reach the model, and the records say so."""
    from conftest import DATA

    model = DATA / "tiny-prompted"
    topics = FlowTopics(kafka_bootstrap)
    text = "Streaming embeddings for data platforms.\n\nDocuments arrive as events on Kafka."
    topics.produce([(b"p", avro_event("p", content=text.encode(), filename="p.txt"))])
    topics.run("--model", str(model), "--prompt-name", "query", "--truncate-dim", "8")
    records = [r for kind, r, _ in topics.read(topics.output) if kind == "VectorRecord"]
    assert records and {(r["prompt_name"], r["dimension"]) for r in records} == {("query", 8)}
    embedder = operators.Embedder.load(model, truncate_dim=8)
    expected = embedder.embed([r["text"] for r in records], prompt_name="query")
    np.testing.assert_allclose(np.array([r["embedding"] for r in records]), expected, atol=1e-5)
    # Without --prompt-name the model's default prompt ("document") is used, and named.
    default = FlowTopics(kafka_bootstrap)
    default.produce([(b"p", avro_event("p", content=text.encode(), filename="p.txt"))])
    default.run("--model", str(model))
    assert {r["prompt_name"] for kind, r, _ in default.read(default.output)} == {"document"}
