//! The architectures, one file each. Only `embed::dispatch` reaches into them; the
//! CLIP embedder is re-exported for the bindings.

pub(super) mod bert;
mod clip;
pub(super) mod modernbert;
pub(super) mod qwen3;
pub(super) mod rotary_bert;
pub(super) mod xlm_roberta;

pub use clip::ClipEmbedder;
