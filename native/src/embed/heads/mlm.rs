//! The masked-language-model heads that SPLADE puts on its encoder: BERT's
//! `cls.predictions` and RoBERTa's `lm_head`. Both are a dense layer, an activation
//! and a LayerNorm, then the decoder, which shares its matrix with the word
//! embeddings (checkpoints usually leave it out for that reason), plus a bias per
//! vocabulary entry.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use crate::error::EmbedError;
use crate::nn::activation::Activation;

pub struct MlmHead {
    dense: Linear,
    activation: Activation,
    norm: LayerNorm,
    /// `[vocab, hidden]`, transposed once here for every product.
    decoder_t: Tensor,
    bias: Tensor,
}

/// Where a task checkpoint keeps its head, and the encoder whose embeddings it ties.
struct Names {
    head: &'static str,
    dense: &'static str,
    norm: &'static str,
    bias: &'static str,
    embeddings: &'static [&'static str],
}

const BERT: Names = Names {
    head: "cls.predictions",
    dense: "transform.dense",
    norm: "transform.LayerNorm",
    bias: "bias",
    embeddings: &["bert.embeddings.word_embeddings.weight"],
};

const ROBERTA: Names = Names {
    head: "lm_head",
    dense: "dense",
    norm: "layer_norm",
    bias: "bias",
    embeddings: &[
        "roberta.embeddings.word_embeddings.weight",
        "xlm-roberta.embeddings.word_embeddings.weight",
    ],
};

impl MlmHead {
    /// Loads BERT's head (`hidden_act` from the config) or RoBERTa's (always GELU),
    /// whichever `vb` holds; an error naming both when it holds neither.
    pub fn load(
        vb: &VarBuilder,
        hidden: usize,
        vocab: usize,
        eps: f64,
        hidden_act: &str,
    ) -> std::result::Result<Self, EmbedError> {
        let (names, activation) = if vb.contains_tensor("cls.predictions.transform.dense.weight") {
            (&BERT, Activation::parse(hidden_act, "config")?)
        } else if vb.contains_tensor("lm_head.dense.weight") {
            (&ROBERTA, Activation::Gelu)
        } else {
            return Err(EmbedError::InvalidModel(
                "no masked-language-model head (cls.predictions.* or lm_head.*): a SPLADE \
                 model is saved as BertForMaskedLM or RobertaForMaskedLM"
                    .into(),
            ));
        };
        Self::load_named(vb, names, hidden, vocab, eps, activation)
            .map_err(|e| EmbedError::InvalidModel(format!("{} head: {e}", names.head)))
    }

    fn load_named(
        vb: &VarBuilder,
        names: &Names,
        hidden: usize,
        vocab: usize,
        eps: f64,
        activation: Activation,
    ) -> Result<Self> {
        let head = vb.pp(names.head);
        let decoder = if head.contains_tensor("decoder.weight") {
            head.get((vocab, hidden), "decoder.weight")?
        } else {
            let tied = names
                .embeddings
                .iter()
                .find(|name| vb.contains_tensor(name))
                .copied()
                .unwrap_or(names.embeddings[0]);
            vb.get((vocab, hidden), tied)?
        };
        let bias = if head.contains_tensor(names.bias) {
            head.get(vocab, names.bias)?
        } else {
            head.get(vocab, "decoder.bias")?
        };
        Ok(Self {
            dense: candle_nn::linear(hidden, hidden, head.pp(names.dense))?,
            activation,
            norm: candle_nn::layer_norm(hidden, eps, head.pp(names.norm))?,
            decoder_t: decoder.t()?.contiguous()?,
            bias,
        })
    }

    /// Vocabulary logits `[rows, vocab]` in f32 of hidden states `[rows, hidden]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = hidden.to_dtype(self.dense.weight().dtype())?;
        let x = self
            .norm
            .forward(&self.activation.apply(&self.dense.forward(&x)?)?)?;
        x.matmul(&self.decoder_t)?
            .broadcast_add(&self.bias)?
            .to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use candle_core::Device;

    /// Without `decoder.weight` the head decodes with the word embeddings (tied), as
    /// transformers saves SPLADE checkpoints.
    #[test]
    fn the_decoder_is_tied_to_the_word_embeddings() -> Result<()> {
        let device = Device::Cpu;
        let mut tensors = HashMap::new();
        for (name, shape) in [
            ("bert.embeddings.word_embeddings.weight", vec![11, 6]),
            ("cls.predictions.transform.dense.weight", vec![6, 6]),
            ("cls.predictions.transform.dense.bias", vec![6]),
            ("cls.predictions.transform.LayerNorm.weight", vec![6]),
            ("cls.predictions.transform.LayerNorm.bias", vec![6]),
            ("cls.predictions.bias", vec![11]),
        ] {
            tensors.insert(name.to_string(), Tensor::randn(0f32, 0.5, shape, &device)?);
        }
        let t = |n: &str| tensors[n].clone();
        let hidden = Tensor::randn(0f32, 1.0, (4, 6), &device)?;
        let x = hidden
            .matmul(&t("cls.predictions.transform.dense.weight").t()?)?
            .broadcast_add(&t("cls.predictions.transform.dense.bias"))?;
        let x = Activation::Relu.apply(&x)?;
        let norm = candle_nn::LayerNorm::new(
            t("cls.predictions.transform.LayerNorm.weight"),
            t("cls.predictions.transform.LayerNorm.bias"),
            1e-12,
        );
        let expected = norm
            .forward(&x)?
            .matmul(&t("bert.embeddings.word_embeddings.weight").t()?)?
            .broadcast_add(&t("cls.predictions.bias"))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let head = MlmHead::load(&vb, 6, 11, 1e-12, "relu")
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let diff = (head.forward(&hidden)? - expected)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn a_model_without_a_head_is_named() {
        let vb = VarBuilder::from_tensors(HashMap::new(), DType::F32, &Device::Cpu);
        let message = MlmHead::load(&vb, 6, 11, 1e-12, "gelu")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("BertForMaskedLM"), "{message}");
    }
}
