"""S3 event notifications as input events (flows/s3_events.py and the flow's decode step):
notifications built as AWS and MinIO write them, each record one document, keys decoded
as S3 encodes them, other event types skipped and counted, and every message accounted
for. The records that fetch objects run against the real local S3 server (SeaweedFS)."""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import quote_plus

import pytest

from flows import codecs, metrics, s3_events
from flows.embed_steps import Pipeline
from flows.kafka.io import InputMessage
from flows.settings import Settings
from operators import ExtractorPool

#: A key with spaces, '+', unicode and slashes: S3 writes it form-encoded in notifications.
HARD_KEY = "reports/2026 Q3/a+b résumé ✓ (final).txt"


def aws_record(
    event_name: str,
    bucket: str,
    key: str,
    *,
    size: int = 0,
    etag: str = "d41d8cd98f00b204e9800998ecf8427e",
    version: Optional[str] = None,
    sequencer: str = "0055AED6DCD90281E5",
    minio: bool = False,
) -> dict[str, Any]:
    """One record as AWS documents it (event structure 2.1, every field), or as MinIO
    writes it (event names with ``s3:``, the key escaped by Go's url.QueryEscape, which
    escapes '/' too). AWS leaves '/' as it is and writes '+' for a space."""
    obj: dict[str, Any] = {
        "key": quote_plus(key, safe="" if minio else "/"),
        "size": size,
        "eTag": etag,
        "sequencer": sequencer,
    }
    if version is not None:
        obj["versionId"] = version
    return {
        "eventVersion": "2.1",
        "eventSource": "minio:s3" if minio else "aws:s3",
        "awsRegion": "us-west-2",
        "eventTime": "2026-12-06T10:15:30.250Z",
        "eventName": f"s3:{event_name}" if minio else event_name,
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": "C3D13FE58DE4C810",
            "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "embedstream",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": obj,
        },
    }


def notification(*records: dict[str, Any], minio: bool = False) -> bytes:
    body: dict[str, Any] = {"Records": list(records)}
    if minio and len(records) == 1:
        # MinIO's Kafka target wraps the records with the event name and bucket/key.
        r = records[0]
        body = {
            "EventName": r["eventName"],
            "Key": f"{r['s3']['bucket']['name']}/{r['s3']['object']['key']}",
            **body,
        }
    return json.dumps(body).encode()


TEST_EVENT = json.dumps(
    {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "2026-12-06T10:00:00.000Z",
        "Bucket": "docs",
        "RequestId": "5582815E1AEA5ADF",
        "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
    }
).encode()


def message(value: bytes, offset: int = 0, key: Optional[bytes] = None) -> InputMessage:
    return InputMessage("documents", 0, offset, key, value, 1_700_000_000_000)


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("minio", [False, True], ids=["aws", "minio"])
def test_a_record_becomes_a_document_with_its_key_decoded(minio):
    data = notification(
        aws_record(
            "ObjectCreated:Put", "docs", HARD_KEY, size=42, version="3HL4kqtJlcpXroDTDmJ", minio=minio
        ),
        minio=minio,
    )
    assert s3_events.looks_like(data)
    [record] = s3_events.parse(data, timestamp_ms=1)
    event = record.event
    assert event["doc_id"] == event["uri"] == f"s3://docs/{HARD_KEY}"
    assert event["op"] == "UPSERT" and event["content"] is None
    assert event["filename"] == "a+b résumé ✓ (final).txt"
    assert event["version_id"] == "3HL4kqtJlcpXroDTDmJ"
    assert event["event_time"] == 1_796_552_130_250  # eventTime, not the message's
    assert event["metadata"] == {
        "s3.size": "42",
        "s3.eTag": "d41d8cd98f00b204e9800998ecf8427e",
        "s3.versionId": "3HL4kqtJlcpXroDTDmJ",
        "s3.sequencer": "0055AED6DCD90281E5",
        "s3.eventName": ("s3:" if minio else "") + "ObjectCreated:Put",
    }
    assert record.object_key == f"docs/{HARD_KEY}".encode()
    # '+' in a notification is a space; a '+' of the key arrives as %2B.
    assert b"2026+Q3" in data and b"a%2Bb" in data


@pytest.mark.parametrize(
    "event_name, op",
    [
        ("ObjectCreated:Put", "UPSERT"),
        ("ObjectCreated:Post", "UPSERT"),
        ("ObjectCreated:Copy", "UPSERT"),
        ("ObjectCreated:CompleteMultipartUpload", "UPSERT"),
        ("ObjectRemoved:Delete", "DELETE"),
        ("ObjectRemoved:DeleteMarkerCreated", "DELETE"),
        ("LifecycleExpiration:Delete", "DELETE"),
        ("LifecycleExpiration:DeleteMarkerCreated", "DELETE"),
        ("ObjectTagging:Put", None),
        ("ObjectAcl:Put", None),
        ("ObjectRestore:Completed", None),
        ("Replication:OperationFailedReplication", None),
        ("LifecycleTransition", None),
        ("IntelligentTiering", None),
    ],
)
@pytest.mark.parametrize("minio", [False, True], ids=["aws", "minio"])
def test_event_types(event_name, op, minio):
    [record] = s3_events.parse(
        notification(aws_record(event_name, "docs", "a.txt", version="v1", minio=minio)), timestamp_ms=1
    )
    if op is None:
        assert record.event is None and record.error is None
        assert record.skipped == ("s3:" if minio else "") + event_name
        assert s3_events.skipped_kind(record.skipped) == event_name.split(":")[0]
    else:
        assert record.event["op"] == op and record.skipped is None
        # A DELETE fetches nothing: no URI, no version.
        assert ("version_id" in record.event) == (op == "UPSERT")
        assert (record.event["uri"] is None) == (op == "DELETE")


@pytest.mark.parametrize(
    "event_name, kind",
    [
        ("ObjectCreated:PutTagging", "ObjectTagging"),
        ("ObjectCreated:DeleteTagging", "ObjectTagging"),
        ("ObjectCreated:PutRetention", "ObjectRetention"),
        ("ObjectCreated:PutLegalHold", "ObjectLegalHold"),
    ],
)
def test_minios_metadata_changes_are_skipped_not_embedded_again(event_name, kind):
    """MinIO's "put" selection sends tag, retention and legal-hold changes as ObjectCreated
    types: the content did not change, so nothing is fetched or embedded again."""
    [record] = s3_events.parse(
        notification(aws_record(event_name, "docs", "a.txt", version="v1", minio=True)), timestamp_ms=1
    )
    assert record.event is None and record.skipped == f"s3:{event_name}"
    assert s3_events.skipped_kind(record.skipped) == kind


def test_an_empty_folder_object_is_skipped_and_a_folder_with_content_is_not():
    data = notification(
        aws_record("ObjectCreated:Put", "docs", "reports/2026/", size=0),
        aws_record("ObjectCreated:Put", "docs", "odd/", size=12),
        aws_record("ObjectRemoved:Delete", "docs", "reports/2026/"),
    )
    folder, odd, removed = s3_events.parse(data, timestamp_ms=1)
    assert folder.event is None and s3_events.skipped_kind(folder.skipped) == "FolderMarker"
    assert odd.event["doc_id"] == "s3://docs/odd/" and odd.event["op"] == "UPSERT"
    assert removed.event["op"] == "DELETE"  # harmless: a delete of a document never made


def test_a_test_event_is_skipped():
    assert s3_events.looks_like(TEST_EVENT)
    [record] = s3_events.parse(TEST_EVENT, timestamp_ms=1)
    assert record.skipped == "s3:TestEvent" and record.event is None and record.error is None
    assert s3_events.skipped_kind("s3:TestEvent") == "TestEvent"
    assert s3_events.skipped_kind("s3:SomethingNew:Put") == "other"  # labels stay bounded


def test_the_null_version_and_a_missing_event_time():
    raw = aws_record("ObjectCreated:Put", "docs", "a.txt", version="null")
    del raw["eventTime"]
    [record] = s3_events.parse(notification(raw), timestamp_ms=1234)
    assert "version_id" not in record.event  # written while versioning was off: the current one
    assert record.event["event_time"] == 1234


def test_document_events_are_not_taken_for_notifications():
    for event in (
        {"doc_id": "a", "content": 'a text that says {"Records": []}'},
        {"doc_id": "a", "content": "x", "metadata": {"Records": "3"}},
        {"doc_id": "a", "Records": [], "content": "x"},
    ):
        assert not s3_events.looks_like(json.dumps(event).encode())
    assert not s3_events.looks_like(codecs.encode_single_object("DocumentEvent", _avro("a")))
    assert not s3_events.looks_like(b'{"Records": not json')
    assert not s3_events.looks_like(b"")


@pytest.mark.parametrize(
    "raw, says",
    [
        ("not an object", "a record must be an object"),
        ({"eventName": "ObjectCreated:Put"}, "s3.bucket.name"),
        (
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "a/b"}, "object": {"key": "k"}}},
            "a/b",
        ),
        (
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "docs"}, "object": {}}},
            "no s3.object.key",
        ),
        (
            {
                "eventName": "ObjectRemoved:Delete",
                "s3": {"bucket": {"name": "docs"}, "object": {"key": "%FF"}},
            },
            "UTF-8",
        ),
        ({"s3": {}}, "no eventName"),
    ],
)
def test_a_record_that_cannot_be_read_is_an_error_of_its_own(raw, says):
    good = aws_record("ObjectRemoved:Delete", "docs", "gone.txt")
    records = s3_events.parse(json.dumps({"Records": [good, raw]}).encode(), timestamp_ms=1)
    assert records[0].event["doc_id"] == "s3://docs/gone.txt"
    assert records[1].error.reason == "bad_payload" and says in str(records[1].error)
    assert records[1].label == "Records[1] of 2"
    assert json.loads(records[1].payload) == {"Records": [raw]}


def test_messages_that_are_no_notification():
    for data, says in (
        (b"", "empty"),
        (b"{", "invalid JSON"),
        (b'{"doc_id": "a"}', "no Records"),
        (b'{"Records": []}', "without records"),
        (b'{"Records": {"a": 1}}', "no Records"),
    ):
        with pytest.raises(codecs.DecodeError, match=says):
            s3_events.parse(data, timestamp_ms=1)


def _avro(doc_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "doc_id": doc_id,
        "op": "UPSERT",
        "content": b"plain text about embeddings",
        "uri": None,
        "mime_type": None,
        "filename": "a.txt",
        "metadata": {},
        "event_time": 1_700_000_000_000,
        **fields,
    }


# --- in the flow's steps -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    with ExtractorPool(1) as pool:
        yield pool


def pipeline(minilm, pool, **settings: Any) -> Pipeline:
    return Pipeline(Settings(**settings), minilm, pool=pool, **settings.pop("_extra", {}))


def outputs(out) -> list[tuple[str, dict[str, Any], Any]]:
    return [(*codecs.decode_output(m.value, m.headers), m) for m in out if not m.commit_only]


def test_one_message_of_several_records_is_several_documents_each_accounted(minilm, pool):
    """Two removals, a tagging record (skipped) and a broken record: two delete markers,
    one dead letter naming its record and carrying it alone, one skipped record counted."""
    broken = {"eventName": "ObjectRemoved:Delete", "s3": {"bucket": {"name": "docs"}, "object": {}}}
    data = notification(
        aws_record("ObjectRemoved:Delete", "docs", "a b.txt"),
        broken,
        aws_record("ObjectTagging:Put", "docs", "c.txt"),
        aws_record("ObjectRemoved:DeleteMarkerCreated", "docs", "d/e.txt"),
    )
    p = pipeline(minilm, pool)
    skipped = metrics.S3_RECORDS_SKIPPED.labels("ObjectTagging")._value.get()
    out = outputs(p.process([message(data, key=b"docs/some-key")]))
    kinds = [(kind, r.get("doc_id")) for kind, r, _ in out]
    assert kinds == [
        ("DeleteMarker", "s3://docs/a b.txt"),
        ("DeadLetter", None),
        ("DeleteMarker", "s3://docs/d/e.txt"),
    ]
    # Each document's outputs are keyed bucket/key, whatever the message's key.
    assert [m.key for kind, _, m in out if kind == "DeleteMarker"] == [b"docs/a b.txt", b"docs/d/e.txt"]
    letter = out[1][1]
    assert letter["stage"] == "decode" and letter["reason"] == "bad_payload"
    assert letter["message"].startswith("Records[1] of 4: ") and "s3.object.key" in letter["message"]
    assert json.loads(letter["payload"]) == {"Records": [broken]}  # a redrive sends it alone
    assert letter["offset"] == 0 and out[1][2].key == b"docs/some-key"
    assert (p.counters.events, p.counters.deletes, p.counters.dead_letters, p.counters.skipped) == (
        4,
        2,
        1,
        1,
    )
    assert "1 skipped" in p.counters.line()
    assert metrics.S3_RECORDS_SKIPPED.labels("ObjectTagging")._value.get() == skipped + 1


def test_a_test_event_is_counted_and_its_offset_marked_done(minilm, pool):
    p = pipeline(minilm, pool)
    out = p.process([message(TEST_EVENT, offset=7)])
    [only] = out
    # Nothing goes to Kafka, but the offset counts as done, so the commit gets past it.
    assert only.commit_only and only.value is None and only.source == ("documents", 0, 7)
    assert (p.counters.events, p.counters.skipped, p.counters.dead_letters) == (1, 1, 0)


def test_input_events_pins_the_kind(minilm, pool):
    document = codecs.encode_json(
        {"doc_id": "notes.txt", "content": "Records of the ingestion team", "filename": "notes.txt"}
    )
    removal = notification(aws_record("ObjectRemoved:Delete", "docs", "a.txt"))
    auto = outputs(pipeline(minilm, pool).process([message(document), message(removal, 1)]))
    assert [k for k, _, _ in auto] == ["VectorRecord", "DocManifest", "DeleteMarker"]
    documents = outputs(
        pipeline(minilm, pool, input_events="documents").process([message(removal, key=b"k")])
    )
    [(kind, letter, _)] = documents
    assert (kind, letter["reason"]) == ("DeadLetter", "bad_payload")
    s3 = outputs(pipeline(minilm, pool, input_events="s3").process([message(document)]))
    [(kind, letter, _)] = s3
    assert (kind, letter["reason"]) == ("DeadLetter", "bad_payload")
    assert "not an S3 event notification" in letter["message"]
    with pytest.raises(ValueError, match="input_events"):
        Settings(input_events="sqs").validate()


def test_a_spent_batch_budget_gives_each_message_back_once_with_all_its_records(minilm, pool):
    """Group mode's time budget cuts a batch between messages, never between the records
    of one: the notification's three records go back to the source as one message."""
    given_back: list[InputMessage] = []
    p = Pipeline(Settings(batch_max_s=1e-9), minilm, pool=pool, give_back=given_back.extend)
    first = message(codecs.encode_json({"doc_id": "first.txt", "content": "the first document"}), 0)
    three = message(notification(*(aws_record("ObjectCreated:Put", "docs", f"{i}.txt") for i in range(3))), 1)
    last = message(codecs.encode_json({"doc_id": "last.txt", "content": "the last document"}), 2)
    out = outputs(p.process([first, three, last]))
    assert {r["doc_id"] for _, r, _ in out} == {"first.txt"}
    assert given_back == [three, last]


# --- against the real S3 server ------------------------------------------------------------------


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    """The worker's standard AWS variables, pointing at the local server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def put(s3_server, bucket: str, key: str, data: bytes) -> str:
    """Writes an object; returns its version id."""
    import obstore
    from obstore.store import S3Store

    return obstore.put(S3Store(bucket, **s3_server.store_options()), key, data)["version"]


def texts(out) -> dict[str, str]:
    """doc_id → its records' text, joined."""
    found: dict[str, list[str]] = {}
    for kind, record, _ in outputs(out):
        if kind == "VectorRecord":
            found.setdefault(record["doc_id"], []).append(record["text"])
    return {doc_id: " ".join(parts) for doc_id, parts in found.items()}


def test_a_hard_key_from_a_real_notification_is_fetched_and_embedded(minilm, pool, aws_env, s3_bucket):
    """Spaces, '+', unicode and slashes, as AWS and as MinIO encode them in notifications."""
    version = put(aws_env, s3_bucket, HARD_KEY, b"Quarterly summary of the ingestion pipeline.")
    p = pipeline(minilm, pool, allowed_uris=(f"s3://{s3_bucket}/",))
    for minio in (False, True):
        data = notification(
            aws_record("ObjectCreated:Put", s3_bucket, HARD_KEY, size=44, version=version, minio=minio),
            minio=minio,
        )
        out = outputs(p.process([message(data, key=f"{s3_bucket}/{HARD_KEY}".encode())]))
        assert [k for k, _, _ in out] == ["VectorRecord", "DocManifest"], out[0][1]
        record = out[0][1]
        assert record["doc_id"] == f"s3://{s3_bucket}/{HARD_KEY}"
        assert record["text"] == "Quarterly summary of the ingestion pipeline."
        assert record["metadata"]["s3.versionId"] == version
        assert out[0][2].key == f"{s3_bucket}/{HARD_KEY}".encode()
    assert p.counters.fetched == 2


def test_an_overwrite_after_the_notification_does_not_change_what_it_embeds(minilm, pool, aws_env, s3_bucket):
    first = put(aws_env, s3_bucket, "notes.txt", b"The first version talks about brokers.")
    second = put(aws_env, s3_bucket, "notes.txt", b"The second version talks about databases.")
    assert first != second  # the server keeps versions
    p = pipeline(minilm, pool, allowed_uris=(f"s3://{s3_bucket}/",))
    late = notification(aws_record("ObjectCreated:Put", s3_bucket, "notes.txt", version=first))
    current = notification(aws_record("ObjectCreated:Put", s3_bucket, "notes.txt", version=second))
    got = [texts(p.process([message(m)])) for m in (late, current)]
    uri = f"s3://{s3_bucket}/notes.txt"
    assert got == [
        {uri: "The first version talks about brokers."},
        {uri: "The second version talks about databases."},
    ]


def test_a_notification_of_several_records_fetches_each_and_accounts_for_each(
    minilm, pool, aws_env, s3_bucket
):
    a = put(aws_env, s3_bucket, "a.txt", b"Alpha document about chunking.")
    b = put(aws_env, s3_bucket, "dir/b.md", b"# Beta\n\nA document about embeddings.")
    data = notification(
        aws_record("ObjectCreated:Put", s3_bucket, "a.txt", version=a),
        aws_record("ObjectCreated:CompleteMultipartUpload", s3_bucket, "dir/b.md", version=b),
        aws_record("ObjectCreated:Put", s3_bucket, "missing.txt"),
        aws_record("ObjectRemoved:Delete", s3_bucket, "old.txt"),
        aws_record("ObjectTagging:Put", s3_bucket, "a.txt"),
    )
    p = pipeline(minilm, pool, allowed_uris=(f"s3://{s3_bucket}/",))
    out = outputs(p.process([message(data, offset=3)]))
    summary = [(k, r.get("doc_id"), r.get("reason")) for k, r, _ in out if k != "VectorRecord"]
    root = f"s3://{s3_bucket}"
    assert summary == [
        ("DocManifest", f"{root}/a.txt", None),
        ("DocManifest", f"{root}/dir/b.md", None),
        ("DeadLetter", f"{root}/missing.txt", "not_found"),
        ("DeleteMarker", f"{root}/old.txt", None),
    ]
    letter = next(r for k, r, _ in out if k == "DeadLetter")
    assert letter["stage"] == "fetch" and letter["message"].startswith("Records[2] of 5: ")
    assert json.loads(letter["payload"])["Records"][0]["s3"]["object"]["key"] == "missing.txt"
    assert (
        texts(p.process([message(data, offset=3)]))[f"{root}/dir/b.md"]
        == "Beta\n\nA document about embeddings."
    )
    c = p.counters
    assert (c.documents, c.deletes, c.dead_letters, c.skipped, c.events) == (4, 2, 2, 2, 10)


def test_keys_that_urls_treat_specially_still_name_their_object(minilm, pool, aws_env, s3_bucket):
    """'#', '?', a literal '%41', '&', '=' and ';' are all legal in keys: the URI carries
    the key as stored, never re-parsed as a URL's fragment, query or escape."""
    keys = ["x/y#z?.txt", "a%41b.txt", "q=1&r=2;s.txt"]
    for key in keys:
        put(aws_env, s3_bucket, key, f"The object stored under {key}.".encode())
    p = pipeline(minilm, pool, allowed_uris=(f"s3://{s3_bucket}/",))
    data = notification(*(aws_record("ObjectCreated:Put", s3_bucket, k) for k in keys))
    got = texts(p.process([message(data)]))
    assert got == {f"s3://{s3_bucket}/{k}": f"The object stored under {k}." for k in keys}
