//! The CUDA backend's training step: the same phases as the CPU backend (src/backend/cpu), on each
//! local GPU, with the kernels of kernels/*.cu, cuBLAS for the three GEMMs and NCCL between GPUs.
//!
//! Scope of this version: one process (world_size == local_shards), inputs in host memory. The
//! global batch is assembled on the host and uploaded to every GPU; the softmax statistics and the
//! embedding gradient are all-reduced with NCCL when there are several GPUs.

use super::kernels::{arch_of, ptx_for};
use super::select::{compaction_offsets, kth_largest};
use super::DeviceInfo;
use crate::backend::{Backend, DeviceBatch, GradOut, HostBatch, HostValues, PhaseTimes, RowStats, StagedBatch, StepPlan};
use crate::comm::nccl::{self, Comm, NCCL_FLOAT32, NCCL_MAX, NCCL_SUM};
use crate::config::{Config, DType, MarginGrad, OptimizerKind};
use crate::error::{Error, Result, Status};
use crate::optimizer::StateTensor;
use crate::rng;
use crate::sharding::{sample_count, ShardRange};
use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

fn device_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(Status::Device, format!("CUDA {what}: {e}"))
}

/// Threads per block of the element-wise and per-row kernels.
const THREADS: u32 = 256;
/// Columns of the cosine matrix each `row_stats` block reduces.
const STATS_COLUMNS: usize = 512;
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
    range: ShardRange,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    comm: Option<Comm>,
    centers: CudaSlice<f32>,
    state: Vec<(StateTensor, CudaSlice<f32>)>,
    steps: Option<CudaSlice<u32>>,
    // Per step.
    k: usize,
    unit: Option<CudaSlice<f32>>,
    unit_gemm: Option<CudaSlice<u8>>,
    inv_norm_e: Option<CudaSlice<f32>>,
    sampled: Option<CudaSlice<u32>>,
    col: Option<CudaSlice<i32>>,
    w_gemm: Option<CudaSlice<u8>>,
    inv_norm_w: Option<CudaSlice<f32>>,
    cos: Option<CudaSlice<f32>>,
    /// [max, other cosine, target cosine] and [Σexp, non-target Σexp, target logit], each N long, for
    /// the all-reduces.
    max_stats: Option<CudaSlice<f32>>,
    sum_stats: Option<CudaSlice<f32>>,
    local_max: Option<CudaSlice<f32>>,
    target_slope: Option<CudaSlice<f32>>,
}

pub struct CudaBackend {
    cfg: Config,
    ranges: Vec<ShardRange>,
    shards: Vec<GpuShard>,
    batch_rows: Vec<usize>,
    times: PhaseTimes,
    backward_ready: bool,
}

// SAFETY: NCCL communicators and CUDA handles are used by one thread at a time (the head's lock).
unsafe impl Send for CudaBackend {}

impl GpuShard {
    fn f(&self, name: &str) -> &CudaFunction {
        &self.functions[name]
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize, what: &str) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| {
            Error::new(Status::OutOfMemory, format!("GPU {}: cannot allocate {what} ({n} elements): {e}", self.stream.context().ordinal()))
        })
    }

    /// `C (m×n, ld ldc) = op(A)·op(B)` in column-major terms, f32 output, `dtype` inputs, f32 compute.
    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, transa: bool, transb: bool, m: usize, n: usize, k: usize, a: u64, lda: usize, b: u64, ldb: usize, c: u64, ldc: usize, dtype: DType, accumulate: bool) -> Result<()> {
        let op = |t: bool| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0f32 });
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
        .map_err(|e| device_error("cuBLAS GEMM", e))
    }
}

impl CudaBackend {
    pub fn new(cfg: &Config, devices: &[DeviceInfo]) -> Result<Self> {
        if cfg.world_size != cfg.local_shards {
            return Err(Error::new(Status::Unavailable, "multi-process CUDA runs (world_size > local_shards) are not in this build yet"));
        }
        let d = cfg.embedding_dim;
        let ranges: Vec<ShardRange> = (0..cfg.local_shards).map(|r| ShardRange::of(cfg.num_classes, cfg.world_size, r)).collect();
        let mut shards = Vec::new();
        for (dev, &range) in devices.iter().zip(&ranges) {
            let ctx = CudaContext::new(dev.ordinal as usize).map_err(|e| device_error("context", e))?;
            let stream = ctx.new_stream().map_err(|e| device_error("stream", e))?;
            let blas = CudaBlas::new(stream.clone()).map_err(|e| device_error("cuBLAS handle", e))?;
            let mut functions = HashMap::new();
            for (source, ptx) in ptx_for(&arch_of(dev.compute_capability))? {
                let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(|e| device_error(source.file, e))?;
                for &entry in source.entries {
                    functions.insert(entry, module.load_function(entry).map_err(|e| device_error(entry, e))?);
                }
            }
            let rows = range.len as usize;
            let alloc = |n: usize, what: &str| {
                stream.alloc_zeros::<f32>(n).map_err(|e| Error::new(Status::OutOfMemory, format!("GPU {}: cannot allocate {what}: {e}", dev.ordinal)))
            };
            // Same initial centers as the CPU backend: drawn on the host from (seed, class), uploaded in chunks.
            let mut centers = alloc(rows * d, "class centers")?;
            let chunk = (1usize << 22) / d.max(1);
            let mut host = vec![0f32; chunk * d];
            let mut at = 0;
            while at < rows {
                let take = chunk.min(rows - at);
                use rayon::prelude::*;
                crate::pool::install(|| {
                    host[..take * d].par_chunks_mut(d).enumerate().for_each(|(j, row)| {
                        rng::init_center(cfg.seed, range.start + (at + j) as u64, cfg.init_std, row);
                    })
                })?;
                let mut view = centers.slice_mut(at * d..(at + take) * d);
                stream.memcpy_htod(&host[..take * d], &mut view).map_err(|e| device_error("upload", e))?;
                at += take;
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
            shards.push(GpuShard {
                range,
                stream,
                blas,
                functions,
                comm: None,
                centers,
                state,
                steps,
                k: 0,
                unit: None,
                unit_gemm: None,
                inv_norm_e: None,
                sampled: None,
                col: None,
                w_gemm: None,
                inv_norm_w: None,
                cos: None,
                max_stats: None,
                sum_stats: None,
                local_max: None,
                target_slope: None,
            });
        }
        if shards.len() > 1 {
            let lib = nccl::nccl()?;
            let id = lib.unique_id()?;
            // SAFETY: one communicator per device, created inside one NCCL group.
            lib.check("ncclGroupStart", unsafe { (lib.group_start)() })?;
            for (rank, shard) in shards.iter_mut().enumerate() {
                shard.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
                let mut comm: Comm = std::ptr::null_mut();
                lib.check("ncclCommInitRank", unsafe { (lib.comm_init_rank)(&mut comm, cfg.world_size as i32, id, rank as i32) })?;
                shard.comm = Some(comm);
            }
            lib.check("ncclGroupEnd", unsafe { (lib.group_end)() })?;
        }
        Ok(CudaBackend { cfg: cfg.clone(), ranges, shards, batch_rows: Vec::new(), times: PhaseTimes::default(), backward_ready: false })
    }

    /// An NCCL all-reduce over one buffer per GPU, in place.
    fn all_reduce(&mut self, op: i32, pick: fn(&mut GpuShard) -> &mut CudaSlice<f32>, count: usize) -> Result<()> {
        if self.shards.len() == 1 {
            return Ok(());
        }
        let lib = nccl::nccl()?;
        lib.check("ncclGroupStart", unsafe { (lib.group_start)() })?;
        for shard in &mut self.shards {
            let stream = shard.stream.clone();
            let comm = shard.comm.expect("communicators exist with several GPUs");
            let buf = pick(shard);
            let (ptr, _sync) = buf.device_ptr_mut(&stream);
            // SAFETY: in-place all-reduce of `count` floats of a live buffer on the shard's stream.
            let code = unsafe { (lib.all_reduce)(ptr as *const _, ptr as *mut _, count, NCCL_FLOAT32, op, comm, stream.cu_stream() as *mut _) };
            lib.check("ncclAllReduce", code)?;
        }
        lib.check("ncclGroupEnd", unsafe { (lib.group_end)() })
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Ok(lib) = nccl::nccl() {
            for comm in self.shards.iter_mut().filter_map(|s| s.comm.take()) {
                // SAFETY: each communicator is destroyed once.
                unsafe { (lib.comm_destroy)(comm) };
            }
        }
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
            self.sampled = Some(self.stream.clone_htod(&all).map_err(|e| device_error("upload", e))?);
            self.k = len;
            return Ok(());
        }
        let stream = rng::stream(plan.seed, rng::PURPOSE_SAMPLING, plan.step);
        let mut keys = self.zeros::<u64>(len, "sampling keys")?;
        launch!(self, "sample_keys", grid_for(len), &stream, &start, &len64, &positive, &mut keys)?;
        // The k-th largest key, one byte at a time from the top (positives carry the largest key).
        let positives = {
            let host: Vec<u8> = self.stream.clone_dtoh(&positive).map_err(|e| device_error("download", e))?;
            host[..len].iter().filter(|&&p| p != 0).count()
        };
        let k = want.max(positives);
        let (threshold, take_equal) = kth_largest(k as u64, |prefix, mask, shift| {
            let mut hist = self.zeros::<u32>(256, "radix histogram")?;
            launch!(self, "radix_histogram", grid_for(len.min(1 << 20)), &keys, &len64, &prefix, &mask, &shift, &mut hist)?;
            self.stream.clone_dtoh(&hist).map_err(|e| device_error("download", e))
        })?;
        let blocks = len.div_ceil(COMPACT_BLOCK as usize);
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (COMPACT_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut above = self.zeros::<u32>(blocks, "block counts")?;
        let mut equal = self.zeros::<u32>(blocks, "block counts")?;
        launch!(self, "count_selected", cfg, &keys, &len64, &threshold, &mut above, &mut equal)?;
        let above_h: Vec<u32> = self.stream.clone_dtoh(&above).map_err(|e| device_error("download", e))?;
        let equal_h: Vec<u32> = self.stream.clone_dtoh(&equal).map_err(|e| device_error("download", e))?;
        let (sel_before, eq_before, total) = compaction_offsets(&above_h, &equal_h, take_equal);
        debug_assert_eq!(total as usize, k);
        let sel_d = self.stream.clone_htod(&sel_before).map_err(|e| device_error("upload", e))?;
        let eq_d = self.stream.clone_htod(&eq_before).map_err(|e| device_error("upload", e))?;
        let mut out = self.zeros::<u32>(k, "sampled ids")?;
        launch!(self, "compact_selected", cfg, &keys, &len64, &threshold, &take_equal, &sel_d, &eq_d, &mut out)?;
        self.sampled = Some(out);
        self.k = k;
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn ranges(&self) -> &[ShardRange] {
        &self.ranges
    }

    fn forward(&mut self, batches: &[HostBatch<'_>], plan: StepPlan) -> Result<RowStats> {
        self.backward_ready = false;
        let (d, dtype) = (self.cfg.embedding_dim, self.cfg.compute_dtype);
        let t0 = Instant::now();
        self.batch_rows = batches.iter().map(|b| b.labels.len()).collect();
        let mut emb = Vec::new();
        let mut labels = Vec::new();
        for b in batches {
            b.embeddings.extend_f32(&mut emb);
            labels.extend_from_slice(b.labels);
        }
        let n = labels.len();
        let m = &self.cfg.margin;
        let (s, filter) = (m.scale, m.interclass_filter);
        let (m1, m2, m3) = (m.m1, m.m2, m.m3);
        let fallback = i32::from(m.arcface_fallback);
        let exact = i32::from(m.grad == MarginGrad::Exact);
        let dt = dtype_code(dtype);
        let (n32, d32) = (n as i32, d as i32);
        let mut sample_time = 0.0;
        for shard in &mut self.shards {
            shard.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
            let emb_d = shard.stream.clone_htod(&emb).map_err(|e| device_error("upload", e))?;
            let labels_d = shard.stream.clone_htod(&labels).map_err(|e| device_error("upload", e))?;
            let mut unit = shard.zeros::<f32>(n * d, "normalized embeddings")?;
            let mut unit_gemm = shard.zeros::<u8>(n * d * dtype.size(), "GEMM embeddings")?;
            let mut inv_e = shard.zeros::<f32>(n, "embedding norms")?;
            launch!(shard, "normalize_rows", per_row(n), &emb_d, &n32, &d32, &mut unit, &mut unit_gemm, &dt, &mut inv_e)?;
            let ts = Instant::now();
            shard.sample(&labels_d, n, plan)?;
            sample_time += ts.elapsed().as_secs_f64();
            let k = shard.k;
            let k32 = k as i32;
            let sampled = shard.sampled.take().expect("sampled");
            let mut col = shard.zeros::<i32>(n, "label columns")?;
            let (start, len64) = (shard.range.start, shard.range.len);
            launch!(shard, "label_columns", grid_for(n), &labels_d, &n32, &start, &len64, &sampled, &k32, &mut col)?;
            let mut w_gemm = shard.zeros::<u8>(k * d * dtype.size(), "GEMM centers")?;
            let mut inv_w = shard.zeros::<f32>(k, "center norms")?;
            launch!(shard, "gather_centers", per_row(k), &shard.centers, &sampled, &k32, &d32, &mut w_gemm, &dt, &mut inv_w)?;
            // cos [k][N] = Ŵ·X̂ᵀ; column-major: C (N×k) = X̂ᵀ(N×d)·Ŵ(d×k).
            let mut cos = shard.zeros::<f32>(k * n, "cosines (sampled classes × global batch)")?;
            {
                let stream = shard.stream.clone();
                let (a, _ga) = unit_gemm.device_ptr(&stream);
                let (b, _gb) = w_gemm.device_ptr(&stream);
                let (c, _gc) = cos.device_ptr_mut(&stream);
                shard.gemm(true, false, n, k, d, a, d, b, d, c, n, dtype, false)?;
            }
            let mut max_stats = shard.zeros::<f32>(3 * n, "row statistics")?;
            let mut sum_stats = shard.zeros::<f32>(3 * n, "row statistics")?;
            let mut slope = shard.zeros::<f32>(n, "target slopes")?;
            {
                let (mut head_max, mut rest) = max_stats.split_at_mut(n);
                let (mut other, mut target_cos) = rest.split_at_mut(n);
                let (mut sum, mut tail) = sum_stats.split_at_mut(n);
                let (mut rest, mut target_logit) = tail.split_at_mut(n);
                launch!(shard, "target_logits", grid_for(n), &cos, &n32, &col, &s, &m1, &m2, &m3, &fallback, &exact, &mut target_logit, &mut slope, &mut target_cos)?;
                let parts = k.div_ceil(STATS_COLUMNS).max(1);
                let mut part_max = shard.zeros::<f32>(parts * n, "partial statistics")?;
                let mut part_sum = shard.zeros::<f32>(parts * n, "partial statistics")?;
                let mut part_rest = shard.zeros::<f32>(parts * n, "partial statistics")?;
                let mut part_other = shard.zeros::<f32>(parts * n, "partial statistics")?;
                let cols = STATS_COLUMNS as i32;
                let cfg = LaunchConfig { grid_dim: (n.div_ceil(THREADS as usize) as u32, parts as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
                launch!(shard, "row_stats", cfg, &cos, &k32, &n32, &col, &mut target_logit, &s, &filter, &cols, &mut part_max, &mut part_sum, &mut part_rest, &mut part_other)?;
                let parts32 = parts as i32;
                launch!(shard, "combine_row_stats", grid_for(n), &part_max, &part_sum, &part_rest, &part_other, &parts32, &n32, &mut head_max, &mut sum, &mut rest, &mut other)?;
            }
            let local_max = shard.stream.clone_dtod(&max_stats.slice(0..n)).map_err(|e| device_error("copy", e))?;
            shard.unit = Some(unit);
            shard.unit_gemm = Some(unit_gemm);
            shard.inv_norm_e = Some(inv_e);
            shard.sampled = Some(sampled);
            shard.col = Some(col);
            shard.w_gemm = Some(w_gemm);
            shard.inv_norm_w = Some(inv_w);
            shard.cos = Some(cos);
            shard.max_stats = Some(max_stats);
            shard.sum_stats = Some(sum_stats);
            shard.local_max = Some(local_max);
            shard.target_slope = Some(slope);
        }
        self.times.gather = t0.elapsed().as_secs_f64() - sample_time;
        self.times.sample = sample_time;
        let t1 = Instant::now();
        self.all_reduce(NCCL_MAX, |s| s.max_stats.as_mut().expect("forward"), 3 * n)?;
        for shard in &mut self.shards {
            shard.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
            let local_max = shard.local_max.take().expect("forward");
            let max_stats = shard.max_stats.take().expect("forward");
            let mut sum_stats = shard.sum_stats.take().expect("forward");
            {
                let global = max_stats.slice(0..n);
                let (mut sum, mut tail) = sum_stats.split_at_mut(n);
                let mut rest = tail.slice_mut(0..n);
                launch!(shard, "rescale_sums", grid_for(n), &local_max, &global, &mut sum, &mut rest, &n32)?;
            }
            shard.max_stats = Some(max_stats);
            shard.sum_stats = Some(sum_stats);
        }
        self.all_reduce(NCCL_SUM, |s| s.sum_stats.as_mut().expect("forward"), 3 * n)?;
        let first = &self.shards[0];
        let maxes: Vec<f32> = first.stream.clone_dtoh(first.max_stats.as_ref().expect("forward")).map_err(|e| device_error("download", e))?;
        let sums: Vec<f32> = first.stream.clone_dtoh(first.sum_stats.as_ref().expect("forward")).map_err(|e| device_error("download", e))?;
        self.times.reduce = t1.elapsed().as_secs_f64();
        self.backward_ready = plan.train;
        Ok(RowStats {
            max: maxes[..n].to_vec(),
            sum: sums[..n].to_vec(),
            rest: sums[n..2 * n].to_vec(),
            target_logit: sums[2 * n..3 * n].to_vec(),
            target_cos: maxes[2 * n..3 * n].to_vec(),
            other_cos: maxes[n..2 * n].to_vec(),
            sampled_classes: self.shards.iter().map(|s| s.k as u64).sum(),
        })
    }

    fn backward(&mut self, stats: &RowStats, lr: f32, grads: &mut [GradOut<'_>]) -> Result<()> {
        assert!(self.backward_ready, "backward without a training forward");
        self.backward_ready = false;
        let (d, dtype) = (self.cfg.embedding_dim, self.cfg.compute_dtype);
        let n = stats.max.len();
        let t0 = Instant::now();
        let (inv_sum, non_target_mass) = stats.softmax_factors();
        let (s, filter) = (self.cfg.margin.scale, self.cfg.margin.interclass_filter);
        let opt = self.cfg.optimizer;
        let (n32, d32, dt) = (n as i32, d as i32, dtype_code(dtype));
        let inv_batch = 1.0 / n as f32;
        let mut gx_all = Vec::new();
        for shard in &mut self.shards {
            shard.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
            let k = shard.k;
            let k32 = k as i32;
            let row_max = shard.stream.clone_htod(&stats.max).map_err(|e| device_error("upload", e))?;
            let inv_sum_d = shard.stream.clone_htod(&inv_sum).map_err(|e| device_error("upload", e))?;
            let mass_d = shard.stream.clone_htod(&non_target_mass).map_err(|e| device_error("upload", e))?;
            let cos = shard.cos.take().expect("forward");
            let sum_stats = shard.sum_stats.take().expect("forward");
            let target_logit = sum_stats.slice(2 * n..3 * n);
            let (col, slope) = (shard.col.take().expect("forward"), shard.target_slope.take().expect("forward"));
            let mut grad_cos = shard.zeros::<u8>(k * n * dtype.size(), "cosine gradient")?;
            launch!(shard, "cos_gradient", grid_for(k * n), &cos, &k32, &n32, &col, &target_logit, &slope, &row_max, &inv_sum_d, &mass_d, &inv_batch, &s, &filter, &mut grad_cos, &dt)?;
            drop(cos);
            let w_gemm = shard.w_gemm.take().expect("forward");
            let unit_gemm = shard.unit_gemm.take().expect("forward");
            let mut gx = shard.zeros::<f32>(n * d, "embedding gradient")?;
            let mut g_unit = shard.zeros::<f32>(k * d, "center gradient")?;
            {
                let stream = shard.stream.clone();
                let (g, _g) = grad_cos.device_ptr(&stream);
                let (w, _w) = w_gemm.device_ptr(&stream);
                let (x, _x) = unit_gemm.device_ptr(&stream);
                let (gxp, _gxp) = gx.device_ptr_mut(&stream);
                // gx [N][d] = Gᵀ·Ŵ; column-major: (d×N) = Ŵ(d×k)·G(k×N).
                shard.gemm(false, true, d, n, k, w, d, g, n, gxp, d, dtype, false)?;
                let (gu, _gu) = g_unit.device_ptr_mut(&stream);
                // gŴ [k][d] = G·X̂; column-major: (d×k) = X̂(d×N)·G(N×k), G being [k][N] row-major.
                shard.gemm(false, false, d, k, n, x, d, g, n, gu, d, dtype, false)?;
            }
            let sampled = shard.sampled.take().expect("forward");
            let inv_w = shard.inv_norm_w.take().expect("forward");
            match opt.kind {
                OptimizerKind::Sgd => {
                    let (_, momentum) = &mut shard.state[0];
                    let f = shard.functions["update_sgd"].clone();
                    let mut b = shard.stream.launch_builder(&f);
                    b.arg(&mut shard.centers).arg(momentum).arg(&sampled).arg(&g_unit).arg(&inv_w).arg(&k32).arg(&d32);
                    b.arg(&lr).arg(&opt.momentum).arg(&opt.weight_decay);
                    // SAFETY: arguments match kernels/gradient.cu `update_sgd`.
                    unsafe { b.launch(per_row(k)) }.map_err(|e| device_error("update_sgd", e))?;
                }
                OptimizerKind::AdamW => {
                    let f = shard.functions["update_adamw"].clone();
                    let (first, second) = shard.state.split_at_mut(1);
                    let steps = shard.steps.as_mut().expect("AdamW keeps step counts");
                    let mut b = shard.stream.launch_builder(&f);
                    b.arg(&mut shard.centers).arg(&mut first[0].1).arg(&mut second[0].1).arg(steps).arg(&sampled).arg(&g_unit);
                    b.arg(&inv_w).arg(&k32).arg(&d32).arg(&lr).arg(&opt.beta1).arg(&opt.beta2).arg(&opt.eps).arg(&opt.weight_decay);
                    // SAFETY: arguments match kernels/gradient.cu `update_adamw`.
                    unsafe { b.launch(per_row(k)) }.map_err(|e| device_error("update_adamw", e))?;
                }
            }
            gx_all.push(gx);
        }
        self.times.backward = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        if self.shards.len() > 1 {
            // Each GPU then reads its own rows of the summed gradient.
            let lib = nccl::nccl()?;
            lib.check("ncclGroupStart", unsafe { (lib.group_start)() })?;
            for (shard, gx) in self.shards.iter().zip(gx_all.iter_mut()) {
                let (ptr, _sync) = gx.device_ptr_mut(&shard.stream);
                let comm = shard.comm.expect("communicators exist with several GPUs");
                // SAFETY: in-place all-reduce of N×d floats on the shard's stream.
                let code = unsafe { (lib.all_reduce)(ptr as *const _, ptr as *mut _, n * d, NCCL_FLOAT32, NCCL_SUM, comm, shard.stream.cu_stream() as *mut _) };
                lib.check("ncclAllReduce", code)?;
            }
            lib.check("ncclGroupEnd", unsafe { (lib.group_end)() })?;
        }
        let world = self.cfg.world_size as f32;
        let mut offset = 0;
        for ((shard, gx), out) in self.shards.iter_mut().zip(&gx_all).zip(grads.iter_mut()) {
            let rows = out.len() / d;
            if rows > 0 {
                let unit = shard.unit.as_ref().expect("forward");
                let inv_e = shard.inv_norm_e.as_ref().expect("forward");
                let mut local = shard.zeros::<f32>(rows * d, "embedding gradient")?;
                let (rows32, f32_code) = (rows as i32, 0i32);
                let g = gx.slice(offset * d..(offset + rows) * d);
                let u = unit.slice(offset * d..(offset + rows) * d);
                let inv = inv_e.slice(offset..offset + rows);
                launch!(shard, "embedding_grad", per_row(rows), &g, &u, &inv, &rows32, &d32, &world, &mut local, &f32_code)?;
                let host: Vec<f32> = shard.stream.clone_dtoh(&local).map_err(|e| device_error("download", e))?;
                out.write(&host);
            }
            offset += rows;
        }
        self.times.scatter = t1.elapsed().as_secs_f64();
        Ok(())
    }

    fn read_state(&self, tensor: StateTensor, first: u64, count: u64, out: &mut [f32]) -> Result<()> {
        let d = self.cfg.embedding_dim;
        for (shard, row, rows, at) in super::super::pieces(&self.ranges, first, count) {
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
        for (shard, row, rows, at) in super::super::pieces(&self.ranges, first, count) {
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
        for (shard, row, rows, at) in super::super::pieces(&self.ranges, first, count) {
            let g = &self.shards[shard];
            let steps = g.steps.as_ref().ok_or_else(|| Error::invalid("this optimizer keeps no step counts"))?;
            let view = steps.slice(row..row + rows);
            g.stream.memcpy_dtoh(&view, &mut out[at..at + rows]).map_err(|e| device_error("download", e))?;
        }
        Ok(())
    }

    fn write_steps(&mut self, first: u64, count: u64, values: &[u32]) -> Result<()> {
        for (shard, row, rows, at) in super::super::pieces(&self.ranges, first, count) {
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
        let mut best = crate::search::TopK::new(queries.len() / d, k);
        for range in &self.ranges {
            let mut centers = vec![0f32; range.len as usize * d];
            self.read_state(StateTensor::Centers, range.start, range.len, &mut centers)?;
            best.merge(crate::backend::cpu::scan_centers(&centers, d, range.start, queries, k)?);
        }
        Ok(best.into_sorted())
    }

    fn phase_times(&self) -> PhaseTimes {
        self.times
    }

    fn download(&mut self, batches: &[DeviceBatch], dim: usize) -> Result<Vec<StagedBatch>> {
        use cudarc::driver::result::{memcpy_dtoh_async, stream};
        let mut staged = Vec::with_capacity(batches.len());
        for (shard, b) in self.shards.iter().zip(batches) {
            shard.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
            let ours = shard.stream.cu_stream();
            after_caller(b.stream, ours)?;
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
            staged.push(StagedBatch { embeddings, labels });
        }
        Ok(staged)
    }

    fn upload_grads(&mut self, batches: &[DeviceBatch], grads: &[HostValues]) -> Result<()> {
        use cudarc::driver::result::{memcpy_htod_async, stream};
        for ((shard, b), g) in self.shards.iter().zip(batches).zip(grads) {
            shard.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
            let ours = shard.stream.cu_stream();
            if b.rows > 0 {
                // SAFETY: the caller's gradient pointer holds as many values of this dtype, on this GPU;
                // the host copy outlives the transfer (synchronized below).
                unsafe {
                    match g {
                        HostValues::F32(v) => memcpy_htod_async(b.grad, v, ours),
                        HostValues::F16(v) => memcpy_htod_async(b.grad, v, ours),
                        HostValues::BF16(v) => memcpy_htod_async(b.grad, v, ours),
                    }
                    .map_err(|e| device_error("writing device gradients", e))?;
                    stream::synchronize(ours).map_err(|e| device_error("synchronize", e))?;
                }
            }
            after_caller(ours as usize, b.stream as _)?;
        }
        Ok(())
    }
}

/// Makes stream `then` wait for the work queued so far on stream `first` (an event, not a device
/// sync). Either may be 0 for none.
fn after_caller(first: usize, then: cudarc::driver::sys::CUstream) -> Result<()> {
    use cudarc::driver::result::{event, stream};
    use cudarc::driver::sys::{CUevent_flags, CUevent_wait_flags};
    if first == 0 || then.is_null() {
        return Ok(());
    }
    let ev = event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| device_error("event", e))?;
    // SAFETY: `first` is a live stream of the caller's (or ours); the event is destroyed after the
    // wait is queued, which CUDA allows.
    unsafe {
        let queued = event::record(ev, first as _).and_then(|_| stream::wait_event(then, ev, CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT));
        let _ = event::destroy(ev);
        queued.map_err(|e| device_error("ordering with the caller's stream", e))
    }
}
