//! Rotary position tables: the cos/sin of each position's angles, for the
//! architectures that rotate queries and keys (ModernBERT, Qwen3, NomicBERT, GTE).

use candle_core::{DType, Device, Result, Tensor};

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
}
