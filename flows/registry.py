"""Confluent Schema Registry support: framing with a registry-assigned schema id.

Uses confluent-kafka's ``SchemaRegistryClient`` to register our schemas (subject
``<topic>-value`` style is the caller's choice; we use the record's full name) and to
fetch writer schemas by id. Decoding resolves the writer schema against ours, so
producers may use an older or newer compatible version.
"""

from __future__ import annotations

import io
import json
from typing import Any

import fastavro
from fastavro.schema import parse_schema

from flows import codecs


class SchemaRegistry:
    def __init__(self, client: Any) -> None:
        """``client`` has ``register_schema(subject, Schema) -> int`` and
        ``get_schema(id) -> Schema`` (confluent_kafka.schema_registry.SchemaRegistryClient)."""
        self.client = client
        self._ids: dict[str, int] = {}
        self._writers: dict[int, Any] = {}
        self._plain_writers: dict[int, Any] = {}

    @classmethod
    def from_url(cls, url: str) -> SchemaRegistry:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return cls(SchemaRegistryClient({"url": url}))

    def _id_for(self, name: str) -> int:
        if name not in self._ids:
            from confluent_kafka.schema_registry import Schema

            raw = json.dumps(codecs.schema(name).raw)
            self._ids[name] = self.client.register_schema(f"dev.embedstream.{name}", Schema(raw, "AVRO"))
        return self._ids[name]

    def _writer(self, schema_id: int) -> Any:
        if schema_id not in self._writers:
            found = self.client.get_schema(schema_id)
            self._writers[schema_id] = parse_schema(json.loads(found.schema_str))
        return self._writers[schema_id]

    def encode(self, name: str, record: dict[str, Any]) -> bytes:
        return codecs.confluent_frame(self._id_for(name), codecs.schema(name).write(record))

    def decode(self, data: bytes) -> dict[str, Any]:
        """A DocumentEvent from a Confluent-framed message."""
        schema_id, datum = codecs.confluent_unframe(data)
        reader = codecs.schema("DocumentEvent").parsed
        return fastavro.schemaless_reader(io.BytesIO(datum), self._writer(schema_id), reader)

    def decode_any(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """Any output record, resolved to our schema of its name, timestamps as epoch
        milliseconds (as the single-object decoder gives them)."""
        schema_id, datum = codecs.confluent_unframe(data)
        name = self._writer(schema_id)["name"].rsplit(".", 1)[-1]
        if schema_id not in self._plain_writers:
            raw = json.loads(self.client.get_schema(schema_id).schema_str)
            self._plain_writers[schema_id] = parse_schema(codecs.without_logical_types(raw))
        writer = self._plain_writers[schema_id]
        reader = codecs.schema(name).reader if name in codecs.RECORD_TYPES else writer
        return name, fastavro.schemaless_reader(io.BytesIO(datum), writer, reader)
