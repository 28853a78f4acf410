//! Our f32 matrix products: the `gemm` crate's micro-kernels, with the instruction set
//! taken from `nn::cpu` rather than from gemm's private, once-per-process choice. So
//! `EMBEDSTREAM_CPU_KERNELS=avx2` runs (and tests) the AVX2 GEMM on an AVX-512 machine,
//! and AVX-512 GEMM (gemm's `x86-v4` feature) runs wherever the CPU has it.

use gemm_common::gemm::gemm_basic_generic;
use gemm_common::simd::MixedSimd;
pub use gemm_common::Parallelism;

use super::cpu::{self, Gemm};

/// A matrix read by a product: its first element and the distance, in elements,
/// between rows and between columns.
#[derive(Clone, Copy)]
pub struct MatRef {
    pub ptr: *const f32,
    pub row_stride: isize,
    pub col_stride: isize,
}

/// The matrix a product writes: `rows × cols`, laid out like a [`MatRef`].
pub struct MatMut {
    pub ptr: *mut f32,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: isize,
    pub col_stride: isize,
}

/// `out = lhs · rhs`, or `out += lhs · rhs` with `accumulate`, where `lhs` is
/// `out.rows × depth` and `rhs` is `depth × out.cols`.
///
/// # Safety
/// Every element the shapes and strides reach must lie inside its allocation, and
/// `out` must not overlap `lhs` or `rhs`; without `accumulate`, `out` may be
/// uninitialised.
pub unsafe fn sgemm(
    out: MatMut,
    lhs: MatRef,
    rhs: MatRef,
    depth: usize,
    accumulate: bool,
    parallelism: Parallelism,
) {
    sgemm_with(cpu::gemm(), out, lhs, rhs, depth, accumulate, parallelism)
}

/// [`sgemm`] on a given GEMM, which this CPU must run.
unsafe fn sgemm_with(
    gemm: Gemm,
    out: MatMut,
    lhs: MatRef,
    rhs: MatRef,
    depth: usize,
    accumulate: bool,
    parallelism: Parallelism,
) {
    // The micro-kernels write column-major tiles: a row-major `out` is computed as
    // outᵀ = rhsᵀ · lhsᵀ, as gemm's own entry point does. Without it our row-major
    // products ran 20-28 % slower (docs/benchmarks.md, families run 6).
    let (out, lhs, rhs) = if out.col_stride.abs() < out.row_stride.abs() {
        (
            MatMut {
                ptr: out.ptr,
                rows: out.cols,
                cols: out.rows,
                row_stride: out.col_stride,
                col_stride: out.row_stride,
            },
            MatRef {
                ptr: rhs.ptr,
                row_stride: rhs.col_stride,
                col_stride: rhs.row_stride,
            },
            MatRef {
                ptr: lhs.ptr,
                row_stride: lhs.col_stride,
                col_stride: lhs.row_stride,
            },
        )
    } else {
        (out, lhs, rhs)
    };
    macro_rules! run {
        ($simd:ty, $kernels:path, $lanes:expr) => {{
            use $kernels as k;
            gemm_basic_generic::<
                _,
                f32,
                { $lanes },
                { k::MR_DIV_N * $lanes },
                { k::NR },
                { k::MR_DIV_N },
                { k::H_M },
                { k::H_N },
            >(
                <$simd as MixedSimd<f32, f32, f32, f32>>::try_new()
                    .expect("the CPU check of nn::cpu admitted this GEMM"),
                out.rows,
                out.cols,
                depth,
                out.ptr,
                out.col_stride,
                out.row_stride,
                accumulate,
                lhs.ptr,
                lhs.col_stride,
                lhs.row_stride,
                rhs.ptr,
                rhs.col_stride,
                rhs.row_stride,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                |a, b, c| a * b + c,
                &k::UKR,
                &k::H_UKR,
                false,
                parallelism,
            )
        }};
    }
    match gemm {
        #[cfg(target_arch = "x86_64")]
        Gemm::Avx512 => run!(
            gemm_common::simd::V4,
            gemm_f32::microkernel::avx512f::f32,
            16
        ),
        #[cfg(target_arch = "x86_64")]
        Gemm::Fma => run!(gemm_common::simd::V3, gemm_f32::microkernel::fma::f32, 8),
        _ => run!(
            gemm_common::simd::Scalar,
            gemm_f32::microkernel::scalar::f32,
            1
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each GEMM this CPU runs against a plain triple loop, on shapes that are not
    /// multiples of any micro-kernel's tile, with and without accumulation.
    #[test]
    fn every_gemm_matches_a_plain_product() {
        let (m, n, k) = (37, 29, 45);
        let lhs: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let rhs: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let start: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32).collect();
        let mut expected = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                expected[i * n + j] = (0..k).map(|p| lhs[i * k + p] * rhs[p * n + j]).sum();
            }
        }
        for gemm in [Gemm::Scalar, Gemm::Fma, Gemm::Avx512] {
            if !gemm.runs_here() {
                continue;
            }
            // Row-major `out` (computed transposed) and column-major `out` (as is).
            for (column_major, accumulate) in
                [(false, false), (false, true), (true, false), (true, true)]
            {
                let (row_stride, col_stride) = if column_major { (1, m) } else { (n, 1) };
                let at = |i: usize, j: usize| i * row_stride + j * col_stride;
                let mut out = vec![0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        out[at(i, j)] = start[i * n + j];
                    }
                }
                // SAFETY: buffers of exactly the shapes and strides given.
                unsafe {
                    sgemm_with(
                        gemm,
                        MatMut {
                            ptr: out.as_mut_ptr(),
                            rows: m,
                            cols: n,
                            row_stride: row_stride as isize,
                            col_stride: col_stride as isize,
                        },
                        MatRef {
                            ptr: lhs.as_ptr(),
                            row_stride: k as isize,
                            col_stride: 1,
                        },
                        MatRef {
                            ptr: rhs.as_ptr(),
                            row_stride: n as isize,
                            col_stride: 1,
                        },
                        k,
                        accumulate,
                        Parallelism::None,
                    );
                }
                for i in 0..m {
                    for j in 0..n {
                        let (got, base) = (out[at(i, j)], start[i * n + j]);
                        let want = expected[i * n + j] + if accumulate { base } else { 0.0 };
                        assert!(
                            (got - want).abs() < 1e-3,
                            "{gemm:?}, column-major {column_major}, accumulate {accumulate}: \
                             {got} against {want}"
                        );
                    }
                }
            }
        }
    }
}
