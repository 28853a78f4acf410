//! bf16 linear layers for the CPU: `dtype="bf16"` on CPUs with AVX512_BF16 (Intel
//! since Cooper Lake, AMD since Zen 4).
//!
//! candle's CPU kernels for bf16 convert to f32 and back around every op and ran
//! slower than f32. Here only the linear layers change: their weights are rounded to
//! bf16 once at load, packed in pairs of inputs, and each token row is rounded to
//! bf16 (`vcvtne2ps2bf16`, to nearest even) at run time. `vdpbf16ps` multiplies 16
//! pairs of bf16 and adds both products to 16 f32 accumulators: 32 multiply-adds per
//! instruction against 16 for an f32 FMA, with the sums kept in f32 throughout.
//! Attention, norms, activations and pooling stay f32, as in q8.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::cpu::{self, Kernels};
use super::tiled::{self, Ending, Sizes, Tile, TiledLinear, BLOCK_N};
use crate::error::EmbedError;

/// Token rows per micro-tile: 6 rows × 4 accumulators and 4 weight registers
/// fill 28 of the 32 vector registers.
const TILE_M: usize = 6;
/// The input width is padded to this: one `vcvtne2ps2bf16` rounds 32 inputs.
const BLOCK_K: usize = 32;

pub struct Bf16Linear {
    /// `in_features` padded to a multiple of `BLOCK_K`.
    sizes: Sizes,
    /// bf16 bits, `[n / 64][k / 2][64][2]`: one 64-byte load gives 16 outputs × 2
    /// inputs, the pairs `vdpbf16ps` multiplies.
    packed: Vec<u16>,
}

/// Whether this CPU has AVX512_BF16.
fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the kernels in force run bf16: the AVX-512 ones, on a CPU with AVX512_BF16.
pub fn supported() -> bool {
    cpu::current() == Kernels::Avx512 && cpu_has_bf16()
}

/// `supported()`, or an error that says what this CPU or `EMBEDSTREAM_CPU_KERNELS`
/// lacks for it.
pub fn check_supported() -> std::result::Result<(), EmbedError> {
    if supported() {
        return Ok(());
    }
    let instead = if super::q8::supported() {
        "\"f32\" or \"q8\""
    } else {
        "\"f32\""
    };
    Err(EmbedError::Unsupported(if cpu_has_bf16() {
        format!(
            "dtype \"bf16\" on the CPU needs the avx512 kernels, and \
             EMBEDSTREAM_CPU_KERNELS selects the {} ones: unset it, or use {instead}",
            cpu::current().name()
        )
    } else {
        format!(
            "dtype \"bf16\" on the CPU needs AVX512_BF16 (Intel Xeon since Cooper Lake, \
             AMD since Zen 4), and this CPU has none (it runs the {} kernels at most): \
             use {instead}",
            Kernels::detected().name()
        )
    }))
}

/// `value` rounded to the nearest bf16, ties to even (as `vcvtne2ps2bf16` does).
fn round_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        // Quiet, keeping the sign and the top of the payload.
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

impl Bf16Linear {
    /// Rounds a float linear layer to bf16: `weight` is `[out, in]`, `bias` `[out]` or
    /// none.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        if !supported() {
            candle_core::bail!(
                "bf16 linear layers need the avx512 kernels and AVX512_BF16, not {}",
                cpu::current().name()
            );
        }
        let (sizes, weight) = Sizes::of(weight, bias, BLOCK_K)?;
        let (padded_k, padded_n) = (sizes.padded_k, sizes.padded_n);
        let pairs = padded_k / 2;
        let mut packed = vec![0u16; padded_n * padded_k];
        for (n, row) in weight.iter().enumerate() {
            let (block, lane) = (n / BLOCK_N, n % BLOCK_N);
            for (k, &w) in row.iter().enumerate() {
                packed[((block * pairs + k / 2) * BLOCK_N + lane) * 2 + k % 2] = round_to_bf16(w);
            }
        }
        Ok(Self { sizes, packed })
    }
}

impl TiledLinear for Bf16Linear {
    const NAME: &'static str = "embedstream-bf16-linear";
    const NAME_WITH_RESIDUAL: &'static str = "embedstream-bf16-linear-residual";
    const LABEL: &'static str = "bf16 linear";

    fn sizes(&self) -> &Sizes {
        &self.sizes
    }

    fn matmul(&self, input: &[f32], rows: usize, residual: Option<&[f32]>, gelu: bool) -> Vec<f32> {
        let (k, kp) = (self.sizes.in_features, self.sizes.padded_k);
        let mut rounded: Vec<u16> = Vec::with_capacity(rows * kp);
        rounded.spare_capacity_mut()[..rows * kp]
            .par_chunks_mut(kp)
            .zip(input.par_chunks(k))
            // SAFETY: the layer was built with AVX512_BF16 in force; each row is `k`
            // inputs into `kp` ≥ k outputs.
            .for_each(|(out, x)| unsafe { kernel::round_row(x, out) });
        // SAFETY: `round_row` wrote each row whole, padding included.
        unsafe { rounded.set_len(rows * kp) };
        let ending = Ending {
            scales: None,
            bias: &self.sizes.bias,
            residual,
            gelu,
        };
        let tile = |tile: Tile| {
            let x = &rounded[tile.rows.start * kp..tile.rows.end * kp];
            let weights = &self.packed[tile.block * BLOCK_N * kp..(tile.block + 1) * BLOCK_N * kp];
            // SAFETY: the layer was built with AVX512_BF16 in force, and the kernel
            // reads `rows.len()` ≤ TILE_M rows of `kp` values and `kp / 2` × 128
            // weights, all inside the slices, and the tile's outputs, bias and
            // residual, which `Tile` lays out.
            unsafe { kernel::tile(x, kp, weights, tile) }
        };
        // SAFETY: `kernel::tile` writes every output of the tile.
        unsafe { tiled::matmul::<TILE_M>(rows, self.sizes.out_features, &ending, tile) }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{Tile, BLOCK_K, BLOCK_N, TILE_M};

    /// Rounds `x` to bf16 into `out`, zeros after it up to `out.len()` (a multiple
    /// of 32, at least `x.len()`).
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
    pub unsafe fn round_row(x: &[f32], out: &mut [MaybeUninit<u16>]) {
        debug_assert!(out.len().is_multiple_of(BLOCK_K) && out.len() >= x.len());
        for (i, out) in out.chunks_exact_mut(BLOCK_K).enumerate() {
            let start = i * BLOCK_K;
            let halves = [start, start + 16].map(|from| {
                let count = x.len().saturating_sub(from).min(16);
                if count == 16 {
                    _mm512_loadu_ps(x.as_ptr().add(from))
                } else {
                    // Masked-off lanes are neither read nor faulted on: they are zero.
                    _mm512_maskz_loadu_ps(lanes(count), x.as_ptr().wrapping_add(from))
                }
            });
            let rounded = _mm512_cvtne2ps_pbh(halves[1], halves[0]);
            _mm512_storeu_si512(
                out.as_mut_ptr() as *mut __m512i,
                std::mem::transmute::<__m512bh, __m512i>(rounded),
            );
        }
    }

    /// 32 bf16 values from their bits.
    #[inline(always)]
    fn bh(bits: __m512i) -> __m512bh {
        // SAFETY: both are 64 bytes of plain data; every bit pattern is a bf16 vector.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(bits) }
    }

    /// A mask of the first `count` ≤ 16 lanes.
    #[inline(always)]
    fn lanes(count: usize) -> __mmask16 {
        ((1u32 << count) - 1) as __mmask16
    }

    /// The tile's outputs: `Σ_k x[r, k] · w[j, k] + bias[j] + residual[r, j]` for
    /// its rows of `stride` bf16 inputs in `x` and its columns of `weights`.
    pub unsafe fn tile(x: &[u16], stride: usize, weights: &[u16], tile: Tile) {
        match tile.rows.len() {
            6 => tile_rows::<6>(x, stride, weights, tile),
            5 => tile_rows::<5>(x, stride, weights, tile),
            4 => tile_rows::<4>(x, stride, weights, tile),
            3 => tile_rows::<3>(x, stride, weights, tile),
            2 => tile_rows::<2>(x, stride, weights, tile),
            _ => tile_rows::<1>(x, stride, weights, tile),
        }
    }

    #[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
    unsafe fn tile_rows<const R: usize>(x: &[u16], stride: usize, weights: &[u16], tile: Tile) {
        debug_assert!(R <= TILE_M && tile.rows.len() == R && tile.columns <= BLOCK_N);
        debug_assert!(x.len() >= R * stride && weights.len() >= stride * BLOCK_N);
        debug_assert!(tile.out.len() >= (R - 1) * tile.stride + tile.columns);
        let mut sums = [[_mm512_setzero_ps(); 4]; R];
        let (w, x) = (weights.as_ptr(), x.as_ptr());
        for pair in 0..stride / 2 {
            let wp = w.add(pair * 2 * BLOCK_N) as *const __m512i;
            let wv: [__m512bh; 4] = std::array::from_fn(|j| bh(_mm512_loadu_si512(wp.add(j))));
            for (r, sums) in sums.iter_mut().enumerate() {
                let a = (x.add(r * stride + 2 * pair) as *const i32).read_unaligned();
                let a = bh(_mm512_set1_epi32(a));
                for (s, &wj) in sums.iter_mut().zip(&wv) {
                    *s = _mm512_dpbf16_ps(*s, a, wj);
                }
            }
        }
        // The last block may be partial: masked loads and stores stay in its columns.
        let masks: [__mmask16; 4] =
            std::array::from_fn(|j| lanes(tile.columns.saturating_sub(16 * j).min(16)));
        let bias: [__m512; 4] = std::array::from_fn(|j| {
            _mm512_maskz_loadu_ps(masks[j], tile.bias.as_ptr().wrapping_add(16 * j))
        });
        let out = tile.out.as_mut_ptr() as *mut f32;
        for (r, sums) in sums.iter().enumerate() {
            let at = r * tile.stride;
            for (j, s) in sums.iter().enumerate() {
                let mut v = _mm512_add_ps(*s, bias[j]);
                if let Some(residual) = tile.residual {
                    let residual = residual.as_ptr().wrapping_add(at + 16 * j);
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], residual));
                }
                _mm512_mask_storeu_ps(out.wrapping_add(at + 16 * j), masks[j], v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use std::mem::MaybeUninit;

    use super::Tile;

    pub unsafe fn round_row(_: &[f32], _: &mut [MaybeUninit<u16>]) {
        unreachable!("bf16 is refused at load time on this architecture")
    }

    pub unsafe fn tile(_: &[u16], _: usize, _: &[u16], _: Tile) {
        unreachable!("bf16 is refused at load time on this architecture")
    }
}

#[cfg(test)]
mod tests {
    use super::tiled::uniform;
    use super::*;
    use candle_core::Device;

    /// The f32 value of bf16 bits.
    fn bf16_to_f32(bits: u16) -> f32 {
        f32::from_bits((bits as u32) << 16)
    }

    fn rounded(values: &[f32]) -> Vec<f32> {
        values
            .iter()
            .map(|&v| bf16_to_f32(round_to_bf16(v)))
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2⁻⁸ lies halfway between bf16's 1 and 1 + 2⁻⁷: ties go to the even one.
        assert_eq!(bf16_to_f32(round_to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert_eq!(
            bf16_to_f32(round_to_bf16(1.0 + 3.0 / 256.0)),
            1.0 + 4.0 / 256.0
        );
        assert_eq!(
            bf16_to_f32(round_to_bf16(1.0 + 1.0 / 256.0 + 1e-6)),
            1.0 + 2.0 / 256.0
        );
        assert_eq!(bf16_to_f32(round_to_bf16(-2.5)), -2.5);
        assert!(bf16_to_f32(round_to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(round_to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// The layer against the f32 product of the bf16-rounded inputs and weights: the
    /// same multiplications, so only the order of the f32 additions differs.
    #[test]
    fn matches_the_f32_product_of_the_rounded_inputs() -> Result<()> {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512_BF16 (or it is not in force)");
            return Ok(());
        }
        let device = Device::Cpu;
        // Inputs off every block boundary (k not a multiple of 32, odd k), outputs
        // off the 64-column blocks, rows off the 6-row tiles and the 48-row tasks,
        // one row alone (split by columns: 1,100 outputs make two column tasks).
        for (rows, k, n) in [
            (1, 40, 70),
            (1, 384, 1100),
            (2, 1, 1),
            (5, 7, 3),
            (7, 150, 70),
            (48, 33, 129),
            (97, 64, 64),
            (601, 77, 45),
        ] {
            let w = uniform(n * k, 1, 0.17);
            let b = uniform(n, 2, 0.17);
            let x = uniform(rows * k, 3, 1.7);
            let residual = uniform(rows * n, 4, 1.0);
            let layer = Bf16Linear::new(
                &Tensor::from_vec(w.clone(), (n, k), &device)?,
                Some(&Tensor::from_vec(b.clone(), n, &device)?),
            )?;
            let (rw, rx) = (rounded(&w), rounded(&x));
            let want: Vec<f32> = (0..rows * n)
                .map(|i| {
                    let (r, j) = (i / n, i % n);
                    let dot: f64 = (0..k)
                        .map(|c| rx[r * k + c] as f64 * rw[j * k + c] as f64)
                        .sum();
                    dot as f32 + b[j] + residual[i]
                })
                .collect();
            // The f32 sums' rounding, in another order: a couple of ulps (1.2e-7) of the
            // magnitudes added, times √k. (They came to 6 % of this bound here; without
            // the activations rounded to bf16, to hundreds of times it.)
            let scale: Vec<f32> = (0..rows * n)
                .map(|i| {
                    let (r, j) = (i / n, i % n);
                    (0..k)
                        .map(|c| (rx[r * k + c] * rw[j * k + c]).abs())
                        .sum::<f32>()
                        + b[j].abs()
                        + residual[i].abs()
                })
                .collect();
            let x = Tensor::from_vec(x, (rows, k), &device)?;
            let residual = Tensor::from_vec(residual, (rows, n), &device)?;
            let got = layer.forward_then(&x, Some(&residual), false)?;
            assert_eq!(got.dims(), &[rows, n]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            for (i, ((g, w), s)) in got.iter().zip(&want).zip(&scale).enumerate() {
                let bound = 2e-7 * (k as f32 + 2.0).sqrt() * s + 1e-7;
                assert!(
                    (g - w).abs() <= bound,
                    "rows {rows}, k {k}, n {n}: output {i} is {g}, want {w} (±{bound})"
                );
            }
        }
        Ok(())
    }
}
