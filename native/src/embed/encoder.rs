//! The encoder architectures behind one interface, chosen by `config.json`'s
//! `model_type`. Each architecture is a module of its own; they differ in how they
//! turn token ids into hidden states, and nothing else the embedder does.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::bert::{Bert, BertConfig, Layout};
use super::rotary_bert::{self, Family};
use super::{modernbert, qwen3, xlm_roberta};
use crate::error::EmbedError;

/// Token ids to hidden states.
pub trait Encoder: Send + Sync {
    /// Hidden states `[batch, tokens, hidden]` of right-padded `ids` (`[batch, tokens]`
    /// u32); `mask` is 1 at tokens, 0 at padding.
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor>;
}

impl Encoder for Bert {
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        Bert::forward(self, ids, mask)
    }
}

/// A loaded encoder and what the embedder needs to know of it.
pub struct Loaded {
    pub encoder: Box<dyn Encoder>,
    pub hidden_size: usize,
    /// Most tokens one sequence may have, special tokens included.
    pub max_tokens: usize,
}

/// `model_type` values we load, as transformers writes them.
pub const SUPPORTED: &[&str] = &[
    "bert",
    "gte",
    "modernbert",
    "new",
    "nomic_bert",
    "qwen3",
    "roberta",
    "xlm-roberta",
];

pub fn load(
    config: &Value,
    vb: VarBuilder,
    quantize: bool,
) -> std::result::Result<Loaded, EmbedError> {
    // Old BERT checkpoints may not name their type.
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("bert");
    match model_type {
        "bert" => {
            let parsed = parse::<BertConfig>(config)?;
            let model = Bert::load(vb, &parsed, &Layout::BERT, quantize)?;
            Ok(Loaded {
                encoder: Box::new(model),
                hidden_size: parsed.hidden_size,
                max_tokens: parsed.max_position_embeddings,
            })
        }
        "roberta" | "xlm-roberta" => xlm_roberta::load(config, vb, quantize),
        "modernbert" => modernbert::load(config, vb, quantize),
        "qwen3" => qwen3::load(config, vb, quantize),
        "nomic_bert" => rotary_bert::load(config, vb, Family::Nomic, quantize),
        // The hub's GTE checkpoints say "new" (their remote code); transformers says "gte".
        "gte" | "new" => rotary_bert::load(config, vb, Family::Gte, quantize),
        other => Err(EmbedError::InvalidModel(format!(
            "model_type {other:?} is not supported; supported: {}",
            SUPPORTED.join(", ")
        ))),
    }
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    config: &Value,
) -> std::result::Result<T, EmbedError> {
    serde_json::from_value(config.clone())
        .map_err(|e| EmbedError::InvalidModel(format!("config.json: {e}")))
}
