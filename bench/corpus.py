"""Benchmark texts: paragraphs of CPython's own documentation (``pydoc_data.topics``),
real English prose and code that every Python ships."""

from __future__ import annotations


def paragraphs(n: int = 1000, min_chars: int = 40) -> list[str]:
    from pydoc_data.topics import topics

    found: list[str] = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            text = " ".join(block.split())
            if len(text) >= min_chars:
                found.append(text)
    if len(found) < n:
        raise RuntimeError(f"only {len(found)} paragraphs available, wanted {n}")
    return found[:n]


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def docstrings(n: int, min_chars: int = 40) -> list[str]:
    """Distinct paragraphs of the standard library's docstrings (about 12,000 on
    CPython 3.11): real prose, parsed from the sources without importing them."""
    import ast
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for block in (ast.get_docstring(node) or "").split("\n\n"):
                text = " ".join(block.split())
                if len(text) >= min_chars and text not in seen:
                    seen.add(text)
                    found.append(text)
                    if len(found) == n:
                        return found
    return found


def texts(n: int) -> list[str]:
    """``n`` distinct real paragraphs: the documentation's, then the docstrings'."""
    from pydoc_data.topics import topics

    docs = list(dict.fromkeys(t for key in sorted(topics) for t in _blocks(topics[key], 40)))
    found = (docs + docstrings(max(0, n - len(docs))))[:n]
    if len(found) < n:
        raise RuntimeError(f"only {len(found)} paragraphs available, wanted {n}")
    return found


def _blocks(text: str, min_chars: int) -> list[str]:
    return [t for t in (" ".join(b.split()) for b in text.split("\n\n")) if len(t) >= min_chars]
