"""``embedstream publish s3://bucket/prefix/`` (and ``gs://``, ``az://``, ``abfs[s]://``):
the objects already in a bucket as document events, so an existing bucket can be indexed
and then kept in step by its notifications.

Each object under the prefix becomes one UPSERT (or, with ``delete``, one DELETE) whose
``doc_id`` and ``uri`` are the object's URI, exactly as a notification of the object
names it (``s3://bucket/key``, the key as stored), without content: the workers fetch
the object when they process the event, so a document always gets the object's current
version, however long the event waited. Each message is keyed ``bucket/key``, as
MinIO keys its notifications, so the backfill's event and the notifications of one
object share a partition and are processed in order.

A prefix is matched by whole path segments (``s3://docs/reports`` lists
``reports/…``, never ``reports-old/…``); a URI without a trailing slash also names the
object of exactly that key, if there is one. Listing streams: memory stays flat however
many objects the bucket holds. An object store that cannot answer for a moment is
retried where the listing left off (:mod:`flows.outage`).
"""

from __future__ import annotations

import logging
import mimetypes
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from flows import codecs, outage
from flows.fetch import FetchUnavailable
from flows.object_store import ObjectStores
from flows.object_store import failure as describe_failure  # how fetches judge a failure
from flows.settings import Settings

log = logging.getLogger("embedstream.backfill")

#: Object-store schemes ``publish`` lists.
SCHEMES = ("s3", "gs", "az", "abfs", "abfss")
#: Objects asked of the store per list request.
PAGE = 1000


def is_object_uri(path: str) -> bool:
    """Whether a ``publish`` argument names objects in a store rather than local files."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


@dataclass(frozen=True)
class Prefix:
    """What one ``publish`` URI names: a bucket (or container) and a key prefix in it."""

    scheme: str
    bucket: str
    #: The key prefix without its trailing slash ("" for the whole bucket).
    key: str
    #: Whether the URI may also name one object of exactly ``key`` (no trailing slash).
    exact: bool

    @classmethod
    def parse(cls, uri: str) -> Prefix:
        scheme, _, rest = uri.partition("://")
        scheme = scheme.lower()
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{uri}: no bucket")
        # abfs[s]:// names container@account.dfs.core.windows.net; elsewhere '@' is a login.
        if ("@" in bucket and not scheme.startswith("abfs")) or "?" in rest or "#" in rest:
            raise ValueError(f"{uri}: name a bucket and a key prefix, no credentials or query")
        return cls(scheme, bucket, key.strip("/"), bool(key) and not key.endswith("/"))

    @property
    def root(self) -> str:
        return f"{self.scheme}://{self.bucket}"

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"


@dataclass(frozen=True)
class Listed:
    """One object found: its URI, the key its message gets, and what the listing said."""

    uri: str
    key: str
    size: int
    etag: Optional[str]


def objects(prefix: Prefix, stores: ObjectStores) -> Iterator[Listed]:
    """Every object ``prefix`` names, in key order, streamed page by page."""
    store = stores.store(prefix.scheme, prefix.bucket)
    if prefix.exact:
        meta = _head(store, prefix)
        if meta is not None:
            yield _listed(prefix, meta)
    for meta in _walk(store, prefix):
        yield _listed(prefix, meta)


def _listed(prefix: Prefix, meta: Mapping[str, Any]) -> Listed:
    return Listed(
        prefix.uri(meta["path"]), f"{prefix.bucket}/{meta['path']}", meta["size"], meta.get("e_tag")
    )


def _head(store: Any, prefix: Prefix) -> Optional[Mapping[str, Any]]:
    import obstore

    def attempt() -> Optional[Mapping[str, Any]]:
        try:
            return obstore.head(store, prefix.key)
        except FileNotFoundError:
            return None
        except Exception as e:
            _raise_transient(prefix, e)
            raise

    return outage.wait_out("object_store", attempt, give_up_s=LIST_PATIENCE_S)


#: Longest wait for an object store that cannot answer while listing, in seconds.
LIST_PATIENCE_S = 300.0


def _walk(store: Any, prefix: Prefix) -> Iterator[Mapping[str, Any]]:
    """The listing, page by page; where the store fails for a moment, listed again after
    the last key seen."""
    import obstore

    last: Optional[str] = None
    pages: Optional[Iterator[Sequence[Mapping[str, Any]]]] = None

    def next_page() -> Optional[Sequence[Mapping[str, Any]]]:
        nonlocal pages
        if pages is None:
            pages = iter(obstore.list(store, prefix.key or None, offset=last, chunk_size=PAGE))
        try:
            return next(pages)
        except StopIteration:
            return None
        except Exception as e:
            pages = None  # a broken stream: the next attempt starts a new one after `last`
            _raise_transient(prefix, e)
            raise

    while (page := outage.wait_out("object_store", next_page, give_up_s=LIST_PATIENCE_S)) is not None:
        for meta in page:
            yield meta
            last = meta["path"]


def _raise_transient(prefix: Prefix, e: Exception) -> None:
    """Raises :class:`flows.fetch.FetchUnavailable` (an outage) for a failure that waiting
    may cure, judged as fetches judge it: unreachable, timing out, throttling, 5xx.
    Anything else (no such bucket, credentials refused) is for the caller."""
    found = describe_failure(prefix.uri(prefix.key), e)
    if isinstance(found, FetchUnavailable):
        raise found from e


def event(obj: Listed, delete: bool = False) -> dict[str, Any]:
    """The DocumentEvent of one listed object: an UPSERT naming it by URI, or its DELETE."""
    name = obj.uri.rsplit("/", 1)[-1]
    scheme = obj.uri.split("://", 1)[0]
    metadata = {} if delete else {f"{scheme}.size": str(obj.size)}
    if obj.etag and not delete:
        metadata[f"{scheme}.eTag"] = obj.etag
    return {
        "doc_id": obj.uri,
        "op": "DELETE" if delete else "UPSERT",
        "content": None,
        "uri": None if delete else obj.uri,
        "mime_type": None if delete else mimetypes.guess_type(name)[0],
        "filename": None if delete else name or None,
        "metadata": metadata,
        "event_time": codecs.now_ms(),
    }


class BackfillError(Exception):
    """Listing failed (no such bucket, credentials refused, a store down for too long);
    ``sent`` events were published, and confirmed, before it did."""

    def __init__(self, message: str, sent: int) -> None:
        super().__init__(message)
        self.sent = sent


def publish(
    settings: Settings,
    topic: str,
    uris: Sequence[str],
    *,
    delete: bool = False,
    json_format: bool = False,
    progress: bool = True,
) -> int:
    """Publishes an event for every object the ``uris`` name; returns how many, once
    Kafka confirmed them all. Stores are set up from ``settings.object_store`` over the
    cloud's standard variables, as the workers' are. A URI that does not end in a slash
    and names no object at all (gone already) still gets its DELETE. Raises
    :class:`BackfillError`."""
    from confluent_kafka import Producer

    from flows.kafka.delivery import Delivery
    from flows.kafka.topics import CONFIRM_TIMEOUT_S

    prefixes = [Prefix.parse(u) for u in uris]
    stores = ObjectStores(settings.object_store_options(), timeout_s=settings.fetch_timeout_s)
    producer = Producer({**settings.kafka_common(), "enable.idempotence": "true"})
    delivery = Delivery(producer, "events")
    sent = 0
    try:
        for prefix in prefixes:
            found = 0
            for obj in objects(prefix, stores):
                _send(delivery, topic, obj, delete, json_format)
                found += 1
                sent += 1
                if sent % 1000 == 0:
                    producer.poll(0)
                    if progress:
                        print(f"\r{sent} objects published", end="", file=sys.stderr)
            if delete and not found and prefix.exact:
                gone = Listed(prefix.uri(prefix.key), f"{prefix.bucket}/{prefix.key}", 0, None)
                _send(delivery, topic, gone, True, json_format)
                sent += 1
            log.info("%s: %d objects", prefix.uri(prefix.key), found)
    except Exception as e:
        delivery.confirm(CONFIRM_TIMEOUT_S)  # what was sent stays sent: a rerun repeats it harmlessly
        raise BackfillError(str(e).splitlines()[0] if str(e) else type(e).__name__, sent) from e
    finally:
        if progress and sent >= 1000:
            print(file=sys.stderr)
    delivery.confirm(CONFIRM_TIMEOUT_S)
    return sent


def _send(delivery: Any, topic: str, obj: Listed, delete: bool, json_format: bool) -> None:
    from flows.kafka.topics import encode_event

    delivery.produce(topic, encode_event(event(obj, delete), json_format), obj.key.encode())
