//! Additive attention biases that stay finite in every dtype, and attention under
//! them through candle's ops (where our CPU kernels do not run).

use candle_core::{DType, Device, Result, Tensor};

/// The most negative finite value of `dtype`, as transformers' `torch.finfo(dtype).min`
/// (candle-transformers' `f32::MIN` becomes -inf in f16/bf16, then NaN at unmasked
/// positions).
pub fn finite_min(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.389_531_389_251_535_5e38,
        _ => f32::MIN as f64,
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
}
