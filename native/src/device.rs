//! Device and dtype selection for every model we load.

use candle_core::{DType, Device};

use crate::error::EmbedError;
use crate::nn::{cpu, q8};

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

/// Parses a dtype name for `device` into the float dtype of the weights and whether
/// the linear layers are quantized: f32 everywhere; f16 and bf16 on GPUs only, since
/// candle's CPU kernels for them are slower than f32; q8 (int8 linear layers, f32
/// elsewhere) on CPUs with AVX2 (AVX-512 VNNI where there is). Reads
/// `EMBEDSTREAM_CPU_KERNELS` for this and every later kernel call.
pub fn select_dtype(name: &str, device: &Device) -> Result<(DType, bool), EmbedError> {
    cpu::configure()?;
    let dtype = match name {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "q8" if device.is_cpu() => {
            q8::check_supported()?;
            return Ok((DType::F32, true));
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
            "dtype {name:?} needs a GPU device; on the CPU use \"f32\" or \"q8\""
        )));
    }
    Ok((dtype, false))
}
