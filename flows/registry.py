"""Confluent Schema Registry support: framing with a registry-assigned schema id.

Uses confluent-kafka's ``SchemaRegistryClient`` to register our schemas (subject
``<topic>-value`` style is the caller's choice; we use the record's full name) and to
fetch writer schemas by id. Decoding resolves the writer schema against ours, so
producers may use an older or newer compatible version.

A registry that cannot answer (down, unreachable, timing out, overloaded, refusing our
credentials) is an outage: the call blocks and is retried through :mod:`flows.outage`,
never turned into a dead letter. Only the registry's own answer that a schema id does not
exist, or a payload that does not decode with its schema, is a bad payload.
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable, TypeVar

import fastavro
from fastavro.schema import parse_schema

from flows import codecs, outage

T = TypeVar("T")

#: Seconds one request to the registry may take; beyond it the registry is unavailable.
REQUEST_TIMEOUT_S = 10.0
#: HTTP statuses that say the registry cannot serve us now, not that the request is wrong.
UNAVAILABLE_STATUSES = frozenset({401, 403, 408, 429})


class SchemaRegistry:
    def __init__(self, client: Any) -> None:
        """``client`` has ``register_schema(subject, Schema) -> int`` and
        ``get_schema(id) -> Schema`` (confluent_kafka.schema_registry.SchemaRegistryClient)."""
        self.client = client
        self._ids: dict[str, int] = {}
        #: Per writer schema id: the schema as written, and without logical types.
        self._writers: dict[int, tuple[Any, Any]] = {}

    @classmethod
    def from_url(cls, url: str) -> SchemaRegistry:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        # The client's own retries would block without keeping a group member alive:
        # every retry is outage.wait_out's.
        return cls(SchemaRegistryClient({"url": url, "timeout": REQUEST_TIMEOUT_S, "max.retries": 0}))

    def _ask(self, call: Callable[[], T]) -> T:
        """``call()`` against the registry, waited out while the registry is unavailable."""
        return outage.wait_out("registry", lambda: _unavailable_as_outage(call))

    def _id_for(self, name: str) -> int:
        if name not in self._ids:
            from confluent_kafka.schema_registry import Schema

            raw = json.dumps(codecs.schema(name).raw)
            subject = f"dev.embedstream.{name}"
            self._ids[name] = self._ask(lambda: self.client.register_schema(subject, Schema(raw, "AVRO")))
        return self._ids[name]

    def _writer(self, schema_id: int) -> tuple[Any, Any]:
        if schema_id not in self._writers:
            from confluent_kafka.schema_registry.error import SchemaRegistryError

            try:
                found = self._ask(lambda: self.client.get_schema(schema_id))
            except SchemaRegistryError as e:
                if e.http_status_code == 404:
                    raise codecs.DecodeError(
                        "unknown_schema", f"the registry has no schema {schema_id}"
                    ) from None
                raise
            try:
                raw = json.loads(found.schema_str)
                self._writers[schema_id] = (
                    parse_schema(raw),
                    parse_schema(codecs.without_logical_types(raw)),
                )
            except Exception as e:
                raise codecs.DecodeError(
                    "bad_payload", f"schema {schema_id} is not an Avro schema we can read: {e}"
                ) from None
        return self._writers[schema_id]

    def encode(self, name: str, record: dict[str, Any]) -> bytes:
        return codecs.confluent_frame(self._id_for(name), codecs.schema(name).write(record))

    def decode(self, data: bytes) -> dict[str, Any]:
        """A DocumentEvent from a Confluent-framed message."""
        schema_id, datum = codecs.confluent_unframe(data)
        writer, _ = self._writer(schema_id)
        return _read(datum, writer, codecs.schema("DocumentEvent").parsed)

    def decode_any(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """Any output record, resolved to our schema of its name, timestamps as epoch
        milliseconds (as the single-object decoder gives them)."""
        schema_id, datum = codecs.confluent_unframe(data)
        writer, plain = self._writer(schema_id)
        name = writer["name"].rsplit(".", 1)[-1]
        reader = codecs.schema(name).reader if name in codecs.RECORD_TYPES else plain
        return name, _read(datum, plain, reader)


def _read(datum: bytes, writer: Any, reader: Any) -> dict[str, Any]:
    try:
        return fastavro.schemaless_reader(io.BytesIO(datum), writer, reader)
    except Exception as e:  # truncated or mangled datum, or schemas that do not resolve
        raise codecs.DecodeError("bad_payload", f"invalid Confluent-framed Avro: {e}") from None


def _unavailable_as_outage(call: Callable[[], T]) -> T:
    """``call()``, with the errors that say the registry cannot answer now raised as
    :class:`outage.Outage`; its answers about the request itself pass through."""
    from confluent_kafka.schema_registry.common._httpx_compat import httpx
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    try:
        return call()
    except httpx.TransportError as e:  # refused, reset, unreachable, timed out
        raise outage.Outage(f"{type(e).__name__}: {e}") from e
    except SchemaRegistryError as e:
        if e.http_status_code >= 500 or e.http_status_code in UNAVAILABLE_STATUSES:
            raise outage.Outage(str(e)) from e
        raise
