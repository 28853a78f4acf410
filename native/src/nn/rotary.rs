//! What the architectures with rotary positions share: the cos/sin tables, additive
//! attention biases that stay finite in every dtype, and scaled dot-product attention
//! over `[batch, heads, tokens, head_dim]`.

use candle_core::{DType, Device, Result, Tensor};

use super::bert::finite_min;

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

/// The floor of one additive bias: half the dtype's most negative finite value, so
/// two biases (padding and causal, or padding and window) add up to a finite value and
/// a row with nothing to attend to stays finite (its output is never pooled).
pub fn bias_floor(dtype: DType) -> f32 {
    (finite_min(dtype) / 2.0) as f32
}

/// `[batch, 1, 1, tokens]`: 0 at tokens, the floor at padding (`mask` is 1 at tokens).
pub fn padding_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (batch, tokens) = mask.dims2()?;
    let floor = f64::from(bias_floor(dtype));
    mask.to_dtype(DType::F32)?
        .affine(-floor, floor)?
        .reshape((batch, 1, 1, tokens))
}

/// `[1, 1, tokens, tokens]`: 0 where query i may see key j, the floor elsewhere.
pub fn pair_bias(
    tokens: usize,
    device: &Device,
    dtype: DType,
    allowed: impl Fn(usize, usize) -> bool,
) -> Result<Tensor> {
    let floor = bias_floor(dtype);
    let values: Vec<f32> = (0..tokens)
        .flat_map(|i| (0..tokens).map(move |j| (i, j)))
        .map(|(i, j)| if allowed(i, j) { 0.0 } else { floor })
        .collect();
    Tensor::from_vec(values, (1, 1, tokens, tokens), device)
}

/// softmax(q·kᵀ/√d + bias)·v for `[batch, heads, tokens, d]` inputs (softmax in f32),
/// as `[batch, tokens, heads · d]`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (batch, heads, tokens, d) = q.dims4()?;
    let scores = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?.broadcast_add(bias)?;
    let weights =
        candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
    weights
        .matmul(v)?
        .transpose(1, 2)?
        .reshape((batch, tokens, heads * d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn biases_add_up_to_a_finite_floor() {
        let mask = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
        let padding = padding_bias(&mask, DType::F32).unwrap();
        let causal = pair_bias(3, &Device::Cpu, DType::F32, |i, j| j <= i).unwrap();
        let sum = padding
            .broadcast_add(&causal)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(sum.iter().all(|x| x.is_finite()));
        assert_eq!(
            &sum[..3],
            &[0.0, bias_floor(DType::F32), 2.0 * bias_floor(DType::F32)]
        );
    }

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
}
