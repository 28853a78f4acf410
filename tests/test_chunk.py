"""Chunker properties on the real MiniLM tokenizer."""

from __future__ import annotations

import docgen
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import operators

TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("abc xyz.,!?\n\n\t")), st.characters(codec="utf-8", exclude_categories=["Cs"])
    ),
    max_size=1500,
)


@pytest.fixture(scope="module")
def chunker(minilm):
    return minilm.chunker(max_tokens=32)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_offsets_exact_bound_holds_text_covered(chunker, text):
    chunks = chunker.chunk(text)
    covered = [False] * len(text)
    for i, c in enumerate(chunks):
        assert c.index == i
        assert text[c.char_start : c.char_end] == c.text
        assert 0 < c.n_tokens <= 32
        assert c.page is None
        for k in range(c.char_start, c.char_end):
            covered[k] = True
    # Everything but whitespace between chunks ends up in a chunk.
    assert all(covered[k] or text[k].isspace() for k in range(len(text)))
    assert [(c.char_start, c.char_end) for c in chunker.chunk(text)] == [
        (c.char_start, c.char_end) for c in chunks
    ]


def test_token_counts_are_the_models(minilm):
    text = "Tokenization counts word pieces, not words: antidisestablishmentarianism. " * 20
    chunks = minilm.chunker(max_tokens=48).chunk(text)
    assert len(chunks) > 1
    assert [c.n_tokens for c in chunks] == minilm.count_tokens([c.text for c in chunks])
    assert all(n <= 48 for n in minilm.count_tokens([c.text for c in chunks]))


def test_headings_are_preferred_boundaries(minilm):
    sections = [f"Section {i}\n\n" + f"Sentence number {i} talks about topic {i}. " * 3 for i in range(6)]
    text = "\n\n\n".join(sections)
    chunks = minilm.chunker(max_tokens=60).chunk(text)
    assert len(chunks) > 1
    # Several sections fit in one chunk, but every cut falls before a heading.
    for c in chunks:
        assert c.text.startswith("Section ") and c.text.endswith(".")
    assert sum(c.text.count("Section ") for c in chunks) == 6


def test_overlap_repeats_tokens(minilm):
    text = " ".join(f"w{i}" for i in range(300))
    plain = minilm.chunker(max_tokens=40).chunk(text)
    overlapped = minilm.chunker(max_tokens=40, overlap_tokens=10).chunk(text)
    assert len(overlapped) > len(plain)
    for a, b in zip(overlapped, overlapped[1:]):
        assert b.char_start < a.char_end  # consecutive chunks share text


def test_pdf_chunks_stay_on_their_page(minilm):
    pages = [" ".join(f"page{p} word{i}." for i in range(60)) for p in range(3)]
    doc = operators.extract(docgen.make_pdf(pages))
    chunks = minilm.chunker(max_tokens=64).chunk(doc)
    assert {c.page for c in chunks} == {1, 2, 3}
    for c in chunks:
        start, end = doc.pages[c.page - 1]
        assert start <= c.char_start < c.char_end <= end
        assert f"page{c.page - 1}" in c.text
        assert doc.text[c.char_start : c.char_end] == c.text


def test_non_paged_documents_have_no_page(minilm):
    doc = operators.extract(b"# T\n\nbody text", filename="a.md")
    assert [c.page for c in minilm.chunker().chunk(doc)] == [None]


def test_bad_settings(minilm):
    with pytest.raises(operators.UnsupportedError):
        minilm.chunker(max_tokens=1000)
    with pytest.raises(operators.UnsupportedError):
        minilm.chunker(max_tokens=3)
    with pytest.raises(operators.UnsupportedError):
        minilm.chunker(max_tokens=20, overlap_tokens=30)
