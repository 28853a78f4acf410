//! The head of LLM rerankers (Qwen3-Reranker): a causal LM's next-token logits of "yes"
//! and "no" at the last position. The score is P("yes") of the two (a softmax over
//! [no, yes]), which is the sigmoid of the difference of the two logits, so only the
//! difference of the LM head's two rows is kept.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::error::EmbedError;

pub struct YesNo {
    /// The "yes" row of the LM head less the "no" row, `[hidden]`, f32.
    difference: Tensor,
}

impl YesNo {
    /// The rows of `lm_head.weight`, or of the input embeddings where the checkpoint
    /// ties them and stores no LM head. `tied`: the config's `tie_word_embeddings`; a
    /// checkpoint that says its head is its own (`false`) and lacks it is refused rather
    /// than scored with the embeddings.
    pub fn load(
        vb: &VarBuilder,
        yes: u32,
        no: u32,
        tied: Option<bool>,
    ) -> std::result::Result<Self, EmbedError> {
        let candidates: &[&str] = if tied == Some(false) {
            &["lm_head.weight"]
        } else {
            &[
                "lm_head.weight",
                "model.embed_tokens.weight",
                "embed_tokens.weight",
            ]
        };
        let name = candidates
            .iter()
            .copied()
            .find(|n| vb.contains_tensor(n))
            .ok_or_else(|| {
                EmbedError::InvalidModel(if tied == Some(false) {
                    "an LLM reranker whose config says tie_word_embeddings: false needs its \
                     LM head (lm_head.weight), which the weights lack"
                        .into()
                } else {
                    "an LLM reranker needs its LM head (lm_head.weight) or tied embeddings".into()
                })
            })?;
        let load = || -> Result<Tensor> {
            let rows = vb.get_unchecked(name)?;
            let row = |id: u32| rows.narrow(0, id as usize, 1)?.to_dtype(DType::F32);
            row(yes)?.sub(&row(no)?)?.squeeze(0)
        };
        let difference =
            load().map_err(|e| EmbedError::InvalidModel(format!("LM head ({name}): {e}")))?;
        Ok(Self { difference })
    }

    /// The logit of "yes" less that of "no" at each row's last token (`lengths`: each
    /// row's real tokens, padding after them) of the hidden states `[batch, tokens, hidden]`.
    pub fn forward(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Vec<f32>> {
        let difference = self.difference.to_device(hidden.device())?;
        let mut logits = Vec::with_capacity(lengths.len());
        for (row, &length) in lengths.iter().enumerate() {
            let last = hidden
                .get(row)?
                .get(length.saturating_sub(1))?
                .to_dtype(DType::F32)?;
            logits.push((last * &difference)?.sum_all()?.to_scalar::<f32>()?);
        }
        Ok(logits)
    }
}
