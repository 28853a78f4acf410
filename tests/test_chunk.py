"""Chunker properties on the real MiniLM tokenizer."""

from __future__ import annotations

import collections
import random
from pathlib import Path

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


DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module", params=["greedy", "stable"])
def chunker(minilm, request):
    return minilm.chunker(max_tokens=32, strategy=request.param)


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


@pytest.mark.parametrize("strategy", ["greedy", "stable"])
def test_headings_are_preferred_boundaries(minilm, strategy):
    sections = [f"Section {i}\n\n" + f"Sentence number {i} talks about topic {i}. " * 3 for i in range(6)]
    text = "\n\n\n".join(sections)
    chunks = minilm.chunker(max_tokens=60, strategy=strategy).chunk(text)
    assert len(chunks) > 1
    # Several sections fit in one chunk, but every cut falls before a heading.
    for c in chunks:
        assert c.text.startswith("Section ") and c.text.endswith(".")
    assert sum(c.text.count("Section ") for c in chunks) == 6


@pytest.mark.parametrize("strategy", ["greedy", "stable"])
def test_overlap_repeats_tokens(minilm, strategy):
    text = " ".join(f"w{i}" for i in range(300))
    plain = minilm.chunker(max_tokens=40, strategy=strategy).chunk(text)
    overlapped = minilm.chunker(max_tokens=40, overlap_tokens=10, strategy=strategy).chunk(text)
    assert len(overlapped) > len(plain)
    for a, b in zip(overlapped, overlapped[1:]):
        assert b.char_start < a.char_end  # consecutive chunks share text


@pytest.mark.parametrize("strategy", ["greedy", "stable"])
def test_pdf_chunks_stay_on_their_page(minilm, strategy):
    pages = [" ".join(f"page{p} word{i}." for i in range(60)) for p in range(3)]
    doc = operators.extract(docgen.make_pdf(pages))
    chunks = minilm.chunker(max_tokens=64, strategy=strategy).chunk(doc)
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
    with pytest.raises(operators.UnsupportedError, match="greedy"):
        minilm.chunker(strategy="clever")


# --- edit-stable chunking -----------------------------------------------------------------

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def _changed(chunker, before: str, after: str) -> int:
    """Chunks of ``after`` whose text ``before`` did not have (as a multiset)."""
    old = collections.Counter(c.text for c in chunker.chunk(before))
    new = collections.Counter(c.text for c in chunker.chunk(after))
    return sum((new - old).values())


def test_stable_chunks_change_about_one_per_edit_of_pythons_docs(minilm):
    # Documents of three pydoc topics each; one sentence appended to one paragraph.
    from pydoc_data.topics import topics

    rng = random.Random(1)
    names = sorted(topics)
    greedy = minilm.chunker(strategy="greedy")
    stable = minilm.chunker(strategy="stable")
    changed, sizes = [], {"greedy": [], "stable": []}
    for _ in range(30):
        paragraphs = [p for n in rng.sample(names, 3) for p in topics[n].split("\n\n") if p.strip()]
        before = "\n\n".join(paragraphs)
        i = rng.choice([i for i, p in enumerate(paragraphs) if len(p) > 80])
        paragraphs[i] = paragraphs[i] + " This sentence was added in an edit."
        changed.append(_changed(stable, before, "\n\n".join(paragraphs)))
        for name, chunker in (("greedy", greedy), ("stable", stable)):
            sizes[name] += [c.n_tokens for c in chunker.chunk(before)]
    assert sum(changed) / len(changed) <= 2.0, changed
    size = {name: sum(v) / len(v) for name, v in sizes.items()}
    assert size["stable"] >= 0.9 * size["greedy"], size


def test_stable_chunking_changes_about_one_chunk_per_edited_paragraph(minilm):
    # Paragraphs of sentences, with one sentence inserted, deleted or changed.
    rng = random.Random(11)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."  # noqa: E731
    changed, sizes = [], {"greedy": [], "stable": []}
    for _ in range(20):
        paragraphs = [[sentence() for _ in range(rng.randint(2, 6))] for _ in range(40)]
        before = "\n\n".join(" ".join(p) for p in paragraphs)
        p = rng.choice(paragraphs)
        i = rng.randrange(len(p))
        kind = rng.choice(["insert", "delete", "modify"])
        if kind == "insert":
            p.insert(i, sentence())
        elif kind == "delete" and len(p) > 1:
            del p[i]
        else:
            p[i] = p[i][:-1] + " indeed."
        after = "\n\n".join(" ".join(p) for p in paragraphs)
        stable = minilm.chunker(max_tokens=128, strategy="stable")
        changed.append(_changed(stable, before, after))
        for name in sizes:
            sizes[name] += [c.n_tokens for c in minilm.chunker(max_tokens=128, strategy=name).chunk(before)]
    assert sum(changed) / len(changed) <= 2.0, changed
    # Chunks stay nearly as full as greedy packing makes them.
    mean = {name: sum(v) / len(v) for name, v in sizes.items()}
    assert mean["stable"] >= 0.9 * mean["greedy"], mean


@pytest.mark.parametrize("model", ["tiny-xlm-roberta", "tiny-qwen3", "tiny-modernbert"])
def test_stable_chunks_respect_the_limit_with_every_tokenizer(model):
    embedder = operators.Embedder.load(str(DATA / model))
    rng = random.Random(5)
    text = "\n\n".join(
        " ".join(
            rng.choice([*WORDS, "naïve", "Straße", "日本語のテキスト", "x" * 40])
            for _ in range(rng.randint(3, 60))
        )
        for _ in range(60)
    )
    chunker = embedder.chunker(max_tokens=24, strategy="stable")
    chunks = chunker.chunk(text)
    assert len(chunks) > 10
    assert [c.n_tokens for c in chunks] == embedder.count_tokens([c.text for c in chunks])
    assert all(c.n_tokens <= 24 for c in chunks)
    assert all(text[c.char_start : c.char_end] == c.text for c in chunks)
