//! A right-padded batch's real tokens, packed back to back.
//!
//! Batches are padded to their longest text. The CPU encoders run their products on
//! the real tokens only and attend within each sequence, then lay the hidden states
//! out padded again for pooling. Padding was 5 % of the rows of 2,048-token MiniLM
//! batches over 1,000 paragraphs, and a fifth to a quarter of them over the families
//! benchmark's 200 texts.

use candle_core::{DType, Device, Result, Tensor};

pub struct Packed {
    /// Real tokens per sequence, in batch order.
    pub lengths: Vec<usize>,
    /// Each packed token's position within its sequence.
    pub positions: Vec<u32>,
    /// `[Σ lengths]` u32 token ids.
    pub ids: Tensor,
    batch: usize,
    tokens: usize,
}

/// Runs an encoder's `layers` on the real tokens of the right-padded batch `ids`
/// (`[batch, tokens]` u32, `mask` 1 at tokens) and lays their f32 `[Σ lengths, hidden]`
/// output out padded again; a batch without a single real token gives zeros of `dtype`
/// without running them.
pub fn forward(
    ids: &Tensor,
    mask: &Tensor,
    hidden: usize,
    dtype: DType,
    layers: impl FnOnce(&Packed) -> Result<Tensor>,
) -> Result<Tensor> {
    let packed = Packed::new(ids, mask)?;
    if packed.total() == 0 {
        return packed.zeros(hidden, dtype);
    }
    packed.unpack(&layers(&packed)?)
}

impl Packed {
    /// `ids` and `mask` are `[batch, tokens]` u32, rows right-padded (mask 1 at tokens).
    fn new(ids: &Tensor, mask: &Tensor) -> Result<Self> {
        let (batch, tokens) = ids.dims2()?;
        let lengths: Vec<usize> = mask
            .to_vec2::<u32>()?
            .iter()
            .map(|row| row.iter().take_while(|&&m| m != 0).count())
            .collect();
        let total = lengths.iter().sum();
        let mut packed_ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        for (row, &length) in ids.to_vec2::<u32>()?.iter().zip(&lengths) {
            packed_ids.extend_from_slice(&row[..length]);
            positions.extend(0..length as u32);
        }
        Ok(Self {
            ids: Tensor::from_vec(packed_ids, total, ids.device())?,
            lengths,
            positions,
            batch,
            tokens,
        })
    }

    pub fn total(&self) -> usize {
        self.positions.len()
    }

    pub fn device(&self) -> &Device {
        self.ids.device()
    }

    /// The real tokens' entries of a `[batch, tokens]` u32 tensor laid out as `ids`
    /// (token types, for one), packed as the ids are: `[Σ lengths]`.
    pub fn pack(&self, values: &Tensor) -> Result<Tensor> {
        let mut packed = Vec::with_capacity(self.total());
        for (row, &length) in values.to_vec2::<u32>()?.iter().zip(&self.lengths) {
            packed.extend_from_slice(&row[..length]);
        }
        Tensor::from_vec(packed, self.total(), self.device())
    }

    /// `[Σ lengths]` u32 positions, each plus `offset`.
    pub fn position_ids(&self, offset: u32) -> Result<Tensor> {
        let positions = self.positions.iter().map(|&p| p + offset).collect();
        Tensor::from_vec(positions, self.total(), self.device())
    }

    /// The padded hidden states of a batch without a single real token.
    fn zeros(&self, hidden: usize, dtype: DType) -> Result<Tensor> {
        Tensor::zeros((self.batch, self.tokens, hidden), dtype, self.device())
    }

    /// f32 `[Σ lengths, hidden]` back to `[batch, tokens, hidden]`, zeros at padding.
    fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = x.dim(1)?;
        let packed = x.flatten_all()?.to_vec1::<f32>()?;
        let mut padded = vec![0f32; self.batch * self.tokens * hidden];
        let mut start = 0;
        for (row, &length) in self.lengths.iter().enumerate() {
            padded[row * self.tokens * hidden..][..length * hidden]
                .copy_from_slice(&packed[start..start + length * hidden]);
            start += length * hidden;
        }
        Tensor::from_vec(padded, (self.batch, self.tokens, hidden), self.device())
    }
}

/// What the encoders' tests share: their packed CPU path checked against the padded one.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Result, Tensor};

    /// Runs `packed` and `padded` over a right-padded batch of sequences of `lengths`
    /// (ids below `vocab`) and asserts that they agree on every real token, and that
    /// the packed path leaves zeros at padding.
    pub fn assert_packed_matches_padded(
        lengths: &[usize],
        vocab: usize,
        packed: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        padded: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let tokens = lengths.iter().copied().max().unwrap_or(0);
        let mut ids = vec![0u32; lengths.len() * tokens];
        let mut mask = vec![0u32; lengths.len() * tokens];
        for (row, &length) in lengths.iter().enumerate() {
            for t in 0..length {
                ids[row * tokens + t] = ((row * 11 + t * 7) % vocab) as u32;
                mask[row * tokens + t] = 1;
            }
        }
        let shape = (lengths.len(), tokens);
        let ids = Tensor::from_vec(ids, shape, &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, shape, &Device::Cpu)?;
        let (got, want) = (packed(&ids, &mask)?, padded(&ids, &mask)?);
        assert_eq!(got.dims(), want.dims());
        for (row, &length) in lengths.iter().enumerate() {
            let diff = (got.get(row)?.narrow(0, 0, length)?
                - want.get(row)?.narrow(0, 0, length)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
            assert!(diff < 1e-4, "row {row}: differs by {diff}");
            let rest = got.get(row)?.narrow(0, length, tokens - length)?;
            assert_eq!(rest.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        }
        Ok(())
    }
}
