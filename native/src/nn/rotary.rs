//! Rotary position tables: the cos/sin of each position's angles, for the
//! architectures that rotate queries and keys (ModernBERT, Qwen3, NomicBERT, GTE).

use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_op::{self, F32Op, Output, Second};
use super::kernels::Heads;

/// Rotary frequencies of one base (`theta`) for heads of `head_dim`.
pub struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        Self {
            inv_freq: (0..head_dim / 2)
                .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
                .collect(),
        }
    }

    /// cos and sin `[tokens, head_dim / 2]` of positions `0..tokens`, for
    /// `candle_nn::rotary_emb::rope` (the rotate-half layout transformers uses).
    pub fn tables(&self, tokens: usize, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
        let positions: Vec<u32> = (0..tokens as u32).collect();
        self.tables_at(&positions, device, dtype)
    }

    /// cos and sin `[positions, head_dim / 2]`, a row per position (packed sequences).
    pub fn tables_at(
        &self,
        positions: &[u32],
        device: &Device,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let angles: Vec<f32> = positions
            .iter()
            .flat_map(|&t| self.inv_freq.iter().map(move |f| t as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (positions.len(), self.inv_freq.len()), device)?;
        Ok((
            angles.cos()?.to_dtype(dtype)?,
            angles.sin()?.to_dtype(dtype)?,
        ))
    }
}

/// cos and sin of each packed token's position, `[tokens][head_dim / 2]`, on the
/// host: for [`rotate_packed`].
pub struct HostTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rotary {
    pub fn host_tables_at(&self, positions: &[u32]) -> HostTables {
        let angles = positions
            .iter()
            .flat_map(|&t| self.inv_freq.iter().map(move |f| t as f32 * f));
        HostTables {
            cos: angles.clone().map(f32::cos).collect(),
            sin: angles.map(f32::sin).collect(),
            half: self.inv_freq.len(),
        }
    }
}

/// The fused projection `qkv` (`[tokens, (heads.query + 2·heads.key_value)·d]`, one
/// row per packed token) with its query and key heads rotated by their token's
/// position (rotate-half layout, as `rope_thd`) and the queries times `query_scale`:
/// what the packed attention kernel takes. On the CPU in f32.
///
/// One pass over `qkv`, where narrowing out queries and keys, copying them, rotating
/// them, scaling the queries and concatenating all three again took six.
pub fn rotate_packed(
    qkv: &Tensor,
    tables: &HostTables,
    heads: Heads,
    query_scale: f32,
) -> Result<Tensor> {
    let op = RotatePacked {
        tables,
        heads,
        query_scale,
    };
    cpu_op::apply(&op, qkv, None)
}

struct RotatePacked<'a> {
    tables: &'a HostTables,
    heads: Heads,
    query_scale: f32,
}

/// Rows per parallel task.
const TASK_ROWS: usize = 16;

impl F32Op for RotatePacked<'_> {
    const NAME: &'static str = "embedstream-rotate-packed";
    const LABEL: &'static str = "rotate_packed";
    const INPUT: &'static str = "qkv";

    fn run(&self, qkv: &[f32], layout: &Layout, _: Second) -> Output {
        let (tokens, width) = layout.shape().dims2()?;
        let (query, key_value) = (self.heads.query, self.heads.key_value);
        let half = self.tables.half;
        let dim = 2 * half;
        if self.heads.dim(width) != Some(dim) || self.tables.cos.len() != tokens * half {
            candle_core::bail!(
                "rotate_packed: expected qkv [tokens, (heads + 2·kv_heads)·{dim}] and a table row per token"
            );
        }
        let rotated = (query + key_value) * dim;
        let mut out = vec![0f32; tokens * width];
        out.par_chunks_mut(TASK_ROWS * width)
            .zip(qkv.par_chunks(TASK_ROWS * width))
            .enumerate()
            .for_each(|(task, (out, qkv))| {
                let rows = out.chunks_exact_mut(width).zip(qkv.chunks_exact(width));
                for (row, (out, qkv)) in rows.enumerate() {
                    let at = (task * TASK_ROWS + row) * half;
                    let cos = &self.tables.cos[at..at + half];
                    let sin = &self.tables.sin[at..at + half];
                    let heads = out[..rotated]
                        .chunks_exact_mut(dim)
                        .zip(qkv[..rotated].chunks_exact(dim));
                    for (head, (out, x)) in heads.enumerate() {
                        let scale = if head < query { self.query_scale } else { 1.0 };
                        let (out1, out2) = out.split_at_mut(half);
                        let (x1, x2) = x.split_at(half);
                        for i in 0..half {
                            out1[i] = (x1[i] * cos[i] - x2[i] * sin[i]) * scale;
                            out2[i] = (x2[i] * cos[i] + x1[i] * sin[i]) * scale;
                        }
                    }
                    out[rotated..].copy_from_slice(&qkv[rotated..]);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((tokens, width))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_tables_start_at_angle_zero() {
        let (cos, sin) = Rotary::new(8, 10_000.0)
            .tables(3, &Device::Cpu, DType::F32)
            .unwrap();
        assert_eq!(cos.dims(), &[3, 4]);
        assert_eq!(cos.get(0).unwrap().to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        assert_eq!(sin.get(0).unwrap().to_vec1::<f32>().unwrap(), vec![0.0; 4]);
        // The first frequency is 1: position 2 turns by 2 radians.
        assert!((sin.get(2).unwrap().to_vec1::<f32>().unwrap()[0] - 2f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn rotate_packed_matches_rope_on_each_part() -> Result<()> {
        let device = Device::Cpu;
        let (heads, kv_heads, dim) = (4, 2, 8);
        let rotary = Rotary::new(dim, 10_000.0);
        // Two packed sequences, of 5 and 3 tokens: positions restart at 0.
        let positions: Vec<u32> = (0..5).chain(0..3).collect();
        let tokens = positions.len();
        let width = (heads + 2 * kv_heads) * dim;
        let qkv = Tensor::randn(0f32, 1.0, (tokens, width), &device)?;
        let got = rotate_packed(
            &qkv,
            &rotary.host_tables_at(&positions),
            Heads {
                query: heads,
                key_value: kv_heads,
            },
            0.5,
        )?;
        let (cos, sin) = rotary.tables_at(&positions, &device, DType::F32)?;
        let rope = |at: usize, count: usize| -> Result<Tensor> {
            let part = qkv
                .narrow(1, at * dim, count * dim)?
                .reshape((1, tokens, count, dim))?
                .contiguous()?;
            candle_nn::rotary_emb::rope_thd(&part, &cos, &sin)?.reshape((tokens, count * dim))
        };
        let want = Tensor::cat(
            &[
                (rope(0, heads)? * 0.5)?,
                rope(heads, kv_heads)?,
                qkv.narrow(1, (heads + kv_heads) * dim, kv_heads * dim)?,
            ],
            1,
        )?;
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "rotate_packed differs from rope by {diff}");
        Ok(())
    }
}
