//! The seam between the engine (validation, step bookkeeping, loss) and the code that owns the
//! centers and does the arithmetic. Each backend drives all of this process's shards and talks to
//! other shards through its communicator.

pub mod cpu;
pub mod cuda;

use crate::comm::group::ProcessGroup;
use crate::config::BackendKind;
use crate::error::{Error, Status};
use std::sync::Arc;

pub use crate::comm::Collectives;
use crate::engine::driver::Driver;

use crate::error::Result;
use crate::optimizer::StateTensor;
use crate::sharding::ShardRange;
use half::{bf16, f16};

/// One local shard's embeddings in host memory, already validated.
#[derive(Clone, Copy)]
pub enum Embeddings<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Embeddings<'_> {
    pub fn len(&self) -> usize {
        match self {
            Embeddings::F32(v) => v.len(),
            Embeddings::F16(v) => v.len(),
            Embeddings::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the values as f32.
    pub fn extend_f32(&self, out: &mut Vec<f32>) {
        match self {
            Embeddings::F32(v) => out.extend_from_slice(v),
            Embeddings::F16(v) => out.extend(v.iter().map(|x| x.to_f32())),
            Embeddings::BF16(v) => out.extend(v.iter().map(|x| x.to_f32())),
        }
    }
}

/// Where one local shard's embedding gradient goes, in the embeddings' dtype.
pub enum GradOut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

impl GradOut<'_> {
    pub fn len(&self) -> usize {
        match self {
            GradOut::F32(d) => d.len(),
            GradOut::F16(d) => d.len(),
            GradOut::BF16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn write(&mut self, src: &[f32]) {
        match self {
            GradOut::F32(d) => d.copy_from_slice(src),
            GradOut::F16(d) => d.iter_mut().zip(src).for_each(|(o, &v)| *o = f16::from_f32(v)),
            GradOut::BF16(d) => d.iter_mut().zip(src).for_each(|(o, &v)| *o = bf16::from_f32(v)),
        }
    }
}

/// One local shard's batch in device memory (CUDA backend): pointers on that shard's GPU, and the
/// caller's stream (0 for none) that the step is ordered after and that then sees the outputs.
#[derive(Clone, Copy, Debug)]
pub struct DeviceBatch {
    pub embeddings: u64,
    pub labels: u64,
    /// 0 when no gradient is wanted (evaluation).
    pub grad: u64,
    pub rows: usize,
    pub dtype: crate::config::DType,
    pub stream: usize,
}

/// Values of one of the batch dtypes, owned on the host.
pub enum HostValues {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl HostValues {
    pub fn zeros(dtype: crate::config::DType, len: usize) -> Self {
        match dtype {
            crate::config::DType::F32 => HostValues::F32(vec![0.0; len]),
            crate::config::DType::F16 => HostValues::F16(vec![f16::ZERO; len]),
            crate::config::DType::BF16 => HostValues::BF16(vec![bf16::ZERO; len]),
        }
    }

    pub fn as_embeddings(&self) -> Embeddings<'_> {
        match self {
            HostValues::F32(v) => Embeddings::F32(v),
            HostValues::F16(v) => Embeddings::F16(v),
            HostValues::BF16(v) => Embeddings::BF16(v),
        }
    }

    pub fn as_grad_out(&mut self) -> GradOut<'_> {
        match self {
            HostValues::F32(v) => GradOut::F32(v),
            HostValues::F16(v) => GradOut::F16(v),
            HostValues::BF16(v) => GradOut::BF16(v),
        }
    }
}

/// One local shard's validated input.
#[derive(Clone, Copy)]
pub struct HostBatch<'a> {
    pub embeddings: Embeddings<'a>,
    pub labels: &'a [i64],
}

/// What the forward pass of a step should do.
#[derive(Clone, Copy, Debug)]
pub struct StepPlan {
    pub step: u64,
    pub seed: u64,
    /// 1.0 uses every class (evaluation, or model parallelism).
    pub sample_rate: f32,
    /// Keep what the backward pass needs; false for evaluation.
    pub train: bool,
}

/// Per-row softmax statistics over all shards' sampled columns, after the all-reduces, on the host.
#[derive(Clone, Debug, Default)]
pub struct RowStats {
    pub max: Vec<f32>,
    /// Σ_j exp(z_j − max).
    pub sum: Vec<f32>,
    /// Σ_{j≠y} exp(z_j − max), summed beside `sum` in the same all-reduce (SPEC §1.7).
    pub rest: Vec<f32>,
    pub target_logit: Vec<f32>,
    pub target_cos: Vec<f32>,
    pub other_cos: Vec<f32>,
}

impl RowStats {
    /// From the reduced statistics as the primitives lay them out (`Primitives::forward`):
    /// max-type `[row max, best non-target cosine, target cosine]`, sum-type `[Σexp, non-target
    /// Σexp, target logit]`, copied to the host.
    pub fn from_reduced(maxes: &[f32], sums: &[f32], n: usize) -> RowStats {
        RowStats {
            max: maxes[..n].to_vec(),
            sum: sums[..n].to_vec(),
            rest: sums[n..2 * n].to_vec(),
            target_logit: sums[2 * n..3 * n].to_vec(),
            target_cos: maxes[2 * n..3 * n].to_vec(),
            other_cos: maxes[n..2 * n].to_vec(),
        }
    }
}

/// The backward pass's per-row factors from the reduced sums (`[Σexp, non-target Σexp, …]`, N
/// each): 1 / Σexp, and Σ_{j≠y} p_j (the target column's `1 − p_y`, taken from the non-target sum
/// so that it keeps its digits when p_y → 1).
pub fn softmax_factors(sums: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
    let inv_sum: Vec<f32> = sums[..n].iter().map(|&s| 1.0 / s).collect();
    let mass = sums[n..2 * n].iter().zip(&inv_sum).map(|(&r, &inv)| r * inv).collect();
    (inv_sum, mass)
}

/// Wall time of each phase of the last step, for benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct PhaseTimes {
    pub gather: f64,
    pub sample: f64,
    pub forward: f64,
    pub reduce: f64,
    pub backward: f64,
    pub scatter: f64,
    /// Optimizer update of the accumulated center gradients (with its finiteness check).
    pub update: f64,
    /// The optimizer step ran inside the backward pass (proven safe before it, `Update::Apply`),
    /// whose time then includes it; `update` is 0.
    pub update_in_backward: bool,
    /// Which engine multiplied the step's GEMMs (`Primitives::gemm_path`); empty before a step.
    pub gemm_path: &'static str,
    /// The GEMMs' own time within forward and backward, where the backend times them apart
    /// (CUDA events); None on the CPU, whose GEMMs are the bulk of those two phases.
    pub gemm: Option<f64>,
    /// The most device memory the head has held at once (bytes), where it has a device.
    pub peak_device_bytes: Option<u64>,
}

/// The phases of `PhaseTimes`, in step order, as `Primitives::mark` names them.
pub mod phase {
    pub(crate) const GATHER: usize = 0;
    pub(crate) const SAMPLE: usize = 1;
    pub(crate) const FORWARD: usize = 2;
    pub(crate) const REDUCE: usize = 3;
    pub(crate) const BACKWARD: usize = 4;
    pub(crate) const SCATTER: usize = 5;
    pub(crate) const UPDATE: usize = 6;
    pub(crate) const COUNT: usize = 7;
}

impl PhaseTimes {
    pub fn slot(&mut self, phase: usize) -> &mut f64 {
        match phase {
            phase::GATHER => &mut self.gather,
            phase::SAMPLE => &mut self.sample,
            phase::FORWARD => &mut self.forward,
            phase::REDUCE => &mut self.reduce,
            phase::BACKWARD => &mut self.backward,
            phase::SCATTER => &mut self.scatter,
            _ => &mut self.update,
        }
    }
}

/// A device's own clock of the last call (`Primitives::device_times`): seconds per phase (NaN
/// where the device could not time it), of the GEMMs, and the peak memory held.
#[derive(Clone, Copy, Debug)]
pub struct DeviceTimes {
    pub phases: [f64; phase::COUNT],
    pub gemm: f64,
    pub peak_bytes: u64,
}

/// A call's batches as the host passed them, one per local shard: host slices, or pointers on
/// the shards' GPUs. They go to the backend as they are; only it knows how to read them.
#[derive(Clone, Copy)]
pub enum Batches<'a, 'b> {
    Host(&'b [HostBatch<'a>]),
    Device(&'b [DeviceBatch]),
}

impl Batches<'_, '_> {
    pub fn rows(&self) -> Vec<u64> {
        match self {
            Batches::Host(b) => b.iter().map(|b| b.labels.len() as u64).collect(),
            Batches::Device(b) => b.iter().map(|b| b.rows as u64).collect(),
        }
    }
}

/// Where a call's embedding gradients go, one per local shard.
pub enum Outputs<'a, 'b> {
    Host(&'b mut [GradOut<'a>]),
    Device(&'b [DeviceBatch]),
}

/// The buffer types of one kind of memory: what the collectives move and the primitives compute on.
pub trait Memory {
    type F32: Send;
    type I64: Send;
}

/// A buffer of f32 (or i64) values in memory `M`.
pub type F32Buf<M> = <M as Memory>::F32;
pub type I64Buf<M> = <M as Memory>::I64;
/// One shard's rows: embeddings (f32) and labels.
pub type Rows<M> = (F32Buf<M>, I64Buf<M>);
/// One shard's statistics before the all-reduces: max-type and sum-type.
pub type Stats<M> = (F32Buf<M>, F32Buf<M>);

/// Host memory: plain vectors.
pub struct Host;
impl Memory for Host {
    type F32 = Vec<f32>;
    type I64 = Vec<i64>;
}

/// What a backward pass does about the optimizer step of its call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Update {
    /// None follows it (the step split's compute).
    None,
    /// A step at this rate follows once the job has agreed it is finite: a backend may check it
    /// (`update_is_finite`) here, while the rows are in cache.
    Check(f32),
    /// Every shard of the job proved the step at this rate safe (`update_proven`): each center is
    /// updated as soon as its gradient exists, and nothing is left pending.
    Apply(f32),
}

/// The per-shard compute primitives a backend implements; `engine::driver` strings them into
/// the step (SPEC §1) once for every backend. `shard` indexes this process's shards.
pub trait Primitives: ShardState + Send {
    type Mem: Memory;
    /// The class ranges of the local shards, in rank order.
    fn ranges(&self) -> &[ShardRange];
    /// Each local shard's rows (embeddings as f32, labels) in this backend's memory. Host batches
    /// come validated; device batches are validated here.
    fn load(&mut self, batches: Batches<'_, '_>) -> Result<Vec<Rows<Self::Mem>>>;
    /// Buffers of `len` values for shard `shard`'s collectives.
    fn alloc_f32(&mut self, shard: usize, len: usize, what: &str) -> Result<F32Buf<Self::Mem>>;
    fn alloc_i64(&mut self, shard: usize, len: usize, what: &str) -> Result<I64Buf<Self::Mem>>;
    /// Picks the classes the shard uses this step from the global batch's labels (SPEC §1.3);
    /// returns how many.
    fn sample(&mut self, shard: usize, labels: &I64Buf<Self::Mem>, plan: StepPlan) -> Result<u64>;
    /// Normalizes the gathered batch and computes the cosines over the sampled classes and the
    /// shard's statistics: max-type `[row max, best non-target cosine, target cosine]` and sum-type
    /// `[Σexp and non-target Σexp relative to the shard's row max, target logit]`, each N long,
    /// laid out for one all-reduce each (SPEC §1.7). Keeps what `backward` needs until the next `forward`.
    fn forward(&mut self, shard: usize, emb: F32Buf<Self::Mem>, labels: &I64Buf<Self::Mem>, plan: StepPlan) -> Result<Stats<Self::Mem>>;
    /// After the max all-reduce: rescales the shard's two sums from its own row max to the global one.
    fn rescale_sums(&mut self, shard: usize, maxes: &F32Buf<Self::Mem>, sums: &mut F32Buf<Self::Mem>) -> Result<()>;
    /// The reduced statistics (the same on every shard), copied to the host.
    fn read_stats(&mut self, shard: usize, maxes: &F32Buf<Self::Mem>, sums: &F32Buf<Self::Mem>, n: usize) -> Result<RowStats>;
    /// Whether what the forward pass left proves, before any gradient exists, that this shard's
    /// gradients will all be finite and that an optimizer step at `lr` over them keeps every
    /// center finite and normalizable, nothing being accumulated before it. Where every shard of
    /// the job proves it, `backward` takes [`Update::Apply`] and the step needs no pass of its
    /// own over the sampled rows. A backend that cannot update inside `backward` answers false.
    fn update_proven(&mut self, _shard: usize, _lr: f32) -> bool {
        false
    }
    /// The backward pass over the shard's sampled columns: its center gradients into the pending
    /// buffer (or, with [`Update::Apply`], straight into the optimizer step), and its part of the
    /// embedding gradient (N × d, before the reduce-scatter). When it fails it has changed nothing:
    /// everything it allocates comes before the first update.
    fn backward(&mut self, shard: usize, maxes: &F32Buf<Self::Mem>, sums: &F32Buf<Self::Mem>, update: Update) -> Result<F32Buf<Self::Mem>>;
    /// Back through the normalization of rows `[first_row, first_row + rows)` of the global
    /// batch, times `world` (SPEC §1.8): the shard's returned gradient, still in its memory.
    fn embedding_grad(&mut self, shard: usize, summed: F32Buf<Self::Mem>, first_row: usize, rows: usize, world: f32) -> Result<F32Buf<Self::Mem>>;
    /// Whether the shard's pending center gradients and `grad` (its embedding gradient) are finite.
    fn finite(&mut self, shard: usize, grad: &F32Buf<Self::Mem>) -> Result<bool>;
    /// Copies each local shard's embedding gradient to the caller's buffers.
    fn write_grads(&mut self, grads: &[F32Buf<Self::Mem>], out: Outputs<'_, '_>) -> Result<()>;
    /// Adds the pending center gradients to the accumulated ones (union of sampled rows).
    fn accumulate(&mut self, shard: usize) -> Result<()>;
    /// Undoes the last `accumulate` (a later check of the same call failed).
    fn unaccumulate(&mut self, shard: usize);
    /// Drops the accumulated center gradients.
    fn discard(&mut self, shard: usize);
    /// Rows with accumulated gradients.
    fn accumulated_rows(&self, shard: usize) -> usize;
    /// Whether one optimizer step over the accumulated gradients would leave every touched center
    /// finite and normalizable in f32 (nothing is written).
    fn update_is_finite(&mut self, shard: usize, lr: f32) -> Result<bool>;
    /// The optimizer step over the accumulated rows; clears them.
    fn apply(&mut self, shard: usize, lr: f32) -> Result<()>;
    /// Where the work is asynchronous (CUDA): the start (or end) of `phase` (`phase::*`) on the
    /// device's timeline; a later end replaces an earlier one.
    fn mark(&mut self, _phase: usize, _start: bool) {}
    /// The device's own times of the phases marked last, once it has finished them; None where
    /// the host's clock times the work (CPU).
    fn device_times(&self) -> Option<DeviceTimes> {
        None
    }
    /// Which engine multiplied the last step's GEMMs, and in what precision (e.g.
    /// `onednn-bf16`, `gemm-crate-f32`, `cublas`).
    fn gemm_path(&self) -> &'static str;
}

/// The state a backend holds for this process's shards: centers, optimizer state, and search
/// over the centers.
pub trait ShardState {
    /// Copies rows of global classes `[first, first + count)` (all owned here) of `tensor` into `out`.
    fn read_state(&self, tensor: StateTensor, first: u64, count: u64, out: &mut [f32]) -> Result<()>;
    /// Overwrites those rows of `tensor`.
    fn write_state(&mut self, tensor: StateTensor, first: u64, count: u64, values: &[f32]) -> Result<()>;
    /// AdamW's per-row step counts of those classes.
    fn read_steps(&self, first: u64, count: u64, out: &mut [u32]) -> Result<()>;
    fn write_steps(&mut self, first: u64, count: u64, values: &[u32]) -> Result<()>;
    /// Overwrites centers and resets their optimizer state (warm start).
    fn set_centers(&mut self, first: u64, count: u64, values: &[f32]) -> Result<()>;
    /// The `k` best (cosine, class) pairs of each unit-norm query (rows of `queries`) over the local
    /// centers, best first, ties by smaller class id.
    fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(f32, u64)>>>;
}

/// Sorted rows with their gradients, `d` values each: a shard's accumulated center gradients.
#[derive(Default)]
pub struct RowGrads {
    pub rows: Vec<u32>,
    pub grads: Vec<f32>,
}

impl RowGrads {
    /// The sum of `self` and `other` over the union of their rows.
    pub fn union(&self, other: &RowGrads, d: usize) -> Result<RowGrads> {
        let (a, b) = (&self.rows, &other.rows);
        let mut rows = Vec::new();
        rows.try_reserve_exact(a.len() + b.len()).map_err(|_| Error::new(Status::OutOfMemory, "cannot allocate accumulated gradient rows"))?;
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            let next = match (a.get(i), b.get(j)) {
                (Some(&x), Some(&y)) => x.min(y),
                (Some(&x), None) => x,
                (None, Some(&y)) => y,
                (None, None) => unreachable!(),
            };
            rows.push(next);
            i += usize::from(a.get(i) == Some(&next));
            j += usize::from(b.get(j) == Some(&next));
        }
        let mut grads = crate::error::try_zeroed::<f32>(rows.len() * d, "accumulated center gradients")?;
        for (src, g) in [(a, &self.grads), (b, &other.grads)] {
            let mut at = 0;
            for (r, &row) in src.iter().enumerate() {
                while rows[at] != row {
                    at += 1;
                }
                grads[at * d..(at + 1) * d].iter_mut().zip(&g[r * d..(r + 1) * d]).for_each(|(o, &v)| *o += v);
            }
        }
        Ok(RowGrads { rows, grads })
    }
}

/// The local pieces of global classes `[first, first + count)`, which must lie within `ranges`:
/// (shard, first row in it, rows, offset of the piece in the caller's buffer in rows).
pub fn pieces(ranges: &[ShardRange], first: u64, count: u64) -> Vec<(usize, usize, usize, usize)> {
    let mut out = Vec::new();
    let mut class = first;
    let end = first + count;
    while class < end {
        let s = ranges.partition_point(|r| r.start + r.len <= class);
        let row = (class - ranges[s].start) as usize;
        let rows = (ranges[s].len - row as u64).min(end - class) as usize;
        out.push((s, row, rows, (class - first) as usize));
        class += rows as u64;
    }
    out
}

/// A head's backend as the engine sees it: the step driver over one backend's primitives and
/// collectives (`engine::driver::Driver`), and the state it holds.
pub trait Backend: Send {
    fn ranges(&self) -> &[ShardRange];
    /// Loss statistics over the sampled (or, at sample rate 1, all) classes; nothing changes.
    /// `checked` is the engine's verdict on the batches, agreed by the job before anything else.
    fn evaluate(&mut self, checked: Result<()>, batches: Batches<'_, '_>, plan: StepPlan) -> Result<Evaluated>;
    /// Forward and backward: the embedding gradients into `out` and the center gradients
    /// accumulated; with `apply`, then one optimizer step at that learning rate. All or nothing.
    fn compute(&mut self, checked: Result<()>, batches: Batches<'_, '_>, plan: StepPlan, out: Outputs<'_, '_>, apply: Option<f32>) -> Result<Evaluated>;
    /// One optimizer step over the accumulated gradients (false when there were none).
    fn apply(&mut self, lr: f32) -> Result<bool>;
    fn discard(&mut self);
    fn state(&self) -> &dyn ShardState;
    fn state_mut(&mut self) -> &mut dyn ShardState;
    fn phase_times(&self) -> PhaseTimes;
}

/// What a forward pass reports, the same on every shard and process.
#[derive(Clone, Copy, Debug)]
pub struct Evaluated {
    pub loss: f64,
    pub accuracy: f64,
    pub global_batch: u64,
    pub sampled_classes: u64,
}

/// Labels in `[0, num_classes)` and finite embeddings of a norm that normalizes in f32, batch by
/// batch (the first offence named).
pub(crate) fn validate(batches: &[HostBatch<'_>], num_classes: u64, d: usize) -> Result<()> {
    for (s, b) in batches.iter().enumerate() {
        if let Some((i, &label)) = b.labels.iter().enumerate().find(|(_, &l)| l < 0 || l as u64 >= num_classes) {
            return Err(Error::invalid(format!("batch {s}: label {label} at row {i} is outside [0, {num_classes})")));
        }
        let bad = match b.embeddings {
            Embeddings::F32(v) => v.iter().position(|x| !x.is_finite()),
            Embeddings::F16(v) => v.iter().position(|x| !x.is_finite()),
            Embeddings::BF16(v) => v.iter().position(|x| !x.is_finite()),
        };
        if let Some(at) = bad {
            return Err(Error::invalid(format!("batch {s}: embedding row {} holds NaN or Inf", at / d)));
        }
        if let Some((row, norm)) = crate::engine::first_oversized_embedding(&b.embeddings, d) {
            return Err(Error::invalid(format!(
                "batch {s}: embedding row {row} has norm {norm:.3e}, above {:.3e}: it cannot be normalized in f32",
                crate::engine::MAX_ROW_NORM
            )));
        }
    }
    Ok(())
}

/// The backend `cfg` asks for, holding this process's shards of the job. `process_shards` lists
/// every process's local shard count, in process order.
pub(crate) fn create(cfg: &crate::config::Config, group: &Arc<ProcessGroup>, process_shards: &[usize]) -> Result<Box<dyn Backend>> {
    match cfg.backend {
        BackendKind::Cpu => {
            let coll: Box<dyn Collectives<Host>> = if group.is_solo() {
                if cfg.world_size != cfg.local_shards {
                    return Err(Error::new(
                        Status::Unavailable,
                        format!(
                            "the CPU backend reaches other processes only through allgather: world_size {} > local_shards {} needs process_count > 1 and an allgather callback",
                            cfg.world_size, cfg.local_shards
                        ),
                    ));
                }
                Box::new(crate::comm::local::LocalCollectives::new(cfg.local_shards))
            } else {
                Box::new(crate::comm::process::ProcessCollectives::new(group.clone(), process_shards.to_vec()))
            };
            Ok(Box::new(Driver::new(cpu::CpuBackend::new(cfg)?, coll, group.clone(), cfg.embedding_dim, cfg.first_rank)))
        }
        BackendKind::Cuda => {
            let ordinals: Vec<i32> =
                if cfg.devices.is_empty() { (0..cfg.local_shards as i32).collect() } else { cfg.devices.clone() };
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = ordinals.iter().find(|o| !seen.insert(**o)) {
                return Err(Error::invalid(format!("devices lists GPU {dup} twice: NCCL needs one shard per GPU")));
            }
            let devices = cuda::probe(&ordinals)?;
            let prims = cuda::CudaBackend::new(cfg, &devices)?;
            let coll = crate::comm::nccl::NcclCollectives::new(prims.streams(), cfg.world_size, cfg.first_rank, group.clone(), cfg.nccl_id.as_deref())?;
            Ok(Box::new(Driver::new(prims, Box::new(coll), group.clone(), cfg.embedding_dim, cfg.first_rank)))
        }
    }
}
