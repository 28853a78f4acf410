"""The command line's parser: options are taken only as spelled, in every subcommand."""

from __future__ import annotations

import argparse

import pytest

from flows.cli import build_parser


def parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and every subparser under it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += parsers(sub)
    return found


def test_an_abbreviated_option_is_an_error_not_another_option(capsys):
    # `--mode` once read as `--model`: a search with another model, silently. Now that
    # both exist, a prefix of either is still no option.
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["search", "q", "--mod", "dense"])
    assert exit.value.code == 2
    assert "unrecognized arguments: --mod dense" in capsys.readouterr().err
    assert build_parser().parse_args(["search", "q", "--model", "dense"]).model == "dense"
    assert build_parser().parse_args(["search", "q", "--mode", "dense"]).mode == "dense"


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--input", "docs"],  # --input-topic
        ["sink", "--group", "g"],  # --group-id
        ["publish", "x", "--doc-id", "p/"],  # --doc-id-prefix
        ["--hel"],  # the top level's --help
    ],
)
def test_no_subcommand_takes_a_prefix_of_its_options(argv):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    assert exit.value.code == 2


def test_every_parser_refuses_abbreviations():
    found = parsers(build_parser())
    assert len(found) > 10
    assert [p.prog for p in found if p.allow_abbrev] == []
