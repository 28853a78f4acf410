//! int8 linear layers for the CPU: `dtype="q8"`.
//!
//! candle's quantized matmul (GGML Q8_0 blocks) ran at 44 GOP/s here against 234
//! GFLOP/s for its f32 gemm: it is built for matrix-vector decoding, not for
//! thousands of tokens at once. This is a small GEMM for our one case instead:
//! weights quantized per output row at load time, activations per token and per
//! block of 64 inputs at run time (one scale per token over all inputs lost too much
//! to BERT's outlier channels: cosine 0.990 against 0.9995 with blocks), products on
//! AVX-512 VNNI (`vpdpbusd`: 64 u8×i8 multiply-adds per instruction), rescaled to f32
//! once per block, with the weight scale and bias applied at the end.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so activations travel as
//! `q + 128`; the extra `128 · Σ_k w` per output is subtracted at the end.
//!
//! Without VNNI, AVX2 does the products with `vpmaddubsw` (u8 × i8 pairs summed into
//! i16) and `vpmaddwd` (pairs of i16 into i32). `vpmaddubsw` saturates, so there the
//! weights are codes in ±64 (2 · 255 · 64 fits an i16: exact) with one scale per output
//! and block of 64 inputs. The first version kept 8-bit weights exact by moving the
//! activations' signs onto them (`vpsignb`), one more shuffle-port instruction per
//! product that made it no faster than f32. Which path runs is `cpu::current()`.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::cpu::{self, Kernels};
use super::tiled::{self, Ending, Sizes, Tile, TiledLinear, BLOCK_N};
use crate::error::EmbedError;

/// Token rows per micro-tile.
const TILE_M: usize = 4;
/// Inputs per activation scale: 16 `vpdpbusd` steps between rescales.
const BLOCK_K: usize = 64;

pub struct QuantizedLinear {
    /// `in_features` padded to a multiple of `BLOCK_K`.
    sizes: Sizes,
    /// `[n / 64][k / 4][64][4]`: one 64-byte load gives 16 outputs × 4 inputs.
    packed: Vec<i8>,
    /// Per output: the weight scale (VNNI).
    scales: Vec<f32>,
    /// `[n / 64][k / 64][64]`: 128 · Σ of the quantized weights over each input
    /// block, what the +128 shift of the activations adds to the products; laid out
    /// like `packed`, so one output block's offsets are one slice.
    offsets: Vec<i32>,
    /// AVX2 only, laid out like `offsets`: the weight scale of each output and block
    /// of 64 inputs (`scales` are then 1).
    block_scales: Vec<f32>,
    /// AVX-512 VNNI or AVX2, as in force when the layer was built.
    kernels: Kernels,
}

/// Whether the kernels in force run q8: AVX2 or AVX-512 VNNI.
pub fn supported() -> bool {
    cpu::current() >= Kernels::Avx2
}

pub fn check_supported() -> std::result::Result<(), EmbedError> {
    if supported() {
        Ok(())
    } else {
        Err(EmbedError::Unsupported(format!(
            "dtype \"q8\" needs a CPU with AVX2 (the {} kernels are in force); use \"f32\" here",
            cpu::current().name()
        )))
    }
}

impl QuantizedLinear {
    /// Quantizes a float linear layer: `weight` is `[out, in]`, `bias` `[out]` or none.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        Self::with_kernels(weight, bias, cpu::current())
    }

    fn with_kernels(weight: &Tensor, bias: Option<&Tensor>, kernels: Kernels) -> Result<Self> {
        if kernels < Kernels::Avx2 || kernels > Kernels::detected() {
            candle_core::bail!(
                "q8 needs the AVX2 or AVX-512 kernels, not {}",
                kernels.name()
            );
        }
        let (sizes, weight) = Sizes::of(weight, bias, BLOCK_K)?;
        let (padded_k, padded_n) = (sizes.padded_k, sizes.padded_n);
        let groups = padded_k / 4;
        let k_blocks = padded_k / BLOCK_K;
        // VNNI: one scale per output, 8-bit codes. AVX2: codes in ±64, so that a u8
        // activation pair times them stays inside vpmaddubsw's i16 (2 · 255 · 64 =
        // 32,640), with one scale per output and block of 64 inputs to win back the
        // precision (a block's largest weight sits nearer its typical one than a row's).
        let avx2 = kernels == Kernels::Avx2;
        let levels = if avx2 { 64.0 } else { 127.0 };
        let mut packed = vec![0i8; padded_n * padded_k];
        let mut scales = vec![1f32; padded_n];
        let mut offsets = vec![0i32; k_blocks * padded_n];
        let mut block_scales = vec![1f32; if avx2 { k_blocks * padded_n } else { 0 }];
        let scale_of = |values: &[f32]| {
            let max = values.iter().fold(0f32, |m, &w| m.max(w.abs()));
            if max > 0.0 {
                max / levels
            } else {
                1.0
            }
        };
        for (n, row) in weight.iter().enumerate() {
            let (block, lane) = (n / BLOCK_N, n % BLOCK_N);
            if !avx2 {
                scales[n] = scale_of(row);
            }
            for (b, inputs) in row.chunks(BLOCK_K).enumerate() {
                let at = (block * k_blocks + b) * BLOCK_N + lane;
                let scale = if avx2 {
                    block_scales[at] = scale_of(inputs);
                    block_scales[at]
                } else {
                    scales[n]
                };
                for (i, &w) in inputs.iter().enumerate() {
                    let k = b * BLOCK_K + i;
                    let q = (w / scale).round().clamp(-levels, levels) as i8;
                    offsets[at] += 128 * q as i32;
                    packed[((block * groups + k / 4) * BLOCK_N + lane) * 4 + k % 4] = q;
                }
            }
        }
        Ok(Self {
            sizes,
            packed,
            scales,
            offsets,
            block_scales,
            kernels,
        })
    }
}

impl TiledLinear for QuantizedLinear {
    const NAME: &'static str = "embedstream-q8-linear";
    const NAME_WITH_RESIDUAL: &'static str = "embedstream-q8-linear-residual";
    const LABEL: &'static str = "q8 linear";

    fn sizes(&self) -> &Sizes {
        &self.sizes
    }

    fn matmul(&self, input: &[f32], rows: usize, residual: Option<&[f32]>, gelu: bool) -> Vec<f32> {
        let (k, kp) = (self.sizes.in_features, self.sizes.padded_k);
        // Symmetric quantization per token and input block, shifted to u8 for vpdpbusd.
        let blocks = kp / BLOCK_K;
        let mut quantized = vec![128u8; rows * kp];
        let mut row_scales = vec![0f32; rows * blocks];
        let vnni = self.kernels == Kernels::Avx512;
        quantized
            .par_chunks_mut(kp)
            .zip(row_scales.par_chunks_mut(blocks))
            .zip(input.par_chunks(k))
            // SAFETY: the layer was built with these kernels in force.
            .for_each(|((q, scales), x)| unsafe {
                match vnni {
                    true => kernel::quantize_row(x, scales, q),
                    false => kernel::quantize_row_avx2(x, scales, q),
                }
            });
        let ending = Ending {
            scales: Some(&self.scales),
            bias: &self.sizes.bias,
            residual,
            gelu,
        };
        let tile = |mut tile: Tile| {
            let (block, tile_rows) = (tile.block, tile.rows.len());
            let x = &quantized[tile.rows.start * kp..tile.rows.end * kp];
            let scales = &row_scales[tile.rows.start * blocks..tile.rows.end * blocks];
            let per_block = block * blocks * BLOCK_N..(block + 1) * blocks * BLOCK_N;
            let weights = &self.packed[block * BLOCK_N * kp..(block + 1) * BLOCK_N * kp];
            let offsets = &self.offsets[per_block.clone()];
            let mut acc = [[0f32; BLOCK_N]; TILE_M];
            // SAFETY: the layer was built with these kernels in force, and the kernel
            // reads `tile_rows` ≤ 4 rows of `kp` bytes, `kp / 4` × 256 bytes of weights
            // and `blocks` scales and offsets per row, all inside the slices.
            unsafe {
                match self.kernels {
                    Kernels::Avx512 => {
                        kernel::tile(x, kp, weights, scales, offsets, tile_rows, &mut acc)
                    }
                    _ => kernel::tile_avx2(
                        x,
                        kp,
                        weights,
                        scales,
                        offsets,
                        &self.block_scales[per_block],
                        tile_rows,
                        &mut acc,
                    ),
                }
            }
            tile.write(&acc);
        };
        // SAFETY: `Tile::write` writes every output of the tile.
        unsafe { tiled::matmul::<TILE_M>(rows, self.sizes.out_features, &ending, tile) }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{BLOCK_K, BLOCK_N, TILE_M};

    /// `acc[r][j] = Σ_blocks scale[r, b] · Σ_{k in b} (x[r, k] · w[j, k]) − offset[b, j]`
    /// for `rows` ≤ 4 rows and 64 outputs.
    pub unsafe fn tile(
        x: &[u8],
        stride: usize,
        weights: &[i8],
        scales: &[f32],
        offsets: &[i32],
        rows: usize,
        acc: &mut [[f32; BLOCK_N]; TILE_M],
    ) {
        match rows {
            4 => tile_rows::<4>(x, stride, weights, scales, offsets, acc),
            3 => tile_rows::<3>(x, stride, weights, scales, offsets, acc),
            2 => tile_rows::<2>(x, stride, weights, scales, offsets, acc),
            _ => tile_rows::<1>(x, stride, weights, scales, offsets, acc),
        }
    }

    /// A block shorter than 64 inputs, in plain Rust; returns its scale.
    fn quantize_partial_block(x: &[f32], out: &mut [u8]) -> f32 {
        let max = x.iter().fold(0f32, |m, &v| m.max(v.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        for (q, &v) in out.iter_mut().zip(x) {
            *q = ((v / scale).round_ties_even().clamp(-127.0, 127.0) as i32 + 128) as u8;
        }
        scale
    }

    /// Quantizes one token row, per block of 64 inputs: scales out, u8 codes (+128)
    /// out, each full block through `block`. `x` may end mid-block (the padding keeps
    /// code 128, i.e. zero).
    #[inline(always)]
    fn quantize_blocks(
        x: &[f32],
        scales: &mut [f32],
        out: &mut [u8],
        block: impl Fn(&[f32], &mut [u8]) -> f32,
    ) {
        for ((x, scale), out) in x.chunks(BLOCK_K).zip(scales).zip(out.chunks_mut(BLOCK_K)) {
            *scale = if x.len() < BLOCK_K {
                // The last, partial block of an input width that is not a multiple of 64.
                quantize_partial_block(x, out)
            } else {
                block(x, out)
            };
        }
    }

    /// [`quantize_blocks`] with AVX-512.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn quantize_row(x: &[f32], scales: &mut [f32], out: &mut [u8]) {
        quantize_blocks(x, scales, out, |x, out| quantize_block(x, out))
    }

    /// One full block of 64 inputs; returns its scale.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn quantize_block(x: &[f32], out: &mut [u8]) -> f32 {
        let abs_mask = _mm512_set1_ps(f32::from_bits(0x7fff_ffff));
        let p = x.as_ptr();
        let v = [0, 16, 32, 48].map(|i| _mm512_loadu_ps(p.add(i)));
        let max = v.iter().fold(_mm512_setzero_ps(), |m, &v| {
            _mm512_max_ps(m, _mm512_and_ps(v, abs_mask))
        });
        let max = _mm512_reduce_max_ps(max);
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        let inverse = _mm512_set1_ps(1.0 / scale);
        let shift = _mm512_set1_epi32(128);
        for (i, v) in v.iter().enumerate() {
            // |v · inverse| ≤ 127 by construction: rounding, +128 and narrowing stay in u8.
            let codes = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(*v, inverse)), shift);
            _mm_storeu_si128(
                out.as_mut_ptr().add(16 * i) as *mut __m128i,
                _mm512_cvtepi32_epi8(codes),
            );
        }
        scale
    }

    /// `quantize_row` on AVX2: the same codes (round half to even, + 128).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_row_avx2(x: &[f32], scales: &mut [f32], out: &mut [u8]) {
        quantize_blocks(x, scales, out, |x, out| quantize_block_avx2(x, out))
    }

    /// [`quantize_block`] on AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn quantize_block_avx2(x: &[f32], out: &mut [u8]) -> f32 {
        let abs_mask = _mm256_set1_ps(f32::from_bits(0x7fff_ffff));
        let p = x.as_ptr();
        let v: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
        let mut max = _mm256_setzero_ps();
        for v in &v {
            max = _mm256_max_ps(max, _mm256_and_ps(*v, abs_mask));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), max);
        let max = lanes.iter().fold(0f32, |m, &l| m.max(l));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        let inverse = _mm256_set1_ps(1.0 / scale);
        let shift = _mm256_set1_epi32(128);
        // Rounding (to nearest even), + 128, then i32 → i16 → u8, in lane order.
        let codes: [__m256i; 8] = std::array::from_fn(|i| {
            _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse)), shift)
        });
        for half in 0..2 {
            let c = &codes[4 * half..];
            let words01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0b11_01_10_00);
            let words23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0b11_01_10_00);
            let bytes =
                _mm256_permute4x64_epi64(_mm256_packus_epi16(words01, words23), 0b11_01_10_00);
            _mm256_storeu_si256(out.as_mut_ptr().add(32 * half) as *mut __m256i, bytes);
        }
        scale
    }

    /// The VNNI tile's contract on AVX2, where the weights are codes in ±64 with a
    /// scale per output and block (`weight_scales`, laid out like `offsets`).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_avx2(
        x: &[u8],
        stride: usize,
        weights: &[i8],
        scales: &[f32],
        offsets: &[i32],
        weight_scales: &[f32],
        rows: usize,
        acc: &mut [[f32; BLOCK_N]; TILE_M],
    ) {
        let blocks = stride / BLOCK_K;
        for r in (0..rows).step_by(2) {
            let (x, scales) = (&x[r * stride..], &scales[r * blocks..]);
            let acc = &mut acc[r..];
            match rows - r {
                1 => tile_rows_avx2::<1>(x, stride, weights, scales, offsets, weight_scales, acc),
                _ => tile_rows_avx2::<2>(x, stride, weights, scales, offsets, weight_scales, acc),
            }
        }
    }

    /// `R` rows against 64 outputs, in two halves of 32 (four 8-lane accumulators
    /// per row: with the weights they fill the 16 registers). Per step: u8 codes
    /// (`q + 128`) times weights in ±64 through `vpmaddubsw`, pairs summed to i32 by
    /// `vpmaddwd`; the `128 · Σ w` the shift adds comes off once per block.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_rows_avx2<const R: usize>(
        x: &[u8],
        stride: usize,
        weights: &[i8],
        scales: &[f32],
        offsets: &[i32],
        weight_scales: &[f32],
        acc: &mut [[f32; BLOCK_N]],
    ) {
        let blocks = stride / BLOCK_K;
        debug_assert!(x.len() >= (R - 1) * stride + stride && weights.len() >= stride * BLOCK_N);
        debug_assert!(offsets.len() >= blocks * BLOCK_N && weight_scales.len() >= blocks * BLOCK_N);
        let (w, x) = (weights.as_ptr(), x.as_ptr());
        let ones = _mm256_set1_epi16(1);
        for row in acc.iter_mut().take(R) {
            *row = [0.0; BLOCK_N];
        }
        for half in 0..2 {
            for b in 0..blocks {
                let mut sums = [[_mm256_setzero_si256(); 4]; R];
                for g in b * BLOCK_K / 4..(b + 1) * BLOCK_K / 4 {
                    let wg = w.add(g * 4 * BLOCK_N + 128 * half);
                    let wv =
                        [0, 32, 64, 96].map(|o| _mm256_loadu_si256(wg.add(o) as *const __m256i));
                    for (r, sums) in sums.iter_mut().enumerate() {
                        let codes = (x.add(r * stride + g * 4) as *const i32).read_unaligned();
                        let a = _mm256_set1_epi32(codes);
                        for (s, &wj) in sums.iter_mut().zip(&wv) {
                            let pairs = _mm256_maddubs_epi16(a, wj);
                            *s = _mm256_add_epi32(*s, _mm256_madd_epi16(pairs, ones));
                        }
                    }
                }
                let lanes = b * BLOCK_N + 32 * half;
                for (r, sums) in sums.iter().enumerate() {
                    let scale = _mm256_set1_ps(*scales.get_unchecked(r * blocks + b));
                    for (j, s) in sums.iter().enumerate() {
                        let offset = _mm256_loadu_si256(
                            offsets.as_ptr().add(lanes + 8 * j) as *const __m256i
                        );
                        let weight_scale =
                            _mm256_loadu_ps(weight_scales.as_ptr().add(lanes + 8 * j));
                        let exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(*s, offset));
                        let out = acc[r][32 * half + 8 * j..].as_mut_ptr();
                        let total = _mm256_fmadd_ps(
                            exact,
                            _mm256_mul_ps(scale, weight_scale),
                            _mm256_loadu_ps(out),
                        );
                        _mm256_storeu_ps(out, total);
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_rows<const R: usize>(
        x: &[u8],
        stride: usize,
        weights: &[i8],
        scales: &[f32],
        offsets: &[i32],
        acc: &mut [[f32; BLOCK_N]; TILE_M],
    ) {
        let blocks = stride / BLOCK_K;
        debug_assert!(x.len() >= R * stride && weights.len() >= stride * BLOCK_N);
        debug_assert!(scales.len() >= R * blocks && offsets.len() >= blocks * BLOCK_N);
        let mut totals = [[_mm512_setzero_ps(); 4]; R];
        let (w, x) = (weights.as_ptr(), x.as_ptr());
        for b in 0..blocks {
            let mut sums = [[_mm512_setzero_si512(); 4]; R];
            for g in b * BLOCK_K / 4..(b + 1) * BLOCK_K / 4 {
                let wg = w.add(g * 4 * BLOCK_N);
                let w0 = _mm512_loadu_si512(wg as *const __m512i);
                let w1 = _mm512_loadu_si512(wg.add(64) as *const __m512i);
                let w2 = _mm512_loadu_si512(wg.add(128) as *const __m512i);
                let w3 = _mm512_loadu_si512(wg.add(192) as *const __m512i);
                for (r, sums) in sums.iter_mut().enumerate() {
                    let a = _mm512_set1_epi32(
                        (x.add(r * stride + g * 4) as *const i32).read_unaligned(),
                    );
                    sums[0] = _mm512_dpbusd_epi32(sums[0], a, w0);
                    sums[1] = _mm512_dpbusd_epi32(sums[1], a, w1);
                    sums[2] = _mm512_dpbusd_epi32(sums[2], a, w2);
                    sums[3] = _mm512_dpbusd_epi32(sums[3], a, w3);
                }
            }
            let offset = offsets.as_ptr().add(b * BLOCK_N);
            for (r, (sums, totals)) in sums.iter().zip(totals.iter_mut()).enumerate() {
                let scale = _mm512_set1_ps(*scales.get_unchecked(r * blocks + b));
                for (j, (s, t)) in sums.iter().zip(totals.iter_mut()).enumerate() {
                    let exact = _mm512_sub_epi32(
                        *s,
                        _mm512_loadu_si512(offset.add(16 * j) as *const __m512i),
                    );
                    *t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, *t);
                }
            }
        }
        for (r, totals) in totals.iter().enumerate() {
            for (j, t) in totals.iter().enumerate() {
                _mm512_storeu_ps(acc[r][16 * j..].as_mut_ptr(), *t);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::{BLOCK_N, TILE_M};

    pub unsafe fn quantize_row(_: &[f32], _: &mut [f32], _: &mut [u8]) {
        unreachable!("q8 is refused at load time on this architecture")
    }

    pub unsafe fn quantize_row_avx2(_: &[f32], _: &mut [f32], _: &mut [u8]) {
        unreachable!("q8 is refused at load time on this architecture")
    }

    pub unsafe fn tile(
        _: &[u8],
        _: usize,
        _: &[i8],
        _: &[f32],
        _: &[i32],
        _: usize,
        _: &mut [[f32; BLOCK_N]; TILE_M],
    ) {
        unreachable!("q8 is refused at load time on this architecture")
    }

    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_avx2(
        _: &[u8],
        _: usize,
        _: &[i8],
        _: &[f32],
        _: &[i32],
        _: &[f32],
        _: usize,
        _: &mut [[f32; BLOCK_N]; TILE_M],
    ) {
        unreachable!("q8 is refused at load time on this architecture")
    }
}

#[cfg(test)]
mod tests {
    use super::tiled::uniform;
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_float_product_on_every_path_this_cpu_runs() -> Result<()> {
        for kernels in [Kernels::Avx2, Kernels::Avx512] {
            if kernels <= Kernels::detected() {
                matches_the_float_product(kernels)?;
            } else {
                eprintln!("skipped: this CPU has no {} kernels", kernels.name());
            }
        }
        Ok(())
    }

    #[test]
    fn a_single_row_split_by_columns_equals_that_row_in_a_batch() -> Result<()> {
        if !supported() {
            eprintln!("skipped: no q8 kernels on this CPU");
            return Ok(());
        }
        let device = Device::Cpu;
        // 2,100 outputs: 33 blocks, so three column tasks, the last one partial.
        let w = Tensor::from_vec(uniform(2100 * 150, 4, 0.17), (2100, 150), &device)?;
        let b = Tensor::from_vec(uniform(2100, 5, 0.17), 2100, &device)?;
        let x = Tensor::from_vec(uniform(3 * 150, 6, 1.7), (3, 150), &device)?;
        let layer = QuantizedLinear::new(&w, Some(&b))?;
        let batched = layer.forward(&x)?.to_vec2::<f32>()?;
        for (r, want) in batched.iter().enumerate() {
            let single = layer.forward(&x.narrow(0, r, 1)?)?.to_vec2::<f32>()?;
            assert_eq!(&single[0], want, "row {r}");
        }
        Ok(())
    }

    fn matches_the_float_product(kernels: Kernels) -> Result<()> {
        let device = Device::Cpu;
        // Sizes off every block boundary: 70 outputs, 150 inputs (3 blocks), 7 rows.
        // Fixed inputs: thread-random ones put the error near the bound in some runs.
        let w = Tensor::from_vec(uniform(70 * 150, 1, 0.17), (70, 150), &device)?;
        let b = Tensor::from_vec(uniform(70, 2, 0.17), 70, &device)?;
        let x = Tensor::from_vec(uniform(7 * 150, 3, 1.7), (7, 150), &device)?;
        let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
        let got = QuantizedLinear::with_kernels(&w, Some(&b), kernels)?.forward(&x)?;
        let error = (&got - &want)?
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()?;
        let norm = want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        assert!(
            error / norm < 0.01,
            "{}: relative error {}",
            kernels.name(),
            error / norm
        );
        Ok(())
    }
}
