"""Extraction throughput: PDF pages/s and HTML/Markdown/DOCX documents/s, beside
pypdf and BeautifulSoup when installed, plus the cost of process isolation.

    python bench/extract.py [--docs 200] [--repeat 3] [--pdf-corpus DIR]

Prints one JSON object with the figures and ratios.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import docgen  # noqa: E402
from corpus import topics  # noqa: E402

import operators  # noqa: E402
from operators import _native  # noqa: E402


def best_of(fn, repeat: int) -> float:
    fn()
    return statistics.median(_time(fn) for _ in range(repeat))


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_corpus(n: int) -> dict[str, list[bytes]]:
    items = list(topics().items())
    docs: dict[str, list[bytes]] = {"pdf": [], "html": [], "md": [], "docx": []}
    for i in range(n):
        name, text = items[i % len(items)]
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        body = "".join(f"<p>{html.escape(p)}</p>\n" for p in paras)
        docs["html"].append(
            (
                f"<!doctype html><html><head><title>{name}</title><style>p{{margin:0}}</style>"
                f"<script>var x = 1;</script></head><body><nav><a href='/'>Home</a></nav>"
                f"<h1>{name}</h1>{body}<footer>footer</footer></body></html>"
            ).encode()
        )
        docs["md"].append((f"# {name}\n\n" + "\n\n".join(paras)).encode())
        docs["docx"].append(docgen.make_docx(paras, heading=name))
        if i < max(10, n // 10):
            # ~45 lines a page, as a text-heavy report would have.
            lines = [line for p in paras for line in _wrap(p, 90)]
            pages = ["\n".join(lines[k : k + 45]) for k in range(0, max(len(lines), 1), 45)]
            docs["pdf"].append(docgen.make_pdf(pages))
    return docs


def _wrap(text: str, width: int) -> list[str]:
    out, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*out, line] if line else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pdf-corpus", type=Path, default=Path.home() / ".cache/embedstream/pdf-corpus")
    args = parser.parse_args()

    docs = make_corpus(args.docs)
    limits = operators.Limits().native()
    native = lambda data, name: _native.extract(data, None, name, limits)  # noqa: E731
    result: dict[str, object] = {"benchmark": "extract", "docs": {k: len(v) for k, v in docs.items()}}

    # PDF: generated text PDFs, plus real ones from the corpus where present.
    pdfs = list(docs["pdf"])
    if args.pdf_corpus.is_dir():
        for path in sorted(args.pdf_corpus.glob("*.pdf")):
            data = path.read_bytes()
            try:
                native(data, path.name)
                pdfs.append(data)
            except operators.ExtractionError:
                pass
    try:
        import pypdf
    except ImportError:
        pypdf = None
    if pypdf is not None:
        # Compare on the files both read: pypdf raises on some real-world PDFs.
        def pypdf_reads(data: bytes) -> bool:
            try:
                for page in pypdf.PdfReader(io.BytesIO(data)).pages:
                    page.extract_text()
                return True
            except Exception:
                return False

        pypdf_failures = sum(not pypdf_reads(d) for d in pdfs)
        pdfs = [d for d in pdfs if pypdf_reads(d)]
    pages = sum(len(native(d, "a.pdf")["pages"]) for d in pdfs)
    ours_pdf = best_of(lambda: [native(d, "a.pdf") for d in pdfs], args.repeat)
    isolated_pdf = best_of(lambda: [operators.extract(d) for d in pdfs], args.repeat)
    pdf: dict[str, object] = {
        "files": len(pdfs),
        "pages": pages,
        "embedstream_pages_per_s": round(pages / ours_pdf, 1),
        "embedstream_isolated_pages_per_s": round(pages / isolated_pdf, 1),
        "isolation_overhead_ms_per_doc": round((isolated_pdf - ours_pdf) / len(pdfs) * 1000, 3),
    }
    if pypdf is not None:

        def run_pypdf():
            for d in pdfs:
                for page in pypdf.PdfReader(io.BytesIO(d)).pages:
                    page.extract_text()

        pypdf_s = best_of(run_pypdf, args.repeat)
        pdf["pypdf_pages_per_s"] = round(pages / pypdf_s, 1)
        pdf["ratio_vs_pypdf"] = round(pypdf_s / ours_pdf, 1)
        pdf["pypdf_failed_files_excluded"] = pypdf_failures
    else:
        pdf["pypdf"] = "not installed"
    result["pdf"] = pdf

    html_docs = docs["html"]
    ours_html = best_of(lambda: [native(d, "a.html") for d in html_docs], args.repeat)
    out: dict[str, object] = {"embedstream_docs_per_s": round(len(html_docs) / ours_html, 1)}
    try:
        from bs4 import BeautifulSoup

        def run_bs4():
            for d in html_docs:
                soup = BeautifulSoup(d, "html.parser")
                for tag in soup(["script", "style"]):
                    tag.decompose()
                soup.get_text("\n")

        bs4_s = best_of(run_bs4, args.repeat)
        out["beautifulsoup_docs_per_s"] = round(len(html_docs) / bs4_s, 1)
        out["ratio_vs_beautifulsoup"] = round(bs4_s / ours_html, 1)
    except ImportError:
        out["beautifulsoup"] = "not installed"
    result["html"] = out

    for kind, name in (("md", "a.md"), ("docx", "a.docx")):
        seconds = best_of(lambda kind=kind, name=name: [native(d, name) for d in docs[kind]], args.repeat)
        result[kind] = {"embedstream_docs_per_s": round(len(docs[kind]) / seconds, 1)}
    isolated_docx = best_of(lambda: [operators.extract(d) for d in docs["docx"]], args.repeat)
    result["docx"]["embedstream_isolated_docs_per_s"] = round(len(docs["docx"]) / isolated_docx, 1)
    result["encrypted_pdfs"] = encrypted_outcomes(args.pdf_corpus)
    print(json.dumps(result, indent=2))


def encrypted_outcomes(corpus: Path) -> dict[str, object]:
    """Encrypted PDFs by outcome, ours and pypdf's: the handler fixtures of the tests
    (every handler pypdf writes) and the corpus files that carry an /Encrypt entry."""
    files = sorted((ROOT / "tests" / "data" / "encrypted-pdf").glob("*.pdf"))
    if corpus.is_dir():
        files += [p for p in sorted(corpus.glob("*.pdf")) if b"/Encrypt" in p.read_bytes()]
    ours: dict[str, int] = {}
    for path in files:
        try:
            outcome = "text" if operators.extract(path.read_bytes()).text.strip() else "no_text"
        except operators.ExtractionError as e:
            outcome = e.reason
        ours[outcome] = ours.get(outcome, 0) + 1
    out: dict[str, object] = {"files": len(files), "embedstream": ours}
    try:
        import pypdf
    except ImportError:
        out["pypdf"] = "not installed"
        return out
    theirs: dict[str, int] = {}
    for path in files:
        try:
            reader = pypdf.PdfReader(io.BytesIO(path.read_bytes()))
            if reader.is_encrypted and not reader.decrypt(""):
                outcome = "encrypted"
            else:
                text = "".join(page.extract_text() or "" for page in reader.pages)
                outcome = "text" if text.strip() else "no_text"
        except Exception as e:  # pypdf raises its own types, or DependencyError without cryptography
            outcome = type(e).__name__
        theirs[outcome] = theirs.get(outcome, 0) + 1
    out["pypdf"] = theirs
    return out


if __name__ == "__main__":
    main()
