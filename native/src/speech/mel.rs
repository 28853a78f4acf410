//! Whisper's log-mel features, as transformers' `WhisperFeatureExtractor` computes
//! them: 16 kHz audio padded (or cut) to 30 s, a centred STFT (400-sample periodic
//! Hann window, hop 160, reflect padding), power spectrum, a Slaney-style mel filter
//! bank (area-normalised triangles on the Slaney mel scale, 0 to 8 kHz), `log10` with
//! a floor of 1e-10, the last frame dropped, everything more than 8 below the maximum
//! raised to it, then `(x + 4) / 4`.

use rayon::prelude::*;

/// Samples per second of Whisper's input.
pub const SAMPLE_RATE: usize = 16_000;
/// FFT size and window length.
pub const N_FFT: usize = 400;
/// Samples between frames.
pub const HOP_LENGTH: usize = 160;
/// One window of Whisper's encoder: 30 s.
pub const N_SAMPLES: usize = 30 * SAMPLE_RATE;
/// Frames of one window: 3,000.
pub const N_FRAMES: usize = N_SAMPLES / HOP_LENGTH;
const N_BINS: usize = N_FFT / 2 + 1;

/// `[n_mels, N_FRAMES]` row-major log-mel features of the first 30 s of `samples`
/// (16 kHz mono), zero-padded when shorter.
pub fn log_mel(samples: &[f32], n_mels: usize) -> Vec<f32> {
    let mut padded = vec![0f32; N_SAMPLES];
    let n = samples.len().min(N_SAMPLES);
    padded[..n].copy_from_slice(&samples[..n]);
    let filters = mel_filters(n_mels);
    let (cos, sin) = dft_tables();
    let window: Vec<f64> = (0..N_FFT)
        .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64).cos())
        .collect();
    let half = N_FFT / 2;
    // Frame-major first ([frame][mel]), then transposed: frames run in parallel.
    let mut by_frame = vec![0f32; N_FRAMES * n_mels];
    by_frame
        .par_chunks_mut(n_mels)
        .enumerate()
        .for_each(|(t, out)| {
            let frame: Vec<f64> = (0..N_FFT)
                .map(|i| {
                    reflect(&padded, (t * HOP_LENGTH + i) as isize - half as isize) * window[i]
                })
                .collect();
            let power: Vec<f64> = (0..N_BINS)
                .map(|k| {
                    let (c, s) = (&cos[k * N_FFT..][..N_FFT], &sin[k * N_FFT..][..N_FFT]);
                    let (mut re, mut im) = (0f64, 0f64);
                    for i in 0..N_FFT {
                        re += frame[i] * c[i];
                        im += frame[i] * s[i];
                    }
                    re * re + im * im
                })
                .collect();
            for (m, o) in out.iter_mut().enumerate() {
                let energy: f64 = (0..N_BINS)
                    .map(|k| filters[k * n_mels + m] * power[k])
                    .sum();
                *o = energy.max(1e-10).log10() as f32;
            }
        });
    let max = by_frame.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut out = vec![0f32; n_mels * N_FRAMES];
    for (t, row) in by_frame.chunks(n_mels).enumerate() {
        for (m, &v) in row.iter().enumerate() {
            out[m * N_FRAMES + t] = (v.max(max - 8.0) + 4.0) / 4.0;
        }
    }
    out
}

/// `x[i]` with reflection at both ends (numpy's and torch's "reflect": the edge sample
/// is not repeated).
fn reflect(x: &[f32], i: isize) -> f64 {
    let n = x.len() as isize;
    let i = if i < 0 {
        -i
    } else if i >= n {
        2 * (n - 1) - i
    } else {
        i
    };
    f64::from(x[i as usize])
}

fn dft_tables() -> (Vec<f64>, Vec<f64>) {
    let mut cos = vec![0f64; N_BINS * N_FFT];
    let mut sin = vec![0f64; N_BINS * N_FFT];
    for k in 0..N_BINS {
        for i in 0..N_FFT {
            // The angle reduced modulo N_FFT first: exact tables, no drift at large k·i.
            let angle = 2.0 * std::f64::consts::PI * ((k * i) % N_FFT) as f64 / N_FFT as f64;
            cos[k * N_FFT + i] = angle.cos();
            sin[k * N_FFT + i] = -angle.sin();
        }
    }
    (cos, sin)
}

fn hertz_to_mel(f: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel) = (200.0 / 3.0, 1000.0, 15.0);
    let logstep = 6.4f64.ln() / 27.0;
    if f >= min_log_hz {
        min_log_mel + (f / min_log_hz).ln() / logstep
    } else {
        f / f_sp
    }
}

fn mel_to_hertz(m: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel) = (200.0 / 3.0, 1000.0, 15.0);
    let logstep = 6.4f64.ln() / 27.0;
    if m >= min_log_mel {
        min_log_hz * (logstep * (m - min_log_mel)).exp()
    } else {
        f_sp * m
    }
}

/// `[N_BINS, n_mels]`: Slaney-normalised triangular filters, 0 to 8 kHz.
fn mel_filters(n_mels: usize) -> Vec<f64> {
    let (mel_min, mel_max) = (hertz_to_mel(0.0), hertz_to_mel(8_000.0));
    let centers: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hertz(mel_min + (mel_max - mel_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut filters = vec![0f64; N_BINS * n_mels];
    for k in 0..N_BINS {
        let f = (SAMPLE_RATE / 2) as f64 * k as f64 / (N_BINS - 1) as f64;
        for m in 0..n_mels {
            let down = (f - centers[m]) / (centers[m + 1] - centers[m]);
            let up = (centers[m + 2] - f) / (centers[m + 2] - centers[m + 1]);
            let weight = down.min(up).max(0.0);
            // Slaney normalisation: each triangle has unit area in Hz.
            filters[k * n_mels + m] = weight * 2.0 / (centers[m + 2] - centers[m]);
        }
    }
    filters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_flat_and_a_tone_lights_its_band() {
        let silence = log_mel(&[], 80);
        assert_eq!(silence.len(), 80 * N_FRAMES);
        assert!(silence.iter().all(|&v| (v - silence[0]).abs() < 1e-6));
        let tone: Vec<f32> = (0..SAMPLE_RATE)
            .map(|i| (2.0 * std::f32::consts::PI * 1_000.0 * i as f32 / SAMPLE_RATE as f32).sin())
            .collect();
        let mel = log_mel(&tone, 80);
        // Frame 50 (0.5 s in): the loudest band is the one around 1 kHz.
        let column: Vec<f32> = (0..80).map(|m| mel[m * N_FRAMES + 50]).collect();
        let loudest = (0..80)
            .max_by(|&a, &b| column[a].total_cmp(&column[b]))
            .unwrap();
        let centre = |m: usize| {
            let (lo, hi) = (hertz_to_mel(0.0), hertz_to_mel(8_000.0));
            mel_to_hertz(lo + (hi - lo) * (m + 1) as f64 / 81.0)
        };
        assert!(
            (centre(loudest) - 1_000.0).abs() < 100.0,
            "{}",
            centre(loudest)
        );
        // After the tone ends the frames fall to the floor: max − 8, rescaled.
        let max = mel.iter().copied().fold(f32::MIN, f32::max);
        assert!((mel[10 * N_FRAMES + 2_000] - (max - 2.0)).abs() < 1e-6);
    }
}
