"""Hostile input: random and mutated bytes of every format, bombs and traps.

Whatever the bytes, the caller survives and gets a Document or an ExtractionError.
"""

from __future__ import annotations

import io

import docgen
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators import Document, ExtractionError, Limits, extract

FAST = Limits(timeout_ms=5_000, max_memory_bytes=512 << 20)


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 16), (9, 99, 199)).save(buf, "JPEG")
    return buf.getvalue()


SEEDS = {
    "pdf": docgen.make_pdf(["First page of text", "Second page"]),
    "pdf-raw": docgen.make_pdf(["uncompressed"], compress=False),
    "docx": docgen.make_docx(["para one", "para two"], heading="H", table=[["a", "b"]], title="T"),
    "png": docgen.make_png(8, 8),
    "jpeg": _jpeg(),
    "html": b"<html><head><title>t</title></head><body><h1>x</h1><p>a &amp; b</p></body></html>",
    "md": b"# t\n\n- a\n- b\n\n```\ncode\n```\n",
    "txt": "plain text ünïcödé".encode(),
}


def _outcome(data: bytes, **kwargs):
    try:
        doc = extract(data, limits=FAST, **kwargs)
    except ExtractionError as e:
        return e
    assert isinstance(doc, Document)
    for start, end in doc.pages:
        assert 0 <= start <= end <= len(doc.text)
    return doc


@st.composite
def mutated(draw):
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 64))]
    return name, bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_real_files(case):
    name, data = case
    _outcome(data, filename=f"file.{name.split('-')[0]}")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096), st.sampled_from([None, "a.pdf", "a.docx", "a.png", "a.html", "a.md"]))
def test_random_bytes(data, filename):
    _outcome(data, filename=filename)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048), st.sampled_from(["%PDF-1.4\n", "PK\x03\x04", "\x89PNG\r\n\x1a\n", "GIF89a"]))
def test_random_bytes_behind_real_magic(data, magic):
    _outcome(magic.encode("latin-1") + data)


def _reason(data: bytes, limits: Limits = FAST, **kwargs) -> str:
    with pytest.raises(ExtractionError) as info:
        extract(data, limits=limits, **kwargs)
    return info.value.reason


def test_zip_bomb_docx_stops_at_the_limit():
    bomb = docgen.make_zip_bomb_docx(300 << 20)
    assert len(bomb) < 2 << 20
    assert _reason(bomb) == "too_large"


def test_pdf_stream_bomb_stops_at_the_limit():
    bomb = docgen.make_pdf(["tiny text"], extra_stream=b"\0" * (300 << 20))
    assert len(bomb) < 2 << 20
    assert _reason(bomb) == "too_large"
    assert extract(bomb, limits=Limits(max_decompressed_bytes=512 << 20)).text == "tiny text"


def test_png_decompression_bomb():
    assert _reason(docgen.make_png_bomb()) == "too_large"


def test_deeply_nested_structures():
    depth = 100_000
    html = b"<div>" * depth + b"deep" + b"</div>" * depth
    assert extract(html, filename="a.html").text == "deep"
    md = b">" * depth + b" quoted"
    assert _outcome(md, filename="a.md") is not None
    lists = b"".join(b"  " * i + b"- item\n" for i in range(2000))
    assert _outcome(lists, filename="a.md") is not None
    xml = (
        '<w:document xmlns:w="urn:w"><w:body>'
        + "<w:sdt>" * depth
        + "<w:p><w:r><w:t>deep</w:t></w:r></w:p>"
        + "</w:sdt>" * depth
        + "</w:body></w:document>"
    )
    docx = docgen._docx_zip(xml)
    assert extract(docx).text == "deep"
    nested_pdf = docgen.make_pdf(["x"]).replace(
        b"/Type /Catalog", b"/Type /Catalog /Deep " + b"[" * 50_000 + b"]" * 50_000
    )
    assert _outcome(nested_pdf) is not None
