//! Transcription with Whisper: language detection, greedy decoding under Whisper's
//! timestamp rules, and long audio in 30 s windows with the standard seek logic
//! (openai-whisper's `transcribe`, which transformers' long-form generation follows).
//! The logits rules are those of transformers' `generate(return_timestamps=True)`:
//! `begin_suppress_tokens`, then `suppress_tokens` from `generation_config.json`, then
//! the timestamp rules, in that order.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tokenizers::Tokenizer;

use super::mel;
use super::whisper::{argmax, Whisper, WhisperConfig};
use crate::error::EmbedError;
use crate::model_dir;
use crate::nn::dense::LinearKind;

use mel::{HOP_LENGTH as HOP, N_FRAMES, SAMPLE_RATE};
/// Milliseconds per timestamp token.
const TIMESTAMP_MS: u64 = 20;

/// The special tokens decoding needs, found by their text in `tokenizer.json`.
#[derive(Debug, Clone)]
pub struct SpecialTokens {
    pub eot: u32,
    pub sot: u32,
    pub transcribe: u32,
    pub translate: u32,
    pub no_timestamps: u32,
    /// `<|0.00|>`: every id from here on is a timestamp.
    pub timestamp_begin: u32,
    /// Language codes and their tokens, in the model's order (`en` first).
    pub languages: Vec<(String, u32)>,
}

impl SpecialTokens {
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self, EmbedError> {
        let id = |text: &str| {
            tokenizer.token_to_id(text).ok_or_else(|| {
                EmbedError::InvalidModel(format!(
                    "tokenizer.json has no {text} token: not a Whisper tokenizer"
                ))
            })
        };
        let no_timestamps = id("<|notimestamps|>")?;
        let sot = id("<|startoftranscript|>")?;
        let translate = id("<|translate|>")?;
        // Language tokens sit between <|startoftranscript|> and <|translate|>.
        let languages = (sot + 1..translate)
            .filter_map(|i| {
                let token = tokenizer.id_to_token(i)?;
                let code = token.strip_prefix("<|")?.strip_suffix("|>")?;
                Some((code.to_string(), i))
            })
            .collect();
        Ok(Self {
            eot: id("<|endoftext|>")?,
            sot,
            transcribe: id("<|transcribe|>")?,
            translate,
            no_timestamps,
            timestamp_begin: tokenizer
                .token_to_id("<|0.00|>")
                .unwrap_or(no_timestamps + 1),
            languages,
        })
    }

    pub fn language(&self, code: &str) -> Result<u32, EmbedError> {
        self.languages
            .iter()
            .find(|(c, _)| c == code)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                let known: Vec<&str> = self.languages.iter().map(|(c, _)| c.as_str()).collect();
                EmbedError::Unsupported(if known.is_empty() {
                    format!("this Whisper model is English-only; it cannot be set to {code:?}")
                } else {
                    format!(
                        "language {code:?} is not one of this model's: {}",
                        known.join(", ")
                    )
                })
            })
    }
}

/// What `generation_config.json` says about decoding.
#[derive(Debug, Clone, Default)]
pub struct GenerationRules {
    pub suppress_tokens: Vec<u32>,
    pub begin_suppress_tokens: Vec<u32>,
    pub max_initial_timestamp_index: Option<usize>,
}

impl GenerationRules {
    fn from_json(v: Option<&Value>) -> Self {
        let ids = |key: &str| -> Vec<u32> {
            v.and_then(|v| v.get(key))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|n| n as u32)
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            suppress_tokens: ids("suppress_tokens"),
            begin_suppress_tokens: ids("begin_suppress_tokens"),
            max_initial_timestamp_index: v
                .and_then(|v| v.get("max_initial_timestamp_index"))
                .and_then(Value::as_u64)
                .map(|n| n as usize),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Transcribe,
    Translate,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// A language code (`"en"`), or None to detect it from the first window.
    pub language: Option<String>,
    pub task: Task,
    /// Most tokens decoded per 30 s window (Whisper's default: half the decoder's 448).
    pub max_new_tokens: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub start_ms: u64,
    pub end_ms: u64,
    pub text: String,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct Transcript {
    pub language: Option<String>,
    pub segments: Vec<Segment>,
}

pub struct Transcriber {
    pub model: Whisper,
    pub tokenizer: Tokenizer,
    pub specials: SpecialTokens,
    pub rules: GenerationRules,
}

impl Transcriber {
    /// `linears`: int8 or bf16 linear layers and output projection (CPU only, `dtype`
    /// F32), or float ones.
    pub fn load(
        dir: &Path,
        device: &Device,
        dtype: DType,
        linears: LinearKind,
    ) -> Result<Self, EmbedError> {
        let config = model_dir::read_json(&dir.join("config.json"))?.ok_or_else(|| {
            EmbedError::ModelNotFound(format!("{} has no config.json", dir.display()))
        })?;
        let config = WhisperConfig::from_json(&config)?;
        if config.window_frames() != N_FRAMES {
            return Err(EmbedError::InvalidModel(format!(
                "max_source_positions {} does not make Whisper's 30 s window of {N_FRAMES} frames",
                config.max_source_positions
            )));
        }
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(EmbedError::ModelNotFound(format!(
                "{} has no tokenizer.json",
                dir.display()
            )));
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| EmbedError::InvalidModel(format!("{}: {e}", tokenizer_path.display())))?;
        let mut specials = SpecialTokens::from_tokenizer(&tokenizer)?;
        if specials.timestamp_begin as usize + 1501 > config.vocab_size {
            return Err(EmbedError::InvalidModel(format!(
                "vocab_size {} leaves no room for the 1,501 timestamp tokens from id {}",
                config.vocab_size, specials.timestamp_begin
            )));
        }
        let generation = model_dir::read_json(&dir.join("generation_config.json"))?;
        // English-only checkpoints (tiny.en …) keep the language tokens in their
        // vocabulary but were trained without them: their prompt is <|startoftranscript|>.
        let multilingual = generation
            .as_ref()
            .and_then(|g| g.get("is_multilingual"))
            .and_then(Value::as_bool)
            .unwrap_or(config.vocab_size >= 51_865);
        if !multilingual {
            specials.languages.clear();
        }
        let rules = GenerationRules::from_json(generation.as_ref());
        let model = Whisper::load(dir, config, device, dtype, linears)?;
        Ok(Self {
            model,
            tokenizer,
            specials,
            rules,
        })
    }

    /// Log-mel features of up to 30 s of `samples`, zero-padded, as a `[n_mels,
    /// frames]` tensor.
    pub fn features(&self, samples: &[f32]) -> Result<Tensor, EmbedError> {
        let c = &self.model.config;
        let frames = c.window_frames();
        let window = &samples[..samples.len().min(frames * HOP)];
        let mel = mel::log_mel(window, c.num_mel_bins);
        Ok(Tensor::from_vec(
            mel,
            (c.num_mel_bins, frames),
            &self.model.device,
        )?)
    }

    pub fn encode(&self, features: &Tensor) -> Result<Tensor, EmbedError> {
        Ok(self.model.encode(features)?)
    }

    /// The language token the first decoder step likes best; English for an
    /// English-only model.
    pub fn detect_language(&self, encoded: &Tensor) -> Result<Option<String>, EmbedError> {
        if self.specials.languages.is_empty() {
            return Ok(Some("en".into()));
        }
        let logits = self.model.decoder(encoded)?.step(&[self.specials.sot])?;
        let (code, _) = self
            .specials
            .languages
            .iter()
            .max_by(|a, b| {
                logits[a.1 as usize]
                    .total_cmp(&logits[b.1 as usize])
                    .then(b.1.cmp(&a.1))
            })
            .expect("languages is not empty");
        Ok(Some(code.clone()))
    }

    /// `prompt` then `steps` tokens of plain argmax, no rules: the model's own choice.
    pub fn greedy(
        &self,
        encoded: &Tensor,
        prompt: &[u32],
        steps: usize,
    ) -> Result<Vec<u32>, EmbedError> {
        let mut decoder = self.model.decoder(encoded)?;
        let mut tokens = prompt.to_vec();
        let mut logits = decoder.step(prompt)?;
        for _ in 0..steps {
            let next = argmax(&logits) as u32;
            tokens.push(next);
            logits = decoder.step(&[next])?;
        }
        Ok(tokens)
    }

    /// The prompt for one window: start, language, task (and no timestamps if asked).
    pub fn prompt(
        &self,
        language: Option<&str>,
        task: Task,
        timestamps: bool,
    ) -> Result<Vec<u32>, EmbedError> {
        let mut prompt = vec![self.specials.sot];
        match language {
            Some("en") if self.specials.languages.is_empty() => {} // English-only
            Some(code) => prompt.push(self.specials.language(code)?),
            None => {}
        }
        if !self.specials.languages.is_empty() {
            prompt.push(match task {
                Task::Transcribe => self.specials.transcribe,
                Task::Translate => self.specials.translate,
            });
        }
        if !timestamps {
            prompt.push(self.specials.no_timestamps);
        }
        Ok(prompt)
    }

    /// Greedy decoding of one window under the timestamp rules; returns the tokens
    /// after the prompt, up to (not including) the end token.
    pub fn decode_window(
        &self,
        encoded: &Tensor,
        prompt: &[u32],
        max_new: usize,
    ) -> Result<Vec<u32>, EmbedError> {
        let max_new = max_new.min(self.model.config.max_target_positions - prompt.len());
        let mut decoder = self.model.decoder(encoded)?;
        let mut logits = decoder.step(prompt)?;
        let mut sampled: Vec<u32> = Vec::new();
        while sampled.len() < max_new {
            self.apply_rules(&mut logits, &sampled);
            let next = argmax(&logits) as u32;
            if next == self.specials.eot {
                break;
            }
            sampled.push(next);
            if sampled.len() < max_new {
                logits = decoder.step(&[next])?;
            }
        }
        Ok(sampled)
    }

    /// transformers' order: begin suppression, suppression, then the timestamp rules.
    fn apply_rules(&self, logits: &mut [f32], sampled: &[u32]) {
        let s = &self.specials;
        let tb = s.timestamp_begin as usize;
        let forbid = |logits: &mut [f32], range: std::ops::Range<usize>| {
            let end = range.end.min(logits.len());
            for x in &mut logits[range.start.min(end)..end] {
                *x = f32::NEG_INFINITY;
            }
        };
        if sampled.is_empty() {
            for &t in &self.rules.begin_suppress_tokens {
                logits[t as usize] = f32::NEG_INFINITY;
            }
        }
        for &t in &self.rules.suppress_tokens {
            if let Some(x) = logits.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        logits[s.no_timestamps as usize] = f32::NEG_INFINITY;
        let is_ts = |t: &u32| *t >= s.timestamp_begin;
        let last_was_timestamp = sampled.last().is_some_and(is_ts);
        let penultimate_was_timestamp = sampled.len() < 2 || is_ts(&sampled[sampled.len() - 2]);
        if last_was_timestamp {
            if penultimate_was_timestamp {
                forbid(logits, tb..logits.len()); // has to be text
            } else {
                forbid(logits, 0..s.eot as usize); // has to be a timestamp or the end
            }
        }
        // Timestamps never go back.
        if let Some(&last) = sampled.iter().rev().find(|t| is_ts(t)) {
            let from = if last_was_timestamp && !penultimate_was_timestamp {
                last
            } else {
                last + 1
            };
            forbid(logits, tb..from as usize);
        }
        if sampled.is_empty() {
            forbid(logits, 0..tb); // a window starts with a timestamp
            if let Some(max) = self.rules.max_initial_timestamp_index {
                forbid(logits, tb + max + 1..logits.len());
            }
        }
        // When the timestamps together are likelier than any text token, take one.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max.is_finite() {
            let sum_exp = |xs: &[f32]| xs.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>();
            let timestamp_mass = sum_exp(&logits[tb..]);
            let best_text = logits[..tb]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            if timestamp_mass > ((best_text - max) as f64).exp() {
                forbid(logits, 0..tb);
            }
        }
    }

    /// The whole recording, window by window.
    pub fn transcribe(&self, samples: &[f32], options: &Options) -> Result<Transcript, EmbedError> {
        let c = &self.model.config;
        let window = c.window_frames();
        let content_frames = samples.len().div_ceil(HOP);
        let duration_ms = (samples.len() as u64 * 1000) / SAMPLE_RATE as u64;
        let max_new = options
            .max_new_tokens
            .unwrap_or(c.max_target_positions / 2)
            .max(1);
        let mut language = options.language.clone();
        let mut segments = Vec::new();
        let mut seek = 0usize;
        let mut detected = false;
        while seek < content_frames {
            let size = window.min(content_frames - seek);
            let start = seek * HOP;
            let features = self.features(&samples[start..samples.len().min(start + size * HOP)])?;
            let encoded = self.encode(&features)?;
            if language.is_none() && !detected {
                language = self.detect_language(&encoded)?;
                detected = true;
            }
            let prompt = self.prompt(language.as_deref(), options.task, true)?;
            let tokens = self.decode_window(&encoded, &prompt, max_new)?;
            let offset_ms = seek as u64 * 10;
            let (found, advance) = self.split_segments(&tokens, offset_ms, size);
            segments.extend(found.into_iter().filter(|s| !s.text.trim().is_empty()).map(
                |mut s| {
                    s.start_ms = s.start_ms.min(duration_ms);
                    s.end_ms = s.end_ms.clamp(s.start_ms, duration_ms);
                    s
                },
            ));
            // A window that ends on a lone timestamp at 0 would not move: take it whole.
            seek += if advance == 0 { size } else { advance };
        }
        Ok(Transcript { language, segments })
    }

    /// Segments of one window's tokens (offset by the window's start), and how many
    /// of the window's `size` frames they consumed: where the next window starts.
    pub fn split_segments(
        &self,
        tokens: &[u32],
        offset_ms: u64,
        size: usize,
    ) -> (Vec<Segment>, usize) {
        let tb = self.specials.timestamp_begin;
        let is_ts = |t: u32| t >= tb;
        let at = |t: u32| offset_ms + (t - tb) as u64 * TIMESTAMP_MS;
        let single_timestamp_ending = tokens.len() >= 2
            && !is_ts(tokens[tokens.len() - 2])
            && is_ts(tokens[tokens.len() - 1]);
        let mut slices: Vec<usize> = (1..tokens.len())
            .filter(|&i| is_ts(tokens[i - 1]) && is_ts(tokens[i]))
            .collect();
        let mut segments = Vec::new();
        if !slices.is_empty() {
            if single_timestamp_ending {
                slices.push(tokens.len());
            }
            let mut last = 0;
            for &end in &slices {
                let piece = &tokens[last..end];
                if let (Some(&first), Some(&final_)) = (piece.first(), piece.last()) {
                    let start = if is_ts(first) { at(first) } else { offset_ms };
                    let end = if is_ts(final_) { at(final_) } else { start };
                    segments.push(self.segment(piece, start, end));
                }
                last = end;
            }
            let advance = if single_timestamp_ending {
                size
            } else {
                // Up to the last timestamp: two frames per timestamp step.
                ((tokens[last - 1] - tb) as usize * 2).min(size)
            };
            return (segments, advance);
        }
        let mut end_ms = offset_ms + size as u64 * 10;
        if let Some(&last_ts) = tokens.iter().rev().find(|&&t| is_ts(t)) {
            if last_ts != tb {
                end_ms = at(last_ts);
            }
        }
        segments.push(self.segment(tokens, offset_ms, end_ms));
        (segments, size)
    }

    fn segment(&self, tokens: &[u32], start_ms: u64, end_ms: u64) -> Segment {
        let text_tokens: Vec<u32> = tokens
            .iter()
            .copied()
            .filter(|&t| t < self.specials.eot)
            .collect();
        let text = self
            .tokenizer
            .decode(&text_tokens, true)
            .unwrap_or_default();
        Segment {
            start_ms,
            end_ms,
            text,
            tokens: text_tokens,
        }
    }
}
