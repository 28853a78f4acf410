//! BGE-M3's sparse head: one linear layer from each token's hidden state to a weight,
//! `relu(sparse_linear(h))`, kept beside the XLM-RoBERTa encoder as `sparse_linear.pt`
//! (a PyTorch state dict; read by candle's restricted unpickler, which runs no code)
//! or as `sparse_linear.safetensors`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Linear;

use crate::error::EmbedError;

pub struct SparseLinear {
    linear: Linear,
}

/// The head's file in `dir`, if the directory has one.
pub fn find(dir: &Path) -> Option<PathBuf> {
    ["sparse_linear.safetensors", "sparse_linear.pt"]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
}

impl SparseLinear {
    pub fn load(
        path: &Path,
        hidden: usize,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, EmbedError> {
        let invalid =
            |e: candle_core::Error| EmbedError::InvalidModel(format!("{}: {e}", path.display()));
        let tensors: Vec<(String, Tensor)> = if path.extension().is_some_and(|e| e == "safetensors")
        {
            candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(invalid)?
                .into_iter()
                .collect()
        } else {
            candle_core::pickle::read_all(path).map_err(invalid)?
        };
        let get = |name: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| {
                    EmbedError::InvalidModel(format!("{} has no tensor {name:?}", path.display()))
                })
        };
        let weight = get("weight")?;
        if weight.dims() != [1, hidden] {
            return Err(EmbedError::InvalidModel(format!(
                "{}: weight of shape {:?} where [1, {hidden}] was expected",
                path.display(),
                weight.dims()
            )));
        }
        let bias = get("bias").ok();
        let on_device = |t: Tensor| t.to_dtype(dtype)?.to_device(device);
        Ok(Self {
            linear: Linear::new(
                on_device(weight).map_err(invalid)?,
                bias.map(on_device).transpose().map_err(invalid)?,
            ),
        })
    }

    /// Each token's weight `[batch, tokens]` in f32, relu applied, of hidden states
    /// `[batch, tokens, hidden]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        self.linear
            .forward(&hidden.to_dtype(self.linear.weight().dtype())?)?
            .squeeze(2)?
            .relu()?
            .to_dtype(DType::F32)
    }
}
