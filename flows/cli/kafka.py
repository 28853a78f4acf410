"""``embedstream topics``, ``publish``, ``tail`` and ``redrive``: topics, and events in
and out of them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from flows.cli.shared import Commands, kafka_flags, settings_from


def add_commands(sub: Commands) -> None:
    topics = sub.add_parser("topics", help="create or delete topics")
    topics.add_argument("action", choices=["create", "delete"])
    topics.add_argument("names", nargs="+")
    topics.add_argument("--partitions", type=int, default=1)
    kafka_flags(topics)
    topics.set_defaults(func=cmd_topics)

    publish = sub.add_parser(
        "publish",
        help="send files as DocumentEvents (doc_id: the path relative to the directory given), "
        "or the objects under s3://, gs:// or az:// prefixes as events naming them by URI",
    )
    publish.add_argument(
        "paths", nargs="+", help="files or directories, or object-store prefixes such as s3://bucket/docs/"
    )
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
    publish.add_argument(
        "--object-store",
        action="append",
        metavar="KEY=VALUE",
        help="an object_store setting for listing, as run takes it (instead of "
        "EMBEDSTREAM_OBJECT_STORE; over the standard AWS_*, GOOGLE_* and AZURE_* variables), "
        "e.g. aws_endpoint=http://minio:9000 (repeatable)",
    )
    publish.add_argument("--topic", help="default: the input topic")
    publish.add_argument("--json", action="store_true", help="JSON instead of Avro single-object encoding")
    publish.add_argument("--quiet", action="store_true", help="no progress bar")
    kafka_flags(publish)
    publish.set_defaults(func=cmd_publish)

    redrive = sub.add_parser("redrive", help="send dead letters back to the input topic (e.g. after a fix)")
    redrive.add_argument("--dlq-topic", help="default: the dead-letter topic")
    redrive.add_argument("--to", help="default: the input topic")
    redrive.add_argument("--stage", help="only letters of this stage")
    redrive.add_argument("--reason", help="only letters of this reason")
    kafka_flags(redrive)
    redrive.set_defaults(func=cmd_redrive)

    tail = sub.add_parser(
        "tail",
        help="print output records compactly",
        description="Prints a topic's records compactly. Reads with isolation.level=read_committed: "
        "of a flow run with --exactly-once, committed batches only, once each. Every consumer "
        "downstream needs that setting for exactly-once (confluent-kafka and librdkafka: "
        "isolation.level=read_committed, their default; the Java client and Kafka Connect: "
        "isolation.level=read_committed, or consumer.override.isolation.level for a connector). "
        "--kafka isolation.level=read_uncommitted shows aborted records too.",
    )
    tail.add_argument("--topic", help="default: the output topic")
    tail.add_argument("-n", type=int, default=20, help="most records to print")
    tail.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for more")
    kafka_flags(tail)
    tail.set_defaults(func=cmd_tail)


def cmd_topics(args: argparse.Namespace) -> int:
    from flows.kafka import topics

    settings = settings_from(args)
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
    from flows import backfill
    from flows.kafka import topics

    try:
        settings = settings_from(args, object_store=tuple(args.object_store or ()) or None)
    except ValueError as e:  # an --object-store key no store takes
        print(f"embedstream: {e}", file=sys.stderr)
        return 2
    topic = args.topic or settings.input_topic
    uris = [p for p in args.paths if backfill.is_object_uri(p)]
    paths = [p for p in args.paths if not backfill.is_object_uri(p)]
    if uris and (args.doc_id_prefix or args.root):
        print(
            "embedstream: --doc-id-prefix and --root are for files: an object's doc_id is its URI, "
            "as its notifications name it",
            file=sys.stderr,
        )
        return 2
    sent = 0
    if paths:
        items = document_ids(paths, args.doc_id_prefix, args.root)
        sent += topics.publish_files(
            settings, topic, items, json_format=args.json, progress=not args.quiet, delete=args.delete
        )
    if uris:
        try:
            sent += backfill.publish(
                settings,
                topic,
                uris,
                delete=args.delete,
                json_format=args.json,
                progress=not args.quiet,
            )
        except ValueError as e:
            print(f"embedstream: {e}", file=sys.stderr)
            return 2
        except backfill.BackfillError as e:
            print(f"embedstream: listing failed after {sent + e.sent} events: {e}", file=sys.stderr)
            return 1
    print(f"published {sent} {'DELETE' if args.delete else 'document'} events to {topic}")
    return 0


def cmd_redrive(args: argparse.Namespace) -> int:
    from flows.kafka import topics

    settings = settings_from(args, input_topic=args.to, dlq_topic=args.dlq_topic)
    stats = topics.redrive(settings, stage=args.stage, reason=args.reason)
    print(
        f"redrove {stats['sent']} dead letters to {settings.input_topic} "
        f"({stats['reread']} re-read from their source, {stats['skipped']} filtered out, "
        f"{stats['lost']} no longer in their source topic)"
    )
    return 1 if stats["lost"] else 0


def cmd_tail(args: argparse.Namespace) -> int:
    from flows.kafka import topics

    settings = settings_from(args)
    for kind, record, where in topics.tail(
        settings, args.topic or settings.output_topic, args.n, args.timeout
    ):
        print(f"{where} {topics.describe(kind, record)}")
    return 0
