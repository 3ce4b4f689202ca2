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

use crate::backend::cpu::kernels::{all_finite, multiversion};

/// One element of a PyTorch SGD step: `buf = μ·buf + (g + wd·w)`, `w −= lr·buf`; (w, buf) after.
#[inline(always)]
fn sgd(cfg: &OptimizerConfig, lr: f32, w: f32, buf: f32, g: f32) -> (f32, f32) {
    let b = cfg.momentum * buf + (g + cfg.weight_decay * w);
    (w - lr * b, b)
}

/// One element of a PyTorch AdamW step, given the row's `step_size` (lr / (1 − β₁ᵗ)) and
/// `inv_sqrt_bias2` (1 / √(1 − β₂ᵗ)) after its step count moved on; (w, m, v) after.
#[inline(always)]
fn adamw(cfg: &OptimizerConfig, lr: f32, (step_size, inv_sqrt_bias2): (f32, f32), w: f32, m: f32, v: f32, g: f32) -> (f32, f32, f32) {
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let m = b1 * m + (1.0 - b1) * g;
    let v = b2 * v + (1.0 - b2) * g * g;
    let denom = v.sqrt() * inv_sqrt_bias2 + cfg.eps;
    (w * (1.0 - lr * cfg.weight_decay) - step_size * m / denom, m, v)
}

multiversion! {
    fn sgd_row(cfg: &OptimizerConfig, lr: f32, w: &mut [f32], buf: &mut [f32], grad: &[f32]) {
        for ((w, b), &g) in w.iter_mut().zip(buf.iter_mut()).zip(grad) {
            (*w, *b) = sgd(cfg, lr, *w, *b, g);
        }
    }
}

multiversion! {
    /// [`sgd_row`] into `w_out` and `buf_out`, the inputs unchanged.
    fn sgd_row_into(cfg: &OptimizerConfig, lr: f32, w: &[f32], buf: &[f32], grad: &[f32], w_out: &mut [f32], buf_out: &mut [f32]) {
        for ((((o, ob), &w), &b), &g) in w_out.iter_mut().zip(buf_out.iter_mut()).zip(w).zip(buf).zip(grad) {
            (*o, *ob) = sgd(cfg, lr, w, b, g);
        }
    }
}

multiversion! {
    fn adamw_row(cfg: &OptimizerConfig, lr: f32, factors: (f32, f32), w: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32]) {
        for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(grad) {
            (*w, *m, *v) = adamw(cfg, lr, factors, *w, *m, *v, g);
        }
    }
}

multiversion! {
    /// [`adamw_row`] into the outputs, the inputs unchanged.
    fn adamw_row_into(cfg: &OptimizerConfig, lr: f32, factors: (f32, f32), w: &[f32], m: &[f32], v: &[f32], grad: &[f32], out: &mut [f32]) {
        let dim = w.len();
        let (w_out, rest) = out.split_at_mut(dim);
        let (m_out, v_out) = rest.split_at_mut(dim);
        let (m, v, grad, v_out) = (&m[..dim], &v[..dim], &grad[..dim], &mut v_out[..dim]);
        for i in 0..dim {
            (w_out[i], m_out[i], v_out[i]) = adamw(cfg, lr, factors, w[i], m[i], v[i], grad[i]);
        }
    }
}

/// AdamW's bias corrections for a row at step count `t` (after this step's increment).
fn adamw_factors(cfg: &OptimizerConfig, lr: f32, t: u32) -> (f32, f32) {
    let bias1 = 1.0 - (cfg.beta1 as f64).powi(t as i32);
    let bias2 = 1.0 - (cfg.beta2 as f64).powi(t as i32);
    ((lr as f64 / bias1) as f32, (1.0 / bias2.sqrt()) as f32)
}

multiversion! {
    /// Whether a row is one the head accepts as a center: finite, of norm at most `MAX_ROW_NORM`
    /// (2^62, what set_centers and checkpoints accept), so that it normalizes in f32.
    pub fn normalizable(row: &[f32]) -> bool {
        const MAX_SQUARED: f32 = (crate::engine::MAX_ROW_NORM * crate::engine::MAX_ROW_NORM) as f32;
        let sq = crate::backend::cpu::kernels::dot(row, row);
        sq.is_finite() && sq <= MAX_SQUARED
    }
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
            StateRows::Sgd { momentum } => sgd_row(cfg, lr, weights, std::slice::from_raw_parts_mut(momentum.add(row * dim), dim), grad),
            StateRows::AdamW { exp_avg, exp_avg_sq, steps } => {
                let t = &mut *steps.add(row);
                *t = t.saturating_add(1);
                let (m, v) = (std::slice::from_raw_parts_mut(exp_avg.add(row * dim), dim), std::slice::from_raw_parts_mut(exp_avg_sq.add(row * dim), dim));
                adamw_row(cfg, lr, adamw_factors(cfg, lr, *t), weights, m, v, grad);
            }
        }
    }

    /// Whether `update` would leave the row finite and normalizable, computed into `scratch` (3 ×
    /// dim values); nothing is written.
    ///
    /// # Safety
    /// As `update`, except that the row is only read.
    pub unsafe fn update_is_finite(&self, cfg: &OptimizerConfig, lr: f32, row: usize, weights: &[f32], grad: &[f32], scratch: &mut [f32]) -> bool {
        let dim = weights.len();
        let scratch = &mut scratch[..3 * dim];
        match *self {
            StateRows::Sgd { momentum } => {
                let (w, rest) = scratch.split_at_mut(dim);
                sgd_row_into(cfg, lr, weights, std::slice::from_raw_parts(momentum.add(row * dim), dim), grad, w, &mut rest[..dim]);
                normalizable(w) && all_finite(&rest[..dim])
            }
            StateRows::AdamW { exp_avg, exp_avg_sq, steps } => {
                let t = (*steps.add(row)).saturating_add(1);
                let (m, v) = (std::slice::from_raw_parts(exp_avg.add(row * dim), dim), std::slice::from_raw_parts(exp_avg_sq.add(row * dim), dim));
                adamw_row_into(cfg, lr, adamw_factors(cfg, lr, t), weights, m, v, grad, scratch);
                normalizable(&scratch[..dim]) && all_finite(&scratch[dim..])
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
