//! The sequence-classification heads of cross-encoders, on the first token's hidden
//! state: BERT's pooler and classifier (`BertForSequenceClassification`, ms-marco
//! MiniLM) and RoBERTa's classification head (`XLMRobertaForSequenceClassification`,
//! bge-reranker). Both compute `out(tanh(dense(h₀)))`; only their weights' names differ.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::error::EmbedError;

pub struct Classifier {
    dense: Linear,
    out: Linear,
    pub labels: usize,
}

impl Classifier {
    /// Loads whichever of the two heads `vb` (the checkpoint's root) holds.
    pub fn load(vb: &VarBuilder, hidden: usize) -> std::result::Result<Self, EmbedError> {
        let (dense, out) = if vb.contains_tensor("classifier.out_proj.weight") {
            ("classifier.dense", "classifier.out_proj")
        } else if vb.contains_tensor("classifier.weight") {
            let pooler = ["bert.pooler.dense", "pooler.dense"]
                .into_iter()
                .find(|p| vb.contains_tensor(&format!("{p}.weight")))
                .ok_or_else(|| {
                    EmbedError::InvalidModel(
                        "BertForSequenceClassification without its pooler (bert.pooler.dense)"
                            .into(),
                    )
                })?;
            (pooler, "classifier")
        } else {
            return Err(EmbedError::InvalidModel(
                "no sequence-classification head (classifier.* weights): a cross-encoder \
                 is saved as BertForSequenceClassification or XLMRobertaForSequenceClassification"
                    .into(),
            ));
        };
        let load = || -> Result<Self> {
            let labels = vb.pp(out).get_unchecked("weight")?.dim(0)?;
            Ok(Self {
                dense: candle_nn::linear(hidden, hidden, vb.pp(dense))?,
                out: candle_nn::linear(hidden, labels, vb.pp(out))?,
                labels,
            })
        };
        load().map_err(|e| EmbedError::InvalidModel(format!("classifier head: {e}")))
    }

    /// Logits `[batch, labels]` in f32 of the hidden states `[batch, tokens, hidden]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let first = hidden
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .to_dtype(self.dense.weight().dtype())?;
        self.out
            .forward(&self.dense.forward(&first)?.tanh()?)?
            .to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use candle_core::Device;

    fn random(names: &[(&str, &[usize])]) -> Result<HashMap<String, Tensor>> {
        names
            .iter()
            .map(|(name, shape)| {
                Ok((
                    name.to_string(),
                    Tensor::randn(0f32, 0.5, *shape, &Device::Cpu)?,
                ))
            })
            .collect()
    }

    /// `out(tanh(dense(h₀)))` by hand, for both layouts of the weights.
    #[test]
    fn both_heads_score_the_first_token() -> Result<()> {
        let hidden = Tensor::randn(0f32, 1.0, (3, 5, 8), &Device::Cpu)?;
        for (dense, out) in [
            ("bert.pooler.dense", "classifier"),
            ("classifier.dense", "classifier.out_proj"),
        ] {
            let tensors = random(&[
                (&format!("{dense}.weight"), &[8, 8]),
                (&format!("{dense}.bias"), &[8]),
                (&format!("{out}.weight"), &[1, 8]),
                (&format!("{out}.bias"), &[1]),
            ])?;
            let expected = {
                let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
                let t = |n: &str| tensors[n].clone();
                let pooled = first
                    .matmul(&t(&format!("{dense}.weight")).t()?)?
                    .broadcast_add(&t(&format!("{dense}.bias")))?
                    .tanh()?;
                pooled
                    .matmul(&t(&format!("{out}.weight")).t()?)?
                    .broadcast_add(&t(&format!("{out}.bias")))?
            };
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
            let head =
                Classifier::load(&vb, 8).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            assert_eq!(head.labels, 1);
            let got = head.forward(&hidden)?;
            let diff = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{dense}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn weights_without_a_head_are_named() -> Result<()> {
        let vb = VarBuilder::from_tensors(
            random(&[("classifier.weight", &[1, 8])])?,
            DType::F32,
            &Device::Cpu,
        );
        let message = Classifier::load(&vb, 8)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("pooler"), "{message}");
        let vb = VarBuilder::from_tensors(HashMap::new(), DType::F32, &Device::Cpu);
        let message = Classifier::load(&vb, 8)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("no sequence-classification head"),
            "{message}"
        );
        Ok(())
    }
}
