"""What the command groups share: the parser class, the Kafka flags, and settings from
the environment and the flags."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

#: The sample documents that ship with the package (one of each supported type).
SAMPLES = Path(str(files("flows") / "samples"))


class Parser(argparse.ArgumentParser):
    """An argument parser that takes options only as spelled: ``--mode`` is an error,
    not ``--model``. Subparsers are made of the same class, so the rule holds for every
    subcommand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


#: What ``add_subparsers`` returns: each group adds its commands to it.
Commands = argparse._SubParsersAction


def kafka_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--brokers", help="bootstrap servers (default: $EMBEDSTREAM_BROKERS or the local broker)")
    p.add_argument(
        "--kafka",
        action="append",
        metavar="KEY=VALUE",
        help="any librdkafka setting, e.g. security.protocol=SASL_SSL (repeatable)",
    )


def settings_from(args: argparse.Namespace, flags: Iterable[str] = (), **overrides: Any):
    """Settings from the environment, then the Kafka flags, then each flag in ``flags``
    (its dest is the Settings field of the same name), then ``overrides``. A flag not
    given (None) leaves the setting as it was."""
    from flows.settings import Settings

    kafka = dict(kv.split("=", 1) for kv in getattr(args, "kafka", None) or [])
    given = {name: getattr(args, name) for name in flags}
    return Settings.from_env(brokers=getattr(args, "brokers", None), kafka=kafka, **given, **overrides)


def until_end(args: argparse.Namespace) -> Any:
    """``--until-end`` as the ``tail`` setting: False when given, else as configured."""
    return False if args.until_end else None


def files_in(paths: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        found.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return found


def short(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
