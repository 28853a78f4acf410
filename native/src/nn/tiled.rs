//! What the CPU's packed-weight linear layers (q8 in `q8.rs`, bf16 in `bf16.rs`)
//! share around their kernels: the candle op, the split of the output into parallel
//! tasks, the walk over 64-column blocks and tiles of rows, each output written once
//! (no zeroing first) with its scale, bias and residual, and GELU after.

use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_op::{self, F32Op, Output, Second};
use super::dense::assume_written;
use super::kernels;

/// Output columns per packed block of weights: four 16-lane accumulators per row.
pub const BLOCK_N: usize = 64;
/// Tiles of rows per parallel task.
const TASK_TILES: usize = 8;
/// Output blocks per parallel task when there is a single row.
const TASK_BLOCKS: usize = 16;

/// What a packed layer keeps besides its weights: its sizes and its bias.
pub struct Sizes {
    pub in_features: usize,
    pub out_features: usize,
    /// `in_features` rounded up to the kernel's block of inputs.
    pub padded_k: usize,
    /// `out_features` rounded up to a multiple of `BLOCK_N`.
    pub padded_n: usize,
    /// Per output; zeros where the layer has none.
    pub bias: Vec<f32>,
}

impl Sizes {
    /// The sizes of a float layer (`weight` `[out, in]`, `bias` `[out]` or none) for a
    /// kernel that takes `block_k` inputs at a time, and its weight rows in f32.
    pub fn of(
        weight: &Tensor,
        bias: Option<&Tensor>,
        block_k: usize,
    ) -> Result<(Self, Vec<Vec<f32>>)> {
        let (out_features, in_features) = weight.dims2()?;
        let bias = match bias {
            Some(bias) => bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; out_features],
        };
        let sizes = Self {
            in_features,
            out_features,
            padded_k: in_features.div_ceil(block_k) * block_k,
            padded_n: out_features.div_ceil(BLOCK_N) * BLOCK_N,
            bias,
        };
        Ok((sizes, weight.to_dtype(DType::F32)?.to_vec2::<f32>()?))
    }
}

/// A linear layer whose weights are packed for one of our kernels.
pub trait TiledLinear: Sync {
    /// candle's names of the op, with and without a residual, and its name in errors.
    const NAME: &'static str;
    const NAME_WITH_RESIDUAL: &'static str;
    const LABEL: &'static str;

    fn sizes(&self) -> &Sizes;

    fn out_features(&self) -> usize {
        self.sizes().out_features
    }

    /// `rows` rows of `in_features` inputs → `[rows, out_features]`, with `residual`
    /// (the output's shape) added and GELU applied when asked.
    fn matmul(&self, input: &[f32], rows: usize, residual: Option<&[f32]>, gelu: bool) -> Vec<f32>;

    /// `x` is `[.., in]` f32 on the CPU; returns `[.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>
    where
        Self: Sized,
    {
        self.forward_then(x, None, false)
    }

    /// [`Self::forward`], then `+ residual` (`[.., out]` f32) and GELU, fused.
    fn forward_then(&self, x: &Tensor, residual: Option<&Tensor>, gelu: bool) -> Result<Tensor>
    where
        Self: Sized,
    {
        cpu_op::apply(&TiledOp { layer: self, gelu }, x, residual)
    }
}

struct TiledOp<'a, L> {
    layer: &'a L,
    gelu: bool,
}

impl<L: TiledLinear> F32Op for TiledOp<'_, L> {
    const NAME: &'static str = L::NAME;
    const NAME_WITH_SECOND: &'static str = L::NAME_WITH_RESIDUAL;
    const LABEL: &'static str = L::LABEL;
    const SECOND: &'static str = "residual";

    fn run(&self, input: &[f32], layout: &Layout, residual: Second) -> Output {
        let (k, n) = (self.layer.sizes().in_features, self.layer.out_features());
        let mut dims = layout.dims().to_vec();
        let last = dims.pop().unwrap_or(0);
        if last != k {
            candle_core::bail!("{}: expected {k} input features, got {last}", L::LABEL);
        }
        dims.push(n);
        let rows = input.len() / k.max(1);
        let residual = residual.map(|(r, _)| r);
        if residual.is_some_and(|r| r.len() != rows * n) {
            candle_core::bail!("{}: the residual is not the output's shape", L::LABEL);
        }
        let out = self.layer.matmul(input, rows, residual, self.gelu);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// What each output gets after its product: `· scale` (per output column, when
/// given) `+ bias + residual` (`[rows, n]`), then GELU.
pub struct Ending<'a> {
    pub scales: Option<&'a [f32]>,
    /// Per output column.
    pub bias: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub gelu: bool,
}

/// The outputs of one tile: up to `M` token rows against one block of 64 output
/// columns, each to be written once with its bias and residual added.
pub struct Tile<'a> {
    /// The block: output columns from `64 · block`.
    pub block: usize,
    /// The token rows.
    pub rows: Range<usize>,
    /// Output columns in the block: 64, or fewer in the last one.
    pub columns: usize,
    /// Row `r` of the tile (token `rows.start + r`) at `out[r · stride..]`.
    pub out: &'a mut [MaybeUninit<f32>],
    pub stride: usize,
    /// The block's bias, `columns` of it.
    pub bias: &'a [f32],
    /// The residual of the tile's outputs, laid out like `out`.
    pub residual: Option<&'a [f32]>,
    /// The block's scales, when the layer has them.
    pub scales: Option<&'a [f32]>,
}

impl Tile<'_> {
    /// Writes `acc[r][j] · scale + bias + residual` for every output of the tile.
    pub fn write(&mut self, acc: &[[f32; BLOCK_N]]) {
        for (r, acc) in acc.iter().enumerate().take(self.rows.len()) {
            let at = r * self.stride..r * self.stride + self.columns;
            let out = &mut self.out[at.clone()];
            let residual = self.residual.map(|residual| &residual[at]);
            for (j, (o, &a)) in out.iter_mut().zip(acc).enumerate() {
                let scaled = self.scales.map_or(a, |s| a * s[j]);
                o.write(scaled + self.bias[j] + residual.map_or(0.0, |r| r[j]));
            }
        }
    }
}

/// The `[rows, n]` outputs of a layer whose kernel computes tiles of up to `M`
/// rows against one 64-column block: `tile` computes and writes each [`Tile`], in
/// tasks of `8 · M` rows that run in parallel or, for a single row, of 16 column
/// blocks. GELU comes last, task by task.
///
/// # Safety
/// `tile` must write every output of its tile: `out[r · stride + j]` for each row
/// `r < rows.len()` and column `j < columns`.
pub unsafe fn matmul<const M: usize>(
    rows: usize,
    n: usize,
    ending: &Ending,
    tile: impl Fn(Tile) + Sync,
) -> Vec<f32> {
    let all_blocks = n.div_ceil(BLOCK_N);
    // Every task writes each of its outputs once: no zeroing first.
    let mut out: Vec<f32> = Vec::with_capacity(rows * n);
    let spare = &mut out.spare_capacity_mut()[..rows * n];
    let task = |rows: Range<usize>, blocks: Range<usize>, out: &mut [MaybeUninit<f32>]| {
        let first_column = blocks.start * BLOCK_N;
        let width = (blocks.end * BLOCK_N).min(n) - first_column;
        for block in blocks {
            let block_columns = block * BLOCK_N..((block + 1) * BLOCK_N).min(n);
            for first in rows.clone().step_by(M) {
                let tile_rows = first..(first + M).min(rows.end);
                let start = (first - rows.start) * width + block_columns.start - first_column;
                // A column task has a single row: its stride never applies.
                let residual_start = first * n + block_columns.start;
                tile(Tile {
                    block,
                    rows: tile_rows,
                    columns: block_columns.len(),
                    out: &mut out[start..],
                    stride: width,
                    bias: &ending.bias[block_columns.clone()],
                    residual: ending.residual.map(|r| &r[residual_start..]),
                    scales: ending.scales.map(|s| &s[block_columns.clone()]),
                });
            }
        }
        if ending.gelu {
            // SAFETY: the caller's `tile` wrote every output of every tile, and the
            // tiles cover the task's rows and blocks.
            kernels::gelu_in_place(unsafe { assume_written(out) });
        }
    };
    if rows == 1 {
        // One token (a decoder step): the work is in the columns, so split those.
        spare
            .par_chunks_mut(TASK_BLOCKS * BLOCK_N)
            .enumerate()
            .for_each(|(i, out)| {
                let first = i * TASK_BLOCKS;
                task(0..1, first..(first + TASK_BLOCKS).min(all_blocks), out)
            });
    } else if rows > 0 && n > 0 {
        let task_rows = TASK_TILES * M;
        spare
            .par_chunks_mut(task_rows * n)
            .enumerate()
            .for_each(|(i, out)| {
                let first = i * task_rows;
                task(first..first + out.len() / n, 0..all_blocks, out)
            });
    }
    // SAFETY: the tasks cover all `rows · n` outputs and wrote each one.
    unsafe { out.set_len(rows * n) };
    out
}

/// `n` values spread evenly over ±`half_width`, from a fixed generator: test inputs
/// that are the same in every run.
#[cfg(test)]
pub(crate) fn uniform(n: usize, seed: u64, half_width: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * half_width
        })
        .collect()
}
