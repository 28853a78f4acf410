"""S3 event notifications as input events: what AWS S3, MinIO and Ceph write when an
object lands in a bucket or leaves it, read as document events.

    {"Records": [{"eventName": "ObjectCreated:Put",
                  "eventTime": "2026-12-06T10:00:00.000Z",
                  "s3": {"bucket": {"name": "docs"},
                         "object": {"key": "reports/q3+summary.pdf", "size": 1024,
                                    "eTag": "…", "versionId": "…", "sequencer": "…"}}}]}

Each record is one document, ``s3://bucket/key``, with the key decoded as S3 encodes it
in notifications (form encoding: ``+`` for a space, ``%XX`` for the rest):

- ``ObjectCreated:*`` is an UPSERT, fetched at the notified ``versionId`` when there is
  one (so an overwrite after the notification does not change what it embeds);
- ``ObjectRemoved:*``, and lifecycle expirations that remove the current version
  (``LifecycleExpiration:Delete``, ``LifecycleExpiration:DeleteMarkerCreated``), are a
  DELETE;
- every other type (``s3:TestEvent``, replication, tagging, ACL, restore, transition,
  access, and MinIO's ``ObjectCreated:PutTagging``, ``DeleteTagging``, ``PutRetention`` and
  ``PutLegalHold``, which change no content) is skipped, and counted; so is the creation
  of an empty ``folder/`` object, which consoles make for folders.

MinIO names its types with an ``s3:`` prefix (``s3:ObjectCreated:Put``); AWS does not.
The object's ``size``, ``eTag``, ``versionId`` and ``sequencer`` go into the document's
metadata under ``s3.``. A record that cannot be read is that record's dead letter only:
the others of its message go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional
from urllib.parse import unquote_plus

from flows.codecs import DecodeError

#: Event types (without MinIO's ``s3:`` prefix) that remove the object's current version.
_REMOVALS = ("ObjectRemoved:", "LifecycleExpiration:Delete", "LifecycleExpiration:DeleteMarkerCreated")
#: The families of event types the skipped-records metric names; anything else is "other",
#: so a hostile producer cannot grow the metric's labels without bound.
SKIPPED_KINDS = frozenset(
    {
        "TestEvent",
        "ObjectRestore",
        "Replication",
        "LifecycleTransition",
        "LifecycleExpiration",
        "IntelligentTiering",
        "ObjectTagging",
        "ObjectAcl",
        "ObjectAccessed",
        "ObjectRetention",
        "ObjectLegalHold",
        "ObjectTransition",
        "LifecycleDelMarkerExpiration",
        "ReducedRedundancyLostObject",
        "FolderMarker",
        "Scanner",
        "ILM",
    }
)
#: MinIO's ObjectCreated types that change only an object's tags, retention or legal hold
#: (its "put" selection includes them): the content is what it was, so they are skipped,
#: under the family AWS gives them.
_METADATA_ONLY = {
    "ObjectCreated:PutTagging": "ObjectTagging",
    "ObjectCreated:DeleteTagging": "ObjectTagging",
    "ObjectCreated:PutRetention": "ObjectRetention",
    "ObjectCreated:PutLegalHold": "ObjectLegalHold",
}
#: What a skipped record of an empty ``folder/`` object is called.
FOLDER_MARKER = "FolderMarker"
#: The object's fields that go into metadata, under ``s3.``.
_OBJECT_FIELDS = ("size", "eTag", "versionId", "sequencer")


@dataclass(frozen=True)
class Record:
    """One record of a notification and what it became: a document event, a type that
    is skipped, or the dead letter's reason."""

    #: Its index in ``Records``.
    index: int
    #: Records in its message.
    of: int
    #: The document event (``doc_id``, ``op``, ``uri``, ``version_id``, …), or None.
    event: Optional[dict[str, Any]] = None
    #: The event type of a record that is not embedded.
    skipped: Optional[str] = None
    #: Why the record cannot be read.
    error: Optional[DecodeError] = None
    #: The record alone as a notification: what its dead letter carries, so that a
    #: redrive sends this record again and not its siblings.
    payload: bytes = b""

    @property
    def label(self) -> str:
        """How dead letters and logs name the record: ``Records[1] of 3``."""
        return f"Records[{self.index}] of {self.of}"

    @property
    def object_key(self) -> Optional[bytes]:
        """``bucket/key``, the message key MinIO gives the notifications of this object
        (and ``publish s3://`` gives its events): one object, one partition."""
        if self.event is None:
            return None
        return self.event["doc_id"].removeprefix("s3://").encode()


def looks_like(data: Optional[bytes]) -> bool:
    """Whether ``data`` is a JSON S3 event notification rather than a DocumentEvent:
    a cheap look at the bytes first, so that documents do not pay for a second parse."""
    if not data or data.lstrip()[:1] != b"{":
        return False
    if b'"Records"' not in data and b'"s3:TestEvent"' not in data:
        return False
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return _is_notification(obj)


def _is_notification(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and "doc_id" not in obj
        and (isinstance(obj.get("Records"), list) or obj.get("Event") == "s3:TestEvent")
    )


def parse(data: Optional[bytes], *, timestamp_ms: int) -> list[Record]:
    """The records of one notification message, in order. ``timestamp_ms`` (the Kafka
    message's) is the event time of a record without a readable ``eventTime``. Raises
    :class:`DecodeError` for a message that is no notification at all."""
    if not data:
        raise DecodeError("bad_payload", "empty message")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DecodeError("bad_payload", f"not an S3 event notification: invalid JSON: {e}") from None
    if not _is_notification(obj):
        raise DecodeError("bad_payload", "not an S3 event notification: no Records list")
    if obj.get("Event") == "s3:TestEvent" and "Records" not in obj:
        # Sent once when a notification configuration is saved: no object, nothing to do.
        return [Record(0, 1, skipped="s3:TestEvent")]
    records = obj["Records"]
    if not records:
        raise DecodeError("bad_payload", "an S3 event notification without records")
    return [_record(i, len(records), r, timestamp_ms) for i, r in enumerate(records)]


def _record(index: int, of: int, raw: Any, timestamp_ms: int) -> Record:
    payload = json.dumps({"Records": [raw]}, ensure_ascii=False, separators=(",", ":")).encode()
    try:
        kind, event = _event(raw, timestamp_ms)
    except DecodeError as e:
        return Record(index, of, error=e, payload=payload)
    if event is None:
        return Record(index, of, skipped=kind, payload=payload)
    return Record(index, of, event=event, payload=payload)


def _event(raw: Any, timestamp_ms: int) -> tuple[str, Optional[dict[str, Any]]]:
    """(the event type, the document event; None for a type that is skipped)."""
    if not isinstance(raw, dict):
        raise DecodeError("bad_payload", "a record must be an object")
    name = raw.get("eventName")
    if not isinstance(name, str) or not name:
        raise DecodeError("bad_payload", "no eventName")
    kind = name.removeprefix("s3:")
    if kind in _METADATA_ONLY:
        return name, None
    if kind.startswith("ObjectCreated:"):
        op = "UPSERT"
    elif kind.startswith(_REMOVALS):
        op = "DELETE"
    else:
        return name, None
    s3 = raw.get("s3")
    bucket = _dig(s3, "bucket", "name")
    key = _dig(s3, "object", "key")
    if not isinstance(bucket, str) or not bucket or "/" in bucket:
        raise DecodeError("bad_payload", f"s3.bucket.name must be a bucket name, not {bucket!r}")
    if not isinstance(key, str) or not key:
        raise DecodeError("bad_payload", "no s3.object.key")
    try:
        # Form encoding, as S3 writes keys in notifications: '+' is a space, '%2B' a '+'.
        decoded = unquote_plus(key, errors="strict")
    except UnicodeDecodeError:
        raise DecodeError("bad_payload", f"s3.object.key {key!r} does not decode to UTF-8") from None
    obj = s3["object"]
    if op == "UPSERT" and decoded.endswith("/") and str(obj.get("size", 0)) == "0":
        # An empty "folder/" object, as consoles create for folders: no document.
        return FOLDER_MARKER, None
    metadata = {f"s3.{f}": str(obj[f]) for f in _OBJECT_FIELDS if obj.get(f) not in (None, "")}
    metadata["s3.eventName"] = name
    uri = f"s3://{bucket}/{decoded}"
    event: dict[str, Any] = {
        "doc_id": uri,
        "op": op,
        "content": None,
        "uri": uri if op == "UPSERT" else None,
        "mime_type": None,
        "filename": decoded.rsplit("/", 1)[-1] or None,
        "metadata": metadata,
        "event_time": _millis(raw.get("eventTime")) or timestamp_ms,
    }
    version = obj.get("versionId")
    # "null" is the version of an object written while versioning was off: the current
    # one is what there is to fetch.
    if op == "UPSERT" and isinstance(version, str) and version not in ("", "null"):
        event["version_id"] = version
    return name, event


def _dig(node: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(node, dict):
            return None
        node = node.get(name)
    return node


def _millis(value: Any) -> Optional[int]:
    """Epoch milliseconds of an ISO-8601 ``eventTime``; None if there is none or it does
    not parse (the message timestamp stands in)."""
    if not isinstance(value, str):
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def skipped_kind(event_name: str) -> str:
    """The family of a skipped event type, for the metric's label."""
    name = event_name.removeprefix("s3:")
    if name in _METADATA_ONLY:
        return _METADATA_ONLY[name]
    kind = name.split(":", 1)[0]
    return kind if kind in SKIPPED_KINDS else "other"
