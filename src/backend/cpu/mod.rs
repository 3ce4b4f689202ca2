//! The CPU backend: every local shard in this process, the collectives in memory, blocks of sampled
//! classes spread over a work-stealing pool. It is the reference the CUDA backend is tested against.

pub mod gemm;
pub mod kernels;
mod search;

pub use search::scan as scan_centers;

use self::gemm::{matmul, Operand};
use self::kernels::{LogitParams, RowAccumulator, RowGradParams};
use super::{Backend, GradOut, HostBatch, PhaseTimes, RowStats, StepPlan};
use crate::comm::{HostCommunicator, ReduceOp};
use crate::config::{Config, DType};
use crate::error::{try_zeroed, Error, Result};
use crate::margin::target_logit;
use crate::optimizer::{OptimizerState, StateTensor};
use crate::rng;
use crate::sharding::{sample, ShardRange};
use rayon::prelude::*;
use std::time::Instant;

/// Sampled classes per block: a block's centers (BLOCK·d floats) and cosines (BLOCK·N) stay in a
/// core's L2 cache between the GEMM and the element-wise passes.
const BLOCK: usize = 256;

/// Enough blocks per task that each thread gets a few tasks, so per-task scratch (an N×d gradient
/// accumulator among it) is allocated and summed a handful of times per step, not per block.
pub(super) fn min_blocks_per_task(blocks: usize) -> usize {
    blocks.div_ceil(4 * rayon::current_num_threads()).max(1)
}

/// Blocks `0..blocks` as parallel tasks of `min_blocks_per_task` blocks, split in halves down to
/// that size however the work is stolen, so that a floating-point reduction over the tasks is the
/// same on every run.
fn block_tasks(blocks: usize) -> impl IndexedParallelIterator<Item = usize> {
    let per_task = min_blocks_per_task(blocks);
    (0..blocks).into_par_iter().with_min_len(per_task).with_max_len(per_task)
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

struct Shard {
    range: ShardRange,
    centers: Vec<f32>,
    optimizer: OptimizerState,
    // Per-step state, valid between forward and backward.
    sampled: Vec<u32>,
    /// Column of each global row's label among `sampled`, −1 when the label is not on this shard.
    col: Vec<i32>,
    target_logit: Vec<f32>,
    target_slope: Vec<f32>,
    target_cos: Vec<f32>,
    /// Raw cosines `[sampled][N]`, kept for the backward pass.
    cos: Vec<f32>,
    inv_norm: Vec<f32>,
    rows: Option<RowAccumulator>,
    grad_unit: Vec<f32>,
}

pub struct CpuBackend {
    cfg: Config,
    ranges: Vec<ShardRange>,
    shards: Vec<Shard>,
    comm: Box<dyn HostCommunicator>,
    batch_rows: Vec<usize>,
    labels: Vec<i64>,
    unit: Vec<f32>,
    unit_gemm: Vec<f32>,
    inv_norm: Vec<f32>,
    times: PhaseTimes,
    backward_ready: bool,
}

impl CpuBackend {
    /// The local shards of `cfg`'s job, talking to the other shards through `comm`.
    pub fn new(cfg: &Config, comm: Box<dyn HostCommunicator>) -> Result<Self> {
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
            let mut centers = try_zeroed::<f32>(elems, "class centers")?;
            crate::pool::install(|| {
                centers.par_chunks_mut(d).enumerate().for_each(|(j, row)| {
                    rng::init_center(cfg.seed, range.start + j as u64, cfg.init_std, row);
                })
            })?;
            shards.push(Shard {
                range,
                centers,
                optimizer: OptimizerState::new(cfg.optimizer.kind, range.len as usize, d)?,
                sampled: Vec::new(),
                col: Vec::new(),
                target_logit: Vec::new(),
                target_slope: Vec::new(),
                target_cos: Vec::new(),
                cos: Vec::new(),
                inv_norm: Vec::new(),
                rows: None,
                grad_unit: Vec::new(),
            });
        }
        Ok(CpuBackend {
            cfg: cfg.clone(),
            ranges,
            shards,
            comm,
            batch_rows: Vec::new(),
            labels: Vec::new(),
            unit: Vec::new(),
            unit_gemm: Vec::new(),
            inv_norm: Vec::new(),
            times: PhaseTimes::default(),
            backward_ready: false,
        })
    }

    fn logit_params(&self) -> LogitParams {
        LogitParams { scale: self.cfg.margin.scale, filter: self.cfg.margin.interclass_filter }
    }

}

/// The centers of one block as a GEMM operand (`ids.len()` rows of `d`). With f32 and consecutive
/// ids it is the centers themselves, unnormalized, and the caller scales results by 1/‖W_j‖
/// (`true`); otherwise a copy in `scratch`: raw for f32, or normalized and rounded to the compute
/// dtype, since rounding must apply to the unit vectors as a GPU's bf16 GEMM would see them (`false`).
///
/// # Safety
/// `centers` must hold the rows `ids` (each `d` long), and no other thread may write them meanwhile.
unsafe fn center_block<'a>(centers: Shared<f32>, ids: &[u32], inv: &[f32], d: usize, dtype: DType, scratch: &'a mut [f32]) -> (&'a [f32], bool) {
    let rows = ids.len();
    let first = ids[0] as usize;
    if dtype == DType::F32 && ids[rows - 1] as usize - first == rows - 1 {
        return (centers.slice(first * d, rows * d), true);
    }
    let copy = &mut scratch[..rows * d];
    for ((dst, &j), &r) in copy.chunks_exact_mut(d).zip(ids).zip(inv) {
        let src: &[f32] = centers.slice(j as usize * d, d);
        if dtype == DType::F32 {
            dst.copy_from_slice(src);
        } else {
            dst.iter_mut().zip(src).for_each(|(o, &v)| *o = v * r);
        }
    }
    if dtype == DType::F32 {
        (copy, true)
    } else {
        quantize(dtype, copy);
        (copy, false)
    }
}

/// Per-thread scratch of the forward pass.
struct ForwardWorker {
    centers: Vec<f32>,
    cos: Vec<f32>,
    rows: RowAccumulator,
    target_block: Vec<f32>,
    /// (row, target logit, slope, clamped cosine) for rows whose target lies in this worker's blocks.
    targets: Vec<(usize, f32, f32, f32)>,
}

/// Per-thread scratch of the backward pass.
struct BackwardWorker {
    centers: Vec<f32>,
    grad_centers: Vec<f32>,
    grad_x: Vec<f32>,
}

impl Shard {
    fn tensor(&self, tensor: StateTensor) -> Result<&[f32]> {
        match tensor {
            StateTensor::Centers => Ok(&self.centers),
            t => self.optimizer.tensor(t).ok_or_else(|| Error::invalid(format!("this optimizer keeps no {}", t.name()))),
        }
    }

    fn tensor_mut(&mut self, tensor: StateTensor) -> Result<&mut [f32]> {
        match tensor {
            StateTensor::Centers => Ok(&mut self.centers),
            t => self.optimizer.tensor_mut(t).ok_or_else(|| Error::invalid(format!("this optimizer keeps no {}", t.name()))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(&mut self, cfg: &Config, plan: StepPlan, labels: &[i64], unit_gemm: &[f32], params: LogitParams) -> Result<()> {
        let n = labels.len();
        let d = cfg.embedding_dim;
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
            if self.cos.len() < need {
                self.cos.clear();
                self.cos = try_zeroed(need, "cosine scratch (sampled classes × global batch)")?;
            }
        }
        let blocks = k.div_ceil(BLOCK);
        let cos_out = Shared(self.cos.as_mut_ptr());
        let inv_out = Shared(self.inv_norm.as_mut_ptr());
        let (centers, sampled, col, margin) = (&self.centers, &self.sampled, &self.col, &cfg.margin);
        // Read-only in the forward pass; `center_block` takes the pointer form the backward pass needs.
        let centers_ptr = Shared(self.centers.as_ptr().cast_mut());
        let (train, dtype) = (plan.train, cfg.compute_dtype);
        let worker = || ForwardWorker {
            centers: vec![0.0; BLOCK * d],
            cos: if train { Vec::new() } else { vec![0.0; BLOCK * n] },
            rows: RowAccumulator::new(n),
            target_block: vec![0.0; n],
            targets: Vec::new(),
        };
        let merged = crate::pool::install(|| block_tasks(blocks)
            .fold(worker, |mut w, b| {
                let (start, end) = (b * BLOCK, ((b + 1) * BLOCK).min(k));
                let rows = end - start;
                // SAFETY: block b owns entries [start, end) of inv_norm and rows [start, end) of cos.
                let inv = unsafe { inv_out.slice(start, rows) };
                let ids = &sampled[start..end];
                kernels::row_inv_norms(centers, d, ids, inv);
                // SAFETY: nothing writes centers during the forward pass.
                let (operand, scaled_after) = unsafe { center_block(centers_ptr, ids, inv, d, dtype, &mut w.centers) };
                let cos = if train { unsafe { cos_out.slice(start * n, rows * n) } } else { &mut w.cos[..rows * n] };
                matmul(rows, n, d, cos, Operand::rows(operand, d), Operand::transposed(unit_gemm, d), false);
                if scaled_after {
                    kernels::scale_rows(cos, n, inv);
                }
                let lo = by_col.partition_point(|&(c, _)| (c as usize) < start);
                let hi = by_col.partition_point(|&(c, _)| (c as usize) < end);
                for &(c, i) in &by_col[lo..hi] {
                    let raw = cos[(c as usize - start) * n + i];
                    let t = target_logit(margin, raw.clamp(-1.0, 1.0));
                    w.target_block[i] = t.logit;
                    w.targets.push((i, t.logit, t.dlogit_dcos, raw.clamp(-1.0, 1.0)));
                }
                w.rows.add_block(cos, n, start as i32, col, &w.target_block, params);
                w
            })
            .reduce_with(|mut a, b| {
                a.rows.merge(&b.rows);
                a.targets.extend_from_slice(&b.targets);
                a
            }))?;
        self.target_logit = vec![0.0; n];
        self.target_slope = vec![0.0; n];
        self.target_cos = vec![f32::NEG_INFINITY; n];
        let rows = match merged {
            Some(w) => {
                for &(i, logit, slope, c) in &w.targets {
                    self.target_logit[i] = logit;
                    self.target_slope[i] = slope;
                    self.target_cos[i] = c;
                }
                w.rows
            }
            None => RowAccumulator::new(n),
        };
        self.rows = Some(rows);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(&mut self, cfg: &Config, stats: &RowStats, inv_sum: &[f32], non_target_mass: &[f32], lr: f32, unit_gemm: &[f32], params: LogitParams) -> Result<Vec<f32>> {
        let n = stats.max.len();
        let d = cfg.embedding_dim;
        let k = self.sampled.len();
        let grads = RowGradParams {
            col: &self.col,
            target_logit: &self.target_logit,
            target_slope: &self.target_slope,
            max: &stats.max,
            inv_sum,
            non_target_mass,
            inv_batch: 1.0 / n as f32,
        };
        let cos_ptr = Shared(self.cos.as_mut_ptr());
        let centers_ptr = Shared(self.centers.as_mut_ptr());
        let state = self.optimizer.rows_ptr();
        let (sampled, inv_norm, opt, dtype) = (&self.sampled, &self.inv_norm, &cfg.optimizer, cfg.compute_dtype);
        let worker = || BackwardWorker {
            centers: vec![0.0; BLOCK * d],
            grad_centers: vec![0.0; BLOCK * d],
            grad_x: vec![0.0; n * d],
        };
        let blocks = k.div_ceil(BLOCK);
        let total = crate::pool::install(|| block_tasks(blocks)
            .fold(worker, |mut w, b| {
                let (start, end) = (b * BLOCK, ((b + 1) * BLOCK).min(k));
                let rows = end - start;
                // SAFETY: block b owns cosine rows [start, end) and the centers of sampled[start..end],
                // which are distinct classes.
                let g = unsafe { cos_ptr.slice(start * n, rows * n) };
                kernels::cos_gradient(g, n, start as i32, &grads, params);
                let ids = &sampled[start..end];
                let inv = &inv_norm[start..end];
                // SAFETY: the centers of this block are read here and written below, by this block only.
                let (operand, scaled_after) = unsafe { center_block(centers_ptr, ids, inv, d, dtype, &mut w.centers) };
                if scaled_after {
                    // ∂/∂(W_j·x̂) = ∂/∂cos · 1/‖W_j‖: the GEMMs then see unnormalized centers.
                    kernels::scale_rows(g, n, inv);
                } else {
                    quantize(dtype, g);
                }
                matmul(n, d, rows, &mut w.grad_x, Operand::transposed(g, n), Operand::rows(operand, d), true);
                let gc = &mut w.grad_centers[..rows * d];
                matmul(rows, d, n, gc, Operand::rows(g, n), Operand::rows(unit_gemm, d), false);
                for (r, &j) in ids.iter().enumerate() {
                    let grad = &mut gc[r * d..(r + 1) * d];
                    // SAFETY: as above; `operand` is no longer used.
                    let weights = unsafe { centers_ptr.slice(j as usize * d, d) };
                    // Back through W/‖W‖; the 1/‖W‖ factor is already in `grad` when scaled_after.
                    let factor = if scaled_after { 1.0 } else { inv[r] };
                    kernels::project_out(weights, inv[r], factor, grad);
                    // SAFETY: row j is touched by this block only.
                    unsafe { state.update(opt, lr, j as usize, weights, grad) };
                }
                w
            })
            .map(|w| w.grad_x)
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, &y)| *x += y);
                a
            }))?;
        Ok(total.unwrap_or_else(|| vec![0.0; n * d]))
    }
}

impl Backend for CpuBackend {
    fn ranges(&self) -> &[ShardRange] {
        &self.ranges
    }

    fn forward(&mut self, batches: &[HostBatch<'_>], plan: StepPlan) -> Result<RowStats> {
        self.backward_ready = false;
        let d = self.cfg.embedding_dim;
        let t0 = Instant::now();
        let counts = self.comm.all_gather_counts(&batches.iter().map(|b| b.labels.len() as u64).collect::<Vec<_>>())?;
        self.batch_rows = counts.iter().map(|&c| c as usize).collect();
        if counts.iter().all(|&c| c == 0) {
            return Err(Error::invalid("the global batch is empty"));
        }
        let local: Vec<Vec<f32>> = batches
            .iter()
            .map(|b| {
                let mut v = Vec::with_capacity(b.embeddings.len());
                b.embeddings.extend_f32(&mut v);
                v
            })
            .collect();
        let mut emb = Vec::new();
        self.comm.all_gather_f32(&local.iter().map(|v| v.as_slice()).collect::<Vec<_>>(), &mut emb)?;
        self.comm.all_gather_i64(&batches.iter().map(|b| b.labels).collect::<Vec<_>>(), &mut self.labels)?;
        let n = self.labels.len();
        self.unit = try_zeroed(n * d, "normalized embeddings")?;
        self.inv_norm = vec![0.0; n];
        kernels::normalize_rows(&emb, d, &mut self.unit, &mut self.inv_norm);
        self.unit_gemm = if self.cfg.compute_dtype == DType::F32 {
            Vec::new()
        } else {
            let mut q = self.unit.clone();
            quantize(self.cfg.compute_dtype, &mut q);
            q
        };
        self.times.gather = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let params = self.logit_params();
        let unit_gemm = if self.unit_gemm.is_empty() { &self.unit } else { &self.unit_gemm };
        for shard in &mut self.shards {
            shard.sampled = sample(shard.range, plan.sample_rate, plan.seed, plan.step, &self.labels);
        }
        self.times.sample = t1.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for shard in &mut self.shards {
            shard.forward(&self.cfg, plan, &self.labels, unit_gemm, params)?;
        }
        self.times.forward = t1.elapsed().as_secs_f64();

        let t2 = Instant::now();
        // Max-type statistics ride in one all-reduce, sum-type ones in another (SPEC §1.7).
        let mut maxes: Vec<Vec<f32>> = self
            .shards
            .iter()
            .map(|s| {
                let rows = s.rows.as_ref().expect("forward ran");
                [rows.max.as_slice(), rows.cos_other.as_slice(), s.target_cos.as_slice()].concat()
            })
            .collect();
        self.comm.all_reduce(ReduceOp::Max, &mut maxes)?;
        let global_max = maxes[0][..n].to_vec();
        let mut sums: Vec<Vec<f32>> = self
            .shards
            .iter()
            .map(|s| {
                let rows = s.rows.as_ref().expect("forward ran");
                // Both sums relative to the global max; a shard without columns contributes 0.
                let factor: Vec<f32> =
                    rows.sum.iter().zip(&rows.max).zip(&global_max).map(|((&sum, &m), &gm)| if sum == 0.0 { 0.0 } else { (m - gm).exp() }).collect();
                let sum = rows.sum.iter().zip(&factor).map(|(&v, &f)| v * f);
                let rest = rows.rest.iter().zip(&factor).map(|(&v, &f)| v * f);
                sum.chain(rest).chain(s.target_logit.iter().copied()).collect()
            })
            .collect();
        self.comm.all_reduce(ReduceOp::Sum, &mut sums)?;
        self.times.reduce = t2.elapsed().as_secs_f64();
        self.backward_ready = plan.train;
        Ok(RowStats {
            max: global_max,
            sum: sums[0][..n].to_vec(),
            rest: sums[0][n..2 * n].to_vec(),
            target_logit: sums[0][2 * n..].to_vec(),
            target_cos: maxes[0][2 * n..].to_vec(),
            other_cos: maxes[0][n..2 * n].to_vec(),
            sampled_classes: self.comm.all_gather_counts(&self.shards.iter().map(|s| s.sampled.len() as u64).collect::<Vec<_>>())?.iter().sum(),
        })
    }

    fn backward(&mut self, stats: &RowStats, lr: f32, grads: &mut [GradOut<'_>]) -> Result<()> {
        assert!(self.backward_ready, "backward without a training forward");
        self.backward_ready = false;
        let d = self.cfg.embedding_dim;
        let t0 = Instant::now();
        let (inv_sum, non_target_mass) = stats.softmax_factors();
        let params = self.logit_params();
        let unit_gemm = if self.unit_gemm.is_empty() { &self.unit } else { &self.unit_gemm };
        let partial: Vec<Vec<f32>> =
            self.shards.iter_mut().map(|s| s.backward(&self.cfg, stats, &inv_sum, &non_target_mass, lr, unit_gemm, params)).collect::<Result<_>>()?;
        self.times.backward = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut offset = 0;
        let segments: Vec<std::ops::Range<usize>> = self
            .batch_rows
            .iter()
            .map(|&rows| {
                let seg = offset * d..(offset + rows) * d;
                offset += rows;
                seg
            })
            .collect();
        let mut mine: Vec<Vec<f32>> = self.shards.iter_mut().map(|s| std::mem::take(&mut s.grad_unit)).collect();
        self.comm.reduce_scatter_sum(&partial, &segments, &mut mine)?;
        let world = self.comm.world_size() as f32;
        for ((local, seg), out) in mine.iter_mut().zip(&segments[self.cfg.first_rank..]).zip(grads.iter_mut()) {
            let first_row = seg.start / d;
            let (unit, inv_norm) = (&self.unit, &self.inv_norm);
            crate::pool::install(|| {
                local.par_chunks_mut(d).enumerate().for_each(|(r, g)| {
                    let i = first_row + r;
                    kernels::project_out(&unit[i * d..(i + 1) * d], 1.0, inv_norm[i] * world, g);
                })
            })?;
            out.write(local);
        }
        for (shard, buf) in self.shards.iter_mut().zip(mine) {
            shard.grad_unit = buf;
        }
        self.times.scatter = t1.elapsed().as_secs_f64();
        Ok(())
    }

    fn read_state(&self, tensor: StateTensor, first: u64, count: u64, out: &mut [f32]) -> Result<()> {
        let d = self.cfg.embedding_dim;
        for (s, row, rows, at) in super::pieces(&self.ranges, first, count) {
            let src = self.shards[s].tensor(tensor)?;
            out[at * d..(at + rows) * d].copy_from_slice(&src[row * d..(row + rows) * d]);
        }
        Ok(())
    }

    fn write_state(&mut self, tensor: StateTensor, first: u64, count: u64, values: &[f32]) -> Result<()> {
        let d = self.cfg.embedding_dim;
        for (s, row, rows, at) in super::pieces(&self.ranges, first, count) {
            let dst = self.shards[s].tensor_mut(tensor)?;
            dst[row * d..(row + rows) * d].copy_from_slice(&values[at * d..(at + rows) * d]);
        }
        Ok(())
    }

    fn read_steps(&self, first: u64, count: u64, out: &mut [u32]) -> Result<()> {
        for (s, row, rows, at) in super::pieces(&self.ranges, first, count) {
            let src = self.shards[s].optimizer.steps().ok_or_else(|| Error::invalid("this optimizer keeps no step counts"))?;
            out[at..at + rows].copy_from_slice(&src[row..row + rows]);
        }
        Ok(())
    }

    fn write_steps(&mut self, first: u64, count: u64, values: &[u32]) -> Result<()> {
        for (s, row, rows, at) in super::pieces(&self.ranges, first, count) {
            let dst = self.shards[s].optimizer.steps_mut().ok_or_else(|| Error::invalid("this optimizer keeps no step counts"))?;
            dst[row..row + rows].copy_from_slice(&values[at..at + rows]);
        }
        Ok(())
    }

    fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(f32, u64)>>> {
        let d = self.cfg.embedding_dim;
        let mut best = crate::search::TopK::new(queries.len() / d, k);
        for shard in &self.shards {
            best.merge(search::scan(&shard.centers, d, shard.range.start, queries, k)?);
        }
        Ok(best.into_sorted())
    }

    fn set_centers(&mut self, first: u64, count: u64, values: &[f32]) -> Result<()> {
        let d = self.cfg.embedding_dim;
        for (s, row, rows, at) in super::pieces(&self.ranges, first, count) {
            let shard = &mut self.shards[s];
            shard.centers[row * d..(row + rows) * d].copy_from_slice(&values[at * d..(at + rows) * d]);
            shard.optimizer.reset_rows(row, rows, d);
        }
        Ok(())
    }

    fn phase_times(&self) -> PhaseTimes {
        self.times
    }
}
