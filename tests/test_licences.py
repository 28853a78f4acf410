"""Every Rust crate compiled into the wheel has a licence compatible with ours
(Apache-2.0): permissive, or MPL-2.0 (file-level copyleft, e.g. symphonia). GPL and
LGPL-only crates fail here, with their names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "MIT",
    "MIT-0",
    "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "0BSD",
    "ISC",
    "Zlib",
    "BSL-1.0",
    "CC0-1.0",
    "Unlicense",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "MPL-2.0",
}


def acceptable(expression: str) -> bool:
    """Evaluates an SPDX expression (``A OR (B AND C)``, old ``A/B`` spellings) against
    ALLOWED."""
    tokens = re.findall(r"\(|\)|[^\s()]+(?:\s+WITH\s+[^\s()]+)?", expression.replace("/", " OR "))
    position = 0

    def parse_or() -> bool:
        nonlocal position
        value = parse_and()
        while position < len(tokens) and tokens[position] == "OR":
            position += 1
            value = parse_and() or value
        return value

    def parse_and() -> bool:
        nonlocal position
        value = parse_term()
        while position < len(tokens) and tokens[position] == "AND":
            position += 1
            value = parse_term() and value
        return value

    def parse_term() -> bool:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "(":
            value = parse_or()
            position += 1  # ")"
            return value
        return re.sub(r"\s+", " ", token) in ALLOWED

    return parse_or()


def test_the_licence_evaluator():
    assert acceptable("MIT OR Apache-2.0") and acceptable("(MIT OR Apache-2.0) AND Unicode-3.0")
    assert acceptable("MIT OR Apache-2.0 OR LGPL-2.1-or-later") and acceptable("Apache-2.0/MIT")
    assert acceptable("Apache-2.0 WITH LLVM-exception")
    assert not acceptable("GPL-3.0") and not acceptable("MIT AND GPL-2.0") and not acceptable("LGPL-2.1")


def test_every_rust_dependency_is_compatibly_licensed():
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not os.path.exists(cargo):
        pytest.skip("no cargo here")
    metadata = subprocess.run(
        [cargo, "metadata", "--format-version", "1", "--offline", "--features", "python"],
        cwd=ROOT / "native",
        capture_output=True,
        text=True,
        check=True,
    )
    packages = json.loads(metadata.stdout)["packages"]
    assert any(p["name"] == "candle-core" for p in packages)
    refused = {p["name"]: p["license"] for p in packages if not acceptable(p["license"] or "")}
    assert not refused, f"licences not compatible with Apache-2.0: {refused}"
