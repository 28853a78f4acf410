//! Audio: decoded with symphonia (WAV, FLAC, MP3, Ogg Vorbis, MP4/M4A with AAC),
//! mixed down to mono and resampled to 16 kHz, the rate speech models take.
//!
//! Untrusted input is bounded three ways: a duration the container declares is
//! checked before decoding (a 20-byte header can claim days of audio), decoding stops
//! once the samples it produced pass the duration or decoded-bytes limit, and the
//! time budget is checked between packets. A stream that breaks off mid-way keeps
//! what decoded before the break only if that is most of it; otherwise it is corrupt.

use std::io::Cursor;

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::Document;
use crate::error::{ExtractError, Reason};
use crate::limits::{Budget, Limits};
use crate::sniff;

/// The rate every decoded clip is resampled to: Whisper's, and most speech models'.
pub const SAMPLE_RATE: u32 = 16_000;

/// Decoded audio: mono, `sample_rate` samples per second, in [-1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

impl Audio {
    pub fn duration_ms(&self) -> u64 {
        self.samples.len() as u64 * 1000 / u64::from(self.sample_rate.max(1))
    }
}

pub fn extract(
    data: &[u8],
    mime_type: &str,
    limits: &Limits,
    budget: &Budget,
) -> Result<Document, ExtractError> {
    let (mono, source_rate, channels) = decode(data, mime_type, limits, budget)?;
    if mono.is_empty() {
        return Err(ExtractError::new(Reason::Empty, "no audio samples decoded"));
    }
    let samples = resample(&mono, source_rate, SAMPLE_RATE);
    budget.check()?;
    let audio = Audio {
        samples,
        sample_rate: SAMPLE_RATE,
    };
    let mut doc = Document::single_page(String::new(), mime_type);
    doc.metadata
        .insert("duration_ms".into(), audio.duration_ms().to_string());
    doc.metadata
        .insert("source_sample_rate".into(), source_rate.to_string());
    doc.metadata.insert("channels".into(), channels.to_string());
    doc.audio = Some(audio);
    Ok(doc)
}

/// The first audio track, mixed down to mono at its own rate: (samples, rate, channels).
fn decode(
    data: &[u8],
    mime_type: &str,
    limits: &Limits,
    budget: &Budget,
) -> Result<(Vec<f32>, u32, usize), ExtractError> {
    let source = MediaSourceStream::new(
        Box::new(Cursor::new(data.to_vec())),
        MediaSourceStreamOptions::default(),
    );
    let mut hint = Hint::new();
    hint.mime_type(mime_type);
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            source,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| map_error(e, "container"))?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| ExtractError::corrupt("no audio track"))?;
    let (track_id, params) = (track.id, track.codec_params.clone());
    let rate = params
        .sample_rate
        .filter(|r| (1_000..=768_000).contains(r))
        .ok_or_else(|| {
            ExtractError::corrupt(format!("implausible sample rate {:?}", params.sample_rate))
        })?;
    let max_seconds = limits.max_audio_seconds;
    if let Some(frames) = params.n_frames {
        // A declared length is checked before anything is decoded (bombs declare much).
        if frames / u64::from(rate) > max_seconds {
            return Err(ExtractError::too_large(format!(
                "audio declares {} s, over the limit of {max_seconds} s",
                frames / u64::from(rate)
            )));
        }
    }
    let max_samples = (max_seconds.saturating_mul(u64::from(rate)))
        .min(limits.max_decompressed_bytes / 4)
        .try_into()
        .unwrap_or(usize::MAX);
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| map_error(e, "codec"))?;
    let mut mono: Vec<f32> = Vec::new();
    let mut buffer: Option<SampleBuffer<f32>> = None;
    let mut channels = params.channels.map(|c| c.count()).unwrap_or(1);
    let mut broken = None;
    loop {
        budget.check()?;
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break
            }
            Err(SymphoniaError::ResetRequired) => break,
            Err(e) => {
                broken = Some(e);
                break;
            }
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            // A damaged packet: skipped, as players do; the stream may recover.
            Err(SymphoniaError::DecodeError(_)) => continue,
            Err(e) => {
                broken = Some(e);
                break;
            }
        };
        let spec = *decoded.spec();
        channels = spec.channels.count().max(1);
        let frames = decoded.frames();
        let buf = match &mut buffer {
            Some(b) if b.capacity() >= frames * channels => b,
            _ => buffer.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
        };
        buf.copy_interleaved_ref(decoded);
        for frame in buf.samples().chunks(channels) {
            mono.push(frame.iter().sum::<f32>() / channels as f32);
        }
        if mono.len() > max_samples {
            return Err(ExtractError::too_large(format!(
                "audio is longer than {max_seconds} s or {} decoded bytes",
                limits.max_decompressed_bytes
            )));
        }
    }
    if let Some(e) = broken {
        // Truncated at the end is common (uploads cut short): keep what came before.
        if mono.is_empty() {
            return Err(map_error(e, "stream"));
        }
    }
    Ok((mono, rate, channels))
}

fn map_error(e: SymphoniaError, what: &str) -> ExtractError {
    match e {
        SymphoniaError::Unsupported(u) => ExtractError::new(
            Reason::UnsupportedType,
            format!("audio {what}: unsupported {u}"),
        ),
        SymphoniaError::LimitError(l) => ExtractError::too_large(format!("audio {what}: {l}")),
        other => ExtractError::corrupt(format!("audio {what}: {other}")),
    }
}

/// Zero crossings of the windowed sinc on each side of an output sample.
const ZERO_CROSSINGS: usize = 16;
/// Kaiser window β: about 80 dB of stop-band attenuation.
const KAISER_BETA: f64 = 8.0;

/// Band-limited resampling by a rational factor (polyphase windowed sinc, Kaiser
/// window), the way soxr and librosa resample: frequencies above the lower Nyquist
/// rate are removed instead of folded back.
pub fn resample(x: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || x.is_empty() {
        return x.to_vec();
    }
    let g = gcd(from, to);
    let (up, down) = ((to / g) as usize, (from / g) as usize);
    // Cut-off at the lower of the two Nyquist rates, slightly inside it.
    let cutoff = 0.97 * (up as f64 / down as f64).min(1.0);
    let half = (ZERO_CROSSINGS as f64 / cutoff).ceil() as usize;
    let taps = 2 * half;
    // Per output phase p (0 ≤ p < up): the filter at input offsets −half+1 ..= half.
    let table: Vec<f32> = (0..up)
        .flat_map(|p| {
            let frac = p as f64 / up as f64;
            (0..taps).map(move |k| {
                let t = k as f64 - (half as f64 - 1.0) - frac;
                (cutoff * sinc(cutoff * t) * kaiser(t / half as f64)) as f32
            })
        })
        .collect();
    let n_out = (x.len() as u64 * up as u64).div_ceil(down as u64) as usize;
    let mut out = Vec::with_capacity(n_out);
    for n in 0..n_out {
        let position = n * down;
        let (base, phase) = (position / up, position % up);
        let filter = &table[phase * taps..(phase + 1) * taps];
        let start = base as isize - (half as isize - 1);
        let mut acc = 0f32;
        if start >= 0 && start as usize + taps <= x.len() {
            let window = &x[start as usize..start as usize + taps];
            acc = window.iter().zip(filter).map(|(a, b)| a * b).sum();
        } else {
            for (k, &h) in filter.iter().enumerate() {
                let i = start + k as isize;
                if i >= 0 && (i as usize) < x.len() {
                    acc += x[i as usize] * h;
                }
            }
        }
        out.push(acc);
    }
    out
}

fn sinc(t: f64) -> f64 {
    if t.abs() < 1e-12 {
        1.0
    } else {
        let pt = std::f64::consts::PI * t;
        pt.sin() / pt
    }
}

/// The Kaiser window at `u` in [-1, 1].
fn kaiser(u: f64) -> f64 {
    if u.abs() > 1.0 {
        return 0.0;
    }
    bessel_i0(KAISER_BETA * (1.0 - u * u).sqrt()) / bessel_i0(KAISER_BETA)
}

fn bessel_i0(x: f64) -> f64 {
    let (mut sum, mut term, mut k) = (1.0, 1.0, 1.0);
    while term > 1e-12 * sum {
        term *= (x / (2.0 * k)).powi(2);
        sum += term;
        k += 1.0;
    }
    sum
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Whether `kind` is one of the audio types this module decodes.
pub fn is_audio(kind: &str) -> bool {
    sniff::AUDIO.contains(&kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(freq: f64, rate: u32, seconds: f64) -> Vec<f32> {
        (0..(rate as f64 * seconds) as usize)
            .map(|i| {
                (2.0 * std::f64::consts::PI * freq * i as f64 / rate as f64).sin() as f32 * 0.5
            })
            .collect()
    }

    fn rms(x: &[f32]) -> f32 {
        (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt()
    }

    #[test]
    fn resampling_keeps_the_pass_band_and_removes_what_would_alias() {
        for from in [44_100, 48_000, 8_000, 22_050] {
            // 1 kHz survives at the same amplitude…
            let kept = resample(&tone(1_000.0, from, 1.0), from, SAMPLE_RATE);
            assert_eq!(kept.len(), SAMPLE_RATE as usize);
            let middle = &kept[2_000..14_000];
            let want = tone(1_000.0, SAMPLE_RATE, 1.0);
            let error: f32 = middle
                .iter()
                .zip(&want[2_000..14_000])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(error < 0.01, "{from} Hz: max error {error}");
            // …while 11 kHz, above the new Nyquist rate, is gone instead of folding to 5 kHz.
            if from > 2 * 11_000 {
                let removed = resample(&tone(11_000.0, from, 1.0), from, SAMPLE_RATE);
                assert!(rms(&removed[2_000..14_000]) < 0.005, "{from} Hz");
            }
        }
    }
}
