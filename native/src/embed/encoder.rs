//! The interface every text encoder architecture implements, and what its loader
//! hands back. Architectures implement it in `models`; `dispatch` picks one.

use candle_core::{Result, Tensor};
use serde_json::Value;

use crate::error::EmbedError;

/// Token ids to hidden states.
pub trait Encoder: Send + Sync {
    /// Hidden states `[batch, tokens, hidden]` of right-padded `ids` (`[batch, tokens]`
    /// u32); `mask` is 1 at tokens, 0 at padding.
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor>;
}

/// A loaded encoder and what the embedder needs to know of it.
pub struct Loaded {
    pub encoder: Box<dyn Encoder>,
    pub hidden_size: usize,
    /// Most tokens one sequence may have, special tokens included.
    pub max_tokens: usize,
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    config: &Value,
) -> std::result::Result<T, EmbedError> {
    serde_json::from_value(config.clone())
        .map_err(|e| EmbedError::InvalidModel(format!("config.json: {e}")))
}
