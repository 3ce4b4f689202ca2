//! The one place the CPU backend multiplies matrices. Each call is single-threaded: parallelism
//! comes from running blocks of sampled classes on different threads, which keeps each block's
//! operands in that core's cache between the GEMM and the element-wise work around it.
//!
//! Two engines: oneDNN's matmul primitive (src/backend/cpu/dnnl.rs) when the library is present,
//! which takes bf16 operands on the CPU's bf16 dot-product units with f32 accumulation; and the
//! `gemm` crate's f32 kernels otherwise. [`path`] says which one runs for a compute dtype.

use super::dnnl;
use crate::config::DType;
use half::bf16;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// An element type GEMM operands come in.
pub trait Element: Copy + Send + Sync + 'static {
    const DNNL: dnnl::DataType;
    /// The values as f32 (exactly), for the crate.
    fn widen(data: &[Self]) -> Cow<'_, [f32]>;
}
impl Element for f32 {
    const DNNL: dnnl::DataType = dnnl::DataType::F32;
    fn widen(data: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(data)
    }
}
impl Element for bf16 {
    const DNNL: dnnl::DataType = dnnl::DataType::Bf16;
    fn widen(data: &[bf16]) -> Cow<'_, [f32]> {
        Cow::Owned(data.iter().map(|v| v.to_f32()).collect())
    }
}

/// A row-major-or-strided matrix operand: element (r, c) is at `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
pub struct Operand<'a, T = f32> {
    pub data: &'a [T],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T: Element> Operand<'a, T> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        Operand { data, row_stride: cols, col_stride: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [T], cols: usize) -> Self {
        Operand { data, row_stride: 1, col_stride: cols }
    }
    fn with_f32(self) -> Operand<'static, f32> {
        Operand { data: &[], row_stride: self.row_stride, col_stride: self.col_stride }
    }
    fn spans(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// Which engine multiplies a step's GEMMs, and in what precision.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GemmPath {
    /// The `gemm` crate in f32; a bf16/f16 compute dtype rounds the inputs first, so the products
    /// equal those of the narrow inputs.
    Crate,
    /// oneDNN's matmul in f32 (inputs rounded first as for the crate).
    OneDnnF32,
    /// oneDNN's matmul with bf16 operands on the CPU's bf16 units, f32 accumulation.
    OneDnnBf16,
}

impl GemmPath {
    pub fn name(self) -> &'static str {
        match self {
            GemmPath::Crate => "gemm-crate-f32",
            GemmPath::OneDnnF32 => "onednn-f32",
            GemmPath::OneDnnBf16 => "onednn-bf16",
        }
    }
}

/// Set when a oneDNN call failed at run time and the crate took over; [`path`] then reports it.
static DEGRADED: AtomicBool = AtomicBool::new(false);

/// The path of a step with compute dtype `dtype` in this process. oneDNN is taken when it is
/// loaded and runs the operands' type with a hardware kernel rather than its reference loops:
/// bf16 on AVX512-BF16 or AMX, f32 on AVX-512 (where its block GEMM beats the crate's, measured
/// in docs/benchmarks.md). f16 has no f16 units to use on the project's machines and oneDNN 2.6 no
/// f16 matmul short of AVX512-FP16, so it multiplies rounded inputs in f32 like the crate path.
pub fn path(dtype: DType) -> GemmPath {
    static BF16: OnceLock<bool> = OnceLock::new();
    static F32: OnceLock<bool> = OnceLock::new();
    if DEGRADED.load(Ordering::Relaxed) {
        return GemmPath::Crate;
    }
    let accelerated = |dt: dnnl::DataType, marks: &[&str]| {
        onednn_kernel(dt).is_some_and(|imp| !imp.starts_with("ref") && marks.iter().any(|m| imp.contains(m)))
    };
    if dtype == DType::BF16 && *BF16.get_or_init(|| accelerated(dnnl::DataType::Bf16, &["bf16", "amx"])) {
        GemmPath::OneDnnBf16
    } else if *F32.get_or_init(|| accelerated(dnnl::DataType::F32, &["avx512"])) {
        GemmPath::OneDnnF32
    } else {
        GemmPath::Crate
    }
}

/// The implementation oneDNN picks for a block GEMM with operands of `dtype` (the step's forward
/// shape), or `None` without oneDNN. Asked on a thread of its own, so that no thread of the host's
/// has its OpenMP settings changed.
pub fn onednn_kernel(dtype: dnnl::DataType) -> Option<String> {
    dnnl::loaded().ok()?;
    let shape = dnnl::Shape { m: 256, n: 256, k: 512, a_strides: (512, 1), b_strides: (1, 512), dtype, accumulate: false };
    std::thread::spawn(move || dnnl::implementation(&shape).ok()).join().ok().flatten()
}

/// `dst[m×n] (row-major, f32) = a[m×k]·b[k×n]`, or `+=` when `accumulate`. f32 operands go to the
/// engine [`path`] picks for f32; bf16 operands to oneDNN (they come only from a step whose path is
/// oneDNN), or widened for the crate where oneDNN cannot run.
pub fn matmul<T: Element>(m: usize, n: usize, k: usize, dst: &mut [f32], a: Operand<'_, T>, b: Operand<'_, T>, accumulate: bool) {
    assert!(dst.len() >= m * n && a.spans(m, k) && b.spans(k, n), "matmul operands out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let wants_onednn = T::DNNL != dnnl::DataType::F32 || path(DType::F32) == GemmPath::OneDnnF32;
    // oneDNN computes on the pool's threads only, each limited to itself (see dnnl.rs).
    if wants_onednn && !DEGRADED.load(Ordering::Relaxed) && rayon::current_thread_index().is_some() {
        let shape = dnnl::Shape { m, n, k, a_strides: (a.row_stride, a.col_stride), b_strides: (b.row_stride, b.col_stride), dtype: T::DNNL, accumulate };
        // SAFETY: the assert above keeps every addressed element inside its slice.
        match unsafe { dnnl::matmul(&shape, a.data.as_ptr().cast(), b.data.as_ptr().cast(), dst.as_mut_ptr()) } {
            Ok(()) => return,
            Err(e) => {
                if !DEGRADED.swap(true, Ordering::Relaxed) {
                    eprintln!("partialfc: {e}; GEMMs continue on the gemm crate");
                }
            }
        }
    }
    let (a_data, b_data) = (T::widen(a.data), T::widen(b.data));
    let (a, b) = (Operand { data: &a_data[..], ..a.with_f32() }, Operand { data: &b_data[..], ..b.with_f32() });
    // SAFETY: as above; widening keeps lengths and strides.
    unsafe { crate_matmul(m, n, k, dst, a, b, accumulate) }
}

/// The gemm crate's product.
///
/// # Safety
/// The operands must span the shape (checked by [`matmul`]).
unsafe fn crate_matmul(m: usize, n: usize, k: usize, dst: &mut [f32], a: Operand<'_>, b: Operand<'_>, accumulate: bool) {
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        n as isize,
        accumulate,
        a.data.as_ptr(),
        a.col_stride as isize,
        a.row_stride as isize,
        b.data.as_ptr(),
        b.col_stride as isize,
        b.row_stride as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product_with_transposes() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 - 1.0).collect(); // n×k
        let mut dst = vec![1.0f32; m * n];
        matmul(m, n, k, &mut dst, Operand::rows(&a, k), Operand::transposed(&bt, k), true);
        for r in 0..m {
            for c in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| a[r * k + p] * bt[c * k + p]).sum::<f32>();
                assert!((dst[r * n + c] - want).abs() < 1e-5);
            }
        }
    }
}
