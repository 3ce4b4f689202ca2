//! The one place the CPU backend multiplies matrices. Each call is single-threaded: parallelism
//! comes from running blocks of sampled classes on different threads, which keeps each block's
//! operands in that core's cache between the GEMM and the element-wise work around it.
//!
//! Three engines: oneDNN's matmul primitive (src/backend/cpu/dnnl.rs) when the library is present,
//! which takes bf16 operands on the CPU's bf16 dot-product units with f32 accumulation; for f32
//! operands, the AVX-512 kernels of src/backend/cpu/avx512.rs where the CPU has AVX-512F, and the
//! `gemm` crate's kernels otherwise. [`path`] says which one runs for a compute dtype.

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::dnnl;
use crate::config::DType;
use half::bf16;
use std::borrow::Cow;
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

/// A strided matrix operand: element (r, c) is at `data[r·row_stride + c·col_stride]`, or, with
/// `ids`, at `data[ids[r]·row_stride + c]` (rows gathered from a table).
#[derive(Clone, Copy)]
pub struct Operand<'a, T = f32> {
    pub data: &'a [T],
    pub row_stride: usize,
    pub col_stride: usize,
    pub ids: Option<&'a [u32]>,
}

impl<'a, T: Element> Operand<'a, T> {
    pub fn strided(data: &'a [T], row_stride: usize, col_stride: usize) -> Self {
        Operand { data, row_stride, col_stride, ids: None }
    }
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        Operand::strided(data, cols, 1)
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [T], cols: usize) -> Self {
        Operand::strided(data, 1, cols)
    }
    /// Rows `ids` of the row-major table `data` with `cols` columns, in that order.
    pub fn gathered(data: &'a [T], cols: usize, ids: &'a [u32]) -> Self {
        Operand { data, row_stride: cols, col_stride: 1, ids: Some(ids) }
    }
    /// Row `r` of a row-major or gathered operand with `cols` columns.
    pub fn row(&self, r: usize, cols: usize) -> &'a [T] {
        debug_assert_eq!(self.col_stride, 1);
        let first = self.ids.map_or(r, |ids| ids[r] as usize) * self.row_stride;
        &self.data[first..first + cols]
    }
    fn with_f32(self) -> Operand<'a, f32> {
        Operand { data: &[], row_stride: self.row_stride, col_stride: self.col_stride, ids: self.ids }
    }
    fn spans(&self, rows: usize, cols: usize) -> bool {
        if rows == 0 || cols == 0 {
            return true;
        }
        match self.ids {
            None => (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len(),
            Some(ids) => self.col_stride == 1 && ids.len() >= rows && ids[..rows].iter().all(|&r| r as usize * self.row_stride + cols <= self.data.len()),
        }
    }
    /// This operand, with a gathered one's rows copied into `store` (row-major), for the engines
    /// that read strided operands only.
    fn strided_in<'b>(self, rows: usize, cols: usize, store: &'b mut Vec<T>) -> Operand<'b, T>
    where
        'a: 'b,
    {
        if self.ids.is_none() {
            return self;
        }
        store.clear();
        (0..rows).for_each(|r| store.extend_from_slice(self.row(r, cols)));
        Operand::rows(store, cols)
    }
}

/// Which engine multiplies a step's GEMMs, and in what precision.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GemmPath {
    /// The `gemm` crate in f32; a bf16/f16 compute dtype rounds the inputs first, so the products
    /// equal those of the narrow inputs.
    Crate,
    /// The AVX-512 f32 kernels, on the same operands as [`GemmPath::Crate`].
    Avx512F32,
    /// oneDNN's matmul with bf16 operands on the CPU's bf16 units, f32 accumulation.
    OneDnnBf16,
}

impl GemmPath {
    pub fn name(self) -> &'static str {
        match self {
            GemmPath::Crate => "gemm-crate-f32",
            GemmPath::Avx512F32 => "avx512-f32",
            GemmPath::OneDnnBf16 => "onednn-bf16",
        }
    }
}

/// Why a oneDNN call failed at run time, after which bf16 operands are widened for the f32 engines;
/// [`path`] then reports the f32 engine.
static FAILURE: OnceLock<String> = OnceLock::new();

/// The run-time failure that moved the GEMMs off oneDNN, if one did.
pub fn onednn_failure() -> Option<&'static str> {
    FAILURE.get().map(String::as_str)
}

/// The path of a step with compute dtype `dtype` in this process: oneDNN for bf16 when it is
/// loaded and runs bf16 on the CPU's bf16 units (AVX512-BF16, AMX) rather than its reference loops.
/// f32 stays off oneDNN: its f32 block GEMM measured level with the crate in the step
/// (docs/benchmarks.md) and summed less accurately, outside the confident-regime tolerance of
/// tests/all/reference_f64.rs; f32 operands go to the AVX-512 kernels when the CPU has them (and
/// `PFC_CPU_GEMM` is not `crate`), else to the crate. f16 has no f16 units to use on the project's
/// machines and oneDNN 2.6 no f16 matmul short of AVX512-FP16, so it multiplies rounded inputs in
/// f32 like the f32 path.
pub fn path(dtype: DType) -> GemmPath {
    static BF16: OnceLock<bool> = OnceLock::new();
    let accelerated = || onednn_kernel(dnnl::DataType::Bf16).is_some_and(|imp| !imp.starts_with("ref") && (imp.contains("bf16") || imp.contains("amx")));
    if dtype == DType::BF16 && FAILURE.get().is_none() && *BF16.get_or_init(accelerated) {
        GemmPath::OneDnnBf16
    } else if avx512_f32() {
        GemmPath::Avx512F32
    } else {
        GemmPath::Crate
    }
}

/// Whether f32 operands go to the AVX-512 kernels: the CPU has AVX-512F and `PFC_CPU_GEMM` (read
/// once) is not `crate`, the switch that measures or tests the crate on such a CPU.
fn avx512_f32() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let available = avx512::available();
        #[cfg(not(target_arch = "x86_64"))]
        let available = false;
        available && std::env::var("PFC_CPU_GEMM").as_deref() != Ok("crate")
    })
}

/// The implementation oneDNN picks for a block GEMM with operands of `dtype` (the step's forward
/// shape), or `None` without oneDNN. Asked on a thread of its own, so that no thread of the host's
/// has its OpenMP settings changed.
pub fn onednn_kernel(dtype: dnnl::DataType) -> Option<String> {
    dnnl::loaded().ok()?;
    let shape = dnnl::Shape { m: 256, n: 256, k: 512, a_strides: (512, 1), b_strides: (1, 512), dtype, accumulate: false };
    let probe = std::thread::Builder::new().name("pfc-onednn-probe".into()).spawn(move || dnnl::implementation(&shape).ok());
    probe.ok()?.join().ok().flatten()
}

/// `dst[m×n] (row-major, f32) = a[m×k]·b[k×n]`, or `+=` when `accumulate`. bf16 operands go to
/// oneDNN (they come only from a step whose path is oneDNN), or are widened where oneDNN cannot
/// run; f32 operands go to the AVX-512 kernels when [`path`] says so and `b`'s rows are
/// contiguous (the layouts the step passes on that path), which read gathered operands in place,
/// else to the crate.
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
    let wants_onednn = T::DNNL != dnnl::DataType::F32;
    // The AVX-512 kernels multiply f32 operands (widened ones too) whose `b` has contiguous rows.
    let on_avx512 = b.col_stride == 1 && avx512_f32();
    let (mut a_rows, mut b_rows) = (Vec::new(), Vec::new());
    let (a, b) = if on_avx512 && !wants_onednn { (a, b) } else { (a.strided_in(m, k, &mut a_rows), b.strided_in(k, n, &mut b_rows)) };
    // oneDNN computes on the pool's threads only, each limited to itself (see dnnl.rs).
    if wants_onednn && FAILURE.get().is_none() && rayon::current_thread_index().is_some() {
        let shape = dnnl::Shape { m, n, k, a_strides: (a.row_stride, a.col_stride), b_strides: (b.row_stride, b.col_stride), dtype: T::DNNL, accumulate };
        // SAFETY: the assert above keeps every addressed element inside its slice.
        match unsafe { dnnl::matmul(&shape, a.data.as_ptr().cast(), b.data.as_ptr().cast(), dst.as_mut_ptr()) } {
            Ok(()) => return,
            Err(e) => {
                let _ = FAILURE.set(e);
            }
        }
    }
    let (a_data, b_data) = (T::widen(a.data), T::widen(b.data));
    let (a, b) = (Operand { data: &a_data[..], ..a.with_f32() }, Operand { data: &b_data[..], ..b.with_f32() });
    #[cfg(target_arch = "x86_64")]
    if on_avx512 {
        let (a_rows, b_rows) = (avx512::Rows { base: a.data.as_ptr(), stride: a.row_stride, ids: a.ids }, avx512::Rows { base: b.data.as_ptr(), stride: b.row_stride, ids: b.ids });
        // SAFETY: as above (widening keeps lengths, strides and ids); `avx512_f32` checked the CPU.
        unsafe { avx512::sgemm(m, n, k, a_rows, a.col_stride, b_rows, dst.as_mut_ptr(), n, accumulate) };
        return;
    }
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

    type StepShape = (usize, usize, usize, (usize, usize), (usize, usize), bool);

    /// The three products of a block of the step — cosines `W·x̂ᵀ`, the embedding gradient
    /// `+= gᵀ·W` and the center gradient `g·x̂` — as (m, n, k, a strides, b strides, accumulate)
    /// for `rows` sampled classes, a global batch of `n` and dimension `d`.
    fn step_shapes(rows: usize, n: usize, d: usize) -> [StepShape; 3] {
        [(rows, n, d, (d, 1), (1, d), false), (n, d, rows, (1, n), (d, 1), true), (rows, d, n, (n, 1), (d, 1), false)]
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len).map(|i| (crate::rng::at(seed, i as u64) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// |x − y| bounded by `tol`·Σ|aᵢ||bᵢ| for every output: the bound any summation order meets.
    fn check_close(got: &[f32], want: &[f32], scale: &[f32], tol: f32, what: &str) {
        for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
            assert!((g - w).abs() <= tol * s + 1e-30, "{what}: element {i}: {g} vs {w} (|a||b| sum {s})");
        }
    }

    /// oneDNN against the crate for every GEMM shape the step uses: full and partial blocks,
    /// batches of one row and of a few, an empty block (k = 0 contributes nothing), f32 and bf16.
    #[test]
    fn onednn_agrees_with_the_crate_on_every_step_shape() {
        dnnl::loaded().expect("oneDNN must be installed for this test (scripts/setup.sh installs libdnnl-dev)");
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut seed = 1;
        for &(rows, n, d) in &[(256, 256, 512), (255, 37, 64), (1, 1, 8), (78, 300, 128), (256, 3, 512), (0, 16, 64), (17, 16, 1)] {
            for (m, nn, k, sa, sb, acc) in step_shapes(rows, n, d) {
                seed += 1;
                let a_len = if m == 0 || k == 0 { 0 } else { (m - 1) * sa.0 + (k - 1) * sa.1 + 1 };
                let b_len = if k == 0 || nn == 0 { 0 } else { (k - 1) * sb.0 + (nn - 1) * sb.1 + 1 };
                let (a, b, init) = (values(a_len, seed), values(b_len, seed + 100), values(m * nn, seed + 200));
                let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
                let (aa, ba) = (abs(&a), abs(&b));
                let mut scale = if acc { abs(&init) } else { vec![0.0; m * nn] };
                // SAFETY: the lengths span the strides.
                unsafe { crate_matmul(m, nn, k, &mut scale, Operand::strided(&aa, sa.0, sa.1), Operand::strided(&ba, sb.0, sb.1), acc) };
                let mut want = init.clone();
                unsafe { crate_matmul(m, nn, k, &mut want, Operand::strided(&a, sa.0, sa.1), Operand::strided(&b, sb.0, sb.1), acc) };
                let what = format!("{m}×{nn}×{k} a{sa:?} b{sb:?} accumulate {acc}");
                let shape = dnnl::Shape { m, n: nn, k, a_strides: sa, b_strides: sb, dtype: dnnl::DataType::F32, accumulate: acc };
                let mut got = init.clone();
                // oneDNN is never asked for an empty product (k = 0): `matmul` answers it.
                if m * nn > 0 && k > 0 {
                    pool.install(|| unsafe { dnnl::matmul(&shape, a.as_ptr().cast(), b.as_ptr().cast(), got.as_mut_ptr()) }).unwrap();
                }
                // f32: both sum the same products in some order, within (k + 2)·u·Σ|a||b|.
                check_close(&got, &want, &scale, (k + 2) as f32 * f32::EPSILON, &format!("f32 {what}"));

                // bf16 through oneDNN, against the crate on the same rounded inputs (exact products)
                // and against the unrounded f32 product (within the inputs' rounding, 2·2⁻⁸).
                let (ab, bb): (Vec<bf16>, Vec<bf16>) = (a.iter().map(|&v| bf16::from_f32(v)).collect(), b.iter().map(|&v| bf16::from_f32(v)).collect());
                let (ar, br): (Vec<f32>, Vec<f32>) = (ab.iter().map(|v| v.to_f32()).collect(), bb.iter().map(|v| v.to_f32()).collect());
                let mut rounded = init.clone();
                unsafe { crate_matmul(m, nn, k, &mut rounded, Operand::strided(&ar, sa.0, sa.1), Operand::strided(&br, sb.0, sb.1), acc) };
                let mut got = init.clone();
                let shape = dnnl::Shape { dtype: dnnl::DataType::Bf16, ..shape };
                if m * nn > 0 && k > 0 {
                    pool.install(|| unsafe { dnnl::matmul(&shape, ab.as_ptr().cast(), bb.as_ptr().cast(), got.as_mut_ptr()) }).unwrap();
                }
                check_close(&got, &rounded, &scale, (k + 2) as f32 * f32::EPSILON, &format!("bf16 vs rounded inputs {what}"));
                check_close(&got, &want, &scale, 2.0 / 256.0 + (k + 2) as f32 * f32::EPSILON, &format!("bf16 vs f32 {what}"));
                // And the dispatching entry point, which the step calls, gives the same as oneDNN.
                let mut via = init.clone();
                pool.install(|| matmul(m, nn, k, &mut via, Operand::strided(&ab, sa.0, sa.1), Operand::strided(&bb, sb.0, sb.1), acc));
                assert_eq!(via, got, "matmul() vs oneDNN, bf16 {what}");
            }
        }
    }

    /// The AVX-512 kernels against the crate for every GEMM shape the step uses, with the operands
    /// the step gives them (the forward product's batch operand transposed, its rows contiguous),
    /// and `matmul` routing f32 operands there.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_kernels_agree_with_the_crate_on_every_step_shape() {
        assert!(avx512::available(), "the project's machines have AVX-512F");
        assert_eq!(path(DType::F32), GemmPath::Avx512F32);
        let mut seed = 1000;
        for &(rows, n, d) in &[(256, 256, 512), (255, 37, 64), (1, 1, 8), (78, 300, 128), (256, 3, 512), (0, 16, 64), (17, 16, 1), (12, 32, 5), (13, 33, 17)] {
            for (m, nn, k, sa, sb, acc) in step_shapes(rows, n, d) {
                seed += 1;
                let a_len = if m == 0 || k == 0 { 0 } else { (m - 1) * sa.0 + (k - 1) * sa.1 + 1 };
                let b_len = if k == 0 || nn == 0 { 0 } else { (k - 1) * sb.0 + (nn - 1) * sb.1 + 1 };
                let (a, b, init) = (values(a_len, seed), values(b_len, seed + 100), values(m * nn, seed + 200));
                // The operand with contiguous rows: the forward's batch operand comes transposed.
                let rows_b: Vec<f32> = (0..k * nn).map(|e| b[(e / nn) * sb.0 + (e % nn) * sb.1]).collect();
                let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
                let (aa, ba) = (abs(&a), abs(&b));
                let mut scale = if acc { abs(&init) } else { vec![0.0; m * nn] };
                let a_op = |data| Operand::strided(data, sa.0, sa.1);
                let b_op = |data| Operand::strided(data, sb.0, sb.1);
                // SAFETY: the lengths span the strides.
                unsafe { crate_matmul(m, nn, k, &mut scale, a_op(&aa), b_op(&ba), acc) };
                let mut want = init.clone();
                unsafe { crate_matmul(m, nn, k, &mut want, a_op(&a), b_op(&b), acc) };
                let mut got = init.clone();
                matmul(m, nn, k, &mut got, a_op(&a), Operand::rows(&rows_b, nn), acc);
                let what = format!("{m}×{nn}×{k} a{sa:?} b{sb:?} accumulate {acc}");
                check_close(&got, &want, &scale, (k + 2) as f32 * f32::EPSILON, &format!("AVX-512 {what}"));
                if k > 0 {
                    let mut direct = init.clone();
                    // SAFETY: as above; the CPU has AVX-512F (asserted).
                    let (ar, br) = (avx512::Rows { base: a.as_ptr(), stride: sa.0, ids: None }, avx512::Rows { base: rows_b.as_ptr(), stride: nn, ids: None });
                    unsafe { avx512::sgemm(m, nn, k, ar, sa.1, br, direct.as_mut_ptr(), nn, acc) };
                    assert_eq!(direct, got, "matmul() vs the AVX-512 kernels, {what}");
                }
            }
        }
    }

    /// Rows gathered from a table give the same bits as the same rows copied out: read in place by
    /// the AVX-512 kernels (the forward product's centers, the embedding gradient's), or copied
    /// by `matmul` for the crate (the forward product with its batch operand untransposed).
    #[test]
    fn gathered_operands_match_their_rows_copied() {
        let (table_rows, d, n) = (1000, 64, 37);
        let table = values(table_rows * d, 77);
        for rows in [256, 13, 1] {
            let ids: Vec<u32> = (0..table_rows as u32).filter(|&j| !crate::rng::at(rows as u64, j as u64).is_multiple_of(3)).take(rows).collect();
            assert_eq!(ids.len(), rows);
            let copied: Vec<f32> = ids.iter().flat_map(|&j| table[j as usize * d..(j as usize + 1) * d].to_vec()).collect();
            let (x, g) = (values(n * d, 78), values(rows * n, 79));
            let xt: Vec<f32> = (0..d * n).map(|e| x[(e % n) * d + e / n]).collect();
            for batch in [Operand::rows(&xt, n), Operand::transposed(&x, d)] {
                let (mut got, mut want) = (vec![0f32; rows * n], vec![0f32; rows * n]);
                matmul(rows, n, d, &mut got, Operand::gathered(&table, d, &ids), batch, false);
                matmul(rows, n, d, &mut want, Operand::rows(&copied, d), batch, false);
                assert_eq!(got, want, "cosines of {rows} gathered rows, batch column stride {}", batch.col_stride);
            }
            let init = values(n * d, 80);
            let (mut got, mut want) = (init.clone(), init);
            matmul(n, d, rows, &mut got, Operand::transposed(&g, n), Operand::gathered(&table, d, &ids), true);
            matmul(n, d, rows, &mut want, Operand::transposed(&g, n), Operand::rows(&copied, d), true);
            assert_eq!(got, want, "embedding gradient over {rows} gathered rows");
        }
    }

    /// oneDNN starts no threads of its own: the pool's threads compute every block.
    #[test]
    fn onednn_runs_on_the_pool_threads_only() {
        dnnl::loaded().expect("oneDNN must be installed for this test (scripts/setup.sh installs libdnnl-dev)");
        let threads = || std::fs::read_to_string("/proc/self/status").unwrap().lines().find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse::<usize>().unwrap())).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let (a, b) = (values(256 * 512, 1), values(512 * 256, 2));
        pool.install(|| rayon::broadcast(|_| ()));
        let before = threads();
        let ab: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
        let bb: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
        pool.install(|| {
            use rayon::prelude::*;
            (0..32).into_par_iter().for_each(|_| {
                let mut c = vec![0f32; 256 * 256];
                matmul(256, 256, 512, &mut c, Operand::rows(&ab, 512), Operand::transposed(&bb, 512), false);
                matmul(256, 256, 512, &mut c, Operand::rows(&a, 512), Operand::transposed(&b, 512), true);
            })
        });
        // Other tests of this binary may run meanwhile; their threads come and go, ours must not
        // have been joined by an OpenMP team (4 pool threads × its default of one per core).
        let after = threads();
        assert!(after <= before + 2, "threads went from {before} to {after}: oneDNN started its own");
    }
}
