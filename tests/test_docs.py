"""The README and docs/ stay true to the code: the configuration page is what its
generator makes from Settings now, every `embedstream` subcommand and flag they name
exists, relative links resolve, and the README stays a short front door."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MAX_README_LINES = 220


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def generator():
    spec = importlib.util.spec_from_file_location("gen_configuration", DOCS / "gen_configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- configuration.md ---------------------------------------------------------------


def test_configuration_page_is_generated_from_the_code():
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    stale = "docs/configuration.md differs from the code: run python docs/gen_configuration.py"
    assert page == generator().render(), stale


def test_every_setting_is_on_the_configuration_page():
    import dataclasses

    from flows.settings import Settings

    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for field in dataclasses.fields(Settings):
        if field.name != "kafka":
            assert f"`EMBEDSTREAM_{field.name.upper()}`" in page


def environment_names_in_code() -> set[str]:
    """Every EMBEDSTREAM_* name written in the runtime's sources."""
    found: set[str] = set()
    for folder, pattern in (("flows", "*.py"), ("operators", "*.py"), ("native/src", "*.rs")):
        for path in (ROOT / folder).rglob(pattern):
            for name in re.findall(r"EMBEDSTREAM_[A-Z0-9_]+", path.read_text(encoding="utf-8")):
                found.add(name.rstrip("_"))
    return found


def documented(name: str, page: str) -> bool:
    """Listed by name, or a librdkafka setting covered by EMBEDSTREAM_KAFKA_<KEY>
    (the local broker's own variables must be listed by name)."""
    if f"`{name}`" in page:
        return True
    local_broker = ("EMBEDSTREAM_KAFKA_HOME", "EMBEDSTREAM_KAFKA_PORT", "EMBEDSTREAM_KAFKA_CONTROLLER_PORT")
    return (
        (name == "EMBEDSTREAM_KAFKA" or name.startswith("EMBEDSTREAM_KAFKA_"))
        and name not in local_broker
        and "`EMBEDSTREAM_KAFKA_<KEY>`" in page
    )


def test_every_environment_variable_in_the_code_is_documented():
    names = environment_names_in_code()
    assert "EMBEDSTREAM_CPU_KERNELS" in names  # the scan sees the Rust sources too
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    missing = sorted(n for n in names if not documented(n, page))
    assert not missing, f"not on docs/configuration.md: {missing}"


def test_the_check_of_environment_variables_can_fail():
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert not documented("EMBEDSTREAM_NOT_A_SETTING", page)
    assert not documented("EMBEDSTREAM_KAFKA_HOME", page.replace("`EMBEDSTREAM_KAFKA_HOME`", ""))
    assert documented("EMBEDSTREAM_KAFKA_SASL_PASSWORD", page)


# --- commands and flags named in the pages ------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from flows.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("embedstream has no subcommands")


def code_of(text: str) -> list[str]:
    """The lines of fenced code blocks (a line ending in a backslash joined to the
    next), then every inline code span outside them."""
    snippets: list[str] = []
    outside: list[str] = []
    for i, part in enumerate(re.split(r"^```[^\n]*\n", text, flags=re.M)):
        if i % 2:
            snippets.extend(part.replace("\\\n", " ").splitlines())
        else:
            outside.append(part)
    for part in outside:
        snippets.extend(" ".join(span.split()) for span in re.findall(r"`([^`]+)`", part))
    return snippets


#: Where one command ends on a line: pipes, command lists, comments, closing $( ).
SEPARATORS = ("|", "||", "&&", ";", "#", ")", ">", "2>", "&")
#: Our command line: `embedstream`, `.venv/bin/embedstream`.
CALL = re.compile(r"(?:\S*/)?embedstream")


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(subcommand, the tokens after it) for each call of `embedstream` in a line: at
    the start of a command (after `VAR=value`s, or a separator), or nested in `$( )`,
    which is a call of its own; the outer call's tokens go on after it closes. Words
    that only mention embedstream (output, prose) are not calls."""
    calls: list[list[str]] = []
    open_calls: list[list[str]] = []  # the calls this token belongs to, innermost last
    at_start = True
    for token in line.split():
        unquoted = token.lstrip("\"'")
        nested = unquoted.startswith("$(")
        if (at_start or nested) and CALL.fullmatch(unquoted[2:] if nested else token):
            call: list[str] = []
            calls.append(call)
            open_calls = [*open_calls, call] if nested else [call]
            at_start = False
        elif token in SEPARATORS or token.startswith("#"):
            open_calls, at_start = [], True
        elif at_start and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", token):
            continue  # VAR=value before a command
        else:
            at_start = False
            if open_calls:
                closes = token.rstrip("\"'").endswith(")")
                open_calls[-1].append(token.rstrip("\"'").rstrip(")") if closes else token)
                if closes:
                    open_calls = open_calls[:-1]
    return [(call[0], call[1:]) for call in calls if call]


def problems_in(text: str, where: str) -> list[str]:
    subs = subcommands()
    problems: list[str] = []
    for snippet in code_of(text):
        for sub, rest in invocations(snippet):
            sub = sub.strip("\"'`[]")
            if not re.fullmatch(r"[a-z][a-z-]*", sub):
                continue  # `embedstream ...`, `embedstream <subcommand>`: no name to check
            if sub not in subs:
                problems.append(f"{where}: `embedstream {sub}` is not a subcommand ({snippet!r})")
                continue
            parser = subs[sub]
            options = {o for a in parser._actions for o in a.option_strings}
            choices = [a for a in parser._actions if not a.option_strings and a.choices]
            for position, token in enumerate(rest):
                word = token.strip("[](),`\"'.…")
                if word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-+\d.*", word):
                    flag = word.split("=", 1)[0]
                    if flag not in options:
                        problems.append(f"{where}: `embedstream {sub}` has no {flag} ({snippet!r})")
                elif position == 0 and choices and re.fullmatch(r"[a-z-]+(\|[a-z-]+)*", word):
                    for alternative in word.split("|"):
                        if alternative not in choices[0].choices:
                            problems.append(
                                f"{where}: `embedstream {sub}` has no action {alternative} ({snippet!r})"
                            )
    return problems


def test_commands_and_flags_in_the_docs_exist():
    problems: list[str] = []
    for path in pages():
        problems += problems_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "text",
    [
        "```bash\nembedstream run --until-end --no-such-flag\n```\n",
        "Run `embedstream sink --incremental` then.",
        "```\nembedstream serve --listen 8080\n```\n",
        "```\nembedstream kafka start|restart\n```\n",
        "```bash\nembedstream sink --store x \\\n    --batch-size 5\n```\n",
        '```\nembedstream sink --store "$(embedstream postgres dsn --bogus)"\n```\n',
        '```\nembedstream run --audio-model "$(embedstream models path --whisper)" --bogus\n```\n',
        "```\nEMBEDSTREAM_DTYPE=q8 .venv/bin/embedstream run --dtyp q8\n```\n",
    ],
)
def test_the_check_of_commands_can_fail(text):
    assert problems_in(text, "sample")


@pytest.mark.parametrize(
    "text",
    [
        "```bash\nembedstream run --until-end -w 2 --kafka security.protocol=SASL_SSL  # two workers\n```\n",
        "```\nkafka-console-producer.sh --bootstrap-server 127.0.0.1:29092 --topic documents\n```\n",
        "```\npip install -e '.[test]' && python -m pytest -q -k sink\n```\n",
        '```\nembedstream sink --store "$(embedstream postgres dsn)"   # or any DSN\n```\n',
        '`embedstream search "QUERY" [--k N] [--filter K=V]` and `embedstream_tables`',
        "```\nembedstream models pull|path --whisper\n```\n",
        '```\nembedstream run --audio-model "$(embedstream models path --whisper)" --audio-language en\n```',
        "```\n0@0 notes/hello.md #0/1 dim=384 'Hello embedstream turns documents into vectors'\n```\n",
    ],
)
def test_the_check_of_commands_passes_what_exists(text):
    assert problems_in(text, "sample") == []


def test_the_readme_and_a_page_of_its_own_show_serve():
    assert "embedstream serve" in README.read_text(encoding="utf-8")
    assert "embedstream serve" in (DOCS / "serving.md").read_text(encoding="utf-8")


# --- links and length ---------------------------------------------------------------


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    found: set[str] = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        found.add(slug)
    return found


def broken_links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    broken: list[str] = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{path.name}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{path.name}: {target} (no such heading)")
    return broken


def test_relative_links_resolve():
    problems = [b for path in pages() for b in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_the_check_of_links_can_fail(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[a](there.md#a-heading) [b](missing.md) [c](there.md#no-heading) [d](#nor-here) "
        "[e](https://example.com/x)\n",
        encoding="utf-8",
    )
    assert len(broken_links(page)) == 3


#: Repository paths named in inline code, e.g. `native/src/nn/dense.rs`.
REPO_PATH = re.compile(r"`((?:native|flows|operators|bench|deploy|tests|schemas|docs)/[\w./-]*)`")


def test_paths_named_in_the_docs_exist():
    missing = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in pages()
        for name in REPO_PATH.findall(path.read_text(encoding="utf-8"))
        if not (ROOT / name).exists()
    ]
    assert not missing, "\n".join(missing)


def test_the_readme_links_into_docs():
    text = README.read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        assert f"docs/{page.name}" in text, f"the README does not link to docs/{page.name}"


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines"
