//! Numeric building blocks that the text encoders and Whisper share. Nothing here
//! knows a model: the architectures live in `embed::models` and `speech`.

pub mod activation;
pub mod attention_bias;
pub mod bf16;
pub mod cpu;
pub mod cpu_op;
pub mod dense;
pub mod gemm;
pub mod kernels;
pub mod packed;
pub mod q8;
pub mod rotary;
pub mod tiled;
