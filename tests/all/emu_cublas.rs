//! The emulated cuBLAS (tests/cuda-emulator/cublas.cc) against a float64 GEMM.
//!
//! Each test runs where CUDA is usable (`common::on_cuda`): on the emulation, in a child process,
//! or on a GPU against the real cuBLAS, so what is asserted is what cuBLAS documents. The few
//! checks whose outcome the real library leaves undefined (a destroyed handle, a NULL scalar, a
//! read past an allocation) are made on the emulation only.

use crate::common::{emulated, on_cuda, Rng, StreamGate};
use cudarc::cublas::result::{gemm_ex, CublasError};
use cudarc::cublas::sys::{
    cublasComputeType_t as Compute, cublasGemmAlgo_t, cublasHandle_t, cublasOperation_t as Op, cublasStatus_t as Status, cudaDataType as Ty,
};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use half::{bf16, f16};
use std::ffi::c_void;
use std::sync::Arc;

const N: Op = Op::CUBLAS_OP_N;
const T: Op = Op::CUBLAS_OP_T;
const C: Op = Op::CUBLAS_OP_C;
const F32: Ty = Ty::CUDA_R_32F;
const F16: Ty = Ty::CUDA_R_16F;
const BF16: Ty = Ty::CUDA_R_16BF;

/// A stream of GPU 0 and a cuBLAS handle on it.
struct Device {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
}

impl Device {
    fn on(stream: Arc<CudaStream>) -> Device {
        let blas = CudaBlas::new(stream.clone()).unwrap();
        Device { stream, blas }
    }

    fn new() -> Device {
        Device::on(CudaContext::new(0).unwrap().new_stream().unwrap())
    }

    fn upload(&self, ty: Ty, values: &[f64]) -> CudaSlice<u8> {
        self.stream.clone_htod(&encode(ty, values)).unwrap()
    }
}

/// `v` rounded to the nearest value of `ty`, ties to even.
fn quantize(ty: Ty, v: f64) -> f64 {
    match ty {
        F32 => v as f32 as f64,
        F16 => f16::from_f64(v).to_f64(),
        BF16 => bf16::from_f64(v).to_f64(),
        _ => unreachable!("{ty:?}"),
    }
}

/// Values of `ty` (exactly: see `quantize`) as a device buffer of that type holds them.
fn encode(ty: Ty, values: &[f64]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for &v in values {
        match ty {
            F32 => bytes.extend((v as f32).to_le_bytes()),
            F16 => bytes.extend(f16::from_f64(v).to_le_bytes()),
            BF16 => bytes.extend(bf16::from_f64(v).to_le_bytes()),
            _ => unreachable!("{ty:?}"),
        }
        assert!(v.is_nan() || quantize(ty, v) == v, "{v} is not a value of {ty:?}");
    }
    bytes
}

fn decode(ty: Ty, bytes: &[u8]) -> Vec<f64> {
    match ty {
        F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
        F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes(b.try_into().unwrap()).to_f64()).collect(),
        BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes(b.try_into().unwrap()).to_f64()).collect(),
        _ => unreachable!("{ty:?}"),
    }
}

/// The unit roundoff of `ty`.
fn unit(ty: Ty) -> f64 {
    match ty {
        F32 => 2f64.powi(-24),
        F16 => 2f64.powi(-11),
        _ => 2f64.powi(-8),
    }
}

/// One cublasGemmEx call: C (m × n) = α·op(A)·op(B) + β·C with op(A) m × k and op(B) k × n, all
/// column-major.
#[derive(Clone, Copy, Debug)]
struct Gemm {
    ta: Op,
    tb: Op,
    m: i32,
    n: i32,
    k: i32,
    lda: i32,
    ldb: i32,
    ldc: i32,
    alpha: f32,
    beta: f32,
    a_ty: Ty,
    b_ty: Ty,
    c_ty: Ty,
    compute: Compute,
}

impl Gemm {
    /// f32 operands, α = 1, β = 0, each leading dimension `pad` past its smallest value.
    fn new(ta: Op, tb: Op, m: i32, n: i32, k: i32, pad: i32) -> Gemm {
        Gemm {
            ta,
            tb,
            m,
            n,
            k,
            lda: (if ta == N { m } else { k }).max(1) + pad,
            ldb: (if tb == N { k } else { n }).max(1) + pad,
            ldc: m.max(1) + pad,
            alpha: 1.0,
            beta: 0.0,
            a_ty: F32,
            b_ty: F32,
            c_ty: F32,
            compute: Compute::CUBLAS_COMPUTE_32F,
        }
    }

    fn types(self, ab: Ty, c: Ty) -> Gemm {
        Gemm { a_ty: ab, b_ty: ab, c_ty: c, ..self }
    }

    fn scalars(self, alpha: f32, beta: f32) -> Gemm {
        Gemm { alpha, beta, ..self }
    }

    /// Rows and columns of A, B and C as stored.
    fn stored(&self) -> [(usize, usize); 3] {
        let (m, n, k) = (self.m.max(0) as usize, self.n.max(0) as usize, self.k.max(0) as usize);
        let a = if self.ta == N { (m, k) } else { (k, m) };
        let b = if self.tb == N { (k, n) } else { (n, k) };
        [a, b, (m, n)]
    }

    /// Elements of the buffers of A, B and C: leading dimension × columns, at least one.
    fn lens(&self) -> [usize; 3] {
        let [a, b, c] = self.stored();
        [(self.lda.max(1) as usize * a.1).max(1), (self.ldb.max(1) as usize * b.1).max(1), (self.ldc.max(1) as usize * c.1).max(1)]
    }

    /// cublasGemmEx with these parameters on device buffers.
    fn call(&self, handle: cublasHandle_t, a: u64, b: u64, c: u64) -> Result<(), CublasError> {
        // SAFETY: the callers pass buffers of `lens()` elements of the types named, or parameters
        // that cuBLAS rejects before it reads any.
        unsafe {
            gemm_ex(
                handle,
                self.ta,
                self.tb,
                self.m,
                self.n,
                self.k,
                (&self.alpha as *const f32).cast(),
                a as *const c_void,
                self.a_ty,
                self.lda,
                b as *const c_void,
                self.b_ty,
                self.ldb,
                (&self.beta as *const f32).cast(),
                c as *mut c_void,
                self.c_ty,
                self.ldc,
                self.compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
    }

    /// Random operands of the types: normal values inside the matrices, NaN in the rows past them
    /// (which a leading dimension skips) and, when β is 0, all through C.
    fn operands(&self, rng: &mut Rng) -> [Vec<f64>; 3] {
        let lds = [self.lda, self.ldb, self.ldc].map(|ld| ld as usize);
        let tys = [self.a_ty, self.b_ty, self.c_ty];
        let mut out: [Vec<f64>; 3] = Default::default();
        for (x, ((&(rows, _), len), (ld, ty))) in self.stored().iter().zip(self.lens()).zip(lds.into_iter().zip(tys)).enumerate() {
            out[x] = (0..len)
                .map(|at| if at % ld >= rows || (x == 2 && self.beta == 0.0) { f64::NAN } else { quantize(ty, rng.normal()) })
                .collect();
        }
        out
    }

    /// Runs on `d`'s stream with operands `ops` (as `operands` makes them) and returns C after.
    fn run(&self, d: &Device, ops: &[Vec<f64>; 3]) -> Vec<f64> {
        let a = d.upload(self.a_ty, &ops[0]);
        let b = d.upload(self.b_ty, &ops[1]);
        let mut c = d.upload(self.c_ty, &ops[2]);
        {
            let (ap, _a) = a.device_ptr(&d.stream);
            let (bp, _b) = b.device_ptr(&d.stream);
            let (cp, _c) = c.device_ptr_mut(&d.stream);
            self.call(*d.blas.handle(), ap, bp, cp).unwrap_or_else(|e| panic!("{self:?}: {e}"));
        }
        d.stream.synchronize().unwrap();
        decode(self.c_ty, &d.stream.clone_dtoh(&c).unwrap())
    }

    /// Checks C after the call (`got`) against the float64 GEMM of `ops`: within what f32
    /// accumulation allows (γ(k+2)·Σ|terms|, twice for tensor cores' order) plus the rounding to
    /// C's type, and untouched in the rows past m.
    fn verify(&self, ops: &[Vec<f64>; 3], got: &[f64]) {
        let (m, n, k) = (self.m as usize, self.n as usize, self.k as usize);
        let (lda, ldb, ldc) = (self.lda as usize, self.ldb as usize, self.ldc as usize);
        let op_a = |i: usize, p: usize| if self.ta == N { ops[0][i + p * lda] } else { ops[0][p + i * lda] };
        let op_b = |p: usize, j: usize| if self.tb == N { ops[1][p + j * ldb] } else { ops[1][j + p * ldb] };
        let accumulation = 2.0 * (k + 2) as f64 * unit(F32);
        for j in 0..n {
            for i in 0..ldc {
                let (at, g) = (i + j * ldc, got[i + j * ldc]);
                if i >= m {
                    assert!(g == ops[2][at] || (g.is_nan() && ops[2][at].is_nan()), "{self:?}: C[{i}, {j}] past m changed to {g}");
                    continue;
                }
                let (mut sum, mut size) = (0.0, 0.0);
                for p in 0..k {
                    sum += op_a(i, p) * op_b(p, j);
                    size += (op_a(i, p) * op_b(p, j)).abs();
                }
                let alpha = self.alpha as f64;
                let c0 = if self.beta == 0.0 { 0.0 } else { self.beta as f64 * ops[2][at] };
                let want = alpha * sum + c0;
                let bound = 1.01 * accumulation * (alpha.abs() * size + c0.abs()) + unit(self.c_ty) * want.abs() + 2f64.powi(-25);
                assert!((g - want).abs() <= bound, "{self:?}: C[{i}, {j}] = {g}, float64 {want} (bound {bound})");
            }
        }
    }

    fn check(&self, d: &Device, rng: &mut Rng) {
        let ops = self.operands(rng);
        let got = self.run(d, &ops);
        self.verify(&ops, &got);
    }
}

const OPS: [(Op, Op); 4] = [(N, N), (N, T), (T, N), (T, T)];

#[test]
fn f32_gemm_matches_float64_for_every_transpose_and_leading_dimension() {
    if !on_cuda(module_path!(), "f32_gemm_matches_float64_for_every_transpose_and_leading_dimension") {
        return;
    }
    let d = Device::new();
    let mut rng = Rng(1);
    // Odd sizes leave partial register blocks; k = 700 spans several K slices of the emulation;
    // 96 × 2000 × 128 (the backend's shape) is split over threads.
    for (m, n, k) in [(37, 29, 53), (5, 3, 700), (96, 2000, 128)] {
        for (ta, tb) in OPS {
            for (alpha, beta) in [(-0.75, 0.0), (1.5, 0.5), (1.0, 1.0)] {
                Gemm::new(ta, tb, m, n, k, 3).scalars(alpha, beta).check(&d, &mut rng);
            }
        }
    }
    // CUBLAS_OP_C is CUBLAS_OP_T for real types.
    Gemm::new(C, C, 7, 6, 5, 1).scalars(2.0, 0.25).check(&d, &mut rng);
    // A handle on the context's default (legacy) stream, cudarc's NULL stream.
    let legacy = Device::on(d.stream.context().default_stream());
    Gemm::new(T, N, 9, 11, 13, 2).scalars(0.5, -1.0).check(&legacy, &mut rng);
}

#[test]
fn half_precision_inputs_widen_exactly_and_accumulate_in_f32() {
    if !on_cuda(module_path!(), "half_precision_inputs_widen_exactly_and_accumulate_in_f32") {
        return;
    }
    let d = Device::new();
    let mut rng = Rng(2);
    for ab in [F16, BF16] {
        for c in [F32, ab] {
            for (m, n, k) in [(37, 29, 53), (5, 3, 700)] {
                for (ta, tb) in OPS {
                    for (alpha, beta) in [(-0.75, 0.0), (1.5, 0.5)] {
                        Gemm::new(ta, tb, m, n, k, 2).types(ab, c).scalars(alpha, beta).check(&d, &mut rng);
                    }
                }
            }
        }
        // 3000 ones: a 16-bit running sum would stop at 2048; f32 holds every integer up to 2²⁴.
        let g = Gemm::new(N, N, 1, 1, 3000, 0).types(ab, F32);
        let ones = [vec![1.0; 3000], vec![1.0; 3000], vec![f64::NAN]];
        assert_eq!(g.run(&d, &ones), [3000.0], "{ab:?}");
    }
}

#[test]
fn sixteen_bit_results_round_to_nearest_even() {
    if !on_cuda(module_path!(), "sixteen_bit_results_round_to_nearest_even") {
        return;
    }
    let d = Device::new();
    let p = |e: i32| 2f64.powi(e);
    // Pairs (x, y) of the type whose sum is exact in f32: C's row 0 is x + y, row 1 (x + y) / 2,
    // rounded once to C's type. Ties go to the even neighbour; past the top, to infinity.
    let cases = [
        (F16, vec![(1.0, p(-11)), (1.0 + p(-10), p(-11)), (1.0, p(-11) + p(-21)), (-1.0, -p(-11)), (65504.0, 16.0), (65504.0, 15.0), (p(-24), 0.0), (3.0 * p(-24), 0.0)]),
        (BF16, vec![(1.0, p(-8)), (1.0 + p(-7), p(-8)), (1.0, p(-8) + p(-15)), (-1.0, -p(-8)), ((2.0 - p(-7)) * p(127), p(119))]),
    ];
    for (ty, pairs) in cases {
        let n = pairs.len() as i32;
        let g = Gemm::new(N, N, 2, n, 2, 0).types(ty, ty);
        let a = vec![1.0, 0.5, 1.0, 0.5];
        let b: Vec<f64> = pairs.iter().flat_map(|&(x, y)| [x, y]).collect();
        let got = g.run(&d, &[a, b, vec![f64::NAN; 2 * n as usize]]);
        for (j, &(x, y)) in pairs.iter().enumerate() {
            for (row, scale) in [(0, 1.0), (1, 0.5)] {
                let want = quantize(ty, scale * (x + y));
                assert_eq!(got[row + 2 * j].to_bits(), want.to_bits(), "{ty:?}: {scale}·({x:e} + {y:e}) gave {:e}, not {want:e}", got[row + 2 * j]);
            }
        }
    }
    // The two documented cases by value: 1 + 2⁻¹¹ is a tie in f16 (down to even 1), 65520 is ∞.
    assert_eq!(quantize(F16, 1.0 + p(-11)), 1.0);
    assert_eq!(quantize(F16, 65520.0), f64::INFINITY);
}

#[test]
fn no_products_scale_c_by_beta() {
    if !on_cuda(module_path!(), "no_products_scale_c_by_beta") {
        return;
    }
    let d = Device::new();
    let mut rng = Rng(3);
    for c_ty in [F32, F16] {
        for k in [0, 4] {
            // k = 0 adds no products; α = 0 adds them times zero.
            let alpha = if k == 0 { 2.0 } else { 0.0 };
            for beta in [0.0, 0.5, 1.0, -2.0] {
                let g = Gemm::new(N, T, 6, 5, k, 1).types(c_ty, c_ty).scalars(alpha, beta);
                let ops = g.operands(&mut rng);
                let got = g.run(&d, &ops);
                for (at, (&x, &before)) in got.iter().zip(&ops[2]).enumerate() {
                    let want = if at % g.ldc as usize >= 6 { before } else if beta == 0.0 { 0.0 } else { beta as f64 * before };
                    assert!(x == want || (x.is_nan() && want.is_nan()), "{g:?}: C[{at}] = {x}, not {want}");
                }
            }
        }
    }
    // Empty C: nothing to do, whatever β is.
    for (m, n) in [(0, 4), (4, 0)] {
        let g = Gemm::new(N, N, m, n, 3, 0).scalars(1.0, 0.0);
        let ops = [vec![1.0; g.lens()[0]], vec![1.0; g.lens()[1]], vec![f64::NAN; g.lens()[2]]];
        assert!(g.run(&d, &ops).iter().all(|x| x.is_nan()), "{g:?} wrote C");
    }
}

#[test]
fn argument_checks_answer_as_cublas_documents() {
    if !on_cuda(module_path!(), "argument_checks_answer_as_cublas_documents") {
        return;
    }
    let d = Device::new();
    let buffer = d.stream.alloc_zeros::<f32>(4096).unwrap();
    let (p, _p) = buffer.device_ptr(&d.stream);
    let handle = *d.blas.handle();
    let status = |g: Gemm| match g.call(handle, p, p, p) {
        Ok(()) => Status::CUBLAS_STATUS_SUCCESS,
        Err(CublasError(s)) => s,
    };
    let invalid = Status::CUBLAS_STATUS_INVALID_VALUE;
    let unsupported = Status::CUBLAS_STATUS_NOT_SUPPORTED;
    let base = Gemm::new(N, N, 8, 6, 5, 0);
    assert_eq!(status(base), Status::CUBLAS_STATUS_SUCCESS);
    for (what, g, want) in [
        ("m < 0", Gemm { m: -1, ..base }, invalid),
        ("n < 0", Gemm { n: -1, ..base }, invalid),
        ("k < 0", Gemm { k: -1, ..base }, invalid),
        ("CUBLAS_OP_CONJG for A", Gemm { ta: Op::CUBLAS_OP_CONJG, lda: 5, ..base }, invalid),
        ("CUBLAS_OP_CONJG for B", Gemm { tb: Op::CUBLAS_OP_CONJG, ldb: 6, ..base }, invalid),
        ("lda < m", Gemm { lda: 7, ..base }, invalid),
        ("lda < k for op(A) = Aᵀ", Gemm { ta: T, lda: 4, ..base }, invalid),
        ("ldb < k", Gemm { ldb: 4, ..base }, invalid),
        ("ldb < n for op(B) = Bᵀ", Gemm { tb: T, ldb: 5, ..base }, invalid),
        ("ldc < m", Gemm { ldc: 7, ..base }, invalid),
        ("lda = 0 with m = 0", Gemm { m: 0, lda: 0, ldc: 1, ..base }, invalid),
        ("A f32, B f16", Gemm { b_ty: F16, ..base }, unsupported),
        ("A and B f32, C f16", base.types(F32, F16), unsupported),
        ("A and B f16, C bf16", base.types(F16, BF16), unsupported),
        ("f64 operands", base.types(Ty::CUDA_R_64F, Ty::CUDA_R_64F), unsupported),
        ("f64 compute", Gemm { compute: Compute::CUBLAS_COMPUTE_64F, ..base }, unsupported),
        ("f16 compute", Gemm { compute: Compute::CUBLAS_COMPUTE_16F, ..base }, unsupported),
        ("TF32 compute with f16 operands", Gemm { compute: Compute::CUBLAS_COMPUTE_32F_FAST_TF32, ..base.types(F16, F32) }, unsupported),
    ] {
        assert_eq!(status(g), want, "{what}: {g:?}");
    }
    // What the backend and cuBLAS's table accept: every 16-bit pairing, and f32 with the fast modes.
    for g in [
        base.types(F16, F32),
        base.types(F16, F16),
        base.types(BF16, F32),
        base.types(BF16, BF16),
        Gemm { compute: Compute::CUBLAS_COMPUTE_32F_PEDANTIC, ..base },
        Gemm { compute: Compute::CUBLAS_COMPUTE_32F_FAST_TF32, ..base },
        Gemm { compute: Compute::CUBLAS_COMPUTE_32F_FAST_16BF, ..base },
        Gemm { compute: Compute::CUBLAS_COMPUTE_32F_FAST_16F, ..base },
    ] {
        assert_eq!(status(g), Status::CUBLAS_STATUS_SUCCESS, "{g:?}");
    }
    let not_initialized = Err(CublasError(Status::CUBLAS_STATUS_NOT_INITIALIZED));
    assert_eq!(base.call(std::ptr::null_mut(), p, p, p), not_initialized, "a NULL handle");
    if emulated() {
        // SAFETY: a handle of this test's own, destroyed once; using it after that is what is checked.
        unsafe {
            let gone = cudarc::cublas::result::create_handle().unwrap();
            cudarc::cublas::result::destroy_handle(gone).unwrap();
            assert_eq!(base.call(gone, p, p, p), not_initialized, "a destroyed handle");
            assert_eq!(cudarc::cublas::result::set_stream(gone, d.stream.cu_stream().cast()), not_initialized);
            assert_eq!(cudarc::cublas::result::destroy_handle(gone), not_initialized);
        }
        let scalar = 1.0f32;
        // SAFETY: rejected before anything is read.
        let null_alpha = unsafe {
            gemm_ex(handle, N, N, 8, 6, 5, std::ptr::null(), p as *const c_void, F32, 8, p as *const c_void, F32, 5, (&scalar as *const f32).cast(), p as *mut c_void, F32, 8, Compute::CUBLAS_COMPUTE_32F, cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT)
        };
        assert_eq!(null_alpha, Err(CublasError(invalid)), "a NULL alpha");
    }
    d.stream.synchronize().unwrap();
}

#[test]
fn the_gemm_runs_in_turn_on_the_handles_stream() {
    if !on_cuda(module_path!(), "the_gemm_runs_in_turn_on_the_handles_stream") {
        return;
    }
    let d = Device::new();
    let other = d.stream.context().new_stream().unwrap();
    let g = Gemm::new(T, N, 20, 30, 40, 1).scalars(1.0, 0.0);
    let ops = g.operands(&mut Rng(4));
    let (a, b, mut c) = (d.upload(g.a_ty, &ops[0]), d.upload(g.b_ty, &ops[1]), d.upload(g.c_ty, &ops[2]));
    // Uploads from pageable memory may still be on their way when the call returns.
    d.stream.synchronize().unwrap();
    let gate = StreamGate::hold(d.stream.cu_stream());
    let (ap, _a) = a.device_ptr(&d.stream);
    let (bp, _b) = b.device_ptr(&d.stream);
    let (cp, _c) = c.device_ptr_mut(&d.stream);
    g.call(*d.blas.handle(), ap, bp, cp).unwrap();
    // Queued behind the held host function: C, read on another stream, is still all NaN.
    let mut early = vec![0u8; 4 * g.lens()[2]];
    // SAFETY: `early` holds C's bytes; `other` is synchronized before it is read.
    unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut early, cp, other.cu_stream()) }.unwrap();
    other.synchronize().unwrap();
    gate.open();
    assert!(decode(F32, &early).iter().all(|x| x.is_nan()), "the GEMM ran before the work queued ahead of it on its stream");
    d.stream.synchronize().unwrap();
    assert!(!gate.timed_out(), "cublasGemmEx waited for its stream instead of queueing on it");
    let mut after = vec![0u8; early.len()];
    // SAFETY: as above, after the GEMM's stream has finished.
    unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut after, cp, other.cu_stream()) }.unwrap();
    other.synchronize().unwrap();
    g.verify(&ops, &decode(F32, &after));
}

#[test]
fn a_gemm_reaching_past_its_allocation_faults_the_context() {
    if !on_cuda(module_path!(), "a_gemm_reaching_past_its_allocation_faults_the_context") || !emulated() {
        // A real GPU faults only past the allocation's page, which cuBLAS's own sizes don't reach.
        return;
    }
    let d = Device::new();
    let g = Gemm::new(N, N, 8, 6, 5, 0);
    let (a, b) = (d.stream.alloc_zeros::<f32>(40).unwrap(), d.stream.alloc_zeros::<f32>(30).unwrap());
    // C needs 8 × 6 values; one short.
    let mut c = d.stream.alloc_zeros::<f32>(47).unwrap();
    {
        let (ap, _a) = a.device_ptr(&d.stream);
        let (bp, _b) = b.device_ptr(&d.stream);
        let (cp, _c) = c.device_ptr_mut(&d.stream);
        // The launch succeeds; the fault comes when the GEMM runs.
        g.call(*d.blas.handle(), ap, bp, cp).unwrap();
    }
    let fault = d.stream.synchronize().unwrap_err();
    assert_eq!(fault, DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS));
}
