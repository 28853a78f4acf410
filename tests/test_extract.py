"""Extraction of every format from real files, built here or committed."""

from __future__ import annotations

import io
from pathlib import Path

import docgen
import pytest

import operators
from operators import ExtractionError, Limits, extract

SAMPLES = Path(__file__).resolve().parent.parent / "flows" / "samples"


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ExtractionError) as info:
        extract(data, **kwargs)
    assert info.value.reason in operators.EXTRACTION_REASONS
    return info.value.reason


# --- plain text ---------------------------------------------------------------------------


def test_utf8_text_is_kept_verbatim():
    doc = extract("naïve café — 日本語 🙂\nline two".encode(), filename="a.txt")
    assert doc.text == "naïve café — 日本語 🙂\nline two"
    assert doc.mime_type == "text/plain"
    assert doc.pages == [(0, len(doc.text))]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_with_bom(encoding):
    bom = b"\xff\xfe" if encoding.endswith("le") else b"\xfe\xff"
    doc = extract(bom + "Grüße aus Köln".encode(encoding))
    assert doc.text == "Grüße aus Köln"


def test_latin1_fallback_and_declared_charset():
    assert extract(b"caf\xe9 cr\xe8me").text == "café crème"
    assert extract("Ωμέγα".encode("iso-8859-7"), mime_type="text/plain; charset=iso-8859-7").text == "Ωμέγα"


def test_crlf_becomes_lf():
    assert extract(b"a\r\nb\rc").text == "a\nb\nc"


# --- markdown ------------------------------------------------------------------------------


def test_markdown_drops_markup_keeps_headings():
    md = (
        "---\nauthor: me\n---\n\n# Title\n\nSome *emphasis*, `code` and [a link](http://x.y).\n\n"
        "## Section\n\n> quoted\n\n- one\n- two\n\n```python\nprint(1)\n```\n\n<div>html</div>\n"
    )
    doc = extract(md.encode(), filename="doc.md")
    assert doc.mime_type == "text/markdown"
    assert doc.title == "Title"
    assert doc.text == (
        "Title\n\nSome emphasis, code and a link.\n\n\nSection\n\nquoted\n\none\ntwo\n\nprint(1)"
    )
    assert "author" not in doc.text and "http" not in doc.text and "*" not in doc.text


# --- html ----------------------------------------------------------------------------------


def test_html_visible_text_entities_and_blocks():
    html = (
        b"<!doctype html><html lang='de'><head><title>T &amp; C</title><style>.x{}</style></head>"
        b"<body><script>var s = '<p>hidden</p>';</script><h2>Head</h2><p>a&nbsp;b &lt;c&gt; &#x263A;</p>"
        b"<table><tr><td>x</td><td>y</td></tr></table><noscript>no</noscript>tail<br>next</body></html>"
    )
    doc = extract(html)
    assert doc.mime_type == "text/html"
    assert doc.title == "T & C"
    assert doc.metadata["language"] == "de"
    assert doc.text == "Head\n\na\xa0b <c> \u263a\n\nx\ty\n\ntail\nnext"
    assert "hidden" not in doc.text and "no" not in doc.text.split()


def test_html_charset_from_meta():
    html = '<html><head><meta charset="windows-1251"></head><body>Привет</body></html>'.encode("cp1251")
    assert extract(html).text == "Привет"


# --- pdf -----------------------------------------------------------------------------------


def test_pdf_pages_are_exact_spans():
    pages = ["First page\nsecond line", "Page two (with parens)", "Third: 3 > 2"]
    doc = extract(docgen.make_pdf(pages))
    assert doc.mime_type == "application/pdf"
    assert len(doc.pages) == 3
    for (start, end), expected in zip(doc.pages, pages):
        assert doc.text[start:end].split() == expected.split()
    assert doc.metadata["page_count"] == "3"


def test_pdf_uncompressed_streams():
    doc = extract(docgen.make_pdf(["plain stream"], compress=False))
    assert doc.text == "plain stream"


def test_pdf_with_empty_user_password_is_decrypted():
    doc = extract(docgen.make_pdf(["secret but open"], user_password=""))
    assert doc.text == "secret but open"


def test_pdf_with_password_is_encrypted():
    assert reason_of(docgen.make_pdf(["locked"], user_password="hunter2")) == "encrypted"


ENCRYPTED = Path(__file__).resolve().parent / "data" / "encrypted-pdf"
#: Made by tests/fixtures/make_encrypted_pdfs.py with pypdf: every handler it writes.
HANDLERS = ["rc4-40", "rc4-128", "aes-128", "aes-256-r5", "aes-256-r6"]


@pytest.mark.parametrize("handler", HANDLERS)
@pytest.mark.parametrize("variant", ["open", "blank"])
def test_pdf_security_handlers_open_with_the_empty_password(handler, variant):
    # "open": owner password only; "blank": the empty password is the owner's too.
    doc = extract((ENCRYPTED / f"{handler}-{variant}.pdf").read_bytes())
    assert doc.text == f"Quarterly figures, encrypted with {handler}."


@pytest.mark.parametrize("handler", HANDLERS)
def test_pdf_security_handlers_needing_a_password_are_encrypted_never_empty(handler):
    assert reason_of((ENCRYPTED / f"{handler}-locked.pdf").read_bytes()) == "encrypted"


def test_pdf_page_limit():
    data = docgen.make_pdf([f"page {i}" for i in range(5)])
    assert reason_of(data, limits=Limits(max_pages=4)) == "too_large"
    assert len(extract(data, limits=Limits(max_pages=5)).pages) == 5


# --- docx ----------------------------------------------------------------------------------


def test_docx_paragraphs_tables_title():
    data = docgen.make_docx(
        ["First paragraph & more.", "Second <one>."],
        heading="Big heading",
        table=[["a", "b"], ["c", "d"]],
        title="Core title",
    )
    doc = extract(data)
    assert doc.mime_type.endswith("wordprocessingml.document")
    assert doc.title == "Core title"
    assert doc.text == "Big heading\n\nFirst paragraph & more.\n\nSecond <one>.\n\na\tb\nc\td"
    assert doc.metadata["author"] == "embedstream tests"


def test_docx_title_falls_back_to_first_heading():
    assert extract(docgen.make_docx(["body"], heading="Heading title")).title == "Heading title"


# --- images --------------------------------------------------------------------------------


def _pillow(mode: str, fmt: str, size=(40, 30), color=None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color if color is not None else (10, 20, 30, 255)[: len(mode)]).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt", "mime"),
    [
        ("RGB", "PNG", "image/png"),
        ("RGBA", "PNG", "image/png"),
        ("L", "PNG", "image/png"),
        ("RGB", "JPEG", "image/jpeg"),
        ("CMYK", "JPEG", "image/jpeg"),
        ("RGB", "WEBP", "image/webp"),
        ("P", "GIF", "image/gif"),
    ],
)
def test_images_decode_to_rgb(mode, fmt, mime):
    doc = extract(_pillow(mode, fmt, color=0 if mode in ("L", "P") else None))
    assert doc.mime_type == mime
    assert doc.text == ""
    assert (doc.image.width, doc.image.height) == (40, 30)
    assert len(doc.image.data) == 40 * 30 * 3


def test_png_pixels_are_exact():
    doc = extract(docgen.make_png(3, 2, (200, 30, 40)))
    assert doc.image.data == bytes([200, 30, 40]) * 6


def test_image_pixel_limit_and_bomb():
    assert reason_of(docgen.make_png(100, 100), limits=Limits(max_image_pixels=9_999)) == "too_large"
    assert reason_of(docgen.make_png_bomb()) == "too_large"


def test_zero_size_and_truncated_images():
    assert reason_of(docgen.make_png(10, 10)[:60]) == "corrupt"
    jpeg = _pillow("RGB", "JPEG")
    assert reason_of(jpeg[: len(jpeg) // 3]) == "corrupt"


# --- detection and failures ----------------------------------------------------------------


def test_magic_bytes_win_over_extension_and_declared_type_wins_over_both():
    pdf = docgen.make_pdf(["x y"])
    assert extract(pdf, filename="wrong.txt").mime_type == "application/pdf"
    assert extract(b"# not a heading", mime_type="text/plain", filename="a.md").text == "# not a heading"
    assert extract(b"# heading", mime_type="application/octet-stream", filename="a.md").text == "heading"


def test_unsupported_types():
    assert reason_of(b"\x00\x01\x02\x03binary\x00") == "unsupported_type"
    buf = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "x")
    assert reason_of(buf.getvalue()) == "unsupported_type"
    assert reason_of(b"text", mime_type="application/vnd.ms-excel") == "unsupported_type"


def test_empty_inputs():
    assert reason_of(b"") == "empty"
    assert reason_of(b"  \n\t ") == "empty"
    assert reason_of(b"<html><body><script>x()</script></body></html>") == "empty"
    assert reason_of(docgen.make_pdf([""])) == "empty"


def test_corrupt_documents():
    assert reason_of(b"%PDF-1.7\n garbage") == "corrupt"
    assert reason_of(b"PK\x03\x04 word/document.xml truncated zip") == "corrupt"


def test_input_size_limit():
    assert reason_of(b"x" * 2000, limits=Limits(max_input_bytes=1000)) == "too_large"


def test_time_budget_in_process_and_isolated():
    html = b"<p>word</p>" * 5000
    assert reason_of(html, filename="a.html", limits=Limits(timeout_ms=0)) == "timeout"
    assert reason_of(docgen.make_pdf(["p"] * 3), limits=Limits(timeout_ms=0)) == "timeout"


def test_samples_all_extract():
    kinds = {p.suffix: extract(p.read_bytes(), filename=p.name).mime_type for p in SAMPLES.iterdir()}
    assert kinds == {
        ".md": "text/markdown",
        ".html": "text/html",
        ".pdf": "application/pdf",
        ".txt": "text/plain",
        ".png": "image/png",
        ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    }
