//! CPU kernels for the encoders' attention and element-wise hot spots.
//!
//! Profiling a MiniLM forward pass on candle's generic CPU ops (perf, 2-core EPYC)
//! put scalar libm `erf` (GELU) at 13% and `exp` (softmax) at 6% of the time, and
//! attention spent more in copies and tiny products than in arithmetic. These
//! kernels use branch-free polynomial approximations the compiler vectorises
//! (compiled for AVX2+FMA when the CPU has them, chosen at run time so the wheel
//! stays portable), run attention per sequence with the bias fused into its softmax,
//! and spread work over the rayon pool. Other devices and dtypes use candle's ops.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use candle_nn::ops::softmax_last_dim;
use rayon::prelude::*;

use super::cpu_op::{self, F32Op, Output, Second};

/// Elements per parallel task: large enough to amortise scheduling.
const TASK_ELEMENTS: usize = 32 * 1024;

/// GELU with the exact (erf) definition BERT uses.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        cpu_op::apply(&GeluErf, x, None)
    } else {
        x.gelu_erf()
    }
}

/// Multi-head self-attention from the fused projection `qkv` (`[b, t, 3·h]`, queries
/// pre-scaled) and the padding `bias` (`[b, 1, 1, t]`): the context `[b, t, h]`.
///
/// On the CPU one kernel does scores, softmax and the weighted sum per (row, head)
/// straight from `qkv`, where candle would copy q, k and v out, run hundreds of tiny
/// batched products and materialise the `[b, heads, t, t]` scores twice. Rows at
/// padding positions are left zero: no real token attends to them.
pub fn attention(qkv: &Tensor, bias: &Tensor, heads: usize) -> Result<Tensor> {
    let (batch, tokens, width) = qkv.dims3()?;
    let hidden = width / 3;
    if qkv.device().is_cpu() && qkv.dtype() == DType::F32 {
        return attention_reaching(qkv, bias, Heads::all(heads), Reach::All);
    }
    let qkv = qkv
        .reshape((batch, tokens, 3, heads, hidden / heads))?
        .permute((2, 0, 3, 1, 4))?;
    let query = qkv.get(0)?.contiguous()?;
    let key = qkv.get(1)?.contiguous()?;
    let value = qkv.get(2)?.contiguous()?;
    let scores = query.matmul(&key.t()?)?.broadcast_add(bias)?;
    softmax_last_dim(&scores)?
        .matmul(&value)?
        .transpose(1, 2)?
        .reshape((batch, tokens, hidden))
}

/// Which keys of its sequence each query may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Every key (encoders).
    All,
    /// Keys within this many positions either side (ModernBERT's local layers).
    Window(usize),
    /// Keys at or before the query (decoders).
    Causal,
}

/// The heads of a fused projection `[.., (query + 2·key_value)·d]`: queries, then
/// keys, then values. With fewer key/value heads than query heads (grouped-query
/// attention), each key/value head serves `query / key_value` consecutive query heads.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub query: usize,
    pub key_value: usize,
}

impl Heads {
    /// Multi-head attention: as many key/value heads as query heads.
    pub fn all(heads: usize) -> Self {
        Self {
            query: heads,
            key_value: heads,
        }
    }

    /// `d`, where `width` is the fused projection's; `None` if it does not divide.
    pub(crate) fn dim(self, width: usize) -> Option<usize> {
        let columns = self.query + 2 * self.key_value;
        (self.key_value > 0
            && self.query.is_multiple_of(self.key_value)
            && width.is_multiple_of(columns))
        .then(|| width / columns)
    }
}

/// [`attention`] on the CPU in f32 only, with grouped key/value heads and each query
/// limited to the keys within its `reach`.
pub fn attention_reaching(
    qkv: &Tensor,
    bias: &Tensor,
    heads: Heads,
    reach: Reach,
) -> Result<Tensor> {
    cpu_op::apply(&Attention { heads, reach }, qkv, Some(bias))
}

struct Attention {
    heads: Heads,
    reach: Reach,
}

impl F32Op for Attention {
    const NAME: &'static str = "embedstream-attention";
    const LABEL: &'static str = "attention";
    const INPUT: &'static str = "qkv";
    const SECOND: &'static str = "bias";

    fn run(&self, qkv: &[f32], layout: &Layout, bias: Second) -> Output {
        let (batch, tokens, width) = layout.shape().dims3()?;
        let Some(dim) = self.heads.dim(width) else {
            candle_core::bail!("attention: expected qkv [b, t, (heads + 2·kv_heads)·d]");
        };
        let bias = match bias {
            Some((bias, _)) if bias.len() == batch * tokens => bias,
            _ => candle_core::bail!("attention: expected a bias [b, 1, 1, t]"),
        };
        let hidden = self.heads.query * dim;
        let mut out = vec![0f32; batch * tokens * hidden];
        if tokens > 0 {
            out.par_chunks_mut(tokens * hidden)
                .enumerate()
                .for_each(|(row, out)| {
                    let qkv = &qkv[row * tokens * width..(row + 1) * tokens * width];
                    let bias = &bias[row * tokens..(row + 1) * tokens];
                    simd::attention_row(qkv, bias, self.heads, self.reach, out);
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((batch, tokens, hidden))))
    }
}

/// Attention over sequences packed back to back without padding, on the CPU in f32:
/// `qkv` is `[Σ lengths, (heads.query + 2·heads.key_value)·d]` with the queries
/// pre-scaled, the context `[Σ lengths, heads.query·d]`.
pub fn attention_packed(
    qkv: &Tensor,
    lengths: &[usize],
    heads: Heads,
    reach: Reach,
) -> Result<Tensor> {
    let op = PackedAttention {
        heads,
        lengths,
        reach,
    };
    cpu_op::apply(&op, qkv, None)
}

struct PackedAttention<'a> {
    heads: Heads,
    lengths: &'a [usize],
    reach: Reach,
}

impl F32Op for PackedAttention<'_> {
    const NAME: &'static str = "embedstream-packed-attention";
    const LABEL: &'static str = "packed attention";
    const INPUT: &'static str = "qkv";

    fn run(&self, qkv: &[f32], layout: &Layout, _: Second) -> Output {
        let (total, width) = layout.shape().dims2()?;
        let Some(dim) = self.heads.dim(width) else {
            candle_core::bail!(
                "packed attention: expected qkv [Σ lengths, (heads + 2·kv_heads)·d]"
            );
        };
        if self.lengths.iter().sum::<usize>() != total {
            candle_core::bail!("packed attention: the lengths do not add up to the {total} rows");
        }
        let hidden = self.heads.query * dim;
        let mut out = vec![0f32; total * hidden];
        // Each sequence attends over its own tokens only: no padding, so no bias.
        let no_bias = vec![0f32; self.lengths.iter().copied().max().unwrap_or(0)];
        let mut sequences = Vec::with_capacity(self.lengths.len());
        let (mut rest, mut start) = (out.as_mut_slice(), 0);
        for &length in self.lengths {
            let (sequence, tail) = rest.split_at_mut(length * hidden);
            sequences.push((start, length, sequence));
            (rest, start) = (tail, start + length);
        }
        sequences
            .into_par_iter()
            .filter(|(_, length, _)| *length > 0)
            .for_each(|(start, length, out)| {
                let qkv = &qkv[start * width..(start + length) * width];
                simd::attention_row(qkv, &no_bias[..length], self.heads, self.reach, out);
            });
        Ok((CpuStorage::F32(out), Shape::from((total, hidden))))
    }
}

/// Exact GELU in place, on the CPU path's kernels: the end of fused dense layers.
pub(crate) fn gelu_in_place(values: &mut [f32]) {
    values
        .par_chunks_mut(TASK_ELEMENTS)
        .for_each(simd::gelu_in_place);
}

struct GeluErf;

impl F32Op for GeluErf {
    const NAME: &'static str = "embedstream-gelu-erf";
    const LABEL: &'static str = "gelu_erf";

    fn run(&self, x: &[f32], layout: &Layout, _: Second) -> Output {
        let mut out = x.to_vec();
        gelu_in_place(&mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `GELU(x[.., :n]) · x[.., n:]` for `x` `[.., 2n]`: the gated feed-forward unit of
/// GeGLU layers (ModernBERT), whose one projection holds the input and its gate.
///
/// On the CPU in f32, one pass per row: candle's way (narrow, a contiguous copy for
/// GELU, GELU, then a strided product in its own thread pool) read and wrote the
/// `[tokens, n]` halves four times and was 8 % of a bf16 ModernBERT pass.
pub fn gelu_gated(x: &Tensor) -> Result<Tensor> {
    let last = x.rank() - 1;
    let n = x.dim(last)? / 2;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return cpu_op::apply(&GeluGated, x, None);
    }
    gelu_erf(&x.narrow(last, 0, n)?)? * x.narrow(last, n, n)?
}

struct GeluGated;

impl F32Op for GeluGated {
    const NAME: &'static str = "embedstream-gelu-gated";
    const LABEL: &'static str = "gelu_gated";

    fn run(&self, x: &[f32], layout: &Layout, _: Second) -> Output {
        let mut dims = layout.shape().dims().to_vec();
        let Some(width) = dims.last_mut() else {
            candle_core::bail!("gelu_gated: expected at least one dimension");
        };
        if !width.is_multiple_of(2) {
            candle_core::bail!("gelu_gated: the last dimension ({width}) must be even");
        }
        *width /= 2;
        let n = *width;
        let mut out = vec![0f32; x.len() / 2];
        if let Some(rows_per_task) = TASK_ELEMENTS.checked_div(n) {
            let rows_per_task = rows_per_task.max(1);
            out.par_chunks_mut(rows_per_task * n)
                .zip(x.par_chunks(rows_per_task * 2 * n))
                .for_each(|(out, x)| {
                    for (out, x) in out.chunks_exact_mut(n).zip(x.chunks_exact(2 * n)) {
                        let (input, gate) = x.split_at(n);
                        out.copy_from_slice(input);
                        activate_times_in_place(out, gate, false);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `GELU(x) · y` or `SiLU(x) · y` (`silu` true) for `x` and `y` of one shape: the
/// gated unit of SwiGLU and GeGLU layers whose gate and input are two projections
/// (Qwen3, NomicBERT, GTE). On the CPU in f32, one pass where candle ran the
/// activation and the product as two, in its own spinning thread pool (5 % of a bf16
/// NomicBERT pass, with scalar libm `expf` another 3 %).
pub fn activated_times(x: &Tensor, y: &Tensor, silu: bool) -> Result<Tensor> {
    if x.device().is_cpu()
        && x.dtype() == DType::F32
        && y.dtype() == DType::F32
        && x.dims() == y.dims()
    {
        return cpu_op::apply(&ActivatedTimes { silu }, x, Some(y));
    }
    let activated = if silu {
        candle_nn::ops::silu(x)?
    } else {
        gelu_erf(x)?
    };
    activated * y
}

struct ActivatedTimes {
    silu: bool,
}

impl F32Op for ActivatedTimes {
    const NAME: &'static str = "embedstream-activated-times";
    const LABEL: &'static str = "activated_times";
    const INPUT: &'static str = "gate";
    const SECOND: &'static str = "input";

    fn run(&self, x: &[f32], layout: &Layout, y: Second) -> Output {
        let Some((y, _)) = y.filter(|(y, _)| y.len() == x.len()) else {
            candle_core::bail!("activated_times: expected a second input of the gate's shape");
        };
        let mut out = x.to_vec();
        out.par_chunks_mut(TASK_ELEMENTS)
            .zip(y.par_chunks(TASK_ELEMENTS))
            .for_each(|(out, y)| activate_times_in_place(out, y, self.silu));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `values = activation(values) · by`, GELU or SiLU: the body of both gated kernels.
fn activate_times_in_place(values: &mut [f32], by: &[f32], silu: bool) {
    if silu {
        simd::silu_in_place(values);
    } else {
        simd::gelu_in_place(values);
    }
    for (v, b) in values.iter_mut().zip(by) {
        *v *= b;
    }
}

/// The kernels proper: one portable body each, compiled twice.
mod simd {
    use super::{Heads, Reach};
    use crate::nn::gemm::{sgemm, MatMut, MatRef, Parallelism};

    /// A score no key within reach can come near: its weight underflows to zero.
    const OUT_OF_REACH: f32 = f32::MIN / 2.0;

    pub fn gelu_in_place(values: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::nn::cpu::current() >= crate::nn::cpu::Kernels::Avx2 {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { gelu_in_place_avx2(values) };
        }
        gelu_in_place_body(values)
    }

    pub fn silu_in_place(values: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::nn::cpu::current() >= crate::nn::cpu::Kernels::Avx2 {
            // SAFETY: as above.
            return unsafe { silu_in_place_avx2(values) };
        }
        silu_in_place_body(values)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn silu_in_place_avx2(values: &mut [f32]) {
        silu_in_place_body(values)
    }

    /// `x · σ(x)` with our polynomial `exp`, which the compiler vectorises.
    #[inline(always)]
    fn silu_in_place_body(values: &mut [f32]) {
        for v in values.iter_mut() {
            *v /= 1.0 + exp(-*v);
        }
    }

    pub fn attention_row(qkv: &[f32], bias: &[f32], heads: Heads, reach: Reach, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::nn::cpu::current() >= crate::nn::cpu::Kernels::Avx2 {
            // SAFETY: as above.
            return unsafe { attention_avx2(qkv, bias, heads, reach, out) };
        }
        attention_body(qkv, bias, heads, reach, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attention_avx2(
        qkv: &[f32],
        bias: &[f32],
        heads: Heads,
        reach: Reach,
        out: &mut [f32],
    ) {
        attention_body(qkv, bias, heads, reach, out)
    }

    /// One sequence: `qkv` is `[t, (heads.query + 2·heads.key_value)·d]`, `out`
    /// `[t, heads.query·d]`. Per query head, two small products through `gemm`
    /// (strided straight out of `qkv`, no copies) around a softmax; only the real
    /// (unpadded) query rows are computed.
    #[inline(always)]
    fn attention_body(qkv: &[f32], bias: &[f32], heads: Heads, reach: Reach, out: &mut [f32]) {
        let tokens = bias.len();
        let hidden = out.len() / tokens;
        let dim = hidden / heads.query;
        let row = qkv.len() as isize / tokens as isize;
        let group = heads.query / heads.key_value;
        let (keys_at, values_at) = (hidden, hidden + heads.key_value * dim);
        // Real tokens come first; padding carries a large negative bias.
        let real = bias.iter().take_while(|&&b| b == 0.0).count().max(1);
        let mut scores = vec![0f32; real * tokens];
        for head in 0..heads.query {
            let shared = head / group;
            let query = qkv[head * dim..].as_ptr();
            let key = qkv[keys_at + shared * dim..].as_ptr();
            let value = qkv[values_at + shared * dim..].as_ptr();
            // SAFETY: every index the strides reach lies inside `qkv`, `scores` and `out`:
            // rows < tokens of width 3·hidden, columns < dim within this head's slice.
            unsafe {
                // scores[i, j] = query_i · key_j
                sgemm(
                    MatMut {
                        ptr: scores.as_mut_ptr(),
                        rows: real,
                        cols: tokens,
                        row_stride: tokens as isize,
                        col_stride: 1,
                    },
                    MatRef {
                        ptr: query,
                        row_stride: row,
                        col_stride: 1,
                    },
                    MatRef {
                        ptr: key,
                        row_stride: 1,
                        col_stride: row,
                    },
                    dim,
                    false,
                    Parallelism::None,
                );
            }
            for (i, scores) in scores.chunks_exact_mut(tokens).enumerate() {
                for (s, &b) in scores.iter_mut().zip(bias) {
                    *s += b;
                }
                // Keys out of reach weigh exactly nothing, as under a masking bias.
                let (lo, hi) = match reach {
                    Reach::All => (0, tokens),
                    Reach::Window(w) => (i.saturating_sub(w), (i + w + 1).min(tokens)),
                    Reach::Causal => (0, i + 1),
                };
                scores[..lo].fill(OUT_OF_REACH);
                scores[hi..].fill(OUT_OF_REACH);
                softmax_in_place(scores);
            }
            // SAFETY: as above.
            unsafe {
                // out[i, head] = Σ_j scores[i, j] · value_j
                sgemm(
                    MatMut {
                        ptr: out[head * dim..].as_mut_ptr(),
                        rows: real,
                        cols: dim,
                        row_stride: hidden as isize,
                        col_stride: 1,
                    },
                    MatRef {
                        ptr: scores.as_ptr(),
                        row_stride: tokens as isize,
                        col_stride: 1,
                    },
                    MatRef {
                        ptr: value,
                        row_stride: row,
                        col_stride: 1,
                    },
                    tokens,
                    false,
                    Parallelism::None,
                );
            }
        }
    }

    /// Eight lanes at a time with FMA: the compiler vectorises [`gelu_one`] too, but
    /// may not contract its multiply-adds, which left GELU at 4 % of a MiniLM pass.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gelu_in_place_avx2(values: &mut [f32]) {
        use std::arch::x86_64::*;
        let mut chunks = values.chunks_exact_mut(8);
        for chunk in &mut chunks {
            let x = _mm256_loadu_ps(chunk.as_ptr());
            _mm256_storeu_ps(chunk.as_mut_ptr(), avx2::gelu(x));
        }
        gelu_in_place_body(chunks.into_remainder());
    }

    /// [`gelu_one`], [`erf`] and [`exp`] on eight lanes: the same polynomials.
    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub fn gelu(x: __m256) -> __m256 {
            let set = _mm256_set1_ps;
            let u = _mm256_mul_ps(x, set(std::f32::consts::FRAC_1_SQRT_2));
            let sign = _mm256_and_ps(u, set(-0.0));
            let a = _mm256_andnot_ps(set(-0.0), u);
            let t = _mm256_div_ps(set(1.0), _mm256_fmadd_ps(set(0.327_591_1), a, set(1.0)));
            let mut poly = _mm256_fmadd_ps(set(1.061_405_4), t, set(-1.453_152_1));
            poly = _mm256_fmadd_ps(poly, t, set(1.421_413_7));
            poly = _mm256_fmadd_ps(poly, t, set(-0.284_496_74));
            poly = _mm256_fmadd_ps(poly, t, set(0.254_829_6));
            poly = _mm256_mul_ps(poly, t);
            let decay = exp(_mm256_mul_ps(_mm256_xor_ps(a, set(-0.0)), a));
            let magnitude = _mm256_fnmadd_ps(poly, decay, set(1.0));
            let erf = _mm256_or_ps(_mm256_andnot_ps(set(-0.0), magnitude), sign);
            _mm256_mul_ps(_mm256_mul_ps(set(0.5), x), _mm256_add_ps(set(1.0), erf))
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn exp(x: __m256) -> __m256 {
            let set = _mm256_set1_ps;
            let x = _mm256_min_ps(_mm256_max_ps(x, set(-87.0)), set(88.0));
            let n = _mm256_floor_ps(_mm256_fmadd_ps(x, set(std::f32::consts::LOG2_E), set(0.5)));
            let r = _mm256_fmadd_ps(
                n,
                set(2.121_944_4e-4),
                _mm256_fnmadd_ps(n, set(0.693_359_4), x),
            );
            let z = _mm256_mul_ps(r, r);
            let mut p = _mm256_fmadd_ps(set(1.987_569_1e-4), r, set(1.398_199_9e-3));
            p = _mm256_fmadd_ps(p, r, set(8.333_452e-3));
            p = _mm256_fmadd_ps(p, r, set(4.166_579_6e-2));
            p = _mm256_fmadd_ps(p, r, set(1.666_666_5e-1));
            p = _mm256_fmadd_ps(p, r, set(0.5));
            let y = _mm256_add_ps(_mm256_fmadd_ps(p, z, r), set(1.0));
            // 2^n as in the scalar exp: n + 127 in the low bits of a float in [2^23, 2^24).
            let biased = _mm256_castps_si256(_mm256_add_ps(n, set(127.0 + 8_388_608.0)));
            _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)))
        }
    }

    #[inline(always)]
    fn gelu_in_place_body(values: &mut [f32]) {
        for v in values.iter_mut() {
            *v = gelu_one(*v);
        }
    }

    #[inline(always)]
    fn gelu_one(x: f32) -> f32 {
        0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
    }

    #[inline(always)]
    fn softmax_in_place(row: &mut [f32]) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        for v in row.iter_mut() {
            *v = exp(*v - max);
        }
        // Eight partial sums: a single running sum would not vectorise.
        let mut sums = [0f32; 8];
        let mut chunks = row.chunks_exact(8);
        for chunk in &mut chunks {
            for (sum, &v) in sums.iter_mut().zip(chunk) {
                *sum += v;
            }
        }
        let total: f32 = sums.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
        let scale = 1.0 / total;
        for v in row.iter_mut() {
            *v *= scale;
        }
    }

    /// e^x, relative error about 2e-7 (Cephes' `expf` polynomial), branch-free.
    #[inline(always)]
    pub(super) fn exp(x: f32) -> f32 {
        let x = x.clamp(-87.0, 88.0);
        let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let z = r * r;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
            * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
        let y = p * z + r + 1.0;
        // 2^n without a float-to-int cast, which Rust saturates and the compiler then
        // leaves scalar: n + 127 (1 to 254) lands in the low bits of a float in
        // [2^23, 2^24), and shifting those into the exponent field builds 2^n.
        let biased = (n + 127.0 + 8_388_608.0).to_bits();
        y * f32::from_bits(biased << 23)
    }

    /// erf(x), absolute error under 1.5e-7 (Abramowitz & Stegun 7.1.26), branch-free.
    #[inline(always)]
    pub(super) fn erf(x: f32) -> f32 {
        let a = x.abs();
        let t = 1.0 / (1.0 + 0.327_591_1 * a);
        let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t;
        let magnitude = 1.0 - poly * exp(-a * a);
        magnitude.copysign(x)
    }
}

#[cfg(test)]
mod tests {
    use super::simd::{erf, exp};
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_and_erf_match_libm() {
        for i in -8000..=8000 {
            let x = i as f32 / 100.0;
            let (want, got) = (x.exp(), exp(x));
            assert!(
                ((got - want) / want).abs() < 1e-6,
                "exp({x}) = {got}, want {want}"
            );
            let x = x / 10.0;
            let (want, got) = (libm_erf(x), erf(x));
            assert!((got - want).abs() < 1e-6, "erf({x}) = {got}, want {want}");
        }
    }

    fn libm_erf(x: f32) -> f32 {
        // erf via the series for |x| < 3 (f64, converges fast) and 1 beyond.
        let x = x as f64;
        if x.abs() >= 4.0 {
            return x.signum() as f32;
        }
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        (sum * 2.0 / std::f64::consts::PI.sqrt()) as f32
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// softmax(q·kᵀ + each of `biases`)·v by candle's ops, from a fused projection
    /// `[b, t, 3·heads·d]`: what the kernel must give.
    fn reference_attention(qkv: &Tensor, heads: usize, biases: &[&Tensor]) -> Result<Tensor> {
        let (batch, tokens, width) = qkv.dims3()?;
        let dim = width / (3 * heads);
        let split = qkv
            .reshape((batch, tokens, 3, heads, dim))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (
            split.get(0)?.contiguous()?,
            split.get(1)?.contiguous()?,
            split.get(2)?.contiguous()?,
        );
        let mut scores = q.matmul(&k.t()?)?;
        for bias in biases {
            scores = scores.broadcast_add(bias)?;
        }
        softmax_last_dim(&scores)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, tokens, heads * dim))
    }

    #[test]
    fn fused_ops_match_candle() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (3, 5, 37), &device)?;
        let diff = max_diff(&gelu_erf(&x)?, &x.gelu_erf()?)?;
        assert!(diff < 2e-6, "gelu differs by {diff}");
        // In place (the fused layers' ending), over a length off the 8-lane blocks.
        let mut values: Vec<f32> = (-1000..=1000).map(|i| i as f32 / 100.0).collect();
        let want = Tensor::new(values.as_slice(), &device)?
            .gelu_erf()?
            .to_vec1::<f32>()?;
        gelu_in_place(&mut values);
        for (got, want) in values.iter().zip(&want) {
            assert!((got - want).abs() < 2e-6, "gelu in place: {got} vs {want}");
        }
        // Gated, over rows of 2·37 (input, then gate), against the unfused graph.
        let x = Tensor::randn(0f32, 3.0, (3, 5, 74), &device)?;
        let want = (x.narrow(2, 0, 37)?.gelu_erf()? * x.narrow(2, 37, 37)?)?;
        let got = gelu_gated(&x)?;
        assert_eq!(got.dims(), &[3, 5, 37]);
        let diff = max_diff(&got, &want)?;
        assert!(diff < 2e-5, "gated gelu differs by {diff}");
        // Gate and input as two tensors, GELU and SiLU, against candle's ops.
        let (gate, input) = (x.narrow(2, 0, 37)?, x.narrow(2, 37, 37)?);
        let diff = max_diff(&activated_times(&gate, &input, false)?, &want)?;
        assert!(diff < 2e-5, "gelu times differs by {diff}");
        let want = (candle_nn::ops::silu(&gate)? * &input)?;
        let diff = max_diff(&activated_times(&gate, &input, true)?, &want)?;
        assert!(diff < 2e-5, "silu times differs by {diff}");

        let mask = Tensor::new(
            &[[1f32, 1., 1., 1., 1., 0., 0.], [1., 1., 1., 1., 1., 1., 1.]],
            &device,
        )?;
        let bias = mask
            .affine(-f32::MIN as f64, f32::MIN as f64)?
            .reshape((2, 1, 1, 7))?;

        // Attention against candle's unfused graph, at the real (unpadded) rows.
        let (heads, dim) = (3, 4);
        let qkv = Tensor::randn(0f32, 1.0, (2, 7, 3 * heads * dim), &device)?;
        let want = reference_attention(&qkv, heads, &[&bias])?;
        let got = attention(&qkv, &bias, heads)?;
        let diff = max_diff(&got.narrow(1, 0, 5)?, &want.narrow(1, 0, 5)?)?;
        assert!(diff < 1e-5, "attention differs by {diff}");
        let diff = max_diff(&got.get(1)?, &want.get(1)?)?;
        assert!(
            diff < 1e-5,
            "attention differs by {diff} on the unpadded row"
        );
        Ok(())
    }

    #[test]
    fn windowed_attention_matches_a_window_bias() -> Result<()> {
        let device = Device::Cpu;
        let (batch, tokens, heads, dim, half_window) = (2, 9, 2, 4, 2);
        let lengths = [9usize, 6];
        let mask: Vec<f32> = lengths
            .iter()
            .flat_map(|&n| (0..tokens).map(move |j| if j < n { 1.0 } else { 0.0 }))
            .collect();
        let padding = Tensor::from_vec(mask, (batch, 1, 1, tokens), &device)?
            .affine(-(f32::MIN / 2.0) as f64, (f32::MIN / 2.0) as f64)?;
        let window: Vec<f32> = (0..tokens)
            .flat_map(|i| {
                (0..tokens).map(move |j| {
                    if i.abs_diff(j) <= half_window {
                        0.0
                    } else {
                        f32::MIN / 2.0
                    }
                })
            })
            .collect();
        let window = Tensor::from_vec(window, (1, 1, tokens, tokens), &device)?;
        let qkv = Tensor::randn(0f32, 1.0, (batch, tokens, 3 * heads * dim), &device)?;
        let want = reference_attention(&qkv, heads, &[&padding, &window])?;
        let got = attention_reaching(
            &qkv,
            &padding,
            Heads::all(heads),
            Reach::Window(half_window),
        )?;
        for (row, &n) in lengths.iter().enumerate() {
            let diff = max_diff(
                &got.get(row)?.narrow(0, 0, n)?,
                &want.get(row)?.narrow(0, 0, n)?,
            )?;
            assert!(
                diff < 1e-5,
                "row {row}: windowed attention differs by {diff}"
            );
        }
        Ok(())
    }

    #[test]
    fn packed_causal_attention_with_grouped_heads_matches_candle() -> Result<()> {
        let device = Device::Cpu;
        let (heads, kv_heads, dim) = (4, 2, 8);
        let lengths = [5usize, 1, 3];
        let total: usize = lengths.iter().sum();
        let width = (heads + 2 * kv_heads) * dim;
        let qkv = Tensor::randn(0f32, 1.0, (total, width), &device)?;
        let got = attention_packed(
            &qkv,
            &lengths,
            Heads {
                query: heads,
                key_value: kv_heads,
            },
            Reach::Causal,
        )?;
        let mut start = 0;
        for &n in &lengths {
            let sequence = qkv.narrow(0, start, n)?;
            let split = |at: usize, count: usize| -> Result<Tensor> {
                sequence
                    .narrow(1, at * dim, count * dim)?
                    .reshape((n, count, dim))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            // Each key/value head serves heads / kv_heads consecutive query heads.
            let repeat = |t: Tensor| -> Result<Tensor> {
                t.unsqueeze(1)?
                    .expand((kv_heads, heads / kv_heads, n, dim))?
                    .reshape((heads, n, dim))
            };
            let q = split(0, heads)?;
            let k = repeat(split(heads, kv_heads)?)?;
            let v = repeat(split(heads + kv_heads, kv_heads)?)?;
            let causal: Vec<f32> = (0..n)
                .flat_map(|i| (0..n).map(move |j| if j <= i { 0.0 } else { f32::MIN / 2.0 }))
                .collect();
            let causal = Tensor::from_vec(causal, (1, n, n), &device)?;
            let scores = q.matmul(&k.t()?)?.broadcast_add(&causal)?;
            let want = softmax_last_dim(&scores)?
                .matmul(&v)?
                .transpose(0, 1)?
                .reshape((n, heads * dim))?;
            let diff = max_diff(&got.narrow(0, start, n)?, &want)?;
            assert!(diff < 1e-5, "sequence of {n}: attention differs by {diff}");
            start += n;
        }
        Ok(())
    }
}
