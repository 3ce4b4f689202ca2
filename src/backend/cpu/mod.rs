//! The CPU backend: every local shard in this process in host memory, blocks of sampled classes
//! spread over a work-stealing pool. It is the reference the CUDA backend is tested against.

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod dnnl;
pub mod gemm;
pub mod kernels;
pub(crate) mod optimizer;
mod search;
mod table;

pub use search::scan as scan_centers;
pub(crate) use search::{selection_margin, unit_rows};

use self::gemm::{matmul, GemmPath, Operand};
use self::kernels::{LogitParams, RowAccumulator, RowGradParams};
use self::optimizer::{above, OptimizerState, Store, VALUE_BOUND};
use self::table::{per_task_scratch, rows_per_task, written};
use super::step::{softmax_factors, OptStep, RowGrads, RowStats, StepPlan, Update};
use super::{Primitives, ShardState};
use crate::batch::{Batches, Outputs};
use crate::config::{Config, DType, MarginKind};
use crate::error::{try_refill, try_reserve, try_zeroed, Error, Result};
use crate::memory::Host;
use crate::margin::MarginState;
use crate::rng;
use crate::sharding::{pieces, sample, ShardRange};
use crate::state::StateTensor;
use crate::storage::Stored;
use half::bf16;
use rayon::prelude::*;

/// Sampled classes per block: a block's centers (BLOCK·d floats) and cosines (BLOCK·N) stay in a
/// core's L2 cache between the GEMM and the element-wise passes.
const BLOCK: usize = 256;

/// Workers kept from step to step, so that their scratch (an N×d gradient accumulator among it)
/// is not allocated, page-faulted and zeroed by the kernel every step. `key` is what their sizes
/// were made for; another key drops them.
struct Workers<W, K> {
    key: Option<K>,
    workers: Vec<W>,
}

impl<W, K> Workers<W, K> {
    fn new() -> Self {
        Workers { key: None, workers: Vec::new() }
    }
}

/// Runs `body(worker, block)` for every block on the pool, in tasks of consecutive blocks, each
/// with one of `kept`'s workers for `key` (made by `make` where missing: fallible, their scratch
/// grows with the batch; `reset` at the start of each task). Returns the workers used, in task
/// order, so that merging them gives the same bits whatever thread ran which task.
fn for_blocks<W: Send, K: PartialEq>(blocks: usize, kept: &mut Workers<W, K>, key: K, make: impl Fn() -> Result<W>, reset: impl Fn(&mut W) + Sync, body: impl Fn(&mut W, usize) + Sync) -> Result<&mut [W]> {
    let per = crate::pool::install(|| crate::pool::min_blocks_per_task(blocks))?;
    let tasks = blocks.div_ceil(per);
    if kept.key.as_ref() != Some(&key) {
        kept.workers.clear();
        kept.key = Some(key);
    }
    while kept.workers.len() < tasks {
        kept.workers.push(make()?);
    }
    let workers = &mut kept.workers[..tasks];
    crate::pool::install(|| {
        workers.par_iter_mut().enumerate().for_each(|(t, w)| {
            reset(w);
            for b in t * per..((t + 1) * per).min(blocks) {
                body(w, b);
            }
        })
    })?;
    Ok(workers)
}

/// A pointer that several threads may use to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: every use writes ranges derived from distinct block indices or distinct sampled rows.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}
impl<T> Shared<T> {
    /// # Safety
    /// The range must be in bounds and not accessed by anyone else while the slice lives.
    unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
    /// # Safety
    /// The range must be in bounds and not written by anyone while the slice lives.
    unsafe fn read<'a>(self, start: usize, len: usize) -> &'a [T] {
        std::slice::from_raw_parts(self.0.add(start), len)
    }
}

/// Whether the GEMMs take bf16 operands themselves (oneDNN on bf16 hardware) rather than f32
/// values rounded to bf16: the same inputs either way, so the same products.
fn native_bf16(dtype: DType) -> bool {
    gemm::path(dtype) == GemmPath::OneDnnBf16
}

/// Rounds values to the compute dtype's precision, so that an f32 GEMM over them equals a GEMM with
/// f16/bf16 inputs and f32 accumulation (products of two such values are exact in f32).
fn quantize(dtype: DType, values: &mut [f32]) {
    match dtype {
        DType::F32 => {}
        DType::BF16 => values.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
        DType::F16 => values.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
    }
}

/// One shard's state, its centers and optimizer state stored as `T` (`storage_dtype`): f32, or
/// bf16 widened to f32 block by block for the step's arithmetic and rounded back on update.
struct Shard<T> {
    range: ShardRange,
    centers: Vec<T>,
    optimizer: OptimizerState<T>,
    // Per-step state, valid between forward and backward.
    sampled: Vec<u32>,
    /// Column of each global row's label among `sampled`, −1 when the label is not on this shard.
    col: Vec<i32>,
    target_logit: Vec<f32>,
    target_slope: Vec<f32>,
    target_cos: Vec<f32>,
    /// Gradient seeds `[sampled][N]` for the backward pass (`kernels::block_sum`'s, streamed from
    /// each block's scratch), and each block's row maxima `[block][N]` they are relative to. The
    /// backward pass only reads them.
    seeds: Vec<f32>,
    block_max: Vec<f32>,
    inv_norm: Vec<f32>,
    /// The shard's row maxima before the max all-reduce.
    local_max: Vec<f32>,
    /// The global batch, normalized (and rounded to the compute dtype for the GEMMs), and 1/‖e‖.
    unit: Vec<f32>,
    unit_gemm: Vec<f32>,
    /// The normalized batch in bf16, when the GEMMs take bf16 operands (else empty).
    unit_bf16: Vec<bf16>,
    /// The forward product's batch operand transposed (`[d][N]`), when the AVX-512 kernels
    /// multiply it: they read the operand's rows in place (else empty).
    unit_t: Vec<f32>,
    inv_norm_e: Vec<f32>,
    /// This step's center gradients over `sampled` (through the normalization of W), and whether
    /// all of them are finite.
    pending: RowGrads,
    pending_finite: bool,
    /// Gradients accumulated since the last optimizer step, and what they were before the last
    /// `accumulate` (to undo it).
    accumulated: RowGrads,
    undo: Option<Undo>,
    /// The verdict of `update_is_finite` for this step over `pending`, taken during the backward
    /// pass (when nothing was accumulated before it).
    prechecked: Option<(OptStep, bool)>,
    /// The passes' per-task scratch, kept for the next step: keyed by (global batch, GEMMs on
    /// bf16) and (global batch, GEMMs on bf16, update inside the pass).
    forward_workers: Workers<ForwardWorker, (usize, bool)>,
    backward_workers: Workers<BackwardWorker, (usize, bool, bool)>,
}

fn no_such_tensor(tensor: StateTensor) -> Error {
    Error::invalid(format!("this optimizer keeps no {}", tensor.name()))
}

/// How to take back the last `accumulate`.
enum Undo {
    /// It moved the pending gradients into an empty accumulator.
    Moved,
    /// It replaced the accumulator by a union; this was the accumulator before.
    Replaced(RowGrads),
}

pub struct CpuBackend<T> {
    cfg: Config,
    ranges: Vec<ShardRange>,
    shards: Vec<Shard<T>>,
    /// The margin's running statistics (the same for every shard), and those of the training step
    /// under way, kept when it succeeds (`commit_margin_state`).
    margin: MarginState,
    margin_next: Option<MarginState>,
    /// The statistics the step's logits use, and its rows' AdaFace scalers (empty for the other
    /// kinds) and hard-negative thresholds (CurricularFace's cos(θ_y + m); +∞ for the other kinds):
    /// `MarginState::row_margins`.
    step_margin: MarginState,
    row_scalers: Vec<f32>,
    hard_above: Vec<f32>,
}

impl<T: Stored> CpuBackend<T> {
    /// The local shards of `cfg`'s job, stored as `T` (`cfg.storage_dtype`'s type).
    pub fn new(cfg: &Config) -> Result<Self> {
        if !cfg.devices.is_empty() {
            return Err(Error::invalid("devices is for the CUDA backend; pass NULL with the CPU backend"));
        }
        let d = cfg.embedding_dim;
        let ranges: Vec<ShardRange> = (cfg.first_rank..cfg.first_rank + cfg.local_shards)
            .map(|r| ShardRange::of(cfg.num_classes, cfg.world_size, r))
            .collect();
        let mut shards = Vec::with_capacity(ranges.len());
        for &range in &ranges {
            let elems = (range.len as usize).checked_mul(d).ok_or_else(|| Error::invalid("num_classes × embedding_dim overflows"))?;
            let mut centers = Vec::new();
            try_reserve(&mut centers, elems, "class centers")?;
            crate::pool::install(|| {
                // Written row by row on the pool, never zeroed first: a table of gigabytes takes
                // one parallel pass. A narrower storage holds each initial value rounded to nearest.
                centers.spare_capacity_mut().par_chunks_mut(d).enumerate().for_each_init(Vec::new, |wide, (j, row)| {
                    let row = written(row);
                    let class = range.start + j as u64;
                    match T::as_f32_mut(row) {
                        Some(row) => rng::init_center(cfg.seed, class, cfg.init_std, row),
                        None => {
                            wide.resize(d, 0.0);
                            rng::init_center(cfg.seed, class, cfg.init_std, wide);
                            T::narrow_nearest(wide, row);
                        }
                    }
                })
            })?;
            // SAFETY: every row of the capacity was written above.
            unsafe { centers.set_len(elems) };
            shards.push(Shard {
                range,
                centers,
                optimizer: OptimizerState::new(cfg.optimizer.kind, range.len as usize, d)?,
                sampled: Vec::new(),
                col: Vec::new(),
                target_logit: Vec::new(),
                target_slope: Vec::new(),
                target_cos: Vec::new(),
                seeds: Vec::new(),
                block_max: Vec::new(),
                inv_norm: Vec::new(),
                local_max: Vec::new(),
                unit: Vec::new(),
                unit_gemm: Vec::new(),
                unit_bf16: Vec::new(),
                unit_t: Vec::new(),
                inv_norm_e: Vec::new(),
                pending: RowGrads::default(),
                pending_finite: true,
                accumulated: RowGrads::default(),
                undo: None,
                prechecked: None,
                forward_workers: Workers::new(),
                backward_workers: Workers::new(),
            });
        }
        let margin = MarginState::initial(cfg.margin.kind);
        Ok(CpuBackend { cfg: cfg.clone(), ranges, shards, margin, margin_next: None, step_margin: margin, row_scalers: Vec::new(), hard_above: Vec::new() })
    }

    /// The step's margin from the global batch (computed once, at the first shard: every shard
    /// holds the same batch): AdaFace's statistics from the raw embedding norms, CurricularFace's
    /// from the target cosines (`targets`, reduced over the shards). A training step's new
    /// statistics are kept only when it succeeds.
    fn step_margin(&mut self, emb: &[f32], targets: Option<&[f32]>, plan: StepPlan) -> Result<()> {
        let kind = self.cfg.margin.kind;
        let d = self.cfg.embedding_dim.max(1);
        let rows: Vec<f64> = match (kind, targets) {
            (MarginKind::AdaFace { .. }, _) => emb.chunks_exact(d).map(|row| kernels::dot_f64(row, row).sqrt()).collect(),
            (MarginKind::Curricular { .. }, Some(t)) => t.iter().map(|&c| c as f64).collect(),
            (MarginKind::Curricular { .. }, None) => return Err(Error::internal("CurricularFace's forward pass needs the reduced target cosines")),
            (MarginKind::Combined, _) => Vec::new(),
        };
        let state = if plan.train { self.margin.after_batch(kind, &rows) } else { self.margin };
        self.margin_next = plan.train.then_some(state);
        self.step_margin = state;
        let per_row = state.row_margins(kind, &rows);
        if let MarginKind::Curricular { .. } = kind {
            (self.row_scalers, self.hard_above) = (Vec::new(), per_row);
        } else {
            self.row_scalers = per_row;
            // No row has hard negatives: the thresholds are all +∞ and stay so between steps (the
            // kind is the head's), only the batch's length changes.
            self.hard_above.resize(emb.len() / d, f32::INFINITY);
        }
        Ok(())
    }

}

/// How the step's cosines become logits outside the target column.
fn logit_params<'a>(cfg: &Config, state: MarginState, hard_above: &'a [f32]) -> LogitParams<'a> {
    LogitParams {
        scale: cfg.margin.scale,
        filter: cfg.margin.interclass_filter,
        bound: crate::margin::cosine_bound(&cfg.margin),
        hard_above,
        hard_t: state.hard_negative_t(),
    }
}

/// Whether a block's sampled rows (ascending) are consecutive rows of the table.
fn consecutive(ids: &[u32]) -> bool {
    (ids[ids.len() - 1] - ids[0]) as usize + 1 == ids.len()
}

/// Whether the GEMMs can read a block's scattered f32 centers where they are (the AVX-512
/// kernels), so that `center_block` need not copy them.
fn gathers_in_place(dtype: DType) -> bool {
    dtype == DType::F32 && gemm::path(dtype) == GemmPath::Avx512F32
}

/// The centers of one block as a GEMM operand (`ids.len()` rows of `d`).
/// - f32: the centers themselves, unnormalized, and the caller scales results by 1/‖W_j‖
///   (`true`). In place where the ids are consecutive, or given `gather` where the kernels read
///   scattered rows where they are (`gather` then holds the ids from the block's first row), else
///   copied into `scratch`. The forward pass gathers: its norm pass has just brought the rows into
///   cache. The backward pass copies: the copy's loop, prefetching row by row, reads rows from
///   memory faster than the GEMM's own reads would (measured: docs/benchmarks.md).
/// - Other dtypes: a copy in `scratch`, normalized and rounded to the compute dtype, since rounding
///   must apply to the unit vectors as a GPU's bf16 GEMM would see them (`false`).
///
/// # Safety
/// `centers` must hold the rows `ids` (each `d` long, strictly ascending), and nothing may write
/// rows from the first to the last of them while the operand lives.
#[allow(clippy::too_many_arguments)]
unsafe fn center_block<'a>(centers: Shared<f32>, ids: &[u32], inv: &[f32], d: usize, dtype: DType, gather: Option<&'a mut Vec<u32>>, scratch: &'a mut [f32]) -> (Operand<'a>, bool) {
    let rows = ids.len();
    let first = ids[0] as usize;
    if dtype == DType::F32 && consecutive(ids) {
        return (Operand::rows(centers.read(first * d, rows * d), d), true);
    }
    if let Some(local_ids) = gather.filter(|_| gathers_in_place(dtype)) {
        local_ids.clear();
        local_ids.extend(ids.iter().map(|&j| j - first as u32));
        let span = ids[rows - 1] as usize - first + 1;
        return (Operand::gathered(centers.read(first * d, span * d), d, local_ids), true);
    }
    let copy = &mut scratch[..rows * d];
    for (i, ((dst, &j), &r)) in copy.chunks_exact_mut(d).zip(ids).zip(inv).enumerate() {
        kernels::prefetch_ahead(centers.0, d, ids, i);
        let src: &[f32] = centers.read(j as usize * d, d);
        if dtype == DType::F32 {
            dst.copy_from_slice(src);
        } else {
            dst.iter_mut().zip(src).for_each(|(o, &v)| *o = v * r);
        }
    }
    if dtype == DType::F32 {
        (Operand::rows(copy, d), true)
    } else {
        quantize(dtype, copy);
        (Operand::rows(copy, d), false)
    }
}

/// The centers of one block normalized by the forward pass's `inv` and rounded to bf16 in
/// `scratch`, the backward pass's GEMM operand when the GEMMs take bf16 (the values
/// [`center_block`] gives the f32 GEMM for a bf16 step; the forward pass makes them along with
/// the norms, `kernels::unit_rows_bf16`).
///
/// # Safety
/// As [`center_block`].
unsafe fn center_block_bf16<'a>(centers: Shared<f32>, ids: &[u32], inv: &[f32], d: usize, scratch: &'a mut [bf16]) -> &'a [bf16] {
    let copy = &mut scratch[..ids.len() * d];
    for (i, ((dst, &j), &r)) in copy.chunks_exact_mut(d).zip(ids).zip(inv).enumerate() {
        kernels::prefetch_ahead(centers.0, d, ids, i);
        kernels::to_bf16_scaled(centers.read(j as usize * d, d), r, dst);
    }
    copy
}

/// Replaces the GEMM's cosine of each target entry `(column, row)` of the block starting at column
/// `start` by `exact(column − start, row)`, the same operands' product summed in f64. A target
/// cosine goes through the margin, whose slope grows without bound as θ → 0 (ArcFace), so the
/// rounding of a 512-term f32 sum there moves a confident row's loss and gradients by several
/// times what it moves the other logits; one f64 dot product per batch row costs nothing.
fn refine_targets(cos: &mut [f32], n: usize, start: usize, targets: &[(u32, usize)], exact: impl Fn(usize, usize) -> f64) {
    for &(c, i) in targets {
        let r = c as usize - start;
        cos[r * n + i] = exact(r, i) as f32;
    }
}

/// Per-thread scratch of the forward pass.
struct ForwardWorker {
    centers: Vec<f32>,
    /// A gathered block's ids from its first row (`center_block`).
    local_ids: Vec<u32>,
    centers_bf16: Vec<bf16>,
    cos: Vec<f32>,
    rows: RowAccumulator,
    target_block: Vec<f32>,
    /// (row, target logit, slope, clamped cosine) for rows whose target lies in this worker's blocks.
    targets: Vec<(usize, f32, f32, f32)>,
    /// The block's centers widened to f32, where they are stored narrower (else empty).
    wide: Vec<f32>,
}

/// Per-thread scratch of the backward pass.
struct BackwardWorker {
    /// ∂loss/∂cos of the block (in `grad_bf16` instead when the GEMMs take bf16).
    grad_cos: Vec<f32>,
    centers: Vec<f32>,
    centers_bf16: Vec<bf16>,
    /// ∂loss/∂cos of the block in bf16, when the GEMMs take bf16.
    grad_bf16: Vec<bf16>,
    grad_x: Vec<f32>,
    /// Copies of one row's center and state for the update and its check.
    update: Vec<f32>,
    /// The block's centers widened to f32, where they are stored narrower (else empty).
    wide: Vec<f32>,
    /// The block's center gradients when they go straight into the optimizer step (else they go
    /// to the shard's pending buffer).
    grads: Vec<f32>,
    /// `kernels::cos_gradient`'s per-row seed scales for the block.
    seed_scale: Vec<f32>,
    finite: bool,
    update_ok: bool,
}

/// A block's stored centers widened to f32 in `scratch`, where they are not f32 already: then the
/// table the block's passes read, with its rows at `LOCAL_IDS`.
fn widened_block<'a, T: Stored>(centers: &'a [T], ids: &'a [u32], d: usize, scratch: &'a mut [f32]) -> (&'a [f32], &'a [u32]) {
    let len = if T::ROUNDS { ids.len() * d } else { centers.len() };
    // SAFETY: `centers` holds the rows `ids` and is borrowed, so nothing writes them; the table
    // returned is `len` values, `centers` itself or the widened rows in `scratch`.
    unsafe {
        let (table, ids) = widened_rows(Shared(centers.as_ptr().cast_mut()), ids, d, scratch);
        (table.read(0, len), ids)
    }
}

/// [`widened_block`] for the backward pass, whose updates write the rows: the table as a pointer.
///
/// # Safety
/// `centers` must hold the rows `ids`, and nothing may write them while the result is in use.
unsafe fn widened_rows<'a, T: Stored>(centers: Shared<T>, ids: &'a [u32], d: usize, scratch: &'a mut [f32]) -> (Shared<f32>, &'a [u32]) {
    if let Some(table) = T::f32_ptr(centers.0) {
        return (Shared(table), ids);
    }
    for (i, (dst, &j)) in scratch.chunks_exact_mut(d).zip(ids).enumerate() {
        kernels::prefetch_ahead(centers.0, d, ids, i);
        T::widen(centers.read(j as usize * d, d), dst);
    }
    (Shared(scratch.as_mut_ptr()), &LOCAL_IDS[..ids.len()])
}

/// The rows of a widened block, in order.
static LOCAL_IDS: [u32; BLOCK] = {
    let mut ids = [0u32; BLOCK];
    let mut i = 0;
    while i < BLOCK {
        ids[i] = i as u32;
        i += 1;
    }
    ids
};

impl<T: Stored> Shard<T> {
    fn tensor(&self, tensor: StateTensor) -> Result<&[T]> {
        match tensor {
            StateTensor::Centers => Ok(&self.centers),
            t => self.optimizer.tensor(t).ok_or_else(|| no_such_tensor(t)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    /// `scalers`: each row's AdaFace margin scaler (`MarginState::row_margins`), empty for the
    /// other kinds. `targets`: each row's target cosine, reduced over the shards, where the margin
    /// needs them (CurricularFace); they replace this shard's own.
    fn forward(&mut self, cfg: &Config, plan: StepPlan, labels: &[i64], params: LogitParams, scalers: &[f32], targets: Option<&[f32]>) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = labels.len();
        let unit_gemm = if self.unit_gemm.is_empty() { &self.unit } else { &self.unit_gemm };
        let d = cfg.embedding_dim;
        let batch = if self.unit_t.is_empty() { Operand::transposed(unit_gemm, d) } else { Operand::rows(&self.unit_t, n) };
        let k = self.sampled.len();
        self.col.clear();
        let mut by_col: Vec<(u32, usize)> = Vec::new();
        for (i, &label) in labels.iter().enumerate() {
            let class = label as u64;
            let c = if self.range.contains(class) {
                let local = (class - self.range.start) as u32;
                let c = self.sampled.binary_search(&local).expect("positives are always sampled");
                by_col.push((c as u32, i));
                c as i32
            } else {
                -1
            };
            self.col.push(c);
        }
        by_col.sort_unstable();
        self.inv_norm.clear();
        self.inv_norm.resize(k, 0.0);
        if plan.train {
            let need = k.checked_mul(n).ok_or_else(|| Error::invalid("batch × sampled classes overflows"))?;
            // Kept between steps: the GEMM overwrites it, and re-allocating would page-fault 4·N·k
            // bytes every step.
            if self.seeds.len() < need {
                self.seeds.clear();
                self.seeds = try_zeroed(need, "gradient seeds (sampled classes × global batch)")?;
            }
            let maxima = k.div_ceil(BLOCK) * n;
            if self.block_max.len() < maxima {
                self.block_max = try_zeroed(maxima, "block row maxima")?;
            }
        }
        let blocks = k.div_ceil(BLOCK);
        let seeds_out = Shared(self.seeds.as_mut_ptr());
        let block_max_out = Shared(self.block_max.as_mut_ptr());
        let inv_out = Shared(self.inv_norm.as_mut_ptr());
        let (stored, sampled, col, margin) = (&self.centers, &self.sampled, &self.col, &cfg.margin);
        let (train, dtype) = (plan.train, cfg.compute_dtype);
        let native = native_bf16(dtype);
        let gathers = gathers_in_place(dtype);
        let unit_bf16 = &self.unit_bf16;
        let worker = || {
            Ok(ForwardWorker {
                centers: if native || gathers { Vec::new() } else { try_zeroed(BLOCK * d, "center block scratch")? },
                local_ids: if gathers { try_zeroed::<u32>(BLOCK, "gathered block ids")? } else { Vec::new() },
                centers_bf16: if native { try_zeroed(BLOCK * d, "center block scratch")? } else { Vec::new() },
                cos: try_zeroed(BLOCK * n, "cosine scratch (256 classes × global batch)")?,
                rows: RowAccumulator::new(n),
                target_block: try_zeroed(n, "target logits")?,
                targets: Vec::new(),
                wide: if T::ROUNDS { try_zeroed(BLOCK * d, "widened center block")? } else { Vec::new() },
            })
        };
        let reset = |w: &mut ForwardWorker| {
            w.rows.reset();
            w.targets.clear();
        };
        let workers = for_blocks(blocks, &mut self.forward_workers, (n, native), worker, reset, |w, b| {
            let (start, end) = (b * BLOCK, ((b + 1) * BLOCK).min(k));
            let rows = end - start;
            // SAFETY: block b owns entries [start, end) of inv_norm.
            let inv = unsafe { inv_out.slice(start, rows) };
            let (centers, ids) = widened_block(stored, &sampled[start..end], d, &mut w.wide);
            // Read-only in the forward pass; `center_block` takes the pointer form the backward pass needs.
            let centers_ptr = Shared(centers.as_ptr().cast_mut());
            // In the worker's scratch, which stays in cache for the passes below; a training step's
            // seeds then go to the table in one streaming copy.
            let cos = &mut w.cos[..rows * n];
            let lo = by_col.partition_point(|&(c, _)| (c as usize) < start);
            let hi = by_col.partition_point(|&(c, _)| (c as usize) < end);
            let block_targets = &by_col[lo..hi];
            if native {
                let operand = &mut w.centers_bf16[..rows * d];
                kernels::unit_rows_bf16(centers, d, ids, inv, operand);
                matmul(rows, n, d, cos, Operand::rows(operand, d), Operand::transposed(unit_bf16, d), false);
                refine_targets(cos, n, start, block_targets, |r, i| kernels::dot_f64(&operand[r * d..(r + 1) * d], &unit_bf16[i * d..(i + 1) * d]));
            } else {
                kernels::row_inv_norms(centers, d, ids, inv);
                // SAFETY: nothing writes centers during the forward pass.
                let (operand, scaled_after) = unsafe { center_block(centers_ptr, ids, inv, d, dtype, Some(&mut w.local_ids), &mut w.centers) };
                matmul(rows, n, d, cos, operand, batch, false);
                if scaled_after {
                    kernels::scale_rows(cos, n, inv);
                }
                refine_targets(cos, n, start, block_targets, |r, i| {
                    let scale = if scaled_after { inv[r] as f64 } else { 1.0 };
                    kernels::dot_f64(operand.row(r, d), &unit_gemm[i * d..(i + 1) * d]) * scale
                });
            }
            for &(c, i) in block_targets {
                let at = (c as usize - start) * n + i;
                // The reduced target cosine, where given, stands in the table too: the clamp's
                // verdict on the target's gradient (`block_sum`) is then on the value its logit used.
                let raw = targets.map_or(cos[at], |t| t[i]);
                cos[at] = raw;
                let t = crate::margin::target(margin, raw, scalers.get(i).copied().unwrap_or(0.0));
                w.target_block[i] = t.logit;
                w.targets.push((i, t.logit, t.dlogit_dcos, raw.clamp(-1.0, 1.0)));
            }
            let maxima = w.rows.add_block(cos, n, start as i32, col, &w.target_block, params);
            if train {
                // SAFETY: block b owns rows [b·n, (b + 1)·n) of block_max and [start, end) of seeds.
                unsafe { block_max_out.slice(b * n, n) }.copy_from_slice(maxima);
                kernels::stream_copy(cos, unsafe { seeds_out.slice(start * n, rows * n) });
            }
        })?;
        if let Some((first, rest)) = workers.split_first_mut() {
            for w in rest.iter() {
                first.rows.merge(&w.rows);
                first.targets.extend_from_slice(&w.targets);
            }
        }
        self.target_logit = try_zeroed(n, "target logits")?;
        self.target_slope = try_zeroed(n, "target slopes")?;
        self.target_cos = try_zeroed(n, "target cosines")?;
        self.target_cos.fill(f32::NEG_INFINITY);
        let empty;
        let rows = match workers.first() {
            Some(w) => {
                for &(i, logit, slope, c) in &w.targets {
                    self.target_logit[i] = logit;
                    self.target_slope[i] = slope;
                    self.target_cos[i] = c;
                }
                &w.rows
            }
            None => {
                empty = RowAccumulator::new(n);
                &empty
            }
        };
        // Max-type statistics ride in one all-reduce, sum-type ones in another (SPEC §1.7).
        let maxes = [rows.max.as_slice(), rows.cos_other.as_slice(), self.target_cos.as_slice()].concat();
        let sums = [rows.sum.as_slice(), rows.rest.as_slice(), self.target_logit.as_slice()].concat();
        self.local_max.clear();
        self.local_max.extend_from_slice(&rows.max);
        Ok((maxes, sums))
    }

    /// The backward pass: ∂loss/∂cos over the sampled columns, the center gradients (through the
    /// normalization of W) into `pending`, and this shard's part of the embedding gradient.
    #[allow(clippy::too_many_arguments)]
    fn backward(&mut self, cfg: &Config, max: &[f32], inv_sum: &[f32], non_target_mass: &[f32], params: LogitParams, update: Update) -> Result<Vec<f32>> {
        let n = max.len();
        let d = cfg.embedding_dim;
        let k = self.sampled.len();
        let grads = RowGradParams {
            col: &self.col,
            target_slope: &self.target_slope,
            max,
            inv_sum,
            non_target_mass,
            inv_batch: 1.0 / n as f32,
        };
        // The update check runs over exactly these rows only when nothing is accumulated yet.
        let check = match update {
            Update::Check(step) if self.accumulated.rows.is_empty() => Some(step),
            _ => None,
        };
        let apply = match update {
            Update::Apply(step) => Some(step),
            _ => None,
        };
        self.pending.rows.clear();
        if apply.is_none() {
            // Kept between steps (and recycled after each update): the blocks overwrite their rows,
            // and re-allocating would page-fault 4·k·d bytes every step.
            if self.pending.grads.len() < k * d {
                self.pending.grads = Vec::new();
                self.pending.grads = try_zeroed(k * d, "center gradients (sampled classes × embedding_dim)")?;
            }
            self.pending.rows.extend_from_slice(&self.sampled);
        }
        let unit_gemm = if self.unit_gemm.is_empty() { &self.unit } else { &self.unit_gemm };
        // Written only with `apply`, each row by the block that owns it, after its last read.
        let stored = Shared(self.centers.as_mut_ptr());
        let first_class = self.range.start;
        let pending = Shared(self.pending.grads.as_mut_ptr());
        let (seeds, sampled, inv_norm, block_max, dtype) = (&self.seeds, &self.sampled, &self.inv_norm, &self.block_max, cfg.compute_dtype);
        let native = native_bf16(dtype);
        let unit_bf16 = &self.unit_bf16;
        let state = self.optimizer.rows_ptr();
        let opt = cfg.optimizer;
        let store = Store { how: cfg.storage_rounding, stream: update.step().map_or(0, OptStep::rounding_stream) };
        let worker = || {
            Ok(BackwardWorker {
                grad_cos: if native { Vec::new() } else { try_zeroed(BLOCK * n, "cosine gradient scratch")? },
                centers: if native { Vec::new() } else { try_zeroed(BLOCK * d, "center block scratch")? },
                centers_bf16: if native { try_zeroed(BLOCK * d, "center block scratch")? } else { Vec::new() },
                grad_bf16: if native { try_zeroed(BLOCK * n, "cosine gradient scratch")? } else { Vec::new() },
                grad_x: try_zeroed(n * d, "embedding gradient scratch")?,
                update: try_zeroed(5 * d, "update scratch")?,
                wide: if T::ROUNDS { try_zeroed(BLOCK * d, "widened center block")? } else { Vec::new() },
                grads: if apply.is_some() { try_zeroed(BLOCK * d, "center gradient scratch")? } else { Vec::new() },
                seed_scale: try_zeroed(n, "seed scales")?,
                finite: true,
                update_ok: true,
            })
        };
        // Before the blocks: with `apply`, nothing may fail once they start updating.
        let mut grad_x = try_zeroed(n * d, "embedding gradient")?;
        let blocks = k.div_ceil(BLOCK);
        let reset = |w: &mut BackwardWorker| {
            w.grad_x.fill(0.0);
            w.finite = true;
            w.update_ok = true;
        };
        let workers = for_blocks(blocks, &mut self.backward_workers, (n, native, apply.is_some()), worker, reset, |w, b| {
            let (start, end) = (b * BLOCK, ((b + 1) * BLOCK).min(k));
            let rows = end - start;
            kernels::seed_scales(&block_max[b * n..(b + 1) * n], &grads, &mut w.seed_scale);
            let block_seeds = &seeds[start * n..end * n];
            let global_ids = &sampled[start..end];
            // SAFETY: block b owns these rows; they are written only below, after their last read.
            let (centers, ids) = unsafe { widened_rows(stored, global_ids, d, &mut w.wide) };
            let inv = &inv_norm[start..end];
            // SAFETY: block b owns pending gradient rows [start, end).
            let gc = if apply.is_some() { &mut w.grads[..rows * d] } else { unsafe { pending.slice(start * d, rows * d) } };
            let scaled_after = if native {
                // SAFETY: the block's rows are written only below, after their last read.
                let operand = unsafe { center_block_bf16(centers, ids, inv, d, &mut w.centers_bf16) };
                let gb = &mut w.grad_bf16[..rows * n];
                kernels::cos_gradient_bf16(block_seeds, n, start as i32, &grads, params, &w.seed_scale, gb);
                matmul(n, d, rows, &mut w.grad_x, Operand::transposed(gb, n), Operand::rows(operand, d), true);
                matmul(rows, d, n, gc, Operand::rows(gb, n), Operand::rows(unit_bf16, d), false);
                false
            } else {
                let g = &mut w.grad_cos[..rows * n];
                kernels::cos_gradient(block_seeds, n, start as i32, &grads, params, &w.seed_scale, g);
                // SAFETY: as above; the operand is dropped before the rows are written.
                let (operand, scaled_after) = unsafe { center_block(centers, ids, inv, d, dtype, None, &mut w.centers) };
                if scaled_after {
                    // ∂/∂(W_j·x̂) = ∂/∂cos · 1/‖W_j‖: the GEMMs then see unnormalized centers.
                    kernels::scale_rows(g, n, inv);
                } else {
                    quantize(dtype, g);
                }
                matmul(n, d, rows, &mut w.grad_x, Operand::transposed(g, n), operand, true);
                matmul(rows, d, n, gc, Operand::rows(g, n), Operand::rows(unit_gemm, d), false);
                scaled_after
            };
            // Scattered rows have left the cache during the GEMMs, and no hardware prefetcher
            // follows them back (consecutive ones it does).
            let scattered = !consecutive(global_ids);
            for (r, (&j, &local)) in global_ids.iter().zip(ids).enumerate() {
                if let Some(&ahead) = global_ids.get(r + kernels::PREFETCH_AHEAD) {
                    if scattered || T::ROUNDS {
                        kernels::prefetch_row(stored.0, ahead as usize, d);
                    }
                    if apply.is_some() {
                        state.prefetch(ahead as usize, d);
                    }
                }
                let grad = &mut gc[r * d..(r + 1) * d];
                // SAFETY: block b owns rows `ids` of the centers and their state; no other slice of
                // this row is alive.
                let weights = unsafe { centers.slice(local as usize * d, d) };
                // Back through W/‖W‖; the 1/‖W‖ factor is already in `grad` when scaled_after.
                let factor = if scaled_after { 1.0 } else { inv[r] };
                let class = first_class + j as u64;
                if let Some(step) = apply {
                    // SAFETY: as above; sampled rows are distinct, so each has one writer.
                    unsafe {
                        state.update_projected(&opt, step.lr, j as usize, class, weights, inv[r], factor, grad, store, &mut w.update);
                        // An f32 table's `weights` is the stored row itself, updated in place.
                        if T::ROUNDS {
                            T::narrow(weights, stored.slice(j as usize * d, d));
                        }
                    }
                    continue;
                }
                kernels::project_out(weights, inv[r], factor, grad);
                if let Some(step) = check {
                    // SAFETY: the row and its state are only read.
                    w.update_ok &= unsafe { state.update_is_finite(&opt, step.lr, j as usize, class, weights, grad, store, &mut w.update) };
                }
            }
            // A proven update's gradients are finite: no pass over them to say so.
            if apply.is_none() {
                w.finite &= kernels::all_finite(gc);
            }
        })?;
        let update_ok = workers.iter().all(|w| w.update_ok);
        let finite = workers.iter().all(|w| w.finite);
        // In task order: the same sums whatever thread ran which task.
        if let Some((first, rest)) = workers.split_first() {
            grad_x.copy_from_slice(&first.grad_x);
            for w in rest {
                grad_x.iter_mut().zip(&w.grad_x).for_each(|(x, &y)| *x += y);
            }
        }
        self.prechecked = check.map(|step| (step, update_ok));
        self.pending_finite = finite;
        Ok(grad_x)
    }

    /// [`Primitives::update_proven`] for this shard. Every bound is on exact values with room for
    /// f32's rounding: an entry of ∂loss/∂cos is at most max(s, |∂z_y/∂c_y|)/N (softmax
    /// probabilities and the non-target mass are at most 1, the row max's term being exactly 1),
    /// a center's gradient at most 2.2·max(s, |∂z_y/∂c_y|)/‖W_j‖ (N such entries times unit or
    /// rounded-unit embeddings, the projection doubling it at most), and the embedding gradient
    /// at most C·2.2·max(...)/N·world/‖e‖ (C ≥ the job's sampled classes; every shard checks its
    /// own slopes, so the job's largest is checked). With f16 operands, ∂loss/∂cos must also fit f16.
    fn update_proven(&mut self, cfg: &Config, lr: f32, non_target_slope: f64) -> bool {
        if !self.accumulated.rows.is_empty() {
            return false;
        }
        let n = self.col.len();
        let mut slope = non_target_slope;
        for (&c, &t) in self.col.iter().zip(&self.target_slope) {
            if c >= 0 {
                if !t.is_finite() {
                    return false;
                }
                slope = slope.max((t as f64).abs());
            }
        }
        // f16 operands hold at most 65504: ∂loss/∂cos rounded to f16 beyond it becomes ∞ (which the
        // checked path then refuses).
        let entry_bounded = slope / n.max(1) as f64 * 1.01 <= 32768.0;
        if cfg.compute_dtype == DType::F16 && !entry_bounded {
            return false;
        }
        let row_factor = 2.2 * slope;
        let largest_inv_e = self.inv_norm_e.iter().fold(0.0f64, |m, &v| m.max(v as f64));
        let embedding = cfg.num_classes as f64 * row_factor / n.max(1) as f64 * cfg.world_size as f64 * largest_inv_e * 1.01;
        // NaN fails this comparison too.
        let embedding_bounded = embedding <= VALUE_BOUND;
        if !embedding_bounded {
            return false;
        }
        let state = self.optimizer.rows_ptr();
        self.sampled.iter().zip(&self.inv_norm).all(|(&j, &inv)| {
            let grad = row_factor * inv as f64 * 1.01;
            // 1/inv is max(‖W_j‖ in f32, 1e-12).
            // SAFETY: sampled rows are in bounds.
            grad <= VALUE_BOUND && unsafe { state.update_is_bounded(&cfg.optimizer, lr, j as usize, above(1.0 / inv), grad) }
        })
    }
}

impl<T: Stored> Primitives for CpuBackend<T> {
    type Mem = Host;

    fn ranges(&self) -> &[ShardRange] {
        &self.ranges
    }

    fn load(&mut self, batches: Batches<'_, '_>) -> Result<Vec<(Vec<f32>, Vec<i64>)>> {
        let Batches::Host(batches) = batches else {
            return Err(Error::invalid("device memory needs the CUDA backend; this head runs on the CPU"));
        };
        batches
            .iter()
            .map(|b| {
                let mut e = Vec::new();
                crate::error::try_reserve(&mut e, b.embeddings.len(), "the batch's embeddings")?;
                b.embeddings.extend_f32(&mut e);
                let mut labels = try_zeroed::<i64>(b.labels.len(), "the batch's labels")?;
                labels.copy_from_slice(b.labels);
                Ok((e, labels))
            })
            .collect()
    }

    fn alloc_f32(&mut self, _shard: usize, len: usize, what: &'static str) -> Result<Vec<f32>> {
        try_zeroed(len, what)
    }

    fn alloc_i64(&mut self, _shard: usize, len: usize, what: &'static str) -> Result<Vec<i64>> {
        try_zeroed(len, what)
    }

    fn sample(&mut self, shard: usize, labels: &Vec<i64>, plan: StepPlan) -> Result<u64> {
        let s = &mut self.shards[shard];
        s.sampled = sample(s.range, plan.sample_rate, plan.seed, plan.step, labels)?;
        Ok(s.sampled.len() as u64)
    }

    fn target_cosines(&mut self, shard: usize, emb: &Vec<f32>, labels: &Vec<i64>) -> Result<Vec<f32>> {
        let d = self.cfg.embedding_dim;
        let s = &self.shards[shard];
        let mut out = try_zeroed::<f32>(labels.len(), "target cosines")?;
        let mut wide = try_zeroed::<f32>(d, "a widened center")?;
        for ((o, &label), e) in out.iter_mut().zip(labels).zip(emb.chunks_exact(d)) {
            *o = if s.range.contains(label as u64) {
                let local = (label as u64 - s.range.start) as usize;
                let w = table::row_f32(&s.centers[local * d..(local + 1) * d], &mut wide);
                // As PyTorch's `normalize`: each norm at least 1e-12.
                let norms = kernels::dot_f64(w, w).sqrt().max(1e-12) * kernels::dot_f64(e, e).sqrt().max(1e-12);
                (kernels::dot_f64(w, e) / norms) as f32
            } else {
                f32::NEG_INFINITY
            };
        }
        Ok(out)
    }

    fn forward(&mut self, shard: usize, emb: Vec<f32>, labels: &Vec<i64>, plan: StepPlan, targets: Option<&Vec<f32>>) -> Result<(Vec<f32>, Vec<f32>)> {
        let d = self.cfg.embedding_dim;
        let n = labels.len();
        if shard == 0 {
            self.step_margin(&emb, targets.map(Vec::as_slice), plan)?;
        }
        let params = logit_params(&self.cfg, self.step_margin, &self.hard_above);
        let s = &mut self.shards[shard];
        s.unit = emb;
        s.inv_norm_e = try_zeroed(n, "embedding norms")?;
        kernels::normalize_rows_inplace(&mut s.unit, d, &mut s.inv_norm_e);
        let len = s.unit.len();
        s.unit_gemm.clear();
        s.unit_bf16.clear();
        if native_bf16(self.cfg.compute_dtype) {
            kernels::to_bf16(&s.unit, try_refill(&mut s.unit_bf16, len, "the GEMM copy of the batch")?);
        } else if self.cfg.compute_dtype != DType::F32 {
            let copy = try_refill(&mut s.unit_gemm, len, "the GEMM copy of the batch")?;
            copy.copy_from_slice(&s.unit);
            quantize(self.cfg.compute_dtype, copy);
        }
        s.unit_t.clear();
        if gemm::path(self.cfg.compute_dtype) == GemmPath::Avx512F32 {
            let unit = if s.unit_gemm.is_empty() { &s.unit } else { &s.unit_gemm };
            kernels::transpose(unit, d, try_refill(&mut s.unit_t, len, "the GEMM copy of the batch")?);
        }
        s.forward(&self.cfg, plan, labels, params, &self.row_scalers, targets.map(Vec::as_slice))
    }

    fn rescale_sums(&mut self, shard: usize, maxes: &Vec<f32>, sums: &mut Vec<f32>) -> Result<()> {
        let s = &self.shards[shard];
        let n = s.local_max.len();
        let (sum, rest) = sums.split_at_mut(n);
        // Both sums by the same factor; a shard without columns contributes 0.
        for (i, (&m, &gm)) in s.local_max.iter().zip(&maxes[..n]).enumerate() {
            let factor = if sum[i] == 0.0 { 0.0 } else { (m - gm).exp() };
            sum[i] *= factor;
            rest[i] *= factor;
        }
        Ok(())
    }

    fn read_stats(&mut self, _shard: usize, maxes: &Vec<f32>, sums: &Vec<f32>, n: usize) -> Result<RowStats> {
        Ok(RowStats::from_reduced(maxes, sums, n))
    }

    fn gemm_path(&self) -> &'static str {
        // A oneDNN failure during a step moves bf16 GEMMs to the f32 engines for good; `path` says so.
        gemm::path(self.cfg.compute_dtype).name()
    }

    fn commit_margin_state(&mut self) {
        if let Some(next) = self.margin_next.take() {
            self.margin = next;
        }
    }

    fn update_proven(&mut self, shard: usize, lr: f32) -> bool {
        let non_target_slope = crate::margin::non_target_slope_bound(&self.cfg.margin, self.step_margin);
        self.shards[shard].update_proven(&self.cfg, lr, non_target_slope)
    }

    fn backward(&mut self, shard: usize, maxes: &Vec<f32>, sums: &Vec<f32>, update: Update) -> Result<Vec<f32>> {
        let n = self.shards[shard].local_max.len();
        let (inv_sum, non_target_mass) = softmax_factors(sums, n);
        let params = logit_params(&self.cfg, self.step_margin, &self.hard_above);
        self.shards[shard].backward(&self.cfg, &maxes[..n], &inv_sum, &non_target_mass, params, update)
    }

    fn embedding_grad(&mut self, shard: usize, mut summed: Vec<f32>, first_row: usize, _rows: usize, world: f32) -> Result<Vec<f32>> {
        let d = self.cfg.embedding_dim;
        let s = &self.shards[shard];
        crate::pool::install(|| {
            summed.par_chunks_mut(d).enumerate().for_each(|(r, g)| {
                let i = first_row + r;
                kernels::project_out(&s.unit[i * d..(i + 1) * d], 1.0, s.inv_norm_e[i] * world, g);
            })
        })?;
        Ok(summed)
    }

    fn finite(&mut self, shard: usize, grad: &Vec<f32>) -> Result<bool> {
        Ok(self.shards[shard].pending_finite && kernels::all_finite(grad))
    }

    fn write_grads(&mut self, grads: &[Vec<f32>], out: Outputs<'_, '_>) -> Result<()> {
        let Outputs::Host(out) = out else {
            return Err(Error::invalid("device memory needs the CUDA backend; this head runs on the CPU"));
        };
        for (g, o) in grads.iter().zip(out.iter_mut()) {
            o.write(g);
        }
        Ok(())
    }

    fn accumulate(&mut self, shard: usize) -> Result<()> {
        let d = self.cfg.embedding_dim;
        let s = &mut self.shards[shard];
        if s.accumulated.rows.is_empty() {
            std::mem::swap(&mut s.accumulated, &mut s.pending);
            s.undo = Some(Undo::Moved);
        } else {
            s.prechecked = None;
            let union = s.accumulated.union(&s.pending, d)?;
            s.undo = Some(Undo::Replaced(std::mem::replace(&mut s.accumulated, union)));
        }
        Ok(())
    }

    fn unaccumulate(&mut self, shard: usize) {
        let s = &mut self.shards[shard];
        match s.undo.take() {
            Some(Undo::Moved) => std::mem::swap(&mut s.accumulated, &mut s.pending),
            Some(Undo::Replaced(before)) => s.accumulated = before,
            None => {}
        }
    }

    fn discard(&mut self, shard: usize) {
        let s = &mut self.shards[shard];
        s.accumulated.rows.clear();
        s.undo = None;
        s.prechecked = None;
    }

    fn accumulated_rows(&self, shard: usize) -> usize {
        self.shards[shard].accumulated.rows.len()
    }

    fn update_is_finite(&mut self, shard: usize, step: OptStep) -> Result<bool> {
        let d = self.cfg.embedding_dim;
        let opt = self.cfg.optimizer;
        let store = Store { how: self.cfg.storage_rounding, stream: step.rounding_stream() };
        let s = &mut self.shards[shard];
        if let (Some(Undo::Moved), Some((checked, ok))) = (&s.undo, s.prechecked) {
            if checked.lr.to_bits() == step.lr.to_bits() && (checked.index, checked.seed) == (step.index, step.seed) {
                return Ok(ok);
            }
        }
        let state = s.optimizer.rows_ptr();
        let (acc, centers, first_class) = (&s.accumulated, &s.centers, s.range.start);
        // Each task's copy of a row and its candidate update (the exact check's).
        let per = rows_per_task(acc.rows.len(), BLOCK);
        let (mut scratch, width) = per_task_scratch(acc.rows.len(), per, 6 * d, true)?;
        crate::pool::install(|| {
            acc.rows.par_chunks(per).zip(scratch.par_chunks_mut(width)).enumerate().all(|(task, (rows, scratch))| {
                rows.iter().enumerate().all(|(i, &j)| {
                    let (r, j) = (task * per + i, j as usize);
                    let (wide, rest) = scratch.split_at_mut(d);
                    let weights = table::row_f32(&centers[j * d..(j + 1) * d], wide);
                    // SAFETY: rows are only read.
                    unsafe { state.update_is_finite(&opt, step.lr, j, first_class + j as u64, weights, &acc.grads[r * d..(r + 1) * d], store, rest) }
                })
            })
        })
    }

    fn apply(&mut self, shard: usize, step: OptStep) -> Result<()> {
        let d = self.cfg.embedding_dim;
        let opt = self.cfg.optimizer;
        let store = Store { how: self.cfg.storage_rounding, stream: step.rounding_stream() };
        let s = &mut self.shards[shard];
        let state = s.optimizer.rows_ptr();
        let centers = Shared(s.centers.as_mut_ptr());
        let (acc, first_class) = (&s.accumulated, s.range.start);
        // Before the first update: nothing may fail once one has started.
        let per = rows_per_task(acc.rows.len(), BLOCK);
        let (mut scratch, width) = per_task_scratch(acc.rows.len(), per, 3 * d, T::ROUNDS)?;
        crate::pool::install(|| {
            acc.rows.par_chunks(per).zip(scratch.par_chunks_mut(width)).enumerate().for_each(|(task, (rows, scratch))| {
                for (i, &j) in rows.iter().enumerate() {
                    let r = task * per + i;
                    if let Some(&ahead) = acc.rows.get(r + kernels::PREFETCH_AHEAD) {
                        kernels::prefetch_row(centers.0, ahead as usize, d);
                        state.prefetch(ahead as usize, d);
                    }
                    let (j, grad) = (j as usize, &acc.grads[r * d..(r + 1) * d]);
                    // SAFETY: accumulated rows are distinct, so each center and state row has one writer.
                    unsafe {
                        let stored = centers.slice(j * d, d);
                        match T::as_f32_mut(stored) {
                            Some(weights) => state.update(&opt, step.lr, j, first_class + j as u64, weights, grad, store, &mut []),
                            None => {
                                let (weights, rest) = scratch.split_at_mut(d);
                                T::widen(stored, weights);
                                state.update(&opt, step.lr, j, first_class + j as u64, weights, grad, store, rest);
                                T::narrow(weights, stored);
                            }
                        }
                    }
                }
            })
        })?;
        // The accumulator's buffer becomes the next step's pending buffer (no re-allocation); the
        // pending buffer, which still holds the last compute's rows after a union, starts empty.
        std::mem::swap(&mut s.accumulated, &mut s.pending);
        s.accumulated.rows.clear();
        s.undo = None;
        s.prechecked = None;
        Ok(())
    }
}

impl<T: Stored> ShardState for CpuBackend<T> {
    fn margin_state(&self) -> Result<Vec<f32>> {
        Ok(self.margin.values())
    }

    fn set_margin_state(&mut self, values: &[f32]) -> Result<()> {
        self.margin = MarginState::from_values(self.cfg.margin.kind, values)?;
        self.margin_next = None;
        Ok(())
    }

    fn read_state(&self, tensor: StateTensor, first: u64, count: u64, out: &mut [f32]) -> Result<()> {
        let d = self.cfg.embedding_dim;
        for (s, row, rows, at) in pieces(&self.ranges, first, count) {
            let src = self.shards[s].tensor(tensor)?;
            T::widen(&src[row * d..(row + rows) * d], &mut out[at * d..(at + rows) * d]);
        }
        Ok(())
    }

    fn write_state(&mut self, tensor: StateTensor, first: u64, count: u64, values: &[f32]) -> Result<()> {
        let d = self.cfg.embedding_dim;
        for (s, row, rows, at) in pieces(&self.ranges, first, count) {
            let src = &values[at * d..(at + rows) * d];
            match tensor {
                StateTensor::Centers => T::narrow_nearest(src, &mut self.shards[s].centers[row * d..(row + rows) * d]),
                t => self.shards[s].optimizer.write_rows(t, row, src, d).ok_or_else(|| no_such_tensor(t))?,
            }
        }
        Ok(())
    }

    fn read_steps(&self, first: u64, count: u64, out: &mut [u32]) -> Result<()> {
        for (s, row, rows, at) in pieces(&self.ranges, first, count) {
            let src = self.shards[s].optimizer.steps().ok_or_else(|| Error::invalid("this optimizer keeps no step counts"))?;
            out[at..at + rows].copy_from_slice(&src[row..row + rows]);
        }
        Ok(())
    }

    fn write_steps(&mut self, first: u64, count: u64, values: &[u32]) -> Result<()> {
        for (s, row, rows, at) in pieces(&self.ranges, first, count) {
            let dst = self.shards[s].optimizer.steps_mut().ok_or_else(|| Error::invalid("this optimizer keeps no step counts"))?;
            dst[row..row + rows].copy_from_slice(&values[at..at + rows]);
        }
        Ok(())
    }

    fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(f32, u64)>>> {
        let d = self.cfg.embedding_dim;
        let mut best = crate::topk::TopK::new(queries.len() / d, k);
        for shard in &self.shards {
            match T::as_f32(&shard.centers) {
                Some(centers) => best.merge(search::scan(centers, d, shard.range.start, queries, k)?),
                None => {
                    // Widened a slice of rows at a time: a second copy of the table would not fit
                    // where narrow storage was chosen to make the first one fit.
                    let rows = ((32 << 20) / (4 * d)).max(1);
                    let mut wide = try_zeroed::<f32>(rows.min(shard.range.len as usize) * d, "widened centers for search")?;
                    for (c, chunk) in shard.centers.chunks(rows * d).enumerate() {
                        let wide = &mut wide[..chunk.len()];
                        T::widen(chunk, wide);
                        best.merge(search::scan(wide, d, shard.range.start + (c * rows) as u64, queries, k)?);
                    }
                }
            }
        }
        Ok(best.into_sorted())
    }

    fn set_centers(&mut self, first: u64, count: u64, values: &[f32]) -> Result<()> {
        let d = self.cfg.embedding_dim;
        for (s, row, rows, at) in pieces(&self.ranges, first, count) {
            let shard = &mut self.shards[s];
            T::narrow_nearest(&values[at * d..(at + rows) * d], &mut shard.centers[row * d..(row + rows) * d]);
            shard.optimizer.reset_rows(row, rows, d);
        }
        Ok(())
    }
}
