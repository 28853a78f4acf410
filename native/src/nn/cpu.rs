//! Which of our SIMD kernels run: the best this CPU has, or the path that
//! `EMBEDSTREAM_CPU_KERNELS` (`auto`, `portable`, `avx2`, `avx512`) forces, so that
//! tests cover every path the CPU supports and benchmarks can measure the AVX2 path
//! on an AVX-512 machine.
//!
//! The choice is process-wide and read again at every model load. It covers the
//! kernels this crate writes (q8 matrix products, attention rows, GELU) and the
//! instruction set of our f32 matrix products ([`Gemm`], run by `nn::gemm`); the
//! few products candle runs itself take the `gemm` crate's own choice.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::EmbedError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernels {
    /// Plain Rust, every architecture (q8 is refused: it has no int8 kernel).
    Portable = 1,
    /// AVX2 and FMA: f32 kernels, and q8 through `vpmaddubsw`.
    Avx2 = 2,
    /// AVX2 kernels for f32, q8 through AVX-512 VNNI's `vpdpbusd`, and bf16 (`nn::bf16`)
    /// where the CPU also has AVX512_BF16.
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

/// The micro-kernels of our f32 matrix products. Apart from [`Kernels`] because
/// AVX-512F alone suffices here, while our AVX-512 path also needs VNNI: a Skylake
/// Xeon runs our AVX2 kernels but AVX-512 GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gemm {
    Scalar = 1,
    /// AVX2 and FMA, 256-bit.
    Fma = 2,
    /// AVX-512F, 512-bit: twice the work per instruction on cores with two 512-bit
    /// FMA units (Intel Xeon). Not under `auto` on AMD Zen 3 and Zen 4, which split
    /// 512-bit work in two: there gemm's AVX-512 kernels ran MiniLM at 0.82 of its
    /// AVX2 kernels (bench/cpu_paths.py).
    Avx512 = 3,
}

impl Gemm {
    // Only the bindings ask for names (`embedstream info`).
    #[cfg_attr(not(feature = "python"), allow(dead_code))]
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Fma => "fma",
            Self::Avx512 => "avx512f",
        }
    }

    /// Whether this CPU has the instructions.
    pub fn runs_here(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Fma => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The GEMM that goes with a kernel path: the path's own instruction set when one
    /// is forced, the fastest on this CPU under `auto`.
    fn for_kernels(kernels: Kernels, forced: bool) -> Self {
        if !forced {
            if Self::Avx512.runs_here() && !splits_512_bit_work() {
                return Self::Avx512;
            }
            if Self::Fma.runs_here() {
                return Self::Fma;
            }
        }
        match kernels {
            Kernels::Avx512 => Self::Avx512,
            Kernels::Avx2 => Self::Fma,
            Kernels::Portable => Self::Scalar,
        }
    }

    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Scalar),
            2 => Some(Self::Fma),
            3 => Some(Self::Avx512),
            _ => None,
        }
    }
}

/// AMD Zen 3 and Zen 4 (family 19h) run each 512-bit instruction as two 256-bit halves;
/// Zen 5 (1Ah) and Intel's AVX-512 cores have full-width units.
fn splits_512_bit_work() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // Safe on every x86-64 CPU: CPUID leaves 0 and 1 always exist.
        #[allow(unused_unsafe)]
        let (vendor, signature) = unsafe { (__cpuid(0), __cpuid(1).eax) };
        let amd = (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
        let family = (signature >> 8) & 0xf;
        let family = if family == 0xf {
            family + ((signature >> 20) & 0xff)
        } else {
            family
        };
        amd && family == 0x19
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// 0 until the first model load (or query) configures them.
static SELECTED: AtomicU8 = AtomicU8::new(0);
static SELECTED_GEMM: AtomicU8 = AtomicU8::new(0);

/// Reads `EMBEDSTREAM_CPU_KERNELS` and makes it the path every kernel takes from now
/// on. A path this CPU cannot run is an error naming what it has.
pub fn configure() -> Result<Kernels, EmbedError> {
    let requested = std::env::var("EMBEDSTREAM_CPU_KERNELS").unwrap_or_default();
    let detected = Kernels::detected();
    let requested = requested.trim().to_ascii_lowercase();
    let forced = !matches!(requested.as_str(), "" | "auto");
    let kernels = match requested.as_str() {
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
    SELECTED_GEMM.store(Gemm::for_kernels(kernels, forced) as u8, Ordering::Relaxed);
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

/// The GEMM in force: the configured one, else the best this CPU has.
pub fn gemm() -> Gemm {
    Gemm::from_u8(SELECTED_GEMM.load(Ordering::Relaxed)).unwrap_or_else(|| {
        let gemm = Gemm::for_kernels(Kernels::detected(), false);
        SELECTED_GEMM.store(gemm as u8, Ordering::Relaxed);
        gemm
    })
}

/// The CPU features our paths look for, of those this CPU has.
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub fn features() -> Vec<&'static str> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! check {
            ($($name:tt),*) => {
                $(if std::is_x86_feature_detected!($name) {
                    found.push($name);
                })*
            };
        }
        check!(
            "avx2",
            "fma",
            "avx512f",
            "avx512bw",
            "avx512vnni",
            "avx512bf16"
        );
    }
    found
}
