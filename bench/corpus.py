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
