//! Qwen3 as an embedder (Qwen3-Embedding): a decoder with a causal mask and a padding
//! mask, grouped-query attention with an explicit `head_dim`, RMSNorm on each head's
//! queries and keys before the rotary positions, and SwiGLU feed-forward layers. Its
//! sentence-transformers files ask for last-token pooling, and its tokenizer appends
//! the end-of-text token that pooling reads.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};
use serde_json::Value;

use super::activation::Activation;
use super::dense::Dense;
use super::encoder::{Encoder, Loaded};
use super::rotary::{attend, padding_bias, pair_bias, Rotary};
use crate::error::EmbedError;

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
        let size = |key: &str| {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .ok_or_else(|| EmbedError::InvalidModel(format!("config.json: no number {key}")))
        };
        let hidden_size = size("hidden_size")?;
        let heads = size("num_attention_heads")?;
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
            vocab_size: size("vocab_size")?,
            hidden_size,
            intermediate_size: size("intermediate_size")?,
            num_hidden_layers: size("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: v
                .get("head_dim")
                .and_then(Value::as_u64)
                .map_or(hidden_size / heads.max(1), |n| n as usize),
            max_position_embeddings: size("max_position_embeddings")?,
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
    q_proj: Dense,
    k_proj: Dense,
    v_proj: Dense,
    o_proj: Dense,
    q_norm: RmsNorm,
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
    quantize: bool,
) -> std::result::Result<Loaded, EmbedError> {
    let c = Config::parse(config)?;
    // Qwen3ForCausalLM keeps the decoder under `model.`.
    let vb = if vb.contains_tensor("model.embed_tokens.weight") {
        vb.pp("model")
    } else {
        vb
    };
    let model = Qwen3::load(vb, &c, quantize)?;
    Ok(Loaded {
        encoder: Box::new(model),
        hidden_size: c.hidden_size,
        max_tokens: c.max_position_embeddings,
    })
}

impl Qwen3 {
    fn load(vb: VarBuilder, c: &Config, quantize: bool) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let dense = |linear| Dense::new(linear, quantize);
        let (q_size, kv_size) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let bias = c.attention_bias;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                let attn = vb.pp("self_attn");
                let mlp = vb.pp("mlp");
                Ok(Layer {
                    input_norm: candle_nn::rms_norm(h, c.rms_norm_eps, vb.pp("input_layernorm"))?,
                    q_proj: dense(candle_nn::linear_b(h, q_size, bias, attn.pp("q_proj"))?)?,
                    k_proj: dense(candle_nn::linear_b(h, kv_size, bias, attn.pp("k_proj"))?)?,
                    v_proj: dense(candle_nn::linear_b(h, kv_size, bias, attn.pp("v_proj"))?)?,
                    o_proj: dense(candle_nn::linear_b(q_size, h, bias, attn.pp("o_proj"))?)?,
                    q_norm: candle_nn::rms_norm(d, c.rms_norm_eps, attn.pp("q_norm"))?,
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
        let heads = |proj: &Dense, n: usize| -> Result<Tensor> {
            proj.forward(x)?
                .reshape((batch, tokens, n, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (cos, sin) = rope;
        let q = layer.q_norm.forward(&heads(&layer.q_proj, self.heads)?)?;
        let k = layer
            .k_norm
            .forward(&heads(&layer.k_proj, self.kv_heads)?)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let v = heads(&layer.v_proj, self.kv_heads)?;
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
}

impl Encoder for Qwen3 {
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let tokens = ids.dim(1)?;
        let device = ids.device();
        let causal = pair_bias(tokens, device, self.dtype, |i, j| j <= i)?;
        let bias = padding_bias(mask, self.dtype)?
            .broadcast_add(&causal)?
            .to_dtype(self.dtype)?;
        let rope = self.rope.tables(tokens, device, self.dtype)?;
        let silu = Activation::Silu;

        let mut x = self.embed_tokens.forward(ids)?;
        for layer in &self.layers {
            let normed = layer.input_norm.forward(&x)?;
            x = self.attention(layer, &normed, &x, &bias, &rope)?;
            let normed = layer.post_attention_norm.forward(&x)?;
            let gated = (layer.gate_proj.forward_activated(&normed, silu)?
                * layer.up_proj.forward(&normed)?)?;
            x = layer.down_proj.forward_plus(&gated, &x)?;
        }
        self.norm.forward(&x)
    }
}
