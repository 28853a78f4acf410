//! CLIP on candle: image and text towers with their projections, so that images and
//! text queries land in one space. Loads a Hugging Face-format directory
//! (`config.json`, `model.safetensors`, `tokenizer.json`, `preprocessor_config.json`).

mod towers;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{linear_no_bias, Linear, VarBuilder};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::device::select_device;
use crate::embed::image_prep::Preprocessor;
use crate::embed::{load_tokenizer, without_truncation};
use crate::error::EmbedError;
use crate::extract::RgbImage;
use crate::model_dir::{self, file_digest};
use crate::nn::activation::Activation;
use towers::{TextTower, TowerConfig, VisionTower};

pub struct ClipEmbedder {
    text_model: TextTower,
    vision_model: VisionTower,
    text_projection: Linear,
    visual_projection: Linear,
    tokenizer: Tokenizer,
    pub preprocessor: Preprocessor,
    device: Device,
    eos_token_id: u32,
    pad_token_id: u32,
    pub dim: usize,
    pub max_tokens: usize,
    pub model_id: String,
    pub model_revision: String,
    pub dir: PathBuf,
    /// Images per forward pass.
    pub max_batch_images: usize,
}

fn get<'a>(v: &'a Value, key: &str, section: &str) -> Result<&'a Value, EmbedError> {
    v.get(key)
        .ok_or_else(|| EmbedError::InvalidModel(format!("config.json: {section} has no {key}")))
}

fn usize_of(v: &Value, key: &str, section: &str) -> Result<usize, EmbedError> {
    get(v, key, section)?
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| {
            EmbedError::InvalidModel(format!("config.json: {section}.{key} is not a number"))
        })
}

fn f64_or(v: &Value, key: &str, section: &str, default: f64) -> Result<f64, EmbedError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_f64().ok_or_else(|| {
            EmbedError::InvalidModel(format!("config.json: {section}.{key} is not a number"))
        }),
    }
}

/// One tower's transformer settings; defaults are transformers' `CLIPTextConfig` and
/// `CLIPVisionConfig` defaults (quick_gelu, epsilon 1e-5).
fn tower_config(v: &Value, section: &str) -> Result<TowerConfig, EmbedError> {
    let config = TowerConfig {
        hidden_size: usize_of(v, "hidden_size", section)?,
        intermediate_size: usize_of(v, "intermediate_size", section)?,
        num_hidden_layers: usize_of(v, "num_hidden_layers", section)?,
        num_attention_heads: usize_of(v, "num_attention_heads", section)?,
        layer_norm_eps: f64_or(v, "layer_norm_eps", section, 1e-5)?,
        activation: Activation::parse(
            v.get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("quick_gelu"),
            section,
        )?,
    };
    if config.num_attention_heads == 0
        || !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
    {
        return Err(EmbedError::InvalidModel(format!(
            "config.json: {section}.hidden_size {} is not a multiple of num_attention_heads {}",
            config.hidden_size, config.num_attention_heads
        )));
    }
    Ok(config)
}

impl ClipEmbedder {
    pub fn load(dir: &Path, device: &str, dtype: &str) -> Result<Self, EmbedError> {
        // CLIP runs in f32 on any device: candle's CLIP graph has no reduced-precision care.
        let (device, _) = select_device(device)?;
        if dtype != "f32" {
            return Err(EmbedError::Unsupported(format!(
                "dtype {dtype:?} is not supported for CLIP: use \"f32\""
            )));
        }
        if !dir.is_dir() {
            return Err(EmbedError::ModelNotFound(format!(
                "image model {} not found: give a directory with config.json, model.safetensors, \
                 tokenizer.json and preprocessor_config.json",
                dir.display()
            )));
        }
        for file in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "preprocessor_config.json",
        ] {
            if !dir.join(file).is_file() {
                return Err(EmbedError::ModelNotFound(format!(
                    "{} has no {file}",
                    dir.display()
                )));
            }
        }
        let config = model_dir::read_json(&dir.join("config.json"))?.unwrap_or_default();
        if config.get("model_type").and_then(Value::as_str) != Some("clip") {
            return Err(EmbedError::InvalidModel(
                "config.json: model_type is not \"clip\"".into(),
            ));
        }
        let text = get(&config, "text_config", "config")?;
        let vision = get(&config, "vision_config", "config")?;
        let projection_dim = usize_of(&config, "projection_dim", "config")?;
        let text_config = tower_config(text, "text_config")?;
        let vision_config = tower_config(vision, "vision_config")?;
        let vocab_size = usize_of(text, "vocab_size", "text_config")?;
        let max_tokens = usize_of(text, "max_position_embeddings", "text_config")?;
        let num_channels = match vision.get("num_channels") {
            None => 3,
            Some(_) => usize_of(vision, "num_channels", "vision_config")?,
        };
        let image_size = usize_of(vision, "image_size", "vision_config")?;
        let patch_size = usize_of(vision, "patch_size", "vision_config")?;
        if patch_size == 0 || !image_size.is_multiple_of(patch_size) {
            return Err(EmbedError::InvalidModel(format!(
                "config.json: vision_config.image_size {image_size} is not a multiple of patch_size {patch_size}"
            )));
        }
        let eos_token_id = text
            .get("eos_token_id")
            .and_then(Value::as_u64)
            .unwrap_or(2) as u32;
        let pad_token_id = text
            .get("pad_token_id")
            .and_then(Value::as_u64)
            .unwrap_or(eos_token_id as u64) as u32;
        let preprocessor = Preprocessor::from_file(&dir.join("preprocessor_config.json"))?;
        if preprocessor.shape() != (num_channels, image_size, image_size) {
            return Err(EmbedError::InvalidModel(format!(
                "preprocessor_config.json makes {:?} pixel arrays (channels, height, width), but the \
                 vision tower takes ({num_channels}, {image_size}, {image_size})",
                preprocessor.shape()
            )));
        }
        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), max_tokens)?;

        let weights = dir.join("model.safetensors");
        let model_revision = file_digest(&weights)?;
        // SAFETY: read-only mapping of the weights, as every mmap loader does.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device)? };
        let invalid =
            |e: candle_core::Error| EmbedError::InvalidModel(format!("{}: {e}", weights.display()));
        let text_model = TextTower::load(vb.pp("text_model"), &text_config, vocab_size, max_tokens)
            .map_err(invalid)?;
        let vision_model = VisionTower::load(
            vb.pp("vision_model"),
            &vision_config,
            num_channels,
            image_size,
            patch_size,
        )
        .map_err(invalid)?;
        let text_projection = linear_no_bias(
            text_config.hidden_size,
            projection_dim,
            vb.pp("text_projection"),
        )
        .map_err(invalid)?;
        let visual_projection = linear_no_bias(
            vision_config.hidden_size,
            projection_dim,
            vb.pp("visual_projection"),
        )
        .map_err(invalid)?;
        Ok(Self {
            text_model,
            vision_model,
            text_projection,
            visual_projection,
            tokenizer,
            preprocessor,
            device,
            eos_token_id,
            pad_token_id,
            dim: projection_dim,
            max_tokens,
            model_id: model_dir::model_id(dir),
            model_revision,
            dir: dir.to_path_buf(),
            max_batch_images: 32,
        })
    }

    /// The text tokenizer without truncation, for chunking.
    pub fn counting_tokenizer(&self) -> Tokenizer {
        without_truncation(&self.tokenizer)
    }

    /// Token ids as the text tower sees them (truncated at `max_tokens`).
    pub fn token_ids(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, EmbedError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// Projected text features, `texts.len() * dim` floats.
    pub fn embed_texts(&self, texts: &[&str], normalize: bool) -> Result<Vec<f32>, EmbedError> {
        let ids = self.token_ids(texts)?;
        let mut out = Vec::with_capacity(texts.len() * self.dim);
        // Rows of similar length together keep padding small; results go back in order.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut rows = vec![Vec::new(); ids.len()];
        for batch in order.chunks(64) {
            let width = batch.iter().map(|&i| ids[i].len()).max().unwrap_or(1);
            let mut flat = vec![self.pad_token_id; batch.len() * width];
            let mut eos_at = Vec::with_capacity(batch.len());
            for (row, &i) in batch.iter().enumerate() {
                flat[row * width..row * width + ids[i].len()].copy_from_slice(&ids[i]);
                // The pooled token is the first end-of-text (the highest id for old configs
                // whose eos_token_id is 2, as transformers does); the causal mask keeps
                // the padding after it from mattering.
                let pos = if self.eos_token_id == 2 {
                    ids[i]
                        .iter()
                        .enumerate()
                        .max_by_key(|(k, &v)| (v, std::cmp::Reverse(*k)))
                        .map(|(k, _)| k)
                } else {
                    ids[i].iter().position(|&t| t == self.eos_token_id)
                };
                eos_at.push(pos.unwrap_or(ids[i].len().saturating_sub(1)));
            }
            let input = Tensor::from_vec(flat, (batch.len(), width), &self.device)?;
            let hidden = self.text_model.forward(&input)?;
            let pooled = Tensor::cat(
                &eos_at
                    .iter()
                    .enumerate()
                    .map(|(row, &pos)| hidden.i((row, pos))?.unsqueeze(0))
                    .collect::<Result<Vec<_>, _>>()?,
                0,
            )?;
            let features = self.text_projection.forward(&pooled)?;
            let features = if normalize {
                l2_normalize(&features)?
            } else {
                features
            };
            for (row, &i) in batch.iter().enumerate() {
                rows[i] = features.i(row)?.to_vec1::<f32>()?;
            }
        }
        for row in rows {
            out.extend(row);
        }
        Ok(out)
    }

    /// Projected image features, `images.len() * dim` floats.
    pub fn embed_images(
        &self,
        images: &[&RgbImage],
        normalize: bool,
    ) -> Result<Vec<f32>, EmbedError> {
        let mut out = Vec::with_capacity(images.len() * self.dim);
        for batch in images.chunks(self.max_batch_images) {
            let pixels: Vec<f32> = batch
                .iter()
                .flat_map(|img| self.preprocessor.pixel_values(img))
                .collect();
            let (c, h, w) = self.preprocessor.shape();
            let input = Tensor::from_vec(pixels, (batch.len(), c, h, w), &self.device)?;
            let features = self
                .visual_projection
                .forward(&self.vision_model.forward(&input)?)?;
            let features = if normalize {
                l2_normalize(&features)?
            } else {
                features
            };
            out.extend(features.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

fn l2_normalize(v: &Tensor) -> candle_core::Result<Tensor> {
    let norms = v
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    v.broadcast_div(&norms)
}
