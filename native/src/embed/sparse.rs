//! Sparse encoders: a weight per vocabulary entry, nearly all of them zero, so that
//! exact terms (product codes, error strings, names) match as in a lexical index.
//!
//! Three families, told apart by the files of the model directory:
//! - SPLADE (`BertForMaskedLM` or `RobertaForMaskedLM` with sentence-transformers'
//!   `SpladePooling`): `log(1 + relu(logits))` of the masked-LM head, max-pooled (or
//!   summed) over the tokens; `log1p_relu` applies the log twice (OpenSearch v3);
//! - inference-free SPLADE (sentence-transformers' `Router`, `router_config.json`):
//!   documents through a SPLADE model, queries by a weight per token id
//!   (`SparseStaticEmbedding`), no model run at all;
//! - BGE-M3's sparse head (`sparse_linear.pt` beside an XLM-RoBERTa): each token's
//!   `relu(sparse_linear(h))`, the largest weight per token id.
//!
//! Special tokens (`[CLS]`, `[SEP]`, `<s>`, padding…) never appear in an output: they
//! mark structure, not content. BGE-M3's own code drops them likewise; for SPLADE this
//! is the one difference from sentence-transformers' `SparseEncoder`, which keeps
//! whatever weight the head gives them.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::{Encoding, Tokenizer};

use super::encoder::Encoder;
use super::heads::mlm::MlmHead;
use super::heads::sparse_linear::{self, SparseLinear};
use super::{load_tokenizer, pack_batches, Backbone, LoadOptions, Padded, TOKENIZE_GROUP};
use crate::error::EmbedError;
use crate::model_dir::{self, file_digest, read_json};

/// Token rows whose vocabulary logits are computed at once: 128 rows over XLM-R's
/// 250,002 entries are 128 MB of f32.
const LOGIT_ROWS: usize = 128;

/// Token ids in ascending order, each with its weight (> 0).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseVector {
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

impl SparseVector {
    fn from_map(weights: BTreeMap<u32, f32>) -> Self {
        let (indices, values) = weights.into_iter().unzip();
        Self { indices, values }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Splade,
    InferenceFreeSplade,
    BgeM3,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Self::Splade => "splade",
            Self::InferenceFreeSplade => "splade-inference-free",
            Self::BgeM3 => "bge-m3",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    Max,
    Sum,
}

struct Splade {
    head: MlmHead,
    pool: Pool,
    /// `log1p_relu`: log(1 + log(1 + relu(x))).
    twice: bool,
}

enum Head {
    Splade(Splade),
    BgeM3(SparseLinear),
}

/// Inference-free SPLADE's query side: a weight per token id of the query's tokens.
struct TokenWeights {
    weights: Vec<f32>,
    /// No special tokens added; truncates at the module's limit.
    tokenizer: Tokenizer,
}

pub struct SparseEmbedder {
    encoder: Box<dyn Encoder>,
    head: Head,
    /// Truncates at `max_tokens`, never pads.
    tokenizer: Tokenizer,
    query: Option<TokenWeights>,
    special: HashSet<u32>,
    device: Device,
    pub family: Family,
    /// Entries of the vocabulary: every index is below it.
    pub vocab_size: usize,
    pub max_tokens: usize,
    pub max_batch_tokens: usize,
    pub model_id: String,
    pub model_revision: String,
    pub dtype: String,
    pub device_name: String,
    pub dir: PathBuf,
}

impl SparseEmbedder {
    pub fn load(model: &str, options: &LoadOptions) -> Result<Self, EmbedError> {
        let dir = model_dir::find(model, &options.hub_caches)?;
        if dir.join("router_config.json").is_file() {
            return Self::load_router(dir, options);
        }
        let dir = model_dir::check_files(dir)?;
        let weights = vec![dir.join("model.safetensors")];
        let backbone = Backbone::load(&dir, options)?;
        match sparse_linear::find(&dir) {
            Some(path) => {
                let head = SparseLinear::load(
                    &path,
                    backbone.hidden_size,
                    backbone.dtype,
                    &backbone.device,
                )?;
                let weights = [weights, vec![path]].concat();
                Self::new(
                    backbone,
                    Head::BgeM3(head),
                    None,
                    Family::BgeM3,
                    &dir,
                    &weights,
                    options,
                )
            }
            None => {
                let head = Head::Splade(splade_head(&backbone, &dir, &pooling_dir(&dir)?)?);
                Self::new(
                    backbone,
                    head,
                    None,
                    Family::Splade,
                    &dir,
                    &weights,
                    options,
                )
            }
        }
    }

    /// sentence-transformers' Router: `query` a `SparseStaticEmbedding`, `document` a
    /// fill-mask Transformer and a `SpladePooling`.
    fn load_router(dir: PathBuf, options: &LoadOptions) -> Result<Self, EmbedError> {
        let path = dir.join("router_config.json");
        let config = read_json(&path)?.unwrap_or(Value::Null);
        let invalid = |what: &str| {
            EmbedError::InvalidModel(format!(
                "{}: {what}; supported: inference-free SPLADE, a query route of one \
                 SparseStaticEmbedding and a document route of a Transformer and a SpladePooling",
                path.display()
            ))
        };
        let route = |name: &str| -> Result<Vec<(String, String)>, EmbedError> {
            let modules = config
                .pointer(&format!("/structure/{name}"))
                .and_then(Value::as_array)
                .ok_or_else(|| invalid(&format!("no {name} route")))?;
            modules
                .iter()
                .map(|m| {
                    let m = m
                        .as_str()
                        .ok_or_else(|| invalid("a module name is not a string"))?;
                    let kind = config
                        .pointer(&format!("/types/{m}"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    Ok((
                        m.to_string(),
                        kind.rsplit('.').next().unwrap_or("").to_string(),
                    ))
                })
                .collect()
        };
        let query = route("query")?;
        let document = route("document")?;
        let (query_dir, transformer_dir, pooling_dir) =
            match (query.as_slice(), document.as_slice()) {
                ([(q, qk)], [(t, tk), (p, pk)])
                    if qk == "SparseStaticEmbedding"
                        && (tk == "Transformer" || tk == "MLMTransformer")
                        && pk == "SpladePooling" =>
                {
                    (dir.join(q), dir.join(t), dir.join(p))
                }
                _ => return Err(invalid(&format!("routes {query:?} and {document:?}"))),
            };
        let transformer_dir = model_dir::check_files(transformer_dir)?;
        let backbone = Backbone::load(&transformer_dir, options)?;
        let head = Head::Splade(splade_head(
            &backbone,
            &transformer_dir,
            &Some(pooling_dir),
        )?);
        let vocab = vocab_size(&backbone)?;
        let (query, query_weights) =
            token_weights(&query_dir, vocab, backbone.settings.max_tokens)?;
        let weights = [transformer_dir.join("model.safetensors"), query_weights];
        Self::new(
            backbone,
            head,
            Some(query),
            Family::InferenceFreeSplade,
            &dir,
            &weights,
            options,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        backbone: Backbone,
        head: Head,
        query: Option<TokenWeights>,
        family: Family,
        dir: &Path,
        weights: &[PathBuf],
        options: &LoadOptions,
    ) -> Result<Self, EmbedError> {
        let vocab_size = vocab_size(&backbone)?;
        let special = backbone
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        Ok(Self {
            encoder: backbone.encoder,
            head,
            tokenizer: backbone.tokenizer,
            query,
            special,
            device: backbone.device,
            family,
            vocab_size,
            max_tokens: backbone.settings.max_tokens,
            max_batch_tokens: backbone.max_batch_tokens,
            model_id: model_dir::model_id(dir),
            model_revision: combined_digest(weights)?,
            dtype: options.dtype.clone(),
            device_name: backbone.device_name,
            dir: dir.to_path_buf(),
        })
    }

    /// Sparse vectors of documents, in input order. Texts past `max_tokens` are
    /// truncated; an empty text gives what its special tokens give (no special token
    /// is ever an index), often nothing.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<SparseVector>, EmbedError> {
        let mut out = vec![SparseVector::default(); texts.len()];
        for (group_index, group) in texts.chunks(TOKENIZE_GROUP).enumerate() {
            let offset = group_index * TOKENIZE_GROUP;
            let encodings = self
                .tokenizer
                .encode_batch(group.to_vec(), true)
                .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
            for batch in pack_batches(&encodings, self.max_batch_tokens) {
                let rows: Vec<&Encoding> = batch.iter().map(|&i| &encodings[i]).collect();
                let vectors = self.forward(&rows)?;
                for (index, vector) in batch.into_iter().zip(vectors) {
                    out[offset + index] = vector;
                }
            }
        }
        Ok(out)
    }

    /// Sparse vectors of queries: as [`embed`](Self::embed), except for inference-free
    /// SPLADE, whose queries get their tokens' weights without running a model.
    pub fn embed_queries(&self, texts: &[&str]) -> Result<Vec<SparseVector>, EmbedError> {
        match &self.query {
            None => self.embed(texts),
            Some(query) => query.embed(texts, &self.special),
        }
    }

    fn forward(&self, rows: &[&Encoding]) -> Result<Vec<SparseVector>, EmbedError> {
        let padded = Padded::new(rows, &self.device)?;
        let hidden = self.encoder.forward(&padded.ids, &padded.mask)?;
        match &self.head {
            Head::Splade(splade) => rows
                .iter()
                .enumerate()
                .map(|(row, encoding)| {
                    let states = hidden.get(row)?.narrow(0, 0, encoding.len())?;
                    self.splade_row(splade, &states)
                })
                .collect(),
            Head::BgeM3(linear) => {
                let weights = linear.forward(&hidden)?.to_vec2::<f32>()?;
                Ok(rows
                    .iter()
                    .zip(weights)
                    .map(|(encoding, weights)| {
                        largest_per_id(encoding.get_ids(), &weights, &self.special)
                    })
                    .collect())
            }
        }
    }

    /// One text's SPLADE vector from its token states `[tokens, hidden]`.
    fn splade_row(&self, splade: &Splade, states: &Tensor) -> Result<SparseVector, EmbedError> {
        let tokens = states.dim(0)?;
        // log(1 + relu(x)) never decreases as x grows: the max of the activated logits
        // is the activated max, so max pooling activates one row instead of every token.
        let activated = |x: Tensor| activate(x, splade.twice);
        let mut pooled: Option<Tensor> = None;
        for start in (0..tokens).step_by(LOGIT_ROWS) {
            let logits =
                splade
                    .head
                    .forward(&states.narrow(0, start, LOGIT_ROWS.min(tokens - start))?)?;
            let part = match splade.pool {
                Pool::Max => logits.max(0)?,
                Pool::Sum => activated(logits)?.sum(0)?,
            };
            pooled = Some(match (pooled, splade.pool) {
                (None, _) => part,
                (Some(p), Pool::Max) => p.maximum(&part)?,
                (Some(p), Pool::Sum) => (p + part)?,
            });
        }
        let Some(pooled) = pooled else {
            return Ok(SparseVector::default());
        };
        let pooled = match splade.pool {
            Pool::Max => activated(pooled)?,
            Pool::Sum => pooled,
        };
        let weights = pooled.to_vec1::<f32>()?;
        Ok(SparseVector::from_map(
            weights
                .into_iter()
                .enumerate()
                .map(|(id, w)| (id as u32, w))
                .filter(|(id, w)| *w > 0.0 && !self.special.contains(id))
                .collect(),
        ))
    }
}

impl TokenWeights {
    fn embed(
        &self,
        texts: &[&str],
        special: &HashSet<u32>,
    ) -> Result<Vec<SparseVector>, EmbedError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok(encodings
            .iter()
            .map(|encoding| {
                SparseVector::from_map(
                    encoding
                        .get_ids()
                        .iter()
                        .filter(|&&id| !special.contains(&id))
                        .filter_map(|&id| {
                            let w = *self.weights.get(id as usize)?;
                            (w != 0.0).then_some((id, w))
                        })
                        .collect(),
                )
            })
            .collect())
    }
}

/// BGE-M3: the largest positive weight of each token id, special tokens left out.
fn largest_per_id(ids: &[u32], weights: &[f32], special: &HashSet<u32>) -> SparseVector {
    let mut best: BTreeMap<u32, f32> = BTreeMap::new();
    for (&id, &w) in ids.iter().zip(weights) {
        if w > 0.0 && !special.contains(&id) {
            let entry = best.entry(id).or_insert(w);
            *entry = entry.max(w);
        }
    }
    SparseVector::from_map(best)
}

/// SPLADE's activation: log(1 + relu(x)), and once more for `log1p_relu`.
fn activate(x: Tensor, twice: bool) -> candle_core::Result<Tensor> {
    let once = (x.relu()? + 1.0)?.log()?;
    if twice {
        (once + 1.0)?.log()
    } else {
        Ok(once)
    }
}

fn vocab_size(backbone: &Backbone) -> Result<usize, EmbedError> {
    super::config::size(&backbone.config, &["vocab_size"])
}

/// The SpladePooling module's directory named by `modules.json`, if any.
fn pooling_dir(dir: &Path) -> Result<Option<PathBuf>, EmbedError> {
    let modules = read_json(&dir.join("modules.json"))?;
    Ok(modules
        .as_ref()
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|m| {
            m.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("SpladePooling"))
        })
        .and_then(|m| m.get("path").and_then(Value::as_str))
        .map(|p| dir.join(p)))
}

/// The masked-LM head of `backbone` with the pooling that `pooling_dir`'s config.json
/// names (max and relu, SPLADE v2 and v3's, without one).
fn splade_head(
    backbone: &Backbone,
    dir: &Path,
    pooling_dir: &Option<PathBuf>,
) -> Result<Splade, EmbedError> {
    let not_sparse = |e: EmbedError| {
        EmbedError::InvalidModel(format!(
            "{} is not a sparse model: a sparse model is SPLADE (a masked-LM checkpoint, \
             with SpladePooling), inference-free SPLADE (router_config.json) or BGE-M3 \
             (sparse_linear.pt beside the encoder) ({e})",
            dir.display()
        ))
    };
    let config = &backbone.config;
    let hidden = backbone.hidden_size;
    let vocab = vocab_size(backbone)?;
    let eps = config
        .get("layer_norm_eps")
        .and_then(Value::as_f64)
        .unwrap_or(1e-12);
    let act = config
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("gelu");
    let head = MlmHead::load(&backbone.vb, hidden, vocab, eps, act).map_err(not_sparse)?;
    let pooling = match pooling_dir {
        Some(dir) => read_json(&dir.join("config.json"))?,
        None => None,
    };
    let field = |key: &str, default: &str| -> String {
        pooling
            .as_ref()
            .and_then(|c| c.get(key))
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let pool = match field("pooling_strategy", "max").as_str() {
        "max" => Pool::Max,
        "sum" => Pool::Sum,
        other => {
            return Err(EmbedError::InvalidModel(format!(
                "SpladePooling pooling_strategy {other:?} is not supported (max, sum)"
            )))
        }
    };
    let twice = match field("activation_function", "relu").as_str() {
        "relu" => false,
        "log1p_relu" => true,
        other => {
            return Err(EmbedError::InvalidModel(format!(
                "SpladePooling activation_function {other:?} is not supported (relu, log1p_relu)"
            )))
        }
    };
    Ok(Splade { head, pool, twice })
}

/// The query side's weights and tokenizer, and the file the weights came from.
fn token_weights(
    dir: &Path,
    vocab: usize,
    max_tokens: usize,
) -> Result<(TokenWeights, PathBuf), EmbedError> {
    let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
    let limit = tokenizer_config
        .as_ref()
        .and_then(|c| c.get("model_max_length"))
        .and_then(Value::as_f64)
        .filter(|n| *n < 1e6)
        .map_or(max_tokens, |n| n as usize);
    let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), limit)?;
    let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
    // Weights saved as a tensor, or as sentence-transformers' idf.json of token → weight.
    let json = config
        .get("path")
        .and_then(Value::as_str)
        .filter(|p| p.ends_with(".json"))
        .map(|p| dir.join(p))
        .or_else(|| Some(dir.join("idf.json")).filter(|p| p.is_file()));
    let (weights, path) = match json {
        Some(path) => {
            let idf = read_json(&path)?
                .and_then(|v| v.as_object().cloned())
                .ok_or_else(|| {
                    EmbedError::InvalidModel(format!(
                        "{}: not a JSON object of token weights",
                        path.display()
                    ))
                })?;
            let mut weights = vec![0f32; vocab];
            for (token, weight) in idf {
                if let (Some(id), Some(w)) = (tokenizer.token_to_id(&token), weight.as_f64()) {
                    if let Some(slot) = weights.get_mut(id as usize) {
                        *slot = w as f32;
                    }
                }
            }
            (weights, path)
        }
        None => {
            let path = dir.join("model.safetensors");
            let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
                .map_err(|e| EmbedError::InvalidModel(format!("{}: {e}", path.display())))?;
            let weight = tensors.get("weight").ok_or_else(|| {
                EmbedError::InvalidModel(format!("{} has no tensor \"weight\"", path.display()))
            })?;
            let weights = weight
                .to_dtype(candle_core::DType::F32)
                .and_then(|w| w.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| EmbedError::InvalidModel(format!("{}: {e}", path.display())))?;
            if weights.len() != vocab {
                return Err(EmbedError::InvalidModel(format!(
                    "{}: {} token weights for a vocabulary of {vocab}",
                    path.display(),
                    weights.len()
                )));
            }
            (weights, path)
        }
    };
    Ok((TokenWeights { weights, tokenizer }, path))
}

/// One fingerprint of several weight files: the single file's digest, else the first
/// 16 hex digits of the SHA-256 of their digests.
fn combined_digest(paths: &[PathBuf]) -> Result<String, EmbedError> {
    let digests = paths
        .iter()
        .map(|p| file_digest(p))
        .collect::<Result<Vec<_>, _>>()?;
    if let [one] = digests.as_slice() {
        return Ok(one.clone());
    }
    let hash = Sha256::digest(digests.join(":").as_bytes());
    Ok(hash.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pooling_may_activate_after_the_max() -> candle_core::Result<()> {
        let logits = Tensor::randn(0f32, 2.0, (9, 40), &Device::Cpu)?;
        for twice in [false, true] {
            let first = activate(logits.clone(), twice)?.max(0)?.to_vec1::<f32>()?;
            let after = activate(logits.max(0)?, twice)?.to_vec1::<f32>()?;
            assert_eq!(first, after);
            assert!(first.iter().all(|w| *w >= 0.0));
        }
        Ok(())
    }

    #[test]
    fn bge_m3_keeps_the_largest_positive_weight_per_token() {
        let special = HashSet::from([0, 2]);
        let vector = largest_per_id(
            &[0, 7, 5, 7, 9, 2, 5],
            &[3.0, 0.5, 0.0, 1.5, -1.0, 4.0, 0.25],
            &special,
        );
        assert_eq!(vector.indices, vec![5, 7]);
        assert_eq!(vector.values, vec![0.25, 1.5]);
    }

    #[test]
    fn one_weight_file_keeps_its_own_digest() -> Result<(), EmbedError> {
        let dir = std::env::temp_dir().join(format!("sparse-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"one")?;
        std::fs::write(&b, b"two")?;
        let single = combined_digest(std::slice::from_ref(&a))?;
        assert_eq!(single, file_digest(&a)?);
        let both = combined_digest(&[a.clone(), b.clone()])?;
        assert_ne!(both, single);
        assert_ne!(both, combined_digest(&[b, a])?);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
