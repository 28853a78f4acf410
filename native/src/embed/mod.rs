//! Sentence embeddings with candle: tokenize, pack length-sorted batches under a
//! token budget, run the encoder, pool, normalise.

mod config;
mod dispatch;
mod encoder;
mod heads;
mod image_prep;
mod image_resize;
mod models;
pub mod rerank;
mod settings;
pub mod sparse;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use tokenizers::{Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::device::{select_device, select_dtype};
use crate::error::EmbedError;
use crate::model_dir::{self, file_digest};
use crate::nn::dense::LinearKind;
use encoder::Encoder;
pub use models::ClipEmbedder;
pub use settings::{DenseModule, Pooling, Settings};

/// Texts tokenized at a time: on a GPU the next group is tokenized while the
/// current one runs, and batches are length-sorted within a group.
const TOKENIZE_GROUP: usize = 4096;

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
    model: Box<dyn Encoder>,
    /// sentence-transformers' Dense modules after pooling, with their tanh flag.
    dense: Vec<(candle_nn::Linear, bool)>,
    device: Device,
    /// Truncates at `settings.max_tokens`, never pads: batches pad themselves.
    tokenizer: Tokenizer,
    pub settings: Settings,
    pub model_id: String,
    pub model_revision: String,
    pub dim: usize,
    pub dtype: String,
    /// The device actually used: `"auto"` resolves to `"cuda:0"` or `"cpu"`.
    pub device_name: String,
    pub max_batch_tokens: usize,
    pub dir: PathBuf,
}

/// The default token budget of one forward pass, measured with MiniLM: on an H200
/// in bf16 (bench/gpu_check.py) 968k tokens/s at 16,384, 805k at 65,536 and 463k at
/// 262,144; on a 2-core EPYC in f32 (bench/embed.py) 5.5k at 2,048 and 4.1k at 8,192,
/// where the attention tensors of larger passes fall out of cache.
pub fn default_max_batch_tokens(device: &Device) -> usize {
    if device.is_cpu() {
        2048
    } else {
        16384
    }
}

/// glibc serves allocations over 128 KiB (adaptively more) with fresh `mmap`s and
/// returns freed heap tops to the OS; every forward pass allocates and frees tens
/// of MB of activations, so perf showed about 8 % of a q8 pass in page faults and
/// unmapping. Serving them from the heap and trimming only past 1 GiB reuses the
/// same pages: resident memory stays at the working set's high-water mark.
fn keep_buffers_on_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only tunes glibc's allocator; both values are in range
        // (32 MiB is glibc's largest mmap threshold on 64-bit).
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        });
    }
}

impl Embedder {
    /// `options.max_batch_tokens == 0` picks the device's default.
    pub fn load(model: &str, options: &LoadOptions) -> Result<Self, EmbedError> {
        let dir = model_dir::locate(model, &options.hub_caches)?;
        let backbone = Backbone::load(&dir, options)?;
        let settings = backbone.settings;
        let dense = load_dense(
            &settings.dense,
            backbone.hidden_size,
            backbone.dtype,
            &backbone.device,
        )?;
        let dim = settings
            .dense
            .last()
            .map_or(backbone.hidden_size, |d| d.out_features);
        Ok(Self {
            model: backbone.encoder,
            device: backbone.device,
            tokenizer: backbone.tokenizer,
            settings,
            model_id: model_dir::model_id(&dir),
            model_revision: backbone.revision,
            dim,
            dense,
            dtype: options.dtype.clone(),
            device_name: backbone.device_name,
            max_batch_tokens: backbone.max_batch_tokens,
            dir,
        })
    }

    /// The tokenizer without truncation, for counting tokens of arbitrary text.
    pub fn counting_tokenizer(&self) -> Tokenizer {
        without_truncation(&self.tokenizer)
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

    /// Embeds `texts`, each after `prompt` when one is given; returns
    /// `texts.len() * dim` floats, rows in input order.
    ///
    /// An empty or whitespace-only text is embedded as the empty sequence (only the
    /// special tokens), as sentence-transformers does. With `include_prompt` false the
    /// prompt's tokens (as sentence-transformers counts them: the prompt's encoding
    /// less one) do not count in mean and max pooling.
    pub fn embed(&self, texts: &[&str], prompt: Option<&str>) -> Result<Vec<f32>, EmbedError> {
        let prompted: Vec<String>;
        let (texts, skip) = match prompt.filter(|p| !p.is_empty()) {
            Some(prompt) => {
                prompted = texts.iter().map(|t| format!("{prompt}{t}")).collect();
                let skip = if self.settings.include_prompt {
                    0
                } else {
                    self.count_tokens(&[prompt])?[0].saturating_sub(1)
                };
                (
                    prompted.iter().map(String::as_str).collect::<Vec<_>>(),
                    skip,
                )
            }
            None => (texts.to_vec(), 0),
        };
        let texts = texts.as_slice();
        let mut out = vec![0f32; texts.len() * self.dim];
        // Queue a group's batches, tokenize the next group while the device works
        // (GPU kernels run asynchronously), then collect the queued rows.
        let mut queued: Vec<(Vec<usize>, Tensor)> = Vec::new();
        for (group_index, group) in texts.chunks(TOKENIZE_GROUP).enumerate() {
            let offset = group_index * TOKENIZE_GROUP;
            let encodings = self
                .tokenizer
                .encode_batch(group.to_vec(), true)
                .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
            self.collect(std::mem::take(&mut queued), &mut out)?;
            for batch in pack_batches(&encodings, self.max_batch_tokens) {
                let rows: Vec<&Encoding> = batch.iter().map(|&i| &encodings[i]).collect();
                let pooled = self.forward(&rows, skip)?;
                queued.push((batch.into_iter().map(|i| i + offset).collect(), pooled));
            }
        }
        self.collect(queued, &mut out)?;
        Ok(out)
    }

    /// Copies queued pooled rows to their input positions in `out`.
    fn collect(
        &self,
        queued: Vec<(Vec<usize>, Tensor)>,
        out: &mut [f32],
    ) -> Result<(), EmbedError> {
        for (indices, pooled) in queued {
            let rows = pooled.flatten_all()?.to_vec1::<f32>()?;
            for (row, index) in rows.chunks_exact(self.dim).zip(indices) {
                out[index * self.dim..(index + 1) * self.dim].copy_from_slice(row);
            }
        }
        Ok(())
    }

    /// Queues one padded batch; returns its pooled (and maybe normalised) f32 rows,
    /// still on the device.
    fn forward(&self, batch: &[&Encoding], skip: usize) -> Result<Tensor, EmbedError> {
        let padded = Padded::new(batch, &self.device)?;
        let (ids, mask) = (&padded.ids, &padded.mask);
        let hidden = self.model.forward(ids, mask)?;
        let mut pooled = pool(
            self.settings.pooling,
            &hidden,
            &pooling_mask(mask, skip)?,
            batch,
        )?;
        for (linear, tanh) in &self.dense {
            pooled = linear.forward(&pooled.to_dtype(linear.weight().dtype())?)?;
            if *tanh {
                pooled = pooled.tanh()?;
            }
            pooled = pooled.to_dtype(DType::F32)?;
        }
        Ok(if self.settings.normalize {
            let norms = pooled
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?;
            pooled.broadcast_div(&norms)?
        } else {
            pooled
        })
    }
}

/// An encoder of a model directory with its tokenizer and settings: what the
/// embedder pools, and what the sparse encoders and rerankers put their heads on.
pub(crate) struct Backbone {
    pub encoder: Box<dyn Encoder>,
    pub hidden_size: usize,
    /// The directory's weights, for heads stored beside the encoder's.
    pub vb: VarBuilder<'static>,
    pub config: serde_json::Value,
    pub settings: Settings,
    /// Truncates at `settings.max_tokens`, never pads.
    pub tokenizer: Tokenizer,
    pub device: Device,
    pub device_name: String,
    pub dtype: DType,
    pub max_batch_tokens: usize,
    /// [`file_digest`] of the weights.
    pub revision: String,
}

impl Backbone {
    /// Loads the encoder of `dir` (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub(crate) fn load(dir: &Path, options: &LoadOptions) -> Result<Self, EmbedError> {
        let (device, device_name) = select_device(&options.device)?;
        if device.is_cpu() {
            keep_buffers_on_heap();
        }
        let (dtype, linears): (DType, LinearKind) = select_dtype(&options.dtype, &device)?;
        let max_batch_tokens = match options.max_batch_tokens {
            0 => default_max_batch_tokens(&device),
            n => n,
        };
        let config = model_dir::read_json(&dir.join("config.json"))?.ok_or_else(|| {
            EmbedError::ModelNotFound(format!("{} has no config.json", dir.display()))
        })?;
        let weights = dir.join("model.safetensors");
        let revision = file_digest(&weights)?;
        // SAFETY: the file is mapped read-only; a concurrent writer is outside our
        // contract, as for every memory-mapped model loader.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, &device)? };
        let loaded = dispatch::load(&config, vb.clone(), linears).map_err(|e| match e {
            EmbedError::Inference(e) => {
                EmbedError::InvalidModel(format!("{}: {e}", weights.display()))
            }
            other => other,
        })?;
        let settings = settings::read(dir, loaded.max_tokens)?;
        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), settings.max_tokens)?;
        Ok(Self {
            encoder: loaded.encoder,
            hidden_size: loaded.hidden_size,
            vb,
            config,
            settings,
            tokenizer,
            device,
            device_name,
            dtype,
            max_batch_tokens,
            revision,
        })
    }
}

/// A batch of encodings as right-padded `[batch, tokens]` u32 tensors.
pub(crate) struct Padded {
    pub ids: Tensor,
    /// 1 at tokens, 0 at padding.
    pub mask: Tensor,
    /// Each token's segment (0, or 1 in the second text of a pair).
    pub type_ids: Tensor,
}

impl Padded {
    pub(crate) fn new(batch: &[&Encoding], device: &Device) -> candle_core::Result<Self> {
        let width = batch.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; batch.len() * width];
        let mut mask = vec![0u32; batch.len() * width];
        let mut type_ids = vec![0u32; batch.len() * width];
        for (row, encoding) in batch.iter().enumerate() {
            let at = row * width;
            ids[at..at + encoding.len()].copy_from_slice(encoding.get_ids());
            mask[at..at + encoding.len()].fill(1);
            type_ids[at..at + encoding.len()].copy_from_slice(encoding.get_type_ids());
        }
        let shape = (batch.len(), width);
        Ok(Self {
            ids: Tensor::from_vec(ids, shape, device)?,
            mask: Tensor::from_vec(mask, shape, device)?,
            type_ids: Tensor::from_vec(type_ids, shape, device)?,
        })
    }
}

/// The attention mask with its first `skip` positions (a prompt's tokens) cleared.
fn pooling_mask(mask: &Tensor, skip: usize) -> candle_core::Result<Tensor> {
    let width = mask.dim(1)?;
    if skip == 0 || width == 0 {
        return Ok(mask.clone());
    }
    let keep: Vec<u32> = (0..width).map(|i| u32::from(i >= skip)).collect();
    mask.broadcast_mul(&Tensor::from_vec(keep, (1, width), mask.device())?)
}

fn load_dense(
    modules: &[DenseModule],
    hidden_size: usize,
    dtype: DType,
    device: &Device,
) -> Result<Vec<(candle_nn::Linear, bool)>, EmbedError> {
    let mut expected = hidden_size;
    modules
        .iter()
        .map(|m| {
            if m.in_features != expected {
                return Err(EmbedError::InvalidModel(format!(
                    "{}: in_features {} where {expected} come in",
                    m.dir.display(),
                    m.in_features
                )));
            }
            expected = m.out_features;
            let weights = m.dir.join("model.safetensors");
            // SAFETY: read-only mapping of the weights, as for the encoder.
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device)? };
            let linear =
                candle_nn::linear_b(m.in_features, m.out_features, m.bias, vb.pp("linear"))
                    .map_err(|e| EmbedError::InvalidModel(format!("{}: {e}", weights.display())))?;
            Ok((linear, m.tanh))
        })
        .collect()
}

/// Pools right-padded hidden states `[batch, tokens, hidden]` into f32 rows, as
/// sentence-transformers' Pooling module does.
fn pool(
    pooling: Pooling,
    hidden: &Tensor,
    mask: &Tensor,
    batch: &[&Encoding],
) -> candle_core::Result<Tensor> {
    let counts = || -> candle_core::Result<Tensor> {
        mask.to_dtype(DType::F32)?
            .sum_keepdim(1)?
            .clamp(1e-9, f64::MAX)
    };
    // [batch, 1, tokens] × [batch, tokens, hidden]: the masked sum as one product.
    let masked_sum = || -> candle_core::Result<Tensor> {
        let weights = mask.to_dtype(hidden.dtype())?.unsqueeze(1)?;
        weights.matmul(hidden)?.squeeze(1)?.to_dtype(DType::F32)
    };
    Ok(match pooling {
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?.to_dtype(DType::F32)?,
        Pooling::Mean => masked_sum()?.broadcast_div(&counts()?)?,
        Pooling::MeanSqrtLen => masked_sum()?.broadcast_div(&counts()?.sqrt()?)?,
        Pooling::Max => {
            // Padding gets -1e9, as sentence-transformers sets it, so it never wins.
            let floor = mask.to_dtype(DType::F32)?.affine(1e9, -1e9)?.unsqueeze(2)?;
            hidden.to_dtype(DType::F32)?.broadcast_add(&floor)?.max(1)?
        }
        Pooling::LastToken => {
            // Rows are right-padded: the last token of row r sits at its length − 1,
            // whichever side the model's tokenizer would pad on.
            let width = hidden.dim(1)?;
            let mut onehot = vec![0f32; batch.len() * width];
            for (row, encoding) in batch.iter().enumerate() {
                onehot[row * width + encoding.len().max(1) - 1] = 1.0;
            }
            let weights = Tensor::from_vec(onehot, (batch.len(), 1, width), hidden.device())?;
            weights
                .to_dtype(hidden.dtype())?
                .matmul(hidden)?
                .squeeze(1)?
                .to_dtype(DType::F32)?
        }
    })
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

/// A copy of `tokenizer` that never truncates: for counting and chunking whole texts.
pub(crate) fn without_truncation(tokenizer: &Tokenizer) -> Tokenizer {
    let mut copy = tokenizer.clone();
    copy.with_truncation(None)
        .expect("removing truncation cannot fail");
    copy
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
