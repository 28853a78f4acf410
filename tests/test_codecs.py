"""Wire formats: Avro single-object encoding, Confluent framing, JSON input."""

from __future__ import annotations

import base64
import json

import pytest
from fastavro.schema import fingerprint

from flows import codecs
from flows.codecs import DecodeError, decode_document_event
from flows.registry import SchemaRegistry

EVENT = {
    "doc_id": "doc-1",
    "op": "UPSERT",
    "content": b"hello",
    "uri": None,
    "mime_type": "text/plain",
    "filename": "a.txt",
    "metadata": {"team": "search"},
    "event_time": 1_700_000_000_000,
}

DELETE_MARKER = {
    "doc_id": "x",
    "doc_version": {"topic": "t", "partition": 0, "offset": 1},
    "metadata": {},
    "event_time": 1,
    "emitted_at": 2,
}


@pytest.mark.parametrize("name", codecs.RECORD_TYPES)
def test_fingerprints_are_crc64_avro_of_the_canonical_form(name):
    s = codecs.schema(name)
    # fastavro prints the fingerprint's little-endian bytes in hex.
    assert s.fingerprint == bytes.fromhex(fingerprint(s.canonical, "CRC-64-AVRO"))


def test_crc64_avro_known_value():
    # From the Avro specification's reference implementation: fingerprint64 of '"int"'.
    assert codecs.crc64_avro(b'"int"').to_bytes(8, "little") == bytes.fromhex(
        fingerprint('"int"', "CRC-64-AVRO")
    )
    assert codecs.crc64_avro(b'"int"') == 0x7275D51A3F395C8F


def test_single_object_round_trip():
    data = codecs.encode_single_object("DocumentEvent", EVENT)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == codecs.schema("DocumentEvent").fingerprint
    event = decode_document_event(data)
    assert event == EVENT


def test_json_input_text_and_base64():
    text = decode_document_event(
        json.dumps({"doc_id": "a", "content": "plain text"}).encode(), timestamp_ms=5
    )
    assert (text["content"], text["op"], text["event_time"], text["metadata"]) == (
        b"plain text",
        "UPSERT",
        5,
        {},
    )
    raw = base64.b64encode(b"\x89PNG bytes").decode()
    b64 = decode_document_event(
        json.dumps({"doc_id": "b", "content": raw, "content_encoding": "base64", "event_time": 7}).encode()
    )
    assert b64["content"] == b"\x89PNG bytes"
    assert b64["event_time"] == 7


def test_key_is_the_fallback_doc_id():
    event = decode_document_event(b'{"content": "x"}', key=b"from-key")
    assert event["doc_id"] == "from-key"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "bad_payload"),
        (b"\x07\x08garbage", "bad_payload"),
        (b"{not json", "bad_payload"),
        (b"[1, 2]", "bad_payload"),
        (b'{"doc_id": "a", "op": "MERGE", "content": "x"}', "bad_payload"),
        (b'{"doc_id": "a"}', "bad_payload"),
        (b'{"content": "x"}', "bad_payload"),
        (b'{"doc_id": "a", "content": "!!", "content_encoding": "base64"}', "bad_payload"),
        (b'{"doc_id": "a", "content": "grkg", "content_encoding": "rot13"}', "bad_payload"),
        (b'{"doc_id": "a", "content": "x", "uri": "file:///tmp/x"}', "bad_payload"),
        (b"\xc3\x01" + b"\xff" * 8 + b"datum", "unknown_schema"),
        (b"\xc3\x01" + codecs.schema("DocumentEvent").fingerprint + b"\x02", "bad_payload"),
        (b"\x00\x00\x00\x00\x01datum", "no_schema_registry"),
    ],
)
def test_undecodable_payloads(payload, reason):
    with pytest.raises(DecodeError) as info:
        decode_document_event(payload)
    assert info.value.reason == reason


def test_json_metadata_values_become_strings_by_one_rule():
    metadata = {"s": "v", "n": 1, "t": False, "z": None, "o": {"b": [1]}}
    event = decode_document_event(json.dumps({"doc_id": "a", "content": "x", "metadata": metadata}).encode())
    assert event["metadata"] == {"s": "v", "n": "1", "t": "false", "o": '{"b":[1]}'}


def test_text_content_encodings_are_accepted():
    for encoding in ("utf-8", None):
        body = {"doc_id": "a", "content": "héllo", "content_encoding": encoding}
        assert decode_document_event(json.dumps(body).encode())["content"] == "héllo".encode()


def test_delete_needs_no_content():
    event = decode_document_event(b'{"doc_id": "a", "op": "DELETE"}')
    assert event["op"] == "DELETE" and event["content"] is None


@pytest.fixture
def registry(schema_registry):
    return SchemaRegistry.from_url(schema_registry.url)


def test_confluent_framing_round_trip(registry, schema_registry):
    from confluent_kafka.schema_registry import SchemaRegistryClient

    data = registry.encode("DocumentEvent", EVENT)
    registered = SchemaRegistryClient({"url": schema_registry.url}).get_latest_version(
        "dev.embedstream.DocumentEvent"
    )
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == registered.schema_id
    assert decode_document_event(data, registry=registry) == EVENT
    name, record = registry.decode_any(registry.encode("DeleteMarker", DELETE_MARKER))
    assert name == "DeleteMarker" and record == DELETE_MARKER


def older_document_event() -> dict:
    """DocumentEvent as a producer on an older version writes it: no ``filename``."""
    old = dict(codecs.schema("DocumentEvent").raw)
    old["fields"] = [f for f in old["fields"] if f["name"] != "filename"]
    return old


def register(schema_registry, subject: str, raw: dict) -> int:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    return SchemaRegistryClient({"url": schema_registry.url}).register_schema(
        subject, Schema(json.dumps(raw), "AVRO")
    )


def frame_older_event(schema_id: int, doc_id: str = "doc-1") -> bytes:
    record = {k: v for k, v in EVENT.items() if k != "filename"}
    return codecs.confluent_frame(
        schema_id, codecs.Schema("old", older_document_event()).write({**record, "doc_id": doc_id})
    )


def test_confluent_reader_resolves_an_older_writer_schema(registry, schema_registry):
    schema_id = register(schema_registry, "older-producer-value", older_document_event())
    event = decode_document_event(frame_older_event(schema_id), registry=registry)
    assert event["filename"] is None and event["doc_id"] == "doc-1"


def test_a_schema_id_the_registry_does_not_have_is_a_bad_payload(registry):
    with pytest.raises(DecodeError) as info:
        decode_document_event(codecs.confluent_frame(987_654, b"\x02"), registry=registry)
    assert info.value.reason == "unknown_schema"


def test_a_datum_that_does_not_fit_its_schema_is_a_bad_payload(registry):
    framed = registry.encode("DocumentEvent", EVENT)
    with pytest.raises(DecodeError) as info:
        decode_document_event(framed[:8], registry=registry)
    assert info.value.reason == "bad_payload"


def test_output_encoder_formats():
    record = DELETE_MARKER
    avro = codecs.OutputEncoder("avro").encode("DeleteMarker", record)
    assert codecs.decode_output(avro, typed("DeleteMarker")) == ("DeleteMarker", record)
    as_json = codecs.OutputEncoder("json").encode("DeleteMarker", record)
    assert json.loads(as_json) == record
    with pytest.raises(ValueError):
        codecs.OutputEncoder("confluent")


def typed(name: str) -> list[tuple[str, bytes]]:
    return [(codecs.TYPE_HEADER, name.encode())]


@pytest.mark.parametrize("fmt", ["avro", "json"])
def test_output_records_are_typed_by_their_header(fmt):
    data = codecs.OutputEncoder(fmt).encode("DeleteMarker", DELETE_MARKER)
    assert codecs.decode_output(data, typed("DeleteMarker")) == ("DeleteMarker", DELETE_MARKER)


@pytest.mark.parametrize(
    ("payload", "headers"),
    [
        # Keys that name no record type: once taken for a DeleteMarker, which deletes.
        (b'{"doc_id": "x"}', None),
        (b'{"doc_id": "x", "op": "DELETE"}', []),
        (b'{"doc_id": "x"}', typed("Nonsense")),
        # The header names a type whose fields the record lacks.
        (b'{"doc_id": "x"}', typed("DeleteMarker")),
        (codecs.encode_json(DELETE_MARKER), typed("DeadLetter")),
        # Avro names its own type: a header that disagrees is an error, not a guess.
        (codecs.encode_single_object("DeleteMarker", DELETE_MARKER), typed("VectorRecord")),
        (codecs.encode_single_object("DeleteMarker", DELETE_MARKER), None),
    ],
)
def test_an_output_record_without_a_type_is_an_error_never_a_delete(payload, headers):
    with pytest.raises(DecodeError) as info:
        codecs.decode_output(payload, headers)
    assert info.value.reason == "bad_payload"


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_vector_records_of_earlier_schema_versions_still_decode(version):
    """A record written with an earlier VectorRecord (kept in schemas/history) is read
    by its fingerprint and resolved to the current schema: new fields get defaults."""
    import json as _json

    old = codecs.Schema(
        "VectorRecord",
        _json.loads((codecs.SCHEMA_DIR / "history" / f"VectorRecord-{version}.avsc").read_text()),
    )
    assert old.fingerprint != codecs.schema("VectorRecord").fingerprint
    fields = {f["name"] for f in old.raw["fields"]}
    record = {
        "chunk_id": "c",
        "doc_id": "d",
        "doc_version": {"topic": "t", "partition": 0, "offset": 7},
        "chunk_index": 0,
        "chunk_count": 1,
        "text": "hello",
        "char_start": 0,
        "char_end": 5,
        "page": None,
        "embedding": [0.5, -0.5],
        "model_id": "m",
        "model_revision": "r",
        "dtype": "f32",
        "chunker": {"max_tokens": 256, "overlap_tokens": 0},
        "metadata": {},
        "event_time": 1,
        "embedded_at": 2,
        "modality": "text",
    }
    data = (
        codecs.SINGLE_OBJECT_MAGIC
        + old.fingerprint
        + old.write({k: v for k, v in record.items() if k in fields})
    )
    name, decoded = codecs.decode_single_object(data)
    assert name == "VectorRecord"
    assert (decoded["modality"], decoded["prompt_name"], decoded["dimension"]) == ("text", None, 0)
    assert decoded["embedding"] == [0.5, -0.5] and decoded["event_time"] == 1
