//! Sparse optimizers: the state lives beside the centers, and a step touches only the rows it is
//! given (SPEC §1.9). Semantics are PyTorch's `SGD` and `AdamW`, row by row.

use crate::config::{OptimizerConfig, OptimizerKind};
use crate::error::{try_zeroed, Result};

/// A per-row f32 tensor of a shard: its centers or one of the optimizer's buffers. Checkpoints hold
/// exactly the tensors `for_optimizer` lists, plus AdamW's step counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateTensor {
    Centers,
    Momentum,
    ExpAvg,
    ExpAvgSq,
}

impl StateTensor {
    pub fn name(self) -> &'static str {
        match self {
            StateTensor::Centers => "centers",
            StateTensor::Momentum => "momentum",
            StateTensor::ExpAvg => "exp_avg",
            StateTensor::ExpAvgSq => "exp_avg_sq",
        }
    }

    pub fn for_optimizer(kind: OptimizerKind) -> &'static [StateTensor] {
        match kind {
            OptimizerKind::Sgd => &[StateTensor::Centers, StateTensor::Momentum],
            OptimizerKind::AdamW => &[StateTensor::Centers, StateTensor::ExpAvg, StateTensor::ExpAvgSq],
        }
    }
}

/// Optimizer state for `rows` centers of dimension `dim`.
pub enum OptimizerState {
    Sgd { momentum: Vec<f32> },
    AdamW { exp_avg: Vec<f32>, exp_avg_sq: Vec<f32>, steps: Vec<u32> },
}

impl OptimizerState {
    pub fn new(kind: OptimizerKind, rows: usize, dim: usize) -> Result<Self> {
        let elems = rows.saturating_mul(dim);
        Ok(match kind {
            OptimizerKind::Sgd => OptimizerState::Sgd { momentum: try_zeroed(elems, "SGD momentum")? },
            OptimizerKind::AdamW => OptimizerState::AdamW {
                exp_avg: try_zeroed(elems, "AdamW first moments")?,
                exp_avg_sq: try_zeroed(elems, "AdamW second moments")?,
                steps: try_zeroed(rows, "AdamW step counts")?,
            },
        })
    }

    /// Forgets the state of rows `[first, first + count)` (after their centers were overwritten).
    pub fn reset_rows(&mut self, first: usize, count: usize, dim: usize) {
        let span = first * dim..(first + count) * dim;
        match self {
            OptimizerState::Sgd { momentum } => momentum[span].fill(0.0),
            OptimizerState::AdamW { exp_avg, exp_avg_sq, steps } => {
                exp_avg[span.clone()].fill(0.0);
                exp_avg_sq[span].fill(0.0);
                steps[first..first + count].fill(0);
            }
        }
    }

    /// The per-row f32 tensor `tensor` of this state (not `Centers`), if this optimizer keeps it.
    pub fn tensor(&self, tensor: StateTensor) -> Option<&[f32]> {
        match (self, tensor) {
            (OptimizerState::Sgd { momentum }, StateTensor::Momentum) => Some(momentum),
            (OptimizerState::AdamW { exp_avg, .. }, StateTensor::ExpAvg) => Some(exp_avg),
            (OptimizerState::AdamW { exp_avg_sq, .. }, StateTensor::ExpAvgSq) => Some(exp_avg_sq),
            _ => None,
        }
    }

    pub fn tensor_mut(&mut self, tensor: StateTensor) -> Option<&mut [f32]> {
        match (self, tensor) {
            (OptimizerState::Sgd { momentum }, StateTensor::Momentum) => Some(momentum),
            (OptimizerState::AdamW { exp_avg, .. }, StateTensor::ExpAvg) => Some(exp_avg),
            (OptimizerState::AdamW { exp_avg_sq, .. }, StateTensor::ExpAvgSq) => Some(exp_avg_sq),
            _ => None,
        }
    }

    /// AdamW's per-row step counts (bias correction); None for SGD.
    pub fn steps(&self) -> Option<&[u32]> {
        match self {
            OptimizerState::AdamW { steps, .. } => Some(steps),
            OptimizerState::Sgd { .. } => None,
        }
    }

    pub fn steps_mut(&mut self) -> Option<&mut [u32]> {
        match self {
            OptimizerState::AdamW { steps, .. } => Some(steps),
            OptimizerState::Sgd { .. } => None,
        }
    }

    /// Raw views for updating disjoint rows from several threads.
    pub fn rows_ptr(&mut self) -> StateRows {
        match self {
            OptimizerState::Sgd { momentum } => StateRows::Sgd { momentum: momentum.as_mut_ptr() },
            OptimizerState::AdamW { exp_avg, exp_avg_sq, steps } => StateRows::AdamW {
                exp_avg: exp_avg.as_mut_ptr(),
                exp_avg_sq: exp_avg_sq.as_mut_ptr(),
                steps: steps.as_mut_ptr(),
            },
        }
    }
}

/// Pointers into an `OptimizerState`, shared by threads that each update distinct rows.
#[derive(Clone, Copy)]
pub enum StateRows {
    Sgd { momentum: *mut f32 },
    AdamW { exp_avg: *mut f32, exp_avg_sq: *mut f32, steps: *mut u32 },
}

// SAFETY: callers only touch distinct rows from distinct threads (sampled sets have unique ids).
unsafe impl Send for StateRows {}
unsafe impl Sync for StateRows {}

/// One PyTorch SGD step of one row: `buf = μ·buf + (g + wd·w)`, `w −= lr·buf`.
#[inline(always)]
fn sgd_row(cfg: &OptimizerConfig, lr: f32, w: &mut [f32], buf: &mut [f32], grad: &[f32]) {
    let (mu, wd) = (cfg.momentum, cfg.weight_decay);
    for ((w, b), &g) in w.iter_mut().zip(buf.iter_mut()).zip(grad) {
        *b = mu * *b + (g + wd * *w);
        *w -= lr * *b;
    }
}

/// One PyTorch AdamW step of one row, with the row's own step count for bias correction.
#[inline(always)]
fn adamw_row(cfg: &OptimizerConfig, lr: f32, w: &mut [f32], m: &mut [f32], v: &mut [f32], t: &mut u32, grad: &[f32]) {
    *t = t.saturating_add(1);
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let bias1 = 1.0 - (b1 as f64).powi(*t as i32);
    let bias2 = 1.0 - (b2 as f64).powi(*t as i32);
    let step_size = (lr as f64 / bias1) as f32;
    let inv_sqrt_bias2 = (1.0 / bias2.sqrt()) as f32;
    let decay = 1.0 - lr * cfg.weight_decay;
    for (((w, mi), vi), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(grad) {
        *w *= decay;
        *mi = b1 * *mi + (1.0 - b1) * g;
        *vi = b2 * *vi + (1.0 - b2) * g * g;
        let denom = vi.sqrt() * inv_sqrt_bias2 + cfg.eps;
        *w -= step_size * *mi / denom;
    }
}

/// Whether a row is one the head accepts as a center: finite, of norm at most `MAX_ROW_NORM`
/// (2^62, what set_centers and checkpoints accept), so that it normalizes in f32.
pub fn normalizable(row: &[f32]) -> bool {
    const MAX_SQUARED: f32 = (crate::engine::MAX_ROW_NORM * crate::engine::MAX_ROW_NORM) as f32;
    let sq = crate::backend::cpu::kernels::dot(row, row);
    sq.is_finite() && sq <= MAX_SQUARED
}

impl StateRows {
    /// Applies one optimizer step to center row `row` given its gradient.
    ///
    /// # Safety
    /// `row` must be in bounds, `weights` must be that row's center, and no other thread may touch
    /// the same row concurrently.
    pub unsafe fn update(&self, cfg: &OptimizerConfig, lr: f32, row: usize, weights: &mut [f32], grad: &[f32]) {
        let dim = weights.len();
        match *self {
            StateRows::Sgd { momentum } => {
                let buf = std::slice::from_raw_parts_mut(momentum.add(row * dim), dim);
                sgd_row(cfg, lr, weights, buf, grad);
            }
            StateRows::AdamW { exp_avg, exp_avg_sq, steps } => {
                let m = std::slice::from_raw_parts_mut(exp_avg.add(row * dim), dim);
                let v = std::slice::from_raw_parts_mut(exp_avg_sq.add(row * dim), dim);
                adamw_row(cfg, lr, weights, m, v, &mut *steps.add(row), grad);
            }
        }
    }

    /// Whether `update` would leave the row finite and normalizable, computed on copies in
    /// `scratch` (3 × dim values); nothing is written.
    ///
    /// # Safety
    /// As `update`, except that the row is only read.
    pub unsafe fn update_is_finite(&self, cfg: &OptimizerConfig, lr: f32, row: usize, weights: &[f32], grad: &[f32], scratch: &mut [f32]) -> bool {
        let dim = weights.len();
        let (w, rest) = scratch.split_at_mut(dim);
        let (a, b) = rest.split_at_mut(dim);
        w.copy_from_slice(weights);
        match *self {
            StateRows::Sgd { momentum } => {
                a.copy_from_slice(std::slice::from_raw_parts(momentum.add(row * dim), dim));
                sgd_row(cfg, lr, w, a, grad);
                normalizable(w) && a.iter().all(|x| x.is_finite())
            }
            StateRows::AdamW { exp_avg, exp_avg_sq, steps } => {
                a.copy_from_slice(std::slice::from_raw_parts(exp_avg.add(row * dim), dim));
                b[..dim].copy_from_slice(std::slice::from_raw_parts(exp_avg_sq.add(row * dim), dim));
                let mut t = *steps.add(row);
                adamw_row(cfg, lr, w, a, &mut b[..dim], &mut t, grad);
                normalizable(w) && a.iter().chain(b.iter()).all(|x| x.is_finite())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn sgd_matches_pytorch_two_steps() {
        let cfg = OptimizerConfig { momentum: 0.9, weight_decay: 0.1, ..Config::default().optimizer };
        let mut st = OptimizerState::new(OptimizerKind::Sgd, 1, 1).unwrap();
        let rows = st.rows_ptr();
        let mut w = [1.0f32];
        unsafe { rows.update(&cfg, 0.5, 0, &mut w, &[2.0]) };
        // d = 2 + 0.1·1 = 2.1; buf = 2.1; w = 1 − 1.05
        assert!((w[0] - (1.0 - 1.05)).abs() < 1e-6);
        unsafe { rows.update(&cfg, 0.5, 0, &mut w, &[1.0]) };
        let d = 1.0 + 0.1 * (-0.05f32);
        let buf = 0.9 * 2.1 + d;
        assert!((w[0] - (-0.05 - 0.5 * buf)).abs() < 1e-6);
    }
}
