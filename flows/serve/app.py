"""The HTTP API of ``embedstream serve``, a Starlette app: OpenAI's ``POST
/v1/embeddings`` and ``GET /v1/models``, ``POST /search`` over the store the sink keeps
(in the search modes of :mod:`flows.search`), TEI's ``POST /rerank``, the probes
``/healthz`` and ``/readyz``, and ``/metrics``.

Every error is answered in OpenAI's shape, without a stack trace (those go to the log).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Optional

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from flows.search import Query, SearchError, choose_table, retrieve, signals
from flows.serve import schema
from flows.serve.auth import BearerAuth
from flows.serve.batching import Batcher, ModelFailed, Overloaded, Stopped, TimedOut, call_model
from flows.serve.metrics import ServeMetrics
from flows.serve.schema import ApiError
from flows.serve.served import Served
from flows.settings import Settings
from flows.stores import Store, StoreConfigError, StoreError, open_store

log = logging.getLogger("embedstream.serve")

#: Response header counting the inputs cut to the model's longest input.
TRUNCATED_HEADER = "X-Embedstream-Truncated-Inputs"
#: Below this many characters a request's tokens are counted on the event loop; above,
#: on a thread (the tokenizer releases the GIL, but the loop would wait for it).
_INLINE_CHARS = 8192
#: A body over the limit is read (and dropped) up to this many times the limit, so the
#: client gets its 413 instead of a reset connection; past it the connection is closed.
_DRAIN_FACTOR = 8
#: Seconds /readyz waits for the store.
_READY_TIMEOUT_S = 5.0
ROUTES = ("/v1/embeddings", "/v1/models", "/search", "/rerank", "/healthz", "/readyz", "/metrics")


def _json(body: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    # orjson writes numpy rows directly: a 32 x 384 response in 0.3 ms, json.dumps of
    # their lists in 6 ms, on the event loop (2 EPYC cores).
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


class StorePool:
    """Stores for /search. PostgreSQL connections are kept and reused (each search is a
    transaction of its own, so it sees every commit of the sink). A LanceDB store is
    opened for each search: an open LanceDB table keeps reading the version it was opened
    at, and a fresh one reads the newest version the sink has committed."""

    def __init__(self, url: str, keep: int = 8) -> None:
        self.url = url
        self._reuse = url.startswith(("postgresql://", "postgres://"))
        self._keep = keep
        self._idle: list[Store] = []
        self._lock = threading.Lock()

    def take(self) -> Store:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return open_store(self.url)

    def give(self, store: Store, healthy: bool = True) -> None:
        with self._lock:
            if self._reuse and healthy and len(self._idle) < self._keep:
                self._idle.append(store)
                return
        store.close()

    def ping(self) -> None:
        """Raises if the store does not answer."""
        store = self.take()
        try:
            store.tables()
        except BaseException:
            self.give(store, healthy=False)
            raise
        self.give(store)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for store in idle:
            store.close()


class Api:
    def __init__(self, served: Served, settings: Settings, metrics: Optional[ServeMetrics] = None) -> None:
        self.served = served
        self.settings = settings
        self.metrics = metrics or ServeMetrics()
        embedder = served.embedder
        batch_tokens = settings.serve_batch_tokens or 4 * embedder.max_batch_tokens
        self.batcher = Batcher(
            lambda texts, prompt: embedder.embed(texts, prompt=prompt),
            batch_tokens=batch_tokens,
            queue_tokens=settings.serve_queue_tokens or 16 * batch_tokens,
            timeout_s=settings.serve_timeout_s,
            metrics=self.metrics,
        )
        self.stores = StorePool(served.store_url) if served.store_url else None
        # Counts tokens: a chunker of the model's limit, no prompt (the texts carry theirs).
        self._counter = embedder.chunker(prompt="")
        [self._empty] = embedder.count_tokens([""])
        # One call at a time into the sparse model and the reranker (off the event loop).
        self._models_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------------

    async def startup(self) -> None:
        self.batcher.start()

    async def shutdown(self) -> None:
        await self.batcher.stop()
        if self.stores is not None:
            await asyncio.to_thread(self.stores.close)

    # --- helpers --------------------------------------------------------------------------------

    async def body(self, request: Request) -> Any:
        limit = self.settings.serve_max_body_bytes
        too_large = ApiError(
            413,
            f"the body is larger than {limit} bytes (EMBEDSTREAM_SERVE_MAX_BODY_BYTES)",
            code="body_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > _DRAIN_FACTOR * limit:
            raise too_large  # not worth reading: the client may see the connection closed
        chunks: list[bytes] = []

        async def read() -> int:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > _DRAIN_FACTOR * limit:
                    raise too_large
                if size <= limit:
                    chunks.append(chunk)
            return size

        try:
            size = await asyncio.wait_for(read(), self.settings.serve_timeout_s)
        except asyncio.TimeoutError:  # a client that sends its body slowly holds no one else up
            raise ApiError(408, "the request body did not arrive in time", code="timeout") from None
        if size > limit:
            # Read to the end and dropped, so that the client, still sending, gets the 413.
            raise too_large
        return schema.parse_json(b"".join(chunks))

    def _count(self, texts: list[str]) -> list[int]:
        """Tokens of each text, special tokens included; ``max_tokens + 1`` for any text
        longer than the model takes. The model's chunker counts in tens of microseconds
        (Embedder.count_tokens sets up a tokenizer at each call: milliseconds)."""
        over = self.served.embedder.max_tokens + 1
        counts = []
        for text in texts:
            chunks = self._counter.chunk(text)
            counts.append(self._empty if not chunks else chunks[0].n_tokens if len(chunks) == 1 else over)
        return counts

    async def tokens(self, texts: list[str], prompt: Optional[str]) -> list[int]:
        """Tokens of each text as the model sees it (after ``prompt``), up to one past the
        model's limit."""
        seen = [prompt + t for t in texts] if prompt else texts
        if sum(map(len, seen)) <= _INLINE_CHARS:
            return self._count(seen)
        return await asyncio.to_thread(self._count, seen)

    async def embed(self, texts: list[str], prompt: Optional[str]) -> tuple[np.ndarray, int, int]:
        """(vectors, tokens the model saw, inputs truncated)."""
        embedder = self.served.embedder
        limit = embedder.max_tokens
        counts = await self.tokens(texts, prompt)
        long = [i for i, n in enumerate(counts) if n > limit]
        if long and not self.settings.serve_truncate_input:
            [exact] = await asyncio.to_thread(embedder.count_tokens, [(prompt or "") + texts[long[0]]])
            raise ApiError(
                413,
                f"input[{long[0]}] has {exact} tokens; the model takes at most {limit} "
                f"({len(long)} inputs too long; this server does not truncate)",
                param="input",
                code="input_too_long",
            )
        tokens = sum(min(n, limit) for n in counts)
        try:
            # Alone: no other request is being read or answered, so none would join its batch.
            vectors = await self.batcher.embed(texts, prompt, tokens, alone=self.metrics.active <= 1)
        except Overloaded as e:
            raise ApiError(
                429,
                str(e),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after_s)},
            ) from None
        except TimedOut as e:
            raise ApiError(
                503, str(e), type="server_error", code="timeout", headers={"Retry-After": "1"}
            ) from None
        except Stopped as e:
            raise ApiError(
                503, str(e), type="server_error", code="shutting_down", headers={"Retry-After": "1"}
            ) from None
        except ModelFailed as e:  # the batcher logged it with its trace
            raise model_error(e) from None
        m = self.metrics
        m.tokens.inc(tokens)
        m.inputs.inc(len(texts))
        m.truncated.inc(len(long))
        return vectors, tokens, len(long)

    # --- routes ---------------------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        s = self.settings
        req = schema.parse_embeddings(
            await self.body(request), max_inputs=s.serve_max_inputs, max_input_chars=s.serve_max_input_chars
        )
        served = self.served
        if req.model is not None and req.model not in served.names:
            raise ApiError(
                404,
                f"model {req.model!r} is not served here; this server serves {served.model_name}",
                param="model",
                code="model_not_found",
            )
        dim = served.embedder.dim
        if req.dimensions is not None and req.dimensions != dim:
            if req.dimensions > dim:
                raise schema.invalid(f"dimensions must be at most {dim}, the model's", param="dimensions")
            if not served.matryoshka:
                raise schema.invalid(
                    f"{served.model_name} was not trained for shortened vectors (Matryoshka): dimensions "
                    f"must be {dim} (EMBEDSTREAM_SERVE_MATRYOSHKA=true allows it anyway)",
                    param="dimensions",
                )
        vectors, tokens, truncated = await self.embed(req.texts, served.prompts[req.input_type])
        if req.dimensions is not None and req.dimensions < dim:
            # As sentence-transformers' truncate_dim: the first dimensions, not re-normalised.
            vectors = vectors[:, : req.dimensions]
        body = schema.embeddings_body(vectors, served.model_name, tokens, req.encoding_format)
        headers = {TRUNCATED_HEADER: str(truncated)} if truncated else None
        return _json(body, headers=headers)

    async def models(self, request: Request) -> Response:
        model = {"id": self.served.model_name, "object": "model", "created": 0, "owned_by": "embedstream"}
        return _json({"object": "list", "data": [model]})

    async def search(self, request: Request) -> Response:
        if self.stores is None:
            raise ApiError(
                404,
                "this server has no store to search: start it with --store (or EMBEDSTREAM_STORE)",
                type="not_found_error",
                code="no_store",
            )
        req = schema.parse_search(await self.body(request))
        store: Optional[Store] = None
        healthy = True
        try:
            store = await asyncio.to_thread(self.stores.take)
            spec = await asyncio.to_thread(choose_table, store, req.table or self.served.table)
            why = self.served.compatible(spec)
            if why:
                raise ApiError(400, why, param="table", code="model_mismatch")
            mode, used = await self._signals(store, spec, req)
            query = Query(req.query)
            if "dense" in used:
                [query.vector], _, _ = await self.embed([req.query], self.served.prompts["query"])
            if "sparse" in used:
                [query.sparse] = await asyncio.to_thread(
                    self._locked, self.served.sparse.embed_query, [req.query]
                )
            s = self.settings
            hits = await asyncio.to_thread(
                retrieve,
                store,
                spec,
                query,
                req.k,
                req.filters,
                mode=mode,
                used=used,
                rrf_k=s.rrf_k,
                fusion=req.fusion or s.fusion,
                depth=s.rerank_k,
                reranker=_LockedReranker(self.served.reranker, self._models_lock) if req.rerank else None,
                rerank_k=s.rerank_k,
                per_document=req.per_document,
            )
        except SearchError as e:
            raise ApiError(
                404, str(e), type="not_found_error", param="table", code="table_not_found"
            ) from None
        except StoreConfigError as e:
            raise ApiError(400, str(e), param="table", code="store_error") from None
        except ApiError:
            raise
        except ModelFailed as e:  # the query's encoders or the reranker: the store is fine
            log.error("search: the model failed", exc_info=e.__cause__)
            raise model_error(e) from None
        except Exception as e:  # StoreError, or the store's own driver failing mid-query
            healthy = False
            if isinstance(e, StoreError):
                log.warning("search: store unavailable: %s", e)
            else:
                log.error("search: the store failed", exc_info=e)
            raise ApiError(
                503,
                "the store is unavailable; retry later",
                type="server_error",
                code="store_unavailable",
                headers={"Retry-After": "5"},
            ) from None
        finally:
            if store is not None:
                await asyncio.to_thread(self.stores.give, store, healthy)
        data = [
            {
                "rank": h.rank,
                "score": h.score,
                "doc_id": h.doc_id,
                "chunk_index": h.chunk_index,
                "text": h.text,
                "page": h.page,
                "time_start_ms": h.time_start_ms,
                "time_end_ms": h.time_end_ms,
                "metadata": h.metadata,
            }
            for h in hits
        ]
        body = {
            "object": "list",
            "model": self.served.model_name,
            "table": spec.name,
            "mode": mode,
            "data": data,
        }
        if mode == "hybrid":
            body["fusion"] = req.fusion or self.settings.fusion
        return _json(body)

    async def _signals(self, store: Store, spec: Any, req: schema.SearchRequest) -> tuple[str, list[str]]:
        """The mode and signals of a search, or a 400 saying why the table or this server
        cannot serve the mode asked for."""
        try:
            mode, used = await asyncio.to_thread(signals, store, spec, req.mode)
        except SearchError as e:
            raise ApiError(400, str(e), param="mode", code="mode_unavailable") from None
        if "sparse" in used and self.served.sparse is None:
            if mode == "sparse" or len(used) == 2:
                raise ApiError(
                    400,
                    f"table {spec.name} has sparse vectors, but this server has no sparse model for "
                    "queries: start it with --sparse-model DIR",
                    param="mode",
                    code="mode_unavailable",
                )
            used = [u for u in used if u != "sparse"]
        if req.rerank and self.served.reranker is None:
            raise ApiError(
                400,
                "this server has no reranker: start it with --rerank DIR",
                param="rerank",
                code="no_reranker",
            )
        return mode, used

    def _locked(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` of the sparse model or the reranker, one call at a time; raises
        :class:`ModelFailed` if it fails."""
        with self._models_lock:
            return call_model(fn, *args)

    async def rerank(self, request: Request) -> Response:
        """TEI's route: ``{"query", "texts"}`` → ``[{"index", "score"}]``, best first."""
        if self.served.reranker is None:
            raise ApiError(
                404,
                "this server has no reranker: start it with --rerank DIR",
                type="not_found_error",
                code="no_reranker",
            )
        s = self.settings
        req = schema.parse_rerank(
            await self.body(request), max_inputs=s.serve_max_inputs, max_input_chars=s.serve_max_input_chars
        )
        try:
            scores = await asyncio.to_thread(self._locked, self.served.reranker.score, req.query, req.texts)
        except ModelFailed as e:
            log.error("rerank: the model failed", exc_info=e.__cause__)
            raise model_error(e) from None
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return _json(
            [
                {"index": i, "score": float(scores[i]), **({"text": req.texts[i]} if req.return_text else {})}
                for i in order
            ]
        )

    async def healthz(self, request: Request) -> Response:
        alive, why = self.batcher.alive()
        return PlainTextResponse(why + "\n", status_code=200 if alive else 503)

    async def readyz(self, request: Request) -> Response:
        alive, why = self.batcher.alive()
        if not alive:
            return PlainTextResponse(why + "\n", status_code=503)
        if self.stores is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.stores.ping), _READY_TIMEOUT_S)
            except Exception as e:
                reason = "no answer in time" if isinstance(e, asyncio.TimeoutError) else str(e)
                return PlainTextResponse(f"store unavailable: {reason}\n", status_code=503)
        return PlainTextResponse("ready\n")

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class Observe:
    """Counts each request by route and status, and times it (a plain ASGI middleware:
    Starlette's BaseHTTPMiddleware would cost more than the work of a short request)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started = time.perf_counter()
        status = 500

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m = self.metrics
        m.active += 1
        m.in_flight.set(m.active)
        try:
            await self.app(scope, receive, observed_send)
        finally:
            m.active -= 1
            m.in_flight.set(m.active)
            m.requests.labels(route, str(status)).inc()
            m.latency.labels(route).observe(time.perf_counter() - started)


class _LockedReranker:
    """The server's reranker, one call at a time. It fails with :class:`ModelFailed`,
    which :func:`flows.search.rerank` lets through (it turns only the library's own
    errors into a SearchError), so /search tells it from a store's failure."""

    def __init__(self, reranker: Any, lock: threading.Lock) -> None:
        self.reranker, self.lock = reranker, lock

    def score(self, query: str, texts: list[str]) -> list[float]:
        with self.lock:
            return call_model(self.reranker.score, query, texts)


def model_error(e: ModelFailed) -> ApiError:
    """500 in OpenAI's shape: the cause's first line, no trace (that is in the log)."""
    return ApiError(500, f"the model failed: {e}", type="server_error", code="model_error")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _json(exc.body(), exc.status, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
        exc.status_code, "invalid_request_error"
    )
    body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
    return _json(body, exc.status_code, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    body = {"error": {"message": "internal error", "type": "server_error", "param": None, "code": None}}
    return _json(body, 500)


def build_app(served: Served, settings: Settings, metrics: Optional[ServeMetrics] = None) -> Starlette:
    api = Api(served, settings, metrics)
    routes = [
        Route("/v1/embeddings", api.embeddings, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/search", api.search, methods=["POST"]),
        Route("/rerank", api.rerank, methods=["POST"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/metrics", api.prometheus, methods=["GET"]),
    ]
    # Outermost first: count every request, answer CORS preflights, then check the key.
    middleware = [Middleware(Observe, metrics=api.metrics)]
    if settings.serve_cors_origins:
        origins = [o.strip() for o in settings.serve_cors_origins.split(",") if o.strip()]
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=[TRUNCATED_HEADER, "Retry-After"],
            )
        )
    if settings.serve_api_key:
        middleware.append(Middleware(BearerAuth, key=settings.serve_api_key))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await api.startup()
        try:
            yield
        finally:
            await api.shutdown()

    app = Starlette(
        debug=False,
        routes=routes,
        middleware=middleware,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.api = api
    return app
