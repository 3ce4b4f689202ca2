//! The CUDA backend's per-shard primitives (src/backend/mod.rs `Primitives`), on each local GPU:
//! the kernels of kernels/*.cu, cuBLAS for the three GEMMs; the step itself is the step
//! driver's (src/head/driver.rs), the collectives NCCL's (src/comm/nccl.rs).
//!
//! Scope of this version: host batches are uploaded once; device batches are staged through the
//! host for validation (labels in range, finite rows) and their gradients written back on the
//! device; AdamW/SGD updates, the finiteness checks and gradient accumulation run on the GPU
//! (accumulating a second compute before an apply merges the rows on the host).

use super::device::DeviceInfo;
use super::kernels::{arch_of, cubin_for};
use super::plan::{class_chunks, combine_grid, eval_chunk_bytes, stats_grid, STATS_COLUMNS, THREADS};
use super::select::{check_selected, compaction_offsets, kth_largest};
use crate::backend::step::{phase, softmax_factors, DeviceTimes, RowGrads, RowStats, StepPlan, Update};
use crate::backend::{Primitives, ShardState};
use crate::batch::{Batches, DeviceBatch, HostBatch, HostValues, Outputs};
use crate::config::{Config, DType, MarginGrad, OptimizerKind};
use crate::error::{Error, Result, Status};
use crate::memory::Device;
use crate::rng;
use crate::sharding::{sample_count, ShardRange};
use crate::state::StateTensor;
use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::sys::CUevent;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

fn device_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(Status::Device, format!("CUDA {what}: {e}"))
}

/// Block size of the compaction kernels (their counts are per block of this many classes).
const COMPACT_BLOCK: u32 = 1024;

fn grid_for(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(THREADS as usize).clamp(1, 65_535 * 16) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

fn blas_type(d: DType) -> blas_sys::cudaDataType {
    match d {
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
    }
}

/// One GPU's shard: its centers and optimizer state, and the step's scratch.
struct GpuShard {
    /// First, so that its events go before the stream and context they belong to.
    timing: std::cell::RefCell<Timing>,
    range: ShardRange,
    /// What one evaluation chunk may take on this GPU (`eval_chunk_bytes`).
    eval_budget: usize,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    centers: CudaSlice<f32>,
    state: Vec<(StateTensor, CudaSlice<f32>)>,
    steps: Option<CudaSlice<u32>>,
    /// This step's sampled classes (local rows) and their count; the rest is valid between
    /// `forward` and `backward`.
    k: usize,
    n: usize,
    sampled: Option<CudaSlice<u32>>,
    step: Option<StepBuffers>,
    /// This shard's row maxima before the all-reduce, for `rescale_sums` (training and evaluation).
    local_max: Option<CudaSlice<f32>>,
    /// This step's center gradients over `sampled`, and the accumulated ones since the last update.
    pending: Option<DeviceRowGrads>,
    accumulated: Option<DeviceRowGrads>,
    undo: Option<Undo>,
}

/// CUDA events on a shard's stream around each phase and each GEMM, created once and re-recorded
/// every step: the device's own time of the work, which the host only enqueues.
struct Timing {
    phases: [(CUevent, CUevent); phase::COUNT],
    /// A pair per GEMM of the current step (`used` of them), grown on the first steps only.
    gemms: Vec<(CUevent, CUevent)>,
    used: usize,
}

impl Timing {
    fn new() -> Result<Timing> {
        let mut phases = [(std::ptr::null_mut(), std::ptr::null_mut()); phase::COUNT];
        for p in &mut phases {
            *p = event_pair()?;
        }
        Ok(Timing { phases, gemms: Vec::new(), used: 0 })
    }

    fn next_gemm(&mut self) -> Result<(CUevent, CUevent)> {
        if self.used == self.gemms.len() {
            self.gemms.push(event_pair()?);
        }
        self.used += 1;
        Ok(self.gemms[self.used - 1])
    }
}

impl Drop for Timing {
    fn drop(&mut self) {
        for &(a, b) in self.phases.iter().chain(&self.gemms) {
            // SAFETY: events this struct created; destroying one still pending is allowed.
            unsafe {
                let _ = cudarc::driver::result::event::destroy(a);
                let _ = cudarc::driver::result::event::destroy(b);
            }
        }
    }
}

fn event_pair() -> Result<(CUevent, CUevent)> {
    use cudarc::driver::{result::event, sys::CUevent_flags};
    let make = || event::create(CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| device_error("timing event", e));
    Ok((make()?, make()?))
}

/// Seconds between two recorded events, after the second completed; NaN when either was never
/// recorded or the device failed, so that no made-up time is reported.
fn elapsed(start: CUevent, end: CUevent) -> f64 {
    use cudarc::driver::result::event;
    // SAFETY: live events of a `Timing`.
    unsafe { event::synchronize(end).and_then(|_| event::elapsed(start, end)) }.map_or(f64::NAN, |ms| ms as f64 / 1e3)
}

/// What the forward pass leaves on the device for the backward pass.
struct StepBuffers {
    unit: CudaSlice<f32>,
    unit_gemm: CudaSlice<u8>,
    inv_norm_e: CudaSlice<f32>,
    col: CudaSlice<i32>,
    w_gemm: CudaSlice<u8>,
    inv_norm_w: CudaSlice<f32>,
    cos: CudaSlice<f32>,
    target_logit: CudaSlice<f32>,
    target_slope: CudaSlice<f32>,
}

/// Sorted rows and their gradients on a GPU.
struct DeviceRowGrads {
    rows: CudaSlice<u32>,
    grads: CudaSlice<f32>,
    len: usize,
}

/// How to take back the last `accumulate`.
enum Undo {
    Moved,
    Replaced(DeviceRowGrads),
}

/// The local GPUs' shards.
pub struct CudaBackend {
    cfg: Config,
    ranges: Vec<ShardRange>,
    shards: Vec<GpuShard>,
}

// SAFETY: CUDA handles are used by one thread at a time (the head's lock).
unsafe impl Send for CudaBackend {}

impl GpuShard {
    fn f(&self, name: &str) -> &CudaFunction {
        &self.functions[name]
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize, what: &str) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| self.out_of_memory(n, what, e))
    }

    /// A step buffer that its first kernel, GEMM or copy writes in full before anything reads
    /// it: not zeroed (at 10M classes zeroing such buffers cost ~9 GB of memsets a step). It comes
    /// from the device's stream-ordered pool, which keeps what the previous step released.
    fn scratch<T: cudarc::driver::DeviceRepr>(&self, n: usize, what: &str) -> Result<CudaSlice<T>> {
        // SAFETY: callers use it only for buffers written in full before they are read.
        unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(|e| self.out_of_memory(n, what, e))
    }

    /// `host` copied into a new device buffer. cudarc's `clone_htod` reports a buffer that does not
    /// fit as a failed copy (PFC_ERR_DEVICE); here it is exhausted memory naming `what`, as for
    /// every other step buffer.
    fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T], what: &str) -> Result<CudaSlice<T>> {
        let mut buf = self.scratch::<T>(host.len(), what)?;
        if !host.is_empty() {
            self.stream.memcpy_htod(host, &mut buf).map_err(|e| device_error("upload", e))?;
        }
        Ok(buf)
    }

    /// Drops what one step keeps between its primitives.
    fn release_step(&mut self) {
        self.sampled = None;
        self.step = None;
        self.local_max = None;
        self.pending = None;
    }

    fn out_of_memory(&self, n: usize, what: &str, e: impl std::fmt::Display) -> Error {
        Error::new(Status::OutOfMemory, format!("GPU {}: cannot allocate {what} ({n} elements): {e}", self.stream.context().ordinal()))
    }

    /// `C (m×n, ld ldc) = op(A)·op(B)` in column-major terms, f32 output, `dtype` inputs, f32 compute.
    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, transa: bool, transb: bool, m: usize, n: usize, k: usize, a: u64, lda: usize, b: u64, ldb: usize, c: u64, ldc: usize, dtype: DType, accumulate: bool) -> Result<()> {
        let op = |t: bool| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0f32 });
        let (start, end) = self.timing.borrow_mut().next_gemm()?;
        let stream = self.stream.cu_stream();
        // SAFETY: live events of this shard's context, recorded on its stream.
        unsafe { cudarc::driver::result::event::record(start, stream) }.map_err(|e| device_error("timing event", e))?;
        // SAFETY: the pointers come from live allocations of at least the sizes the shapes address.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
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
        .map_err(|e| device_error("cuBLAS GEMM", e))?;
        // SAFETY: as above.
        unsafe { cudarc::driver::result::event::record(end, stream) }.map_err(|e| device_error("timing event", e))
    }
}

impl CudaBackend {
    /// The local shards of `cfg`'s job (global ranks `first_rank..`), one per device.
    pub fn new(cfg: &Config, devices: &[DeviceInfo]) -> Result<Self> {
        let d = cfg.embedding_dim;
        let ranges: Vec<ShardRange> = (cfg.first_rank..cfg.first_rank + cfg.local_shards).map(|r| ShardRange::of(cfg.num_classes, cfg.world_size, r)).collect();
        let mut shards = Vec::new();
        for (dev, &range) in devices.iter().zip(&ranges) {
            let ctx = CudaContext::new(dev.ordinal as usize).map_err(|e| device_error("context", e))?;
            // SAFETY: all of a shard's work, NCCL's included, runs on its one stream and callers'
            // streams are ordered by explicit events (`after_caller`), so cudarc's two events per
            // allocation would only cost event creations.
            unsafe { ctx.disable_event_tracking() };
            keep_released_memory(&ctx)?;
            let stream = ctx.new_stream().map_err(|e| device_error("stream", e))?;
            let blas = CudaBlas::new(stream.clone()).map_err(|e| device_error("cuBLAS handle", e))?;
            let mut functions = HashMap::new();
            for (source, cubin) in cubin_for(&arch_of(dev.compute_capability))? {
                let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(|e| device_error(source.file, e))?;
                for &entry in source.entries {
                    functions.insert(entry, module.load_function(entry).map_err(|e| device_error(entry, e))?);
                }
            }
            let rows = range.len as usize;
            let alloc = |n: usize, what: &str| {
                stream.alloc_zeros::<f32>(n).map_err(|e| Error::new(Status::OutOfMemory, format!("GPU {}: cannot allocate {what}: {e}", dev.ordinal)))
            };
            // The CPU backend's initial centers, drawn on the device from (seed, class): nothing
            // crosses the bus (at 10M classes the host's draw and upload took tens of seconds).
            // SAFETY: `init_centers` writes every value before anything reads it.
            let mut centers = unsafe { stream.alloc::<f32>((rows * d).max(1)) }
                .map_err(|e| Error::new(Status::OutOfMemory, format!("GPU {}: cannot allocate the class centers: {e}", dev.ordinal)))?;
            {
                let base = rng::purpose_base(cfg.seed, rng::PURPOSE_INIT);
                let (start, rows64, d32) = (range.start, rows as u64, d as i32);
                let mut b = stream.launch_builder(&functions["init_centers"]);
                b.arg(&base).arg(&start).arg(&rows64).arg(&d32).arg(&cfg.init_std).arg(&mut centers);
                // SAFETY: arguments match kernels/init.cu `init_centers`; `centers` holds rows × d values.
                unsafe { b.launch(grid_for(rows * d.div_ceil(2))) }.map_err(|e| device_error("init_centers", e))?;
            }
            let state = StateTensor::for_optimizer(cfg.optimizer.kind)[1..]
                .iter()
                .map(|&t| Ok((t, alloc(rows * d, t.name())?)))
                .collect::<Result<Vec<_>>>()?;
            let steps = if cfg.optimizer.kind == OptimizerKind::AdamW {
                Some(stream.alloc_zeros::<u32>(rows).map_err(|e| Error::new(Status::OutOfMemory, format!("step counts: {e}")))?)
            } else {
                None
            };
            // SAFETY: the context's own device.
            let total = unsafe { cudarc::driver::result::device::total_mem(ctx.cu_device()) }.map_err(|e| device_error("device memory", e))?;
            shards.push(GpuShard {
                range,
                eval_budget: eval_chunk_bytes(total as u64),
                stream,
                blas,
                functions,
                centers,
                state,
                steps,
                k: 0,
                n: 0,
                sampled: None,
                step: None,
                local_max: None,
                pending: None,
                accumulated: None,
                undo: None,
                timing: std::cell::RefCell::new(Timing::new()?),
            });
        }
        Ok(CudaBackend { cfg: cfg.clone(), ranges, shards })
    }

    /// The shards' streams, in rank order: the collectives run on them.
    pub fn streams(&self) -> Vec<Arc<CudaStream>> {
        self.shards.iter().map(|s| s.stream.clone()).collect()
    }

    /// Runs `f` on the GPUs of `batches`' shards with the host copies of device batches, after
    /// the callers' streams: device batches are validated where host ones are, on the host.
    fn stage(&mut self, batches: &[DeviceBatch]) -> Result<Vec<(HostValues, Vec<i64>)>> {
        use cudarc::driver::result::{memcpy_dtoh_async, stream};
        let dim = self.cfg.embedding_dim;
        let mut staged = Vec::with_capacity(batches.len());
        for (shard, b) in self.shards.iter().zip(batches) {
            shard.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
            let ours = shard.stream.cu_stream();
            after_caller(caller_stream(b.stream), ours)?;
            let mut embeddings = HostValues::zeros(b.dtype, b.rows * dim);
            let mut labels = vec![0i64; b.rows];
            if b.rows > 0 {
                // SAFETY: the caller's pointers hold `rows` labels and `rows × dim` values on this GPU.
                unsafe {
                    match &mut embeddings {
                        HostValues::F32(v) => memcpy_dtoh_async(v, b.embeddings, ours),
                        HostValues::F16(v) => memcpy_dtoh_async(v, b.embeddings, ours),
                        HostValues::BF16(v) => memcpy_dtoh_async(v, b.embeddings, ours),
                    }
                    .map_err(|e| device_error("copying device embeddings", e))?;
                    memcpy_dtoh_async(&mut labels, b.labels, ours).map_err(|e| device_error("copying device labels", e))?;
                    stream::synchronize(ours).map_err(|e| device_error("synchronize", e))?;
                }
            }
            staged.push((embeddings, labels));
        }
        let views: Vec<HostBatch> = staged.iter().map(|(e, l)| HostBatch { embeddings: e.as_embeddings(), labels: l }).collect();
        crate::batch::validate(&views, self.cfg.num_classes, dim)?;
        Ok(staged)
    }
}

macro_rules! launch {
    ($shard:expr, $name:literal, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = $shard.f($name);
        let mut b = $shard.stream.launch_builder(f);
        $( b.arg($arg); )*
        // SAFETY: the argument list matches the kernel's signature in kernels/*.cu.
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(|e| device_error($name, e))
    }};
}

impl GpuShard {
    /// Sampling on the GPU (kernels/sampling.cu): the set src/sharding.rs `sample` picks.
    fn sample(&mut self, labels: &CudaSlice<i64>, n: usize, plan: StepPlan) -> Result<()> {
        let len = self.range.len as usize;
        let (start, len64) = (self.range.start, self.range.len);
        let mut positive = self.zeros::<u8>(len, "positive flags")?;
        let n32 = n as i32;
        launch!(self, "mark_positives", grid_for(n), labels, &n32, &start, &len64, &mut positive)?;
        let want = sample_count(plan.sample_rate, self.range.len) as usize;
        if want >= len {
            let all: Vec<u32> = (0..len as u32).collect();
            self.sampled = Some(self.upload(&all, "sampled ids")?);
            self.k = len;
            return Ok(());
        }
        let stream = rng::stream(plan.seed, rng::PURPOSE_SAMPLING, plan.step);
        let mut keys = self.scratch::<u64>(len, "sampling keys")?;
        launch!(self, "sample_keys", grid_for(len), &stream, &start, &len64, &positive, &mut keys)?;
        // The k-th largest key, one byte at a time from the top (positives carry the largest key).
        let positives = {
            let mut count = self.zeros::<u32>(1, "positive count")?;
            launch!(self, "count_flags", grid_for(len.min(1 << 20)), &positive, &len64, &mut count)?;
            self.stream.clone_dtoh(&count).map_err(|e| device_error("download", e))?[0] as usize
        };
        let k = want.max(positives);
        // One histogram for the eight passes, zeroed before each (its kernel adds atomically).
        let mut hist = self.zeros::<u32>(256, "radix histogram")?;
        let (threshold, take_equal) = kth_largest(k as u64, |prefix, mask, shift| {
            self.stream.memset_zeros(&mut hist).map_err(|e| device_error("memset", e))?;
            launch!(self, "radix_histogram", grid_for(len.min(1 << 20)), &keys, &len64, &prefix, &mask, &shift, &mut hist)?;
            self.stream.clone_dtoh(&hist).map_err(|e| device_error("download", e))
        })?;
        let blocks = len.div_ceil(COMPACT_BLOCK as usize);
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (COMPACT_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut above = self.scratch::<u32>(blocks, "block counts")?;
        let mut equal = self.scratch::<u32>(blocks, "block counts")?;
        launch!(self, "count_selected", cfg, &keys, &len64, &threshold, &mut above, &mut equal)?;
        let above_h: Vec<u32> = self.stream.clone_dtoh(&above).map_err(|e| device_error("download", e))?;
        let equal_h: Vec<u32> = self.stream.clone_dtoh(&equal).map_err(|e| device_error("download", e))?;
        let (sel_before, eq_before, total) = compaction_offsets(&above_h, &equal_h, take_equal);
        check_selected(total, k)?;
        let sel_d = self.upload(&sel_before, "block offsets")?;
        let eq_d = self.upload(&eq_before, "block offsets")?;
        let mut out = self.scratch::<u32>(k, "sampled ids")?;
        launch!(self, "compact_selected", cfg, &keys, &len64, &threshold, &take_equal, &sel_d, &eq_d, &mut out)?;
        self.sampled = Some(out);
        self.k = k;
        Ok(())
    }
}

impl Primitives for CudaBackend {
    type Mem = Device;

    fn ranges(&self) -> &[ShardRange] {
        &self.ranges
    }

    fn load(&mut self, batches: Batches<'_, '_>) -> Result<Vec<(CudaSlice<f32>, CudaSlice<i64>)>> {
        // A step that failed on one shard leaves the others' forward buffers (the cosines above
        // all) and pending gradients behind; a new step must not hold them beside its own.
        for shard in &mut self.shards {
            shard.release_step();
        }
        let staged;
        let host: Vec<HostBatch> = match batches {
            Batches::Host(b) => b.to_vec(),
            Batches::Device(b) => {
                staged = self.stage(b)?;
                staged.iter().map(|(e, l)| HostBatch { embeddings: e.as_embeddings(), labels: l }).collect()
            }
        };
        let mut out = Vec::with_capacity(host.len());
        for (shard, b) in self.shards.iter().zip(&host) {
            let mut e = Vec::with_capacity(b.embeddings.len());
            b.embeddings.extend_f32(&mut e);
            let emb = if e.is_empty() { shard.zeros::<f32>(1, "embeddings")? } else { shard.upload(&e, "the batch's embeddings")? };
            let labels = if b.labels.is_empty() { shard.zeros::<i64>(1, "labels")? } else { shard.upload(b.labels, "the batch's labels")? };
            out.push((emb, labels));
        }
        Ok(out)
    }

    fn alloc_f32(&mut self, shard: usize, len: usize, what: &str) -> Result<CudaSlice<f32>> {
        self.shards[shard].zeros(len, what)
    }

    fn alloc_i64(&mut self, shard: usize, len: usize, what: &str) -> Result<CudaSlice<i64>> {
        self.shards[shard].zeros(len, what)
    }

    fn sample(&mut self, shard: usize, labels: &CudaSlice<i64>, plan: StepPlan) -> Result<u64> {
        let n = labels.len();
        let g = &mut self.shards[shard];
        g.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
        g.sample(labels, n, plan)?;
        Ok(g.k as u64)
    }

    fn forward(&mut self, shard: usize, emb: CudaSlice<f32>, labels: &CudaSlice<i64>, plan: StepPlan) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (d, dtype) = (self.cfg.embedding_dim, self.cfg.compute_dtype);
        let m = &self.cfg.margin;
        let (s, filter) = (m.scale, m.interclass_filter);
        let (m1, m2, m3) = (m.m1, m.m2, m.m3);
        let fallback = i32::from(m.arcface_fallback);
        let exact = i32::from(m.grad == MarginGrad::Exact);
        let dt = dtype_code(dtype);
        let n = emb.len() / d;
        let (n32, d32) = (n as i32, d as i32);
        let shard = &mut self.shards[shard];
        shard.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
        shard.n = n;
        let mut unit = shard.scratch::<f32>(n * d, "normalized embeddings")?;
        let mut unit_gemm = shard.scratch::<u8>(n * d * dtype.size(), "GEMM embeddings")?;
        let mut inv_e = shard.scratch::<f32>(n, "embedding norms")?;
        launch!(shard, "normalize_rows", per_row(n), &emb, &n32, &d32, &mut unit, &mut unit_gemm, &dt, &mut inv_e)?;
        drop(emb);
        let k = shard.k;
        let k32 = k as i32;
        let sampled = shard.sampled.take().ok_or_else(|| Error::new(Status::Panic, "internal error: forward before sampling"))?;
        let mut col = shard.scratch::<i32>(n, "label columns")?;
        let (start, len64) = (shard.range.start, shard.range.len);
        launch!(shard, "label_columns", grid_for(n), labels, &n32, &start, &len64, &sampled, &k32, &mut col)?;
        let center_bytes = d * dtype.size();
        let chunks = class_chunks(k, n, center_bytes, plan.train, shard.eval_budget);
        let widest = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        // Training keeps every sampled column for the backward pass; evaluation reuses one chunk's.
        let columns = if plan.train { k } else { widest };
        let mut w_gemm = shard.scratch::<u8>(columns * center_bytes, "GEMM centers")?;
        let mut inv_w = shard.scratch::<f32>(columns, "center norms")?;
        let mut cos = shard.scratch::<f32>(columns * n, "cosines (sampled classes × global batch)")?;
        let mut max_stats = shard.scratch::<f32>(3 * n, "row statistics")?;
        let mut sum_stats = shard.scratch::<f32>(3 * n, "row statistics")?;
        let mut slope = shard.scratch::<f32>(n, "target slopes")?;
        let mut logit = shard.scratch::<f32>(n, "target logits")?;
        {
            let (mut head_max, mut rest) = max_stats.split_at_mut(n);
            let (mut other, mut target_cos) = rest.split_at_mut(n);
            let (mut sum, mut tail) = sum_stats.split_at_mut(n);
            let (mut rest, mut target_logit) = tail.split_at_mut(n);
            let groups = widest.div_ceil(STATS_COLUMNS).max(1);
            let mut part_max = shard.scratch::<f32>(groups * n, "partial statistics")?;
            let mut part_sum = shard.scratch::<f32>(groups * n, "partial statistics")?;
            let mut part_rest = shard.scratch::<f32>(groups * n, "partial statistics")?;
            let mut part_other = shard.scratch::<f32>(groups * n, "partial statistics")?;
            let cols = STATS_COLUMNS as i32;
            let stream = shard.stream.clone();
            for (index, chunk) in chunks.iter().enumerate() {
                let (first, count) = (chunk.start, chunk.len());
                let at = if plan.train { first } else { 0 };
                let (first32, count32, merge) = (first as i32, count as i32, i32::from(index > 0));
                let ids = sampled.slice(first..first + count);
                let mut w = w_gemm.slice_mut(at * center_bytes..(at + count) * center_bytes);
                let mut inv = inv_w.slice_mut(at..at + count);
                launch!(shard, "gather_centers", per_row(count), &shard.centers, &ids, &count32, &d32, &mut w, &dt, &mut inv)?;
                let mut c = cos.slice_mut(at * n..(at + count) * n);
                {
                    let (a, _ga) = unit_gemm.device_ptr(&stream);
                    let (b, _gb) = w.device_ptr(&stream);
                    let (cp, _gc) = c.device_ptr_mut(&stream);
                    // cos [count][N] = Ŵ·X̂ᵀ; column-major: C (N×count) = X̂ᵀ(N×d)·Ŵ(d×count).
                    shard.gemm(true, false, n, count, d, a, d, b, d, cp, n, dtype, false)?;
                }
                launch!(shard, "target_logits", grid_for(n), &mut c, &n32, &col, &first32, &count32, &s, &m1, &m2, &m3, &fallback, &exact, &mut target_logit, &mut slope, &mut target_cos)?;
                let (gx, gy, gz) = stats_grid(n, count);
                let cfg = LaunchConfig { grid_dim: (gx, gy, gz), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
                launch!(shard, "row_stats", cfg, &mut c, &count32, &n32, &col, &first32, &mut target_logit, &s, &filter, &cols, &mut part_max, &mut part_sum, &mut part_rest, &mut part_other)?;
                let parts32 = gy as i32;
                let cfg = LaunchConfig { grid_dim: combine_grid(n), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
                launch!(shard, "combine_row_stats", cfg, &part_max, &part_sum, &part_rest, &part_other, &parts32, &n32, &merge, &mut head_max, &mut sum, &mut rest, &mut other)?;
            }
            shard.stream.memcpy_dtod(&target_logit, &mut logit).map_err(|e| device_error("copy", e))?;
        }
        shard.local_max = Some(shard.stream.clone_dtod(&max_stats.slice(0..n)).map_err(|e| device_error("copy", e))?);
        // Evaluation's buffers go now, not with the next step.
        shard.step = plan.train.then_some(StepBuffers { unit, unit_gemm, inv_norm_e: inv_e, col, w_gemm, inv_norm_w: inv_w, cos, target_logit: logit, target_slope: slope });
        shard.sampled = plan.train.then_some(sampled);
        Ok((max_stats, sum_stats))
    }

    fn rescale_sums(&mut self, shard: usize, maxes: &CudaSlice<f32>, sums: &mut CudaSlice<f32>) -> Result<()> {
        let g = &self.shards[shard];
        let n = g.n;
        let n32 = n as i32;
        let local_max = g.local_max.as_ref().ok_or_else(|| Error::new(Status::Panic, "internal error: rescale before forward"))?;
        let global = maxes.slice(0..n);
        let (mut sum, mut tail) = sums.split_at_mut(n);
        let mut rest = tail.slice_mut(0..n);
        launch!(g, "rescale_sums", grid_for(n), local_max, &global, &mut sum, &mut rest, &n32)
    }

    fn read_stats(&mut self, shard: usize, maxes: &CudaSlice<f32>, sums: &CudaSlice<f32>, n: usize) -> Result<RowStats> {
        let g = &self.shards[shard];
        let maxes: Vec<f32> = g.stream.clone_dtoh(maxes).map_err(|e| device_error("download", e))?;
        let sums: Vec<f32> = g.stream.clone_dtoh(sums).map_err(|e| device_error("download", e))?;
        Ok(RowStats::from_reduced(&maxes, &sums, n))
    }

    fn backward(&mut self, shard: usize, maxes: &CudaSlice<f32>, sums: &CudaSlice<f32>, update: Update) -> Result<CudaSlice<f32>> {
        // This backend updates in `apply` only (it proves nothing beforehand).
        if let Update::Apply(_) = update {
            return Err(Error::new(Status::Panic, "internal error: the CUDA backend was asked to update inside the backward pass"));
        }
        let (d, dtype) = (self.cfg.embedding_dim, self.cfg.compute_dtype);
        let (s, filter) = (self.cfg.margin.scale, self.cfg.margin.interclass_filter);
        let g = &mut self.shards[shard];
        g.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
        let (n, k) = (g.n, g.k);
        let (n32, d32, k32, dt) = (n as i32, d as i32, k as i32, dtype_code(dtype));
        let inv_batch = 1.0 / n as f32;
        let step = g.step.take().ok_or_else(|| Error::new(Status::Panic, "internal error: backward before forward"))?;
        let sum_host: Vec<f32> = g.stream.clone_dtoh(&sums.slice(0..2 * n)).map_err(|e| device_error("download", e))?;
        let (inv_sum, non_target_mass) = softmax_factors(&sum_host, n);
        let inv_sum_d = g.upload(&inv_sum, "softmax factors")?;
        let mass_d = g.upload(&non_target_mass, "softmax factors")?;
        let row_max = maxes.slice(0..n);
        let mut grad_cos = g.scratch::<u8>(k * n * dtype.size(), "cosine gradient")?;
        launch!(g, "cos_gradient", grid_for(k * n), &step.cos, &k32, &n32, &step.col, &step.target_logit, &step.target_slope, &row_max, &inv_sum_d, &mass_d, &inv_batch, &s, &filter, &mut grad_cos, &dt)?;
        let mut gx = g.scratch::<f32>(n * d, "embedding gradient")?;
        let mut g_unit = g.scratch::<f32>(k * d, "center gradient")?;
        {
            let stream = g.stream.clone();
            let (gp, _g) = grad_cos.device_ptr(&stream);
            let (w, _w) = step.w_gemm.device_ptr(&stream);
            let (x, _x) = step.unit_gemm.device_ptr(&stream);
            let (gxp, _gxp) = gx.device_ptr_mut(&stream);
            // gx [N][d] = Gᵀ·Ŵ; column-major: (d×N) = Ŵ(d×k)·G(k×N).
            g.gemm(false, true, d, n, k, w, d, gp, n, gxp, d, dtype, false)?;
            let (gu, _gu) = g_unit.device_ptr_mut(&stream);
            // gŴ [k][d] = G·X̂; column-major: (d×k) = X̂(d×N)·G(N×k), G being [k][N] row-major.
            g.gemm(false, false, d, k, n, x, d, gp, n, gu, d, dtype, false)?;
        }
        let sampled = g.sampled.take().ok_or_else(|| Error::new(Status::Panic, "internal error: backward before sampling"))?;
        let mut projected = g.scratch::<f32>(k * d, "center gradients (sampled classes × embedding_dim)")?;
        launch!(g, "project_center_grads", per_row(k), &g.centers, &sampled, &g_unit, &step.inv_norm_w, &k32, &d32, &mut projected)?;
        g.pending = Some(DeviceRowGrads { rows: sampled, grads: projected, len: k });
        // The embedding side of the normalization is needed once more, for this shard's rows.
        g.step = Some(step);
        Ok(gx)
    }

    fn embedding_grad(&mut self, shard: usize, summed: CudaSlice<f32>, first_row: usize, rows: usize, world: f32) -> Result<CudaSlice<f32>> {
        let d = self.cfg.embedding_dim;
        let g = &mut self.shards[shard];
        let step = g.step.take().ok_or_else(|| Error::new(Status::Panic, "internal error: embedding gradient before forward"))?;
        let mut out = g.scratch::<f32>(rows * d, "embedding gradient")?;
        if rows > 0 {
            let (rows32, d32, f32_code) = (rows as i32, d as i32, 0i32);
            let u = step.unit.slice(first_row * d..(first_row + rows) * d);
            let inv = step.inv_norm_e.slice(first_row..first_row + rows);
            launch!(g, "embedding_grad", per_row(rows), &summed, &u, &inv, &rows32, &d32, &world, &mut out, &f32_code)?;
        }
        Ok(out)
    }

    fn finite(&mut self, shard: usize, grad: &CudaSlice<f32>) -> Result<bool> {
        let g = &self.shards[shard];
        let mut flag = g.zeros::<i32>(1, "finiteness flag")?;
        let len = grad.len() as u64;
        launch!(g, "flag_non_finite", grid_for(grad.len()), grad, &len, &mut flag)?;
        if let Some(p) = &g.pending {
            let len = (p.len * self.cfg.embedding_dim) as u64;
            launch!(g, "flag_non_finite", grid_for(len as usize), &p.grads, &len, &mut flag)?;
        }
        let host: Vec<i32> = g.stream.clone_dtoh(&flag).map_err(|e| device_error("download", e))?;
        Ok(host[0] == 0)
    }

    fn write_grads(&mut self, grads: &[CudaSlice<f32>], out: Outputs<'_, '_>) -> Result<()> {
        match out {
            Outputs::Host(outs) => {
                for ((g, grad), o) in self.shards.iter().zip(grads).zip(outs.iter_mut()) {
                    if o.is_empty() {
                        continue;
                    }
                    let host: Vec<f32> = g.stream.clone_dtoh(grad).map_err(|e| device_error("download", e))?;
                    o.write(&host[..o.len()]);
                }
            }
            Outputs::Device(batches) => {
                for ((g, grad), b) in self.shards.iter().zip(grads).zip(batches) {
                    if b.rows > 0 {
                        let len = (b.rows * self.cfg.embedding_dim) as u64;
                        let dt = dtype_code(b.dtype);
                        let dst = b.grad;
                        // The caller's buffer, written in place in its dtype.
                        let f = g.f("convert_f32");
                        let mut builder = g.stream.launch_builder(f);
                        builder.arg(grad).arg(&len).arg(&dst).arg(&dt);
                        // SAFETY: matches kernels/normalize.cu `convert_f32`; `dst` holds `len` values of `dtype` on this GPU.
                        unsafe { builder.launch(grid_for(len as usize)) }.map_err(|e| device_error("convert_f32", e))?;
                    }
                    after_caller(g.stream.cu_stream(), caller_stream(b.stream))?;
                }
            }
        }
        Ok(())
    }

    fn accumulate(&mut self, shard: usize) -> Result<()> {
        let d = self.cfg.embedding_dim;
        let g = &mut self.shards[shard];
        let pending = g.pending.take().ok_or_else(|| Error::new(Status::Panic, "internal error: accumulate before backward"))?;
        match g.accumulated.take() {
            None => {
                g.accumulated = Some(pending);
                g.undo = Some(Undo::Moved);
            }
            Some(before) => {
                // A second compute before an apply: the rows are merged on the host.
                let download = |r: &DeviceRowGrads| -> Result<RowGrads> {
                    let rows: Vec<u32> = g.stream.clone_dtoh(&r.rows.slice(0..r.len)).map_err(|e| device_error("download", e))?;
                    let grads: Vec<f32> = g.stream.clone_dtoh(&r.grads.slice(0..r.len * d)).map_err(|e| device_error("download", e))?;
                    Ok(RowGrads { rows, grads })
                };
                let merged = download(&before)?.union(&download(&pending)?, d)?;
                let rows = g.upload(&merged.rows, "accumulated gradient rows")?;
                let grads = g.upload(&merged.grads, "accumulated center gradients")?;
                g.accumulated = Some(DeviceRowGrads { rows, grads, len: merged.rows.len() });
                g.undo = Some(Undo::Replaced(before));
            }
        }
        Ok(())
    }

    fn unaccumulate(&mut self, shard: usize) {
        let g = &mut self.shards[shard];
        match g.undo.take() {
            Some(Undo::Moved) => g.accumulated = None,
            Some(Undo::Replaced(before)) => g.accumulated = Some(before),
            None => {}
        }
    }

    fn discard(&mut self, shard: usize) {
        let g = &mut self.shards[shard];
        g.accumulated = None;
        g.undo = None;
    }

    fn accumulated_rows(&self, shard: usize) -> usize {
        self.shards[shard].accumulated.as_ref().map_or(0, |a| a.len)
    }

    fn update_is_finite(&mut self, shard: usize, lr: f32) -> Result<bool> {
        let mut bad = self.shards[shard].zeros::<i32>(1, "finiteness flag")?;
        self.update(shard, lr, false, &mut bad)?;
        let g = &self.shards[shard];
        let host: Vec<i32> = g.stream.clone_dtoh(&bad).map_err(|e| device_error("download", e))?;
        Ok(host[0] == 0)
    }

    fn apply(&mut self, shard: usize, lr: f32) -> Result<()> {
        let mut bad = self.shards[shard].zeros::<i32>(1, "finiteness flag")?;
        self.update(shard, lr, true, &mut bad)?;
        let g = &mut self.shards[shard];
        g.accumulated = None;
        g.undo = None;
        Ok(())
    }

    /// On shard 0's stream: the shards' streams run the same phases side by side.
    fn mark(&mut self, p: usize, start: bool) {
        let Some(g) = self.shards.first() else { return };
        let mut timing = g.timing.borrow_mut();
        if p == phase::GATHER && start {
            timing.used = 0;
        }
        let (a, b) = timing.phases[p];
        // SAFETY: a live event of this context on its stream; a failed record leaves the phase
        // unrecorded, which `device_times` reports as NaN.
        let _ = unsafe { cudarc::driver::result::event::record(if start { a } else { b }, g.stream.cu_stream()) };
    }

    fn gemm_path(&self) -> &'static str {
        "cublas"
    }

    fn device_times(&self) -> Option<DeviceTimes> {
        let g = self.shards.first()?;
        let _ = g.stream.context().bind_to_thread();
        let timing = g.timing.borrow();
        let mut phases = [f64::NAN; phase::COUNT];
        for (t, &(a, b)) in phases.iter_mut().zip(&timing.phases) {
            *t = elapsed(a, b);
        }
        let gemm = timing.gemms[..timing.used].iter().map(|&(a, b)| elapsed(a, b)).sum();
        Some(DeviceTimes { phases, gemm, peak_bytes: peak_pool_bytes(g.stream.context()) })
    }
}

impl ShardState for CudaBackend {
    fn read_state(&self, tensor: StateTensor, first: u64, count: u64, out: &mut [f32]) -> Result<()> {
        let d = self.cfg.embedding_dim;
        for (shard, row, rows, at) in crate::sharding::pieces(&self.ranges, first, count) {
            let g = &self.shards[shard];
            let src = match tensor {
                StateTensor::Centers => &g.centers,
                t => &g.state.iter().find(|(x, _)| *x == t).ok_or_else(|| Error::invalid(format!("this optimizer keeps no {}", t.name())))?.1,
            };
            let view = src.slice(row * d..(row + rows) * d);
            g.stream.memcpy_dtoh(&view, &mut out[at * d..(at + rows) * d]).map_err(|e| device_error("download", e))?;
        }
        Ok(())
    }

    fn write_state(&mut self, tensor: StateTensor, first: u64, count: u64, values: &[f32]) -> Result<()> {
        let d = self.cfg.embedding_dim;
        for (shard, row, rows, at) in crate::sharding::pieces(&self.ranges, first, count) {
            let g = &mut self.shards[shard];
            let stream = g.stream.clone();
            let dst = match tensor {
                StateTensor::Centers => &mut g.centers,
                t => &mut g.state.iter_mut().find(|(x, _)| *x == t).ok_or_else(|| Error::invalid(format!("this optimizer keeps no {}", t.name())))?.1,
            };
            let mut view = dst.slice_mut(row * d..(row + rows) * d);
            stream.memcpy_htod(&values[at * d..(at + rows) * d], &mut view).map_err(|e| device_error("upload", e))?;
        }
        Ok(())
    }

    fn read_steps(&self, first: u64, count: u64, out: &mut [u32]) -> Result<()> {
        for (shard, row, rows, at) in crate::sharding::pieces(&self.ranges, first, count) {
            let g = &self.shards[shard];
            let steps = g.steps.as_ref().ok_or_else(|| Error::invalid("this optimizer keeps no step counts"))?;
            let view = steps.slice(row..row + rows);
            g.stream.memcpy_dtoh(&view, &mut out[at..at + rows]).map_err(|e| device_error("download", e))?;
        }
        Ok(())
    }

    fn write_steps(&mut self, first: u64, count: u64, values: &[u32]) -> Result<()> {
        for (shard, row, rows, at) in crate::sharding::pieces(&self.ranges, first, count) {
            let g = &mut self.shards[shard];
            let stream = g.stream.clone();
            let steps = g.steps.as_mut().ok_or_else(|| Error::invalid("this optimizer keeps no step counts"))?;
            let mut view = steps.slice_mut(row..row + rows);
            stream.memcpy_htod(&values[at..at + rows], &mut view).map_err(|e| device_error("upload", e))?;
        }
        Ok(())
    }

    fn set_centers(&mut self, first: u64, count: u64, values: &[f32]) -> Result<()> {
        self.write_state(StateTensor::Centers, first, count, values)?;
        let d = self.cfg.embedding_dim;
        let zeros = vec![0f32; count as usize * d];
        for &t in &StateTensor::for_optimizer(self.cfg.optimizer.kind)[1..] {
            self.write_state(t, first, count, &zeros)?;
        }
        if self.cfg.optimizer.kind == OptimizerKind::AdamW {
            self.write_steps(first, count, &vec![0u32; count as usize])?;
        }
        Ok(())
    }

    fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(f32, u64)>>> {
        // Scored on the host over centers copied out in blocks: the CPU backend's search code.
        let d = self.cfg.embedding_dim;
        let mut best = crate::topk::TopK::new(queries.len() / d, k);
        for range in &self.ranges {
            let mut centers = vec![0f32; range.len as usize * d];
            self.read_state(StateTensor::Centers, range.start, range.len, &mut centers)?;
            best.merge(crate::backend::cpu::scan_centers(&centers, d, range.start, queries, k)?);
        }
        Ok(best.into_sorted())
    }

}

impl CudaBackend {
    /// The optimizer kernel over the accumulated rows: with `commit` the update, without it only
    /// the check (`bad` set when a value would be non-finite or a row not normalizable).
    fn update(&mut self, shard: usize, lr: f32, commit: bool, bad: &mut CudaSlice<i32>) -> Result<()> {
        let d32 = self.cfg.embedding_dim as i32;
        let opt = self.cfg.optimizer;
        let g = &mut self.shards[shard];
        g.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
        let Some(acc) = &g.accumulated else { return Ok(()) };
        let (k32, commit) = (acc.len as i32, i32::from(commit));
        match opt.kind {
            OptimizerKind::Sgd => {
                let (_, momentum) = &mut g.state[0];
                let f = g.functions["update_sgd"].clone();
                let mut b = g.stream.launch_builder(&f);
                b.arg(&mut g.centers).arg(momentum).arg(&acc.rows).arg(&acc.grads).arg(&k32).arg(&d32);
                b.arg(&lr).arg(&opt.momentum).arg(&opt.weight_decay).arg(&commit).arg(bad);
                // SAFETY: arguments match kernels/gradient.cu `update_sgd`.
                unsafe { b.launch(per_row(acc.len)) }.map_err(|e| device_error("update_sgd", e))?;
            }
            OptimizerKind::AdamW => {
                let f = g.functions["update_adamw"].clone();
                let (first, second) = g.state.split_at_mut(1);
                let steps = g.steps.as_mut().ok_or_else(|| Error::new(Status::Panic, "internal error: AdamW without step counts"))?;
                let mut b = g.stream.launch_builder(&f);
                b.arg(&mut g.centers).arg(&mut first[0].1).arg(&mut second[0].1).arg(steps).arg(&acc.rows).arg(&acc.grads);
                b.arg(&k32).arg(&d32).arg(&lr).arg(&opt.beta1).arg(&opt.beta2).arg(&opt.eps).arg(&opt.weight_decay).arg(&commit).arg(bad);
                // SAFETY: arguments match kernels/gradient.cu `update_adamw`.
                unsafe { b.launch(per_row(acc.len)) }.map_err(|e| device_error("update_adamw", e))?;
            }
        }
        Ok(())
    }
}

/// Step buffers freed on the stream stay in the device's default pool (release threshold
/// unlimited) instead of going back to the driver at each synchronisation: from the second step
/// on, a step's buffers come from memory the previous one released, so the pool is the workspace,
/// as large as the largest step so far, with no driver allocation per step.
fn keep_released_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::{result, sys};
    let mut threshold = u64::MAX;
    // SAFETY: the context's own device; the attribute takes a u64.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(|e| device_error("memory pool", e))?;
        result::mem_pool::set_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, (&mut threshold as *mut u64).cast())
            .map_err(|e| device_error("memory pool release threshold", e))
    }
}

/// The most memory the device's default pool (every allocation of the head) has handed out at
/// once; 0 where the driver cannot say.
fn peak_pool_bytes(ctx: &CudaContext) -> u64 {
    use cudarc::driver::{result, sys};
    let mut high = 0u64;
    // SAFETY: the context's own device; the attribute is a u64.
    unsafe {
        let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) else { return 0 };
        let got = result::mem_pool::get_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut high as *mut u64).cast());
        if got.is_err() {
            return 0;
        }
    }
    high
}

/// `cuda.h`'s `CU_STREAM_LEGACY`: the legacy default stream, whatever the caller's compilation mode.
const CU_STREAM_LEGACY: usize = 0x1;

/// The stream a caller's `pfc_batch.stream` names. NULL is the legacy default stream, where
/// `cudaMemcpy` and kernel launches without a stream go; the library's own streams are
/// non-blocking, so they are not ordered after it implicitly and must wait for it explicitly.
fn caller_stream(raw: usize) -> cudarc::driver::sys::CUstream {
    (if raw == 0 { CU_STREAM_LEGACY } else { raw }) as cudarc::driver::sys::CUstream
}

/// Makes stream `then` wait for the work queued so far on stream `first` (an event, not a device
/// sync).
fn after_caller(first: cudarc::driver::sys::CUstream, then: cudarc::driver::sys::CUstream) -> Result<()> {
    use cudarc::driver::result::{event, stream};
    use cudarc::driver::sys::{CUevent_flags, CUevent_wait_flags};
    let ev = event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| device_error("event", e))?;
    // SAFETY: both are live streams, the caller's or ours; the event is destroyed after the wait
    // is queued, which CUDA allows.
    unsafe {
        let queued = event::record(ev, first).and_then(|_| stream::wait_event(then, ev, CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT));
        let _ = event::destroy(ev);
        queued.map_err(|e| device_error("ordering with the caller's stream", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_null_caller_stream_is_the_legacy_default_stream() {
        assert_eq!(caller_stream(0) as usize, CU_STREAM_LEGACY, "NULL must order against the legacy stream, not skip ordering");
        assert_eq!(caller_stream(0xdead_b000) as usize, 0xdead_b000);
    }
}
