//! A BERT encoder written for inference, on candle tensors.
//!
//! Compared with a straight port of the training graph it fuses the query, key and
//! value projections into one matrix product, folds the 1/√d attention scale into
//! the query weights at load time, and builds the padding bias once per batch with a
//! value that stays finite in every dtype (candle-transformers' `f32::MIN` becomes
//! -inf in f16/bf16 and then NaN at unmasked positions).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::embed::encoder::{weights_under, Encoder, Loaded};
use crate::error::EmbedError;
use crate::nn::activation::Activation;
use crate::nn::attention_bias::finite_min;
use crate::nn::dense::{Dense, LinearKind};
use crate::nn::kernels::{self, Heads, Reach};
use crate::nn::packed;

/// The fields of a Hugging Face BERT `config.json` that inference needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".into()
}

struct Layer {
    qkv: Dense,
    attention_out: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
}

/// Where an architecture of BERT's shape differs: where its weights live and where its
/// position ids start (RoBERTa-style models count from `padding_idx + 1`).
pub struct Layout<'a> {
    /// Prefixes tried in order (`"bert"` for BertForMaskedLM checkpoints); none at all last.
    pub prefixes: &'a [&'a str],
    pub position_offset: u32,
}

impl Layout<'static> {
    pub const BERT: Self = Self {
        prefixes: &["bert"],
        position_offset: 0,
    };
}

/// Loads BERT, or a model of its shape under `layout`: its sequences fit the
/// positions from `layout.position_offset` on.
pub fn load(
    vb: VarBuilder,
    config: &BertConfig,
    layout: &Layout,
    linears: LinearKind,
) -> std::result::Result<Loaded, EmbedError> {
    let model = Bert::load(vb, config, layout, linears)?;
    let max_tokens = config.max_position_embeddings - layout.position_offset as usize;
    Ok(Loaded::new(model, config.hidden_size, max_tokens))
}

pub struct Bert {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    activation: Activation,
    dtype: DType,
    position_offset: u32,
}

impl Bert {
    /// Loads weights saved by transformers, under one of `layout.prefixes` or none.
    /// `linears`: float, int8 or bf16 linear layers (the latter two on the CPU) around float
    /// embeddings and norms.
    fn load(
        vb: VarBuilder,
        config: &BertConfig,
        layout: &Layout,
        linears: LinearKind,
    ) -> std::result::Result<Self, EmbedError> {
        if config.position_embedding_type != "absolute" {
            return Err(EmbedError::InvalidModel(format!(
                "position_embedding_type {:?} is not supported",
                config.position_embedding_type
            )));
        }
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(EmbedError::InvalidModel(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        let activation = Activation::parse(&config.hidden_act, "config")?;
        let vb = weights_under(vb, layout.prefixes, "embeddings.word_embeddings.weight");
        let mut model = Self::load_weights(vb, config, activation, linears)?;
        model.position_offset = layout.position_offset;
        Ok(model)
    }

    fn load_weights(
        vb: VarBuilder,
        config: &BertConfig,
        activation: Activation,
        linears: LinearKind,
    ) -> Result<Self> {
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        let head_dim = hidden / heads;
        let norm = |vb: VarBuilder| candle_nn::layer_norm(hidden, config.layer_norm_eps, vb);
        let embeddings = vb.pp("embeddings");
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            let vb = vb.pp(format!("encoder.layer.{index}"));
            let attention = vb.pp("attention");
            let part = |name: &str| -> Result<(Tensor, Tensor)> {
                let vb = attention.pp("self").pp(name);
                Ok((vb.get((hidden, hidden), "weight")?, vb.get(hidden, "bias")?))
            };
            let scale = 1.0 / (head_dim as f64).sqrt();
            let (query_w, query_b) = part("query")?;
            let (key_w, key_b) = part("key")?;
            let (value_w, value_b) = part("value")?;
            let qkv = Linear::new(
                Tensor::cat(&[(query_w * scale)?, key_w, value_w], 0)?,
                Some(Tensor::cat(&[(query_b * scale)?, key_b, value_b], 0)?),
            );
            let dense = |linear: Linear| Dense::new(linear, linears);
            let intermediate = candle_nn::linear(
                hidden,
                config.intermediate_size,
                vb.pp("intermediate.dense"),
            )?;
            layers.push(Layer {
                qkv: dense(qkv)?,
                attention_out: dense(candle_nn::linear(
                    hidden,
                    hidden,
                    attention.pp("output.dense"),
                )?)?,
                attention_norm: norm(attention.pp("output.LayerNorm"))?,
                intermediate: dense(intermediate)?,
                output: dense(candle_nn::linear(
                    config.intermediate_size,
                    hidden,
                    vb.pp("output.dense"),
                )?)?,
                output_norm: norm(vb.pp("output.LayerNorm"))?,
            });
        }
        Ok(Self {
            word_embeddings: candle_nn::embedding(
                config.vocab_size,
                hidden,
                embeddings.pp("word_embeddings"),
            )?,
            position_embeddings: candle_nn::embedding(
                config.max_position_embeddings,
                hidden,
                embeddings.pp("position_embeddings"),
            )?,
            token_type_embeddings: candle_nn::embedding(
                config.type_vocab_size,
                hidden,
                embeddings.pp("token_type_embeddings"),
            )?,
            embeddings_norm: norm(embeddings.pp("LayerNorm"))?,
            layers,
            heads,
            activation,
            dtype: vb.dtype(),
            position_offset: 0,
        })
    }

    /// The CPU path: real tokens only (see [`packed`]), every token of segment 0
    /// unless `type_ids` says otherwise.
    fn forward_unpadded(
        &self,
        ids: &Tensor,
        type_ids: Option<&Tensor>,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let hidden = self.word_embeddings.hidden_size();
        packed::forward(ids, mask, hidden, self.dtype, |packed| {
            let positions = packed.position_ids(self.position_offset)?;
            let words = (self.word_embeddings.forward(&packed.ids)?
                + self.position_embeddings.forward(&positions)?)?;
            let embedded = match type_ids {
                Some(types) => {
                    (words + self.token_type_embeddings.forward(&packed.pack(types)?)?)?
                }
                None => words
                    .broadcast_add(&self.token_type_embeddings.embeddings().narrow(0, 0, 1)?)?,
            };
            let mut x = self.embeddings_norm.forward(&embedded)?;
            let heads = Heads::all(self.heads);
            for layer in &self.layers {
                let qkv = layer.qkv.forward(&x)?;
                let context = kernels::attention_packed(&qkv, &packed.lengths, heads, Reach::All)?;
                x = self.after_attention(layer, &context, &x)?;
            }
            Ok(x)
        })
    }

    /// Every device and dtype: the padded batch as it comes, every token of segment 0
    /// unless `type_ids` says otherwise.
    fn forward_padded(
        &self,
        ids: &Tensor,
        type_ids: Option<&Tensor>,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (batch, tokens) = ids.dims2()?;
        // Rows are right-padded: real tokens sit at the first positions of each row.
        let offset = self.position_offset;
        let positions = Tensor::arange(offset, offset + tokens as u32, ids.device())?;
        let token_type = match type_ids {
            Some(types) => self.token_type_embeddings.forward(types)?,
            None => self.token_type_embeddings.embeddings().narrow(0, 0, 1)?,
        };
        let embedded = self
            .word_embeddings
            .forward(ids)?
            .broadcast_add(&self.position_embeddings.forward(&positions)?)?
            .broadcast_add(&token_type)?;
        let mut x = self.embeddings_norm.forward(&embedded)?;

        // 0 where attended, the dtype's most negative finite value at padding.
        let floor = finite_min(self.dtype);
        let bias = mask
            .to_dtype(DType::F32)?
            .affine(-floor, floor)?
            .to_dtype(self.dtype)?
            .reshape((batch, 1, 1, tokens))?;
        for layer in &self.layers {
            let context = kernels::attention(&layer.qkv.forward(&x)?, &bias, self.heads)?;
            x = self.after_attention(layer, &context, &x)?;
        }
        Ok(x)
    }

    /// The rest of a layer once attention gave `context` for the layer's input `x`.
    fn after_attention(&self, layer: &Layer, context: &Tensor, x: &Tensor) -> Result<Tensor> {
        let attended = layer
            .attention_norm
            .forward(&layer.attention_out.forward_plus(context, x)?)?;
        let inner = layer
            .intermediate
            .forward_activated(&attended, self.activation)?;
        layer
            .output_norm
            .forward(&layer.output.forward_plus(&inner, &attended)?)
    }
}

impl Encoder for Bert {
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if ids.device().is_cpu() && self.dtype == DType::F32 {
            return self.forward_unpadded(ids, None, mask);
        }
        self.forward_padded(ids, None, mask)
    }

    fn forward_typed(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        // One segment only (RoBERTa): every token is of type 0, whatever the tokenizer says.
        if self.token_type_embeddings.embeddings().dim(0)? < 2 {
            return self.forward(ids, mask);
        }
        // A segment id past the table would fail deep in the gather: say which.
        let types = self.token_type_embeddings.embeddings().dim(0)? as u32;
        if type_ids.elem_count() > 0 && type_ids.flatten_all()?.max(0)?.to_scalar::<u32>()? >= types
        {
            candle_core::bail!("a token type id is past the model's {types} token types");
        }
        if ids.device().is_cpu() && self.dtype == DType::F32 {
            return self.forward_unpadded(ids, Some(type_ids), mask);
        }
        self.forward_padded(ids, Some(type_ids), mask)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::nn::packed::testing::assert_packed_matches_padded;
    use candle_core::Device;

    /// A random two-layer BERT with every weight transformers would save.
    fn tiny_bert() -> Result<(Bert, BertConfig)> {
        let config: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 32,
            "max_position_embeddings": 24, "hidden_act": "gelu"
        }))
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let device = Device::Cpu;
        let mut tensors = HashMap::new();
        let mut add = |name: String, shape: &[usize]| -> Result<()> {
            tensors.insert(name, Tensor::randn(0f32, 0.3, shape, &device)?);
            Ok(())
        };
        add("embeddings.word_embeddings.weight".into(), &[50, 16])?;
        add("embeddings.position_embeddings.weight".into(), &[24, 16])?;
        add("embeddings.token_type_embeddings.weight".into(), &[2, 16])?;
        for part in ["embeddings.LayerNorm"]
            .into_iter()
            .map(String::from)
            .chain((0..2).flat_map(|l| {
                [
                    format!("encoder.layer.{l}.attention.output.LayerNorm"),
                    format!("encoder.layer.{l}.output.LayerNorm"),
                ]
            }))
        {
            add(format!("{part}.weight"), &[16])?;
            add(format!("{part}.bias"), &[16])?;
        }
        for l in 0..2 {
            let layer = format!("encoder.layer.{l}");
            for (name, out, inp) in [
                ("attention.self.query", 16, 16),
                ("attention.self.key", 16, 16),
                ("attention.self.value", 16, 16),
                ("attention.output.dense", 16, 16),
                ("intermediate.dense", 32, 16),
                ("output.dense", 16, 32),
            ] {
                add(format!("{layer}.{name}.weight"), &[out, inp])?;
                add(format!("{layer}.{name}.bias"), &[out])?;
            }
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let model = Bert::load(vb, &config, &Layout::BERT, LinearKind::Float)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((model, config))
    }

    #[test]
    fn the_unpadded_cpu_path_matches_the_padded_one() -> Result<()> {
        let (model, _) = tiny_bert()?;
        assert_packed_matches_padded(
            &[7, 4, 1, 6],
            50,
            |ids, mask| model.forward(ids, mask),
            |ids, mask| model.forward_padded(ids, None, mask),
        )
    }

    /// Sentence pairs: the second segment's token types reach both paths alike.
    #[test]
    fn token_types_reach_the_unpadded_path_as_the_padded_one() -> Result<()> {
        let (model, _) = tiny_bert()?;
        let types = |ids: &Tensor| ids.ge(25u32)?.to_dtype(DType::U32);
        assert_packed_matches_padded(
            &[7, 4, 1, 6],
            50,
            |ids, mask| model.forward_typed(ids, &types(ids)?, mask),
            |ids, mask| model.forward_padded(ids, Some(&types(ids)?), mask),
        )?;
        // And they matter: the same ids with every token of segment 0 differ.
        let ids = Tensor::new(&[[30u32, 31, 32]], &Device::Cpu)?;
        let mask = Tensor::ones((1, 3), DType::U32, &Device::Cpu)?;
        let typed = model.forward_typed(&ids, &types(&ids)?, &mask)?;
        let plain = model.forward(&ids, &mask)?;
        assert!((typed - plain)?.abs()?.max_all()?.to_scalar::<f32>()? > 1e-3);
        Ok(())
    }
}
