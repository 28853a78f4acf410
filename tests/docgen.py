"""Builds real documents of every supported format for the tests (and the samples).

Written by hand rather than with a PDF or Office library, so that the tests depend on
nothing heavy and each file is exactly what the test says it is.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib
from typing import Optional

_PDF_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def _pdf_escape(line: str) -> bytes:
    raw = line.encode("cp1252", "replace")
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def make_pdf(
    pages: list[str],
    *,
    compress: bool = True,
    user_password: Optional[str] = None,
    title: Optional[str] = None,
    extra_stream: Optional[bytes] = None,
) -> bytes:
    """A PDF with one text page per entry (lines split on newlines), Helvetica.

    ``user_password`` encrypts it with the standard security handler (RC4, 40-bit);
    ``""`` gives the common case of a file that opens without a password.
    ``extra_stream`` adds a Flate-compressed stream object holding those bytes.
    """
    file_id = hashlib.md5(repr(pages).encode()).digest()
    objects: list[tuple[bytes, Optional[bytes]]] = []  # (dictionary, stream)

    def add(dictionary: bytes, stream: Optional[bytes] = None) -> int:
        objects.append((dictionary, stream))
        return len(objects)

    catalog = add(b"")  # patched below
    pages_obj = add(b"")
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    kids = []
    for text in pages:
        ops = [b"BT /F1 12 Tf 72 720 Td 14 TL"]
        for line in text.split("\n"):
            ops.append(b"(" + _pdf_escape(line) + b") Tj T*")
        ops.append(b"ET")
        content = b"\n".join(ops)
        if compress:
            stream_obj = add(b"<< /Filter /FlateDecode >>", zlib.compress(content))
        else:
            stream_obj = add(b"<< >>", content)
        kids.append(
            add(
                b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] "
                b"/Resources << /Font << /F1 %d 0 R >> >> /Contents %d 0 R >>" % (pages_obj, font, stream_obj)
            )
        )
    if extra_stream is not None:
        add(b"<< /Filter /FlateDecode >>", zlib.compress(extra_stream, 1))
    objects[catalog - 1] = (b"<< /Type /Catalog /Pages %d 0 R >>" % pages_obj, None)
    kid_refs = b" ".join(b"%d 0 R" % k for k in kids)
    objects[pages_obj - 1] = (b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kid_refs, len(kids)), None)
    info = add(b"<< /Title (" + _pdf_escape(title) + b") >>") if title else None

    encrypt_ref, key = None, None
    if user_password is not None:
        owner_key = hashlib.md5((b"owner" + _PDF_PAD)[:32]).digest()[:5]
        user_padded = (user_password.encode("latin-1") + _PDF_PAD)[:32]
        o_entry = _rc4(owner_key, user_padded)
        p_value = -4
        key = hashlib.md5(user_padded + o_entry + struct.pack("<i", p_value) + file_id).digest()[:5]
        u_entry = _rc4(key, _PDF_PAD)
        encrypt_ref = add(
            b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>"
            % (o_entry.hex().encode(), u_entry.hex().encode(), p_value)
        )

    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, (dictionary, stream) in enumerate(objects, start=1):
        offsets.append(out.tell())
        if key is not None and number != encrypt_ref:
            obj_key = hashlib.md5(key + number.to_bytes(3, "little") + b"\x00\x00").digest()[:10]
            if stream is not None:
                stream = _rc4(obj_key, stream)
            if number == info and title:
                dictionary = b"<< /Title <" + _rc4(obj_key, _pdf_escape(title)).hex().encode() + b"> >>"
        out.write(b"%d 0 obj\n" % number)
        if stream is None:
            out.write(dictionary + b"\nendobj\n")
        else:
            dictionary = dictionary[:-2] + b" /Length %d >>" % len(stream)
            out.write(dictionary + b"\nstream\n" + stream + b"\nendstream\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    trailer = b"<< /Size %d /Root %d 0 R /ID [<%s> <%s>]" % (
        len(objects) + 1,
        catalog,
        file_id.hex().encode(),
        file_id.hex().encode(),
    )
    if info:
        trailer += b" /Info %d 0 R" % info
    if encrypt_ref:
        trailer += b" /Encrypt %d 0 R" % encrypt_ref
    out.write(b"trailer\n" + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def _xml_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def make_docx(
    paragraphs: list[str],
    *,
    heading: Optional[str] = None,
    table: Optional[list[list[str]]] = None,
    title: Optional[str] = None,
) -> bytes:
    """A minimal but valid DOCX: optional Heading1, paragraphs, an optional table."""
    w = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
    body = []
    if heading:
        body.append(
            f'<w:p><w:pPr><w:pStyle w:val="Heading1"/></w:pPr><w:r><w:t>{_xml_text(heading)}</w:t></w:r></w:p>'
        )
    for p in paragraphs:
        body.append(f'<w:p><w:r><w:t xml:space="preserve">{_xml_text(p)}</w:t></w:r></w:p>')
    if table:
        rows = "".join(
            "<w:tr>"
            + "".join(f"<w:tc><w:p><w:r><w:t>{_xml_text(c)}</w:t></w:r></w:p></w:tc>" for c in row)
            + "</w:tr>"
            for row in table
        )
        body.append(f"<w:tbl>{rows}</w:tbl>")
    document = f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document {w}><w:body>{"".join(body)}</w:body></w:document>'
    return _docx_zip(document, title)


def _docx_zip(document_xml: str, title: Optional[str] = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
            "</Types>",
        )
        z.writestr(
            "_rels/.rels",
            '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/>'
            "</Relationships>",
        )
        z.writestr("word/document.xml", document_xml)
        if title:
            z.writestr(
                "docProps/core.xml",
                '<?xml version="1.0" encoding="UTF-8"?><cp:coreProperties '
                'xmlns:cp="http://schemas.openxmlformats.org/package/2006/metadata/core-properties" '
                'xmlns:dc="http://purl.org/dc/elements/1.1/">'
                f"<dc:title>{_xml_text(title)}</dc:title><dc:creator>embedstream tests</dc:creator></cp:coreProperties>",
            )
    return buf.getvalue()


def make_zip_bomb_docx(inflated_bytes: int) -> bytes:
    """A DOCX whose document.xml inflates to ``inflated_bytes`` (mostly spaces)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("word/document.xml", "w", force_zip64=True) as f:
            f.write(b'<w:document xmlns:w="urn:w"><w:body><w:p><w:r><w:t>')
            block = b" " * (1 << 20)
            for _ in range(inflated_bytes >> 20):
                f.write(block)
            f.write(b"</w:t></w:r></w:p></w:body></w:document>")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_png(width: int, height: int, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A solid-colour RGB PNG."""
    row = b"\x00" + bytes(rgb) * width
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(row * height))
        + _png_chunk(b"IEND", b"")
    )


def make_png_bomb(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels, with a tiny compressed body."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * (1 << 20), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )
