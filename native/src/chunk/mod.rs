//! Token-bounded chunks at the strongest boundary that fits.
//!
//! Boundaries come from `text-splitter`: runs of newlines (three set off a heading,
//! two a paragraph, as the extractors write them), then sentences, words,
//! graphemes. Sizes are counted in the model's own tokens, so a chunk plus the
//! special tokens never exceeds the model's limit and nothing is truncated later.
//!
//! Two ways to place the cuts: [`Strategy::Greedy`] packs each chunk as full as it
//! can (`text-splitter`); [`Strategy::Stable`] picks among the last boundaries that
//! fit by a hash of the text around them, so an edit changes the chunks near it and
//! not every chunk after it ([`stable`]).

mod stable;

use rayon::prelude::*;
use text_splitter::{ChunkConfig, TextSplitter};
use tokenizers::Tokenizer;

use crate::error::EmbedError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub index: usize,
    /// Code-point offsets into the document text.
    pub char_start: usize,
    pub char_end: usize,
    /// 1-based page, for paged documents.
    pub page: Option<usize>,
    /// Tokens the model sees for this chunk, special tokens included.
    pub n_tokens: usize,
}

/// How cuts are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// As full as possible: every cut after an edit moves.
    Greedy,
    /// Content-defined: cuts away from an edit stay where they were.
    Stable,
}

impl Strategy {
    pub fn parse(name: &str) -> Result<Self, EmbedError> {
        match name {
            "greedy" => Ok(Self::Greedy),
            "stable" => Ok(Self::Stable),
            other => Err(EmbedError::Unsupported(format!(
                "chunking {other:?}: use \"greedy\" or \"stable\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Greedy => "greedy",
            Self::Stable => "stable",
        }
    }
}

pub struct Chunker {
    splitter: TextSplitter<Tokenizer>,
    tokenizer: Tokenizer,
    /// Tokens left for text once the special tokens are in.
    capacity: usize,
    pub max_tokens: usize,
    pub overlap_tokens: usize,
    pub strategy: Strategy,
}

impl Chunker {
    /// `tokenizer` must not truncate. `max_tokens` includes the special tokens.
    pub fn new(
        tokenizer: Tokenizer,
        max_tokens: usize,
        overlap_tokens: usize,
        strategy: Strategy,
    ) -> Result<Self, EmbedError> {
        let special = tokenizer
            .encode("", true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?
            .len();
        let capacity = max_tokens
            .checked_sub(special)
            .filter(|c| *c >= 4)
            .ok_or_else(|| {
                EmbedError::Unsupported(format!(
                "max_tokens {max_tokens} leaves no room for text after {special} special tokens"
            ))
            })?;
        let config = ChunkConfig::new(capacity)
            .with_sizer(tokenizer.clone())
            .with_overlap(overlap_tokens)
            .map_err(|e| {
                EmbedError::Unsupported(format!("overlap_tokens {overlap_tokens}: {e}"))
            })?;
        Ok(Self {
            splitter: TextSplitter::new(config),
            tokenizer,
            capacity,
            max_tokens,
            overlap_tokens,
            strategy,
        })
    }

    /// Chunks `text`. With `pages` (code-point spans), chunks never cross a page and
    /// carry its 1-based number.
    pub fn chunk(
        &self,
        text: &str,
        pages: Option<&[(usize, usize)]>,
    ) -> Result<Vec<Chunk>, EmbedError> {
        if self.strategy == Strategy::Stable {
            return self.chunk_stable(text, pages);
        }
        let mut spans: Vec<(usize, usize, Option<usize>)> = Vec::new();
        match pages {
            Some(pages) => {
                let byte_at = char_to_byte_offsets(text);
                for (n, &(start, end)) in pages.iter().enumerate() {
                    let (Some(&b0), Some(&b1)) = (byte_at.get(start), byte_at.get(end)) else {
                        return Err(EmbedError::Unsupported(format!(
                            "page span {start}..{end} is outside the text"
                        )));
                    };
                    for c in self.splitter.chunk_char_indices(&text[b0..b1]) {
                        let char_start = start + c.char_offset;
                        spans.push((
                            char_start,
                            char_start + c.chunk.chars().count(),
                            Some(n + 1),
                        ));
                    }
                }
            }
            None => {
                for c in self.splitter.chunk_char_indices(text) {
                    spans.push((c.char_offset, c.char_offset + c.chunk.chars().count(), None));
                }
            }
        }
        let byte_at = char_to_byte_offsets(text);
        spans
            .par_iter()
            .enumerate()
            .map(|(index, &(char_start, char_end, page))| {
                let piece = &text[byte_at[char_start]..byte_at[char_end]];
                let n_tokens = self
                    .tokenizer
                    .encode_fast(piece, true)
                    .map_err(|e| EmbedError::Tokenizer(e.to_string()))?
                    .len();
                Ok(Chunk {
                    index,
                    char_start,
                    char_end,
                    page,
                    n_tokens,
                })
            })
            .collect()
    }
}

impl Chunker {
    fn chunk_stable(
        &self,
        text: &str,
        pages: Option<&[(usize, usize)]>,
    ) -> Result<Vec<Chunk>, EmbedError> {
        let byte_at = char_to_byte_offsets(text);
        let whole = [(0, byte_at.len() - 1)];
        let (segments, paged) = match pages {
            Some(pages) => (pages, true),
            None => (&whole[..], false),
        };
        let mut chunks = Vec::new();
        for (n, &(start, end)) in segments.iter().enumerate() {
            let (Some(&b0), Some(&b1)) = (byte_at.get(start), byte_at.get(end)) else {
                return Err(EmbedError::Unsupported(format!(
                    "page span {start}..{end} is outside the text"
                )));
            };
            let segment = &text[b0..b1];
            let spans = stable::chunk_spans(
                &self.tokenizer,
                segment,
                self.capacity,
                self.max_tokens,
                self.overlap_tokens,
            )?;
            for (a, b, n_tokens) in spans {
                // Byte offsets in the segment to code-point offsets in the text.
                let char_start = byte_at.partition_point(|&x| x < b0 + a);
                let char_end = byte_at.partition_point(|&x| x < b0 + b);
                chunks.push(Chunk {
                    index: chunks.len(),
                    char_start,
                    char_end,
                    page: paged.then_some(n + 1),
                    n_tokens,
                });
            }
        }
        Ok(chunks)
    }
}

/// Byte offset of every code point, plus one past the end.
fn char_to_byte_offsets(text: &str) -> Vec<usize> {
    text.char_indices()
        .map(|(b, _)| b)
        .chain(std::iter::once(text.len()))
        .collect()
}
