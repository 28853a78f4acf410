//! embedstream's native core.
//!
//! Pure Rust, usable and testable without Python: `extract` turns bytes into text,
//! `chunk` cuts text into token-bounded pieces, `embed` runs candle models. The
//! `python` module (feature `python`, turned on by maturin) is the only place that
//! knows about PyO3.

pub mod chunk;
pub mod cpu;
pub mod embed;
pub mod error;
pub mod extract;
pub mod limits;
pub mod sniff;
pub mod speech;

#[cfg(feature = "python")]
mod python;
