//! The head: validated configuration, step bookkeeping and everything shared by the backends —
//! input validation, the collective calls' contracts, center access — over the step driver
//! (`driver`) that the factory (`factory`) assembles from a backend's primitives and a collectives
//! implementation. A failed call leaves the head exactly as it was: inputs are checked before any
//! backend state changes.

pub(crate) mod driver;
mod factory;
pub(crate) mod search;

use crate::backend::step::{OptStep, PhaseTimes, StepPlan};
use crate::batch::{Batches, GradOut, HostBatch, Outputs};
use crate::comm::group::ProcessGroup;
use crate::config::{Config, DType};
use crate::error::{Error, Result};
use crate::limits::{first_oversized, first_oversized_row, MAX_ROW_NORM};
use crate::state::StateTensor;
use driver::{Evaluated, StepDriver};
use std::sync::Arc;

/// What one step reports (SPEC §1.10).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub accuracy: f64,
    /// Training steps the head has taken, this one included.
    pub step: u64,
    pub global_batch: u64,
    pub sampled_classes: u64,
}

pub struct Head {
    cfg: Config,
    group: Arc<ProcessGroup>,
    driver: Box<dyn StepDriver>,
    step: u64,
    lr: f32,
}

impl Head {
    /// A head whose shards all live in this process (or, for the CUDA backend, a job formed the
    /// NCCL way from `world_size`, `first_rank` and an NCCL id).
    pub fn new(cfg: Config) -> Result<Self> {
        Self::with_group(cfg, ProcessGroup::solo())
    }

    /// Process `group.index()`'s part of a job over `group` (SPEC §2a); a collective call. Every
    /// process must pass the same configuration but for `local_shards` and `devices`;
    /// `world_size` (0 = derived) and `first_rank` are derived from all processes' `local_shards`.
    /// Any process's error is every process's error.
    pub fn with_group(mut cfg: Config, group: ProcessGroup) -> Result<Self> {
        cfg.process_count = group.count();
        cfg.process_index = group.index();
        let process_shards = if group.is_solo() {
            cfg.validate()?;
            vec![cfg.local_shards]
        } else {
            group.agree(cfg.validate_local())?;
            let shards = agree_on_layout(&mut cfg, &group)?;
            cfg.validate()?;
            shards
        };
        let group = Arc::new(group);
        let driver = group.agree(factory::create(&cfg, &group, &process_shards))?;
        let lr = cfg.optimizer.lr;
        Ok(Head { cfg, group, driver, step: 0, lr })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The job's processes: checkpoints, export and search exchange data through it.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The margin's running statistics (SPEC §1.6a: AdaFace's running norm mean and standard
    /// deviation, CurricularFace's t; none for the combined margin), the same on every shard and
    /// process.
    pub fn margin_state(&self) -> Result<Vec<f32>> {
        self.driver.state().margin_state()
    }

    /// Replaces them (as `margin_state` lists them: the kind's count of finite values).
    pub fn set_margin_state(&mut self, values: &[f32]) -> Result<()> {
        self.driver.state_mut().set_margin_state(values)
    }

    pub fn learning_rate(&self) -> f32 {
        self.lr
    }

    pub fn set_learning_rate(&mut self, lr: f32) -> Result<()> {
        self.group.agree(crate::config::check_learning_rate(lr))?;
        self.lr = lr;
        Ok(())
    }

    /// Global classes owned by this process: `(first, count)`.
    pub fn local_classes(&self) -> (u64, u64) {
        let ranges = self.driver.ranges();
        let last = ranges[ranges.len() - 1];
        (ranges[0].start, last.start + last.len - ranges[0].start)
    }

    pub fn phase_times(&self) -> PhaseTimes {
        self.driver.phase_times()
    }

    fn check_batches(&self, batches: Batches<'_, '_>) -> Result<()> {
        let shards = self.cfg.local_shards;
        let batches = match batches {
            Batches::Host(b) => b,
            Batches::Device(b) => {
                // Device batches are validated by the backend, where they are.
                return if b.len() == shards {
                    Ok(())
                } else {
                    Err(Error::invalid(format!("got {} batches for {} local shards: pass one per shard", b.len(), shards)))
                };
            }
        };
        if batches.len() != shards {
            return Err(Error::invalid(format!("got {} batches for {} local shards: pass one per shard", batches.len(), shards)));
        }
        let d = self.cfg.embedding_dim;
        let mut total = 0usize;
        for (s, b) in batches.iter().enumerate() {
            let rows = b.labels.len();
            if b.embeddings.len() != rows * d {
                return Err(Error::invalid(format!("batch {s}: {} embedding values for {rows} rows of dimension {d}", b.embeddings.len())));
            }
            total += rows;
        }
        crate::batch::validate(batches, self.cfg.num_classes, d)?;
        // Another process's rows may fill the global batch; the driver checks it after gathering.
        if total == 0 && self.group.is_solo() {
            return Err(Error::invalid("the global batch is empty"));
        }
        Ok(())
    }

    fn stats(&self, e: Evaluated) -> StepStats {
        StepStats { loss: e.loss, accuracy: e.accuracy, step: self.step, global_batch: e.global_batch, sampled_classes: e.sampled_classes }
    }

    fn plan(&self, train: bool, stats: bool) -> StepPlan {
        StepPlan { step: self.step, seed: self.cfg.seed, sample_rate: if train { self.cfg.sample_rate } else { 1.0 }, train, stats }
    }

    /// Forward and backward on a batch per local shard: the embedding gradients into `out`, the
    /// sampled centers' gradients accumulated in the head; with `apply`, then one optimizer step
    /// (and the step count advances). A collective call; all or nothing on every process. Without
    /// `stats` the loss and accuracy returned are NaN, and on a GPU the call returns once the
    /// step's verdicts are in, without waiting for the rest of its work.
    pub fn compute(&mut self, batches: Batches<'_, '_>, out: Outputs<'_, '_>, apply: bool, stats: bool) -> Result<StepStats> {
        self.group.check()?;
        let checked = self.check_batches(batches).and_then(|()| match (&batches, &out) {
            (Batches::Host(b), Outputs::Host(g)) => {
                for (s, (b, g)) in b.iter().zip(g.iter()).enumerate() {
                    if g.len() != b.embeddings.len() {
                        return Err(Error::invalid(format!("batch {s}: gradient buffer has {} values, embeddings {}", g.len(), b.embeddings.len())));
                    }
                }
                Ok(())
            }
            (Batches::Device(_), Outputs::Device(_)) => Ok(()),
            _ => Err(Error::invalid("batches and gradient buffers must be in the same kind of memory")),
        });
        let plan = self.plan(true, stats);
        let e = self.driver.compute(checked, batches, plan, out, apply.then_some(self.lr))?;
        if apply {
            self.step += 1;
        }
        Ok(self.stats(e))
    }

    /// One training step (compute + apply): gradients into `grads` (one per local shard), sampled
    /// centers updated.
    pub fn train_step(&mut self, batches: &[HostBatch<'_>], grads: &mut [GradOut<'_>]) -> Result<StepStats> {
        self.compute(Batches::Host(batches), Outputs::Host(grads), true, true)
    }

    /// One optimizer step over the gradients accumulated by `compute`s, at the current learning
    /// rate; the step count advances. A collective call.
    pub fn apply(&mut self) -> Result<()> {
        self.group.check()?;
        if !self.driver.apply(OptStep { lr: self.lr, index: self.step, seed: self.cfg.seed })? {
            return Err(Error::invalid("no accumulated gradients to apply: call pfc_train_compute first"));
        }
        self.step += 1;
        Ok(())
    }

    /// Drops the gradients accumulated since the last apply.
    pub fn discard(&mut self) {
        self.driver.discard();
    }

    /// Loss and accuracy over every class; nothing changes.
    pub fn evaluate_batches(&mut self, batches: Batches<'_, '_>) -> Result<StepStats> {
        self.group.check()?;
        let checked = self.check_batches(batches);
        let e = self.driver.evaluate(checked, batches, self.plan(false, true))?;
        Ok(self.stats(e))
    }

    pub fn evaluate(&mut self, batches: &[HostBatch<'_>]) -> Result<StepStats> {
        self.evaluate_batches(Batches::Host(batches))
    }

    fn check_range(&self, first: u64, count: u64, buffer_len: usize) -> Result<()> {
        let (lo, n) = self.local_classes();
        let end = first.checked_add(count).ok_or_else(|| Error::invalid("first + count overflows"))?;
        if count == 0 || first < lo || end > lo + n {
            return Err(Error::invalid(format!("classes [{first}, {end}) are not within this process's [{lo}, {})", lo + n)));
        }
        let need = (count as usize).checked_mul(self.cfg.embedding_dim);
        if need != Some(buffer_len) {
            return Err(Error::invalid(format!("buffer holds {buffer_len} values; {count} centers need {}", count as usize * self.cfg.embedding_dim)));
        }
        Ok(())
    }

    pub fn get_centers(&self, first: u64, count: u64, normalized: bool, out: &mut [f32]) -> Result<()> {
        self.check_range(first, count, out.len())?;
        self.driver.state().read_state(StateTensor::Centers, first, count, out)?;
        if normalized {
            let d = self.cfg.embedding_dim;
            let mut inv = vec![0.0; count as usize];
            crate::backend::cpu::kernels::normalize_rows_inplace(out, d, &mut inv);
        }
        Ok(())
    }

    pub fn set_centers(&mut self, first: u64, count: u64, values: &[f32]) -> Result<()> {
        self.check_range(first, count, values.len())?;
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!("center value {at} is NaN or Inf")));
        }
        // A bf16 head holds the values rounded to nearest: those are what must normalize (and what
        // a checkpoint of the head is checked by).
        let d = self.cfg.embedding_dim;
        let oversized = match self.cfg.storage_dtype {
            DType::BF16 => first_oversized(values.chunks_exact(d).map(|row| row.iter().map(|&v| crate::storage::bf16_nearest(v).to_f32()))),
            DType::F32 | DType::F16 => first_oversized_row(values, d),
        };
        if let Some((row, norm)) = oversized {
            return Err(Error::invalid(format!(
                "the center of class {} has norm {norm:.3e}, above {MAX_ROW_NORM:.3e}: it cannot be normalized in f32",
                first + row as u64
            )));
        }
        self.driver.state_mut().set_centers(first, count, values)
    }
}

impl Head {
    /// The `k` classes of the job most similar by cosine to each query (rows of `queries`), best
    /// first, ties by smaller class id: `(ids, scores)`, `n × k` each. Collective on a multi-process
    /// head: every process passes the same queries and receives the merged result.
    pub fn search(&self, queries: &[f32], k: usize) -> Result<(Vec<i64>, Vec<f32>)> {
        let (_, local) = self.local_classes();
        let (d, classes) = (self.cfg.embedding_dim, self.cfg.num_classes);
        search::search_job(&self.group, queries, d, classes, local, k, |unit, k| self.driver.state().search(unit, k))
    }

    /// Rows `[first, first + count)` of a state tensor (checkpoints).
    pub(crate) fn read_state(&self, tensor: StateTensor, first: u64, count: u64, out: &mut [f32]) -> Result<()> {
        self.driver.state().read_state(tensor, first, count, out)
    }

    pub(crate) fn read_steps(&self, first: u64, count: u64, out: &mut [u32]) -> Result<()> {
        self.driver.state().read_steps(first, count, out)
    }

    /// Replaces the whole training state at once; the caller has validated every piece, so this
    /// cannot fail half-way on the CPU backend.
    pub(crate) fn restore(&mut self, restored: Restored) -> Result<()> {
        let (first, count) = self.local_classes();
        for (tensor, values) in &restored.tensors {
            self.driver.state_mut().write_state(*tensor, first, count, values)?;
        }
        if let Some(steps) = &restored.steps {
            self.driver.state_mut().write_steps(first, count, steps)?;
        }
        self.driver.state_mut().set_margin_state(&restored.margin_state)?;
        self.step = restored.step;
        self.cfg.seed = restored.seed;
        self.lr = restored.lr;
        // Every process now holds the same state again: accumulated gradients are gone and a
        // failed exchange is forgiven.
        self.driver.discard();
        self.group.heal();
        Ok(())
    }
}

/// A complete, validated training state for this process's classes, read from a checkpoint.
pub(crate) struct Restored {
    pub tensors: Vec<(StateTensor, Vec<f32>)>,
    pub steps: Option<Vec<u32>>,
    pub step: u64,
    pub seed: u64,
    pub lr: f32,
    /// The margin's running statistics (`MarginState::values`).
    pub margin_state: Vec<f32>,
}

/// Checks that every process of the job passed the same configuration and derives the shard
/// layout: `world_size` is the sum of all `local_shards`, `first_rank` the sum of the earlier
/// processes'. Returns every process's shard count. The same exchange yields the same verdict on
/// every process.
fn agree_on_layout(cfg: &mut Config, group: &ProcessGroup) -> Result<Vec<usize>> {
    let fields = cfg.consensus_fields();
    let mut mine = vec![cfg.local_shards as u64, cfg.world_size as u64, cfg.first_rank as u64];
    mine.extend(fields.iter().map(|&(_, v)| v));
    let all = group.allgather_u64(&mine)?;
    let per = mine.len();
    let rows: Vec<&[u64]> = all.chunks_exact(per).collect();
    for (i, &(name, _)) in fields.iter().enumerate() {
        let at = 3 + i;
        if let Some(p) = rows.iter().position(|r| r[at] != rows[0][at]) {
            return Err(Error::invalid(format!(
                "pfc_config.{name} differs between processes: process 0 passed {}, process {p} passed {} (every process must pass the same configuration but for local_shards and devices)",
                rows[0][at], rows[p][at]
            )));
        }
    }
    let shards: Vec<usize> = rows.iter().map(|r| r[0] as usize).collect();
    let world: usize = shards.iter().sum();
    if let Some(p) = rows.iter().position(|r| r[1] != 0 && r[1] as usize != world) {
        return Err(Error::invalid(format!(
            "world_size = {} on process {p}, but the processes' local_shards sum to {world} (pass 0 to derive it)",
            rows[p][1]
        )));
    }
    for (p, r) in rows.iter().enumerate() {
        let first: usize = shards[..p].iter().sum();
        if r[2] != 0 && r[2] as usize != first {
            return Err(Error::invalid(format!(
                "first_rank = {} on process {p}, but its shards start at global rank {first} (pass 0 to derive it)",
                r[2]
            )));
        }
    }
    cfg.world_size = world;
    cfg.first_rank = shards[..group.index()].iter().sum();
    Ok(shards)
}
