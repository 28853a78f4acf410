//! Linear layers, in float or int8, with what follows them fused in.
//!
//! A transformer layer's products are followed by element-wise passes: the bias, a
//! residual sum, an activation. Run as separate candle ops, each pass reads and writes
//! the whole `[tokens, features]` output (12 MB for a 2,048-token MiniLM batch, out
//! of cache) and its output buffer is zeroed first. On the CPU in f32, perf put those
//! passes and the zeroing at 12 % of a MiniLM forward pass.
//!
//! Here the CPU splits the rows into one block per thread: the block is started from
//! the bias, `gemm` adds the product into it, and the residual and the activation are
//! applied by the same task right after. (Smaller blocks would keep the epilogue in
//! L2, but `gemm` packs the whole weight matrix once per call: at 256-row blocks
//! packing took 7.6 % of the pass against 3 % at one block per thread.)

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, DType, Layout, Module, Result, Shape, Storage, Tensor};
use candle_nn::Linear;
use rayon::prelude::*;

use super::activation::Activation;
use super::bf16::Bf16Linear;
use super::cpu_op::{self, contiguous_f32, F32Op, Output, Second};
use super::gemm::{sgemm, MatMut, MatRef, Parallelism};
use super::kernels;
use super::q8::QuantizedLinear;
use super::tiled::TiledLinear;

/// Below this many rows per thread, one block with `gemm`'s own threading (over the
/// output columns) beats splitting the rows.
const MIN_ROWS_PER_THREAD: usize = 32;

/// How a model's linear layers run: in the float dtype of its weights, or on the CPU
/// with int8 (`dtype="q8"`) or bf16 (`dtype="bf16"`) weights, f32 everywhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearKind {
    Float,
    Int8,
    Bf16,
}

/// A linear layer in the model's float dtype, or packed for one of our CPU kernels
/// (`LinearKind`): what every encoder builds its projections from, so one setting
/// changes them all.
pub enum Dense {
    Float(Linear),
    Int8(QuantizedLinear),
    Bf16(Bf16Linear),
}

/// What happens to a layer's output rows after the product and the bias.
#[derive(Clone, Copy, Default)]
pub struct Then<'a> {
    /// Added element-wise: `[.., out]` like the output.
    pub residual: Option<&'a Tensor>,
    pub activation: Option<Activation>,
}

impl Dense {
    pub fn new(linear: Linear, kind: LinearKind) -> Result<Self> {
        Ok(match kind {
            LinearKind::Float => Self::Float(linear),
            LinearKind::Int8 => Self::Int8(QuantizedLinear::new(linear.weight(), linear.bias())?),
            LinearKind::Bf16 => Self::Bf16(Bf16Linear::new(linear.weight(), linear.bias())?),
        })
    }

    /// `x · Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, Then::default())
    }

    /// `activation(x · Wᵀ + b)`.
    pub fn forward_activated(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        self.forward_then(
            x,
            Then {
                activation: Some(activation),
                ..Then::default()
            },
        )
    }

    /// `x · Wᵀ + b + residual`.
    pub fn forward_plus(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.forward_then(
            x,
            Then {
                residual: Some(residual),
                ..Then::default()
            },
        )
    }

    /// `activation(x · Wᵀ + b + residual)`, either part optional.
    pub fn forward_then(&self, x: &Tensor, then: Then) -> Result<Tensor> {
        // Only GELU has an in-place CPU kernel; other activations run after.
        let fused_gelu = then.activation == Some(Activation::Gelu);
        let fusable = x.device().is_cpu()
            && x.dtype() == DType::F32
            && then.residual.is_none_or(|r| {
                r.dtype() == DType::F32 && r.dims() == self.output_dims(x).as_slice()
            });
        let rest = |y: Tensor, done_gelu: bool| match then.activation {
            Some(activation) if !(done_gelu && activation == Activation::Gelu) => {
                activation.apply(&y)
            }
            _ => Ok(y),
        };
        match self {
            Self::Float(linear) if fusable && linear.weight().dtype() == DType::F32 => {
                let op = FloatOp {
                    weight: linear.weight(),
                    bias: linear.bias(),
                    gelu: fused_gelu,
                };
                rest(cpu_op::apply(&op, x, then.residual)?, true)
            }
            Self::Int8(linear) if fusable => {
                rest(linear.forward_then(x, then.residual, fused_gelu)?, true)
            }
            Self::Bf16(linear) if fusable => {
                rest(linear.forward_then(x, then.residual, fused_gelu)?, true)
            }
            _ => {
                let y = match self {
                    Self::Float(linear) => linear.forward(x)?,
                    Self::Int8(linear) => linear.forward(x)?,
                    Self::Bf16(linear) => linear.forward(x)?,
                };
                let y = match then.residual {
                    Some(residual) => (y + residual)?,
                    None => y,
                };
                rest(y, false)
            }
        }
    }

    fn output_dims(&self, x: &Tensor) -> Vec<usize> {
        let mut dims = x.dims().to_vec();
        dims.pop();
        dims.push(match self {
            Self::Float(linear) => linear.weight().dim(0).unwrap_or(0),
            Self::Int8(linear) => linear.out_features(),
            Self::Bf16(linear) => linear.out_features(),
        });
        dims
    }
}

/// Adds `residual` (the same shape as `out`, or none) and applies GELU, in place:
/// the end of every fused block.
pub(crate) fn finish(out: &mut [f32], residual: Option<&[f32]>, gelu: bool) {
    if let Some(residual) = residual {
        for (o, &r) in out.iter_mut().zip(residual) {
            *o += r;
        }
    }
    if gelu {
        kernels::gelu_in_place(out);
    }
}

/// `values` as the floats they now hold.
///
/// # Safety
/// Every element must have been written.
pub(crate) unsafe fn assume_written(values: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller vouches every element
    // is initialised.
    unsafe { &mut *(values as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// The float product on the CPU; the weight is `[out, in]` f32, the input `[.., in]`.
struct FloatOp<'a> {
    weight: &'a Tensor,
    bias: Option<&'a Tensor>,
    gelu: bool,
}

impl F32Op for FloatOp<'_> {
    const NAME: &'static str = "embedstream-linear";
    const NAME_WITH_SECOND: &'static str = "embedstream-linear-residual";
    const LABEL: &'static str = "linear";
    const SECOND: &'static str = "residual";

    fn run(&self, x: &[f32], x_layout: &Layout, residual: Second) -> Output {
        let (out_features, in_features) = self.weight.dims2()?;
        let mut dims = x_layout.dims().to_vec();
        if dims.pop() != Some(in_features) {
            candle_core::bail!(
                "linear: expected {in_features} input features, got {:?}",
                x_layout.dims()
            );
        }
        dims.push(out_features);
        let (weight_storage, weight_layout) = self.weight.storage_and_layout();
        let weight = cpu_f32(&weight_storage, weight_layout, "weight")?;
        let bias_guard = self.bias.map(|b| b.storage_and_layout());
        let bias = match &bias_guard {
            Some((storage, layout)) => Some(cpu_f32(storage, layout, "bias")?),
            None => None,
        };
        let residual = residual.map(|(r, _)| r);
        let out = float_matmul(x, in_features, weight, bias, residual, self.gelu);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => contiguous_f32(cpu, layout, "linear", what),
        _ => candle_core::bail!("linear: the {what} is not on the CPU"),
    }
}

/// `x` `[rows, k]` times `weight` `[n, k]` transposed, plus `bias`, then [`finish`]:
/// `[rows, n]`, one block of rows per thread of the rayon pool.
fn float_matmul(
    x: &[f32],
    k: usize,
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    gelu: bool,
) -> Vec<f32> {
    let n = weight.len() / k.max(1);
    let rows = x.len() / k.max(1);
    let threads = rayon::current_num_threads().max(1);
    let mut out: Vec<f32> = Vec::with_capacity(rows * n);
    if rows == 0 || n == 0 {
        return out;
    }
    let spare = &mut out.spare_capacity_mut()[..rows * n];
    let block = |first: usize, out: &mut [MaybeUninit<f32>], parallelism: Parallelism| {
        let count = out.len() / n;
        for row in out.chunks_mut(n) {
            match bias {
                Some(bias) => row.iter_mut().zip(bias).for_each(|(o, &b)| {
                    o.write(b);
                }),
                None => row.iter_mut().for_each(|o| {
                    o.write(0.0);
                }),
            }
        }
        // SAFETY: every element of `out` was written just above.
        let out = unsafe { assume_written(out) };
        // SAFETY: `out` is `[count, n]` row-major, `x` from row `first` is `[count, k]`
        // and `weight` is `[n, k]`, all row-major: every index the strides reach lies
        // inside the slices.
        unsafe {
            sgemm(
                MatMut {
                    ptr: out.as_mut_ptr(),
                    rows: count,
                    cols: n,
                    row_stride: n as isize,
                    col_stride: 1,
                },
                MatRef {
                    ptr: x[first * k..].as_ptr(),
                    row_stride: k as isize,
                    col_stride: 1,
                },
                MatRef {
                    ptr: weight.as_ptr(),
                    row_stride: 1,
                    col_stride: k as isize,
                },
                k,
                true,
                parallelism,
            );
        }
        finish(
            out,
            residual.map(|r| &r[first * n..(first + count) * n]),
            gelu,
        );
    };
    if rows < threads * MIN_ROWS_PER_THREAD {
        block(0, spare, Parallelism::Rayon(threads));
    } else {
        let rows_per_block = rows.div_ceil(threads);
        spare
            .par_chunks_mut(rows_per_block * n)
            .enumerate()
            .for_each(|(i, out)| block(i * rows_per_block, out, Parallelism::None));
    }
    // SAFETY: the blocks cover all `rows · n` elements and each initialised its own.
    unsafe { out.set_len(rows * n) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// A layer's weight `[n, k]` and bias, an input `[.., k]` of `shape` and a
    /// residual like the output.
    fn random_layer(shape: &[usize], n: usize) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let device = Device::Cpu;
        let mut out = shape.to_vec();
        let k = out.pop().unwrap_or(0);
        out.push(n);
        Ok((
            Tensor::randn(0f32, 0.3, (n, k), &device)?,
            Tensor::randn(0f32, 0.3, n, &device)?,
            Tensor::randn(0f32, 1.0, shape, &device)?,
            Tensor::randn(0f32, 1.0, out, &device)?,
        ))
    }

    #[test]
    fn fused_layers_match_candle_ops() -> Result<()> {
        // Row counts on both sides of the block threshold, one not a multiple of a block.
        for rows in [1usize, 3, 70, 601] {
            let (w, b, x, residual) = random_layer(&[rows, 37], 45)?;
            for bias in [Some(b.clone()), None] {
                let dense = Dense::new(Linear::new(w.clone(), bias.clone()), LinearKind::Float)?;
                let product = match &bias {
                    Some(b) => x.matmul(&w.t()?)?.broadcast_add(b)?,
                    None => x.matmul(&w.t()?)?,
                };
                let cases = [
                    (dense.forward(&x)?, product.clone()),
                    (dense.forward_plus(&x, &residual)?, (&product + &residual)?),
                    (
                        dense.forward_activated(&x, Activation::Gelu)?,
                        product.gelu_erf()?,
                    ),
                    (
                        dense.forward_then(
                            &x,
                            Then {
                                residual: Some(&residual),
                                activation: Some(Activation::Relu),
                            },
                        )?,
                        (&product + &residual)?.relu()?,
                    ),
                ];
                for (i, (got, want)) in cases.iter().enumerate() {
                    let diff = max_diff(got, want)?;
                    assert!(diff < 1e-5, "rows {rows}, case {i}: differs by {diff}");
                }
            }
        }
        Ok(())
    }

    /// The CPU kernels' fused endings (bias, residual, GELU) against the same layer's
    /// plain product followed by candle ops: one row alone (split by columns), a tile
    /// and a half, and a batch of sequences.
    #[test]
    fn packed_layers_fuse_bias_residual_and_gelu() -> Result<()> {
        let kinds = [
            (LinearKind::Int8, super::super::q8::supported()),
            (LinearKind::Bf16, super::super::bf16::supported()),
        ];
        for (kind, supported) in kinds {
            if !supported {
                eprintln!("skipped {kind:?}: not on this CPU's kernels");
                continue;
            }
            for shape in [&[1, 96][..], &[7, 96], &[2, 35, 96]] {
                let (w, b, x, residual) = random_layer(shape, 70)?;
                let dense = Dense::new(Linear::new(w, Some(b)), kind)?;
                let plain = dense.forward(&x)?;
                let fused = dense.forward_then(
                    &x,
                    Then {
                        residual: Some(&residual),
                        activation: Some(Activation::Gelu),
                    },
                )?;
                assert_eq!(fused.dims(), residual.dims());
                let want = (&plain + &residual)?.gelu_erf()?;
                let diff = max_diff(&fused, &want)?;
                assert!(diff < 1e-5, "{kind:?}, {shape:?}: differs by {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_batch_of_sequences_keeps_its_shape() -> Result<()> {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (8, 6), &device)?;
        let dense = Dense::new(Linear::new(w.clone(), None), LinearKind::Float)?;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 6), &device)?;
        let got = dense.forward(&x)?;
        assert_eq!(got.dims(), &[2, 5, 8]);
        let want = x.broadcast_matmul(&w.t()?)?;
        assert!(max_diff(&got, &want)? < 1e-5);
        Ok(())
    }
}
