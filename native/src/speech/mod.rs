//! Speech: Whisper's log-mel features of decoded audio, the Whisper model on candle,
//! and transcription with timestamps over windows of 30 s.

pub mod mel;
pub mod transcribe;
pub mod whisper;
