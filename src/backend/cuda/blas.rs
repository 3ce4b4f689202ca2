//! The one cuBLAS call of the backend: `cublasGemmEx` with f32 output and f32 compute (never
//! TF32: the step's tolerances and search's selection margin bound f32 rounding only).

use super::device::device_error;
use crate::config::DType;
use crate::error::Result;
use cudarc::cublas::{sys as blas_sys, CudaBlas};

fn blas_type(d: DType) -> blas_sys::cudaDataType {
    match d {
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
    }
}

/// `C (m×n, ld ldc) = op(A)·op(B)` in column-major terms on the handle's stream, `dtype` inputs at
/// device addresses `a`, `b`, f32 output at `c`; `what` names it in an error.
///
/// # Safety
/// The addresses are live device allocations of at least the sizes the shapes address.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(blas: &CudaBlas, transa: bool, transb: bool, m: usize, n: usize, k: usize, a: u64, lda: usize, b: u64, ldb: usize, c: u64, ldc: usize, dtype: DType, what: &str) -> Result<()> {
    let op = |t: bool| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: as the caller guarantees; alpha and beta outlive the call, which reads them at once
    // (host pointer mode).
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op(transa),
            op(transb),
            m as i32,
            n as i32,
            k as i32,
            (&alpha as *const f32).cast(),
            a as *const _,
            blas_type(dtype),
            lda as i32,
            b as *const _,
            blas_type(dtype),
            ldb as i32,
            (&beta as *const f32).cast(),
            c as *mut _,
            blas_sys::cudaDataType::CUDA_R_32F,
            ldc as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| device_error(what, e))
}
