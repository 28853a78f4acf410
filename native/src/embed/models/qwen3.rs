//! Qwen3 as an embedder (Qwen3-Embedding): a decoder with a causal mask and a padding
//! mask, grouped-query attention with an explicit `head_dim`, RMSNorm on each head's
//! queries and keys before the rotary positions, and SwiGLU feed-forward layers. Its
//! sentence-transformers files ask for last-token pooling, and its tokenizer appends
//! the end-of-text token that pooling reads. On the CPU in f32 it runs on the batch's
//! real tokens only, with causal, grouped-query attention in our kernel: 41 % of the
//! rows of the families benchmark's padded Qwen3 batches were padding.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};
use serde_json::Value;

use crate::embed::config::size;
use crate::embed::encoder::{weights_under, Encoder, Loaded};
use crate::error::EmbedError;
use crate::nn::activation::Activation;
use crate::nn::attention_bias::{attend, padding_bias, pair_bias};
use crate::nn::dense::{Dense, LinearKind};
use crate::nn::kernels::{self, Heads, Reach};
use crate::nn::packed;
use crate::nn::rotary::Rotary;

struct Config {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    attention_bias: bool,
}

impl Config {
    fn parse(v: &Value) -> std::result::Result<Self, EmbedError> {
        let hidden_size = size(v, &["hidden_size"])?;
        let heads = size(v, &["num_attention_heads"])?;
        let kv_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map_or(heads, |n| n as usize);
        // transformers 5.x moves the theta into rope_parameters.
        let rope_theta = v
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(1_000_000.0);
        if let Some(kind) = v
            .get("rope_parameters")
            .and_then(|r| r.get("rope_type"))
            .and_then(Value::as_str)
            .filter(|k| *k != "default")
        {
            return Err(EmbedError::InvalidModel(format!(
                "config.json: rope_type {kind:?} is not supported (default)"
            )));
        }
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(EmbedError::InvalidModel(format!(
                "config.json: hidden_act {act:?} is not supported for qwen3 (silu)"
            )));
        }
        let config = Self {
            vocab_size: size(v, &["vocab_size"])?,
            hidden_size,
            intermediate_size: size(v, &["intermediate_size"])?,
            num_hidden_layers: size(v, &["num_hidden_layers"])?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: v
                .get("head_dim")
                .and_then(Value::as_u64)
                .map_or(hidden_size / heads.max(1), |n| n as usize),
            max_position_embeddings: size(v, &["max_position_embeddings"])?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            attention_bias: v
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || !config.head_dim.is_multiple_of(2) {
            return Err(EmbedError::InvalidModel(format!(
                "config.json: {heads} attention heads cannot share {kv_heads} key/value heads \
                 of size {}",
                config.head_dim
            )));
        }
        Ok(config)
    }
}

struct Layer {
    input_norm: RmsNorm,
    /// q_proj, k_proj and v_proj as one product: `[.., (heads + 2·kv_heads)·d]`.
    qkv: Dense,
    o_proj: Dense,
    q_norm: RmsNorm,
    /// `q_norm` with 1/√d folded into its weight, for the CPU kernel's pre-scaled queries.
    q_norm_scaled: RmsNorm,
    k_norm: RmsNorm,
    post_attention_norm: RmsNorm,
    gate_proj: Dense,
    up_proj: Dense,
    down_proj: Dense,
}

pub struct Qwen3 {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope: Rotary,
    dtype: DType,
}

pub fn load(
    config: &Value,
    vb: VarBuilder,
    linears: LinearKind,
) -> std::result::Result<Loaded, EmbedError> {
    let c = Config::parse(config)?;
    // Qwen3ForCausalLM keeps the decoder under `model.`.
    let vb = weights_under(vb, &["model"], "embed_tokens.weight");
    let model = Qwen3::load(vb, &c, linears)?;
    Ok(Loaded::new(model, c.hidden_size, c.max_position_embeddings))
}

impl Qwen3 {
    fn load(vb: VarBuilder, c: &Config, linears: LinearKind) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let dense = |linear| Dense::new(linear, linears);
        let (q_size, kv_size) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let bias = c.attention_bias;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                let attn = vb.pp("self_attn");
                let mlp = vb.pp("mlp");
                let projection = |name, size| candle_nn::linear_b(h, size, bias, attn.pp(name));
                let q = projection("q_proj", q_size)?;
                let k = projection("k_proj", kv_size)?;
                let v = projection("v_proj", kv_size)?;
                let qkv = candle_nn::Linear::new(
                    Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?,
                    match (q.bias(), k.bias(), v.bias()) {
                        (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)?),
                        _ => None,
                    },
                );
                let q_norm = attn.pp("q_norm").get(d, "weight")?;
                let q_norm_scaled =
                    RmsNorm::new((&q_norm * (d as f64).powf(-0.5))?, c.rms_norm_eps);
                let q_norm = RmsNorm::new(q_norm, c.rms_norm_eps);
                Ok(Layer {
                    input_norm: candle_nn::rms_norm(h, c.rms_norm_eps, vb.pp("input_layernorm"))?,
                    qkv: dense(qkv)?,
                    o_proj: dense(candle_nn::linear_b(q_size, h, bias, attn.pp("o_proj"))?)?,
                    q_norm,
                    q_norm_scaled,
                    k_norm: candle_nn::rms_norm(d, c.rms_norm_eps, attn.pp("k_norm"))?,
                    post_attention_norm: candle_nn::rms_norm(
                        h,
                        c.rms_norm_eps,
                        vb.pp("post_attention_layernorm"),
                    )?,
                    gate_proj: dense(candle_nn::linear_no_bias(
                        h,
                        c.intermediate_size,
                        mlp.pp("gate_proj"),
                    )?)?,
                    up_proj: dense(candle_nn::linear_no_bias(
                        h,
                        c.intermediate_size,
                        mlp.pp("up_proj"),
                    )?)?,
                    down_proj: dense(candle_nn::linear_no_bias(
                        c.intermediate_size,
                        h,
                        mlp.pp("down_proj"),
                    )?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: candle_nn::embedding(c.vocab_size, h, vb.pp("embed_tokens"))?,
            layers,
            norm: candle_nn::rms_norm(h, c.rms_norm_eps, vb.pp("norm"))?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: d,
            rope: Rotary::new(d, c.rope_theta),
            dtype: vb.dtype(),
        })
    }

    /// `residual` plus the attention output of the normed `x`.
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        residual: &Tensor,
        bias: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (batch, tokens, _) = x.dims3()?;
        let d = self.head_dim;
        let qkv = layer.qkv.forward(x)?;
        let heads = |first: usize, n: usize| -> Result<Tensor> {
            qkv.narrow(2, first * d, n * d)?
                .reshape((batch, tokens, n, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (cos, sin) = rope;
        let q = layer.q_norm.forward(&heads(0, self.heads)?)?;
        let k = layer.k_norm.forward(&heads(self.heads, self.kv_heads)?)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let v = heads(self.heads + self.kv_heads, self.kv_heads)?;
        // Grouped queries: each key/value head serves heads / kv_heads query heads.
        let group = self.heads / self.kv_heads;
        let repeat = |t: Tensor| -> Result<Tensor> {
            if group == 1 {
                return Ok(t);
            }
            t.unsqueeze(2)?
                .expand((batch, self.kv_heads, group, tokens, d))?
                .reshape((batch, self.heads, tokens, d))
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        layer
            .o_proj
            .forward_plus(&attend(&q, &k, &v, bias)?, residual)
    }

    /// The SwiGLU feed-forward layer of the normed `x`, plus `residual`.
    fn feed_forward(&self, layer: &Layer, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let gated =
            Activation::Silu.times(&layer.gate_proj.forward(x)?, &layer.up_proj.forward(x)?)?;
        layer.down_proj.forward_plus(&gated, residual)
    }

    /// The CPU path in f32: real tokens only (see [`packed`]), causal attention by our
    /// kernel. Rotary attention depends only on distances between positions, so each
    /// sequence counting from 0 gives what the padded batch gives.
    fn forward_packed(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden = self.embed_tokens.hidden_size();
        packed::forward(ids, mask, hidden, self.dtype, |packed| {
            let (total, device) = (packed.total(), packed.device());
            let (cos, sin) = self.rope.tables_at(&packed.positions, device, self.dtype)?;
            let d = self.head_dim;
            let heads = Heads {
                query: self.heads,
                key_value: self.kv_heads,
            };
            let mut x = self.embed_tokens.forward(&packed.ids)?;
            for layer in &self.layers {
                let qkv = layer.qkv.forward(&layer.input_norm.forward(&x)?)?;
                let rotated = |first: usize, n: usize, norm: &RmsNorm| -> Result<Tensor> {
                    let part = qkv.narrow(1, first * d, n * d)?.reshape((1, total, n, d))?;
                    candle_nn::rotary_emb::rope_thd(&norm.forward(&part)?, &cos, &sin)?
                        .reshape((total, n * d))
                };
                let fused = Tensor::cat(
                    &[
                        rotated(0, self.heads, &layer.q_norm_scaled)?,
                        rotated(self.heads, self.kv_heads, &layer.k_norm)?,
                        qkv.narrow(1, (self.heads + self.kv_heads) * d, self.kv_heads * d)?,
                    ],
                    1,
                )?;
                let context =
                    kernels::attention_packed(&fused, &packed.lengths, heads, Reach::Causal)?;
                x = layer.o_proj.forward_plus(&context, &x)?;
                x = self.feed_forward(layer, &layer.post_attention_norm.forward(&x)?, &x)?;
            }
            self.norm.forward(&x)
        })
    }

    /// Every device and dtype: the padded batch as it comes, under a causal and a
    /// padding bias.
    fn forward_padded(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let tokens = ids.dim(1)?;
        let device = ids.device();
        let causal = pair_bias(tokens, device, self.dtype, |i, j| j <= i)?;
        let bias = padding_bias(mask, self.dtype)?
            .broadcast_add(&causal)?
            .to_dtype(self.dtype)?;
        let rope = self.rope.tables(tokens, device, self.dtype)?;
        let mut x = self.embed_tokens.forward(ids)?;
        for layer in &self.layers {
            let normed = layer.input_norm.forward(&x)?;
            x = self.attention(layer, &normed, &x, &bias, &rope)?;
            x = self.feed_forward(layer, &layer.post_attention_norm.forward(&x)?, &x)?;
        }
        self.norm.forward(&x)
    }
}

impl Encoder for Qwen3 {
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if ids.device().is_cpu() && self.dtype == DType::F32 {
            return self.forward_packed(ids, mask);
        }
        self.forward_padded(ids, mask)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::nn::packed::testing::assert_packed_matches_padded;
    use candle_core::Device;

    /// A random two-layer Qwen3 with grouped key/value heads.
    fn tiny_qwen3() -> Result<Qwen3> {
        let config = Config::parse(&serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "max_position_embeddings": 32
        }))
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let device = Device::Cpu;
        let mut tensors = HashMap::new();
        let mut add = |name: String, shape: &[usize]| -> Result<()> {
            tensors.insert(name, Tensor::randn(0f32, 0.5, shape, &device)?);
            Ok(())
        };
        add("embed_tokens.weight".into(), &[40, 16])?;
        add("norm.weight".into(), &[16])?;
        for l in 0..2 {
            let layer = format!("layers.{l}");
            for (name, shape) in [
                ("input_layernorm", vec![16]),
                ("post_attention_layernorm", vec![16]),
                ("self_attn.q_norm", vec![8]),
                ("self_attn.k_norm", vec![8]),
                ("self_attn.q_proj", vec![32, 16]),
                ("self_attn.k_proj", vec![16, 16]),
                ("self_attn.v_proj", vec![16, 16]),
                ("self_attn.o_proj", vec![16, 32]),
                ("mlp.gate_proj", vec![24, 16]),
                ("mlp.up_proj", vec![24, 16]),
                ("mlp.down_proj", vec![16, 24]),
            ] {
                add(format!("{layer}.{name}.weight"), &shape)?;
            }
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        Qwen3::load(vb, &config, LinearKind::Float)
    }

    #[test]
    fn the_packed_cpu_path_matches_the_padded_one() -> Result<()> {
        let model = tiny_qwen3()?;
        assert_packed_matches_padded(
            &[7, 4, 1, 6],
            40,
            |ids, mask| model.forward(ids, mask),
            |ids, mask| model.forward_padded(ids, mask),
        )
    }
}
