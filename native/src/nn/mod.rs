//! Numeric building blocks that the embedding models and Whisper share: fused and
//! int8 linear layers, attention and GELU kernels, activations, rotary tables,
//! attention biases, packed batches, and which CPU kernels run. Nothing here knows a
//! model: architectures live in `embed::models` and `speech`.

pub mod activation;
pub mod attention_bias;
pub mod cpu;
pub mod dense;
pub mod kernels;
pub mod packed;
pub mod q8;
pub mod rotary;
