//! The compute seam: what a backend (CPU, CUDA) implements for this process's shards — the
//! per-shard primitives the step driver strings into a step (`crate::head::driver`), and the state
//! it holds. A backend knows nothing of the collectives or of other backends' memory.

pub mod cpu;
pub mod cuda;
pub mod step;

use crate::batch::{Batches, Outputs};
use crate::error::Result;
use crate::memory::{F32Buf, I64Buf, Memory, Rows, Stats};
use crate::sharding::ShardRange;
use crate::state::StateTensor;
use step::{DeviceTimes, OptStep, RowStats, StepPlan, Update};

/// The per-shard compute primitives a backend implements; `crate::head::driver` strings them into
/// the step (SPEC §1) once for every backend. `shard` indexes this process's shards.
pub trait Primitives: ShardState + Send {
    type Mem: Memory;
    /// The class ranges of the local shards, in rank order.
    fn ranges(&self) -> &[ShardRange];
    /// Each local shard's rows (embeddings as f32, labels) in this backend's memory. Host batches
    /// come validated; device batches are validated here.
    fn load(&mut self, batches: Batches<'_, '_>) -> Result<Vec<Rows<Self::Mem>>>;
    /// Buffers of `len` values for shard `shard`'s collectives, each written in full by the
    /// collective that takes it (its contents are not initialised).
    fn alloc_f32(&mut self, shard: usize, len: usize, what: &'static str) -> Result<F32Buf<Self::Mem>>;
    fn alloc_i64(&mut self, shard: usize, len: usize, what: &'static str) -> Result<I64Buf<Self::Mem>>;
    /// Picks the classes the shard uses this step from the global batch's labels (SPEC §1.3);
    /// returns how many.
    fn sample(&mut self, shard: usize, labels: &I64Buf<Self::Mem>, plan: StepPlan) -> Result<u64>;
    /// The cosine of each row of the gathered batch with its label's center where the shard owns
    /// it, −∞ elsewhere (N values, for a max all-reduce): CurricularFace's pre-pass (SPEC §1.6a),
    /// whose every logit depends on its row's target cosine.
    fn target_cosines(&mut self, shard: usize, emb: &F32Buf<Self::Mem>, labels: &I64Buf<Self::Mem>) -> Result<F32Buf<Self::Mem>>;
    /// Normalizes the gathered batch and computes the cosines over the sampled classes and the
    /// shard's statistics: max-type `[row max, best non-target cosine, target cosine]` and sum-type
    /// `[Σexp and non-target Σexp relative to the shard's row max, target logit]`, each N long,
    /// laid out for one all-reduce each (SPEC §1.7). `targets`: every row's target cosine
    /// (`target_cosines` reduced), where the margin needs them. Keeps what `backward` needs until
    /// the next `forward`.
    fn forward(&mut self, shard: usize, emb: F32Buf<Self::Mem>, labels: &I64Buf<Self::Mem>, plan: StepPlan, targets: Option<&F32Buf<Self::Mem>>) -> Result<Stats<Self::Mem>>;
    /// After the max all-reduce: rescales the shard's two sums from its own row max to the global one.
    fn rescale_sums(&mut self, shard: usize, maxes: &F32Buf<Self::Mem>, sums: &mut F32Buf<Self::Mem>) -> Result<()>;
    /// The reduced statistics (the same on every shard), copied to the host.
    fn read_stats(&mut self, shard: usize, maxes: &F32Buf<Self::Mem>, sums: &F32Buf<Self::Mem>, n: usize) -> Result<RowStats>;
    /// Where the statistics stay in the backend's memory (no caller asked for them): whether the
    /// backend checks the loss's finiteness there, as part of the shard's verdict in `finite`, so
    /// that nothing waits for the statistics. False: the driver reads them and checks it.
    fn defer_loss_check(&mut self, _shard: usize, _maxes: &F32Buf<Self::Mem>, _sums: &F32Buf<Self::Mem>) -> Result<bool> {
        Ok(false)
    }
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
    /// Whether the shard's pending center gradients and `grad` (its embedding gradient) are finite;
    /// an error for what the backend found wrong in the step itself (a deferred check: the loss,
    /// `defer_loss_check`).
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
    /// finite and normalizable in f32, and every value finite as stored (nothing is written).
    fn update_is_finite(&mut self, shard: usize, step: OptStep) -> Result<bool>;
    /// The optimizer step over the accumulated rows; clears them.
    fn apply(&mut self, shard: usize, step: OptStep) -> Result<()>;
    /// Keeps the margin's running statistics of the last training forward pass: its step
    /// succeeded on every process (SPEC §1.6a: updated in training steps only, before use).
    fn commit_margin_state(&mut self) {}
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
    /// The margin's running statistics (`MarginState::values`), the same on every shard; none for
    /// the combined margin.
    fn margin_state(&self) -> Result<Vec<f32>> {
        Ok(Vec::new())
    }
    /// Overwrites them (a checkpoint's); a backend without adaptive margins takes only none.
    fn set_margin_state(&mut self, values: &[f32]) -> Result<()> {
        if values.is_empty() { Ok(()) } else { Err(crate::error::Error::invalid("this head's margin keeps no running statistics")) }
    }
    /// The `k` best (cosine, class) pairs of each unit-norm query (rows of `queries`) over the local
    /// centers, best first, ties by smaller class id.
    fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(f32, u64)>>>;
}
