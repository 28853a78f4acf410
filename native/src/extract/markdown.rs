//! Markdown: the text a reader sees, with markup removed and headings kept as their
//! own paragraphs.

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

use super::{Document, TextBuilder, HEADING_BREAK, LINE_BREAK, PARAGRAPH_BREAK};
use crate::error::ExtractError;
use crate::limits::Budget;
use crate::sniff;

pub fn extract(source: &str, budget: &Budget) -> Result<Document, ExtractError> {
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_FOOTNOTES
        | Options::ENABLE_YAML_STYLE_METADATA_BLOCKS;
    let mut out = TextBuilder::default();
    let mut title: Option<String> = None;
    let mut h1: Option<String> = None;
    let mut in_metadata = false;
    let mut in_code_block = false;
    for (n, event) in Parser::new_ext(source, options).enumerate() {
        if n.is_multiple_of(1024) {
            budget.check()?;
        }
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                out.breaks(HEADING_BREAK);
                if level == pulldown_cmark::HeadingLevel::H1 && title.is_none() {
                    h1 = Some(String::new());
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                if let Some(text) = h1.take() {
                    title = Some(text.trim().to_string()).filter(|t| !t.is_empty());
                }
                out.breaks(PARAGRAPH_BREAK);
            }
            Event::Start(Tag::MetadataBlock(_)) => in_metadata = true,
            Event::End(TagEnd::MetadataBlock(_)) => in_metadata = false,
            Event::Start(Tag::CodeBlock(_)) => {
                out.breaks(PARAGRAPH_BREAK);
                in_code_block = true;
            }
            Event::End(TagEnd::CodeBlock) => {
                out.breaks(PARAGRAPH_BREAK);
                in_code_block = false;
            }
            Event::Start(Tag::Paragraph | Tag::BlockQuote(_) | Tag::Table(_))
            | Event::End(
                TagEnd::Paragraph | TagEnd::BlockQuote(_) | TagEnd::Table | TagEnd::List(_),
            )
            | Event::Rule => out.breaks(PARAGRAPH_BREAK),
            Event::Start(Tag::Item) | Event::End(TagEnd::TableHead | TagEnd::TableRow) => {
                out.breaks(LINE_BREAK)
            }
            Event::HardBreak => out.breaks(LINE_BREAK),
            Event::End(TagEnd::TableCell) => out.tab(),
            Event::SoftBreak => out.space(),
            Event::Text(text) | Event::Code(text) if !in_metadata => {
                if let Some(h) = h1.as_mut() {
                    h.push_str(&text);
                }
                if in_code_block {
                    out.push_raw(text.trim_end_matches('\n'));
                } else {
                    out.push_raw(&text);
                }
            }
            // Raw HTML, footnote marks, task boxes: markup, not content.
            _ => {}
        }
    }
    let mut doc = Document::single_page(out.finish(), sniff::MARKDOWN);
    doc.title = title;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;

    #[test]
    fn keeps_text_and_headings_drops_markup() {
        let md = "# Title\n\nSome *emphasis* and [a link](http://x).\n\n## Part\n\n- one\n- two\n\n<div>raw</div>\n";
        let doc = extract(md, &Budget::start(&Limits::default())).unwrap();
        assert_eq!(
            doc.text,
            "Title\n\nSome emphasis and a link.\n\n\nPart\n\none\ntwo"
        );
        assert_eq!(doc.title.as_deref(), Some("Title"));
    }
}
