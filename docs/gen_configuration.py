"""Writes docs/configuration.md from the code: every field of ``flows.settings.Settings``
(its default, the ``#:`` comment above it, the environment variable it is read from,
and the command-line flags that set it), then the variables read outside Settings,
from the literal list below.

    python docs/gen_configuration.py           # rewrite docs/configuration.md
    python docs/gen_configuration.py --check   # exit 1 if the page and the code differ

tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
sys.path.insert(0, str(ROOT))

#: Said of the fields that have no ``#:`` comment in flows/settings.py.
FALLBACK = {
    "input_topic": "Topic of the DocumentEvents.",
    "output_topic": "Topic of the VectorRecords, DocManifests and DeleteMarkers.",
    "dlq_topic": "Topic of the flow's dead letters.",
    "model": 'The text model: "default" (all-MiniLM-L6-v2), a model directory, or a hub id '
    "in the local Hugging Face cache.",
    "device": 'cpu, cuda, cuda:N, or auto (the first GPU if the wheel has CUDA and one answers).',
    "dtype": "f32; q8 on CPUs with AVX2; bf16 on CPUs with AVX512_BF16 or a GPU; f16 on a GPU.",
    "overlap_tokens": "Tokens shared by consecutive chunks.",
    "schema_registry_url": "Confluent Schema Registry (needs embedstream[registry]); "
    "required by output_format confluent.",
    "service": "See replicas.",
    "cluster_port": "See replicas.",
}

#: Flags whose destination is not the field of the same name: (subcommand, dest) -> field,
#: or None where the flag sets no setting.
FLAG_FIELDS: dict[tuple[str, str], str | None] = {
    ("run", "format"): "output_format",
    ("run", "allow_root"): "allowed_roots",
    ("run", "allow_uri"): "allowed_uris",
    ("run", "until_end"): "tail",
    ("sink", "until_end"): "tail",
    ("sink", "group_id"): "sink_group_id",
    ("sink", "dlq_topic"): "sink_dlq_topic",
    ("sink", "metrics_port"): None,  # the sink's own port, default 9401
    ("redrive", "to"): "input_topic",
    ("search", "model"): None,  # the query's model, not the flow's
    ("demo", "model"): None,
    ("demo", "max_tokens"): None,
}

#: Variables read outside Settings: (variable, default, who reads it and what for).
OTHER_VARIABLES: list[tuple[str, str, str]] = [
    (
        "EMBEDSTREAM_KAFKA_<KEY>",
        "",
        "Any librdkafka setting for consumers and producers, dots as underscores "
        "(`EMBEDSTREAM_KAFKA_SASL_PASSWORD` is `sasl.password`); the same as `--kafka KEY=VALUE`. "
        "Secrets are masked in the settings the worker logs.",
    ),
    (
        "EMBEDSTREAM_CPU_KERNELS",
        "`auto`",
        "Our CPU kernels and the matrix products' instruction set: `auto` (the best the CPU "
        "runs), `portable`, `avx2` or `avx512`. Read at every model load (`native/src/nn/cpu.rs`); "
        "a path the CPU cannot run is refused. `embedstream info` says what is in force.",
    ),
    (
        "EMBEDSTREAM_MODEL_CACHE",
        "`~/.cache/embedstream/models`",
        "Where `embedstream models pull` puts models and where `default` is found.",
    ),
    (
        "EMBEDSTREAM_EXTRACT_WORKERS",
        "`2`",
        "Also read by `operators` alone: the size of the default extraction pool.",
    ),
    (
        "EMBEDSTREAM_IMAGE_REGISTRY",
        "",
        "Name prefix of the container image (`embedstream image build --registry`).",
    ),
    (
        "EMBEDSTREAM_CONTAINERS_HOME",
        "`~/.cache/embedstream/containers`",
        "podman's configuration and storage when the tooling runs podman.",
    ),
    (
        "EMBEDSTREAM_KAFKA_HOME",
        "`~/.cache/embedstream/kafka`",
        "The local broker's jars and data (`embedstream kafka start`). Not a librdkafka setting.",
    ),
    ("EMBEDSTREAM_KAFKA_PORT", "`29092`", "The local broker's client port. Not a librdkafka setting."),
    (
        "EMBEDSTREAM_KAFKA_CONTROLLER_PORT",
        "`29093`",
        "The local broker's controller port. Not a librdkafka setting.",
    ),
    (
        "EMBEDSTREAM_REGISTRY_HOME",
        "`~/.cache/embedstream/registry`",
        "The local schema registry's application and data (`embedstream registry start`).",
    ),
    ("EMBEDSTREAM_REGISTRY_PORT", "`38081`", "The local schema registry's port."),
    (
        "EMBEDSTREAM_REGISTRY_JAVA",
        "",
        "The `java` (21+) that runs the local schema registry; by default the first found.",
    ),
    (
        "EMBEDSTREAM_POSTGRES_DIR",
        "`~/.cache/embedstream/postgres`",
        "Data directory of the local PostgreSQL (`embedstream postgres start`).",
    ),
    (
        "EMBEDSTREAM_S3_HOME",
        "`~/.cache/embedstream/s3`",
        "Data of the local S3-compatible server (SeaweedFS, `flows/dev/s3.py`; the tests start their own).",
    ),
    (
        "EMBEDSTREAM_S3_PORT",
        "`38333`",
        "The local S3 server's S3 port; its master, volume server and filer take the next three, "
        "their gRPC ports 10,000 above.",
    ),
    (
        "EMBEDSTREAM_WORKER_MEMORY",
        "",
        "Internal: set by the extraction pool for its child processes (their memory limit).",
    ),
    (
        "EMBEDSTREAM_PARENT_PATH",
        "",
        "Internal: set by the extraction pool for its child processes (the parent's `sys.path`).",
    ),
    (
        "BYTEWAX_ADDRESSES, BYTEWAX_PROCESS_ID",
        "",
        "Cluster mode: the same as `embedstream run -a` and `-i`.",
    ),
    (
        "POD_NAME, HOSTNAME",
        "",
        "Cluster mode in a StatefulSet: the pod name its process id is derived from.",
    ),
    (
        "HF_HUB_CACHE, HF_HOME",
        "`~/.cache/huggingface/hub`",
        "Hugging Face caches searched, offline, for hub ids given as models.",
    ),
]

#: Variables of the tests, the developer scripts and the benchmarks.
TEST_VARIABLES: list[tuple[str, str, str]] = [
    ("EMBEDSTREAM_VENV", "`.venv`", "The virtualenv `deploy/dev.sh` (`make setup`, `make test`) uses."),
    (
        "EMBEDSTREAM_WHEEL",
        "",
        "A built wheel for the tests that install one (`make test` builds it and sets this).",
    ),
    (
        "EMBEDSTREAM_TEST_POSTGRES",
        "",
        "A PostgreSQL DSN with pgvector for the tests, instead of the local server they start.",
    ),
    (
        "KAFKA_BOOTSTRAP_SERVERS",
        "",
        "A broker for the tests, instead of the local one they start.",
    ),
    (
        "EMBEDSTREAM_AZURITE_HOME",
        "`~/.cache/embedstream/azurite`",
        "Where `deploy/dev.sh setup` installs Azurite, the Azure storage emulator of the az:// tests.",
    ),
    (
        "EMBEDSTREAM_BENCH_MODELS",
        "`~/.cache/embedstream/bench-models`",
        "Where `bench/families.py` caches its random models.",
    ),
    (
        "EMBEDSTREAM_CUDA_ROOT",
        "`~/.cache/embedstream/cuda-13.0.2`",
        "Where `deploy/cuda/build-wheel.sh` unpacks the CUDA toolkit wheels.",
    ),
]

INTRO = """\
# Configuration

<!-- Generated by docs/gen_configuration.py from flows/settings.py and the CLI's parser.
Do not edit: change the code, then run `python docs/gen_configuration.py`.
tests/test_docs.py fails when this page and the code differ. -->

Every setting of the flow and the sink is a field of `flows.settings.Settings`. It is
read from its default, then its `EMBEDSTREAM_*` variable, then the command-line flag,
where there is one. The worker logs the settings it runs with, secrets masked.

How variables are read: booleans take `1`, `true`, `yes`, `on` or `0`, `false`, `no`,
`off`; an empty value of an optional number means unset; lists are separated by `:`
(the OS path separator), except `EMBEDSTREAM_ALLOWED_URIS`, separated by `,` (URIs hold
colons). A setting whose default is "unset" is derived as its description says.
"""


def field_comments() -> dict[str, str]:
    """The ``#:`` comment lines right above each field of Settings, joined."""
    from flows import settings

    source = inspect.getsource(settings.Settings)
    lines = source.splitlines()
    comments: dict[str, str] = {}
    for node in ast.parse(textwrap.dedent(source)).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above: list[str] = []
        at = node.lineno - 2  # the line above the field, 0-based
        while at >= 0 and lines[at].strip().startswith("#:"):
            above.insert(0, lines[at].strip()[2:].strip())
            at -= 1
        if above:
            comments[node.target.id] = " ".join(above)
    return comments


def field_flags() -> dict[str, list[str]]:
    """For each field, the flags that set it, as ``--flag`` (subcommands)."""
    from flows.cli import build_parser
    from flows.settings import Settings

    names = {f.name for f in dataclasses.fields(Settings)}
    by_flag: dict[str, dict[str, list[str]]] = {}
    for sub, parser in subcommands(build_parser()).items():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            field = FLAG_FIELDS.get((sub, action.dest), action.dest if action.dest in names else None)
            if field is None:
                continue
            flag = " / ".join(sorted(action.option_strings, key=len, reverse=True))
            by_flag.setdefault(field, {}).setdefault(flag, []).append(sub)
    return {
        field: [f"`{flag}` ({', '.join(sorted(subs))})" for flag, subs in sorted(flags.items())]
        for field, flags in by_flag.items()
    }


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of the ``embedstream`` parser, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def default_of(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        value = field.default
    if value is None or value == () or value == {}:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and field.name.endswith("_bytes") and value % 1024 == 0:
        size = f"{value // 1024 ** 2} MiB" if value % 1024**2 == 0 else f"{value // 1024} KiB"
        return f"`{value}` ({size})"
    return f"`{value}`"


def kind_of(field: dataclasses.Field) -> str:
    kind = str(field.type)
    for word, shown in (("tuple", "list"), ("dict", "map"), ("bool", "bool"), ("int", "int")):
        if word in kind:
            return shown
    return "number" if "float" in kind else "text"


def prose(comment: str) -> str:
    """A code comment as a table cell: Python's None/True/False in the page's words,
    and nothing that Markdown would take for a tag or a column."""
    comment = re.sub(r"\bNone\b", "unset", comment)
    comment = re.sub(r"\bTrue\b", "true", comment)
    comment = re.sub(r"\bFalse\b", "false", comment)
    return comment.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def settings_table() -> list[str]:
    from flows.settings import Settings

    comments, flags = field_comments(), field_flags()
    rows = [
        "| setting | variable | type | default | flags | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for field in dataclasses.fields(Settings):
        variable = "EMBEDSTREAM_KAFKA_<KEY>" if field.name == "kafka" else f"EMBEDSTREAM_{field.name.upper()}"
        meaning = comments.get(field.name) or FALLBACK.get(field.name, "")
        cells = [
            f"`{field.name}`",
            f"`{variable}`",
            kind_of(field),
            default_of(field),
            "<br>".join(flags.get(field.name, [])),
            prose(meaning),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def variables_table(variables: list[tuple[str, str, str]]) -> list[str]:
    rows = ["| variable | default | what |", "|---|---|---|"]
    for names, default, what in variables:
        shown = ", ".join(f"`{n.strip()}`" for n in names.split(","))
        rows.append(f"| {shown} | {default or 'unset'} | {what} |")
    return rows


def render() -> str:
    parts = [
        INTRO,
        "## Settings",
        "",
        "`flags` names the subcommands of `embedstream` that take each flag. "
        "`embedstream sink` serves its metrics on its own `--metrics-port` (default 9401), "
        "not on `metrics_port`.",
        "",
        *settings_table(),
        "",
        "## Variables read outside Settings",
        "",
        *variables_table(OTHER_VARIABLES),
        "",
        "## Tests, development and benchmarks",
        "",
        *variables_table(TEST_VARIABLES),
        "",
    ]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from the code")
    args = parser.parse_args()
    page = render()
    if args.check:
        if PAGE.read_text(encoding="utf-8") != page:
            print(f"{PAGE} is out of date: run python docs/gen_configuration.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
