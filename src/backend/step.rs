//! What passes between the step driver and a backend's primitives: the plan of a step, the reduced
//! statistics, what the backward pass does about the update, the accumulated center gradients, and
//! the phases' times.

use crate::error::{Error, Result, Status};

/// What the forward pass of a step should do.
#[derive(Clone, Copy, Debug)]
pub struct StepPlan {
    pub step: u64,
    pub seed: u64,
    /// 1.0 uses every class (evaluation, or model parallelism).
    pub sample_rate: f32,
    /// Keep what the backward pass needs; false for evaluation.
    pub train: bool,
    /// The caller takes the loss and accuracy, so the statistics come to the host; without, a
    /// backend that can check the loss's finiteness where the statistics are does so
    /// (`Primitives::defer_loss_check`) and the call need not wait for them.
    pub stats: bool,
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

/// One optimizer step: its learning rate, and its index (the steps the head took before it) and
/// the head's seed, which key the stochastic rounding of bf16 storage (`crate::storage`). The seed
/// is the head's now: a checkpoint's, once one is loaded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptStep {
    pub lr: f32,
    pub index: u64,
    pub seed: u64,
}

impl OptStep {
    /// The stream of this step's rounding draws.
    pub fn rounding_stream(self) -> u64 {
        crate::storage::step_stream(self.seed, self.index)
    }
}

/// What a backward pass does about the optimizer step of its call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Update {
    /// None follows it (the step split's compute).
    None,
    /// This step follows once the job has agreed it is finite: a backend may check it
    /// (`update_is_finite`) here, while the rows are in cache.
    Check(OptStep),
    /// Every shard of the job proved this step safe (`update_proven`): each center is updated as
    /// soon as its gradient exists, and nothing is left pending.
    Apply(OptStep),
}

impl Update {
    /// The optimizer step that follows, if any.
    pub fn step(self) -> Option<OptStep> {
        match self {
            Update::None => None,
            Update::Check(step) | Update::Apply(step) => Some(step),
        }
    }
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
