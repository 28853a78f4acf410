//! DOCX: paragraphs and tables of `word/document.xml`, title from the core
//! properties. Zip members are inflated under the decompression limit, so a zip bomb
//! stops at the limit instead of filling memory.

use std::io::{Cursor, Read};

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::{text, Document, TextBuilder, HEADING_BREAK, LINE_BREAK, PARAGRAPH_BREAK};
use crate::error::ExtractError;
use crate::limits::{Budget, Limits};
use crate::sniff;

const MAX_ZIP_ENTRIES: usize = 10_000;

pub fn extract(data: &[u8], limits: &Limits, budget: &Budget) -> Result<Document, ExtractError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(data))
        .map_err(|e| ExtractError::corrupt(format!("not a readable zip archive: {e}")))?;
    if zip.len() > MAX_ZIP_ENTRIES {
        return Err(ExtractError::too_large(format!(
            "zip has {} entries",
            zip.len()
        )));
    }
    let mut inflated = Inflated {
        left: limits.max_decompressed_bytes,
    };
    let body = inflated
        .read(&mut zip, "word/document.xml")?
        .ok_or_else(|| ExtractError::corrupt("DOCX without word/document.xml"))?;
    let mut out = TextBuilder::default();
    let first_heading = body_text(&text::decode(&body, None), &mut out, budget)?;
    let core = inflated.read(&mut zip, "docProps/core.xml")?;
    let mut doc = Document::single_page(out.finish(), sniff::DOCX);
    let properties = core
        .map(|c| core_properties(&text::decode(&c, None)))
        .unwrap_or_default();
    for (key, value) in properties {
        if key == "title" {
            doc.title = Some(value);
        } else {
            doc.metadata.insert(key, value);
        }
    }
    doc.title = doc.title.or(first_heading);
    Ok(doc)
}

/// The decompression allowance left for this document.
struct Inflated {
    left: u64,
}

impl Inflated {
    fn read(
        &mut self,
        zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
        name: &str,
    ) -> Result<Option<Vec<u8>>, ExtractError> {
        let entry = match zip.by_name(name) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(zip::result::ZipError::UnsupportedArchive(msg)) if msg.contains("ncrypt") => {
                return Err(ExtractError::new(
                    crate::error::Reason::Encrypted,
                    "encrypted zip member",
                ))
            }
            Err(e) => return Err(ExtractError::corrupt(format!("{name}: {e}"))),
        };
        // The declared size can lie; read one byte past the allowance to find out.
        let mut buf = Vec::new();
        entry
            .take(self.left + 1)
            .read_to_end(&mut buf)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::OutOfMemory => {
                    ExtractError::too_large(format!("{name}: out of memory while inflating"))
                }
                _ => ExtractError::corrupt(format!("{name}: {e}")),
            })?;
        if buf.len() as u64 > self.left {
            return Err(ExtractError::too_large(format!(
                "DOCX inflates past the limit of {} bytes",
                self.left
            )));
        }
        self.left -= buf.len() as u64;
        Ok(Some(buf))
    }
}

/// Writes the body's text into `out`; returns the first Title/Heading paragraph.
fn body_text(
    xml: &str,
    out: &mut TextBuilder,
    budget: &Budget,
) -> Result<Option<String>, ExtractError> {
    let mut reader = Reader::from_str(xml);
    let mut in_text = false;
    let mut table_depth = 0usize;
    let mut paragraph = String::new();
    let mut heading = false;
    let mut first_heading = None;
    let mut events = 0usize;
    loop {
        events += 1;
        if events.is_multiple_of(4096) {
            budget.check()?;
        }
        let event = reader
            .read_event()
            .map_err(|e| ExtractError::corrupt(format!("word/document.xml: {e}")))?;
        match event {
            Event::Start(e) => match e.local_name().as_ref() {
                "t" => in_text = true,
                "p" => {
                    paragraph.clear();
                    heading = false;
                }
                "tbl" => {
                    table_depth += 1;
                    out.breaks(PARAGRAPH_BREAK);
                }
                _ => {}
            },
            Event::Empty(e) => match e.local_name().as_ref() {
                "tab" => out.tab(),
                "br" | "cr" => out.breaks(LINE_BREAK),
                "pStyle" if is_heading_style(&e) => {
                    heading = true;
                    out.breaks(HEADING_BREAK);
                }
                _ => {}
            },
            Event::End(e) => match e.local_name().as_ref() {
                "t" => in_text = false,
                "p" if table_depth > 0 => out.space(),
                "p" => {
                    if heading && first_heading.is_none() && !paragraph.trim().is_empty() {
                        first_heading = Some(paragraph.trim().to_string());
                    }
                    out.breaks(PARAGRAPH_BREAK);
                }
                "tc" => out.tab(),
                "tr" => out.breaks(LINE_BREAK),
                "tbl" => {
                    table_depth = table_depth.saturating_sub(1);
                    out.breaks(PARAGRAPH_BREAK);
                }
                _ => {}
            },
            Event::Text(t) if in_text => {
                let content = t.xml10_content();
                paragraph.push_str(&content);
                out.push_raw(&content);
            }
            Event::GeneralRef(r) if in_text => {
                if let Some(c) = resolve_entity(&r) {
                    let mut buf = [0u8; 4];
                    paragraph.push(c);
                    out.push_raw(c.encode_utf8(&mut buf));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(first_heading)
}

fn resolve_entity(r: &quick_xml::events::BytesRef<'_>) -> Option<char> {
    if r.is_char_ref() {
        return r.resolve_char_ref().ok().flatten();
    }
    match r.xml10_content().as_ref() {
        "amp" => Some('&'),
        "lt" => Some('<'),
        "gt" => Some('>'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        _ => None,
    }
}

fn is_heading_style(e: &BytesStart<'_>) -> bool {
    e.attributes().flatten().any(|a| {
        a.key.local_name().as_ref() == "val"
            && (a.value.starts_with("Heading") || a.value.as_ref() == "Title")
    })
}

/// `dc:title`, `dc:creator`, `dcterms:created`… of `docProps/core.xml`.
fn core_properties(xml: &str) -> Vec<(String, String)> {
    let mut reader = Reader::from_str(xml);
    let mut current: Option<String> = None;
    let mut found = Vec::new();
    while let Ok(event) = reader.read_event() {
        match event {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_string();
                current = matches!(
                    name.as_str(),
                    "title" | "creator" | "created" | "modified" | "subject"
                )
                .then_some(name);
            }
            Event::Text(t) => {
                if let Some(key) = current.take() {
                    let value = t.xml10_content().trim().to_string();
                    if !value.is_empty() {
                        let key = if key == "creator" {
                            "author".to_string()
                        } else {
                            key
                        };
                        found.push((key, value));
                    }
                }
            }
            Event::End(_) => current = None,
            Event::Eof => break,
            _ => {}
        }
    }
    found
}
