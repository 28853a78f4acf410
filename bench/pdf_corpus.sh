#!/usr/bin/env bash
# Fetches a corpus of real-world PDFs (pikepdf's 62 test files: pdfTeX, LibreOffice,
# scanners, forms, encrypted, broken xref; mixed licences, so never committed) into
# a cache folder and runs bench/pdf-compare on it. Prints one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus="${PDF_CORPUS:-$HOME/.cache/embedstream/pdf-corpus}"
if [ ! -d "$corpus" ] || [ -z "$(ls -A "$corpus" 2>/dev/null)" ]; then
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary :all: pikepdf==10.18.0 -d "$tmp"
    mkdir -p "$corpus"
    tar -xzf "$tmp"/pikepdf-*.tar.gz -C "$tmp"
    find "$tmp" -name '*.pdf' -exec cp {} "$corpus" \;
    rm -rf "$tmp"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/embedstream/target}"
cargo run --release -q --manifest-path bench/pdf-compare/Cargo.toml -- "$corpus" "${1:-10}"
