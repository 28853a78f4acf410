//! The interface every text encoder architecture implements, and what its loader
//! hands back.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Token ids to hidden states.
pub trait Encoder: Send + Sync {
    /// Hidden states `[batch, tokens, hidden]` of right-padded `ids` (`[batch, tokens]`
    /// u32); `mask` is 1 at tokens, 0 at padding.
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor>;

    /// As [`Encoder::forward`] for sentence pairs, with each token's segment in
    /// `type_ids` (`[batch, tokens]` u32): BERT's cross-encoders tell query from
    /// passage by it. Encoders without token-type embeddings ignore it.
    fn forward_typed(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let _ = type_ids;
        self.forward(ids, mask)
    }
}

/// A loaded encoder and what the embedder needs to know of it.
pub struct Loaded {
    pub encoder: Box<dyn Encoder>,
    pub hidden_size: usize,
    /// Most tokens one sequence may have, special tokens included.
    pub max_tokens: usize,
}

impl Loaded {
    pub fn new(encoder: impl Encoder + 'static, hidden_size: usize, max_tokens: usize) -> Self {
        Self {
            encoder: Box::new(encoder),
            hidden_size,
            max_tokens,
        }
    }
}

/// The weights under the first of `prefixes` that holds `probe` (task checkpoints keep
/// the encoder under `bert.`, `model.`…), else at the root.
pub fn weights_under<'a>(vb: VarBuilder<'a>, prefixes: &[&str], probe: &str) -> VarBuilder<'a> {
    match prefixes
        .iter()
        .find(|p| vb.contains_tensor(&format!("{p}.{probe}")))
    {
        Some(prefix) => vb.pp(*prefix),
        None => vb,
    }
}
