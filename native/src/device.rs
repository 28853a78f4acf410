//! Device and dtype selection for every model we load.

use candle_core::{DType, Device};

use crate::error::EmbedError;
use crate::nn::dense::LinearKind;
use crate::nn::{bf16, cpu, q8};

/// Resolves `"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"` (the first GPU when this build
/// has CUDA and a GPU answers, else the CPU) to a device and its canonical name.
pub fn select_device(name: &str) -> Result<(Device, String), EmbedError> {
    let cuda_index = match name {
        "cpu" => return Ok((Device::Cpu, "cpu".into())),
        "auto" => {
            return Ok(match cuda_device(0) {
                Ok(device) => (device, "cuda:0".into()),
                Err(_) => (Device::Cpu, "cpu".into()),
            })
        }
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                EmbedError::Unsupported(format!(
                    "device {other:?}: expected \"cpu\", \"cuda\", \"cuda:N\" or \"auto\""
                ))
            })?,
    };
    Ok((cuda_device(cuda_index)?, format!("cuda:{cuda_index}")))
}

fn cuda_device(index: usize) -> Result<Device, EmbedError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(EmbedError::Unsupported(
            "this build has no CUDA support: build the wheel with deploy/cuda/build-wheel.sh"
                .into(),
        ));
    }
    Device::new_cuda(index).map_err(|e| {
        // candle appends a backtrace to driver errors: keep the first line.
        let reason = e.to_string();
        let reason = reason.lines().next().unwrap_or_default().to_owned();
        EmbedError::Unsupported(format!("cuda:{index} is not usable: {reason}"))
    })
}

/// Parses a dtype name for `device` into the float dtype of the weights and how the
/// linear layers run: f32 everywhere; f16 and bf16 on GPUs through candle (its CPU
/// kernels for them are slower than f32); on the CPU, q8 (int8 linear layers, f32
/// elsewhere) with AVX2 (AVX-512 VNNI where there is) and bf16 (bf16 linear layers,
/// f32 elsewhere) with AVX512_BF16. Reads `EMBEDSTREAM_CPU_KERNELS` for this and
/// every later kernel call.
pub fn select_dtype(name: &str, device: &Device) -> Result<(DType, LinearKind), EmbedError> {
    cpu::configure()?;
    let dtype = match name {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" if device.is_cpu() => {
            bf16::check_supported()?;
            return Ok((DType::F32, LinearKind::Bf16));
        }
        "bf16" => DType::BF16,
        "q8" if device.is_cpu() => {
            q8::check_supported()?;
            return Ok((DType::F32, LinearKind::Int8));
        }
        "q8" => {
            return Err(EmbedError::Unsupported(
                "dtype \"q8\" is for the CPU; on a GPU use \"bf16\"".into(),
            ))
        }
        other => {
            return Err(EmbedError::Unsupported(format!(
                "dtype {other:?}: expected \"f32\", \"f16\", \"bf16\" or \"q8\""
            )))
        }
    };
    if dtype != DType::F32 && device.is_cpu() {
        return Err(EmbedError::Unsupported(format!(
            "dtype {name:?} needs a GPU device; on the CPU use \"f32\", \"bf16\" or \"q8\""
        )));
    }
    Ok((dtype, LinearKind::Float))
}
