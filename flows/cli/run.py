"""``embedstream run``: the main job, document events in, vector records out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.cli.shared import Commands, kafka_flags, settings_from, until_end

#: The flags of ``run`` that set the Settings field of their name.
SETTINGS_FLAGS = (
    "input_topic",
    "output_topic",
    "dlq_topic",
    "group_id",
    "scaling",
    "model",
    "device",
    "dtype",
    "image_model",
    "image_output_topic",
    "text_with_image_model",
    "audio_model",
    "audio_language",
    "prompt_name",
    "truncate_dim",
    "sparse_model",
    "max_tokens",
    "overlap_tokens",
    "incremental",
    "chunking",
    "state_topic",
    "input_events",
    "output_format",
    "start_from",
    "batch_size",
    "batch_max_s",
    "exactly_once",
    "member_name",
    "recovery_dir",
    "snapshot_s",
    "metrics_port",
    "metrics_host",
    "log_format",
)


def add_commands(sub: Commands) -> None:
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
    run.add_argument(
        "--sparse-model",
        metavar="DIR",
        help="sparse model directory (SPLADE, BGE-M3): each chunk's record also gets its sparse vector",
    )
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
        "--input-events",
        choices=["auto", "documents", "s3"],
        help="what the input topic carries: DocumentEvents, S3 event notifications (AWS, MinIO), "
        "or auto: each message by its shape (default: auto)",
    )
    run.add_argument(
        "--format",
        dest="output_format",
        choices=["avro", "json", "confluent"],
        help="output encoding (default: avro)",
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
        help="q8: int8 on CPUs with AVX2 (VNNI where there is); bf16: on GPUs, or on CPUs with "
        "AVX512_BF16; f16: GPU only (default: f32)",
    )
    run.add_argument(
        "--batch-size", type=int, help="events per micro-batch (default: 512 on the CPU, 2048 on a GPU)"
    )
    run.add_argument(
        "--batch-max-s",
        type=float,
        help="group mode: seconds of work a micro-batch may take before it takes in no more events "
        "(default: a fifth of max.poll.interval.ms, 60 s)",
    )
    run.add_argument(
        "--exactly-once",
        action="store_true",
        default=None,
        help="group mode: each micro-batch's outputs and input offsets in one Kafka transaction; "
        "consumers reading with isolation.level=read_committed see every record once",
    )
    run.add_argument(
        "--member-name",
        help="with --exactly-once: this member's stable name, unique in the group and the same after "
        "a restart (default: POD_NAME)",
    )
    run.add_argument("--allow-root", action="append", default=[], help="directory file:// URIs may read")
    run.add_argument(
        "--allow-uri",
        action="append",
        default=[],
        metavar="PREFIX",
        help="URI prefix that s3://, gs://, az://, https:// URIs may start with, by whole path "
        "segments (repeatable; e.g. s3://docs-bucket/)",
    )
    run.add_argument(
        "--object-store",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an object_store setting for s3://, gs://, az:// (repeatable; e.g. "
        "aws_endpoint=http://minio:9000); credentials come from the cloud's standard chain",
    )
    run.add_argument(
        "--fetch-concurrency", type=int, help="fetches by URI in flight at once per process (default 32)"
    )
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
    run.add_argument(
        "--metrics-port", type=int, help="port of /metrics, /healthz and /readyz (default 9400; 0: off)"
    )
    run.add_argument("--metrics-host", help="address they listen on (default 127.0.0.1; the image: 0.0.0.0)")
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


def cmd_run(args: argparse.Namespace) -> int:
    import logging
    from datetime import timedelta

    from bytewax.run import cli_main

    from flows.embed import build

    try:
        settings = settings_from(
            args,
            SETTINGS_FLAGS,
            tail=until_end(args),
            allowed_roots=tuple(args.allow_root) or None,
            allowed_uris=tuple(args.allow_uri) or None,
            object_store=tuple(args.object_store) or None,
            fetch_concurrency=args.fetch_concurrency,
        )
    except ValueError as e:  # a setting that cannot work (exactly-once in a cluster, …)
        print(f"embedstream: {e}", file=sys.stderr)
        return 2
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
        if settings.exactly_once:
            settings.member()  # a stable name, or a clear error now
    except ValueError as e:
        print(f"embedstream: {e}", file=sys.stderr)
        return 2
    from flows import health, logs

    logs.configure(settings.log_format)
    health.serve(settings.metrics_host, settings.metrics_port, settings.stall_s)
    log = logging.getLogger("embedstream")
    from flows import info

    log.info("%s", info.summary(info.gather()))
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
        if settings.exactly_once:
            log.info(
                "exactly-once: member %s, transaction.timeout.ms=%d, flush timeout %.0f s; a batch's "
                "%.0f s budget of work runs before its transaction opens",
                settings.member(),
                settings.transaction_timeout_ms(),
                settings.flush_timeout(),
                settings.batch_budget_s(),
            )
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
