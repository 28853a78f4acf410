//! Finding a model's directory (a path, or a snapshot in a Hugging Face hub cache),
//! reading its JSON files, naming it and fingerprinting its weights.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::EmbedError;

/// Resolves `model` to a directory holding `config.json`, `model.safetensors` and
/// `tokenizer.json`: a path, or a hub id found in an offline Hugging Face cache.
pub fn locate(model: &str, hub_caches: &[PathBuf]) -> Result<PathBuf, EmbedError> {
    check_files(find(model, hub_caches)?)
}

/// Resolves `model` to a directory as [`locate`] does, without checking its files:
/// for layouts that keep the encoder in a subdirectory (sentence-transformers' Router).
pub fn find(model: &str, hub_caches: &[PathBuf]) -> Result<PathBuf, EmbedError> {
    let path = PathBuf::from(model);
    if path.is_dir() {
        return Ok(path);
    }
    if let Some((org, name)) = model
        .split_once('/')
        .filter(|_| !model.starts_with(['.', '/']))
    {
        for cache in hub_caches {
            let repo = cache.join(format!("models--{org}--{name}"));
            if let Some(snapshot) = hub_snapshot(&repo) {
                return Ok(snapshot);
            }
        }
    }
    Err(EmbedError::ModelNotFound(format!(
        "model {model:?} not found: not a directory, and not in a Hugging Face hub cache \
         (looked in {}). Give a local directory with config.json, model.safetensors and \
         tokenizer.json, or run `embedstream models pull` for the default model.",
        hub_caches
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// The snapshot that `refs/main` names, else the only or newest one.
fn hub_snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

pub fn check_files(dir: PathBuf) -> Result<PathBuf, EmbedError> {
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !dir.join(file).is_file() {
            return Err(EmbedError::ModelNotFound(format!(
                "{} has no {file}: a model directory needs config.json, model.safetensors and tokenizer.json",
                dir.display()
            )));
        }
    }
    Ok(dir)
}

/// A stable name: the id written by `embedstream models pull`, the hub id of a
/// cache snapshot, else the directory name.
pub fn model_id(dir: &Path) -> String {
    if let Some(id) = read_json(&dir.join("embedstream.json"))
        .ok()
        .flatten()
        .and_then(|v| v.get("model_id").and_then(Value::as_str).map(str::to_owned))
    {
        return id;
    }
    let parts: Vec<_> = dir
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(pos) = parts.iter().rposition(|p| p == "snapshots") {
        if let Some(repo) = pos
            .checked_sub(1)
            .and_then(|i| parts[i].strip_prefix("models--"))
        {
            return repo.replacen("--", "/", 1);
        }
    }
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

pub fn read_json(path: &Path) -> Result<Option<Value>, EmbedError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| EmbedError::InvalidModel(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
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
    Ok(hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}
