//! Error types of the core. The Python bindings map each to one exception type.

use std::fmt;

/// Why an extraction failed: a closed set that users can branch on (and that ends
/// up in dead-letter records), so adding a variant is a contract change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    UnsupportedType,
    Corrupt,
    Encrypted,
    TooLarge,
    Timeout,
    Empty,
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::UnsupportedType,
        Reason::Corrupt,
        Reason::Encrypted,
        Reason::TooLarge,
        Reason::Timeout,
        Reason::Empty,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnsupportedType => "unsupported_type",
            Reason::Corrupt => "corrupt",
            Reason::Encrypted => "encrypted",
            Reason::TooLarge => "too_large",
            Reason::Timeout => "timeout",
            Reason::Empty => "empty",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct ExtractError {
    pub reason: Reason,
    pub message: String,
}

impl ExtractError {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(Reason::Corrupt, message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(Reason::TooLarge, message)
    }
}

/// Failures of model loading and inference.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model directory is missing or lacks a file; the message says how to get it.
    #[error("{0}")]
    ModelNotFound(String),
    /// A file exists but cannot be understood (bad JSON, unsupported architecture…).
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// A setting the caller chose that this build cannot honour (device, dtype…).
    #[error("{0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("inference: {0}")]
    Inference(#[from] candle_core::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
