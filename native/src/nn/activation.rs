//! The feed-forward activations that Hugging Face configurations name in `hidden_act`.

use candle_core::{Result, Tensor};

use super::kernels;
use crate::error::EmbedError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// The exact, erf-based GELU (`"gelu"`).
    Gelu,
    /// The tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`).
    GeluTanh,
    /// `x · σ(1.702 x)`, OpenAI CLIP's (`"quick_gelu"`).
    QuickGelu,
    Relu,
    /// `x · σ(x)` (`"silu"`, `"swish"`): the gate of SwiGLU layers.
    Silu,
}

impl Activation {
    /// Every name we accept, for error messages.
    pub const NAMES: &'static str =
        "gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, quick_gelu, relu, silu";

    /// `section` names where the value came from (`"vision_config"`), for the error.
    pub fn parse(name: &str, section: &str) -> std::result::Result<Self, EmbedError> {
        match name {
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "quick_gelu" => Ok(Self::QuickGelu),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(EmbedError::InvalidModel(format!(
                "{section}.hidden_act {other:?} is not supported ({})",
                Self::NAMES
            ))),
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => kernels::gelu_erf(x),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Relu => x.relu(),
            Self::Silu => candle_nn::ops::silu(x),
        }
    }

    /// `activation(x) · y`: a gated unit whose gate and input are two projections.
    pub fn times(self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => kernels::activated_times(x, y, false),
            Self::Silu => kernels::activated_times(x, y, true),
            _ => self.apply(x)? * y,
        }
    }

    /// `activation(x[.., :n]) · x[.., n:]` for `x` `[.., 2n]`: a gated unit whose one
    /// projection holds the input, then its gate (ModernBERT's `Wi`).
    pub fn gated(self, x: &Tensor) -> Result<Tensor> {
        if self == Self::Gelu {
            return kernels::gelu_gated(x);
        }
        let last = x.rank() - 1;
        let n = x.dim(last)? / 2;
        self.apply(&x.narrow(last, 0, n)?)? * x.narrow(last, n, n)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_map_to_their_functions() {
        let x = Tensor::new(&[-2.0f32, -0.5, 0.0, 0.7, 3.0], &Device::Cpu).unwrap();
        let values = |a: Activation| a.apply(&x).unwrap().to_vec1::<f32>().unwrap();
        let quick: Vec<f32> = [-2.0f32, -0.5, 0.0, 0.7, 3.0]
            .iter()
            .map(|v| v / (1.0 + (-1.702 * v).exp()))
            .collect();
        for (got, want) in values(Activation::parse("quick_gelu", "t").unwrap())
            .iter()
            .zip(&quick)
        {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(
            values(Activation::parse("relu", "t").unwrap()),
            vec![0.0, 0.0, 0.0, 0.7, 3.0]
        );
        // GELU(0.7): 0.530 625 exact, 0.530 570 by the tanh approximation.
        assert!((values(Activation::Gelu)[3] - 0.530_625).abs() < 2e-5);
        assert!(
            (values(Activation::parse("gelu_pytorch_tanh", "t").unwrap())[3] - 0.530_570).abs()
                < 2e-5
        );
        let err = Activation::parse("banana", "vision_config")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vision_config.hidden_act") && err.contains("quick_gelu"),
            "{err}"
        );
    }
}
