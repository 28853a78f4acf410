//! Whisper on candle: the encoder over a 30 s window of log-mel features, and the
//! decoder with a key/value cache, as transformers' `WhisperForConditionalGeneration`
//! computes them (pre-norm layers, exact GELU, queries scaled by `head_dim^-0.5`, no
//! bias on key projections, output projection tied to the token embedding).

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm, VarBuilder};
use serde_json::Value;

use crate::error::EmbedError;
use crate::nn::activation::Activation;
use crate::nn::dense::{Dense, LinearKind};

/// What the model needs from `config.json`.
#[derive(Debug, Clone)]
pub struct WhisperConfig {
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_layers: usize,
    pub decoder_heads: usize,
    pub decoder_ffn_dim: usize,
    pub num_mel_bins: usize,
    pub max_source_positions: usize,
    pub max_target_positions: usize,
    pub vocab_size: usize,
    pub activation: Activation,
    pub scale_embedding: bool,
}

impl WhisperConfig {
    pub fn from_json(v: &Value) -> std::result::Result<Self, EmbedError> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "whisper" {
            return Err(EmbedError::InvalidModel(format!(
                "config.json: model_type {model_type:?} is not a Whisper model (\"whisper\")"
            )));
        }
        let n = |key: &str| {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .ok_or_else(|| EmbedError::InvalidModel(format!("config.json has no number {key}")))
        };
        let config = Self {
            d_model: n("d_model")?,
            encoder_layers: n("encoder_layers")?,
            encoder_heads: n("encoder_attention_heads")?,
            encoder_ffn_dim: n("encoder_ffn_dim")?,
            decoder_layers: n("decoder_layers")?,
            decoder_heads: n("decoder_attention_heads")?,
            decoder_ffn_dim: n("decoder_ffn_dim")?,
            num_mel_bins: n("num_mel_bins")?,
            max_source_positions: n("max_source_positions")?,
            max_target_positions: n("max_target_positions")?,
            vocab_size: n("vocab_size")?,
            activation: Activation::parse(
                v.get("activation_function")
                    .and_then(Value::as_str)
                    .unwrap_or("gelu"),
                "config.json",
            )?,
            scale_embedding: v
                .get("scale_embedding")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        for heads in [config.encoder_heads, config.decoder_heads] {
            if heads == 0 || !config.d_model.is_multiple_of(heads) {
                return Err(EmbedError::InvalidModel(format!(
                    "config.json: d_model {} is not a multiple of {heads} attention heads",
                    config.d_model
                )));
            }
        }
        Ok(config)
    }

    /// Feature frames of one window: two per encoder position (conv2 has stride 2).
    pub fn window_frames(&self) -> usize {
        2 * self.max_source_positions
    }
}

struct Attention {
    q_proj: Dense,
    k_proj: Dense,
    v_proj: Dense,
    out_proj: Dense,
    heads: usize,
}

impl Attention {
    fn load(vb: VarBuilder, d: usize, heads: usize, linears: LinearKind) -> Result<Self> {
        let dense = |name: &str, bias: bool| {
            let linear = if bias {
                candle_nn::linear(d, d, vb.pp(name))?
            } else {
                candle_nn::linear_no_bias(d, d, vb.pp(name))?
            };
            Dense::new(linear, linears)
        };
        Ok(Self {
            q_proj: dense("q_proj", true)?,
            k_proj: dense("k_proj", false)?,
            v_proj: dense("v_proj", true)?,
            out_proj: dense("out_proj", true)?,
            heads,
        })
    }

    /// `[1, t, d]` → `[1, heads, t, head_dim]`.
    fn split(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        x.reshape((b, t, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn keys_values(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split(&self.k_proj.forward(x)?)?,
            self.split(&self.v_proj.forward(x)?)?,
        ))
    }

    /// Attention of `x`'s queries over `k`/`v`; `mask` is an additive `[t, s]` bias.
    fn attend(&self, x: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let head_dim = d / self.heads;
        let q = self.split(&(self.q_proj.forward(x)? * (head_dim as f64).powf(-0.5))?)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = weights.matmul(v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&context)
    }
}

struct FeedForward {
    fc1: Dense,
    fc2: Dense,
    activation: Activation,
}

impl FeedForward {
    fn load(
        vb: VarBuilder,
        d: usize,
        inner: usize,
        activation: Activation,
        linears: LinearKind,
    ) -> Result<Self> {
        Ok(Self {
            fc1: Dense::new(candle_nn::linear(d, inner, vb.pp("fc1"))?, linears)?,
            fc2: Dense::new(candle_nn::linear(inner, d, vb.pp("fc2"))?, linears)?,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2
            .forward(&self.fc1.forward_activated(x, self.activation)?)
    }
}

struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
}

struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
}

pub struct Whisper {
    conv1: Conv1d,
    conv2: Conv1d,
    encoder_positions: Tensor,
    encoder_layers: Vec<EncoderLayer>,
    encoder_norm: LayerNorm,
    embed_tokens: Tensor,
    /// q8 and bf16 on the CPU: the output projection (the token embedding, transposed)
    /// packed like the linear layers. It is read whole for every token, and is most of
    /// a decoder step's memory traffic.
    logits: Option<Dense>,
    decoder_positions: Tensor,
    decoder_layers: Vec<DecoderLayer>,
    decoder_norm: LayerNorm,
    activation: Activation,
    pub config: WhisperConfig,
    pub device: Device,
}

const LAYER_NORM_EPS: f64 = 1e-5;

impl Whisper {
    /// Loads `model.safetensors` of a transformers Whisper checkpoint in `dir`.
    /// `dtype`: F32, or F16/BF16 on a GPU; `linears`: int8 or bf16 linear layers (CPU, F32).
    pub fn load(
        dir: &Path,
        config: WhisperConfig,
        device: &Device,
        dtype: DType,
        linears: LinearKind,
    ) -> std::result::Result<Self, EmbedError> {
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(EmbedError::ModelNotFound(format!(
                "{} has no model.safetensors",
                dir.display()
            )));
        }
        // SAFETY: the file is memory-mapped read-only for the model's lifetime; like
        // every safetensors loader we assume nobody rewrites it in place meanwhile.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, device)? };
        // Checkpoints save the bare model (`model.`) or, from other tools, without it.
        let vb = if vb.contains_tensor("model.encoder.conv1.weight") {
            vb.pp("model")
        } else {
            vb
        };
        Ok(Self::from_var_builder(vb, config, device, linears)?)
    }

    fn from_var_builder(
        vb: VarBuilder,
        c: WhisperConfig,
        device: &Device,
        linears: LinearKind,
    ) -> Result<Self> {
        let d = c.d_model;
        let norm = |vb: VarBuilder| candle_nn::layer_norm(d, LAYER_NORM_EPS, vb);
        let enc = vb.pp("encoder");
        let conv = |stride| Conv1dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let encoder_layers = (0..c.encoder_layers)
            .map(|i| {
                let vb = enc.pp(format!("layers.{i}"));
                Ok(EncoderLayer {
                    self_attn: Attention::load(vb.pp("self_attn"), d, c.encoder_heads, linears)?,
                    self_attn_layer_norm: norm(vb.pp("self_attn_layer_norm"))?,
                    ffn: FeedForward::load(
                        vb.clone(),
                        d,
                        c.encoder_ffn_dim,
                        c.activation,
                        linears,
                    )?,
                    final_layer_norm: norm(vb.pp("final_layer_norm"))?,
                })
            })
            .collect::<Result<_>>()?;
        let dec = vb.pp("decoder");
        let decoder_layers = (0..c.decoder_layers)
            .map(|i| {
                let vb = dec.pp(format!("layers.{i}"));
                Ok(DecoderLayer {
                    self_attn: Attention::load(vb.pp("self_attn"), d, c.decoder_heads, linears)?,
                    self_attn_layer_norm: norm(vb.pp("self_attn_layer_norm"))?,
                    encoder_attn: Attention::load(
                        vb.pp("encoder_attn"),
                        d,
                        c.decoder_heads,
                        linears,
                    )?,
                    encoder_attn_layer_norm: norm(vb.pp("encoder_attn_layer_norm"))?,
                    ffn: FeedForward::load(
                        vb.clone(),
                        d,
                        c.decoder_ffn_dim,
                        c.activation,
                        linears,
                    )?,
                    final_layer_norm: norm(vb.pp("final_layer_norm"))?,
                })
            })
            .collect::<Result<_>>()?;
        let embed_tokens = dec.get((c.vocab_size, d), "embed_tokens.weight")?;
        let logits = match linears {
            LinearKind::Float => None,
            packed => Some(Dense::new(
                candle_nn::Linear::new(embed_tokens.clone(), None),
                packed,
            )?),
        };
        Ok(Self {
            conv1: candle_nn::conv1d(c.num_mel_bins, d, 3, conv(1), enc.pp("conv1"))?,
            conv2: candle_nn::conv1d(d, d, 3, conv(2), enc.pp("conv2"))?,
            encoder_positions: enc.get((c.max_source_positions, d), "embed_positions.weight")?,
            encoder_layers,
            encoder_norm: norm(enc.pp("layer_norm"))?,
            embed_tokens,
            logits,
            decoder_positions: dec.get((c.max_target_positions, d), "embed_positions.weight")?,
            decoder_layers,
            decoder_norm: norm(dec.pp("layer_norm"))?,
            activation: c.activation,
            config: c,
            device: device.clone(),
        })
    }

    /// `mel`: `[n_mels, frames]` log-mel features of one window (frames =
    /// `window_frames()`) → the encoder's `[1, frames / 2, d_model]` output.
    pub fn encode(&self, mel: &Tensor) -> Result<Tensor> {
        let x = mel.to_dtype(self.embed_tokens.dtype())?.unsqueeze(0)?;
        let x = self.activation.apply(&self.conv1.forward(&x)?)?;
        let x = self.activation.apply(&self.conv2.forward(&x)?)?;
        let x = x.transpose(1, 2)?;
        let positions = x.dim(1)?;
        let mut x = x.broadcast_add(&self.encoder_positions.i(..positions)?)?;
        for layer in &self.encoder_layers {
            let h = layer.self_attn_layer_norm.forward(&x)?;
            let (k, v) = layer.self_attn.keys_values(&h)?;
            x = (&x + layer.self_attn.attend(&h, &k, &v, None)?)?;
            let h = layer.final_layer_norm.forward(&x)?;
            x = (&x + layer.ffn.forward(&h)?)?;
        }
        self.encoder_norm.forward(&x)
    }

    /// A decoder over one window's encoder output, its cross-attention keys and
    /// values computed once.
    pub fn decoder(&self, encoded: &Tensor) -> Result<Decoder<'_>> {
        let cross = self
            .decoder_layers
            .iter()
            .map(|l| l.encoder_attn.keys_values(encoded))
            .collect::<Result<_>>()?;
        Ok(Decoder {
            model: self,
            cross,
            cache: vec![None; self.decoder_layers.len()],
            position: 0,
        })
    }
}

/// One decoding pass: tokens go in, the logits of the last one come out, and the
/// self-attention keys and values of every token so far stay in the cache.
pub struct Decoder<'a> {
    model: &'a Whisper,
    cross: Vec<(Tensor, Tensor)>,
    cache: Vec<Option<(Tensor, Tensor)>>,
    position: usize,
}

impl Decoder<'_> {
    pub fn position(&self) -> usize {
        self.position
    }

    /// Appends `tokens` and returns the logits (`vocab_size` of them) after the last.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let m = self.model;
        let n = tokens.len();
        if self.position + n > m.config.max_target_positions {
            candle_core::bail!(
                "the decoder holds {} positions; {} were asked",
                m.config.max_target_positions,
                self.position + n
            );
        }
        let ids = Tensor::new(tokens, &m.device)?;
        let mut x = m.embed_tokens.index_select(&ids, 0)?;
        if m.config.scale_embedding {
            x = (x * (m.config.d_model as f64).sqrt())?;
        }
        let x = (x + m.decoder_positions.i(self.position..self.position + n)?)?;
        let mut x = x.unsqueeze(0)?;
        let mask = causal_mask(n, self.position, &m.device)?
            .map(|mask| mask.to_dtype(x.dtype()))
            .transpose()?;
        for (i, layer) in m.decoder_layers.iter().enumerate() {
            let h = layer.self_attn_layer_norm.forward(&x)?;
            let (k, v) = layer.self_attn.keys_values(&h)?;
            let (k, v) = match self.cache[i].take() {
                Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
                None => (k, v),
            };
            x = (&x + layer.self_attn.attend(&h, &k, &v, mask.as_ref())?)?;
            self.cache[i] = Some((k, v));
            let h = layer.encoder_attn_layer_norm.forward(&x)?;
            let (ck, cv) = &self.cross[i];
            x = (&x + layer.encoder_attn.attend(&h, ck, cv, None)?)?;
            let h = layer.final_layer_norm.forward(&x)?;
            x = (&x + layer.ffn.forward(&h)?)?;
        }
        self.position += n;
        let last = m.decoder_norm.forward(&x.i((0, n - 1..n))?)?;
        let logits = match &m.logits {
            Some(projection) => projection.forward(&last)?,
            None => last.matmul(&m.embed_tokens.t()?)?,
        };
        logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()
    }
}

/// `[n, past + n]`: token i of the new ones sees the past and new tokens up to itself.
fn causal_mask(n: usize, past: usize, device: &Device) -> Result<Option<Tensor>> {
    if n == 1 {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..past + n).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(mask, (n, past + n), device).map(Some)
}

/// Index of the largest value (the first on ties, as `argmax` does).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}
