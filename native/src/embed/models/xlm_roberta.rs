//! XLM-RoBERTa and RoBERTa: BERT's encoder with position ids that count from
//! `padding_idx + 1` over the tokens (so `max_position_embeddings − padding_idx − 1`
//! tokens fit), one token type, and weights under `roberta.` in task checkpoints.
//! Used by multilingual-e5, bge-m3 (dense), snowflake-arctic-embed-l-v2, all-roberta.
//! What differs from BERT is read here; the dispatch runs BERT's encoder with it.

use serde_json::Value;

use crate::error::EmbedError;

/// Where task checkpoints keep the encoder, tried in order before the root.
pub const PREFIXES: &[&str] = &["roberta", "xlm-roberta"];

/// The first position id, `pad_token_id + 1`; an error if `max_position_embeddings`
/// leaves no position from there.
pub fn first_position(config: &Value, max_position_embeddings: usize) -> Result<u32, EmbedError> {
    let padding_idx = config
        .get("pad_token_id")
        .and_then(Value::as_u64)
        .unwrap_or(1) as usize;
    let first_position = padding_idx + 1;
    if max_position_embeddings <= first_position {
        return Err(EmbedError::InvalidModel(format!(
            "config.json: max_position_embeddings {max_position_embeddings} leaves no position after pad_token_id {padding_idx}"
        )));
    }
    Ok(first_position as u32)
}
