"""`embedstream serve` as a client sees it: the real server in a subprocess, the official
`openai` package and plain HTTP as clients. Vectors equal the library's for every shape
of request, concurrent requests share model calls, overload and bad input get 4xx in
OpenAI's error shape while the server keeps serving, SIGTERM drains what is in flight,
and /search reads a store while `embedstream sink` writes it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
import openai
import pytest
from conftest import DATA
from kafka_helpers import FlowTopics, free_port
from test_serve_batching import mismatched_copy

from operators import Embedder

KEY = "test-key-7f3a"
PROMPTED = DATA / "tiny-prompted"  # prompts: query "query: ", document "passage: " (the default)


class Server:
    """`embedstream serve` on a free port of the loopback."""

    def __init__(self, *args: str, env: Optional[dict[str, str]] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **(env or {})}
        if "--store" not in args:
            full_env.pop("EMBEDSTREAM_STORE", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--port", str(self.port), *args],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.output)[-3000:]
            try:
                if get(self.url + "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not become ready: " + "".join(self.output)[-3000:])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", KEY), max_retries=0, **kw)

    def metric(self, name: str) -> float:
        """The sum of a metric's samples on /metrics."""
        _, text = get(self.url + "/metrics")
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.decode().splitlines()
            if line.startswith(name) and line[len(name)] in " {"
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def request(
    url: str, body: Any = None, *, raw: Optional[bytes] = None, key: Optional[str] = KEY, method: str = "POST"
) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def get(url: str) -> tuple[int, bytes]:
    status, _, body = request(url, key=None, method="GET")
    return status, body


def error_of(body: bytes) -> dict[str, Any]:
    """OpenAI's error object, checked for its shape."""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "Traceback" not in error["message"]
    return error


@pytest.fixture(scope="module")
def minilm_server():
    server = Server(env={"EMBEDSTREAM_SERVE_API_KEY": KEY})
    yield server
    assert server.stop() == 0
    log = "".join(server.output)
    assert "API key: required" in log and KEY not in log  # the key never reaches the log


@pytest.fixture(scope="module")
def prompted_server():
    server = Server(
        "--model",
        str(PROMPTED),
        env={"EMBEDSTREAM_SERVE_API_KEY": KEY, "EMBEDSTREAM_SERVE_MATRYOSHKA": "true"},
    )
    yield server
    assert server.stop() == 0


def same(got: Any, want: np.ndarray) -> None:
    """Vectors equal to the library's: bit for bit, or within f32 rounding."""
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert np.all(cosine >= 1 - 1e-6)


# --- the OpenAI client ---------------------------------------------------------------------------


def test_the_openai_client_gets_the_librarys_vectors(minilm_server, minilm):
    client = minilm_server.client()
    one = client.embeddings.create(
        model="sentence-transformers/all-MiniLM-L6-v2", input="Kafka carries events."
    )
    # The client asks for base64 by default and decodes it.
    assert one.model == "sentence-transformers/all-MiniLM-L6-v2" and len(one.data) == 1
    same([one.data[0].embedding], minilm.embed(["Kafka carries events."]))
    assert (
        one.usage.prompt_tokens == one.usage.total_tokens == minilm.count_tokens(["Kafka carries events."])[0]
    )

    texts = ["first text", "a second, longer text about vector stores", "", "ünïcödé ✓"]
    many = client.embeddings.create(model="default", input=texts, encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2, 3]
    same([d.embedding for d in many.data], minilm.embed(texts))

    raw = client.embeddings.create(model="default", input=texts, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    assert np.array_equal(np.stack(decoded), minilm.embed(texts))  # the bytes of the library's floats

    models = client.models.list()
    assert [m.id for m in models.data] == ["sentence-transformers/all-MiniLM-L6-v2"]


def test_input_types_select_the_models_prompts_and_dimensions_shorten(prompted_server):
    embedder = Embedder.load(PROMPTED)
    client = prompted_server.client()
    texts = ["Streaming embeddings for data platforms.", "where do vectors go?"]

    def create(**kw: Any) -> np.ndarray:
        got = client.embeddings.create(model="tiny-prompted", input=texts, **kw)
        return np.array([d.embedding for d in got.data], dtype=np.float32)

    query = embedder.embed(texts, prompt_name="query")
    document = embedder.embed(texts, prompt_name="document")
    same(create(extra_body={"input_type": "query"}), query)
    same(create(extra_body={"input_type": "search_query"}), query)
    same(create(extra_body={"input_type": "document"}), document)
    same(create(extra_body={"input_type": "search_document"}), document)
    same(create(), embedder.embed(texts))  # the model's default prompt
    assert not np.allclose(query, document, atol=1e-3)

    # Matryoshka: the first dimensions, as the library's truncate_dim (not re-normalised).
    short = create(dimensions=8, extra_body={"input_type": "query"})
    same(short, Embedder.load(PROMPTED, truncate_dim=8).embed(texts, prompt_name="query"))
    status, _, body = request(
        prompted_server.url + "/v1/embeddings", {"input": "x", "dimensions": 17, "model": "tiny-prompted"}
    )
    assert status == 400 and error_of(body)["param"] == "dimensions"


def test_dimensions_are_refused_for_a_model_not_trained_for_them(minilm_server):
    with pytest.raises(openai.BadRequestError) as refused:
        minilm_server.client().embeddings.create(model="default", input="x", dimensions=128)
    assert "Matryoshka" in refused.value.message
    full = minilm_server.client().embeddings.create(model="default", input="x", dimensions=384)
    assert len(full.data[0].embedding) == 384


# --- batching ----------------------------------------------------------------------------------


def test_64_concurrent_requests_share_model_calls_and_get_their_own_vectors(minilm_server, minilm):
    texts = [f"request {i}: " + "streaming vectors " * (1 + i % 7) for i in range(64)]
    calls_before = minilm_server.metric("embedstream_serve_model_calls_total")

    async def all_at_once() -> list[list[float]]:
        client = openai.AsyncOpenAI(base_url=minilm_server.url + "/v1", api_key=KEY, max_retries=0)
        async with client:
            answers = await asyncio.gather(
                *(client.embeddings.create(model="default", input=t, encoding_format="float") for t in texts)
            )
        return [a.data[0].embedding for a in answers]

    got = asyncio.run(all_at_once())
    same(got, minilm.embed(texts))
    calls = minilm_server.metric("embedstream_serve_model_calls_total") - calls_before
    assert 1 <= calls < 64, calls
    assert minilm_server.metric("embedstream_serve_batch_requests_count") >= calls


def test_the_event_loop_answers_while_a_batch_computes(minilm_server):
    """The model call releases the GIL: probes are answered while a long batch runs."""
    big = {"input": ["a long text about streaming embeddings and vector stores " * 12] * 48}
    done = threading.Event()
    answer: list[int] = []

    def send() -> None:
        answer.append(request(minilm_server.url + "/v1/embeddings", big)[0])
        done.set()

    started = minilm_server.metric("embedstream_serve_queue_seconds_count")
    threading.Thread(target=send).start()
    while minilm_server.metric("embedstream_serve_queue_seconds_count") == started and not done.is_set():
        time.sleep(0.01)  # until the batch has reached the model
    answered_meanwhile = 0
    while not done.is_set():
        if get(minilm_server.url + "/healthz")[0] == 200 and not done.is_set():
            answered_meanwhile += 1
    assert answer == [200]
    assert answered_meanwhile >= 1


def test_overload_gets_429_with_retry_after_and_the_server_keeps_serving(minilm):
    server = Server(env={"EMBEDSTREAM_SERVE_QUEUE_TOKENS": "600", "EMBEDSTREAM_SERVE_BATCH_TOKENS": "600"})
    try:
        body = {"input": ["several words of text for the model to read " * 6] * 8}  # ~600 tokens

        with ThreadPoolExecutor(24) as pool:
            answers = list(
                pool.map(lambda _: request(server.url + "/v1/embeddings", body, key=None), range(24))
            )
        statuses = sorted(a[0] for a in answers)
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
        refused = [a for a in answers if a[0] == 429]
        for _, headers, raw in refused:
            assert int(headers["retry-after"]) >= 1
            assert error_of(raw)["code"] == "queue_full"
        assert server.metric("embedstream_serve_rejected_total") == len(refused)
        # Still serving, with the right vectors.
        status, _, raw = request(server.url + "/v1/embeddings", {"input": "after the burst"}, key=None)
        assert status == 200
        same([json.loads(raw)["data"][0]["embedding"]], minilm.embed(["after the burst"]))
    finally:
        assert server.stop() == 0


# --- limits, bad input, keys --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"\xff\xfe", 400, None),
        ([1, 2], 400, None),
        ({"input": 5}, 400, "input"),
        ({"input": {"text": "x"}}, 400, "input"),
        ({"input": ["ok", None]}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({}, 400, "input"),
        ({"input": ["x"] * 100_000}, 400, "input"),
        ({"input": [1, 2, 3]}, 400, "input"),
        ({"input": [[101, 2023, 102]]}, 400, "input"),
        ({"input": "x", "model": "text-embedding-3-small"}, 404, "model"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x", "dimensions": "8"}, 400, "dimensions"),
        ({"input": "x", "dimensions": 0}, 400, "dimensions"),
        ({"input": "x", "input_type": "passage"}, 400, "input_type"),
        ({"input": "x", "inputs": "y"}, 400, "inputs"),
        (b'{"input": ["fine", "a lone surrogate \\ud800"]}', 400, "input"),
        (b"[" * 100_000 + b"]" * 100_000, 400, None),
    ],
)
def test_bad_input_gets_a_4xx_in_openais_shape(minilm_server, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, headers, answer = request(minilm_server.url + "/v1/embeddings", raw=raw)
    assert got == status, answer
    assert headers["content-type"] == "application/json"
    error = error_of(answer)
    assert error["param"] == param
    if body == {"input": [[101, 2023, 102]]} or body == {"input": [1, 2, 3]}:
        assert error["code"] == "token_ids_not_supported" and "token ids" in error["message"]


def test_one_10_mb_string_is_refused_and_the_server_survives(minilm_server):
    huge = {"input": "x" * (10 * 1024 * 1024)}
    status, _, body = request(minilm_server.url + "/v1/embeddings", huge)
    assert status == 413 and error_of(body)["code"] == "body_too_large"
    long_input = {"input": ["y" * 70_000]}  # under the body limit, over the characters per input
    status, _, body = request(minilm_server.url + "/v1/embeddings", long_input)
    assert status == 413 and error_of(body)["code"] == "input_too_long"
    status, _, _ = request(minilm_server.url + "/v1/embeddings", {"input": "still here"})
    assert status == 200


def test_an_input_over_the_models_tokens_is_truncated_and_the_header_says_so(minilm_server, minilm):
    long = "tokens " * 600  # MiniLM reads 256
    status, headers, body = request(minilm_server.url + "/v1/embeddings", {"input": [long, "short"]})
    assert status == 200 and headers["x-embedstream-truncated-inputs"] == "1"
    answer = json.loads(body)
    same([d["embedding"] for d in answer["data"]], minilm.embed([long, "short"]))
    assert answer["usage"]["prompt_tokens"] == 256 + minilm.count_tokens(["short"])[0]
    status, headers, _ = request(minilm_server.url + "/v1/embeddings", {"input": "short"})
    assert "x-embedstream-truncated-inputs" not in headers


@pytest.fixture(scope="module")
def strict_server():
    """No truncation, a one-second timeout, and browsers of one origin allowed."""
    server = Server(
        "--no-truncate-input",
        env={"EMBEDSTREAM_SERVE_TIMEOUT_S": "1", "EMBEDSTREAM_SERVE_CORS_ORIGINS": "https://app.example.com"},
    )
    yield server
    assert server.stop() == 0


def test_no_truncate_input_refuses_long_inputs_with_413(strict_server):
    url = strict_server.url + "/v1/embeddings"
    status, _, body = request(url, {"input": ["fine", "word " * 300]}, key=None)
    assert status == 413
    error = error_of(body)
    assert error["code"] == "input_too_long" and "input[1] has 302 tokens" in error["message"]
    assert request(url, {"input": "fine"}, key=None)[0] == 200


def test_a_request_past_its_timeout_gets_503_and_never_reaches_the_model_if_it_waited(strict_server):
    url = strict_server.url + "/v1/embeddings"
    calls = strict_server.metric("embedstream_serve_model_calls_total")
    long = {"input": ["several words of text for the model to read " * 20] * 64}  # seconds of work
    started = strict_server.metric("embedstream_serve_queue_seconds_count")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(request, url, long, key=None)
        while strict_server.metric("embedstream_serve_queue_seconds_count") == started:
            time.sleep(0.01)  # until the long batch is in the model
        waiting = pool.submit(request, url, {"input": "queued behind it"}, key=None)
        answers = [first.result(), waiting.result()]
    for status, headers, body in answers:
        assert status == 503 and headers["retry-after"] == "1"
        assert error_of(body)["code"] == "timeout"
    assert strict_server.metric('embedstream_serve_rejected_total{reason="timeout"}') == 2
    deadline = time.monotonic() + 60
    while strict_server.metric("embedstream_serve_model_calls_total") == calls:  # the abandoned batch
        assert time.monotonic() < deadline
        time.sleep(0.1)
    status, _, body = request(url, {"input": "after the timeouts"}, key=None)
    assert status == 200
    # The big batch and this one: the request that timed out while waiting was never computed.
    assert strict_server.metric("embedstream_serve_model_calls_total") - calls == 2


def test_a_body_that_does_not_arrive_in_time_gets_408(strict_server):
    import socket

    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"input": "half a bo'
        )
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"content-length: (\d+)", answer, re.I).group(1)
        ):
            more = sock.recv(65536)
            assert more, answer
            answer += more
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert error_of(body)["code"] == "timeout"
    assert request(strict_server.url + "/v1/embeddings", {"input": "next"}, key=None)[0] == 200


def test_cors_only_for_the_origins_given(strict_server, minilm_server):
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    for server, allowed in ((strict_server, True), (minilm_server, False)):
        req = urllib.request.Request(server.url + "/v1/embeddings", headers=preflight, method="OPTIONS")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                headers = {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            headers = {k.lower(): v for k, v in e.headers.items()}
        got = headers.get("access-control-allow-origin")
        assert got == ("https://app.example.com" if allowed else None), (server.url, headers)
    req = urllib.request.Request(
        strict_server.url + "/v1/embeddings",
        data=b'{"input": "x"}',
        headers={"Origin": "https://evil.example.com", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert "access-control-allow-origin" not in {k.lower() for k in r.headers}


def test_the_api_key_is_required_and_checked(minilm_server):
    url = minilm_server.url + "/v1/embeddings"
    for key in (None, "wrong", KEY + "x", ""):
        status, headers, body = request(url, {"input": "x"}, key=key)
        assert status == 401 and error_of(body)["code"] == "invalid_api_key", key
        assert headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        minilm_server.client(api_key="wrong").embeddings.create(model="default", input="x")
    # The probes and /metrics need no key; nothing else is open.
    assert get(minilm_server.url + "/healthz")[0] == 200 and get(minilm_server.url + "/metrics")[0] == 200
    assert request(minilm_server.url + "/v1/models", key=None, method="GET")[0] == 401


def test_without_a_store_search_is_404_and_there_is_no_cors(minilm_server):
    status, headers, body = request(minilm_server.url + "/search", {"query": "anything"})
    assert status == 404
    error = error_of(body)
    assert error["code"] == "no_store" and "--store" in error["message"]
    assert not any(k.startswith("access-control") for k in headers)
    status, _, body = request(minilm_server.url + "/nowhere", method="GET")
    assert status == 404 and error_of(body)["type"] == "not_found_error"
    assert get(minilm_server.url + "/nowhere")[0] == 401  # without the key, nothing is told


def test_metrics_count_requests_by_route_and_status(minilm_server):
    request(minilm_server.url + "/v1/embeddings", {"input": "count me"})
    _, text = get(minilm_server.url + "/metrics")
    metrics = text.decode()
    assert 'embedstream_serve_requests_total{route="/v1/embeddings",status="200"}' in metrics
    assert 'embedstream_serve_requests_total{route="/v1/embeddings",status="400"}' in metrics
    for name in (
        "embedstream_serve_request_seconds_bucket",
        "embedstream_serve_batch_inputs_bucket",
        "embedstream_serve_queue_tokens",
        "embedstream_serve_tokens_total",
    ):
        assert name in metrics, name


# --- SIGTERM ---------------------------------------------------------------------------------------


def test_sigterm_drains_the_requests_in_flight(minilm):
    server = Server()
    texts = ["a text about draining the requests in flight " * 8] * 48
    answers: list[tuple[int, dict[str, str], bytes]] = []

    def send() -> None:
        answers.append(request(server.url + "/v1/embeddings", {"input": texts}, key=None))

    senders = [threading.Thread(target=send) for _ in range(6)]
    for t in senders:
        t.start()
    deadline = time.monotonic() + 30
    # Every request has reached the batcher (waiting, or in a model call) before the signal.
    while (
        server.metric("embedstream_serve_queue_requests")
        + server.metric("embedstream_serve_queue_seconds_count")
        < 6
    ):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    for t in senders:
        t.join(timeout=120)
    assert server.proc.wait(timeout=60) == 0
    assert [a[0] for a in answers] == [200] * 6, answers
    want = minilm.embed(texts[:1])
    for _, _, body in answers:
        same([json.loads(body)["data"][47]["embedding"]], want)
    with pytest.raises(OSError):  # no longer listening
        get(server.url + "/healthz")


# --- /search over a store the sink writes ---------------------------------------------------------


def test_search_reads_the_store_while_the_sink_writes_it(kafka_bootstrap, store_url):
    from sink_helpers import manifest, record
    from test_sink import _stream_to_topic

    embedder = Embedder.load(PROMPTED)
    texts = [
        "Kafka topics hold the document events.",
        "Vectors live in a store the sink keeps.",
        "Chunks are cut at headings and paragraphs.",
        "Dead letters carry the reason of each failure.",
        "The batcher coalesces concurrent requests.",
        "Probes tell Kubernetes the server is ready.",
    ]
    # The lineage says the documents were embedded with the "query" prompt (not the model's
    # default, "document"): input_type=document must follow the lineage.
    lineage = {
        "model_id": embedder.model_id,
        "model_revision": embedder.model_revision,
        "dtype": "f32",
        "prompt_name": "query",
    }
    vectors = embedder.embed(texts, prompt_name="query")
    stream = []
    for i, (text, vector) in enumerate(zip(texts, vectors)):
        r = record(f"d{i}", i, 0, 1, text, model=lineage, dim=embedder.dim, metadata={"half": str(i // 3)})
        r["embedding"] = [float(x) for x in vector]
        stream.append([("VectorRecord", r), ("DocManifest", manifest([r]))])

    topics = FlowTopics(kafka_bootstrap)
    _stream_to_topic(topics, [m for doc in stream[:3] for m in doc])
    sink = subprocess.Popen(
        [
            sys.executable, "-m", "flows.cli", "sink", "--brokers", kafka_bootstrap, "--output-topic",
            topics.output, "--store", store_url, "--group-id", f"{topics.prefix}-sink", "--from", "beginning",
            "--metrics-port", "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    server = None
    try:
        deadline = time.monotonic() + 120
        while not tables(store_url):  # the server takes the documents' prompt from the table
            assert sink.poll() is None, sink.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the sink made no table"
            time.sleep(0.5)
        server = Server(
            "--store", store_url, "--model", str(PROMPTED), env={"EMBEDSTREAM_SERVE_API_KEY": KEY}
        )
        url = server.url + "/search"

        def search(query: str, **kw: Any) -> list[dict[str, Any]]:
            # Dense: the cosine scores checked below (the default is hybrid, docs/search-modes.md).
            status, _, body = request(url, {"query": query, "k": 10, "mode": "dense", **kw})
            assert status == 200, body
            return json.loads(body)["data"]

        def found(expect: int) -> list[dict[str, Any]]:
            until = time.monotonic() + 90
            while True:
                hits = search("where do vectors go?")
                if len(hits) == expect or time.monotonic() > until:
                    return hits
                time.sleep(0.3)

        hits = found(3)
        q = embedder.embed(["where do vectors go?"], prompt_name="query")[0]
        want = sorted(((float(q @ v), f"d{i}") for i, v in enumerate(vectors[:3])), reverse=True)
        assert [h["doc_id"] for h in hits] == [d for _, d in want]
        assert [h["score"] for h in hits] == pytest.approx([s for s, _ in want], abs=1e-5)
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert set(hits[0]) >= {"doc_id", "chunk_index", "text", "score", "page", "time_start_ms", "metadata"}

        # More documents arrive while the server runs: the sink writes, search sees them.
        _stream_to_topic(topics, [m for doc in stream[3:] for m in doc])
        hits = found(6)
        assert {h["doc_id"] for h in hits} == {f"d{i}" for i in range(6)}
        assert {h["doc_id"] for h in search("vectors", filter={"half": "1"})} == {"d3", "d4", "d5"}
        # One implementation: embedstream search's function gives the same hits.
        from flows.search import search as library_search

        library = library_search(
            "where do vectors go?", k=10, store=store_url, model=str(PROMPTED), mode="dense"
        )
        assert [(h["doc_id"], h["rank"]) for h in hits] == [(h.doc_id, h.rank) for h in library], (
            [(h["doc_id"], h["score"]) for h in hits],
            [(h.doc_id, h.score) for h in library],
        )
        assert [h["score"] for h in hits] == pytest.approx([h.score for h in library], abs=1e-6)
        assert search("vectors", k=2)[0]["rank"] == 1 and len(search("vectors", k=2)) == 2

        # The documents' side of the API embeds as the stream did, by the table's lineage.
        client = server.client()
        got = client.embeddings.create(
            model=embedder.model_id, input=texts, extra_body={"input_type": "document"}
        )
        same([d.embedding for d in got.data], vectors)

        status, _, body = request(url, {"query": "x", "table": "chunks_nope"})
        assert status == 404 and error_of(body)["code"] == "table_not_found"
        status, _, body = request(url, {"query": "x", "k": 0})
        assert status == 400 and error_of(body)["param"] == "k"
    finally:
        if server is not None:
            assert server.stop() == 0
        sink.send_signal(signal.SIGTERM)
        _, log = sink.communicate(timeout=60)
    assert sink.returncode == 0, log[-3000:]


def tables(url: str) -> list[Any]:
    from flows.stores import open_store

    store = open_store(url)
    try:
        return store.tables()
    finally:
        store.close()


def test_bad_flags_and_models_fail_at_start_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve", "--model", str(tmp_path / "missing"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "missing" in result.stderr and "Traceback" not in result.stderr


def test_a_database_outage_gets_503_and_not_ready_until_it_is_back(postgres_dsn):
    from sink_helpers import manifest, record
    from test_stores import apply

    from flows.dev import postgres as local_postgres

    if os.environ.get("EMBEDSTREAM_TEST_POSTGRES"):
        pytest.skip("restarts the local server; $EMBEDSTREAM_TEST_POSTGRES points elsewhere")
    embedder = Embedder.load(PROMPTED)
    lineage = {"model_id": embedder.model_id, "model_revision": embedder.model_revision, "dtype": "f32"}
    r = record(
        "d0", 0, 0, 1, "Vectors live in a store.", model={**lineage, "prompt_name": None}, dim=embedder.dim
    )
    r["embedding"] = [float(x) for x in embedder.embed([r["text"]])[0]]
    apply(postgres_dsn, [("VectorRecord", r), ("DocManifest", manifest([r]))])
    server = Server("--store", postgres_dsn, "--model", str(PROMPTED))
    url = server.url + "/search"
    try:
        assert request(url, {"query": "where are vectors?"}, key=None)[0] == 200
        local_postgres.stop()
        try:
            status, headers, body = request(url, {"query": "where are vectors?"}, key=None)
            assert status == 503 and headers["retry-after"] == "5"
            assert error_of(body)["code"] == "store_unavailable"
            assert get(server.url + "/readyz")[0] == 503
            assert get(server.url + "/healthz")[0] == 200  # alive: a restart would not help
            assert request(server.url + "/v1/embeddings", {"input": "still embedding"}, key=None)[0] == 200
        finally:
            local_postgres.start()
        deadline = time.monotonic() + 60
        while get(server.url + "/readyz")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        status, _, body = request(url, {"query": "where are vectors?"}, key=None)
        assert status == 200 and json.loads(body)["data"][0]["doc_id"] == "d0"
    finally:
        assert server.stop() == 0


def test_a_model_failure_in_search_is_500_model_error_and_the_store_connection_stays(postgres_dsn, tmp_path):
    """The query encoder, the sparse encoder and the reranker each fail on a real input:
    500 model_error in OpenAI's shape, the trace in the log, and the pooled PostgreSQL
    connection given back (a store failure would be 503 with Retry-After, and dropped)."""
    import psycopg
    from sink_helpers import manifest, record
    from test_stores import apply

    from operators import SparseEmbedder

    embedder, splade = Embedder.load(PROMPTED), SparseEmbedder.load(DATA / "tiny-splade")
    texts = ["Vectors live in a store.", "The sink keeps the store in step.", "Chunks carry their text."]
    lineage = {"model_id": embedder.model_id, "model_revision": embedder.model_revision, "dtype": "f32"}
    sparse_model = {"model_id": splade.model_id, "model_revision": splade.model_revision, "dtype": "f32"}
    sparse_model["dimension"] = splade.dim
    stream = []
    for i, (text, vector, sparse) in enumerate(zip(texts, embedder.embed(texts), splade.embed(texts))):
        r = record(f"d{i}", i, 0, 1, text, model={**lineage, "prompt_name": None}, dim=embedder.dim)
        r["embedding"] = [float(x) for x in vector]
        r["sparse"] = {"indices": list(sparse.indices), "values": list(sparse.values)}
        r["sparse_model"] = sparse_model
        m = manifest([r])
        m["sparse_model"] = sparse_model
        stream += [("VectorRecord", r), ("DocManifest", m)]
    apply(postgres_dsn, stream)
    server = Server(
        "--store", postgres_dsn,
        "--model", mismatched_copy("tiny-prompted", tmp_path / "dense"),
        "--sparse-model", mismatched_copy("tiny-splade", tmp_path / "sparse"),
        "--rerank", mismatched_copy("tiny-reranker-bert", tmp_path / "reranker"),
    )  # fmt: skip
    url = server.url + "/search"

    def connections() -> set[int]:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        return {pid for (pid,) in rows}

    try:
        for mode in ("dense", "sparse", "hybrid"):
            status, _, raw = request(
                url, {"query": "where are vectors?", "mode": mode, "rerank": True}, key=None
            )
            assert status == 200 and json.loads(raw)["data"], raw
        pooled = connections()
        assert pooled
        failing = [
            {"query": "[OOV] vectors", "mode": "dense"},  # the query's dense vector
            {"query": "[OOV] vectors", "mode": "sparse"},  # its sparse vector
            {"query": "[OOV] vectors", "mode": "text", "rerank": True},  # the reranker after the store
        ]
        for body in failing:
            status, headers, raw = request(url, body, key=None)
            assert status == 500, (body, raw)
            error = error_of(raw)
            assert (error["type"], error["code"]) == ("server_error", "model_error"), body
            assert "retry-after" not in headers and "\n" not in error["message"]
        status, _, raw = request(server.url + "/rerank", {"query": "[OOV]", "texts": ["a"]}, key=None)
        assert status == 500 and error_of(raw)["code"] == "model_error"
        assert connections() == pooled  # the same connection, given back healthy
        assert (
            request(url, {"query": "where are vectors?", "mode": "hybrid", "rerank": True}, key=None)[0]
            == 200
        )
        assert get(server.url + "/readyz")[0] == 200
    finally:
        assert server.stop() == 0
    log = "".join(server.output)
    assert "store unavailable" not in log and "the store failed" not in log
    assert log.count("Traceback") >= len(failing) + 1  # each failure logged with its trace


def test_search_per_document_gives_each_document_once_as_the_library_does(tmp_path):
    from sink_helpers import manifest, record
    from test_search_modes import write

    from flows.search import search as library_search

    embedder = Embedder.load(PROMPTED)
    lineage = {"model_id": embedder.model_id, "model_revision": embedder.model_revision, "dtype": "f32"}
    documents = {
        "consumers": [
            "kafka consumers read partitions and commit offsets",
            "a kafka consumer group shares the partitions of a topic",
            "kafka consumers poll for records and commit their offsets",
        ],
        "brokers": ["kafka brokers store the partitions", "brokers replicate partitions to followers"],
        "tea": ["green tea is steeped briefly in hot water"],
        "cats": ["cats sleep most of the day"],
    }
    stream = []
    for offset, (doc_id, texts) in enumerate(documents.items()):
        vectors = embedder.embed(texts, prompt_name="document")
        records = []
        for i, (text, vector) in enumerate(zip(texts, vectors)):
            r = record(doc_id, offset, i, len(texts), text, model={**lineage, "prompt_name": "document"})
            r["embedding"], r["dimension"] = [float(x) for x in vector], embedder.dim
            records.append(r)
        stream += [("VectorRecord", r) for r in records] + [("DocManifest", manifest(records))]
    url = f"lancedb:{tmp_path / 'lance'}"
    write(url, stream)
    server = Server("--store", url, "--model", str(PROMPTED))
    try:
        query = "kafka consumers commit offsets"
        for mode in ("hybrid", "dense", "text"):
            body = {"query": query, "k": 4, "mode": mode}
            status, _, raw = request(server.url + "/search", body)
            assert status == 200, raw
            chunks = [h["doc_id"] for h in json.loads(raw)["data"]]
            assert len(set(chunks)) < len(chunks), (mode, chunks)  # a document's chunks, several times
            status, _, raw = request(server.url + "/search", {**body, "per_document": True})
            assert status == 200, raw
            hits = json.loads(raw)["data"]
            library = library_search(query, k=4, store=url, model=str(PROMPTED), mode=mode, per_document=True)
            assert [(h["doc_id"], h["chunk_index"], h["rank"]) for h in hits] == [
                (h.doc_id, h.chunk_index, h.rank) for h in library
            ]
            assert [h["score"] for h in hits] == pytest.approx([h.score for h in library], abs=1e-6)
            assert len({h["doc_id"] for h in hits}) == len(hits) and hits[0]["doc_id"] == "consumers", mode
        status, _, raw = request(server.url + "/search", {"query": query, "per_document": "yes"})
        assert status == 400 and error_of(raw)["param"] == "per_document"
    finally:
        assert server.stop() == 0
