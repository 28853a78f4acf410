"""The ``embedstream`` command line: one module per command group, each adding its
subcommands to the parser :func:`build_parser` puts together."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from flows.cli import documents, info, kafka, models, run, serve, services, store
from flows.cli.shared import SAMPLES, Parser

__all__ = ["SAMPLES", "build_parser", "main"]

#: The command groups, in the order ``--help`` lists their commands.
GROUPS = (info, models, documents, services, kafka, run, store, serve)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand with its flags. No option may be
    abbreviated, in any subcommand."""
    parser = Parser(
        prog="embedstream", description="Streaming embeddings: extract, chunk and embed documents."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from operators.errors import EmbedstreamError

    try:
        return args.func(args)
    except EmbedstreamError as e:
        print(f"embedstream: {e}", file=sys.stderr)
        return 2
