//! XLM-RoBERTa and RoBERTa: BERT's encoder with position ids that count from
//! `padding_idx + 1` over the tokens (so `max_position_embeddings − padding_idx − 1`
//! tokens fit), one token type, and weights under `roberta.` in task checkpoints.
//! Used by multilingual-e5, bge-m3 (dense), snowflake-arctic-embed-l-v2, all-roberta.

use candle_nn::VarBuilder;
use serde_json::Value;

use super::bert::{Bert, BertConfig, Layout};
use super::encoder::{parse, Loaded};
use crate::error::EmbedError;

pub fn load(config: &Value, vb: VarBuilder, quantize: bool) -> Result<Loaded, EmbedError> {
    let parsed = parse::<BertConfig>(config)?;
    let padding_idx = config
        .get("pad_token_id")
        .and_then(Value::as_u64)
        .unwrap_or(1) as usize;
    let first_position = padding_idx + 1;
    if parsed.max_position_embeddings <= first_position {
        return Err(EmbedError::InvalidModel(format!(
            "config.json: max_position_embeddings {} leaves no position after pad_token_id {padding_idx}",
            parsed.max_position_embeddings
        )));
    }
    let layout = Layout {
        prefixes: &["roberta", "xlm-roberta"],
        position_offset: first_position as u32,
    };
    let model = Bert::load(vb, &parsed, &layout, quantize)?;
    Ok(Loaded {
        encoder: Box::new(model),
        hidden_size: parsed.hidden_size,
        max_tokens: parsed.max_position_embeddings - first_position,
    })
}
