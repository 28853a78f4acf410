"""``embedstream sink`` and ``search``: the vector store, kept in step with the vector
topic and queried."""

from __future__ import annotations

import argparse
import sys

from flows.cli.shared import Commands, kafka_flags, settings_from, short, until_end

STORE_HELP = "postgresql://… or lancedb:DIR (default: $EMBEDSTREAM_STORE or lancedb:embedstream-vectors)"
#: The flags of ``sink`` that set the Settings field of their name.
SINK_SETTINGS_FLAGS = (
    "output_topic",
    "store",
    "sink_group_id",
    "sink_dlq_topic",
    "start_from",
    "log_format",
    "metrics_host",
)


def add_commands(sub: Commands) -> None:
    sink = sub.add_parser("sink", help="keep a vector store exactly in step with the vector topic")
    sink.add_argument("--store", help=STORE_HELP)
    sink.add_argument(
        "--output-topic", help="the vector topic to read (default: $EMBEDSTREAM_OUTPUT_TOPIC or vectors)"
    )
    sink.add_argument(
        "--group-id",
        dest="sink_group_id",
        metavar="GROUP_ID",
        help="consumer group (default: $EMBEDSTREAM_SINK_GROUP_ID or embedstream-sink)",
    )
    sink.add_argument(
        "--dlq-topic",
        dest="sink_dlq_topic",
        metavar="DLQ_TOPIC",
        help="dead letters of the sink (default: <output topic>.sink-dlq)",
    )
    sink.add_argument("--from", dest="start_from", help="committed (default) | beginning | latest | epoch ms")
    sink.add_argument("--until-end", action="store_true", help="stop at the end offsets seen at start")
    sink.add_argument("-w", "--workers", type=int, default=1, help="worker threads in this process")
    sink.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")
    sink.add_argument(
        "--metrics-port",
        type=int,
        default=9401,
        help="port of /metrics, /healthz and /readyz (default 9401; 0: off)",
    )
    sink.add_argument("--metrics-host", help="address they listen on (default 127.0.0.1; the image: 0.0.0.0)")
    kafka_flags(sink)
    sink.set_defaults(func=cmd_sink)

    search = sub.add_parser("search", help="the chunks nearest to a query, from a store the sink keeps")
    search.add_argument("query")
    search.add_argument("--k", type=int, default=5, help="hits to print (default 5)")
    search.add_argument("--store", help=STORE_HELP)
    search.add_argument("--table", help="table to search (required when the store has several)")
    search.add_argument(
        "--model", help="model directory for the query (default: the table's, from its lineage)"
    )
    search.add_argument(
        "--filter",
        action="append",
        metavar="KEY=VALUE",
        help="only chunks whose metadata has KEY=VALUE (repeatable)",
    )
    search.add_argument(
        "--mode",
        choices=["dense", "sparse", "text", "hybrid"],
        help="dense vectors, sparse vectors, full text, or all of the table's signals fused "
        "(default: hybrid where the table has a second signal, else dense)",
    )
    search.add_argument(
        "--sparse-model",
        metavar="DIR",
        help="sparse model directory for the query (default: the table's, from its lineage)",
    )
    search.add_argument(
        "--rerank", metavar="DIR", help="cross-encoder directory: score the best --rerank-k chunks again"
    )
    search.add_argument(
        "--rerank-k",
        type=int,
        help="chunks the reranker scores, and each signal's candidates for hybrid "
        "(default: $EMBEDSTREAM_RERANK_K or 50)",
    )
    search.add_argument(
        "--rrf-k",
        type=int,
        help="hybrid's reciprocal rank fusion constant (default: $EMBEDSTREAM_RRF_K or 60)",
    )
    search.add_argument(
        "--fusion",
        choices=["rrf", "relative"],
        help="how hybrid fuses its lists: rrf (reciprocal rank) or relative (min-max normalised "
        "scores, averaged) (default: $EMBEDSTREAM_FUSION or rrf)",
    )
    search.add_argument(
        "--per-document",
        action="store_true",
        help="one hit per document, its best chunk; hybrid fuses documents instead of chunks",
    )
    search.set_defaults(func=cmd_search)


def cmd_sink(args: argparse.Namespace) -> int:
    import logging
    import signal

    from bytewax.run import cli_main

    from flows import health, logs
    from flows.kafka.io import STOP
    from flows.kafka.topics import check_exist, create
    from flows.settings import redact_url
    from flows.sink import build
    from flows.stores import open_store

    settings = settings_from(args, SINK_SETTINGS_FLAGS, tail=until_end(args))
    logs.configure(settings.log_format)
    health.serve(settings.metrics_host, args.metrics_port, settings.stall_s)
    logging.getLogger("embedstream").info("sink settings: %s", settings.sink_view())
    check_exist(settings, [settings.output_topic])
    try:
        create(settings, settings.sink_dlq(), 1)
    except Exception:
        check_exist(settings, [settings.sink_dlq()])
    open_store(settings.store).close()  # a bad store URL fails here, before any worker starts
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    cli_main(build(settings), workers_per_process=args.workers)
    print(f"sink: {settings.output_topic} → {redact_url(settings.store)}", file=sys.stderr)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from flows.search import SearchError, search
    from flows.stores import StoreConfigError

    filters = {}
    for item in args.filter or []:
        if "=" not in item:
            print(f"embedstream: --filter takes key=value, not {item!r}", file=sys.stderr)
            return 2
        key, value = item.split("=", 1)
        filters[key] = value
    try:
        hits = search(
            args.query,
            k=args.k,
            store=args.store,
            table=args.table,
            model=args.model,
            filters=filters,
            mode=args.mode,
            sparse_model=args.sparse_model,
            rerank=args.rerank,
            rerank_k=args.rerank_k,
            rrf_k=args.rrf_k,
            fusion=args.fusion,
            per_document=args.per_document,
        )
    except (SearchError, StoreConfigError, ValueError) as e:
        print(f"embedstream: {e}", file=sys.stderr)
        return 2
    if not hits:
        print("no hits")
    for h in hits:
        page = f" p{h.page}" if h.page else ""
        if h.time_start_ms is not None and h.time_end_ms is not None:
            page += f" @{clock(h.time_start_ms)}-{clock(h.time_end_ms)}"
        print(f"{h.rank:>2}. {h.score:.4f}  {h.doc_id}{page} #{h.chunk_index}  {short(h.text, 90)}")
    return 0


def clock(ms: int) -> str:
    """Milliseconds as m:ss.s (h:mm:ss.s past an hour), for audio hits."""
    minutes, seconds = divmod(ms / 1000, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{seconds:04.1f}" if hours else f"{minutes}:{seconds:04.1f}"
