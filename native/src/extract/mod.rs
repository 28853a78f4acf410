//! Bytes in, text out: one module per format, one entry point.

pub mod audio;
mod docx;
mod html;
mod image;
mod markdown;
mod pdf;
mod pdf_r5;
mod text;

use std::collections::BTreeMap;

use crate::error::{ExtractError, Reason};
use crate::limits::{Budget, Limits};
use crate::sniff;
pub use audio::Audio;

/// A decoded image, always 8-bit RGB, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// The result of extraction. Offsets in `pages` count Unicode code points, the way
/// Python indexes `str`.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub text: String,
    pub mime_type: String,
    pub pages: Vec<(usize, usize)>,
    pub title: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub image: Option<RgbImage>,
    /// Decoded audio (audio documents, whose `text` is empty until transcribed).
    pub audio: Option<Audio>,
}

impl Document {
    fn single_page(text: String, mime_type: &str) -> Self {
        let chars = text.chars().count();
        Self {
            text,
            mime_type: mime_type.to_string(),
            pages: vec![(0, chars)],
            title: None,
            metadata: BTreeMap::new(),
            image: None,
            audio: None,
        }
    }
}

/// Extracts the text (or pixels) of one document.
///
/// `mime_type` wins over sniffing when given (`application/octet-stream` counts as
/// not given); `filename` only breaks ties that the bytes leave open.
pub fn extract(
    data: &[u8],
    mime_type: Option<&str>,
    filename: Option<&str>,
    limits: &Limits,
) -> Result<Document, ExtractError> {
    if data.len() > limits.max_input_bytes {
        return Err(ExtractError::too_large(format!(
            "input is {} bytes, over the limit of {}",
            data.len(),
            limits.max_input_bytes
        )));
    }
    if data.is_empty() {
        return Err(ExtractError::new(Reason::Empty, "input is empty"));
    }
    let (declared, charset) = match mime_type.map(sniff::normalize) {
        Some((essence, charset)) if essence != sniff::OCTET_STREAM && !essence.is_empty() => {
            (Some(essence), charset)
        }
        _ => (None, None),
    };
    let kind = match &declared {
        Some(essence) => essence.as_str(),
        None => resolve_sniffed(data, filename)?,
    };
    let budget = Budget::start(limits);
    let charset = charset.as_deref();
    let doc = match kind {
        sniff::PLAIN => Document::single_page(text::decode(data, charset), sniff::PLAIN),
        sniff::MARKDOWN => markdown::extract(&text::decode(data, charset), &budget)?,
        sniff::HTML => html::extract(data, charset, &budget)?,
        sniff::PDF => pdf::extract(data, limits, &budget)?,
        sniff::DOCX => docx::extract(data, limits, &budget)?,
        sniff::PNG | sniff::JPEG | sniff::GIF | sniff::WEBP => image::extract(data, kind, limits)?,
        kind if audio::is_audio(kind) => audio::extract(data, kind, limits, &budget)?,
        other => {
            return Err(ExtractError::new(
                Reason::UnsupportedType,
                format!(
                    "unsupported media type {other:?}; supported: {}",
                    sniff::SUPPORTED.join(", ")
                ),
            ))
        }
    };
    if doc.image.is_none() && doc.audio.is_none() && doc.text.trim().is_empty() {
        return Err(ExtractError::new(
            Reason::Empty,
            format!("no text found in {} document", doc.mime_type),
        ));
    }
    Ok(doc)
}

fn resolve_sniffed(data: &[u8], filename: Option<&str>) -> Result<&'static str, ExtractError> {
    match sniff::sniff(data, filename) {
        sniff::ZIP => Err(ExtractError::new(
            Reason::UnsupportedType,
            "zip archive that is not a DOCX document",
        )),
        sniff::CFB if filename.is_some_and(|f| f.to_ascii_lowercase().ends_with(".docx")) => Err(
            ExtractError::new(Reason::Encrypted, "password-protected Office document"),
        ),
        sniff::CFB | sniff::OCTET_STREAM => Err(ExtractError::new(
            Reason::UnsupportedType,
            "binary data of an unsupported type",
        )),
        kind => Ok(kind),
    }
}

/// Accumulates extracted text, turning structure into line breaks lazily so that the
/// result never starts or ends with whitespace and a heading is set off more strongly
/// than a paragraph (three newlines against two), which the chunker uses as
/// boundaries of decreasing strength.
#[derive(Debug, Default)]
pub(crate) struct TextBuilder {
    text: String,
    chars: usize,
    pending_breaks: u8,
    pending_space: bool,
    pending_tab: bool,
}

pub(crate) const HEADING_BREAK: u8 = 3;
pub(crate) const PARAGRAPH_BREAK: u8 = 2;
pub(crate) const LINE_BREAK: u8 = 1;

impl TextBuilder {
    /// Requests at least `n` newlines before the next text.
    pub fn breaks(&mut self, n: u8) {
        self.pending_breaks = self.pending_breaks.max(n);
    }

    pub fn space(&mut self) {
        self.pending_space = true;
    }

    /// A cell separator; weaker than a line break.
    pub fn tab(&mut self) {
        self.pending_tab = true;
    }

    fn flush_pending(&mut self) {
        if self.text.is_empty() {
            // Nothing to separate from yet.
        } else if self.pending_breaks > 0 {
            while self.text.ends_with([' ', '\t']) {
                self.text.pop();
                self.chars -= 1;
            }
            let have = self.text.chars().rev().take_while(|&c| c == '\n').count() as u8;
            for _ in have..self.pending_breaks {
                self.text.push('\n');
                self.chars += 1;
            }
        } else if self.pending_tab {
            self.text.push('\t');
            self.chars += 1;
        } else if self.pending_space && !self.text.ends_with([' ', '\n', '\t']) {
            self.text.push(' ');
            self.chars += 1;
        }
        self.pending_breaks = 0;
        self.pending_space = false;
        self.pending_tab = false;
    }

    /// Appends text as it is (whitespace kept), after any pending separator.
    pub fn push_raw(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        self.flush_pending();
        self.text.push_str(s);
        self.chars += s.chars().count();
    }

    /// Appends running text with HTML's whitespace rules: runs of ASCII whitespace
    /// collapse to one space (a no-break space is content, not whitespace).
    pub fn push_collapsed(&mut self, s: &str) {
        let is_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c');
        let mut words = s.split(is_space).peekable();
        if s.starts_with(is_space) {
            self.space();
        }
        while let Some(word) = words.next() {
            if word.is_empty() {
                continue;
            }
            self.push_raw(word);
            if words.peek().is_some() {
                self.space();
            }
        }
        if s.ends_with(is_space) {
            self.space();
        }
    }

    pub fn finish(self) -> String {
        let mut text = self.text;
        text.truncate(text.trim_end().len());
        text
    }
}
