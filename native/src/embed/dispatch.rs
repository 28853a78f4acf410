//! The encoder architecture that `config.json`'s `model_type` names: the only module
//! that names the families in `models`.

use candle_nn::VarBuilder;
use serde_json::Value;

use super::config::parse;
use super::encoder::Loaded;
use super::models::bert::{self, BertConfig, Layout};
use super::models::rotary_bert::{self, Family};
use super::models::{modernbert, qwen3, xlm_roberta};
use crate::error::EmbedError;
use crate::nn::dense::LinearKind;

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

pub fn load(config: &Value, vb: VarBuilder, linears: LinearKind) -> Result<Loaded, EmbedError> {
    // Old BERT checkpoints may not name their type.
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("bert");
    match model_type {
        "bert" => bert::load(vb, &parse(config)?, &Layout::BERT, linears),
        // RoBERTa is BERT's encoder under another layout.
        "roberta" | "xlm-roberta" => {
            let parsed = parse::<BertConfig>(config)?;
            let layout = Layout {
                prefixes: xlm_roberta::PREFIXES,
                position_offset: xlm_roberta::first_position(
                    config,
                    parsed.max_position_embeddings,
                )?,
            };
            bert::load(vb, &parsed, &layout, linears)
        }
        "modernbert" => modernbert::load(config, vb, linears),
        "qwen3" => qwen3::load(config, vb, linears),
        "nomic_bert" => rotary_bert::load(config, vb, Family::Nomic, linears),
        // The hub's GTE checkpoints say "new" (their remote code); transformers says "gte".
        "gte" | "new" => rotary_bert::load(config, vb, Family::Gte, linears),
        other => Err(EmbedError::InvalidModel(format!(
            "model_type {other:?} is not supported; supported: {}",
            SUPPORTED.join(", ")
        ))),
    }
}
