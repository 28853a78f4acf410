//! The sentence-transformers settings of a model directory: pooling, Dense modules,
//! normalisation, prompts and the sequence limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::EmbedError;
use crate::model_dir::read_json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
    /// The last token of each text (decoder embedders such as Qwen3-Embedding).
    LastToken,
    /// The masked sum divided by √(tokens).
    MeanSqrtLen,
}

impl Pooling {
    /// sentence-transformers' name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Cls => "cls",
            Self::Max => "max",
            Self::LastToken => "lasttoken",
            Self::MeanSqrtLen => "mean_sqrt_len_tokens",
        }
    }
}

/// What sentence-transformers would do with this model directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub pooling: Pooling,
    /// Whether a prompt's tokens count in mean and max pooling (`include_prompt`).
    pub include_prompt: bool,
    /// sentence-transformers' Dense modules, in order, between pooling and normalising.
    pub dense: Vec<DenseModule>,
    pub normalize: bool,
    /// Longest input in tokens, special tokens included.
    pub max_tokens: usize,
    /// Named prompts of `config_sentence_transformers.json`, and the one used by default.
    pub prompts: BTreeMap<String, String>,
    pub default_prompt_name: Option<String>,
}

/// A `Dense` module: a linear layer and its activation, read from its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenseModule {
    pub dir: PathBuf,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    /// Tanh (sentence-transformers' default) or the identity.
    pub tanh: bool,
}

/// Reads pooling, normalisation and the sequence limit from both layouts that
/// sentence-transformers writes, never from the tokenizer's baked-in truncation.
pub fn read(dir: &Path, max_position_embeddings: usize) -> Result<Settings, EmbedError> {
    let modules = read_json(&dir.join("modules.json"))?;
    let modules = modules
        .as_ref()
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let module_type = |m: &Value| {
        m.get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let normalize = modules
        .iter()
        .any(|m| module_type(m).ends_with("Normalize"));
    let pooling_dir = modules
        .iter()
        .find(|m| module_type(m).ends_with("Pooling"))
        .and_then(|m| m.get("path").and_then(Value::as_str))
        .unwrap_or("1_Pooling");
    let pooling_config = read_json(&dir.join(pooling_dir).join("config.json"))?;
    let pooling = match &pooling_config {
        Some(config) => pooling_mode(config)?,
        None => Pooling::Mean,
    };
    let include_prompt = pooling_config
        .as_ref()
        .and_then(|c| c.get("include_prompt"))
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let dense = modules
        .iter()
        .filter(|m| module_type(m).ends_with("Dense"))
        .map(|m| dense_module(&dir.join(m.get("path").and_then(Value::as_str).unwrap_or(""))))
        .collect::<Result<Vec<_>, _>>()?;
    let st_config = read_json(&dir.join("config_sentence_transformers.json"))?;
    let prompts: BTreeMap<String, String> = st_config
        .as_ref()
        .and_then(|c| c.get("prompts"))
        .and_then(Value::as_object)
        .map(|p| {
            p.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let default_prompt_name = st_config
        .as_ref()
        .and_then(|c| c.get("default_prompt_name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Some(name) = &default_prompt_name {
        if !prompts.contains_key(name) {
            return Err(EmbedError::InvalidModel(format!(
                "config_sentence_transformers.json: default_prompt_name {name:?} is not one of its prompts"
            )));
        }
    }

    let sbert = read_json(&dir.join("sentence_bert_config.json"))?;
    let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
    let from_sbert = sbert
        .as_ref()
        .and_then(|c| c.get("max_seq_length"))
        .and_then(Value::as_u64);
    let from_tokenizer = tokenizer_config
        .as_ref()
        .and_then(|c| c.get("model_max_length"))
        .and_then(Value::as_f64)
        // Tokenizers without a limit store a huge sentinel (int(1e30)).
        .filter(|n| *n < 1e6)
        .map(|n| n as u64);
    let max_tokens = from_sbert
        .or(from_tokenizer)
        .map(|n| n as usize)
        .unwrap_or(max_position_embeddings)
        .min(max_position_embeddings);
    Ok(Settings {
        pooling,
        include_prompt,
        dense,
        normalize,
        max_tokens,
        prompts,
        default_prompt_name,
    })
}

fn dense_module(dir: &Path) -> Result<DenseModule, EmbedError> {
    let config = read_json(&dir.join("config.json"))?
        .ok_or_else(|| EmbedError::InvalidModel(format!("{} has no config.json", dir.display())))?;
    let size = |key: &str| {
        config
            .get(key)
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| {
                EmbedError::InvalidModel(format!("{}/config.json: no number {key}", dir.display()))
            })
    };
    let tanh = match config
        .get("activation_function")
        .and_then(Value::as_str)
        .unwrap_or("torch.nn.modules.activation.Tanh")
    {
        "torch.nn.modules.activation.Tanh" => true,
        "torch.nn.modules.linear.Identity" => false,
        other => {
            return Err(EmbedError::InvalidModel(format!(
                "{}: Dense activation {other:?} is not supported (Tanh, Identity)",
                dir.display()
            )))
        }
    };
    if !dir.join("model.safetensors").is_file() {
        return Err(EmbedError::InvalidModel(format!(
            "{} has no model.safetensors (pytorch_model.bin is not read: convert it)",
            dir.display()
        )));
    }
    Ok(DenseModule {
        dir: dir.to_path_buf(),
        in_features: size("in_features")?,
        out_features: size("out_features")?,
        bias: config.get("bias").and_then(Value::as_bool).unwrap_or(true),
        tanh,
    })
}

fn pooling_mode(config: &Value) -> Result<Pooling, EmbedError> {
    const SUPPORTED: &str = "cls, mean, max, lasttoken, mean_sqrt_len_tokens";
    if let Some(mode) = config.get("pooling_mode").and_then(Value::as_str) {
        return match mode {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            "max" => Ok(Pooling::Max),
            "lasttoken" => Ok(Pooling::LastToken),
            "mean_sqrt_len_tokens" => Ok(Pooling::MeanSqrtLen),
            other => Err(EmbedError::InvalidModel(format!(
                "pooling mode {other:?} is not supported ({SUPPORTED})"
            ))),
        };
    }
    let flag = |key: &str| config.get(key).and_then(Value::as_bool).unwrap_or(false);
    let modes = [
        ("pooling_mode_cls_token", Some(Pooling::Cls)),
        ("pooling_mode_mean_tokens", Some(Pooling::Mean)),
        ("pooling_mode_max_tokens", Some(Pooling::Max)),
        (
            "pooling_mode_mean_sqrt_len_tokens",
            Some(Pooling::MeanSqrtLen),
        ),
        ("pooling_mode_weightedmean_tokens", None),
        ("pooling_mode_lasttoken", Some(Pooling::LastToken)),
    ];
    let on: Vec<_> = modes.iter().filter(|(key, _)| flag(key)).collect();
    match on.as_slice() {
        [(_, Some(pooling))] => Ok(*pooling),
        [] => Ok(Pooling::Mean),
        _ => Err(EmbedError::InvalidModel(format!(
            "pooling {:?} is not supported (one of {SUPPORTED})",
            on.iter().map(|(k, _)| *k).collect::<Vec<_>>()
        ))),
    }
}
