//! Which of our SIMD kernels run: the best this CPU has, or the path that
//! `EMBEDSTREAM_CPU_KERNELS` (`auto`, `portable`, `avx2`, `avx512`) forces, so that
//! tests cover every path the CPU supports and benchmarks can measure the AVX2 path
//! on an AVX-512 machine.
//!
//! The choice is process-wide and read again at every model load. It covers the
//! kernels this crate writes (q8 matrix products, attention rows, GELU); the `gemm`
//! crate under candle picks its own path.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::EmbedError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernels {
    /// Plain Rust, every architecture (q8 is refused: it has no int8 kernel).
    Portable = 1,
    /// AVX2 and FMA: f32 kernels, and q8 through `vpmaddubsw`.
    Avx2 = 2,
    /// AVX2 kernels for f32, and q8 through AVX-512 VNNI's `vpdpbusd`.
    Avx512 = 3,
}

impl Kernels {
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// The best path this CPU runs.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
            {
                return Self::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Portable),
            2 => Some(Self::Avx2),
            3 => Some(Self::Avx512),
            _ => None,
        }
    }
}

/// 0 until the first model load (or query) configures it.
static SELECTED: AtomicU8 = AtomicU8::new(0);

/// Reads `EMBEDSTREAM_CPU_KERNELS` and makes it the path every kernel takes from now
/// on. A path this CPU cannot run is an error naming what it has.
pub fn configure() -> Result<Kernels, EmbedError> {
    let requested = std::env::var("EMBEDSTREAM_CPU_KERNELS").unwrap_or_default();
    let detected = Kernels::detected();
    let kernels = match requested.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => detected,
        "portable" => Kernels::Portable,
        "avx2" => Kernels::Avx2,
        "avx512" => Kernels::Avx512,
        other => {
            return Err(EmbedError::Unsupported(format!(
                "EMBEDSTREAM_CPU_KERNELS={other:?}: use auto, portable, avx2 or avx512"
            )))
        }
    };
    if kernels > detected {
        return Err(EmbedError::Unsupported(format!(
            "EMBEDSTREAM_CPU_KERNELS={}: this CPU runs at most the {} kernels",
            kernels.name(),
            detected.name()
        )));
    }
    SELECTED.store(kernels as u8, Ordering::Relaxed);
    Ok(kernels)
}

/// The path in force: the configured one, else the best this CPU has.
pub fn current() -> Kernels {
    Kernels::from_u8(SELECTED.load(Ordering::Relaxed)).unwrap_or_else(|| {
        let detected = Kernels::detected();
        SELECTED.store(detected as u8, Ordering::Relaxed);
        detected
    })
}
