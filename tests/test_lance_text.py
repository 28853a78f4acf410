"""LanceDB's full-text side on a real table, written by the sink: its index matches the
words PostgreSQL's ``english`` configuration matches (its stop words, stemming, lower
case, accents folded), asks identifiers as phrases, and an index made with other options
is made again when the sink opens the table."""

from __future__ import annotations

import logging

import lancedb
import pyarrow as pa
import pytest
from lancedb.index import FTS
from test_search_modes import SPEC, stream_of, write

from flows.stores import open_store
from flows.stores.lance import _fts_options, fts_config, identifiers

TEXTS = {
    # Holds each identifier as written, among many other words.
    "written": "To build a file name from its parts call os.path.join with each component; "
    "str.join concatenates strings with a separator, and d.items lists the pairs of a mapping "
    "when iterating over keys and values in a loop of the program",
    # Holds the same words apart, in a shorter chunk, some of them twice: BM25 alone ranks
    # it first for each identifier.
    "apart": "join the path to os and path join; the items of str and d",
    "reason": "The build failed because the cache was cold",
    "match": "The home team won the match",
    "drink": "A Café au lait in the morning",
    "other": "Generators yield values lazily",
}


@pytest.fixture
def lance(tmp_path):
    url = f"lancedb:{tmp_path / 'lance'}"
    write(url, stream_of(TEXTS, sparse=False))
    store = open_store(url)
    yield store
    store.close()


def found(store, query: str) -> list[str]:
    return [h.doc_id for h in store.search_text(SPEC, query, 10, {})]


def test_postgres_english_stop_words_and_no_others(lance):
    # "because" is a stop word to PostgreSQL; LanceDB's own list, applied after stemming,
    # let it through as "becaus".
    assert found(lance, "because") == []
    assert found(lance, "during once only") == []
    # "won" is a word to PostgreSQL; LanceDB's own list (NLTK's) dropped it.
    assert found(lance, "won") == ["match"]
    assert found(lance, "the of and") == []


def test_stems_case_and_accents_match(lance):
    assert found(lance, "iterate") == ["written"]  # iterating
    assert set(found(lance, "BUILDS")) == {"written", "reason"}
    assert found(lance, "cafe") == ["drink"]
    assert found(lance, "CAFÉS") == ["drink"]


@pytest.mark.parametrize("identifier", ["os.path.join", "str.join", "d.items"])
def test_a_dotted_identifier_ranks_the_chunk_that_holds_it_first(lance, identifier):
    # Without the phrase the shorter chunk with the same words apart wins on BM25 alone.
    words_only = identifier.replace(".", " ")
    assert found(lance, words_only)[0] == "apart"
    assert found(lance, identifier)[0] == "written"
    assert found(lance, f"how do I use {identifier}() here?")[0] == "written"
    assert set(found(lance, identifier)) == {"written", "apart"}  # any of its words still matches


def test_identifiers_are_the_words_split_into_several_terms():
    assert identifiers("use os.path.join() or (str.join), __getattr__, ZeroDivisionError, utf-8") == [
        "os.path.join",
        "str.join",
        "utf-8",
    ]
    # Contractions and possessives are words (PostgreSQL splits them too), not identifiers.
    assert identifiers("don't use Python\u2019s x.y") == ["x.y"]


def test_a_phrase_of_stop_words_only_is_harmless(lance):
    assert found(lance, "the.of") == []
    assert found(lance, "the.of won") == ["match"]


def test_an_index_made_with_other_options_is_made_again_when_the_sink_opens_the_table(tmp_path, caplog):
    url = f"lancedb:{tmp_path / 'lance'}"
    write(url, stream_of(TEXTS, sparse=False))
    # The index as embedstream made it before: LanceDB's stop words, no positions.
    table = lancedb.connect(str(tmp_path / "lance")).open_table(SPEC.name)
    table.create_index(
        "text", config=FTS(language="English", stem=True, remove_stop_words=True), replace=True
    )
    store = open_store(url)
    try:
        # A search over the old index works, without phrases.
        assert found(store, "because") == ["reason"]
        assert found(store, "os.path.join")[0] == "apart"
    finally:
        store.close()
    # The sink's next write makes it again; searches then use it.
    with caplog.at_level(logging.INFO, logger="embedstream.sink"):
        write(url, stream_of({"more": "Another chunk about something else"}, sparse=False))
    assert "full-text index on text made again with the current options" in caplog.text
    table = lancedb.connect(str(tmp_path / "lance")).open_table(SPEC.name)
    details = next(i.index_details for i in table.list_indices() if i.columns == ["text"])
    assert details["with_position"] is True
    assert sorted(details["custom_stop_words"]) == sorted(fts_config("english").custom_stop_words)
    store = open_store(url)
    try:
        assert found(store, "because") == []
        assert found(store, "os.path.join")[0] == "written"
    finally:
        store.close()
    # An index with the current options is kept (compaction at close updates it in place).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embedstream.sink"):
        write(url, stream_of({"again": "One more chunk"}, sparse=False))
    assert "full-text index" not in caplog.text


@pytest.mark.parametrize("language", ["english", "simple", "german"])
def test_an_index_made_with_the_current_options_reads_back_as_them(tmp_path, language):
    table = lancedb.connect(str(tmp_path)).create_table("t", pa.table({"text": ["ein Text", "a text"]}))
    config = fts_config(language)
    table.create_index("text", config=config)
    details = next(i.index_details for i in table.list_indices())
    assert _fts_options(details) == _fts_options(vars(config))
