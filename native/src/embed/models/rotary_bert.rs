//! BERT with rotary positions and gated feed-forward layers, post-norm: NomicBERT
//! (nomic-embed-text v1/v1.5: SwiGLU, no biases) and GTE (gte-*-en-v1.5,
//! snowflake-arctic-embed-m-v2: GeGLU, biased attention, NTK-scaled rotary).
//!
//! Checkpoints come in two namings: transformers' own classes (`NomicBertModel`,
//! `GteModel`) and the hub's remote code (`nomic_bert` with `attn.Wqkv`, `fc11`…,
//! GTE's `model_type: "new"` with `attention.qkv_proj`, `mlp.up_gate_proj`…, as
//! transformers' conversion mapping lists them); and configs in two spellings (GPT-2
//! style `n_embd`… for the hub's NomicBERT; `rope_theta` + `rope_scaling` or
//! `rope_parameters`). Both are read.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde_json::Value;

use crate::embed::config::{first, size};
use crate::embed::encoder::{weights_under, Encoder, Loaded};
use crate::error::EmbedError;
use crate::nn::activation::Activation;
use crate::nn::attention_bias::{attend, padding_bias};
use crate::nn::dense::{Dense, LinearKind};
use crate::nn::kernels::{self, Heads, Reach};
use crate::nn::packed;
use crate::nn::rotary::Rotary;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Nomic,
    Gte,
}

#[derive(Debug, Clone)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    type_vocab_size: usize,
    layer_norm_eps: f64,
    activation: Activation,
    attention_bias: bool,
    up_gate_bias: bool,
    down_bias: bool,
    rope_theta: f64,
}

/// The rotary base, NTK-scaled when the config asks for it, as GTE's own code does:
/// `theta · factor^(d / (d − 2))`.
fn rope_theta(v: &Value, default: f64, head_dim: usize) -> std::result::Result<f64, EmbedError> {
    let parameters = v.get("rope_parameters");
    let theta = parameters
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| first(v, &["rope_theta", "rotary_emb_base"]))
        .and_then(Value::as_f64)
        .unwrap_or(default);
    let scaling = parameters
        .or_else(|| v.get("rope_scaling"))
        .filter(|s| !s.is_null());
    let kind = scaling
        .and_then(|s| first(s, &["rope_type", "type"]))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(theta),
        "ntk" => {
            let factor = scaling
                .and_then(|s| s.get("factor"))
                .and_then(Value::as_f64)
                .unwrap_or(1.0);
            Ok(theta * factor.powf(head_dim as f64 / (head_dim as f64 - 2.0)))
        }
        other => Err(EmbedError::InvalidModel(format!(
            "config.json: rotary scaling {other:?} is not supported (default, ntk)"
        ))),
    }
}

impl Config {
    fn parse(v: &Value, family: Family) -> std::result::Result<Self, EmbedError> {
        let hidden_size = size(v, &["hidden_size", "n_embd"])?;
        let heads = size(v, &["num_attention_heads", "n_head"])?;
        if heads == 0
            || !hidden_size.is_multiple_of(heads)
            || !(hidden_size / heads).is_multiple_of(2)
        {
            return Err(EmbedError::InvalidModel(format!(
                "config.json: hidden size {hidden_size} does not split into {heads} heads of an even size"
            )));
        }
        if first(v, &["rotary_emb_fraction"])
            .and_then(Value::as_f64)
            .is_some_and(|f| f != 1.0)
        {
            return Err(EmbedError::InvalidModel(
                "config.json: rotary_emb_fraction other than 1.0 is not supported".into(),
            ));
        }
        if first(v, &["rotary_emb_interleaved"]).and_then(Value::as_bool) == Some(true) {
            return Err(EmbedError::InvalidModel(
                "config.json: interleaved rotary embeddings are not supported".into(),
            ));
        }
        if first(v, &["prenorm"]).and_then(Value::as_bool) == Some(true) {
            return Err(EmbedError::InvalidModel(
                "config.json: prenorm is not supported".into(),
            ));
        }
        let (default_act, default_theta) = match family {
            Family::Nomic => ("silu", 1000.0),
            Family::Gte => ("gelu", 160_000.0),
        };
        // The hub's NomicBERT names the gated unit (`swiglu`); the gate is SiLU then.
        let act = match first(v, &["hidden_act", "activation_function"]).and_then(Value::as_str) {
            Some("swiglu") => "silu",
            Some("geglu") => "gelu",
            Some(other) => other,
            None => default_act,
        };
        let flag = |keys: &[&str], default: bool| {
            first(v, keys).and_then(Value::as_bool).unwrap_or(default)
        };
        let gte = family == Family::Gte;
        let intermediate = match first(v, &["intermediate_size", "n_inner"]) {
            Some(n) => n.as_u64().map(|n| n as usize).unwrap_or(4 * hidden_size),
            None => 4 * hidden_size,
        };
        Ok(Self {
            vocab_size: size(v, &["vocab_size"])?,
            hidden_size,
            intermediate_size: intermediate,
            num_hidden_layers: size(v, &["num_hidden_layers", "n_layer"])?,
            num_attention_heads: heads,
            max_position_embeddings: size(v, &["max_position_embeddings", "n_positions"])?,
            type_vocab_size: first(v, &["type_vocab_size"])
                .and_then(Value::as_u64)
                .unwrap_or(2) as usize,
            layer_norm_eps: first(v, &["layer_norm_eps", "layer_norm_epsilon"])
                .and_then(Value::as_f64)
                .unwrap_or(1e-12),
            activation: Activation::parse(act, "config")?,
            attention_bias: flag(&["qkv_proj_bias"], gte),
            up_gate_bias: flag(&["mlp_fc1_bias"], false),
            down_bias: flag(&["mlp_fc2_bias"], gte),
            rope_theta: rope_theta(v, default_theta, hidden_size / heads)?,
        })
    }
}

/// Where the weights are: transformers' names, or one of the hub's remote-code namings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    Transformers,
    NomicHub,
    GteHub,
}

struct Layer {
    q: Dense,
    k: Dense,
    v: Dense,
    o: Dense,
    attention_norm: LayerNorm,
    up: Dense,
    gate: Dense,
    down: Dense,
    mlp_norm: LayerNorm,
}

pub struct RotaryBert {
    word_embeddings: Embedding,
    token_type: Option<Tensor>,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    activation: Activation,
    rope: Rotary,
    dtype: DType,
}

pub fn load(
    config: &Value,
    vb: VarBuilder,
    family: Family,
    linears: LinearKind,
) -> std::result::Result<Loaded, EmbedError> {
    let c = Config::parse(config, family)?;
    let vb = weights_under(
        vb,
        &["new", "model", "bert"],
        "embeddings.word_embeddings.weight",
    );
    let naming = if vb.contains_tensor("encoder.layers.0.attn.Wqkv.weight") {
        Naming::NomicHub
    } else if vb.contains_tensor("encoder.layer.0.attention.qkv_proj.weight") {
        Naming::GteHub
    } else {
        Naming::Transformers
    };
    let model = RotaryBert::load(vb, &c, naming, linears)?;
    Ok(Loaded::new(model, c.hidden_size, c.max_position_embeddings))
}

/// Rows `[at, at + n)` of a fused projection as a linear layer of its own.
fn split(fused: &Linear, at: usize, n: usize) -> Result<Linear> {
    let weight = fused.weight().narrow(0, at, n)?;
    let bias = fused.bias().map(|b| b.narrow(0, at, n)).transpose()?;
    Ok(Linear::new(weight, bias))
}

impl RotaryBert {
    fn load(vb: VarBuilder, c: &Config, naming: Naming, linears: LinearKind) -> Result<Self> {
        let h = c.hidden_size;
        // Fused projections are split first, so each part is packed on its own.
        let dense = |linear| Dense::new(linear, linears);
        let inter = c.intermediate_size;
        let norm = |vb: VarBuilder| candle_nn::layer_norm(h, c.layer_norm_eps, vb);
        // Square attention projections, the halves of the gated unit, and its output.
        let attention = |vb| dense(candle_nn::linear_b(h, h, c.attention_bias, vb)?);
        let half = |vb| dense(candle_nn::linear_b(h, inter, c.up_gate_bias, vb)?);
        let down = |vb| dense(candle_nn::linear_b(inter, h, c.down_bias, vb)?);
        let layers = (0..c.num_hidden_layers)
            .map(|i| -> Result<Layer> {
                Ok(match naming {
                    Naming::Transformers => {
                        let vb = vb.pp(format!("layers.{i}"));
                        let (attn, mlp) = (vb.pp("self_attn"), vb.pp("mlp"));
                        Layer {
                            q: attention(attn.pp("q_proj"))?,
                            k: attention(attn.pp("k_proj"))?,
                            v: attention(attn.pp("v_proj"))?,
                            o: attention(attn.pp("o_proj"))?,
                            attention_norm: norm(vb.pp("post_attention_layernorm"))?,
                            up: half(mlp.pp("up_proj"))?,
                            gate: half(mlp.pp("gate_proj"))?,
                            down: down(mlp.pp("down_proj"))?,
                            mlp_norm: norm(vb.pp("post_mlp_layernorm"))?,
                        }
                    }
                    Naming::NomicHub => {
                        let vb = vb.pp(format!("encoder.layers.{i}"));
                        let qkv =
                            candle_nn::linear_b(h, 3 * h, c.attention_bias, vb.pp("attn.Wqkv"))?;
                        Layer {
                            q: dense(split(&qkv, 0, h)?)?,
                            k: dense(split(&qkv, h, h)?)?,
                            v: dense(split(&qkv, 2 * h, h)?)?,
                            o: attention(vb.pp("attn.out_proj"))?,
                            attention_norm: norm(vb.pp("norm1"))?,
                            up: half(vb.pp("mlp.fc11"))?,
                            gate: half(vb.pp("mlp.fc12"))?,
                            down: down(vb.pp("mlp.fc2"))?,
                            mlp_norm: norm(vb.pp("norm2"))?,
                        }
                    }
                    Naming::GteHub => {
                        let vb = vb.pp(format!("encoder.layer.{i}"));
                        let qkv = candle_nn::linear_b(
                            h,
                            3 * h,
                            c.attention_bias,
                            vb.pp("attention.qkv_proj"),
                        )?;
                        let up_gate = candle_nn::linear_b(
                            h,
                            2 * inter,
                            c.up_gate_bias,
                            vb.pp("mlp.up_gate_proj"),
                        )?;
                        Layer {
                            q: dense(split(&qkv, 0, h)?)?,
                            k: dense(split(&qkv, h, h)?)?,
                            v: dense(split(&qkv, 2 * h, h)?)?,
                            o: attention(vb.pp("attention.o_proj"))?,
                            attention_norm: norm(vb.pp("attn_ln"))?,
                            up: dense(split(&up_gate, 0, inter)?)?,
                            gate: dense(split(&up_gate, inter, inter)?)?,
                            down: down(vb.pp("mlp.down_proj"))?,
                            mlp_norm: norm(vb.pp("mlp_ln"))?,
                        }
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embeddings = vb.pp("embeddings");
        let norm_vb = if naming == Naming::NomicHub {
            vb.pp("emb_ln")
        } else {
            embeddings.pp("LayerNorm")
        };
        let token_type = if c.type_vocab_size > 0 {
            let table = embeddings.get((c.type_vocab_size, h), "token_type_embeddings.weight")?;
            Some(table.narrow(0, 0, 1)?)
        } else {
            None
        };
        let head_dim = h / c.num_attention_heads;
        Ok(Self {
            word_embeddings: candle_nn::embedding(
                c.vocab_size,
                h,
                embeddings.pp("word_embeddings"),
            )?,
            token_type,
            embeddings_norm: norm(norm_vb)?,
            layers,
            heads: c.num_attention_heads,
            activation: c.activation,
            rope: Rotary::new(head_dim, c.rope_theta),
            dtype: vb.dtype(),
        })
    }

    /// `x` plus its attention output: what the post-norm normalises.
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        bias: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (batch, tokens, hidden) = x.dims3()?;
        let d = hidden / self.heads;
        let heads = |proj: &Dense| -> Result<Tensor> {
            proj.forward(x)?
                .reshape((batch, tokens, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (cos, sin) = rope;
        let q = candle_nn::rotary_emb::rope(&heads(&layer.q)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&heads(&layer.k)?, cos, sin)?;
        let v = heads(&layer.v)?;
        layer.o.forward_plus(&attend(&q, &k, &v, bias)?, x)
    }
}

impl RotaryBert {
    /// The post-normed gated feed-forward layer with its residual.
    fn feed_forward(&self, layer: &Layer, x: &Tensor) -> Result<Tensor> {
        let gated = self
            .activation
            .times(&layer.gate.forward(x)?, &layer.up.forward(x)?)?;
        layer.mlp_norm.forward(&layer.down.forward_plus(&gated, x)?)
    }

    /// The CPU path in f32: real tokens only (see [`packed`]), attention by our
    /// kernel from one fused, rotated `[tokens, 3·h]` projection.
    fn forward_packed(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden = self.word_embeddings.hidden_size();
        packed::forward(ids, mask, hidden, self.dtype, |packed| {
            let (total, device) = (packed.total(), packed.device());
            let (cos, sin) = self.rope.tables_at(&packed.positions, device, self.dtype)?;
            let mut x = self.word_embeddings.forward(&packed.ids)?;
            let d = hidden / self.heads;
            if let Some(token_type) = &self.token_type {
                x = x.broadcast_add(token_type)?;
            }
            x = self.embeddings_norm.forward(&x)?;
            let heads = Heads::all(self.heads);
            for layer in &self.layers {
                let rotate = |proj: &Dense| -> Result<Tensor> {
                    let split = proj.forward(&x)?.reshape((1, total, self.heads, d))?;
                    candle_nn::rotary_emb::rope_thd(&split, &cos, &sin)?.reshape((total, hidden))
                };
                // The kernel takes queries pre-scaled.
                let q = (rotate(&layer.q)? * (d as f64).powf(-0.5))?;
                let qkv = Tensor::cat(&[q, rotate(&layer.k)?, layer.v.forward(&x)?], 1)?;
                let context = kernels::attention_packed(&qkv, &packed.lengths, heads, Reach::All)?;
                x = layer
                    .attention_norm
                    .forward(&layer.o.forward_plus(&context, &x)?)?;
                x = self.feed_forward(layer, &x)?;
            }
            Ok(x)
        })
    }
}

impl Encoder for RotaryBert {
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if ids.device().is_cpu() && self.dtype == DType::F32 {
            return self.forward_packed(ids, mask);
        }
        let bias = padding_bias(mask, self.dtype)?.to_dtype(self.dtype)?;
        let rope = self.rope.tables(ids.dim(1)?, ids.device(), self.dtype)?;
        let mut x = self.word_embeddings.forward(ids)?;
        if let Some(token_type) = &self.token_type {
            x = x.broadcast_add(token_type)?;
        }
        x = self.embeddings_norm.forward(&x)?;
        for layer in &self.layers {
            x = layer
                .attention_norm
                .forward(&self.attention(layer, &x, &bias, &rope)?)?;
            x = self.feed_forward(layer, &x)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntk_scaling_raises_the_base_as_gte_does() {
        let config = serde_json::json!({"rope_theta": 500000.0, "rope_scaling": {"type": "ntk", "factor": 2.0}});
        let theta = rope_theta(&config, 0.0, 64).unwrap();
        assert!((theta - 500000.0 * 2f64.powf(64.0 / 62.0)).abs() < 1e-6);
        let plain =
            serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}});
        assert_eq!(rope_theta(&plain, 0.0, 64).unwrap(), 1000.0);
        let yarn = serde_json::json!({"rope_scaling": {"type": "yarn", "factor": 2.0}});
        assert!(rope_theta(&yarn, 1.0, 64).is_err());
    }
}
