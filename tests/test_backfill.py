"""`embedstream publish s3://bucket/prefix/` (flows/backfill.py) on the real local S3
server (SeaweedFS) and the real broker: the objects of a prefix, by whole path segments,
become events naming them by URI and keyed bucket/key; `--delete` likewise. Then the
flow and the sink index a bucket that way and keep the store exactly in step with it
through its notifications."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka_helpers import FlowTopics

from flows import backfill
from flows.kafka.topics import read_all
from flows.settings import Settings

SAMPLES = Path(__file__).resolve().parent.parent / "flows" / "samples"


def cli(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def bucket_store(s3_server, bucket: str):
    from obstore.store import S3Store

    return S3Store(bucket, **s3_server.store_options())


def put(s3_server, bucket: str, objects: dict[str, bytes]) -> dict[str, str]:
    """Writes the objects; returns the version id of each."""
    import obstore

    store = bucket_store(s3_server, bucket)
    return {key: obstore.put(store, key, data)["version"] for key, data in objects.items()}


def events(kafka_bootstrap: str, topic: str) -> list[tuple[bytes, dict]]:
    return [(m.key(), r) for _, r, m in read_all(Settings(brokers=kafka_bootstrap), topic)]


def test_prefixes_name_whole_segments():
    p = backfill.Prefix.parse("s3://docs/reports")
    assert (p.bucket, p.key, p.exact) == ("docs", "reports", True)
    assert backfill.Prefix.parse("s3://docs/reports/") == backfill.Prefix("s3", "docs", "reports", False)
    assert backfill.Prefix.parse("gs://docs") == backfill.Prefix("gs", "docs", "", False)
    assert backfill.Prefix.parse("az://container/a/b.pdf").uri("a/b.pdf") == "az://container/a/b.pdf"
    abfs = backfill.Prefix.parse("abfss://docs@account.dfs.core.windows.net/a/")
    assert (abfs.scheme, abfs.bucket, abfs.key) == ("abfss", "docs@account.dfs.core.windows.net", "a")
    for bad in ("s3://", "s3:///key", "s3://user:secret@docs/a", "s3://docs/a?versionId=1"):
        with pytest.raises(ValueError):
            backfill.Prefix.parse(bad)
    assert backfill.is_object_uri("s3://b/k") and backfill.is_object_uri("ABFSS://c/k")
    assert not backfill.is_object_uri("docs/s3://x") and not backfill.is_object_uri("/tmp/a")


def test_publish_lists_a_prefix_and_sends_events_naming_each_object(kafka_bootstrap, s3_server, s3_bucket):
    put(
        s3_server,
        s3_bucket,
        {
            "docs": b"an object named like the prefix",
            "docs/a.txt": b"first",
            "docs/sub dir/b+c ü.md": b"# second",
            "docs-private/secret.txt": b"not under docs/",
            "other/d.txt": b"elsewhere",
        },
    )
    topics = FlowTopics(kafka_bootstrap)
    common = ["--brokers", kafka_bootstrap, "--topic", topics.input, "--quiet"]
    sent = cli("publish", f"s3://{s3_bucket}/docs", *common, env=s3_server.env())
    assert sent.returncode == 0, sent.stderr
    assert "published 3 document events" in sent.stdout
    found = events(kafka_bootstrap, topics.input)
    keys = ["docs", "docs/a.txt", "docs/sub dir/b+c ü.md"]
    assert [k for k, _ in found] == [f"{s3_bucket}/{k}".encode() for k in keys]
    for (_, event), key, size in zip(found, keys, (31, 5, 8)):
        uri = f"s3://{s3_bucket}/{key}"
        assert (event["doc_id"], event["uri"], event["op"], event["content"]) == (uri, uri, "UPSERT", None)
        assert event["filename"] == key.rsplit("/", 1)[-1]
        assert event["metadata"]["s3.size"] == str(size) and event["metadata"]["s3.eTag"]

    # A trailing slash names the prefix only; --json writes the same events as JSON.
    again = cli("publish", f"s3://{s3_bucket}/docs/", "--json", *common, env=s3_server.env())
    assert again.returncode == 0, again.stderr
    raw = [m.value() for _, _, m in read_all(Settings(brokers=kafka_bootstrap), topics.input)][3:]
    assert [json.loads(v)["doc_id"] for v in raw] == [f"s3://{s3_bucket}/{k}" for k in keys[1:]]


def test_publish_delete_lists_the_same_way_and_names_a_gone_object(kafka_bootstrap, s3_server, s3_bucket):
    put(s3_server, s3_bucket, {"docs/a.txt": b"a", "docs/b.txt": b"b"})
    topics = FlowTopics(kafka_bootstrap)
    common = ["--brokers", kafka_bootstrap, "--topic", topics.input, "--quiet", "--delete"]
    gone = cli(
        "publish", f"s3://{s3_bucket}/docs/", f"s3://{s3_bucket}/old/gone.pdf", *common, env=s3_server.env()
    )
    assert gone.returncode == 0, gone.stderr
    found = [(k, e["doc_id"], e["op"], e["uri"]) for k, e in events(kafka_bootstrap, topics.input)]
    assert found == [
        (f"{s3_bucket}/{k}".encode(), f"s3://{s3_bucket}/{k}", "DELETE", None)
        for k in ("docs/a.txt", "docs/b.txt", "old/gone.pdf")
    ]


def test_publish_says_why_it_cannot_list(kafka_bootstrap, s3_server, s3_bucket):
    topics = FlowTopics(kafka_bootstrap)
    common = ["--brokers", kafka_bootstrap, "--topic", topics.input, "--quiet"]
    missing = cli("publish", "s3://no-such-bucket-here/", *common, env=s3_server.env())
    assert missing.returncode == 1 and "listing failed after 0 events" in missing.stderr, missing.stderr
    wrong = cli(
        "publish",
        f"s3://{s3_bucket}/",
        *common,
        env={**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"},
    )
    assert wrong.returncode == 1 and "listing failed" in wrong.stderr, wrong.stderr
    assert "wrong-secret" not in wrong.stderr + wrong.stdout  # credentials are never shown
    mixed = cli("publish", f"s3://{s3_bucket}/", "--doc-id-prefix", "x/", *common, env=s3_server.env())
    assert mixed.returncode == 2 and "doc_id is its URI" in mixed.stderr
    bogus = cli("publish", f"s3://{s3_bucket}/", "--object-store", "bogus=1", *common, env=s3_server.env())
    assert bogus.returncode == 2 and "'bogus'" in bogus.stderr, bogus.stderr
    assert events(kafka_bootstrap, topics.input) == []


def test_a_bucket_indexed_by_backfill_then_kept_in_step_by_its_notifications(
    kafka_bootstrap, s3_server, s3_bucket, tmp_path
):
    """`publish s3://…` indexes what the bucket holds (every extracted format, and an image
    that becomes a dead letter without an image model); then an overwrite, a delete and a
    new object arrive as S3 notifications keyed bucket/key, as MinIO keys them, with a
    test event last in each partition. The sink's store holds exactly the bucket's text
    documents, at their current versions, after each step. (The test event as the last
    message of a partition also proves the group commits past it: `--until-end` ends.)"""
    from test_s3_events import TEST_EVENT, aws_record, notification
    from test_sink import TEXT_SAMPLES, expected, run_sink, store_rows

    env = s3_server.env()
    put(s3_server, s3_bucket, {f"kb/{n}": (SAMPLES / n).read_bytes() for n in [*TEXT_SAMPLES, "diagram.png"]})
    root = f"s3://{s3_bucket}/kb"
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    store = f"lancedb:{tmp_path / 'lance'}"
    sent = cli(
        "publish", f"{root}/", "--brokers", kafka_bootstrap, "--topic", topics.input, "--quiet", env=env
    )
    assert sent.returncode == 0, sent.stderr
    flow = ("--max-tokens", "48", "--allow-uri", f"s3://{s3_bucket}/")
    first = topics.run(*flow, env=env)
    assert "6 events (5 embedded, 0 deleted, 1 dead letters)" in first.stderr
    assert "6 documents fetched" in first.stderr  # the image too: its dead letter comes later
    [(_, letter, _)] = topics.read(topics.dlq)
    assert (letter["doc_id"], letter["reason"]) == (f"{root}/diagram.png", "no_model_for_type")
    run_sink(topics, store, "--from", "beginning")
    rows = store_rows(store)
    assert {r["doc_id"] for r in rows.values()} == {f"{root}/{n}" for n in TEXT_SAMPLES}
    assert rows == expected(topics)

    notes = put(s3_server, s3_bucket, {"kb/notes.txt": b"Notes, second edition: the broker was replaced."})
    fresh = put(s3_server, s3_bucket, {"kb/new file.txt": b"A new document about vector search."})
    import obstore

    obstore.delete(bucket_store(s3_server, s3_bucket), "kb/guide.md")
    changes = [
        aws_record("ObjectCreated:Put", s3_bucket, "kb/notes.txt", version=notes["kb/notes.txt"]),
        aws_record("ObjectRemoved:DeleteMarkerCreated", s3_bucket, "kb/guide.md"),
        aws_record("ObjectCreated:Put", s3_bucket, "kb/new file.txt", version=fresh["kb/new file.txt"]),
    ]
    topics.produce([(f"{s3_bucket}/{r['s3']['object']['key']}".encode(), notification(r)) for r in changes])
    for partition in range(2):
        topics.produce([(None, TEST_EVENT)], partition=partition)
    second = topics.run(*flow, env=env)
    assert "5 events (2 embedded, 1 deleted, 0 dead letters, 2 skipped)" in second.stderr, second.stderr[
        -2000:
    ]
    run_sink(topics, store)
    rows = store_rows(store)
    assert rows == expected(topics)
    assert {r["doc_id"] for r in rows.values()} == {
        f"{root}/{n}" for n in [*TEXT_SAMPLES, "new file.txt"] if n != "guide.md"
    }
    assert [r["text"] for r in rows.values() if r["doc_id"] == f"{root}/notes.txt"] == [
        "Notes, second edition: the broker was replaced."
    ]
    assert len(topics.read(topics.dlq)) == 1  # still only the image


def test_publish_waits_out_a_store_that_is_down(kafka_bootstrap, s3_server, s3_bucket):
    put(s3_server, s3_bucket, {f"docs/{i}.txt": b"text" for i in range(3)})
    topics = FlowTopics(kafka_bootstrap)
    s3_server.stop(timeout=0)
    try:
        publish = ["publish", f"s3://{s3_bucket}/docs/", "--topic", topics.input, "--quiet"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *publish, "--brokers", kafka_bootstrap],
            env={**os.environ, **s3_server.env()},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        assert proc.poll() is None  # waiting, not failing
    finally:
        s3_server.start()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "published 3 document events" in out, err[-2000:]
    assert "object_store unavailable" in err
    assert [e["doc_id"] for _, e in events(kafka_bootstrap, topics.input)] == [
        f"s3://{s3_bucket}/docs/{i}.txt" for i in range(3)
    ]


def test_gs_and_az_prefixes_are_listed_the_same_way(kafka_bootstrap, gcs_server, azurite):
    """Through the same code against Google's and Azure's emulators: each object under the
    prefix, by whole segments, as an event naming it by URI."""
    import uuid

    import obstore

    from flows.object_store import ObjectStores

    name = f"b{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(name)
    azurite.create_container(name)
    az = ObjectStores(azurite.options()).store("az", name)
    for key in ("wiki/a b.md", "wiki/sub/c.txt", "wiki-old/d.txt"):
        gcs_server.put(name, key, b"text")
        obstore.put(az, key, b"text")
    topics = FlowTopics(kafka_bootstrap)
    gs_options = (f"google_service_account_key={gcs_server.service_account_key()}", "allow_http=true")
    for scheme, options in (
        ("gs", gs_options),
        ("az", tuple(f"{k}={v}" for k, v in azurite.options().items())),
    ):
        settings = Settings(brokers=kafka_bootstrap, object_store=options)
        assert backfill.publish(settings, topics.input, [f"{scheme}://{name}/wiki"], progress=False) == 2
    found = [(k.decode(), e["doc_id"], e["uri"]) for k, e in events(kafka_bootstrap, topics.input)]
    assert found == [
        (f"{name}/{key}", f"{scheme}://{name}/{key}", f"{scheme}://{name}/{key}")
        for scheme in ("gs", "az")
        for key in ("wiki/a b.md", "wiki/sub/c.txt")
    ]
