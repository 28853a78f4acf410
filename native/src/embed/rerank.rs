//! Cross-encoder rerankers: the query and a text through one encoder together, a
//! classification head on the first token, one relevance score per text. BERT
//! (`BertForSequenceClassification`, ms-marco-MiniLM's shape, token types telling
//! query from text) and XLM-RoBERTa (`XLMRobertaForSequenceClassification`,
//! bge-reranker's). The score is the logit after the activation sentence-transformers'
//! `CrossEncoder` applies: the one saved with the model, else a sigmoid.

use std::path::PathBuf;

use candle_core::Device;
use serde_json::Value;
use tokenizers::Encoding;

use super::encoder::Encoder;
use super::heads::classifier::Classifier;
use super::{pack_batches, Backbone, LoadOptions, Padded};
use crate::error::EmbedError;
use crate::model_dir::{self, read_json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreActivation {
    Identity,
    Sigmoid,
    Tanh,
}

impl ScoreActivation {
    pub fn name(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Sigmoid => "sigmoid",
            Self::Tanh => "tanh",
        }
    }

    fn apply(self, x: f32) -> f32 {
        match self {
            Self::Identity => x,
            Self::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Self::Tanh => x.tanh(),
        }
    }
}

pub struct Reranker {
    encoder: Box<dyn Encoder>,
    head: Classifier,
    /// Truncates pairs longest first at `max_tokens`, as transformers does.
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    pub activation: ScoreActivation,
    pub max_tokens: usize,
    pub max_batch_tokens: usize,
    pub model_id: String,
    pub model_revision: String,
    pub dtype: String,
    pub device_name: String,
    pub dir: PathBuf,
}

impl Reranker {
    pub fn load(model: &str, options: &LoadOptions) -> Result<Self, EmbedError> {
        let dir = model_dir::locate(model, &options.hub_caches)?;
        let backbone = Backbone::load(&dir, options)?;
        let head = Classifier::load(&backbone.vb, backbone.hidden_size).map_err(|e| {
            EmbedError::InvalidModel(format!("{} is not a cross-encoder: {e}", dir.display()))
        })?;
        if head.labels != 1 {
            return Err(EmbedError::InvalidModel(format!(
                "{}: a reranker gives one score per text; this classifier has {} labels",
                dir.display(),
                head.labels
            )));
        }
        let activation = activation(&dir, &backbone.config)?;
        Ok(Self {
            encoder: backbone.encoder,
            head,
            tokenizer: backbone.tokenizer,
            device: backbone.device,
            activation,
            max_tokens: backbone.settings.max_tokens,
            max_batch_tokens: backbone.max_batch_tokens,
            model_id: model_dir::model_id(&dir),
            model_revision: backbone.revision,
            dtype: options.dtype.clone(),
            device_name: backbone.device_name,
            dir,
        })
    }

    /// The relevance of each text to `query`, in input order. A pair past
    /// `max_tokens` is truncated longest first, as sentence-transformers does.
    pub fn score(&self, query: &str, texts: &[&str]) -> Result<Vec<f32>, EmbedError> {
        let pairs: Vec<(&str, &str)> = texts.iter().map(|t| (query, *t)).collect();
        let encodings = self
            .tokenizer
            .encode_batch(pairs, true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        let mut scores = vec![0f32; texts.len()];
        for batch in pack_batches(&encodings, self.max_batch_tokens) {
            let rows: Vec<&Encoding> = batch.iter().map(|&i| &encodings[i]).collect();
            let padded = Padded::new(&rows, &self.device)?;
            let hidden = self
                .encoder
                .forward_typed(&padded.ids, &padded.type_ids, &padded.mask)?;
            let logits = self
                .head
                .forward(&hidden)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (index, logit) in batch.into_iter().zip(logits) {
                scores[index] = self.activation.apply(logit);
            }
        }
        Ok(scores)
    }
}

/// The activation sentence-transformers saved with the model (in
/// `config_sentence_transformers.json`, or `config.json` as versions before 4 did), else
/// its default for one label: a sigmoid.
fn activation(dir: &std::path::Path, config: &Value) -> Result<ScoreActivation, EmbedError> {
    let st_config = read_json(&dir.join("config_sentence_transformers.json"))?;
    let named = st_config
        .as_ref()
        .and_then(|c| c.get("activation_fn"))
        .or_else(|| config.pointer("/sentence_transformers/activation_fn"))
        .or_else(|| config.get("sbert_ce_default_activation_function"))
        .and_then(Value::as_str);
    match named {
        None => Ok(ScoreActivation::Sigmoid),
        Some("torch.nn.modules.activation.Sigmoid") => Ok(ScoreActivation::Sigmoid),
        Some("torch.nn.modules.linear.Identity") => Ok(ScoreActivation::Identity),
        Some("torch.nn.modules.activation.Tanh") => Ok(ScoreActivation::Tanh),
        Some(other) => Err(EmbedError::InvalidModel(format!(
            "{}: activation_fn {other:?} is not supported (torch.nn.Sigmoid, Identity, Tanh)",
            dir.display()
        ))),
    }
}
