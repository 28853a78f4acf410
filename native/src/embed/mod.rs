//! Sentence embeddings with candle: tokenize, pack length-sorted batches under a
//! token budget, run the encoder, pool, normalise.

pub mod clip;
mod image_prep;
mod resample;
pub mod model_dir;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use sha2::{Digest, Sha256};
use tokenizers::{Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::EmbedError;
pub use model_dir::{Pooling, Settings};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: String,
    pub dtype: String,
    /// Most tokens (padding included) in one forward pass.
    pub max_batch_tokens: usize,
    pub hub_caches: Vec<PathBuf>,
}

pub struct Embedder {
    model: BertModel,
    device: Device,
    /// Truncates at `settings.max_tokens`, never pads: batches pad themselves.
    tokenizer: Tokenizer,
    pub settings: Settings,
    pub model_id: String,
    pub model_revision: String,
    pub dim: usize,
    pub dtype: String,
    pub device_name: String,
    pub max_batch_tokens: usize,
    pub dir: PathBuf,
}

impl Embedder {
    pub fn load(model: &str, options: &LoadOptions) -> Result<Self, EmbedError> {
        let device = match options.device.as_str() {
            "cpu" => Device::Cpu,
            other => {
                return Err(EmbedError::Unsupported(format!(
                    "device {other:?} is not available in this build (available: \"cpu\")"
                )))
            }
        };
        if options.dtype != "f32" {
            return Err(EmbedError::Unsupported(format!(
                "dtype {:?} is not supported on {}: use \"f32\"",
                options.dtype, options.device
            )));
        }
        if options.max_batch_tokens == 0 {
            return Err(EmbedError::Unsupported("max_batch_tokens must be positive".into()));
        }
        let dir = model_dir::locate(model, &options.hub_caches)?;
        let config_json = model_dir::read_json(&dir.join("config.json"))?
            .ok_or_else(|| EmbedError::ModelNotFound(format!("{} has no config.json", dir.display())))?;
        let model_type = config_json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        if !matches!(model_type, "bert" | "") {
            return Err(EmbedError::InvalidModel(format!(
                "model_type {model_type:?} is not supported: BERT-family encoders only"
            )));
        }
        let config: BertConfig = serde_json::from_value(config_json)
            .map_err(|e| EmbedError::InvalidModel(format!("config.json: {e}")))?;
        let settings = model_dir::settings(&dir, config.max_position_embeddings)?;
        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), settings.max_tokens)?;

        let weights = dir.join("model.safetensors");
        let model_revision = file_digest(&weights)?;
        // SAFETY: the file is mapped read-only; a concurrent writer is outside our
        // contract, as for every memory-mapped model loader.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device)? };
        let model = BertModel::load(vb, &config)
            .map_err(|e| EmbedError::InvalidModel(format!("{}: {e}", weights.display())))?;
        Ok(Self {
            model,
            device,
            tokenizer,
            settings,
            model_id: model_dir::model_id(&dir),
            model_revision,
            dim: config.hidden_size,
            dtype: options.dtype.clone(),
            device_name: options.device.clone(),
            max_batch_tokens: options.max_batch_tokens,
            dir,
        })
    }

    /// The tokenizer without truncation, for counting tokens of arbitrary text.
    pub fn counting_tokenizer(&self) -> Tokenizer {
        let mut t = self.tokenizer.clone();
        t.with_truncation(None).expect("removing truncation cannot fail");
        t
    }

    /// Tokens of each text as the model would see it before truncation, special
    /// tokens included.
    pub fn count_tokens(&self, texts: &[&str]) -> Result<Vec<usize>, EmbedError> {
        let counter = self.counting_tokenizer();
        let encodings = counter
            .encode_batch_fast(texts.to_vec(), true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok(encodings.iter().map(Encoding::len).collect())
    }

    /// Embeds `texts`; returns `texts.len() * dim` floats, rows in input order.
    ///
    /// An empty or whitespace-only text is embedded as the empty sequence (only the
    /// special tokens), as sentence-transformers does.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<f32>, EmbedError> {
        let mut out = vec![0f32; texts.len() * self.dim];
        if texts.is_empty() {
            return Ok(out);
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        for batch in pack_batches(&encodings, self.max_batch_tokens) {
            let pooled = self.forward(&batch.iter().map(|&i| &encodings[i]).collect::<Vec<_>>())?;
            for (row, &index) in pooled.chunks_exact(self.dim).zip(&batch) {
                out[index * self.dim..(index + 1) * self.dim].copy_from_slice(row);
            }
        }
        Ok(out)
    }

    /// Runs one padded batch and returns its pooled (and maybe normalised) rows.
    fn forward(&self, batch: &[&Encoding]) -> Result<Vec<f32>, EmbedError> {
        let width = batch.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; batch.len() * width];
        let mut mask = vec![0u32; batch.len() * width];
        for (row, encoding) in batch.iter().enumerate() {
            let at = row * width;
            ids[at..at + encoding.len()].copy_from_slice(encoding.get_ids());
            mask[at..at + encoding.len()].fill(1);
        }
        let shape = (batch.len(), width);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let type_ids = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;
        let pooled = match self.settings.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
                summed.broadcast_div(&counts)?
            }
        };
        let pooled = if self.settings.normalize {
            let norms = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            pooled.broadcast_div(&norms)?
        } else {
            pooled
        };
        Ok(pooled.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Orders inputs longest first and cuts them into batches whose padded size
/// (rows × longest row) stays within `max_batch_tokens`; every batch has at least one row.
pub fn pack_batches(encodings: &[Encoding], max_batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..encodings.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].len()));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut width = 0;
    for index in order {
        let len = encodings[index].len().max(1);
        let new_width = width.max(len);
        if !current.is_empty() && (current.len() + 1) * new_width > max_batch_tokens {
            batches.push(std::mem::take(&mut current));
            width = 0;
        }
        width = width.max(len);
        current.push(index);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

pub(crate) fn load_tokenizer(path: &Path, max_tokens: usize) -> Result<Tokenizer, EmbedError> {
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(|e| EmbedError::InvalidModel(format!("{}: {e}", path.display())))?;
    // tokenizer.json may carry a truncation and fixed padding of its own (MiniLM's
    // says 128); the model's limit comes from the sentence-transformers files.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}

/// First 16 hex digits of the weights' SHA-256: identifies the weights, not the path.
pub fn file_digest(path: &Path) -> Result<String, EmbedError> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}
