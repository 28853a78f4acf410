//! ModernBERT (gte-modernbert, nomic-embed-text-v2's base, modernbert-embed): a
//! pre-norm encoder with rotary positions, global attention every n-th layer and
//! sliding-window attention (|i − j| ≤ `local_attention` / 2) in the others, each kind
//! with its own rope theta, GeGLU feed-forward layers and no biases by default.
//! Reads the configurations of transformers 4.x (`global_attn_every_n_layers`,
//! `global_rope_theta`, `local_rope_theta`) and 5.x (`layer_types`, `rope_parameters`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use serde_json::Value;

use crate::embed::config::size;
use crate::embed::encoder::{weights_under, Encoder, Loaded};
use crate::error::EmbedError;
use crate::nn::activation::Activation;
use crate::nn::attention_bias::{attend, padding_bias, pair_bias};
use crate::nn::dense::{Dense, LinearKind};
use crate::nn::kernels::{self, Heads, Reach};
use crate::nn::packed;
use crate::nn::rotary::{self, HostTables, Rotary};

#[derive(Debug, Clone)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    norm_eps: f64,
    norm_bias: bool,
    attention_bias: bool,
    mlp_bias: bool,
    activation: Activation,
    /// Half the sliding window: a local layer's token attends to tokens this close.
    half_window: usize,
    /// Per layer: true for global attention.
    global: Vec<bool>,
    global_theta: f64,
    local_theta: f64,
}

fn number(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

impl Config {
    fn parse(v: &Value) -> std::result::Result<Self, EmbedError> {
        let layers = size(v, &["num_hidden_layers"])?;
        let global = match v.get("layer_types").and_then(Value::as_array) {
            Some(types) => types
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(true),
                    Some("sliding_attention") => Ok(false),
                    other => Err(EmbedError::InvalidModel(format!(
                        "config.json: layer type {other:?} is not supported (full_attention, sliding_attention)"
                    ))),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            None => {
                let every = v
                    .get("global_attn_every_n_layers")
                    .and_then(Value::as_u64)
                    .unwrap_or(3)
                    .max(1) as usize;
                (0..layers).map(|i| i % every == 0).collect()
            }
        };
        if global.len() != layers {
            return Err(EmbedError::InvalidModel(format!(
                "config.json: {} layer_types for {layers} layers",
                global.len()
            )));
        }
        let rope = v.get("rope_parameters");
        let theta = |kind: &str| {
            rope.and_then(|r| r.get(kind))
                .and_then(|r| number(r, "rope_theta"))
        };
        let global_theta = theta("full_attention")
            .or_else(|| number(v, "global_rope_theta"))
            .unwrap_or(160_000.0);
        let local_theta = theta("sliding_attention")
            .or_else(|| number(v, "local_rope_theta"))
            .unwrap_or(global_theta);
        let flag = |key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(false);
        let act = v
            .get("hidden_activation")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        let config = Self {
            vocab_size: size(v, &["vocab_size"])?,
            hidden_size: size(v, &["hidden_size"])?,
            intermediate_size: size(v, &["intermediate_size"])?,
            num_hidden_layers: layers,
            num_attention_heads: size(v, &["num_attention_heads"])?,
            max_position_embeddings: size(v, &["max_position_embeddings"])?,
            norm_eps: number(v, "norm_eps").unwrap_or(1e-5),
            norm_bias: flag("norm_bias"),
            attention_bias: flag("attention_bias"),
            mlp_bias: flag("mlp_bias"),
            activation: Activation::parse(act, "config")?,
            half_window: v
                .get("local_attention")
                .and_then(Value::as_u64)
                .unwrap_or(128) as usize
                / 2,
            global,
            global_theta,
            local_theta,
        };
        let heads = config.num_attention_heads;
        if heads == 0
            || !config.hidden_size.is_multiple_of(heads)
            || !(config.hidden_size / heads).is_multiple_of(2)
        {
            return Err(EmbedError::InvalidModel(format!(
                "config.json: hidden_size {} does not split into {heads} heads of an even size",
                config.hidden_size
            )));
        }
        Ok(config)
    }
}

struct Layer {
    attn_norm: Option<LayerNorm>,
    wqkv: Dense,
    wo: Dense,
    mlp_norm: LayerNorm,
    wi: Dense,
    mlp_wo: Dense,
    global: bool,
}

pub struct ModernBert {
    embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    heads: usize,
    half_window: usize,
    activation: Activation,
    global_rope: Rotary,
    local_rope: Rotary,
    dtype: DType,
}

pub fn load(
    config: &Value,
    vb: VarBuilder,
    linears: LinearKind,
) -> std::result::Result<Loaded, EmbedError> {
    let c = Config::parse(config)?;
    // ModernBertForMaskedLM and friends keep the encoder under `model.`.
    let vb = weights_under(vb, &["model"], "embeddings.tok_embeddings.weight");
    let model = ModernBert::load(vb, &c, linears)?;
    Ok(Loaded::new(model, c.hidden_size, c.max_position_embeddings))
}

impl ModernBert {
    fn load(vb: VarBuilder, c: &Config, linears: LinearKind) -> Result<Self> {
        let h = c.hidden_size;
        let dense = |linear| Dense::new(linear, linears);
        // Without a bias in the checkpoint, a zero one: candle's fused layer-norm op
        // needs one, and its unfused graph (ten element-wise passes, each in candle's
        // spinning thread pool) took 8 % of a bf16 pass over 44 norms.
        let norm = |vb: VarBuilder| -> Result<LayerNorm> {
            let bias = if c.norm_bias {
                vb.get(h, "bias")?
            } else {
                Tensor::zeros(h, vb.dtype(), vb.device())?
            };
            Ok(LayerNorm::new(vb.get(h, "weight")?, bias, c.norm_eps))
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(Layer {
                    // The first layer takes the embeddings' norm as its own.
                    attn_norm: if i == 0 {
                        None
                    } else {
                        Some(norm(vb.pp("attn_norm"))?)
                    },
                    wqkv: dense(candle_nn::linear_b(
                        h,
                        3 * h,
                        c.attention_bias,
                        vb.pp("attn.Wqkv"),
                    )?)?,
                    wo: dense(candle_nn::linear_b(
                        h,
                        h,
                        c.attention_bias,
                        vb.pp("attn.Wo"),
                    )?)?,
                    mlp_norm: norm(vb.pp("mlp_norm"))?,
                    wi: dense(candle_nn::linear_b(
                        h,
                        2 * c.intermediate_size,
                        c.mlp_bias,
                        vb.pp("mlp.Wi"),
                    )?)?,
                    mlp_wo: dense(candle_nn::linear_b(
                        c.intermediate_size,
                        h,
                        c.mlp_bias,
                        vb.pp("mlp.Wo"),
                    )?)?,
                    global: c.global[i],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head_dim = h / c.num_attention_heads;
        Ok(Self {
            embeddings: candle_nn::embedding(c.vocab_size, h, vb.pp("embeddings.tok_embeddings"))?,
            embeddings_norm: norm(vb.pp("embeddings.norm"))?,
            layers,
            final_norm: norm(vb.pp("final_norm"))?,
            heads: c.num_attention_heads,
            half_window: c.half_window,
            activation: c.activation,
            global_rope: Rotary::new(head_dim, c.global_theta),
            local_rope: Rotary::new(head_dim, c.local_theta),
            dtype: vb.dtype(),
        })
    }

    /// `residual` plus the attention output of the normed `x`, through candle's ops
    /// (devices and dtypes other than the CPU's f32).
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        residual: &Tensor,
        biases: &Biases,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (batch, tokens, hidden) = x.dims3()?;
        let head_dim = hidden / self.heads;
        let qkv = layer.wqkv.forward(x)?;
        let (cos, sin) = rope;
        let qkv = qkv.reshape((batch, tokens, 3, self.heads, head_dim))?;
        let part = |i: usize| {
            qkv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = candle_nn::rotary_emb::rope(&part(0)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&part(1)?, cos, sin)?;
        let v = part(2)?;
        let bias = if layer.global {
            &biases.global
        } else {
            &biases.local
        };
        layer.wo.forward_plus(&attend(&q, &k, &v, bias)?, residual)
    }

    /// `residual` plus the feed-forward output of the normed `x`.
    fn feed_forward(&self, layer: &Layer, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let gated = self.activation.gated(&layer.wi.forward(x)?)?;
        layer.mlp_wo.forward_plus(&gated, residual)
    }
}

/// The additive attention biases of one padded batch, per kind of layer.
struct Biases {
    global: Tensor,
    local: Tensor,
}

impl ModernBert {
    /// Runs every layer on the embeddings `x`, `attention` giving each one its
    /// `residual` plus attention output (normed input, residual, rope tables).
    fn layers<Tables>(
        &self,
        mut x: Tensor,
        global_rope: &Tables,
        local_rope: &Tables,
        attention: impl Fn(&Layer, &Tensor, &Tensor, &Tables) -> Result<Tensor>,
    ) -> Result<Tensor> {
        for layer in &self.layers {
            let rope = if layer.global {
                global_rope
            } else {
                local_rope
            };
            let normed = match &layer.attn_norm {
                Some(norm) => norm.forward(&x)?,
                None => x.clone(),
            };
            x = attention(layer, &normed, &x, rope)?;
            x = self.feed_forward(layer, &layer.mlp_norm.forward(&x)?, &x)?;
        }
        self.final_norm.forward(&x)
    }

    /// The CPU path in f32: real tokens only (see [`packed`]), each layer's window
    /// applied by the attention kernel within each sequence.
    fn forward_packed(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden = self.embeddings.hidden_size();
        packed::forward(ids, mask, hidden, self.dtype, |packed| {
            let head_dim = hidden / self.heads;
            let global_rope = self.global_rope.host_tables_at(&packed.positions);
            let local_rope = self.local_rope.host_tables_at(&packed.positions);
            let x = self
                .embeddings_norm
                .forward(&self.embeddings.forward(&packed.ids)?)?;
            let heads = Heads::all(self.heads);
            // The kernel takes queries pre-scaled.
            let scale = (head_dim as f32).powf(-0.5);
            let attention = |layer: &Layer, x: &Tensor, residual: &Tensor, rope: &HostTables| {
                let qkv = rotary::rotate_packed(&layer.wqkv.forward(x)?, rope, heads, scale)?;
                let reach = if layer.global {
                    Reach::All
                } else {
                    Reach::Window(self.half_window)
                };
                let context = kernels::attention_packed(&qkv, &packed.lengths, heads, reach)?;
                layer.wo.forward_plus(&context, residual)
            };
            self.layers(x, &global_rope, &local_rope, attention)
        })
    }
}

impl Encoder for ModernBert {
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if ids.device().is_cpu() && self.dtype == DType::F32 {
            return self.forward_packed(ids, mask);
        }
        let tokens = ids.dim(1)?;
        let device = ids.device();
        let padding = padding_bias(mask, self.dtype)?;
        let window = pair_bias(tokens, device, self.dtype, |i, j| {
            i.abs_diff(j) <= self.half_window
        })?;
        let biases = Biases {
            global: padding.to_dtype(self.dtype)?,
            local: padding.broadcast_add(&window)?.to_dtype(self.dtype)?,
        };
        let global_rope = self.global_rope.tables(tokens, device, self.dtype)?;
        let local_rope = self.local_rope.tables(tokens, device, self.dtype)?;
        let x = self
            .embeddings_norm
            .forward(&self.embeddings.forward(ids)?)?;
        self.layers(x, &global_rope, &local_rope, |layer, x, residual, rope| {
            self.attention(layer, x, residual, &biases, rope)
        })
    }
}
