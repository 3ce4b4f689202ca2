//! The training step, written once for every backend (SPEC §1): gather, sample, cosines and
//! statistics, the reductions, gradients, the finiteness verdict, update, scatter — over the
//! backend's per-shard primitives and one collectives seam (this process's shards, other processes
//! through the host's all-gather, or NCCL).
//!
//! Nothing that outlives the call changes until the whole job has agreed that it may (SPEC §2a,
//! §2b): bad input anywhere, a non-finite loss or gradient, an update that would leave a center
//! non-finite, or an allocation failure on any process fails the call everywhere with the same
//! status and message, before the first center, optimizer state or output is written.

use crate::backend::{Backend, Batches, Collectives, Evaluated, F32Buf, Memory, Outputs, PhaseTimes, Primitives, RowStats, StepPlan};
use crate::error::{Error, Result, Status};
use crate::optimizer::StateTensor;
use crate::sharding::ShardRange;
use std::time::Instant;

pub(crate) struct Driver<P: Primitives> {
    prims: P,
    coll: Box<dyn Collectives<P::Mem>>,
    dim: usize,
    /// Global rank of this process's first shard.
    first_rank: usize,
    times: PhaseTimes,
}

/// What the forward pass leaves for the backward pass, and only for it.
struct Forward<M: Memory> {
    /// The reduced statistics, in every local shard's memory.
    maxes: Vec<M::F32>,
    sums: Vec<M::F32>,
    /// Rows of every shard's batch, in global rank order.
    rows: Vec<u64>,
    eval: Evaluated,
}


fn non_finite(what: &str) -> Error {
    Error::new(
        Status::NonFinite,
        format!("{what} is NaN or Inf (divergence: lower the learning rate, skip the batch or reload a checkpoint); nothing changed"),
    )
}

/// Loss and top-1 accuracy from the reduced statistics: the mean over the global batch of the
/// exact log-softmax `log Σ exp(z) − z_y`, with no clamp on the probability.
fn loss_and_accuracy(rows: &RowStats) -> (f64, f64) {
    let n = rows.max.len();
    let mut loss = 0.0f64;
    let mut correct = 0usize;
    for i in 0..n {
        loss += (rows.sum[i] as f64).ln() + rows.max[i] as f64 - rows.target_logit[i] as f64;
        correct += usize::from(rows.target_cos[i] > rows.other_cos[i]);
    }
    (loss / n as f64, correct as f64 / n as f64)
}

impl<P: Primitives> Driver<P> {
    pub fn new(prims: P, coll: Box<dyn Collectives<P::Mem>>, dim: usize, first_rank: usize) -> Self {
        Driver { prims, coll, dim, first_rank, times: PhaseTimes::default() }
    }

    fn shards(&self) -> usize {
        self.prims.ranges().len()
    }

    fn forward(&mut self, checked: Result<()>, batches: Batches<'_, '_>, plan: StepPlan) -> Result<Forward<P::Mem>> {
        let d = self.dim;
        let t0 = Instant::now();
        let loaded = checked.and_then(|()| self.prims.load(batches));
        self.coll.agree(loaded.as_ref().map(|_| ()).map_err(Clone::clone))?;
        let (local_emb, local_labels): (Vec<_>, Vec<_>) = loaded?.into_iter().unzip();
        let rows = self.coll.gather_counts(&batches.rows())?;
        let n: usize = rows.iter().map(|&r| r as usize).sum();
        if n == 0 {
            return Err(Error::invalid("the global batch is empty"));
        }
        let mut emb = Vec::with_capacity(self.shards());
        let mut labels = Vec::with_capacity(self.shards());
        let allocated = (0..self.shards()).try_for_each(|s| {
            let e = n.checked_mul(d).ok_or_else(|| Error::invalid("global batch × embedding_dim overflows"))?;
            emb.push(self.prims.alloc_f32(s, e, "the gathered embeddings (global batch × embedding_dim)")?);
            labels.push(self.prims.alloc_i64(s, n, "the gathered labels")?);
            Ok(())
        });
        self.coll.agree(allocated)?;
        self.coll.all_gather_f32(&local_emb, &rows, d, &mut emb)?;
        self.coll.all_gather_i64(&local_labels, &rows, &mut labels)?;
        self.times.gather = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut sampled = Vec::with_capacity(self.shards());
        let sampling = (0..self.shards()).try_for_each(|s| {
            sampled.push(self.prims.sample(s, &labels[s], plan)?);
            Ok(())
        });
        self.times.sample = t1.elapsed().as_secs_f64();

        let t2 = Instant::now();
        let mut maxes = Vec::with_capacity(self.shards());
        let mut sums = Vec::with_capacity(self.shards());
        let computed = sampling.and_then(|()| {
            for (s, e) in emb.into_iter().enumerate() {
                let (m, sum) = self.prims.forward(s, e, &labels[s], plan)?;
                maxes.push(m);
                sums.push(sum);
            }
            Ok(())
        });
        // Scratch that does not fit on one process fails the step on all of them.
        self.coll.agree(computed)?;
        self.times.forward = t2.elapsed().as_secs_f64();

        let t3 = Instant::now();
        self.coll.all_reduce(crate::comm::ReduceOp::Max, &mut maxes)?;
        for s in 0..self.shards() {
            self.prims.rescale_sums(s, &maxes[s], &mut sums[s])?;
        }
        self.coll.all_reduce(crate::comm::ReduceOp::Sum, &mut sums)?;
        let stats = self.prims.read_stats(0, &maxes[0], &sums[0], n)?;
        let sampled_classes = self.coll.gather_counts(&sampled)?.iter().sum();
        self.times.reduce = t3.elapsed().as_secs_f64();
        let (loss, accuracy) = loss_and_accuracy(&stats);
        // The statistics are the same on every process, so is this verdict.
        if !loss.is_finite() {
            return Err(non_finite("the loss"));
        }
        Ok(Forward { maxes, sums, rows, eval: Evaluated { loss, accuracy, global_batch: n as u64, sampled_classes } })
    }

    /// The backward pass: each shard's center gradients pending, each local shard's embedding
    /// gradient returned, once the job agrees that all of them are finite.
    fn backward(&mut self, fwd: Forward<P::Mem>) -> Result<(Vec<F32Buf<P::Mem>>, Evaluated)> {
        let d = self.dim;
        let t0 = Instant::now();
        let mut partial = Vec::with_capacity(self.shards());
        for s in 0..self.shards() {
            partial.push(self.prims.backward(s, &fwd.maxes[s], &fwd.sums[s])?);
        }
        self.times.backward = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut offset = 0;
        let segments: Vec<std::ops::Range<usize>> = fwd
            .rows
            .iter()
            .map(|&r| {
                let seg = offset * d..(offset + r as usize) * d;
                offset += r as usize;
                seg
            })
            .collect();
        let mut mine = Vec::with_capacity(self.shards());
        for s in 0..self.shards() {
            mine.push(self.prims.alloc_f32(s, segments[self.first_rank + s].len(), "the embedding gradient")?);
        }
        self.coll.reduce_scatter_sum(&partial, &segments, &mut mine)?;
        drop(partial);
        let world = self.coll.world_size() as f32;
        let mut grads = Vec::with_capacity(self.shards());
        for (s, summed) in mine.into_iter().enumerate() {
            let seg = &segments[self.first_rank + s];
            grads.push(self.prims.embedding_grad(s, summed, seg.start / d, seg.len() / d, world)?);
        }
        let mut finite = true;
        for (s, g) in grads.iter().enumerate() {
            finite &= self.prims.finite(s, g)?;
        }
        self.coll.agree(if finite { Ok(()) } else { Err(non_finite("an embedding or center gradient")) })?;
        self.times.scatter = t1.elapsed().as_secs_f64();
        Ok((grads, fwd.eval))
    }

    /// Adds every shard's pending center gradients to its accumulated ones, on every process or on
    /// none.
    fn accumulate(&mut self) -> Result<()> {
        let mut done = 0;
        let local = (0..self.shards()).try_for_each(|s| {
            self.prims.accumulate(s)?;
            done += 1;
            Ok(())
        });
        let verdict = self.coll.agree(local);
        if verdict.is_err() {
            (0..done).for_each(|s| self.prims.unaccumulate(s));
        }
        verdict
    }

    /// Whether the optimizer step over the accumulated gradients keeps every center finite, agreed
    /// by the job; then the step itself.
    fn update(&mut self, lr: f32) -> Result<()> {
        let t0 = Instant::now();
        let mut finite = true;
        let checked = (0..self.shards()).try_for_each(|s| {
            finite &= self.prims.update_is_finite(s, lr)?;
            Ok(())
        });
        let checked = checked.and_then(|()| if finite { Ok(()) } else { Err(non_finite("a center after this update")) });
        self.coll.agree(checked)?;
        let applied = (0..self.shards()).try_for_each(|s| self.prims.apply(s, lr));
        self.times.update = t0.elapsed().as_secs_f64();
        applied
    }
}

impl<P: Primitives> Backend for Driver<P> {
    fn ranges(&self) -> &[ShardRange] {
        self.prims.ranges()
    }

    fn evaluate(&mut self, checked: Result<()>, batches: Batches<'_, '_>, plan: StepPlan) -> Result<Evaluated> {
        Ok(self.forward(checked, batches, plan)?.eval)
    }

    fn compute(&mut self, checked: Result<()>, batches: Batches<'_, '_>, plan: StepPlan, out: Outputs<'_, '_>, apply: Option<f32>) -> Result<Evaluated> {
        let fwd = self.forward(checked, batches, plan)?;
        let (grads, eval) = self.backward(fwd)?;
        self.accumulate()?;
        if let Some(lr) = apply {
            if let Err(e) = self.update(lr) {
                (0..self.shards()).for_each(|s| self.prims.unaccumulate(s));
                return Err(e);
            }
        }
        self.prims.write_grads(&grads, out)?;
        Ok(eval)
    }

    fn apply(&mut self, lr: f32) -> Result<bool> {
        let rows: usize = (0..self.shards()).map(|s| self.prims.accumulated_rows(s)).sum();
        let any = self.coll.gather_counts(&[rows as u64])?.iter().any(|&r| r > 0);
        if any {
            self.update(lr)?;
        }
        Ok(any)
    }

    fn discard(&mut self) {
        (0..self.shards()).for_each(|s| self.prims.discard(s));
    }

    fn read_state(&self, tensor: StateTensor, first: u64, count: u64, out: &mut [f32]) -> Result<()> {
        self.prims.read_state(tensor, first, count, out)
    }

    fn write_state(&mut self, tensor: StateTensor, first: u64, count: u64, values: &[f32]) -> Result<()> {
        self.prims.write_state(tensor, first, count, values)
    }

    fn read_steps(&self, first: u64, count: u64, out: &mut [u32]) -> Result<()> {
        self.prims.read_steps(first, count, out)
    }

    fn write_steps(&mut self, first: u64, count: u64, values: &[u32]) -> Result<()> {
        self.prims.write_steps(first, count, values)
    }

    fn set_centers(&mut self, first: u64, count: u64, values: &[f32]) -> Result<()> {
        self.prims.set_centers(first, count, values)
    }

    fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(f32, u64)>>> {
        self.prims.search(queries, k)
    }

    fn phase_times(&self) -> PhaseTimes {
        self.times
    }
}
