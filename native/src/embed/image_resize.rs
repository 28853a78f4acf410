//! Image resizing as Pillow does it (`Image.resize` on 8-bit images), reproduced
//! exactly: separable convolution, horizontal pass first, 8-bit rounding between
//! passes, coefficients in fixed point with 22 fractional bits. Model preprocessors in
//! Python resize with Pillow; matching it bit for bit keeps our pixels equal to theirs.

const PRECISION_BITS: u32 = 32 - 8 - 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
    Lanczos,
}

impl Filter {
    /// Pillow's resample codes: 1 Lanczos, 2 bilinear, 3 bicubic.
    pub fn from_pil(code: u64) -> Option<Self> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                let sinc = |x: f64| {
                    if x == 0.0 {
                        1.0
                    } else {
                        (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI)
                    }
                };
                if x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// For each output index: the first input index and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // Truncation toward zero, as the C cast does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = raw.iter().sum();
            let fixed = raw
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let scaled = w * (1u64 << PRECISION_BITS) as f64;
                    (if w < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes an RGB8 image (`width * height * 3` bytes) to `new_width x new_height`.
pub fn resize_rgb(
    data: &[u8],
    width: usize,
    height: usize,
    new_width: usize,
    new_height: usize,
    filter: Filter,
) -> Vec<u8> {
    let round = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width stays).
    let horizontal: Vec<u8> = if new_width != width {
        let coeffs = coefficients(width, new_width, filter);
        let mut out = vec![0u8; new_width * height * 3];
        for y in 0..height {
            let row = &data[y * width * 3..(y + 1) * width * 3];
            for (xx, (xmin, k)) in coeffs.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = round;
                    for (i, w) in k.iter().enumerate() {
                        ss += row[(xmin + i) * 3 + c] as i64 * *w as i64;
                    }
                    out[(y * new_width + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    } else {
        data.to_vec()
    };
    if new_height == height {
        return horizontal;
    }
    let coeffs = coefficients(height, new_height, filter);
    let mut out = vec![0u8; new_width * new_height * 3];
    for (yy, (ymin, k)) in coeffs.iter().enumerate() {
        for x in 0..new_width {
            for c in 0..3 {
                let mut ss = round;
                for (i, w) in k.iter().enumerate() {
                    ss += horizontal[((ymin + i) * new_width + x) * 3 + c] as i64 * *w as i64;
                }
                out[(yy * new_width + x) * 3 + c] = clip8(ss);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_images_stay_constant() {
        let data = [10u8, 200, 30].repeat(50 * 40);
        let out = resize_rgb(&data, 50, 40, 17, 9, Filter::Bicubic);
        assert_eq!(out, [10u8, 200, 30].repeat(17 * 9));
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (xmin, k) in coefficients(640, 42, Filter::Bicubic) {
            let sum: i64 = k.iter().map(|&w| w as i64).sum();
            assert!(
                (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                "{xmin}: {sum}"
            );
        }
    }
}
