//! Reading an architecture's `config.json`: whole into a serde type, or field by
//! field where the spelling varies (transformers versions, the hub's remote code).

use serde_json::Value;

use crate::error::EmbedError;

pub fn parse<T: serde::de::DeserializeOwned>(config: &Value) -> Result<T, EmbedError> {
    serde_json::from_value(config.clone())
        .map_err(|e| EmbedError::InvalidModel(format!("config.json: {e}")))
}

/// The first of `keys` that `v` holds.
pub fn first<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| v.get(*k).filter(|x| !x.is_null()))
}

/// The first of `keys` as a size; an error naming them all if none is a number.
pub fn size(v: &Value, keys: &[&str]) -> Result<usize, EmbedError> {
    first(v, keys)
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| {
            EmbedError::InvalidModel(format!("config.json: no number {}", keys.join(" or ")))
        })
}
