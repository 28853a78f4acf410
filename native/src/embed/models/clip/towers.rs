//! CLIP's text and vision transformers, as transformers' `CLIPTextTransformer` and
//! `CLIPVisionTransformer` compute them, with each tower's own activation and layer
//! norm epsilon from `config.json` (candle-transformers' CLIP knows only quick_gelu
//! and a fixed epsilon, so converted OpenCLIP checkpoints would load and be wrong).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Embedding, LayerNorm, Linear, VarBuilder};

use crate::nn::activation::Activation;

/// What one tower's transformer needs from its `text_config` or `vision_config`.
#[derive(Debug, Clone)]
pub struct TowerConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

struct EncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
}

/// The pre-norm transformer stack both towers share.
struct Encoder {
    layers: Vec<EncoderLayer>,
    heads: usize,
    activation: Activation,
}

impl Encoder {
    fn load(vb: VarBuilder, c: &TowerConfig) -> Result<Self> {
        let h = c.hidden_size;
        let norm = |vb: VarBuilder| candle_nn::layer_norm(h, c.layer_norm_eps, vb);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                let attn = vb.pp("self_attn");
                Ok(EncoderLayer {
                    q_proj: candle_nn::linear(h, h, attn.pp("q_proj"))?,
                    k_proj: candle_nn::linear(h, h, attn.pp("k_proj"))?,
                    v_proj: candle_nn::linear(h, h, attn.pp("v_proj"))?,
                    out_proj: candle_nn::linear(h, h, attn.pp("out_proj"))?,
                    layer_norm1: norm(vb.pp("layer_norm1"))?,
                    fc1: candle_nn::linear(h, c.intermediate_size, vb.pp("mlp.fc1"))?,
                    fc2: candle_nn::linear(c.intermediate_size, h, vb.pp("mlp.fc2"))?,
                    layer_norm2: norm(vb.pp("layer_norm2"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            heads: c.num_attention_heads,
            activation: c.activation,
        })
    }

    /// `mask`: an additive `[tokens, tokens]` bias (0 or -inf-like), or none.
    fn forward(&self, mut x: Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        for layer in &self.layers {
            let attended = self.attention(layer, &layer.layer_norm1.forward(&x)?, mask)?;
            x = (x + attended)?;
            let inner = self
                .activation
                .apply(&layer.fc1.forward(&layer.layer_norm2.forward(&x)?)?)?;
            x = (&x + layer.fc2.forward(&inner)?)?;
        }
        Ok(x)
    }

    fn attention(&self, layer: &EncoderLayer, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (batch, tokens, hidden) = x.dims3()?;
        let head_dim = hidden / self.heads;
        let split = |t: Tensor| {
            t.reshape((batch, tokens, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((layer.q_proj.forward(x)? * (head_dim as f64).powf(-0.5))?)?;
        let k = split(layer.k_proj.forward(x)?)?;
        let v = split(layer.v_proj.forward(x)?)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, tokens, hidden))?;
        layer.out_proj.forward(&context)
    }
}

pub struct TextTower {
    token_embedding: Embedding,
    position_embedding: Embedding,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
}

impl TextTower {
    /// `vb` at `text_model`.
    pub fn load(
        vb: VarBuilder,
        c: &TowerConfig,
        vocab_size: usize,
        max_positions: usize,
    ) -> Result<Self> {
        let embeddings = vb.pp("embeddings");
        Ok(Self {
            token_embedding: candle_nn::embedding(
                vocab_size,
                c.hidden_size,
                embeddings.pp("token_embedding"),
            )?,
            position_embedding: candle_nn::embedding(
                max_positions,
                c.hidden_size,
                embeddings.pp("position_embedding"),
            )?,
            encoder: Encoder::load(vb.pp("encoder"), c)?,
            final_layer_norm: candle_nn::layer_norm(
                c.hidden_size,
                c.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
        })
    }

    /// Final hidden states `[batch, tokens, hidden]` of `ids` (`[batch, tokens]` u32).
    /// The causal mask keeps padding placed after a row's tokens from reaching them.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, tokens) = ids.dims2()?;
        let positions = Tensor::arange(0u32, tokens as u32, ids.device())?;
        let x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(tokens, ids.device())?;
        self.final_layer_norm
            .forward(&self.encoder.forward(x, Some(&mask))?)
    }
}

pub struct VisionTower {
    class_embedding: Tensor,
    patch_embedding: candle_nn::Conv2d,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
}

impl VisionTower {
    /// `vb` at `vision_model`.
    pub fn load(
        vb: VarBuilder,
        c: &TowerConfig,
        num_channels: usize,
        image_size: usize,
        patch_size: usize,
    ) -> Result<Self> {
        let embeddings = vb.pp("embeddings");
        let patches = (image_size / patch_size).pow(2);
        let conv = Conv2dConfig {
            stride: patch_size,
            ..Default::default()
        };
        // transformers spells the pre-encoder norm `pre_layrnorm`.
        let norm = |name: &str| candle_nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp(name));
        Ok(Self {
            class_embedding: embeddings.get(c.hidden_size, "class_embedding")?,
            patch_embedding: candle_nn::conv2d_no_bias(
                num_channels,
                c.hidden_size,
                patch_size,
                conv,
                embeddings.pp("patch_embedding"),
            )?,
            position_embedding: candle_nn::embedding(
                patches + 1,
                c.hidden_size,
                embeddings.pp("position_embedding"),
            )?,
            pre_layrnorm: norm("pre_layrnorm")?,
            encoder: Encoder::load(vb.pp("encoder"), c)?,
            post_layernorm: norm("post_layernorm")?,
        })
    }

    /// The pooled output `[batch, hidden]`: the class token, after the post-norm.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let batch = pixels.dim(0)?;
        let patches = self
            .patch_embedding
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let hidden = self.class_embedding.dim(0)?;
        let class = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((batch, 1, hidden))?;
        let x = Tensor::cat(&[&class, &patches], 1)?;
        let x = x.broadcast_add(self.position_embedding.embeddings())?;
        let x = self.encoder.forward(self.pre_layrnorm.forward(&x)?, None)?;
        self.post_layernorm.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

/// 0 on and below the diagonal, a large negative value above it.
fn causal_mask(tokens: usize, device: &candle_core::Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..tokens)
        .flat_map(|i| (0..tokens).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (tokens, tokens), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn causal_mask_hides_only_later_tokens() {
        let mask = causal_mask(3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(mask[0][0], 0.0);
        assert_eq!(mask[2][0..3], [0.0, 0.0, 0.0]);
        assert!(mask[0][1] < -1e30 && mask[1][2] < -1e30);
    }
}
