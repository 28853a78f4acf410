"""``embedstream kafka``, ``registry``, ``postgres`` and ``image``: the developer services of
:mod:`flows.dev`, the only commands that use them."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flows.cli.shared import Commands


def add_commands(sub: Commands) -> None:
    kafka = sub.add_parser("kafka", help="the local single-node Kafka broker (development and tests)")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.set_defaults(func=cmd_kafka)

    postgres = sub.add_parser(
        "postgres",
        help="a local PostgreSQL with pgvector (development and tests; needs embedstream[local-postgres])",
    )
    postgres.add_argument("action", choices=["start", "stop", "status", "dsn"])
    postgres.set_defaults(func=cmd_postgres)

    registry = sub.add_parser(
        "registry",
        help="a local schema registry with a Confluent-compatible API (Apicurio; development and tests)",
    )
    registry.add_argument("action", choices=["start", "stop", "status", "url"])
    registry.set_defaults(func=cmd_registry)

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


def cmd_registry(args: argparse.Namespace) -> int:
    from flows.dev.registry import LocalRegistry

    registry = LocalRegistry()
    if args.action == "start":
        print(f"schema registry ready: {registry.start()}")
    elif args.action == "stop":
        print("stopped" if registry.stop() else "not running")
    elif args.action == "url":
        print(registry.url)
    else:
        print(registry.status())
    return 0


def cmd_postgres(args: argparse.Namespace) -> int:
    from flows.dev import postgres

    if args.action == "start":
        print(f"PostgreSQL with pgvector ready: {postgres.start()}")
    elif args.action == "stop":
        print("stopped" if postgres.stop() else "not running")
    elif args.action == "dsn":
        found = postgres.dsn()
        if found is None:
            print("not running", file=sys.stderr)
            return 1
        print(found)
    else:
        print(postgres.status())
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from flows.dev.containers import Engine, image_name

    if args.action == "name":
        print(image_name(registry=args.registry))
        return 0
    engine = Engine.find(install=True)  # a command the user gave: what it needs, it installs
    if args.action == "docker-host":
        print(engine.docker_host())
        return 0
    started = time.monotonic()
    wheel = Path(args.wheel) if args.wheel else None
    name = engine.build_worker(wheel, local_base=args.local_base, registry=args.registry)
    size = engine.run("image", "inspect", "--format", "{{.Size}}", name).stdout.strip()
    print(f"{name} built with {engine.kind} in {time.monotonic() - started:.0f} s ({int(size) / 1e6:.0f} MB)")
    return 0
