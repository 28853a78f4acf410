"""``embedstream serve``: the pipeline's model over HTTP (OpenAI-compatible embeddings,
search over the store the sink keeps)."""

from __future__ import annotations

import argparse
import os
import sys

from flows.cli.shared import Commands, settings_from

#: The flags of ``serve`` that set the Settings field of their dest.
SETTINGS_FLAGS = (
    "serve_host",
    "serve_port",
    "store",
    "model",
    "device",
    "dtype",
    "serve_api_key",
    "serve_truncate_input",
    "log_format",
)


def add_commands(sub: Commands) -> None:
    serve = sub.add_parser(
        "serve", help="the model over HTTP: OpenAI-compatible /v1/embeddings, and /search over a store"
    )
    serve.add_argument(
        "--host",
        dest="serve_host",
        metavar="HOST",
        help="address to listen on (default 127.0.0.1: this machine)",
    )
    serve.add_argument("--port", dest="serve_port", metavar="PORT", type=int, help="port (default 8080)")
    serve.add_argument(
        "--store",
        help="postgresql://… or lancedb:DIR to search (default: $EMBEDSTREAM_STORE; none: embeddings only)",
    )
    serve.add_argument("--table", help="table of /search (required when the store has several)")
    serve.add_argument(
        "--model",
        help="model to serve (default: the table's, from its lineage, with --store; else $EMBEDSTREAM_MODEL "
        "or the default model)",
    )
    serve.add_argument(
        "--sparse-model",
        metavar="DIR",
        help="sparse model for /search's sparse signal (default: $EMBEDSTREAM_SPARSE_MODEL, else the "
        "table's, from its lineage)",
    )
    serve.add_argument(
        "--rerank", metavar="DIR", help="cross-encoder for /rerank and /search's rerank (default: none)"
    )
    serve.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: $EMBEDSTREAM_DEVICE or cpu)")
    serve.add_argument("--dtype", help="f32, q8, bf16 or f16 (default: $EMBEDSTREAM_DTYPE or f32)")
    serve.add_argument(
        "--api-key",
        dest="serve_api_key",
        metavar="KEY",
        help="require Authorization: Bearer KEY (better $EMBEDSTREAM_SERVE_API_KEY: not in the process list)",
    )
    serve.add_argument(
        "--no-truncate-input",
        dest="serve_truncate_input",
        action="store_const",
        const=False,
        help="refuse inputs longer than the model's tokens with 413 instead of truncating them",
    )
    serve.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import signal

    import uvicorn

    from flows import logs
    from flows.search import SearchError
    from flows.serve.app import build_app
    from flows.serve.served import load
    from flows.settings import redact_url
    from flows.stores import StoreConfigError

    settings = settings_from(args, SETTINGS_FLAGS)
    logs.configure(settings.log_format)
    log = logging.getLogger("embedstream.serve")
    # Without --store (or EMBEDSTREAM_STORE) the server serves embeddings only.
    store = args.store or os.environ.get("EMBEDSTREAM_STORE")
    model = args.model or os.environ.get("EMBEDSTREAM_MODEL")
    try:
        served = load(
            settings,
            store=store,
            table=args.table,
            model=model,
            rerank=args.rerank,
            sparse_model=args.sparse_model,
        )
    except (SearchError, StoreConfigError, ValueError) as e:
        print(f"embedstream: {e}", file=sys.stderr)
        return 2
    e = served.embedder
    log.info(
        "serving %s (revision %s, dim %d, %s %s) on http://%s:%d; search: %s; API key: %s",
        served.model_name,
        e.model_revision,
        e.dim,
        e.device,
        e.dtype,
        settings.serve_host,
        settings.serve_port,
        f"{redact_url(store)} {served.table or '(the only table)'}" if store else "off (no --store)",
        "required" if settings.serve_api_key else "none",
    )
    config = uvicorn.Config(
        build_app(served, settings),
        host=settings.serve_host,
        port=settings.serve_port,
        log_config=None,  # our handlers (flows.logs), not uvicorn's
        access_log=False,  # /metrics counts requests; a line each would cost more than a short request
        server_header=False,
        # SIGTERM: stop accepting, answer what is in flight (at most a request's timeout), then exit.
        timeout_graceful_shutdown=int(settings.serve_timeout_s) + 5,
        backlog=2048,
    )
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found:
    # with this one, a clean drain exits 0, as the workers do.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # Ctrl-C, raised again after the same drain
        pass
    return 0
