//! The seam between the engine (validation, step bookkeeping, loss) and the code that owns the
//! centers and does the arithmetic. Each backend drives all of this process's shards and talks to
//! other shards through its communicator.

pub mod cpu;
pub mod cuda;

use crate::comm::group::ProcessGroup;
use crate::config::BackendKind;
use crate::error::{Error, Status};
use std::sync::Arc;

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

/// A device batch copied to the host.
pub struct StagedBatch {
    pub embeddings: HostValues,
    pub labels: Vec<i64>,
}

/// One local shard's validated input.
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

/// Per-row softmax statistics over all shards' sampled columns, after the all-reduces.
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
    /// Sampled classes summed over all shards.
    pub sampled_classes: u64,
}

impl RowStats {
    /// The backward pass's per-row factors: 1 / Σexp, and Σ_{j≠y} p_j (the target column's
    /// `1 − p_y`, taken from the non-target sum so that it keeps its digits when p_y → 1).
    pub fn softmax_factors(&self) -> (Vec<f32>, Vec<f32>) {
        let inv_sum: Vec<f32> = self.sum.iter().map(|&s| 1.0 / s).collect();
        let mass = self.rest.iter().zip(&inv_sum).map(|(&r, &inv)| r * inv).collect();
        (inv_sum, mass)
    }
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

/// A backend: the shards of this process, their centers and optimizer state.
pub trait Backend: Send {
    /// The class ranges of the local shards, in rank order.
    fn ranges(&self) -> &[ShardRange];
    /// Gathers the batch, samples, computes cosines and the reduced softmax statistics.
    fn forward(&mut self, batches: &[HostBatch<'_>], plan: StepPlan) -> Result<RowStats>;
    /// After a training `forward`: writes each shard's embedding gradient into `grads` and updates
    /// the sampled centers with learning rate `lr`.
    fn backward(&mut self, stats: &RowStats, lr: f32, grads: &mut [GradOut<'_>]) -> Result<()>;
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
    fn phase_times(&self) -> PhaseTimes;
    /// Copies device batches to the host, ordered after the callers' streams.
    fn download(&mut self, _batches: &[DeviceBatch], _dim: usize) -> Result<Vec<StagedBatch>> {
        Err(crate::error::Error::invalid("device memory needs the CUDA backend; this head runs on the CPU"))
    }
    /// Writes gradients to the device batches' `grad` pointers; the callers' streams then see them.
    fn upload_grads(&mut self, _batches: &[DeviceBatch], _grads: &[HostValues]) -> Result<()> {
        Err(crate::error::Error::invalid("device memory needs the CUDA backend; this head runs on the CPU"))
    }
}

/// The backend `cfg` asks for, holding this process's shards of the job. `process_shards` lists
/// every process's local shard count, in process order.
pub(crate) fn create(cfg: &crate::config::Config, group: &Arc<ProcessGroup>, process_shards: &[usize]) -> Result<Box<dyn Backend>> {
    match cfg.backend {
        BackendKind::Cpu => {
            let comm: Box<dyn crate::comm::HostCommunicator> = if group.is_solo() {
                if cfg.world_size != cfg.local_shards {
                    return Err(Error::new(
                        Status::Unavailable,
                        format!(
                            "the CPU backend reaches other processes only through allgather: world_size {} > local_shards {} needs process_count > 1 and an allgather callback",
                            cfg.world_size, cfg.local_shards
                        ),
                    ));
                }
                Box::new(crate::comm::local::LocalCommunicator::new(cfg.local_shards))
            } else {
                Box::new(crate::comm::process::ProcessCommunicator::new(group.clone(), process_shards.to_vec()))
            };
            Ok(Box::new(cpu::CpuBackend::new(cfg, comm)?))
        }
        BackendKind::Cuda => {
            let ordinals: Vec<i32> =
                if cfg.devices.is_empty() { (0..cfg.local_shards as i32).collect() } else { cfg.devices.clone() };
            let devices = cuda::probe(&ordinals)?;
            Ok(Box::new(cuda::CudaBackend::new(cfg, &devices)?))
        }
    }
}
