//! The training step, written once for every backend (SPEC §1): gather, sample, cosines and
//! statistics, the reductions, gradients, the finiteness verdict, update, scatter — over the
//! backend's per-shard primitives and one collectives seam (this process's shards, other processes
//! through the host's all-gather, or NCCL).
//!
//! Nothing that outlives the call changes until the whole job has agreed that it may (SPEC §2a,
//! §2b): bad input anywhere, a non-finite loss or gradient, an update that would leave a center
//! non-finite, or an allocation failure on any process fails the call everywhere with the same
//! status and message, before the first center, optimizer state or output is written. When the
//! forward pass proves, on every shard, that the step's gradients and update will be finite
//! (`Primitives::update_proven`, agreed in one exchange before the backward pass), that proof is
//! the agreement and the backward pass applies the update as each center's gradient exists.

use crate::backend::step::{phase, OptStep, PhaseTimes, RowStats, StepPlan, Update};
use crate::backend::{Primitives, ShardState};
use crate::batch::{Batches, Outputs};
use crate::comm::group::ProcessGroup;
use crate::comm::Collectives;
use crate::config::MarginKind;
use crate::error::{Error, Result};
use crate::memory::{F32Buf, Memory};
use crate::sharding::ShardRange;
use std::sync::Arc;
use std::time::Instant;

/// The step driver as the head sees it, whatever backend's primitives and collectives it strings
/// together ([`Driver`]), and the state those hold.
pub(crate) trait StepDriver: Send {
    fn ranges(&self) -> &[ShardRange];
    /// Loss statistics over the sampled (or, at sample rate 1, all) classes; nothing changes.
    /// `checked` is the head's verdict on the batches, agreed by the job before anything else.
    fn evaluate(&mut self, checked: Result<()>, batches: Batches<'_, '_>, plan: StepPlan) -> Result<Evaluated>;
    /// Forward and backward: the embedding gradients into `out` and the center gradients
    /// accumulated; with `apply`, then one optimizer step at that learning rate. All or nothing.
    fn compute(&mut self, checked: Result<()>, batches: Batches<'_, '_>, plan: StepPlan, out: Outputs<'_, '_>, apply: Option<f32>) -> Result<Evaluated>;
    /// One optimizer step over the accumulated gradients (false when there were none).
    fn apply(&mut self, step: OptStep) -> Result<bool>;
    fn discard(&mut self);
    fn state(&self) -> &dyn ShardState;
    fn state_mut(&mut self) -> &mut dyn ShardState;
    fn phase_times(&self) -> PhaseTimes;
}

/// What a forward pass reports, the same on every shard and process.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Evaluated {
    pub loss: f64,
    pub accuracy: f64,
    pub global_batch: u64,
    pub sampled_classes: u64,
}

pub(crate) struct Driver<P: Primitives> {
    prims: P,
    coll: Box<dyn Collectives<P::Mem>>,
    /// Poisoned when a step fails after some shard applied its update inside the backward pass:
    /// the head then holds a half-taken step, and only a checkpoint load makes it whole again.
    group: Arc<ProcessGroup>,
    dim: usize,
    /// Global rank of this process's first shard.
    first_rank: usize,
    /// Whether the step exchanges target cosines before its statistics (CurricularFace).
    margin: MarginKind,
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
    /// The loss's finiteness is the backward pass's verdict (`Primitives::defer_loss_check`), so
    /// no update may be taken inside the backward pass.
    loss_deferred: bool,
}

/// One sample's exact log-softmax loss, with no clamp on the probability, from the non-target sum
/// `rest = Σ_{j≠y} exp(z_j − max)`: `log Σ_j exp(z_j) − z_y = log(1 + rest / exp(z_y − max))`,
/// i.e. softplus(a) with `a = ln rest + max − z_y`. Unlike `ln Σ + max − z_y`, which cancels to
/// nothing when p_y → 1 (Σ ≈ 1 in f32), this keeps rest's relative precision at any loss, whether
/// or not the target is the row's max, and cannot overflow. `rest = 0` (one class) gives 0.
fn sample_loss(rest: f32, max: f32, target_logit: f32) -> f64 {
    let a = (rest as f64).ln() + (max as f64 - target_logit as f64);
    a.max(0.0) + (-a.abs()).exp().ln_1p()
}

/// Loss and top-1 accuracy from the reduced statistics: the mean over the global batch of each
/// sample's exact log-softmax loss (SPEC §1.7, the confident regime too).
fn loss_and_accuracy(rows: &RowStats) -> (f64, f64) {
    let n = rows.max.len();
    let mut loss = 0.0f64;
    let mut correct = 0usize;
    for i in 0..n {
        loss += sample_loss(rows.rest[i], rows.max[i], rows.target_logit[i]);
        correct += usize::from(rows.target_cos[i] > rows.other_cos[i]);
    }
    (loss / n as f64, correct as f64 / n as f64)
}

impl<P: Primitives> Driver<P> {
    pub fn new(prims: P, coll: Box<dyn Collectives<P::Mem>>, group: Arc<ProcessGroup>, dim: usize, first_rank: usize, margin: MarginKind) -> Self {
        Driver { prims, coll, group, dim, first_rank, margin, times: PhaseTimes::default() }
    }

    fn shards(&self) -> usize {
        self.prims.ranges().len()
    }

    fn forward(&mut self, checked: Result<()>, batches: Batches<'_, '_>, plan: StepPlan) -> Result<Forward<P::Mem>> {
        let d = self.dim;
        let t0 = Instant::now();
        self.prims.mark(phase::GATHER, true);
        // Batch sizes first (zeros from a process whose batches are malformed: the exchange keeps
        // its size), then one verdict on every process's input and buffers.
        let mine = if checked.is_ok() { batches.rows() } else { vec![0; self.shards()] };
        let rows = self.coll.gather_counts(&mine)?;
        let n: usize = rows.iter().map(|&r| r as usize).sum();
        let mut emb = Vec::with_capacity(self.shards());
        let mut labels = Vec::with_capacity(self.shards());
        let loaded = checked.and_then(|()| {
            if n == 0 {
                return Err(Error::invalid("the global batch is empty"));
            }
            let local = self.prims.load(batches)?;
            for s in 0..self.shards() {
                let e = n.checked_mul(d).ok_or_else(|| Error::invalid("global batch × embedding_dim overflows"))?;
                emb.push(self.prims.alloc_f32(s, e, "the gathered embeddings (global batch × embedding_dim)")?);
                labels.push(self.prims.alloc_i64(s, n, "the gathered labels")?);
            }
            Ok(local)
        });
        self.coll.agree(loaded.as_ref().map(|_| ()).map_err(Clone::clone))?;
        let (local_emb, local_labels): (Vec<_>, Vec<_>) = loaded?.into_iter().unzip();
        self.coll.all_gather_f32(&local_emb, &rows, d, &mut emb)?;
        self.coll.all_gather_i64(&local_labels, &rows, &mut labels)?;
        self.times.gather = t0.elapsed().as_secs_f64();
        self.prims.mark(phase::GATHER, false);

        let t1 = Instant::now();
        self.prims.mark(phase::SAMPLE, true);
        let mut sampled = Vec::with_capacity(self.shards());
        let sampling = (0..self.shards()).try_for_each(|s| {
            sampled.push(self.prims.sample(s, &labels[s], plan)?);
            Ok(())
        });
        self.times.sample = t1.elapsed().as_secs_f64();
        self.prims.mark(phase::SAMPLE, false);

        let t2 = Instant::now();
        self.prims.mark(phase::FORWARD, true);
        let mut maxes = Vec::with_capacity(self.shards());
        let mut sums = Vec::with_capacity(self.shards());
        let targets = if self.margin.needs_target_cosines() {
            // CurricularFace: every shard needs each row's target cosine before its statistics
            // (SPEC §1.6a): one more exchange of N values.
            let local = sampling.and_then(|()| (0..self.shards()).map(|s| self.prims.target_cosines(s, &emb[s], &labels[s])).collect::<Result<Vec<_>>>());
            self.coll.agree(local.as_ref().map(|_| ()).map_err(Clone::clone))?;
            let mut targets = local?;
            self.coll.all_reduce(crate::comm::ReduceOp::Max, &mut targets)?;
            Ok(Some(targets))
        } else {
            sampling.map(|()| None)
        };
        let computed = targets.and_then(|targets| {
            for (s, e) in emb.into_iter().enumerate() {
                let (m, sum) = self.prims.forward(s, e, &labels[s], plan, targets.as_ref().map(|t| &t[s]))?;
                maxes.push(m);
                sums.push(sum);
            }
            Ok(())
        });
        // Scratch that does not fit on one process fails the step on all of them.
        self.coll.agree(computed)?;
        self.times.forward = t2.elapsed().as_secs_f64();
        self.prims.mark(phase::FORWARD, false);

        let t3 = Instant::now();
        self.prims.mark(phase::REDUCE, true);
        self.coll.all_reduce(crate::comm::ReduceOp::Max, &mut maxes)?;
        for s in 0..self.shards() {
            self.prims.rescale_sums(s, &maxes[s], &mut sums[s])?;
        }
        self.coll.all_reduce(crate::comm::ReduceOp::Sum, &mut sums)?;
        // Deferred or not is the backend's choice, the same on every process whatever each asked.
        let mut deferred = plan.train;
        for s in 0..self.shards() {
            deferred = deferred && self.prims.defer_loss_check(s, &maxes[s], &sums[s])?;
        }
        let stats = if plan.stats || !deferred { Some(self.prims.read_stats(0, &maxes[0], &sums[0], n)?) } else { None };
        let sampled_classes = self.coll.gather_counts(&sampled)?.iter().sum();
        self.times.reduce = t3.elapsed().as_secs_f64();
        self.prims.mark(phase::REDUCE, false);
        let (loss, accuracy) = stats.as_ref().map_or((f64::NAN, f64::NAN), loss_and_accuracy);
        // The statistics are the same on every process, so is this verdict (or, deferred, the
        // backward pass's).
        if !deferred && !loss.is_finite() {
            return Err(Error::non_finite("the loss"));
        }
        Ok(Forward { maxes, sums, rows, eval: Evaluated { loss, accuracy, global_batch: n as u64, sampled_classes }, loss_deferred: deferred })
    }

    /// The backward pass: each shard's center gradients pending (or, with `Update::Apply`, applied),
    /// each local shard's embedding gradient returned, once the job agrees that all of them are
    /// finite.
    fn backward(&mut self, fwd: Forward<P::Mem>, update: Update) -> Result<(Vec<F32Buf<P::Mem>>, Evaluated)> {
        let mut applied = false;
        let result = self.backward_pass(fwd, update, &mut applied);
        if let (Err(e), true) = (&result, applied) {
            // An exchange or an all-gather's buffer that fails after some shard took its update
            // cannot take the update back: the head holds a half-taken step until a checkpoint load.
            self.group.poison(&format!("a step failed after applying its update to some centers: {}", e.message));
        }
        result
    }

    /// `backward`; `applied` is set once some shard has applied its update (`Update::Apply`). A
    /// backend's `backward` that fails has changed nothing.
    fn backward_pass(&mut self, fwd: Forward<P::Mem>, update: Update, applied: &mut bool) -> Result<(Vec<F32Buf<P::Mem>>, Evaluated)> {
        let d = self.dim;
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
        // Before the backward pass, which may update centers.
        let t0 = Instant::now();
        self.prims.mark(phase::BACKWARD, true);
        let local = (|| {
            let mut mine = Vec::with_capacity(self.shards());
            for s in 0..self.shards() {
                mine.push(self.prims.alloc_f32(s, segments[self.first_rank + s].len(), "the embedding gradient")?);
            }
            let mut partial = Vec::with_capacity(self.shards());
            for s in 0..self.shards() {
                partial.push(self.prims.backward(s, &fwd.maxes[s], &fwd.sums[s], update)?);
                *applied |= matches!(update, Update::Apply(_));
            }
            Ok((mine, partial))
        })();
        // One verdict before the reduce-scatter: a process whose backward pass failed (out of
        // memory, say) would otherwise leave the others waiting for it there. Every process took
        // the same path (`update_proven`), so with an applied update the other processes' centers
        // moved; this process's own shards count as they did.
        let others = self.coll.world_size() > self.shards();
        let (mut mine, partial) = agreed(&*self.coll, local).inspect_err(|_| *applied |= others && matches!(update, Update::Apply(_)))?;
        self.times.backward = t0.elapsed().as_secs_f64();
        self.prims.mark(phase::BACKWARD, false);

        let t1 = Instant::now();
        self.prims.mark(phase::SCATTER, true);
        self.coll.reduce_scatter_sum(&partial, &segments, &mut mine)?;
        drop(partial);
        let world = self.coll.world_size() as f32;
        // A local failure here (out of memory) joins the finiteness verdict, which every process waits for.
        let local = (|| {
            let mut grads = Vec::with_capacity(self.shards());
            for (s, summed) in mine.into_iter().enumerate() {
                let seg = &segments[self.first_rank + s];
                grads.push(self.prims.embedding_grad(s, summed, seg.start / d, seg.len() / d, world)?);
            }
            let mut finite = true;
            for (s, g) in grads.iter().enumerate() {
                finite &= self.prims.finite(s, g)?;
            }
            if finite { Ok(grads) } else { Err(Error::non_finite("an embedding or center gradient")) }
        })();
        let grads = agreed(&*self.coll, local)?;
        self.times.scatter = t1.elapsed().as_secs_f64();
        self.prims.mark(phase::SCATTER, false);
        Ok((grads, fwd.eval))
    }

    /// Whether every shard of the job proves the optimizer step at `lr` safe before its backward
    /// pass (`Primitives::update_proven`): one exchange, so that every process takes the same path.
    fn update_proven(&mut self, lr: f32) -> Result<bool> {
        let mine: Vec<u64> = (0..self.shards()).map(|s| u64::from(self.prims.update_proven(s, lr))).collect();
        Ok(self.coll.gather_counts(&mine)?.iter().all(|&proven| proven == 1))
    }

    /// Adds every shard's pending center gradients to its accumulated ones and, with `lr`, checks
    /// that the optimizer step over them keeps every center finite; one verdict for the job. On
    /// failure nothing stays accumulated from this call.
    fn accumulate(&mut self, step: Option<OptStep>) -> Result<()> {
        let t0 = Instant::now();
        self.prims.mark(phase::UPDATE, true);
        let mut done = 0;
        let mut finite = true;
        let local = (0..self.shards()).try_for_each(|s| {
            self.prims.accumulate(s)?;
            done += 1;
            if let Some(step) = step {
                finite &= self.prims.update_is_finite(s, step)?;
            }
            Ok(())
        });
        let local = local.and_then(|()| if finite { Ok(()) } else { Err(Error::non_finite("a center after this update")) });
        let verdict = self.coll.agree(local);
        if verdict.is_err() {
            (0..done).for_each(|s| self.prims.unaccumulate(s));
        }
        self.times.update = t0.elapsed().as_secs_f64();
        self.prims.mark(phase::UPDATE, false);
        verdict
    }

    /// The optimizer step over the accumulated gradients, once the job has agreed it is finite.
    fn update(&mut self, step: OptStep) -> Result<()> {
        let t0 = Instant::now();
        let applied = (0..self.shards()).try_for_each(|s| self.prims.apply(s, step));
        self.times.update += t0.elapsed().as_secs_f64();
        self.prims.mark(phase::UPDATE, false);
        applied
    }
}

impl<P: Primitives> StepDriver for Driver<P> {
    fn ranges(&self) -> &[ShardRange] {
        self.prims.ranges()
    }

    fn evaluate(&mut self, checked: Result<()>, batches: Batches<'_, '_>, plan: StepPlan) -> Result<Evaluated> {
        Ok(self.forward(checked, batches, plan)?.eval)
    }

    fn compute(&mut self, checked: Result<()>, batches: Batches<'_, '_>, plan: StepPlan, out: Outputs<'_, '_>, apply: Option<f32>) -> Result<Evaluated> {
        let fwd = self.forward(checked, batches, plan)?;
        let apply = apply.map(|lr| OptStep { lr, index: plan.step, seed: plan.seed });
        let update = match apply {
            Some(step) if !fwd.loss_deferred && self.update_proven(step.lr)? => Update::Apply(step),
            Some(step) => Update::Check(step),
            None => Update::None,
        };
        self.times.update_in_backward = matches!(update, Update::Apply(_));
        let (grads, eval) = self.backward(fwd, update)?;
        if let Update::Apply(_) = update {
            // The backward pass did it.
            self.times.update = 0.0;
        } else {
            self.accumulate(apply)?;
            if let Some(step) = apply {
                self.update(step)?;
            }
        }
        self.prims.commit_margin_state();
        self.prims.write_grads(&grads, out)?;
        Ok(eval)
    }

    fn apply(&mut self, step: OptStep) -> Result<bool> {
        let rows: Vec<u64> = (0..self.shards()).map(|s| self.prims.accumulated_rows(s) as u64).collect();
        let any = self.coll.gather_counts(&rows)?.iter().any(|&r| r > 0);
        if !any {
            return Ok(false);
        }
        let mut finite = true;
        let checked = (0..self.shards()).try_for_each(|s| {
            finite &= self.prims.update_is_finite(s, step)?;
            Ok(())
        });
        self.coll.agree(checked.and_then(|()| if finite { Ok(()) } else { Err(Error::non_finite("a center after this update")) }))?;
        self.update(step)?;
        Ok(true)
    }

    fn discard(&mut self) {
        (0..self.shards()).for_each(|s| self.prims.discard(s));
    }

    fn state(&self) -> &dyn ShardState {
        &self.prims
    }

    fn state_mut(&mut self) -> &mut dyn ShardState {
        &mut self.prims
    }

    fn phase_times(&self) -> PhaseTimes {
        let mut t = self.times;
        t.gemm_path = self.prims.gemm_path();
        if let Some(dev) = self.prims.device_times() {
            for (p, &secs) in dev.phases.iter().enumerate() {
                *t.slot(p) = secs;
            }
            t.gemm = Some(dev.gemm);
            t.peak_device_bytes = Some(dev.peak_bytes);
        }
        t
    }
}

/// `local`'s value once every process agrees that none failed; the first failure otherwise, on
/// every process (`Collectives::agree`).
fn agreed<M: Memory, T>(coll: &dyn Collectives<M>, local: Result<T>) -> Result<T> {
    match local {
        Ok(value) => coll.agree(Ok(())).map(|()| value),
        Err(e) => {
            coll.agree(Err(e.clone()))?;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sample_loss;

    /// `log Σ − z_y` in float64 from the same statistics, for comparison.
    fn direct(rest: f64, max: f64, target: f64) -> f64 {
        (rest + (target - max).exp()).ln() + max - target
    }

    #[test]
    fn sample_loss_is_the_log_softmax_in_every_regime() {
        // Target the max (rest relative to it), target below the max, one class, confident.
        for &(rest, max, target) in &[(1.7f32, 3.0f32, 3.0f32), (2.5, 10.0, -40.0), (0.25, 5.0, 4.5)] {
            let want = direct(rest as f64, max as f64, target as f64);
            assert!((sample_loss(rest, max, target) - want).abs() <= 1e-12 * want, "{rest} {max} {target}");
        }
        assert_eq!(sample_loss(0.0, 2.0, 2.0), 0.0);
        // p_y = 1 − 1e-9: the loss is 1e-9 to f32's precision of `rest`, where Σ = 1 + 1e-9 is 1 in f32.
        let tiny = sample_loss(1e-9, 2.0, 2.0);
        assert!((tiny - 1e-9).abs() < 1e-16, "{tiny:e}");
        // A target far below the max cannot overflow.
        assert!((sample_loss(1.0, 5000.0, -5000.0) - 10000.0).abs() < 1e-9);
    }
}
