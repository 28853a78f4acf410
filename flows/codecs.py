"""Wire formats of the records in ``schemas/``.

- Avro single-object encoding (default): ``C3 01``, the 8-byte little-endian
  CRC-64-AVRO fingerprint of the writer schema, then the Avro binary datum.
- Confluent framing: byte ``0``, a 4-byte big-endian schema id, then the datum; the
  id is resolved through a schema registry (confluent-kafka's client).
- JSON, for input from tools that cannot write Avro, and as an output option.

The decoder tells them apart by their first bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import time
from collections.abc import Iterable
from functools import cache
from importlib.resources import files
from typing import Any, Optional

import fastavro
from fastavro.schema import parse_schema, to_parsing_canonical_form

#: ``schemas/`` of the repository (the source of truth), which the wheel carries inside
#: the package, never as a top-level folder of site-packages.
SCHEMA_DIR = files("flows") / "schemas"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0
RECORD_TYPES = ("DocumentEvent", "VectorRecord", "DocManifest", "DeleteMarker", "DeadLetter")
#: Kafka header naming the schema of an output message.
TYPE_HEADER = "embedstream.type"


class DecodeError(ValueError):
    """A payload that is not a valid DocumentEvent; ``reason`` goes into the dead letter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_EMPTY = 0xC15D213AA4D7A795


@cache
def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY & -(fp & 1))
        table.append(fp)
    return table


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint of the Avro specification ("CRC-64-AVRO")."""
    table, fp = _crc64_table(), _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


class Schema:
    """One parsed schema with its fingerprint."""

    def __init__(self, name: str, raw: dict[str, Any]) -> None:
        self.name = name
        self.raw = raw
        self.parsed = parse_schema(raw)
        self.canonical = to_parsing_canonical_form(self.parsed)
        self.fingerprint = crc64_avro(self.canonical.encode()).to_bytes(8, "little")
        # The canonical form has the same binary layout without logical types, so
        # timestamps stay epoch milliseconds instead of becoming datetimes.
        self.plain = parse_schema(json.loads(self.canonical))
        # As reader: the same, with the defaults that fill fields older writers lack.
        self.reader = parse_schema(without_logical_types(raw))

    def write(self, record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.plain, record)
        return buf.getvalue()

    def read(self, data: bytes, writer: Optional[Schema] = None) -> dict[str, Any]:
        """Decodes a datum written with ``writer`` (default: this schema) into this one."""
        if writer is None or writer is self:
            # No schema resolution to do, and skipping it halves a VectorRecord's decode.
            return fastavro.schemaless_reader(io.BytesIO(data), self.reader, None)
        return fastavro.schemaless_reader(io.BytesIO(data), writer.plain, self.reader)


def without_logical_types(node: Any) -> Any:
    """A raw schema without its logical types: timestamps read as epoch milliseconds."""
    if isinstance(node, dict):
        return {k: without_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [without_logical_types(v) for v in node]
    return node


@cache
def schema(name: str) -> Schema:
    return Schema(name, json.loads((SCHEMA_DIR / f"{name}.avsc").read_text()))


@cache
def _by_fingerprint() -> dict[bytes, tuple[Schema, Schema]]:
    """Fingerprint → (current schema, writer schema): every current schema, and the
    earlier versions kept in ``schemas/history`` (``NAME-VERSION.avsc``)."""
    found = {schema(n).fingerprint: (schema(n), schema(n)) for n in RECORD_TYPES}
    for path in sorted((SCHEMA_DIR / "history").iterdir()):
        name = path.name.split("-", 1)[0]
        if name in RECORD_TYPES and path.name.endswith(".avsc"):
            old = Schema(name, json.loads(path.read_text()))
            found.setdefault(old.fingerprint, (schema(name), old))
    return found


def encode_single_object(name: str, record: dict[str, Any]) -> bytes:
    s = schema(name)
    return SINGLE_OBJECT_MAGIC + s.fingerprint + s.write(record)


def decode_single_object(data: bytes) -> tuple[str, dict[str, Any]]:
    found = _by_fingerprint().get(data[2:10])
    if found is None:
        raise DecodeError("unknown_schema", f"no schema with fingerprint {data[2:10].hex()}")
    current, writer = found
    return current.name, current.read(data[10:], writer)


def encode_json(record: dict[str, Any]) -> bytes:
    def default(value: Any) -> Any:
        if isinstance(value, bytes):
            return base64.b64encode(value).decode()
        raise TypeError(type(value).__name__)

    return json.dumps(record, default=default, ensure_ascii=False, separators=(",", ":")).encode()


def now_ms() -> int:
    return int(time.time() * 1000)


#: ``content_encoding`` values of JSON input: text as it is (absent, null or "utf-8"),
#: or base64 for binary documents.
CONTENT_ENCODINGS = (None, "utf-8", "base64")


def _metadata_value(value: Any) -> str:
    """Metadata is ``map<string,string>``: a string stays itself, anything else becomes
    its compact JSON text (``1`` → ``"1"``, ``true`` → ``"true"``, ``{"b": 1}`` →
    ``'{"b":1}'``). Null values are dropped before this."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _document_from_json(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DecodeError("bad_payload", f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise DecodeError("bad_payload", "JSON payload is not an object")
    encoding = obj.get("content_encoding")
    if encoding not in CONTENT_ENCODINGS:
        accepted = ", ".join(repr(e) for e in CONTENT_ENCODINGS if e)
        raise DecodeError(
            "bad_payload", f"content_encoding {encoding!r} is not one of {accepted} (or absent: text)"
        )
    content = obj.get("content")
    if isinstance(content, str):
        if encoding == "base64":
            try:
                content = base64.b64decode(content, validate=True)
            except binascii.Error as e:
                raise DecodeError("bad_payload", f"content is not valid base64: {e}") from None
        else:
            content = content.encode()
    elif content is not None:
        raise DecodeError("bad_payload", "content must be a string")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise DecodeError("bad_payload", "metadata must be an object")
    return {
        "doc_id": obj.get("doc_id"),
        "op": obj.get("op", "UPSERT"),
        "content": content,
        "uri": obj.get("uri"),
        "mime_type": obj.get("mime_type"),
        "filename": obj.get("filename"),
        "metadata": {k: _metadata_value(v) for k, v in metadata.items() if v is not None},
        "event_time": obj.get("event_time"),
    }


def decode_document_event(
    data: Optional[bytes],
    key: Optional[bytes] = None,
    *,
    timestamp_ms: Optional[int] = None,
    registry: Any = None,
) -> dict[str, Any]:
    """Decodes an input message into a validated DocumentEvent dictionary.

    A missing ``doc_id`` falls back to the Kafka key; a missing ``event_time`` (JSON
    only) to the message timestamp. Raises :class:`DecodeError`.
    """
    if not data:
        raise DecodeError("bad_payload", "empty message")
    if data[:2] == SINGLE_OBJECT_MAGIC:
        try:
            name, event = decode_single_object(data)
        except DecodeError:
            raise
        except Exception as e:  # truncated or mangled datum
            raise DecodeError("bad_payload", f"invalid Avro: {e}") from None
        if name != "DocumentEvent":
            raise DecodeError("bad_payload", f"expected a DocumentEvent, got a {name}")
    elif data[0] == CONFLUENT_MAGIC and len(data) >= 5:
        if registry is None:
            raise DecodeError(
                "no_schema_registry", "Confluent-framed message, but no schema registry is configured"
            )
        # Raises DecodeError for a bad payload; waits out a registry that cannot answer.
        event = registry.decode(data)
    elif data.lstrip()[:1] == b"{":
        event = _document_from_json(data)
    else:
        raise DecodeError("bad_payload", "not Avro single-object, Confluent-framed Avro or JSON")
    return _validate(event, key, timestamp_ms)


def _validate(event: dict[str, Any], key: Optional[bytes], timestamp_ms: Optional[int]) -> dict[str, Any]:
    if not event.get("doc_id"):
        if key:
            event["doc_id"] = key.decode("utf-8", "replace")
        else:
            raise DecodeError("bad_payload", "no doc_id in the payload and no message key")
    if not isinstance(event["doc_id"], str):
        raise DecodeError("bad_payload", "doc_id must be a string")
    if event.get("op") not in ("UPSERT", "DELETE"):
        raise DecodeError("bad_payload", f"op must be UPSERT or DELETE, not {event.get('op')!r}")
    if event["op"] == "UPSERT" and event.get("content") is None and not event.get("uri"):
        raise DecodeError("bad_payload", "an UPSERT needs content or uri")
    if event.get("content") is not None and event.get("uri"):
        raise DecodeError("bad_payload", "ambiguous event: it carries both content and uri (send one)")
    event_time = event.get("event_time")
    if event_time is None:
        event["event_time"] = timestamp_ms if timestamp_ms is not None else now_ms()
    elif hasattr(event_time, "timestamp"):  # fastavro decodes timestamp-millis to datetime
        event["event_time"] = int(event_time.timestamp() * 1000)
    elif not isinstance(event_time, int):
        raise DecodeError("bad_payload", "event_time must be epoch milliseconds")
    event.setdefault("metadata", {})
    return event


class OutputEncoder:
    """Encodes output records in the configured format; ``avro`` by default."""

    def __init__(self, fmt: str = "avro", registry: Any = None) -> None:
        if fmt not in ("avro", "json", "confluent"):
            raise ValueError(f"unknown output format {fmt!r} (avro, json, confluent)")
        if fmt == "confluent" and registry is None:
            raise ValueError("output format 'confluent' needs a schema registry URL")
        self.format = fmt
        self.registry = registry

    def encode(self, name: str, record: dict[str, Any]) -> bytes:
        if self.format == "json":
            return encode_json(record)
        if self.format == "confluent":
            return self.registry.encode(name, record)
        return encode_single_object(name, record)


#: A Kafka message's headers, as confluent-kafka gives them (None when it has none).
Headers = Optional[Iterable[tuple[str, Optional[bytes]]]]


def type_of(headers: Headers) -> str:
    """The record type that the ``embedstream.type`` header names; every output record carries one."""
    value = dict(headers or ()).get(TYPE_HEADER)
    if value is None:
        raise DecodeError("bad_payload", f"no {TYPE_HEADER} header: not an embedstream output record")
    name = value.decode(errors="replace")
    if name not in RECORD_TYPES:
        raise DecodeError("bad_payload", f"{TYPE_HEADER} {name!r} is not one of {', '.join(RECORD_TYPES)}")
    return name


def decode_output(data: bytes, headers: Headers, registry: Any = None) -> tuple[str, dict[str, Any]]:
    """Decodes an output message (for the sink, ``embedstream tail`` and tests) into its
    type and record. The type is the one its ``embedstream.type`` header names: the only
    one a JSON record has, and the one an Avro record's schema must agree with."""
    name = type_of(headers)
    if data[:2] == SINGLE_OBJECT_MAGIC:
        found, record = decode_single_object(data)
    elif data[:1] == b"\x00":
        if registry is None:
            raise DecodeError("no_schema_registry", "a Confluent-framed record, but no schema registry")
        found, record = registry.decode_any(data)
    else:
        return name, _output_from_json(name, data)
    if found != name:
        raise DecodeError("bad_payload", f"the {TYPE_HEADER} header says {name}, the payload is a {found}")
    return name, record


def _output_from_json(name: str, data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DecodeError("bad_payload", f"invalid JSON: {e}") from None
    if not isinstance(record, dict):
        raise DecodeError("bad_payload", f"a JSON {name} must be an object")
    fields = schema(name).raw["fields"]
    missing = [f["name"] for f in fields if f["name"] not in record and "default" not in f]
    if missing:
        raise DecodeError("bad_payload", f"a JSON {name} needs {', '.join(missing)}")
    return record


def confluent_frame(schema_id: int, datum: bytes) -> bytes:
    return bytes([CONFLUENT_MAGIC]) + struct.pack(">I", schema_id) + datum


def confluent_unframe(data: bytes) -> tuple[int, bytes]:
    if len(data) < 5 or data[0] != CONFLUENT_MAGIC:
        raise DecodeError("bad_payload", "not Confluent-framed")
    return struct.unpack(">I", data[1:5])[0], data[5:]
