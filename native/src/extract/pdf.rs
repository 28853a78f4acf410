//! PDF: per-page text through pdf_oxide. Before parsing, every Flate stream of a
//! file large enough to hold a bomb is inflated once under the decompression limit,
//! so that a stream bomb stops at the limit whatever the parser would do with it.

use std::io::Read;

use flate2::read::ZlibDecoder;
use pdf_oxide::PdfDocument;

use super::{pdf_r5, Document};
use crate::error::{ExtractError, Reason};
use crate::limits::{Budget, Limits};
use crate::sniff;

pub fn extract(data: &[u8], limits: &Limits, budget: &Budget) -> Result<Document, ExtractError> {
    check_stream_sizes(data, limits.max_decompressed_bytes, budget)?;
    let mut doc = PdfDocument::from_bytes(data.to_vec()).map_err(map_error)?;
    if doc.is_encrypted() {
        if let Some(revised) = pdf_r5::as_revision6(data, &doc)? {
            doc = PdfDocument::from_bytes(revised).map_err(map_error)?;
        }
        if !doc.authenticate(b"").map_err(map_error)? {
            return Err(ExtractError::new(Reason::Encrypted, "PDF needs a password"));
        }
    }
    let page_count = doc.page_count().map_err(map_error)?;
    if page_count > limits.max_pages {
        return Err(ExtractError::too_large(format!(
            "PDF has {page_count} pages, over the limit of {}",
            limits.max_pages
        )));
    }
    // No table detection: it re-lays tables out as aligned columns, which embeddings
    // do not need, and it cost 10-20 % of the time per page (bench/extract.py).
    let options = pdf_oxide::converters::ConversionOptions {
        extract_tables: false,
        ..Default::default()
    };
    let mut text = String::new();
    let mut chars = 0;
    let mut pages = Vec::with_capacity(page_count);
    for index in 0..page_count {
        budget.check()?;
        let raw = doc
            .extract_text_with_options(index, &options)
            .map_err(map_error)?;
        let page = raw.replace("\r\n", "\n");
        let page = page.trim();
        if !text.is_empty() && !page.is_empty() {
            text.push_str("\n\n");
            chars += 2;
        }
        let start = chars;
        text.push_str(page);
        chars += page.chars().count();
        pages.push((start, chars));
    }
    let mut document = Document::single_page(text, sniff::PDF);
    document.pages = pages;
    document
        .metadata
        .insert("page_count".into(), page_count.to_string());
    Ok(document)
}

fn map_error(e: pdf_oxide::error::Error) -> ExtractError {
    let message = e.to_string();
    if matches!(e, pdf_oxide::error::Error::EncryptedPdf)
        || message.to_ascii_lowercase().contains("password")
    {
        ExtractError::new(Reason::Encrypted, message)
    } else {
        ExtractError::corrupt(format!("PDF: {message}"))
    }
}

/// The most bytes one byte of deflate data can inflate to (RFC 1951: a 258-byte match
/// in as little as one bit, plus slack).
const MAX_DEFLATE_RATIO: u64 = 1040;

/// Inflates each `stream … endstream` body that starts like zlib data, summing the
/// output, and fails once the sum passes `cap`. Streams that do not inflate are left
/// to the parser: broken data is its business, size is ours.
fn check_stream_sizes(data: &[u8], cap: u64, budget: &Budget) -> Result<(), ExtractError> {
    // Deflate expands at most 1032:1, so a file this small cannot inflate past the cap
    // however its streams are laid out: skip the scan (profiled at a fifth of the time
    // on small PDFs, which pdf_oxide inflates again anyway).
    if (data.len() as u64).saturating_mul(MAX_DEFLATE_RATIO) <= cap {
        return Ok(());
    }
    let mut total: u64 = 0;
    let mut at = 0;
    let mut sink = vec![0u8; 64 << 10];
    while let Some(found) = sniff::find(&data[at..], b"stream") {
        let mut start = at + found + b"stream".len();
        at = start;
        // `endstream` also contains `stream`; only a keyword followed by EOL opens one.
        if data[..start - b"stream".len()].ends_with(b"end") {
            continue;
        }
        match data.get(start..start + 2) {
            Some([b'\r', b'\n']) => start += 2,
            Some([b'\n', _]) | Some([b'\r', _]) => start += 1,
            _ => continue,
        }
        let body = &data[start..];
        if body.first().is_none_or(|b| b & 0x0F != 8) {
            continue; // not zlib (deflate method 8)
        }
        let mut decoder = ZlibDecoder::new(body);
        loop {
            match decoder.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n as u64;
                    if total > cap {
                        return Err(ExtractError::too_large(format!(
                            "PDF streams inflate past the limit of {cap} bytes"
                        )));
                    }
                }
            }
        }
        budget.check()?;
        at = start + (decoder.total_in() as usize).min(body.len());
    }
    Ok(())
}
