//! Cross-encoder rerankers: the query and a text through one encoder together, a
//! classification head on the first token, one relevance score per text. BERT
//! (`BertForSequenceClassification`, ms-marco-MiniLM's shape, token types telling
//! query from text) and XLM-RoBERTa (`XLMRobertaForSequenceClassification`,
//! bge-reranker's). The score is the logit after the activation sentence-transformers'
//! `CrossEncoder` applies: the one saved with the model, else a sigmoid.
//!
//! LLM rerankers (Qwen3-Reranker, a `Qwen3ForCausalLM`) read the query and the text in
//! the chat template of their model card and score P("yes") against "no" as the next
//! token (see [`YesNo`]).

use std::path::PathBuf;

use candle_core::Device;
use serde_json::Value;
use tokenizers::{Encoding, TruncationDirection};

use super::encoder::Encoder;
use super::heads::classifier::Classifier;
use super::heads::yes_no::YesNo;
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

/// Qwen3-Reranker's chat template (its model card): the system prompt before, the
/// instruction, query and document as the user's turn, an empty thought after.
const LLM_PREFIX: &str = "<|im_start|>system\nJudge whether the Document meets the requirements \
based on the Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".\
<|im_end|>\n<|im_start|>user\n";
const LLM_SUFFIX: &str = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
/// The model card's default instruction.
const LLM_INSTRUCTION: &str =
    "Given a web search query, retrieve relevant passages that answer the query";

enum Head {
    /// A sequence-classification head on the first token (BERT, XLM-RoBERTa).
    Classifier(Classifier),
    /// A causal LM's "yes" against "no" at the last token, with the template's tokens
    /// around each pair.
    YesNo {
        head: YesNo,
        prefix: Box<Encoding>,
        suffix: Box<Encoding>,
    },
}

pub struct Reranker {
    encoder: Box<dyn Encoder>,
    head: Head,
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
        let (head, activation) = if is_causal_lm(&backbone.config) {
            (llm_head(&dir, &backbone)?, ScoreActivation::Sigmoid)
        } else {
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
            (Head::Classifier(head), activation(&dir, &backbone.config)?)
        };
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
        let encodings = self.encode(query, texts)?;
        let mut scores = vec![0f32; texts.len()];
        for batch in pack_batches(&encodings, self.max_batch_tokens) {
            let rows: Vec<&Encoding> = batch.iter().map(|&i| &encodings[i]).collect();
            let padded = Padded::new(&rows, &self.device)?;
            let logits = match &self.head {
                Head::Classifier(head) => {
                    let hidden =
                        self.encoder
                            .forward_typed(&padded.ids, &padded.type_ids, &padded.mask)?;
                    head.forward(&hidden)?.flatten_all()?.to_vec1::<f32>()?
                }
                Head::YesNo { head, .. } => {
                    // Padding comes after each row's tokens, which a causal mask keeps
                    // from the last one.
                    let hidden = self.encoder.forward(&padded.ids, &padded.mask)?;
                    let lengths: Vec<usize> = rows.iter().map(|e| e.len()).collect();
                    head.forward(&hidden, &lengths)?
                }
            };
            for (index, logit) in batch.into_iter().zip(logits) {
                scores[index] = self.activation.apply(logit);
            }
        }
        Ok(scores)
    }

    /// Each (query, text) as the model reads it: a pair with the tokenizer's special
    /// tokens, or for an LLM the template's tokens around the pair's text, which alone
    /// is truncated (at its end, as the model card's code does).
    fn encode(&self, query: &str, texts: &[&str]) -> Result<Vec<Encoding>, EmbedError> {
        let tokenizer_error = |e: tokenizers::Error| EmbedError::Tokenizer(e.to_string());
        let Head::YesNo { prefix, suffix, .. } = &self.head else {
            let pairs: Vec<(&str, &str)> = texts.iter().map(|t| (query, *t)).collect();
            return self
                .tokenizer
                .encode_batch(pairs, true)
                .map_err(tokenizer_error);
        };
        let limit = self.max_tokens.saturating_sub(prefix.len() + suffix.len());
        let inputs: Vec<String> = texts
            .iter()
            .map(|t| format!("<Instruct>: {LLM_INSTRUCTION}\n<Query>: {query}\n<Document>: {t}"))
            .collect();
        let encoded = self
            .tokenizer
            .encode_batch(inputs, false)
            .map_err(tokenizer_error)?;
        Ok(encoded
            .into_iter()
            .map(|mut pair| {
                pair.truncate(limit, 0, TruncationDirection::Right);
                Encoding::merge([(**prefix).clone(), pair, (**suffix).clone()], false)
            })
            .collect())
    }
}

/// Whether `config.json` names a causal LM (Qwen3-Reranker is a `Qwen3ForCausalLM`).
fn is_causal_lm(config: &Value) -> bool {
    config
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|x| x.as_str().is_some_and(|x| x.ends_with("ForCausalLM")))
        })
}

/// The head of an LLM reranker: its "yes" and "no" tokens (single tokens of its
/// vocabulary) and the template's tokens.
fn llm_head(dir: &std::path::Path, backbone: &Backbone) -> Result<Head, EmbedError> {
    let token = |word: &str| {
        backbone.tokenizer.token_to_id(word).ok_or_else(|| {
            EmbedError::InvalidModel(format!(
                "{}: an LLM reranker answers \"yes\" or \"no\", but {word:?} is not one token \
                 of its vocabulary",
                dir.display()
            ))
        })
    };
    let tied = backbone
        .config
        .get("tie_word_embeddings")
        .and_then(Value::as_bool);
    let head = YesNo::load(&backbone.vb, token("yes")?, token("no")?, tied)?;
    let encode = |text: &str| {
        backbone
            .tokenizer
            .encode(text, false)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))
    };
    let (prefix, suffix) = (encode(LLM_PREFIX)?, encode(LLM_SUFFIX)?);
    if prefix.len() + suffix.len() >= backbone.settings.max_tokens {
        return Err(EmbedError::InvalidModel(format!(
            "{}: the reranker's template takes {} of its {} tokens",
            dir.display(),
            prefix.len() + suffix.len(),
            backbone.settings.max_tokens
        )));
    }
    Ok(Head::YesNo {
        head,
        prefix: Box::new(prefix),
        suffix: Box::new(suffix),
    })
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
