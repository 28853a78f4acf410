//! Resource limits for untrusted documents, and the per-document time budget.

use std::time::{Duration, Instant};

use crate::error::{ExtractError, Reason};

/// Upper bounds applied while extracting one document. Every limit that trips ends
/// the extraction with [`Reason::TooLarge`] (or [`Reason::Timeout`] for the budget).
/// From Python it arrives as a dict of these field names (`operators.Limits.native()`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "python", derive(pyo3::FromPyObject), pyo3(from_item_all))]
pub struct Limits {
    /// Largest input accepted, in bytes (default 64 MiB).
    pub max_input_bytes: usize,
    /// Most PDF pages extracted (default 2,000).
    pub max_pages: usize,
    /// Most bytes that compressed parts may inflate to, summed over the document:
    /// zip members of a DOCX, Flate streams of a PDF (default 256 MiB).
    pub max_decompressed_bytes: u64,
    /// Most pixels of a decoded image (default 40 megapixels).
    pub max_image_pixels: u64,
    /// Time budget of one document in milliseconds (default 30 s).
    pub timeout_ms: u64,
    /// Longest audio accepted, declared or decoded, in seconds (default 1 hour).
    pub max_audio_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_input_bytes: 64 << 20,
            max_pages: 2_000,
            max_decompressed_bytes: 256 << 20,
            max_image_pixels: 40_000_000,
            timeout_ms: 30_000,
            max_audio_seconds: 3_600,
        }
    }
}

/// A deadline checked cooperatively by the extractors between units of work
/// (pages, paragraphs, tokens). The process pool enforces it pre-emptively too.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    deadline: Instant,
    limit: Duration,
}

impl Budget {
    pub fn start(limits: &Limits) -> Self {
        let limit = Duration::from_millis(limits.timeout_ms);
        Self {
            deadline: Instant::now() + limit,
            limit,
        }
    }

    pub fn check(&self) -> Result<(), ExtractError> {
        if Instant::now() > self.deadline {
            Err(ExtractError::new(
                Reason::Timeout,
                format!(
                    "extraction exceeded its time budget of {} ms",
                    self.limit.as_millis()
                ),
            ))
        } else {
            Ok(())
        }
    }
}
