//! HTML: visible text only. A streaming tokenizer rather than a tree builder, so
//! memory and time stay linear and deep nesting cannot recurse.

use std::cell::RefCell;
use std::collections::BTreeMap;

use html5ever::tendril::StrTendril;
use html5ever::tokenizer::states::RawKind;
use html5ever::tokenizer::{
    BufferQueue, Tag, TagKind, Token, TokenSink, TokenSinkResult, Tokenizer, TokenizerOpts,
};

use super::{text, Document, TextBuilder, HEADING_BREAK, LINE_BREAK, PARAGRAPH_BREAK};
use crate::error::ExtractError;
use crate::limits::Budget;
use crate::sniff;

pub fn extract(
    data: &[u8],
    charset: Option<&str>,
    budget: &Budget,
) -> Result<Document, ExtractError> {
    let source = text::decode_html(data, charset);
    let sink = Sink {
        state: RefCell::new(State::default()),
        budget: *budget,
    };
    let input = BufferQueue::default();
    input.push_back(StrTendril::from(source));
    let tokenizer = Tokenizer::new(sink, TokenizerOpts::default());
    let _ = tokenizer.feed(&input);
    tokenizer.end();
    let state = tokenizer.sink.state.into_inner();
    if let Some(err) = state.error {
        return Err(err);
    }
    let title = clean(&state.title).or_else(|| state.first_h1.as_deref().and_then(clean));
    let mut doc = Document::single_page(state.out.finish(), sniff::HTML);
    doc.title = title;
    doc.metadata = state.metadata;
    Ok(doc)
}

fn clean(s: &str) -> Option<String> {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    (!collapsed.is_empty()).then_some(collapsed)
}

#[derive(Default)]
struct State {
    out: TextBuilder,
    /// Inside script, style and other elements whose content is never shown.
    hidden: bool,
    in_title: bool,
    title: String,
    /// Collects the first `<h1>`, a fallback title.
    h1: Option<String>,
    first_h1: Option<String>,
    pre_depth: usize,
    metadata: BTreeMap<String, String>,
    tokens: usize,
    error: Option<ExtractError>,
}

struct Sink {
    state: RefCell<State>,
    budget: Budget,
}

impl TokenSink for Sink {
    type Handle = ();

    fn process_token(&self, token: Token, _line: u64) -> TokenSinkResult<()> {
        let mut state = self.state.borrow_mut();
        state.tokens += 1;
        if state.error.is_some() {
            return TokenSinkResult::Continue;
        }
        if state.tokens.is_multiple_of(1024) {
            if let Err(err) = self.budget.check() {
                state.error = Some(err);
                return TokenSinkResult::Continue;
            }
        }
        match token {
            Token::TagToken(tag) => match tag.kind {
                TagKind::StartTag => return state.start(&tag),
                TagKind::EndTag => state.end(&tag),
            },
            Token::CharacterTokens(chars) => state.characters(&chars),
            _ => {}
        }
        TokenSinkResult::Continue
    }
}

impl State {
    fn start(&mut self, tag: &Tag) -> TokenSinkResult<()> {
        let name: &str = &tag.name;
        match name {
            "script" => {
                self.hidden = true;
                return TokenSinkResult::RawData(RawKind::ScriptData);
            }
            "style" | "noscript" | "iframe" | "noembed" | "noframes" | "xmp" => {
                self.hidden = true;
                return TokenSinkResult::RawData(RawKind::Rawtext);
            }
            "title" => {
                self.in_title = true;
                return TokenSinkResult::RawData(RawKind::Rcdata);
            }
            "textarea" => return TokenSinkResult::RawData(RawKind::Rcdata),
            "template" | "svg" | "math" => self.hidden = true,
            "meta" => self.meta(tag),
            "html" => {
                if let Some(lang) = attr(tag, "lang") {
                    self.metadata.insert("language".into(), lang.to_string());
                }
            }
            "pre" | "listing" => {
                self.pre_depth += 1;
                self.out.breaks(PARAGRAPH_BREAK);
            }
            "br" => self.out.breaks(LINE_BREAK),
            "td" | "th" => self.out.tab(),
            "h1" | "h2" | "h3" | "h4" | "h5" | "h6" => {
                self.out.breaks(HEADING_BREAK);
                if name == "h1" && self.first_h1.is_none() {
                    self.h1 = Some(String::new());
                }
            }
            _ if is_paragraph(name) => self.out.breaks(PARAGRAPH_BREAK),
            _ if is_block(name) => self.out.breaks(LINE_BREAK),
            _ => {}
        }
        TokenSinkResult::Continue
    }

    fn end(&mut self, tag: &Tag) {
        let name: &str = &tag.name;
        match name {
            "script" | "style" | "noscript" | "iframe" | "noembed" | "noframes" | "xmp"
            | "template" | "svg" | "math" => self.hidden = false,
            "title" => self.in_title = false,
            "pre" | "listing" => {
                self.pre_depth = self.pre_depth.saturating_sub(1);
                self.out.breaks(PARAGRAPH_BREAK);
            }
            "h1" | "h2" | "h3" | "h4" | "h5" | "h6" => {
                if let Some(h1) = self.h1.take() {
                    self.first_h1 = Some(h1);
                }
                self.out.breaks(PARAGRAPH_BREAK);
            }
            _ if is_paragraph(name) => self.out.breaks(PARAGRAPH_BREAK),
            _ if is_block(name) => self.out.breaks(LINE_BREAK),
            _ => {}
        }
    }

    fn characters(&mut self, chars: &str) {
        if self.in_title {
            self.title.push_str(chars);
        } else if self.hidden {
        } else {
            if let Some(h1) = self.h1.as_mut() {
                h1.push_str(chars);
            }
            if self.pre_depth > 0 {
                self.out.push_raw(chars);
            } else {
                self.out.push_collapsed(chars);
            }
        }
    }

    fn meta(&mut self, tag: &Tag) {
        let key = attr(tag, "name").or_else(|| attr(tag, "property"));
        if let (Some(key), Some(content)) = (key, attr(tag, "content")) {
            let key = key.to_ascii_lowercase();
            if matches!(
                key.as_str(),
                "description" | "author" | "keywords" | "og:title" | "og:description"
            ) {
                self.metadata.insert(key, content.to_string());
            }
        }
    }
}

fn attr<'a>(tag: &'a Tag, name: &str) -> Option<&'a str> {
    tag.attrs
        .iter()
        .find(|a| &*a.name.local == name)
        .map(|a| &*a.value)
}

fn is_paragraph(name: &str) -> bool {
    matches!(
        name,
        "p" | "blockquote"
            | "table"
            | "ul"
            | "ol"
            | "dl"
            | "section"
            | "article"
            | "aside"
            | "header"
            | "footer"
            | "nav"
            | "main"
            | "figure"
            | "form"
            | "fieldset"
            | "hr"
            | "address"
            | "details"
    )
}

fn is_block(name: &str) -> bool {
    matches!(
        name,
        "div"
            | "li"
            | "tr"
            | "dt"
            | "dd"
            | "caption"
            | "figcaption"
            | "summary"
            | "option"
            | "legend"
            | "body"
            | "center"
            | "thead"
            | "tbody"
            | "tfoot"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;

    fn run(html: &str) -> Document {
        extract(html.as_bytes(), None, &Budget::start(&Limits::default())).unwrap()
    }

    #[test]
    fn visible_text_only() {
        let doc = run("<html lang=en><head><title> My  page </title><style>p{}</style>\
            <script>if (a<b) document.write('<p>no</p>')</script></head>\
            <body><h1>Head</h1><p>One &amp; <b>two</b>\n  words</p><div>x</div><ul><li>a</li><li>b</li></ul></body></html>");
        assert_eq!(doc.text, "Head\n\nOne & two words\n\nx\n\na\nb");
        assert_eq!(doc.title.as_deref(), Some("My page"));
        assert_eq!(doc.metadata.get("language").map(String::as_str), Some("en"));
    }

    #[test]
    fn deep_nesting_is_linear() {
        let html = "<div>".repeat(200_000) + "deep" + &"</div>".repeat(200_000);
        assert_eq!(run(&html).text, "deep");
    }
}
