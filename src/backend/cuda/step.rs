//! The CUDA backend's per-shard primitives (src/backend/mod.rs `Primitives`), on each local GPU:
//! the kernels of kernels/*.cu, cuBLAS for the three GEMMs; the step itself is the step
//! driver's (src/head/driver.rs), the collectives NCCL's (src/comm/nccl.rs).
//!
//! A step's buffers come from the GPU's workspace (`crate::memory::Workspace`), so that after the
//! first step of a shape nothing is allocated; sampling, the validation of device batches and every
//! finiteness check run on the device and leave their findings in the GPU's verdict record
//! (`verdict.rs`), which the host reads where it must decide: once a step (`finite`), once more for
//! device batches (`load`), and the sampled count where the labels may hold more positives than
//! the negatives budget. Accumulating a second compute before an apply merges the rows on the host.

use super::device::{device_error, DeviceInfo};
use super::kernels::{arch_of, cubin_for};
use super::plan::{class_chunks, combine_grid, eval_chunk_bytes, stats_grid, STATS_COLUMNS, THREADS};
use super::stored::StoredRows;
use super::verdict::{self, Verdict};
use crate::backend::step::{phase, DeviceTimes, OptStep, RowGrads, RowStats, StepPlan, Update};
use crate::backend::{Primitives, ShardState};
use crate::batch::{Batches, DeviceBatch, Embeddings, GradOut, Outputs};
use crate::config::{Config, DType, MarginGrad, MarginKind, OptimizerKind, Rounding};
use crate::error::{try_zeroed, Error, Result, Status};
use crate::margin::{MarginState, ADAFACE_EPS, ADAFACE_NORM_RANGE, CURRICULAR_T_ALPHA};
use crate::memory::{Device, DeviceBuf, Workspace};
use crate::rng;
use crate::sharding::{sample_count, ShardRange};
use crate::state::StateTensor;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUevent;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

/// Block size of the compaction kernels (their counts are per block of this many classes).
const COMPACT_BLOCK: u32 = 1024;

fn grid_for(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(THREADS as usize).clamp(1, 65_535 * 16) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The select's bookkeeping kernels: one thread.
const ONE_THREAD: LaunchConfig = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };

/// Reductions over the whole batch in one block.
const ONE_BLOCK: LaunchConfig = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// One GPU's shard: its centers and optimizer state, the step's workspace and state.
struct GpuShard {
    /// First, so that its events go before the stream and context they belong to.
    timing: std::cell::RefCell<Timing>,
    range: ShardRange,
    /// What one evaluation chunk may take on this GPU (`eval_chunk_bytes`).
    eval_budget: usize,
    stream: Arc<CudaStream>,
    work: Arc<Workspace>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    /// Stored as `storage_dtype` says: f32, or bf16 (`StoredRows`).
    centers: StoredRows,
    state: Vec<(StateTensor, StoredRows)>,
    steps: Option<CudaSlice<u32>>,
    /// What the device found wrong in the current step (`verdict.rs`), and the sampling select's
    /// state and histogram: kept for the head's life, reset by kernels.
    verdict: CudaSlice<u64>,
    select: CudaSlice<u64>,
    histogram: CudaSlice<u32>,
    /// The margin's running statistics (`MarginState::values`) in two slots, the kept ones and a
    /// training step's new ones (`CudaBackend::margin_live`); none for the combined margin. Every
    /// GPU computes the same, from what they all hold (`forward`).
    margin_slots: Vec<CudaSlice<f32>>,
    /// Where the current step is, and what it holds.
    step: StepState,
    /// The accumulated center gradients since the last update, how to take back the last
    /// `accumulate`, and the update's verdict where the backward pass already checked it.
    accumulated: Option<DeviceRowGrads>,
    undo: Option<Undo>,
    update_checked: Option<CheckedUpdate>,
}

/// A step between the primitives: each one takes the state the one before it left.
enum StepState {
    Idle,
    Sampled { ids: DeviceBuf<u32>, k: usize },
    /// Evaluation's forward pass: the shard's row maxima before the all-reduce, for `rescale_sums`.
    Evaluated { local_max: DeviceBuf<f32> },
    Forward(Box<Forward>),
    Backward(Box<Backward>),
}

/// What the forward pass of a training step leaves for the backward pass.
struct Forward {
    n: usize,
    k: usize,
    ids: DeviceBuf<u32>,
    unit: DeviceBuf<f32>,
    unit_gemm: DeviceBuf<u8>,
    inv_norm_e: DeviceBuf<f32>,
    col: DeviceBuf<i32>,
    w_gemm: DeviceBuf<u8>,
    inv_norm_w: DeviceBuf<f32>,
    cos: DeviceBuf<f32>,
    target_logit: DeviceBuf<f32>,
    target_slope: DeviceBuf<f32>,
    local_max: DeviceBuf<f32>,
    /// CurricularFace's hard negatives: each row's threshold and the margin slot whose t the step
    /// used (`GpuShard::hard_t`).
    hard_above: Option<DeviceBuf<f32>>,
    margin_slot: usize,
}

/// What the backward pass leaves: the embedding side of the normalization (`embedding_grad`),
/// the center gradients until `accumulate`, and the optimizer step for which it checked the update
/// over exactly those rows (the verdict of which `finite` reads).
struct Backward {
    unit: DeviceBuf<f32>,
    inv_norm_e: DeviceBuf<f32>,
    pending: DeviceRowGrads,
    update_checked_at: Option<OptStep>,
}

/// The update's verdict for an optimizer step (its rate, and its index and seed, which key the
/// rounding of bf16 storage), over the accumulated rows.
#[derive(Clone, Copy)]
struct CheckedUpdate {
    step: OptStep,
    finite: bool,
}

/// Sorted rows and their gradients on a GPU.
struct DeviceRowGrads {
    rows: DeviceBuf<u32>,
    grads: DeviceBuf<f32>,
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
    /// Which of every GPU's two margin slots holds the kept running statistics, and whether the
    /// other holds a training forward pass's, kept when its step succeeds (`commit_margin_state`:
    /// the index moves, nothing runs on the device).
    margin_live: usize,
    margin_pending: bool,
}

// SAFETY: CUDA handles are used by one thread at a time (the head's lock).
unsafe impl Send for CudaBackend {}

macro_rules! launch {
    ($shard:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = $shard.f($name);
        let mut b = $shard.stream.launch_builder(f);
        $( b.arg($arg); )*
        // SAFETY: the argument list matches the kernel's signature in kernels/*.cu.
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(|e| device_error($name, e))
    }};
}

impl GpuShard {
    fn f(&self, name: &str) -> &CudaFunction {
        &self.functions[name]
    }

    /// The device address of CurricularFace's t in margin slot `slot`, where `hard_above` holds
    /// thresholds; the kernels take none (null) without them.
    fn hard_t(&self, hard_above: &Option<DeviceBuf<f32>>, slot: usize) -> u64 {
        match (hard_above, self.margin_slots.get(slot)) {
            (Some(_), Some(t)) => t.device_ptr(&self.stream).0,
            _ => 0,
        }
    }

    fn bind(&self) -> Result<()> {
        self.stream.context().bind_to_thread().map_err(|e| device_error("bind", e))
    }

    fn take<T: cudarc::driver::DeviceRepr>(&self, len: usize, what: &'static str) -> Result<DeviceBuf<T>> {
        self.work.take(len, what)
    }

    /// The verdict record, read back: the one wait of a step on the device.
    fn read_verdict(&self) -> Result<Verdict> {
        let mut words = [0u64; verdict::WORDS];
        self.stream.memcpy_dtoh(&self.verdict, &mut words).map_err(|e| device_error("reading the step's verdict", e))?;
        Ok(Verdict(words))
    }

    fn reset_verdict(&self) -> Result<()> {
        launch!(self, "verdict_reset", ONE_THREAD, &self.verdict)
    }

    /// `C (m×n, ld ldc) = op(A)·op(B)` in column-major terms (`blas::gemm`), between this step's
    /// timing events.
    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, transa: bool, transb: bool, m: usize, n: usize, k: usize, a: u64, lda: usize, b: u64, ldb: usize, c: u64, ldc: usize, dtype: DType) -> Result<()> {
        let (start, end) = self.timing.borrow_mut().next_gemm()?;
        let stream = self.stream.cu_stream();
        // SAFETY: live events of this shard's context, recorded on its stream.
        unsafe { cudarc::driver::result::event::record(start, stream) }.map_err(|e| device_error("timing event", e))?;
        // SAFETY: the callers' addresses are live step buffers of the sizes the shapes address.
        unsafe { super::blas::gemm(&self.blas, transa, transb, m, n, k, a, lda, b, ldb, c, ldc, dtype, "cuBLAS GEMM")? };
        // SAFETY: as above.
        unsafe { cudarc::driver::result::event::record(end, stream) }.map_err(|e| device_error("timing event", e))
    }

    /// The optimizer kernel over `rows`: with `commit` the update, without it only the check (the
    /// verdict's `UPDATE` set when a value would be non-finite or a row not normalizable, as
    /// stored). bf16 storage's entry points also take the step's rounding: its stream, the mode,
    /// and the shard's first class (draws follow the global class).
    fn launch_update(&self, rows: &DeviceRowGrads, cfg: &Config, step: OptStep, commit: bool) -> Result<()> {
        let (d32, opt, lr) = (cfg.embedding_dim as i32, cfg.optimizer, step.lr);
        let (k32, commit) = (rows.len as i32, i32::from(commit));
        let (stream, nearest, start) = (step.rounding_stream(), i32::from(cfg.storage_rounding == Rounding::Nearest), self.range.start);
        let name = match opt.kind {
            OptimizerKind::Sgd => self.centers.kernel("update_sgd", "update_sgd_bf16"),
            OptimizerKind::AdamW => self.centers.kernel("update_adamw", "update_adamw_bf16"),
        };
        let mut b = self.stream.launch_builder(self.f(name));
        match opt.kind {
            OptimizerKind::Sgd => {
                b.arg(&self.centers).arg(&self.state[0].1).arg(&rows.rows).arg(&rows.grads).arg(&k32).arg(&d32).arg(&lr).arg(&opt.momentum).arg(&opt.weight_decay);
            }
            OptimizerKind::AdamW => {
                let steps = self.steps.as_ref().ok_or_else(|| Error::internal("AdamW without step counts"))?;
                b.arg(&self.centers).arg(&self.state[0].1).arg(&self.state[1].1).arg(steps).arg(&rows.rows).arg(&rows.grads).arg(&k32).arg(&d32).arg(&lr);
                b.arg(&opt.beta1).arg(&opt.beta2).arg(&opt.eps).arg(&opt.weight_decay);
            }
        }
        b.arg(&commit).arg(&self.verdict);
        if self.centers.is_bf16() {
            b.arg(&stream).arg(&nearest).arg(&start);
        }
        // SAFETY: the arguments match the entry point's signature in kernels/gradient.cu.
        unsafe { b.launch(per_row(rows.len)) }.map(|_| ()).map_err(|e| device_error(name, e))
    }

    /// Sampling on the GPU (kernels/sampling.cu): the set src/sharding.rs `sample` picks, found
    /// without leaving the device. `n` rows of labels; the host reads the sampled count only when
    /// the positives may exceed the negatives budget.
    fn sample(&mut self, labels: &DeviceBuf<i64>, n: usize, plan: StepPlan) -> Result<(DeviceBuf<u32>, usize)> {
        let len = self.range.len as usize;
        let (start, len64) = (self.range.start, self.range.len);
        let budget = sample_count(plan.sample_rate, self.range.len) as usize;
        if budget >= len {
            let mut ids = self.take::<u32>(len, "sampled ids")?;
            launch!(self, "all_classes", grid_for(len), &len64, &mut ids)?;
            return Ok((ids, len));
        }
        let mut keys = self.take::<u64>(len, "sampling keys")?;
        let stream = rng::stream(plan.seed, rng::PURPOSE_SAMPLING, plan.step);
        let (n32, budget64) = (n as i32, budget as u64);
        launch!(self, "select_reset", ONE_THREAD, &self.select, &self.histogram)?;
        launch!(self, "sample_keys", grid_for(len), &stream, &start, &len64, &mut keys)?;
        launch!(self, "mark_positives", grid_for(n), labels, &n32, &start, &len64, &mut keys, &self.select)?;
        launch!(self, "select_count", ONE_THREAD, &self.select, &budget64)?;
        // Positives are at most the rows; only where they may outnumber the budget is the count
        // unknown here.
        let k = if n <= budget {
            budget
        } else {
            let mut count = [0u64];
            let word = self.select.slice(verdict::SELECT_COUNT..verdict::SELECT_COUNT + 1);
            self.stream.memcpy_dtoh(&word, &mut count).map_err(|e| device_error("reading the sampled count", e))?;
            count[0] as usize
        };
        for pass in 0..8 {
            let shift = 56 - 8 * pass;
            launch!(self, "radix_histogram", grid_for(len.min(1 << 20)), &keys, &len64, &self.select, &shift, &self.histogram)?;
            launch!(self, "radix_pick", ONE_THREAD, &self.select, &shift, &self.histogram)?;
        }
        let blocks = len.div_ceil(COMPACT_BLOCK as usize);
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (COMPACT_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut above = self.take::<u32>(blocks, "sampling block counts")?;
        let mut equal = self.take::<u32>(blocks, "sampling block counts")?;
        launch!(self, "count_selected", cfg, &keys, &len64, &self.select, &mut above, &mut equal)?;
        let (blocks32, capacity) = (blocks as u32, k as u64);
        let mut ids = self.take::<u32>(k, "sampled ids")?;
        launch!(self, "compaction_offsets", ONE_THREAD, &mut above, &mut equal, &blocks32, &self.select, &mut ids, &capacity, &self.verdict)?;
        launch!(self, "compact_selected", cfg, &keys, &len64, &self.select, &above, &equal, &mut ids, &capacity, &self.verdict)?;
        Ok((ids, k))
    }
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
            let oom = |what: &str, e: cudarc::driver::DriverError| Error::new(Status::OutOfMemory, format!("GPU {}: cannot allocate {what}: {e}", dev.ordinal));
            // The CPU backend's initial centers, drawn on the device from (seed, class): nothing
            // crosses the bus (at 10M classes the host's draw and upload took tens of seconds).
            // SAFETY: `init_centers` writes every value before anything reads it.
            let centers = unsafe { StoredRows::uninit(&stream, cfg.storage_dtype, (rows * d).max(1)) }.map_err(|e| oom("the class centers", e))?;
            {
                let base = rng::purpose_base(cfg.seed, rng::PURPOSE_INIT);
                let (start, rows64, d32) = (range.start, rows as u64, d as i32);
                let name = centers.kernel("init_centers", "init_centers_bf16");
                let mut b = stream.launch_builder(&functions[name]);
                b.arg(&base).arg(&start).arg(&rows64).arg(&d32).arg(&cfg.init_std).arg(&centers);
                // SAFETY: arguments match kernels/init.cu `init_centers`; `centers` holds rows × d values.
                unsafe { b.launch(grid_for(rows * d.div_ceil(2))) }.map_err(|e| device_error(name, e))?;
            }
            let state = StateTensor::for_optimizer(cfg.optimizer.kind)[1..]
                .iter()
                .map(|&t| Ok((t, StoredRows::zeros(&stream, cfg.storage_dtype, (rows * d).max(1)).map_err(|e| oom(t.name(), e))?)))
                .collect::<Result<Vec<_>>>()?;
            let steps = match cfg.optimizer.kind {
                OptimizerKind::AdamW => Some(stream.alloc_zeros::<u32>(rows.max(1)).map_err(|e| oom("step counts", e))?),
                OptimizerKind::Sgd => None,
            };
            let verdict = stream.alloc_zeros::<u64>(verdict::WORDS).map_err(|e| oom("the step's verdict", e))?;
            let select = stream.alloc_zeros::<u64>(verdict::SELECT_WORDS).map_err(|e| oom("the sampling select", e))?;
            let histogram = stream.alloc_zeros::<u32>(256).map_err(|e| oom("the sampling histogram", e))?;
            let initial = MarginState::initial(cfg.margin.kind).values();
            let margin_slots = if initial.is_empty() {
                Vec::new()
            } else {
                (0..2).map(|_| stream.clone_htod(&initial).map_err(|e| oom("the margin's running statistics", e))).collect::<Result<_>>()?
            };
            // SAFETY: the context's own device.
            let total = unsafe { cudarc::driver::result::device::total_mem(ctx.cu_device()) }.map_err(|e| device_error("device memory", e))?;
            shards.push(GpuShard {
                range,
                eval_budget: eval_chunk_bytes(total as u64),
                work: Workspace::new(stream.clone()),
                stream,
                blas,
                functions,
                centers,
                state,
                steps,
                verdict,
                select,
                histogram,
                margin_slots,
                step: StepState::Idle,
                accumulated: None,
                undo: None,
                update_checked: None,
                timing: std::cell::RefCell::new(Timing::new()?),
            });
        }
        Ok(CudaBackend { cfg: cfg.clone(), ranges, shards, margin_live: 0, margin_pending: false })
    }

    /// The shards' workspaces, in rank order: the collectives run on their streams and take
    /// their buffers from them.
    pub fn workspaces(&self) -> Vec<Arc<Workspace>> {
        self.shards.iter().map(|s| s.work.clone()).collect()
    }

    /// Each shard's rows of a caller's device batch, after the caller's stream: the embeddings
    /// converted to f32 and checked where they lie, the labels copied; the checks' verdict is the
    /// one value read back.
    fn load_device(&mut self, batches: &[DeviceBatch]) -> Result<Vec<(DeviceBuf<f32>, DeviceBuf<i64>)>> {
        let mut queued = 0;
        let loaded = self.queue_device_loads(batches, &mut queued);
        if loaded.is_err() {
            // The callers' streams must not run ahead of reads of their buffers already queued.
            for (shard, b) in self.shards.iter().zip(batches).take(queued) {
                let _ = shard.bind().and_then(|()| after_caller(shard.stream.cu_stream(), caller_stream(b.stream)));
            }
        }
        let out = loaded?;
        for (s, shard) in self.shards.iter().enumerate() {
            if batches[s].rows > 0 {
                shard.read_verdict()?.batch(s, self.cfg.num_classes)?;
            }
        }
        Ok(out)
    }

    /// `load_device`'s work on each GPU, queued; `queued` counts the GPUs whose reads of the
    /// caller's buffers may be in flight.
    fn queue_device_loads(&self, batches: &[DeviceBatch], queued: &mut usize) -> Result<Vec<(DeviceBuf<f32>, DeviceBuf<i64>)>> {
        let (d, classes) = (self.cfg.embedding_dim, self.cfg.num_classes);
        let mut out = Vec::with_capacity(batches.len());
        for (shard, b) in self.shards.iter().zip(batches) {
            *queued += 1;
            shard.bind()?;
            after_caller(caller_stream(b.stream), shard.stream.cu_stream())?;
            let mut emb = shard.take::<f32>(b.rows * d, "the batch's embeddings")?;
            let labels = shard.take::<i64>(b.rows, "the batch's labels")?;
            if b.rows > 0 {
                let bytes = b.rows * std::mem::size_of::<i64>();
                // SAFETY: the caller's pointer holds `rows` labels on this GPU; ours as many.
                unsafe { cudarc::driver::result::memcpy_dtod_async(labels.ptr(), b.labels, bytes, shard.stream.cu_stream()) }
                    .map_err(|e| device_error("copying device labels", e))?;
                let (rows32, d32, dt, max_norm) = (b.rows as i32, d as i32, dtype_code(b.dtype), crate::limits::MAX_ROW_NORM);
                let src = b.embeddings;
                launch!(shard, "check_batch", per_row(b.rows), &src, &dt, &labels, &rows32, &d32, &classes, &max_norm, &mut emb, &shard.verdict)?;
                launch!(shard, "describe_batch", ONE_THREAD, &labels, &emb, &d32, &shard.verdict)?;
            }
            out.push((emb, labels));
        }
        Ok(out)
    }
}

impl Primitives for CudaBackend {
    type Mem = Device;

    fn ranges(&self) -> &[ShardRange] {
        &self.ranges
    }

    fn load(&mut self, batches: Batches<'_, '_>) -> Result<Vec<(DeviceBuf<f32>, DeviceBuf<i64>)>> {
        // A step that failed on one shard leaves the others' step state (the cosines above all)
        // behind: its buffers go back to the workspace before this step takes its own.
        for shard in &mut self.shards {
            shard.step = StepState::Idle;
            shard.bind()?;
            shard.reset_verdict()?;
        }
        match batches {
            Batches::Device(b) => self.load_device(b),
            Batches::Host(b) => self
                .shards
                .iter()
                .zip(b)
                .map(|(shard, b)| {
                    let emb = match b.embeddings {
                        // Uploaded as they are: no host copy of the batch on the way.
                        Embeddings::F32(v) => shard.work.upload(v, "the batch's embeddings")?,
                        half => {
                            let mut e = Vec::with_capacity(half.len());
                            half.extend_f32(&mut e);
                            shard.work.upload(&e, "the batch's embeddings")?
                        }
                    };
                    Ok((emb, shard.work.upload(b.labels, "the batch's labels")?))
                })
                .collect(),
        }
    }

    fn alloc_f32(&mut self, shard: usize, len: usize, what: &'static str) -> Result<DeviceBuf<f32>> {
        self.shards[shard].take(len, what)
    }

    fn alloc_i64(&mut self, shard: usize, len: usize, what: &'static str) -> Result<DeviceBuf<i64>> {
        self.shards[shard].take(len, what)
    }

    fn sample(&mut self, shard: usize, labels: &DeviceBuf<i64>, plan: StepPlan) -> Result<u64> {
        let g = &mut self.shards[shard];
        g.bind()?;
        let (ids, k) = g.sample(labels, labels.len(), plan)?;
        g.step = StepState::Sampled { ids, k };
        Ok(k as u64)
    }

    fn target_cosines(&mut self, shard: usize, emb: &DeviceBuf<f32>, labels: &DeviceBuf<i64>) -> Result<DeviceBuf<f32>> {
        let d = self.cfg.embedding_dim;
        let g = &self.shards[shard];
        g.bind()?;
        let n = labels.len();
        let (n32, d32, start, len) = (n as i32, d as i32, g.range.start, g.range.len);
        let mut out = g.take::<f32>(n, "target cosines")?;
        launch!(g, g.centers.kernel("target_cosines", "target_cosines_bf16"), per_row(n), emb, labels, &n32, &d32, &g.centers, &start, &len, &mut out)?;
        Ok(out)
    }

    fn forward(&mut self, shard: usize, emb: DeviceBuf<f32>, labels: &DeviceBuf<i64>, plan: StepPlan, targets: Option<&DeviceBuf<f32>>) -> Result<(DeviceBuf<f32>, DeviceBuf<f32>)> {
        let (d, dtype) = (self.cfg.embedding_dim, self.cfg.compute_dtype);
        let m = &self.cfg.margin;
        let (s, filter) = (m.scale, m.interclass_filter);
        let target_margin = crate::margin::combined_target(m);
        let (m1, m2, m3) = (target_margin.m1, target_margin.m2, target_margin.m3);
        let fallback = i32::from(target_margin.arcface_fallback);
        let exact = i32::from(target_margin.grad == MarginGrad::Exact);
        let (kind, margin_m, bound) = (m.kind.code() as i32, m.kind.m(), crate::margin::cosine_bound(m));
        let dt = dtype_code(dtype);
        let n = emb.len() / d;
        let (n32, d32) = (n as i32, d as i32);
        let shard = &mut self.shards[shard];
        shard.bind()?;
        let StepState::Sampled { ids, k } = std::mem::replace(&mut shard.step, StepState::Idle) else {
            return Err(Error::internal("forward before sampling"));
        };
        // The adaptive margins' statistics come from what every GPU holds alike (the gathered
        // batch's norms, the reduced target cosines), so each computes the same; a training step's
        // go to the slot that `commit_margin_state` keeps, and are the ones the step uses.
        let (live, train) = (self.margin_live, i32::from(plan.train));
        let margin_slot = if plan.train { 1 - live } else { live };
        let (mut scalers, mut hard_above) = (None, None);
        match m.kind {
            MarginKind::AdaFace { h, t_alpha, .. } => {
                let mut norms = shard.take::<f64>(n, "embedding norms (f64)")?;
                launch!(shard, "embedding_norms", per_row(n), &emb, &n32, &d32, &mut norms)?;
                let mut g = shard.take::<f32>(n, "AdaFace margin scalers")?;
                let (state, next, (lo, hi)) = (&shard.margin_slots[live], &shard.margin_slots[1 - live], ADAFACE_NORM_RANGE);
                launch!(shard, "adaface_scalers", ONE_BLOCK, &norms, &n32, state, next, &train, &t_alpha, &h, &ADAFACE_EPS, &lo, &hi, &mut g)?;
                scalers = Some(g);
            }
            MarginKind::Curricular { m: margin } => {
                let targets = targets.ok_or_else(|| Error::internal("CurricularFace's forward pass needs the reduced target cosines"))?;
                let mut above = shard.take::<f32>(n, "hard-negative thresholds")?;
                let (state, next) = (&shard.margin_slots[live], &shard.margin_slots[1 - live]);
                launch!(shard, "curricular_margins", ONE_BLOCK, targets, &n32, state, next, &train, &CURRICULAR_T_ALPHA, &margin, &mut above)?;
                hard_above = Some(above);
            }
            MarginKind::Combined => {}
        }
        self.margin_pending = plan.train && !shard.margin_slots.is_empty();
        // What a margin does not use, its kernels take as null pointers.
        let scaler_ptr = scalers.as_ref().map_or(0u64, DeviceBuf::ptr);
        let targets_ptr = targets.map_or(0u64, DeviceBuf::ptr);
        let hard_ptr = hard_above.as_ref().map_or(0u64, DeviceBuf::ptr);
        let hard_t = shard.hard_t(&hard_above, margin_slot);
        let mut unit = shard.take::<f32>(n * d, "normalized embeddings")?;
        let mut unit_gemm = shard.take::<u8>(n * d * dtype.size(), "GEMM embeddings")?;
        let mut inv_e = shard.take::<f32>(n, "embedding norms")?;
        launch!(shard, "normalize_rows", per_row(n), &emb, &n32, &d32, &mut unit, &mut unit_gemm, &dt, &mut inv_e)?;
        drop(emb);
        let k32 = k as i32;
        let mut col = shard.take::<i32>(n, "label columns")?;
        let (start, len64) = (shard.range.start, shard.range.len);
        launch!(shard, "label_columns", grid_for(n), labels, &n32, &start, &len64, &ids, &k32, &mut col)?;
        let center_bytes = d * dtype.size();
        let chunks = class_chunks(k, n, center_bytes, plan.train, shard.eval_budget);
        let widest = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        // Training keeps every sampled column for the backward pass; evaluation reuses one chunk's.
        let columns = if plan.train { k } else { widest };
        // Evaluation's chunks are buffers of their own, so that evaluating between training steps
        // does not resize the training step's.
        let (w_what, inv_what, cos_what) = if plan.train {
            ("GEMM centers", "center norms", "cosines (sampled classes × global batch)")
        } else {
            ("GEMM centers of an evaluation chunk", "center norms of an evaluation chunk", "cosines of an evaluation chunk (classes × global batch)")
        };
        let mut w_gemm = shard.take::<u8>(columns * center_bytes, w_what)?;
        let mut inv_w = shard.take::<f32>(columns, inv_what)?;
        let cos = shard.take::<f32>(columns * n, cos_what)?;
        let mut max_stats = shard.take::<f32>(3 * n, "row statistics")?;
        let mut sum_stats = shard.take::<f32>(3 * n, "row statistic sums")?;
        let mut slope = shard.take::<f32>(n, "target slopes")?;
        let mut local_max = shard.take::<f32>(n, "the shard's row maxima")?;
        {
            let groups = widest.div_ceil(STATS_COLUMNS).max(1);
            let mut part_max = shard.take::<f32>(groups * n, "partial maxima")?;
            let mut part_sum = shard.take::<f32>(groups * n, "partial sums")?;
            let mut part_rest = shard.take::<f32>(groups * n, "partial non-target sums")?;
            let mut part_other = shard.take::<f32>(groups * n, "partial non-target cosines")?;
            let mut maxes_view = max_stats.view_mut();
            let (mut head_max, mut maxes_rest) = maxes_view.split_at_mut(n);
            let (mut other, mut target_cos) = maxes_rest.split_at_mut(n);
            let mut sums_view = sum_stats.view_mut();
            let (mut sum, mut sums_rest) = sums_view.split_at_mut(n);
            let (mut rest, mut target_logit) = sums_rest.split_at_mut(n);
            let cols = STATS_COLUMNS as i32;
            for (index, chunk) in chunks.iter().enumerate() {
                let (first, count) = (chunk.start, chunk.len());
                let at = if plan.train { first } else { 0 };
                let (first32, count32, merge) = (first as i32, count as i32, i32::from(index > 0));
                let chunk_ids = ids.slice(first..first + count);
                let mut w = w_gemm.slice_mut(at * center_bytes..(at + count) * center_bytes);
                let mut inv = inv_w.slice_mut(at..at + count);
                launch!(shard, shard.centers.kernel("gather_centers", "gather_centers_bf16"), per_row(count), &shard.centers, &chunk_ids, &count32, &d32, &mut w, &dt, &mut inv)?;
                let w_ptr = w_gemm.ptr() + (at * center_bytes) as u64;
                let c_ptr = cos.ptr() + (at * n * 4) as u64;
                // cos [count][N] = Ŵ·X̂ᵀ; column-major: C (N×count) = X̂ᵀ(N×d)·Ŵ(d×count).
                shard.gemm(true, false, n, count, d, unit_gemm.ptr(), d, w_ptr, d, c_ptr, n, dtype)?;
                let c = cos.slice(at * n..(at + count) * n);
                launch!(
                    shard, "target_logits", grid_for(n),
                    &c, &n32, &col, &first32, &count32, &s, &m1, &m2, &m3, &fallback, &exact, &kind, &margin_m, &scaler_ptr, &bound, &ADAFACE_EPS,
                    &targets_ptr, &mut target_logit, &mut slope, &mut target_cos
                )?;
                let (gx, gy, gz) = stats_grid(n, count);
                let cfg = LaunchConfig { grid_dim: (gx, gy, gz), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
                launch!(shard, "row_stats", cfg, &c, &count32, &n32, &col, &first32, &mut target_logit, &s, &filter, &bound, &hard_ptr, &hard_t, &cols, &mut part_max, &mut part_sum, &mut part_rest, &mut part_other)?;
                let parts32 = gy as i32;
                let cfg = LaunchConfig { grid_dim: combine_grid(n), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
                launch!(shard, "combine_row_stats", cfg, &part_max, &part_sum, &part_rest, &part_other, &parts32, &n32, &merge, &mut head_max, &mut sum, &mut rest, &mut other)?;
            }
            shard.stream.memcpy_dtod(&head_max, &mut local_max.view_mut()).map_err(|e| device_error("copy", e))?;
        }
        shard.step = if plan.train {
            let mut target_logit = shard.take::<f32>(n, "target logits")?;
            shard.stream.memcpy_dtod(&sum_stats.slice(2 * n..3 * n), &mut target_logit.view_mut()).map_err(|e| device_error("copy", e))?;
            StepState::Forward(Box::new(Forward { n, k, ids, unit, unit_gemm, inv_norm_e: inv_e, col, w_gemm, inv_norm_w: inv_w, cos, target_logit, target_slope: slope, local_max, hard_above, margin_slot }))
        } else {
            StepState::Evaluated { local_max }
        };
        Ok((max_stats, sum_stats))
    }

    fn rescale_sums(&mut self, shard: usize, maxes: &DeviceBuf<f32>, sums: &mut DeviceBuf<f32>) -> Result<()> {
        let g = &self.shards[shard];
        let local_max = match &g.step {
            StepState::Forward(f) => &f.local_max,
            StepState::Evaluated { local_max } => local_max,
            _ => return Err(Error::internal("rescale before forward")),
        };
        let n = local_max.len();
        let n32 = n as i32;
        let global = maxes.slice(0..n);
        let mut view = sums.view_mut();
        let (mut sum, mut tail) = view.split_at_mut(n);
        let mut rest = tail.slice_mut(0..n);
        launch!(g, "rescale_sums", grid_for(n), local_max, &global, &mut sum, &mut rest, &n32)
    }

    fn read_stats(&mut self, shard: usize, maxes: &DeviceBuf<f32>, sums: &DeviceBuf<f32>, n: usize) -> Result<RowStats> {
        let g = &self.shards[shard];
        let maxes: Vec<f32> = g.stream.clone_dtoh(&maxes.view()).map_err(|e| device_error("download", e))?;
        let sums: Vec<f32> = g.stream.clone_dtoh(&sums.view()).map_err(|e| device_error("download", e))?;
        Ok(RowStats::from_reduced(&maxes, &sums, n))
    }

    fn defer_loss_check(&mut self, shard: usize, maxes: &DeviceBuf<f32>, sums: &DeviceBuf<f32>) -> Result<bool> {
        let g = &self.shards[shard];
        let n = maxes.len() / 3;
        let n32 = n as i32;
        launch!(g, "check_loss", grid_for(n), maxes, sums, &n32, &g.verdict)?;
        Ok(true)
    }

    fn backward(&mut self, shard: usize, maxes: &DeviceBuf<f32>, sums: &DeviceBuf<f32>, update: Update) -> Result<DeviceBuf<f32>> {
        // This backend updates in `apply` only (it proves nothing beforehand).
        if let Update::Apply(_) = update {
            return Err(Error::internal("the CUDA backend was asked to update inside the backward pass"));
        }
        let (d, dtype) = (self.cfg.embedding_dim, self.cfg.compute_dtype);
        let (s, filter) = (self.cfg.margin.scale, self.cfg.margin.interclass_filter);
        let bound = crate::margin::cosine_bound(&self.cfg.margin);
        let g = &mut self.shards[shard];
        g.bind()?;
        let StepState::Forward(fwd) = std::mem::replace(&mut g.step, StepState::Idle) else {
            return Err(Error::internal("backward before forward"));
        };
        let Forward { n, k, ids, unit, unit_gemm, inv_norm_e, col, w_gemm, inv_norm_w, cos, target_logit, target_slope, hard_above, margin_slot, .. } = *fwd;
        let (hard_ptr, hard_t) = (hard_above.as_ref().map_or(0u64, DeviceBuf::ptr), g.hard_t(&hard_above, margin_slot));
        let (n32, d32, k32, dt) = (n as i32, d as i32, k as i32, dtype_code(dtype));
        let inv_batch = 1.0 / n as f32;
        let row_max = maxes.slice(0..n);
        let two_sums = sums.slice(0..2 * n);
        let mut grad_cos = g.take::<u8>(k * n * dtype.size(), "cosine gradient")?;
        launch!(g, "cos_gradient", grid_for(k * n), &cos, &k32, &n32, &col, &target_logit, &target_slope, &row_max, &two_sums, &inv_batch, &s, &filter, &bound, &hard_ptr, &hard_t, &mut grad_cos, &dt)?;
        drop(cos);
        let gx = g.take::<f32>(n * d, "embedding gradient (global batch)")?;
        let g_unit = g.take::<f32>(k * d, "gradient of the unit centers")?;
        // gx [N][d] = Gᵀ·Ŵ; column-major: (d×N) = Ŵ(d×k)·G(k×N).
        g.gemm(false, true, d, n, k, w_gemm.ptr(), d, grad_cos.ptr(), n, gx.ptr(), d, dtype)?;
        // gŴ [k][d] = G·X̂; column-major: (d×k) = X̂(d×N)·G(N×k), G being [k][N] row-major.
        g.gemm(false, false, d, k, n, unit_gemm.ptr(), d, grad_cos.ptr(), n, g_unit.ptr(), d, dtype)?;
        let mut projected = g.take::<f32>(k * d, "center gradients (sampled classes × embedding_dim)")?;
        launch!(g, g.centers.kernel("project_center_grads", "project_center_grads_bf16"), per_row(k), &g.centers, &ids, &g_unit, &inv_norm_w, &k32, &d32, &mut projected)?;
        g.step = StepState::Backward(Box::new(Backward { unit, inv_norm_e, pending: DeviceRowGrads { rows: ids, grads: projected, len: k }, update_checked_at: None }));
        // The update over exactly these rows is checked now, while they are fresh, where nothing
        // was accumulated before; `finite` reads its verdict with the rest.
        if let (Update::Check(step), None, StepState::Backward(b)) = (update, &g.accumulated, &g.step) {
            g.launch_update(&b.pending, &self.cfg, step, false)?;
            if let StepState::Backward(b) = &mut g.step {
                b.update_checked_at = Some(step);
            }
        }
        Ok(gx)
    }

    fn embedding_grad(&mut self, shard: usize, summed: DeviceBuf<f32>, first_row: usize, rows: usize, world: f32) -> Result<DeviceBuf<f32>> {
        let d = self.cfg.embedding_dim;
        let g = &self.shards[shard];
        let StepState::Backward(b) = &g.step else { return Err(Error::internal("embedding gradient before backward")) };
        let mut out = g.take::<f32>(rows * d, "embedding gradient")?;
        if rows > 0 {
            let (rows32, d32, f32_code) = (rows as i32, d as i32, 0i32);
            let u = b.unit.slice(first_row * d..(first_row + rows) * d);
            let inv = b.inv_norm_e.slice(first_row..first_row + rows);
            launch!(g, "embedding_grad", per_row(rows), &summed, &u, &inv, &rows32, &d32, &world, &mut out, &f32_code)?;
        }
        Ok(out)
    }

    fn finite(&mut self, shard: usize, grad: &DeviceBuf<f32>) -> Result<bool> {
        let d = self.cfg.embedding_dim;
        let g = &mut self.shards[shard];
        let StepState::Backward(b) = &g.step else { return Err(Error::internal("finiteness before backward")) };
        let len = grad.len() as u64;
        launch!(g, "flag_non_finite", grid_for(grad.len()), grad, &len, &g.verdict)?;
        let p = &b.pending;
        let plen = (p.len * d) as u64;
        launch!(g, "flag_non_finite", grid_for(plen as usize), &p.grads, &plen, &g.verdict)?;
        let checked_at = b.update_checked_at;
        let verdict = g.read_verdict()?;
        verdict.step()?;
        g.update_checked = checked_at.map(|step| CheckedUpdate { step, finite: verdict.update_finite() });
        Ok(verdict.gradients_finite())
    }

    fn write_grads(&mut self, grads: &[DeviceBuf<f32>], out: Outputs<'_, '_>) -> Result<()> {
        match out {
            Outputs::Host(outs) => {
                for ((g, grad), o) in self.shards.iter().zip(grads).zip(outs.iter_mut()) {
                    if o.is_empty() {
                        continue;
                    }
                    let rows = grad.slice(0..o.len());
                    match o {
                        // Straight into the caller's buffer.
                        GradOut::F32(dst) => g.stream.memcpy_dtoh(&rows, &mut **dst).map_err(|e| device_error("download", e))?,
                        half => half.write(&g.stream.clone_dtoh(&rows).map_err(|e| device_error("download", e))?),
                    }
                }
            }
            Outputs::Device(batches) => {
                for ((g, grad), b) in self.shards.iter().zip(grads).zip(batches) {
                    // The ordering event belongs to this GPU's context, kernel or not.
                    g.bind()?;
                    if b.rows > 0 {
                        let len = (b.rows * self.cfg.embedding_dim) as u64;
                        let (dt, dst) = (dtype_code(b.dtype), b.grad);
                        // The caller's buffer, written in place in its dtype.
                        launch!(g, "convert_f32", grid_for(len as usize), grad, &len, &dst, &dt)?;
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
        // What a call before left to undo is not this call's: a failure below leaves nothing to undo.
        g.undo = None;
        let StepState::Backward(b) = std::mem::replace(&mut g.step, StepState::Idle) else {
            return Err(Error::internal("accumulate before backward"));
        };
        let pending = b.pending;
        let Some(before) = &g.accumulated else {
            g.accumulated = Some(pending);
            g.undo = Some(Undo::Moved);
            return Ok(());
        };
        // A second compute before an apply: the rows are merged on the host, and the accumulated
        // gradients replaced only once the merge is on the device.
        let download = |r: &DeviceRowGrads| -> Result<RowGrads> {
            let rows: Vec<u32> = g.stream.clone_dtoh(&r.rows.slice(0..r.len)).map_err(|e| device_error("download", e))?;
            let grads: Vec<f32> = g.stream.clone_dtoh(&r.grads.slice(0..r.len * d)).map_err(|e| device_error("download", e))?;
            Ok(RowGrads { rows, grads })
        };
        let merged = download(before)?.union(&download(&pending)?, d)?;
        let rows = g.work.upload(&merged.rows, "accumulated gradient rows")?;
        let grads = g.work.upload(&merged.grads, "accumulated center gradients")?;
        let before = g.accumulated.replace(DeviceRowGrads { rows, grads, len: merged.rows.len() });
        g.undo = before.map(Undo::Replaced);
        g.update_checked = None;
        Ok(())
    }

    fn unaccumulate(&mut self, shard: usize) {
        let g = &mut self.shards[shard];
        g.update_checked = None;
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
        g.update_checked = None;
    }

    fn accumulated_rows(&self, shard: usize) -> usize {
        self.shards[shard].accumulated.as_ref().map_or(0, |a| a.len)
    }

    fn update_is_finite(&mut self, shard: usize, step: OptStep) -> Result<bool> {
        if let Some(checked) = self.shards[shard].update_checked.filter(|c| c.step == step) {
            return Ok(checked.finite);
        }
        let g = &self.shards[shard];
        let Some(acc) = &g.accumulated else { return Ok(true) };
        g.bind()?;
        g.reset_verdict()?;
        g.launch_update(acc, &self.cfg, step, false)?;
        Ok(g.read_verdict()?.update_finite())
    }

    fn apply(&mut self, shard: usize, step: OptStep) -> Result<()> {
        let g = &mut self.shards[shard];
        if let Some(acc) = &g.accumulated {
            g.bind()?;
            g.launch_update(acc, &self.cfg, step, true)?;
        }
        g.accumulated = None;
        g.undo = None;
        g.update_checked = None;
        Ok(())
    }

    fn commit_margin_state(&mut self) {
        if std::mem::take(&mut self.margin_pending) {
            self.margin_live = 1 - self.margin_live;
        }
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
    fn margin_state(&self) -> Result<Vec<f32>> {
        match self.shards.first().and_then(|g| Some((g, g.margin_slots.get(self.margin_live)?))) {
            Some((g, live)) => g.stream.clone_dtoh(live).map_err(|e| device_error("reading the margin's running statistics", e)),
            None => Ok(Vec::new()),
        }
    }

    fn set_margin_state(&mut self, values: &[f32]) -> Result<()> {
        MarginState::from_values(self.cfg.margin.kind, values)?;
        for g in &mut self.shards {
            if let Some(live) = g.margin_slots.get_mut(self.margin_live) {
                g.stream.memcpy_htod(values, live).map_err(|e| device_error("writing the margin's running statistics", e))?;
            }
        }
        self.margin_pending = false;
        Ok(())
    }

    fn read_state(&self, tensor: StateTensor, first: u64, count: u64, out: &mut [f32]) -> Result<()> {
        let d = self.cfg.embedding_dim;
        for (shard, row, rows, at) in crate::sharding::pieces(&self.ranges, first, count) {
            let g = &self.shards[shard];
            let src = match tensor {
                StateTensor::Centers => &g.centers,
                t => &g.state.iter().find(|(x, _)| *x == t).ok_or_else(|| Error::invalid(format!("this optimizer keeps no {}", t.name())))?.1,
            };
            src.read(&g.stream, row * d..(row + rows) * d, &mut out[at * d..(at + rows) * d])?;
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
            dst.write(&stream, row * d..(row + rows) * d, &values[at * d..(at + rows) * d])?;
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
        let zeros = try_zeroed::<f32>(count as usize * d, "zeroed optimizer state")?;
        for &t in &StateTensor::for_optimizer(self.cfg.optimizer.kind)[1..] {
            self.write_state(t, first, count, &zeros)?;
        }
        if self.cfg.optimizer.kind == OptimizerKind::AdamW {
            self.write_steps(first, count, &try_zeroed::<u32>(count as usize, "zeroed step counts")?)?;
        }
        Ok(())
    }

    fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(f32, u64)>>> {
        let shards: Vec<_> = self
            .shards
            .iter()
            .map(|g| super::search::Shard { work: &g.work, blas: &g.blas, functions: &g.functions, centers: &g.centers, range: g.range, budget: g.eval_budget })
            .collect();
        super::search::search(&shards, self.cfg.embedding_dim, queries, k)
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
    fn the_kernels_margin_kinds_are_the_configurations() {
        assert_eq!(super::super::kernels::defined("MARGIN_ADAFACE"), MarginKind::ADAFACE.code());
    }

    #[test]
    fn a_null_caller_stream_is_the_legacy_default_stream() {
        assert_eq!(caller_stream(0) as usize, CU_STREAM_LEGACY, "NULL must order against the legacy stream, not skip ordering");
        assert_eq!(caller_stream(0xdead_b000) as usize, 0xdead_b000);
    }
}
