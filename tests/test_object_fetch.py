"""Documents fetched from an object store (flows/fetch.py, flows/object_store.py and the
flow's fetch step) against the real local S3 server (SeaweedFS): every extracted format,
concurrency read from the gauge, versions, typed refusals, sizes checked before the
body (bytes counted on the wire), credentials kept out of outputs and logs, and the
store stopped under a batch and started again with nothing lost."""

from __future__ import annotations

import base64
import http.server
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import obstore
import pytest
from obstore.store import S3Store
from s3_helpers import TcpProxy

import operators
from flows import codecs, metrics
from flows.allowlist import UriAllowlist
from flows.embed_steps import Pipeline
from flows.fetch import FetchError, FetchUnavailable, fetch
from flows.kafka.io import InputMessage
from flows.object_store import ObjectStores, parse_options
from flows.settings import Settings
from operators import ExtractorPool

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SAMPLES = ROOT / "flows" / "samples"


@pytest.fixture(scope="module")
def pool():
    with ExtractorPool(2) as pool:
        yield pool


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    """The standard AWS variables point at the local server, as a deployment's would."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def bucket(aws_env, s3_bucket):
    return S3Store(s3_bucket, **aws_env.store_options())


def message(event: dict[str, Any], offset: int = 0) -> InputMessage:
    return InputMessage("documents", 0, offset, event["doc_id"].encode(), codecs.encode_json(event), 1)


def outputs(out) -> list[tuple[str, dict[str, Any]]]:
    return [codecs.decode_output(m.value, m.headers) for m in out if not m.commit_only]


def settings(bucket_name: str, **more: Any) -> Settings:
    return Settings(allowed_uris=(f"s3://{bucket_name}/",), output_format="json", **more)


def counter(c) -> float:
    return c._value.get()


# --- every format, as if it had travelled inline -----------------------------------------------


def test_every_extracted_format_from_a_bucket_embeds_as_if_inline(tiny_bert, pool, aws_env, s3_bucket):
    """Text, Markdown, HTML, PDF, DOCX, an image and recordings: the records of each
    document read from the bucket equal those of the same bytes sent inline."""
    files = {p.name: p.read_bytes() for p in sorted(SAMPLES.iterdir())}
    files["speech.wav"] = (DATA / "audio" / "speech.wav").read_bytes()
    files["speech.mp3"] = (DATA / "audio" / "speech.mp3").read_bytes()
    store = S3Store(s3_bucket, **aws_env.store_options())
    for name, data in files.items():
        obstore.put(store, f"formats/{name}", data)
    p = Pipeline(
        settings(s3_bucket),
        tiny_bert,
        pool=pool,
        image_embedder=operators.ImageEmbedder.load(DATA / "tiny-clip"),
        transcriber=operators.Transcriber.load(DATA / "tiny-whisper"),
    )
    by_uri = [
        message({"doc_id": n, "uri": f"s3://{s3_bucket}/formats/{n}", "filename": n}, i)
        for i, n in enumerate(files)
    ]
    # JSON carries binary content as base64.
    inline = [
        message(
            {
                "doc_id": n,
                "content": base64.b64encode(d).decode(),
                "content_encoding": "base64",
                "filename": n,
            },
            i,
        )
        for i, (n, d) in enumerate(files.items())
    ]
    fetched = outputs(p.process(by_uri))
    assert p.counters.fetched == len(files) and f"{len(files)} documents fetched" in p.counters.line()
    sent = outputs(p.process(inline))

    def comparable(out):
        return [
            (kind, r.get("doc_id"), r.get("chunk_id"), r.get("text"), r.get("modality"), r.get("embedding"))
            for kind, r in out
        ]

    assert comparable(fetched) == comparable(sent)
    kinds = {r["doc_id"]: r["modality"] for kind, r in fetched if kind == "DocManifest"}
    assert kinds == {n: ("image" if n.endswith(".png") else "text") for n in files}, fetched
    assert not [r for kind, r in fetched if kind == "DeadLetter"]


# --- concurrency -------------------------------------------------------------------------------


def test_a_batch_of_200_objects_is_fetched_many_at_once(tiny_bert, pool, aws_env, bucket, s3_bucket):
    """Each answer is held back 50 ms on the way: fetched one after another, 200 would
    take 10 s; the gauge shows at least 8 in flight, never more than the setting."""
    for i in range(200):
        obstore.put(bucket, f"many/{i:03}.txt", f"document number {i} about object stores".encode())
    with TcpProxy(aws_env.port, delay_s=0.05) as proxy:
        p = Pipeline(
            settings(s3_bucket, fetch_concurrency=16, object_store=(f"aws_endpoint={proxy.endpoint}",)),
            tiny_bert,
            pool=pool,
        )
        events = [
            message({"doc_id": f"d{i}", "uri": f"s3://{s3_bucket}/many/{i:03}.txt", "filename": "a.txt"}, i)
            for i in range(200)
        ]
        seen: list[float] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.append(metrics.FETCHES_IN_FLIGHT._value.get())
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            out = outputs(p.process(events))
        finally:
            done.set()
            watcher.join()
    manifests = [r for kind, r in out if kind == "DocManifest"]
    assert len(manifests) == 200 and p.counters.fetched == 200
    assert 8 <= max(seen) <= 16, max(seen)
    assert metrics.FETCHES_IN_FLIGHT._value.get() == 0


# --- versions, refusals, sizes -----------------------------------------------------------------


def test_a_version_is_read_as_it_was_after_an_overwrite(aws_env, bucket, s3_bucket):
    first = obstore.put(bucket, "v.txt", b"the first version")["version"]
    obstore.put(bucket, "v.txt", b"the second version, written after the notification")
    allow = UriAllowlist([f"s3://{s3_bucket}"])
    read = dict(roots=[], max_bytes=1000, allowlist=allow, stores=ObjectStores())
    assert fetch(f"s3://{s3_bucket}/v.txt", version=first, **read) == b"the first version"
    assert fetch(f"s3://{s3_bucket}/v.txt", **read).startswith(b"the second")
    with pytest.raises(FetchError) as refused:
        fetch(f"s3://{s3_bucket}/v.txt", version="0" * 32, **read)
    assert refused.value.reason == "not_found"


def test_missing_objects_and_wrong_credentials_are_typed_dead_letters(
    tiny_bert, pool, aws_env, bucket, s3_bucket, caplog
):
    obstore.put(bucket, "here.txt", b"a document that exists")
    events = [
        message({"doc_id": "gone", "uri": f"s3://{s3_bucket}/gone.txt"}, 0),
        message({"doc_id": "dots", "uri": f"s3://{s3_bucket}/../x"}, 1),
        message({"doc_id": "here", "uri": f"s3://{s3_bucket}/here.txt"}, 2),
    ]
    out = outputs(Pipeline(settings(s3_bucket), tiny_bert, pool=pool).process(events))
    letters = [(r["doc_id"], r["stage"], r["reason"]) for kind, r in out if kind == "DeadLetter"]
    assert letters == [("gone", "fetch", "not_found"), ("dots", "fetch", "uri_not_allowed")]
    assert [r["doc_id"] for kind, r in out if kind == "DocManifest"] == ["here"]

    secret = f"not-the-secret-{uuid.uuid4().hex}"
    wrong = settings(s3_bucket, object_store=(f"aws_secret_access_key={secret}",))
    assert secret not in repr(wrong.redacted())
    with caplog.at_level("DEBUG"):
        raw = Pipeline(wrong, tiny_bert, pool=pool).process([events[2]])
    [(kind, letter)] = outputs(raw)
    assert (kind, letter["stage"], letter["reason"]) == ("DeadLetter", "fetch", "forbidden")
    assert "SignatureDoesNotMatch" in letter["message"]
    assert all(secret.encode() not in m.value for m in raw)
    assert secret not in caplog.text and aws_env.secret_key not in caplog.text


def test_an_oversized_object_is_refused_before_its_body_is_read(aws_env, bucket, s3_bucket):
    """Counted on the wire: a 4 MiB object over a 64 KiB limit costs its headers and at
    most the limit plus one byte, never the object."""
    limit = 64 * 1024
    obstore.put(bucket, "huge.bin", os.urandom(4 * 1024 * 1024))
    obstore.put(bucket, "exact.bin", b"x" * limit)
    obstore.put(bucket, "over.bin", b"x" * (limit + 1))
    obstore.put(bucket, "empty.txt", b"")
    with TcpProxy(aws_env.port) as proxy:
        stores = ObjectStores({"aws_endpoint": proxy.endpoint})
        read = dict(roots=[], max_bytes=limit, allowlist=UriAllowlist([f"s3://{s3_bucket}"]), stores=stores)
        with pytest.raises(FetchError) as refused:
            fetch(f"s3://{s3_bucket}/huge.bin", **read)
        assert refused.value.reason == "too_large" and "4194304 bytes" in refused.value.message
        assert proxy.to_client < limit + 1 + 4096, proxy.to_client
        assert len(fetch(f"s3://{s3_bucket}/exact.bin", **read)) == limit
        with pytest.raises(FetchError, match="over the limit") as over:
            fetch(f"s3://{s3_bucket}/over.bin", **read)
        assert over.value.reason == "too_large"
        assert fetch(f"s3://{s3_bucket}/empty.txt", **read) == b""


def test_a_bucket_named_only_as_a_string_prefix_is_never_asked(tiny_bert, pool, aws_env, s3_bucket):
    """s3://docs allows bucket docs, never docs-private: the store is not even asked."""
    aws_env.create_bucket(f"{s3_bucket}-private")
    obstore.put(S3Store(f"{s3_bucket}-private", **aws_env.store_options()), "secret.txt", b"private")
    with TcpProxy(aws_env.port) as proxy:
        s = Settings(
            allowed_uris=(f"s3://{s3_bucket}",),
            object_store=(f"aws_endpoint={proxy.endpoint}",),
            output_format="json",
        )
        out = outputs(
            Pipeline(s, tiny_bert, pool=pool).process(
                [message({"doc_id": "p", "uri": f"s3://{s3_bucket}-private/secret.txt"})]
            )
        )
        assert proxy.connections == 0
    [(kind, letter)] = out
    assert (kind, letter["reason"]) == ("DeadLetter", "uri_not_allowed")
    # Without any --allow-uri, no object URI is fetched at all.
    with pytest.raises(FetchError, match="no URI prefixes are allowed"):
        fetch(f"s3://{s3_bucket}/x", roots=[], max_bytes=10)


def test_object_store_keys_are_checked_and_routed():
    assert parse_options({"AWS_Region": "eu-west-1", "timeout": "5s"}) == {
        "aws_region": "eu-west-1",
        "timeout": "5s",
    }
    with pytest.raises(ValueError, match="prefix it with aws_, google_ or azure_"):
        parse_options({"region": "eu-west-1"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        Settings(object_store=("aws_region",)).validate()
    env = Settings.from_env({"EMBEDSTREAM_OBJECT_STORE": "aws_endpoint=http://minio:9000,aws_region=x"})
    assert env.object_store_options() == {"aws_endpoint": "http://minio:9000", "aws_region": "x"}
    shown = Settings(object_store=("aws_secret_access_key=abc", "aws_region=x")).redacted()["object_store"]
    assert shown == ["aws_secret_access_key=***", "aws_region=x"]


def test_gs_objects_from_the_gcs_emulator(tiny_bert, pool, gcs_server):
    """gs:// through the same reader, against fake-gcs-server: a document embedded, a
    missing object not_found, a size over the limit refused from the headers."""
    bucket = f"gcs-{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(bucket)
    gcs_server.put(bucket, "notes/a b+c é.txt", b"a document kept in Google Cloud Storage")
    gcs_server.put(bucket, "big.bin", b"x" * 5000)
    s = Settings(
        allowed_uris=(f"gs://{bucket}/",),
        object_store=(f"google_service_account_key={gcs_server.service_account_key()}", "allow_http=true"),
        output_format="json",
        max_document_bytes=4096,
    )
    events = [
        message({"doc_id": "a", "uri": f"gs://{bucket}/notes/a b+c é.txt", "filename": "a.txt"}, 0),
        message({"doc_id": "gone", "uri": f"gs://{bucket}/gone.txt"}, 1),
        message({"doc_id": "big", "uri": f"gs://{bucket}/big.bin"}, 2),
        message({"doc_id": "other", "uri": f"gs://{bucket}-other/a.txt"}, 3),
    ]
    out = outputs(Pipeline(s, tiny_bert, pool=pool).process(events))
    [record] = [r for kind, r in out if kind == "VectorRecord"]
    assert record["doc_id"] == "a" and record["text"] == "a document kept in Google Cloud Storage"
    letters = {r["doc_id"]: r["reason"] for kind, r in out if kind == "DeadLetter"}
    assert letters == {"gone": "not_found", "big": "too_large", "other": "uri_not_allowed"}


def test_az_and_abfs_blobs_from_azurite(tiny_bert, pool, azurite):
    """az:// and abfs:// through the same reader, against Azurite: a blob embedded under
    both forms, a missing blob not_found, a wrong account key forbidden."""
    container = f"c{uuid.uuid4().hex[:12]}"
    azurite.create_container(container)
    stores = ObjectStores(azurite.options())
    obstore.put(stores.store("az", container), "notes/a b+c é.txt", b"a document kept in Azure Blob Storage")
    abfs = f"abfs://{container}@{azurite.options()['azure_storage_account_name']}.dfs.core.windows.net"
    s = Settings(
        allowed_uris=(f"az://{container}/", f"{abfs}/"),
        object_store=tuple(f"{k}={v}" for k, v in azurite.options().items()),
        output_format="json",
    )
    events = [
        message({"doc_id": "az", "uri": f"az://{container}/notes/a b+c é.txt", "filename": "a.txt"}, 0),
        message({"doc_id": "abfs", "uri": f"{abfs}/notes/a b+c é.txt", "filename": "a.txt"}, 1),
        message({"doc_id": "gone", "uri": f"az://{container}/gone.txt"}, 2),
    ]
    out = outputs(Pipeline(s, tiny_bert, pool=pool).process(events))
    texts = {r["doc_id"]: r["text"] for kind, r in out if kind == "VectorRecord"}
    assert texts == {
        "az": "a document kept in Azure Blob Storage",
        "abfs": "a document kept in Azure Blob Storage",
    }
    assert [(r["doc_id"], r["reason"]) for kind, r in out if kind == "DeadLetter"] == [("gone", "not_found")]
    wrong = ObjectStores(azurite.options(key=base64.b64encode(b"not the key").decode()))
    with pytest.raises(FetchError) as refused:
        fetch(
            f"az://{container}/notes/a b+c é.txt",
            roots=[],
            max_bytes=100,
            allowlist=UriAllowlist([f"az://{container}"]),
            stores=wrong,
        )
    assert refused.value.reason == "forbidden"


def test_an_unreachable_store_is_an_outage_not_a_dead_letter():
    """Nothing listens at the Azure endpoint: FetchUnavailable, which the flow waits out."""
    allow = UriAllowlist(["az://docs"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and nobody listens once closed
    stores = ObjectStores(
        {
            "azure_storage_account_name": "devstoreaccount1",
            "azure_storage_account_key": "a2V5",
            "azure_storage_endpoint": f"http://127.0.0.1:{port}/devstoreaccount1",
            "allow_http": "true",
        }
    )
    with pytest.raises(FetchUnavailable, match="unavailable"):
        fetch("az://docs/x", roots=[], max_bytes=10, allowlist=allow, stores=stores)


@pytest.mark.parametrize(
    "status, code, outcome",
    [
        (503, "SlowDown", "unavailable"),
        (429, "TooManyRequests", "unavailable"),
        (500, "InternalError", "unavailable"),
        (400, "InvalidRequest", "fetch_failed"),
        (403, "AccessDenied", "forbidden"),
    ],
)
def test_what_a_store_answers_is_typed(status, code, outcome):
    """An S3 endpoint that answers every request with one error, as S3 writes it."""
    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>m</Message></Error>".encode()

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        stores = ObjectStores(_local_s3(f"http://127.0.0.1:{server.server_address[1]}"))
        try:
            fetch("s3://docs/x", roots=[], max_bytes=10, allowlist=UriAllowlist(["s3://docs"]), stores=stores)
        except FetchUnavailable as e:
            got, message = "unavailable", str(e)
        except FetchError as e:
            got, message = e.reason, e.message
        finally:
            server.shutdown()
    assert (got, f"HTTP {status} {code}" in message) == (outcome, True), message


@pytest.mark.parametrize("status, expected", [(403, FetchError), (500, FetchUnavailable)])
def test_a_credential_chain_that_fails_says_so(status, expected, monkeypatch):
    """No keys in the environment: object_store asks the instance metadata endpoint (here
    a local server that refuses, or fails): the message names it, not the object."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)

    class Metadata(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_PUT = answer

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata) as metadata:
        threading.Thread(target=metadata.serve_forever, daemon=True).start()
        stores = ObjectStores(
            {
                "aws_endpoint": "http://127.0.0.1:9",
                "aws_region": "us-east-1",
                "aws_metadata_endpoint": f"http://127.0.0.1:{metadata.server_address[1]}",
                "allow_http": "true",
            }
        )
        try:
            with pytest.raises(
                expected, match=f"credentials not obtained from http://127.0.0.1:.*HTTP {status}"
            ):
                fetch(
                    "s3://docs/x",
                    roots=[],
                    max_bytes=10,
                    allowlist=UriAllowlist(["s3://docs"]),
                    stores=stores,
                )
        finally:
            metadata.shutdown()


def test_a_store_that_never_answers_times_out():
    """It accepts the connection and says nothing: the fetch ends at its timeout, as an
    outage (retried), not a dead letter and not a hang."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        stores = ObjectStores(_local_s3(f"http://127.0.0.1:{silent.getsockname()[1]}"), timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(FetchUnavailable, match="timed out"):
            fetch("s3://docs/x", roots=[], max_bytes=10, allowlist=UriAllowlist(["s3://docs"]), stores=stores)
        assert time.monotonic() - started < 10


def _local_s3(endpoint: str) -> dict[str, str]:
    return {
        "aws_endpoint": endpoint,
        "aws_access_key_id": "k",
        "aws_secret_access_key": "s",
        "aws_region": "us-east-1",
        "allow_http": "true",
    }


# --- the store down under a batch --------------------------------------------------------------


def test_the_store_stopped_mid_batch_and_started_again_loses_nothing(
    tiny_bert, pool, aws_env, bucket, s3_bucket
):
    """The server is killed while the batch's fetches are in flight and started again a
    few seconds later: the batch waits (an outage, counted), then completes, every
    document embedded, no dead letter."""
    n = 40
    for i in range(n):
        obstore.put(bucket, f"down/{i:02}.txt", f"document {i} survives the outage".encode())
    waits = counter(metrics.OUTAGE_WAITS.labels("object store"))
    retries = counter(metrics.FETCH_RETRIES.labels("s3"))
    ok = counter(metrics.FETCHES.labels("s3", "ok"))
    with TcpProxy(aws_env.port, delay_s=0.1) as proxy:
        p = Pipeline(
            settings(s3_bucket, fetch_concurrency=4, object_store=(f"aws_endpoint={proxy.endpoint}",)),
            tiny_bert,
            pool=pool,
        )
        events = [
            message({"doc_id": f"d{i}", "uri": f"s3://{s3_bucket}/down/{i:02}.txt"}, i) for i in range(n)
        ]
        result: list[Any] = []
        batch = threading.Thread(target=lambda: result.append(p.process(events)))
        batch.start()
        deadline = time.monotonic() + 60
        while counter(metrics.FETCHES.labels("s3", "ok")) < ok + 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        aws_env.stop(timeout=0)  # killed, mid-batch
        time.sleep(3)
        assert batch.is_alive()  # waiting, not failing
        aws_env.start()
        batch.join(timeout=120)
        assert not batch.is_alive()
    out = outputs(result[0])
    assert not [r for kind, r in out if kind == "DeadLetter"]
    assert sorted(r["doc_id"] for kind, r in out if kind == "DocManifest") == sorted(
        f"d{i}" for i in range(n)
    )
    assert counter(metrics.OUTAGE_WAITS.labels("object store")) > waits
    assert counter(metrics.FETCH_RETRIES.labels("s3")) > retries


def test_a_document_unavailable_and_then_refused_ends_as_its_dead_letter(tiny_bert, pool):
    """The store throttles (503 SlowDown) past the quick retries, so the batch waits; then
    it answers 404. The wait ends with the document's not_found dead letter, and the
    batch completes (it once waited forever: the refused document stayed 'unavailable')."""
    asked = []

    class Throttled(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            status, code = (503, "SlowDown") if len(asked) <= 4 else (404, "NoSuchKey")
            body = f"<?xml version='1.0'?><Error><Code>{code}</Code></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Throttled) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        options = tuple(f"{k}={v}" for k, v in _local_s3(endpoint).items())
        p = Pipeline(settings("docs", object_store=options), tiny_bert, pool=pool)
        result: list[Any] = []
        batch = threading.Thread(
            target=lambda: result.append(
                p.process([message({"doc_id": "gone", "uri": "s3://docs/gone.txt"})])
            )
        )
        batch.start()
        batch.join(timeout=60)
        server.shutdown()
    assert not batch.is_alive(), "the batch still waits for a document the store refused"
    assert len(asked) > 4  # the wait asked again after the quick retries
    letters = [r for kind, r in outputs(result[0]) if kind == "DeadLetter"]
    assert [(r["doc_id"], r["reason"]) for r in letters] == [("gone", "not_found")]
