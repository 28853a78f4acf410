//! Speech: what turns decoded audio into model input (Whisper's log-mel features).
//! The Whisper model itself comes next, in its own module.

pub mod mel;
