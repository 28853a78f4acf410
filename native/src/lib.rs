//! embedstream's native core.
//!
//! Pure Rust, usable and testable without Python: `extract` turns bytes into text,
//! `chunk` cuts text into token-bounded pieces, `embed` runs candle embedding models
//! and `speech` Whisper, both built from the numeric blocks in `nn`; `device` and
//! `model_dir` are what loading any model needs. The `python` module (feature
//! `python`, turned on by maturin) is the only place that knows about PyO3.

pub mod chunk;
pub mod device;
pub mod embed;
pub mod error;
pub mod extract;
pub mod limits;
pub mod model_dir;
pub(crate) mod nn;
pub mod sniff;
pub mod speech;

#[cfg(feature = "python")]
mod python;
