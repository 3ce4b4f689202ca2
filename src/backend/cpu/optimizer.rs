//! Sparse optimizers: the state lives beside the centers, and a step touches only the rows it is
//! given (SPEC §1.9). Semantics are PyTorch's `SGD` and `AdamW`, row by row.

use crate::config::{OptimizerConfig, OptimizerKind, Rounding};
use super::table::zeroed_table;
use crate::error::{try_zeroed, Result};
use crate::state::StateTensor;
use crate::storage::{round_row, RowKey, Stored};

/// Optimizer state for `rows` centers of dimension `dim`. Beside each per-row tensor, each row's
/// norm (`+∞` where unknown or, for `exp_avg_sq`, where the row holds a negative value or NaN):
/// with them, the check before an update usually proves the update finite without reading the
/// rows, a pass over scattered memory saved per step (see [`StateRows::update_is_finite`]). The
/// per-row tensors are stored as `T` (`storage_dtype`); norms and step counts stay exact.
pub enum OptimizerState<T> {
    Sgd { momentum: Vec<T>, momentum_norms: Vec<f32> },
    AdamW { exp_avg: Vec<T>, exp_avg_sq: Vec<T>, steps: Vec<u32>, exp_avg_norms: Vec<f32>, exp_avg_sq_norms: Vec<f32> },
}

impl<T: Stored> OptimizerState<T> {
    pub fn new(kind: OptimizerKind, rows: usize, dim: usize) -> Result<Self> {
        let elems = rows.saturating_mul(dim);
        Ok(match kind {
            OptimizerKind::Sgd => OptimizerState::Sgd { momentum: zeroed_table(elems, "SGD momentum")?, momentum_norms: try_zeroed(rows, "SGD momentum norms")? },
            OptimizerKind::AdamW => OptimizerState::AdamW {
                exp_avg: zeroed_table(elems, "AdamW first moments")?,
                exp_avg_sq: zeroed_table(elems, "AdamW second moments")?,
                steps: try_zeroed(rows, "AdamW step counts")?,
                exp_avg_norms: try_zeroed(rows, "AdamW first moment norms")?,
                exp_avg_sq_norms: try_zeroed(rows, "AdamW second moment norms")?,
            },
        })
    }

    /// Forgets the state of rows `[first, first + count)` (after their centers were overwritten).
    pub fn reset_rows(&mut self, first: usize, count: usize, dim: usize) {
        let span = first * dim..(first + count) * dim;
        let rows = first..first + count;
        match self {
            OptimizerState::Sgd { momentum, momentum_norms } => {
                momentum[span].fill(T::default());
                momentum_norms[rows].fill(0.0);
            }
            OptimizerState::AdamW { exp_avg, exp_avg_sq, steps, exp_avg_norms, exp_avg_sq_norms } => {
                exp_avg[span.clone()].fill(T::default());
                exp_avg_sq[span].fill(T::default());
                steps[rows.clone()].fill(0);
                exp_avg_norms[rows.clone()].fill(0.0);
                exp_avg_sq_norms[rows].fill(0.0);
            }
        }
    }

    /// The per-row tensor `tensor` of this state (not `Centers`), if this optimizer keeps it.
    pub fn tensor(&self, tensor: StateTensor) -> Option<&[T]> {
        match (self, tensor) {
            (OptimizerState::Sgd { momentum, .. }, StateTensor::Momentum) => Some(momentum),
            (OptimizerState::AdamW { exp_avg, .. }, StateTensor::ExpAvg) => Some(exp_avg),
            (OptimizerState::AdamW { exp_avg_sq, .. }, StateTensor::ExpAvgSq) => Some(exp_avg_sq),
            _ => None,
        }
    }

    /// Overwrites rows `first..` of `tensor` (not `Centers`) with `values` (whole rows of `dim`,
    /// rounded to nearest where `T` is narrower), and their norms (of the values stored); None when
    /// this optimizer keeps no such tensor.
    pub fn write_rows(&mut self, tensor: StateTensor, first: usize, values: &[f32], dim: usize) -> Option<()> {
        type Norm = fn(&[f32]) -> f32;
        let (data, norms, norm): (&mut Vec<T>, &mut Vec<f32>, Norm) = match (self, tensor) {
            (OptimizerState::Sgd { momentum, momentum_norms }, StateTensor::Momentum) => (momentum, momentum_norms, row_norm),
            (OptimizerState::AdamW { exp_avg, exp_avg_norms, .. }, StateTensor::ExpAvg) => (exp_avg, exp_avg_norms, row_norm),
            (OptimizerState::AdamW { exp_avg_sq, exp_avg_sq_norms, .. }, StateTensor::ExpAvgSq) => (exp_avg_sq, exp_avg_sq_norms, nonnegative_row_norm),
            _ => return None,
        };
        let stored = &mut data[first * dim..first * dim + values.len()];
        T::narrow_nearest(values, stored);
        let mut wide = vec![0.0f32; if T::ROUNDS { dim } else { 0 }];
        for (r, s) in stored.chunks_exact(dim).enumerate() {
            norms[first + r] = norm(super::table::row_f32(s, &mut wide));
        }
        Some(())
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
    pub fn rows_ptr(&mut self) -> StateRows<T> {
        match self {
            OptimizerState::Sgd { momentum, momentum_norms } => StateRows::Sgd { momentum: momentum.as_mut_ptr(), momentum_norms: momentum_norms.as_mut_ptr() },
            OptimizerState::AdamW { exp_avg, exp_avg_sq, steps, exp_avg_norms, exp_avg_sq_norms } => StateRows::AdamW {
                exp_avg: exp_avg.as_mut_ptr(),
                exp_avg_sq: exp_avg_sq.as_mut_ptr(),
                steps: steps.as_mut_ptr(),
                exp_avg_norms: exp_avg_norms.as_mut_ptr(),
                exp_avg_sq_norms: exp_avg_sq_norms.as_mut_ptr(),
            },
        }
    }
}

/// Pointers into an `OptimizerState`, shared by threads that each update distinct rows.
pub enum StateRows<T> {
    Sgd { momentum: *mut T, momentum_norms: *mut f32 },
    AdamW { exp_avg: *mut T, exp_avg_sq: *mut T, steps: *mut u32, exp_avg_norms: *mut f32, exp_avg_sq_norms: *mut f32 },
}

impl<T> Clone for StateRows<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for StateRows<T> {}

// SAFETY: callers only touch distinct rows from distinct threads (sampled sets have unique ids).
unsafe impl<T> Send for StateRows<T> {}
unsafe impl<T> Sync for StateRows<T> {}

/// How one optimizer step stores its results where the state is narrower than f32: the step's
/// rounding stream (`storage::step_stream`) and mode. Unused with f32 storage.
#[derive(Clone, Copy, Debug)]
pub struct Store {
    pub how: Rounding,
    pub stream: u64,
}

impl Store {
    /// Rounds `values`, row `class`'s `tensor`, to what is stored.
    pub fn round(&self, values: &mut [f32], class: u64, tensor: StateTensor) {
        round_row(values, self.how, RowKey::new(self.stream, class, tensor, values.len()));
    }
}

use super::kernels::all_finite;
use crate::simd::multiversion;

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
    /// [`sgd_row`] of `grad` taken back through the normalization of `w` first (what
    /// `kernels::project_out(w, dir_scale, factor, grad)` leaves there, bit for bit), in one pass
    /// after the projection's dot product: each projected value goes straight into the update,
    /// and `grad` is not written.
    fn sgd_row_projected(cfg: &OptimizerConfig, lr: f32, w: &mut [f32], buf: &mut [f32], grad: &[f32], dir_scale: f32, factor: f32) {
        use super::kernels::{along, projected};
        let along = along(w, dir_scale, grad);
        for ((w, b), &g) in w.iter_mut().zip(buf.iter_mut()).zip(grad) {
            (*w, *b) = sgd(cfg, lr, *w, *b, projected(g, *w, along, factor));
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
        const MAX_SQUARED: f32 = (crate::limits::MAX_ROW_NORM * crate::limits::MAX_ROW_NORM) as f32;
        let sq = super::kernels::dot(row, row);
        sq.is_finite() && sq <= MAX_SQUARED
    }
}

multiversion! {
    /// A row's L2 norm in f32 (+∞ when it overflows, NaN for a NaN).
    fn row_norm(row: &[f32]) -> f32 {
        super::kernels::dot(row, row).sqrt()
    }
}

multiversion! {
    /// [`row_norm`], or +∞ when a value is negative or NaN: what the bound on AdamW's denominator
    /// (`√v + ε ≥ ε`) needs to know of `exp_avg_sq`.
    fn nonnegative_row_norm(row: &[f32]) -> f32 {
        // NaN is not ≥ 0 either.
        let nonnegative = row.iter().fold(true, |all, &x| all & (x >= 0.0));
        if nonnegative { row_norm(row) } else { f32::INFINITY }
    }
}

/// An upper bound of a true norm from its f32 computation: a sum of at most 2^16 squares (the
/// largest embedding_dim) is within 0.4% of the exact one, and squares that underflow lose less
/// than 1e-18 of the norm.
pub fn above(norm: f32) -> f64 {
    norm as f64 * 1.01 + 1e-18
}

/// What a bound must stay below to prove the update safe: half the largest center norm a head
/// accepts, and for the optimizer's own values a margin of 2^28 below f32's largest, so that the
/// rounding of the update's few operations (relative 2^-22 at most) cannot cross either.
const ROW_BOUND: f64 = crate::limits::MAX_ROW_NORM / 2.0;
pub const VALUE_BOUND: f64 = (1u128 << 100) as f64;

/// The state rows `ptrs` of `row` as f32 for one update: the stored rows themselves with f32
/// storage, else copies widened into `scratch` (K × dim values), which [`settle`] stores back.
///
/// # Safety
/// The rows must be in bounds and touched by no one else while the views live.
unsafe fn views<T: Stored, const K: usize>(ptrs: [*mut T; K], row: usize, dim: usize, scratch: &mut [f32]) -> [&mut [f32]; K] {
    let mut scratch = scratch;
    ptrs.map(|p| match T::f32_ptr(p) {
        Some(direct) => std::slice::from_raw_parts_mut(direct.add(row * dim), dim),
        None => {
            let (mine, rest) = std::mem::take(&mut scratch).split_at_mut(dim);
            scratch = rest;
            T::widen(std::slice::from_raw_parts(p.add(row * dim), dim), mine);
            mine
        }
    })
}

/// After an update over [`views`]: with narrower storage, rounds the center (`weights`, which the
/// caller stores) and the state rows to what is stored, and stores the state rows.
///
/// # Safety
/// As [`views`].
unsafe fn settle<T: Stored, const K: usize>(ptrs: [*mut T; K], tensors: [StateTensor; K], row: usize, class: u64, weights: &mut [f32], rows: &mut [&mut [f32]; K], store: Store) {
    if !T::ROUNDS {
        return;
    }
    let dim = weights.len();
    store.round(weights, class, StateTensor::Centers);
    for ((p, t), values) in ptrs.into_iter().zip(tensors).zip(rows.iter_mut()) {
        store.round(values, class, t);
        T::narrow(values, std::slice::from_raw_parts_mut(p.add(row * dim), dim));
    }
}

impl<T: Stored> StateRows<T> {
    /// Starts loading row `row`'s state into the cache (see `kernels::prefetch_row`).
    pub fn prefetch(&self, row: usize, dim: usize) {
        use super::kernels::prefetch_row;
        match *self {
            StateRows::Sgd { momentum, .. } => prefetch_row(momentum, row, dim),
            StateRows::AdamW { exp_avg, exp_avg_sq, .. } => {
                prefetch_row(exp_avg, row, dim);
                prefetch_row(exp_avg_sq, row, dim);
            }
        }
    }

    /// Applies one optimizer step to center row `row` (global class `class`) given its gradient.
    /// `weights` is the center in f32: the stored row itself with f32 storage; otherwise a copy,
    /// left rounded to what the caller then stores (`Stored::narrow`), as the state is stored here.
    ///
    /// # Safety
    /// `row` must be in bounds, `weights` must be that row's center, and no other thread may touch
    /// the same row concurrently. `scratch` holds 2 × dim values.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn update(&self, cfg: &OptimizerConfig, lr: f32, row: usize, class: u64, weights: &mut [f32], grad: &[f32], store: Store, scratch: &mut [f32]) {
        let dim = weights.len();
        match *self {
            StateRows::Sgd { momentum, momentum_norms } => {
                let mut rows = views([momentum], row, dim, scratch);
                sgd_row(cfg, lr, weights, rows[0], grad);
                settle([momentum], [StateTensor::Momentum], row, class, weights, &mut rows, store);
                *momentum_norms.add(row) = row_norm(rows[0]);
            }
            StateRows::AdamW { exp_avg, exp_avg_sq, steps, exp_avg_norms, exp_avg_sq_norms } => {
                let t = &mut *steps.add(row);
                *t = t.saturating_add(1);
                let mut rows = views([exp_avg, exp_avg_sq], row, dim, scratch);
                let [m, v] = &mut rows;
                adamw_row(cfg, lr, adamw_factors(cfg, lr, *t), weights, m, v, grad);
                settle([exp_avg, exp_avg_sq], [StateTensor::ExpAvg, StateTensor::ExpAvgSq], row, class, weights, &mut rows, store);
                *exp_avg_norms.add(row) = row_norm(rows[0]);
                *exp_avg_sq_norms.add(row) = nonnegative_row_norm(rows[1]);
            }
        }
    }

    /// [`update`](Self::update) with the gradient first taken back through the normalization of
    /// the center, as `kernels::project_out(weights, dir_scale, factor, grad)` does, and the same
    /// results. SGD makes the update in the projection's own pass over the row: at r < 1 the
    /// update loop is a seventh of a step, and one pass fewer over each row is what it can save.
    /// `grad` is left unspecified.
    ///
    /// # Safety
    /// As [`update`](Self::update).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn update_projected(&self, cfg: &OptimizerConfig, lr: f32, row: usize, class: u64, weights: &mut [f32], dir_scale: f32, factor: f32, grad: &mut [f32], store: Store, scratch: &mut [f32]) {
        match *self {
            StateRows::Sgd { momentum, momentum_norms } => {
                let dim = weights.len();
                let mut rows = views([momentum], row, dim, scratch);
                sgd_row_projected(cfg, lr, weights, rows[0], grad, dir_scale, factor);
                settle([momentum], [StateTensor::Momentum], row, class, weights, &mut rows, store);
                *momentum_norms.add(row) = row_norm(rows[0]);
            }
            StateRows::AdamW { .. } => {
                super::kernels::project_out(weights, dir_scale, factor, grad);
                self.update(cfg, lr, row, class, weights, grad, store, scratch);
            }
        }
    }

    /// Whether norms alone show that `update` leaves the row finite and normalizable, without
    /// reading the row's state: `weights` and `grad` are upper bounds of the norms of the center
    /// and its gradient (see [`above`]). Triangle inequalities over the exact update bound its
    /// results' norms from those and the state's norms (kept beside it); each value's f32 rounding
    /// is a relative 2^-22 at most, and bf16 storage's a relative 2^-7, far inside the factor 2
    /// between [`ROW_BOUND`] and the norm limit and the 2^28 between [`VALUE_BOUND`] and the
    /// largest bf16. A NaN or infinite input fails the comparisons, and the exact check decides.
    ///
    /// # Safety
    /// `row` must be in bounds.
    pub unsafe fn update_is_bounded(&self, cfg: &OptimizerConfig, lr: f32, row: usize, weights: f64, grad: f64) -> bool {
        let (w, g) = (weights, grad);
        let lr_abs = (lr as f64).abs();
        match *self {
            StateRows::Sgd { momentum_norms, .. } => {
                let buf = (cfg.momentum as f64).abs() * above(*momentum_norms.add(row)) + g + (cfg.weight_decay as f64).abs() * w;
                let w_new = w + lr_abs * buf;
                buf <= VALUE_BOUND && w_new <= ROW_BOUND
            }
            StateRows::AdamW { steps, exp_avg_norms, exp_avg_sq_norms, .. } => {
                let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
                let m_new = b1 * above(*exp_avg_norms.add(row)) + (1.0 - b1) * g;
                let v_new = b2 * above(*exp_avg_sq_norms.add(row)) + (1.0 - b2) * g * g;
                let (step_size, _) = adamw_factors(cfg, lr, (*steps.add(row)).saturating_add(1));
                // |m / (√v·c + ε)| ≤ |m| / ε: v ≥ 0 where its norm is finite.
                let w_new = (1.0 + lr_abs * (cfg.weight_decay as f64).abs()) * w + above(step_size.abs()) * m_new / cfg.eps as f64;
                m_new <= VALUE_BOUND && v_new <= VALUE_BOUND && w_new <= ROW_BOUND
            }
        }
    }

    /// Whether `update` would leave the row finite and normalizable, as stored, computed into
    /// `scratch` (5 × dim values); nothing is written.
    ///
    /// # Safety
    /// As `update`, except that the row is only read.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn update_is_finite(&self, cfg: &OptimizerConfig, lr: f32, row: usize, class: u64, weights: &[f32], grad: &[f32], store: Store, scratch: &mut [f32]) -> bool {
        self.update_is_bounded(cfg, lr, row, above(row_norm(weights)), above(row_norm(grad))) || self.update_is_finite_exactly(cfg, lr, row, class, weights, grad, store, scratch)
    }

    /// `update_is_finite` by computing the update into `scratch`, rounded as it would be stored:
    /// a value that f32 holds may round up to ∞ in bf16, or a center's norm past the limit.
    ///
    /// # Safety
    /// As `update_is_finite`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn update_is_finite_exactly(&self, cfg: &OptimizerConfig, lr: f32, row: usize, class: u64, weights: &[f32], grad: &[f32], store: Store, scratch: &mut [f32]) -> bool {
        let dim = weights.len();
        let (out, state) = scratch[..5 * dim].split_at_mut(3 * dim);
        let rounded = |values: &mut [f32], tensor| {
            if T::ROUNDS {
                store.round(values, class, tensor);
            }
        };
        /// Row `row` of `p` as f32: in place with f32 storage, else widened into `into`.
        unsafe fn widened<T: Stored>(p: *mut T, row: usize, dim: usize, into: &mut [f32]) -> &[f32] {
            let stored = std::slice::from_raw_parts(p.add(row * dim), dim);
            match T::as_f32(stored) {
                Some(direct) => direct,
                None => {
                    T::widen(stored, into);
                    into
                }
            }
        }
        match *self {
            StateRows::Sgd { momentum, .. } => {
                let (w, rest) = out.split_at_mut(dim);
                let buf = &mut rest[..dim];
                sgd_row_into(cfg, lr, weights, widened(momentum, row, dim, &mut state[..dim]), grad, w, buf);
                rounded(w, StateTensor::Centers);
                rounded(buf, StateTensor::Momentum);
                normalizable(w) && all_finite(buf)
            }
            StateRows::AdamW { exp_avg, exp_avg_sq, steps, .. } => {
                let t = (*steps.add(row)).saturating_add(1);
                let (m_state, v_state) = state.split_at_mut(dim);
                let (m, v) = (widened(exp_avg, row, dim, m_state), widened(exp_avg_sq, row, dim, &mut v_state[..dim]));
                adamw_row_into(cfg, lr, adamw_factors(cfg, lr, t), weights, m, v, grad, out);
                let (w, rest) = out.split_at_mut(dim);
                let (m, v) = rest.split_at_mut(dim);
                rounded(w, StateTensor::Centers);
                rounded(m, StateTensor::ExpAvg);
                rounded(v, StateTensor::ExpAvgSq);
                normalizable(w) && all_finite(m) && all_finite(v)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// f32 storage rounds nothing.
    const STORE: Store = Store { how: Rounding::Stochastic, stream: 0 };

    #[test]
    fn sgd_matches_pytorch_two_steps() {
        let cfg = OptimizerConfig { momentum: 0.9, weight_decay: 0.1, ..Config::default().optimizer };
        let mut st = OptimizerState::<f32>::new(OptimizerKind::Sgd, 1, 1).unwrap();
        let rows = st.rows_ptr();
        let mut w = [1.0f32];
        unsafe { rows.update(&cfg, 0.5, 0, 0, &mut w, &[2.0], STORE, &mut []) };
        // d = 2 + 0.1·1 = 2.1; buf = 2.1; w = 1 − 1.05
        assert!((w[0] - (1.0 - 1.05)).abs() < 1e-6);
        unsafe { rows.update(&cfg, 0.5, 0, 0, &mut w, &[1.0], STORE, &mut []) };
        let d = 1.0 + 0.1 * (-0.05f32);
        let buf = 0.9 * 2.1 + d;
        assert!((w[0] - (-0.05 - 0.5 * buf)).abs() < 1e-6);
    }

    struct Draw(u64);
    impl Draw {
        fn next(&mut self) -> u64 {
            self.0 += 1;
            crate::rng::at(0x5eed, self.0)
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
        /// A value of random sign and magnitude 10^[lo, hi), now and then NaN, ±∞, 0 or f32::MAX.
        fn value(&mut self, lo: f64, hi: f64, specials: bool) -> f32 {
            if specials && self.next().is_multiple_of(97) {
                return [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, f32::MAX][(self.next() % 5) as usize];
            }
            let sign = if self.next().is_multiple_of(2) { 1.0 } else { -1.0 };
            (sign * 10f64.powf(lo + (hi - lo) * self.unit())) as f32
        }
        fn row(&mut self, dim: usize, lo: f64, hi: f64, specials: bool) -> Vec<f32> {
            let scale = lo + (hi - lo) * self.unit();
            (0..dim).map(|_| self.value(scale - 1.0, scale + 1.0, specials)).collect()
        }
    }

    /// One row of state; with `specials`, also NaN, ∞ and (a quarter of the time) negative second moments.
    fn state(kind: OptimizerKind, dim: usize, draw: &mut Draw, lo: f64, hi: f64, specials: bool) -> OptimizerState<f32> {
        let mut st = OptimizerState::<f32>::new(kind, 1, dim).unwrap();
        for &t in StateTensor::for_optimizer(kind).iter().skip(1) {
            let mut row = draw.row(dim, lo, hi, specials);
            if t == StateTensor::ExpAvgSq && (!specials || !draw.next().is_multiple_of(4)) {
                row.iter_mut().for_each(|v| *v = v.abs());
            }
            st.write_rows(t, 0, &row, dim).unwrap();
        }
        if let Some(steps) = st.steps_mut() {
            steps[0] = (draw.next() % 1000) as u32;
        }
        st
    }

    /// The update loop's one-pass form gives the bits of the projection then the update (any NaN
    /// for a NaN: which operand's NaN an x86 operation passes on, and its sign, follow the order
    /// the compiler gave the operands): the center, every state tensor and their norms, over SGD
    /// and AdamW, widths off the vector lanes, and NaN, ∞ and huge values in any operand.
    #[test]
    fn update_projected_matches_project_out_then_update_bit_for_bit() {
        fn norms(st: &OptimizerState<f32>) -> Vec<u32> {
            match st {
                OptimizerState::Sgd { momentum_norms, .. } => momentum_norms.iter().map(|&v| bits_or_nan(v)).collect(),
                OptimizerState::AdamW { exp_avg_norms, exp_avg_sq_norms, .. } => exp_avg_norms.iter().chain(exp_avg_sq_norms).map(|&v| bits_or_nan(v)).collect(),
            }
        }
        fn bits_or_nan(v: f32) -> u32 {
            if v.is_nan() { f32::NAN.to_bits() } else { v.to_bits() }
        }
        let bits = |v: &[f32]| v.iter().map(|&x| bits_or_nan(x)).collect::<Vec<_>>();
        let mut draw = Draw(7);
        let mut finite_rows = 0;
        for case in 0..2_000 {
            // Specials in a quarter of the cases: at width 512 one special almost surely makes the
            // whole row NaN or ∞, and the ordinary values are what most cases must compare.
            let specials = case % 4 == 3;
            let kind = if case % 2 == 0 { OptimizerKind::Sgd } else { OptimizerKind::AdamW };
            let dim = [1, 3, 16, 37, 512][case % 5];
            let cfg = OptimizerConfig { kind, momentum: draw.unit() as f32, weight_decay: draw.unit() as f32, ..Config::default().optimizer };
            let (lo, hi) = (-20.0, 20.0);
            let mut split = state(kind, dim, &mut draw, lo, hi, specials);
            let mut fused = OptimizerState::<f32>::new(kind, 1, dim).unwrap();
            for &t in StateTensor::for_optimizer(kind).iter().skip(1) {
                fused.write_rows(t, 0, split.tensor(t).unwrap(), dim).unwrap();
            }
            if let (Some(a), Some(b)) = (split.steps(), fused.steps_mut()) {
                b.copy_from_slice(a);
            }
            let (w, g) = (draw.row(dim, lo, hi, specials), draw.row(dim, lo, hi, specials));
            let (dir_scale, factor) = (draw.value(-3.0, 3.0, false).abs(), if case % 3 == 0 { 1.0 } else { draw.value(-3.0, 3.0, false).abs() });
            let lr = draw.unit() as f32;
            let (mut w_split, mut g_split) = (w.clone(), g.clone());
            crate::backend::cpu::kernels::project_out(&w_split, dir_scale, factor, &mut g_split);
            unsafe { split.rows_ptr().update(&cfg, lr, 0, 0, &mut w_split, &g_split, STORE, &mut []) };
            let (mut w_fused, mut g_fused) = (w.clone(), g.clone());
            unsafe { fused.rows_ptr().update_projected(&cfg, lr, 0, 0, &mut w_fused, dir_scale, factor, &mut g_fused, STORE, &mut []) };
            assert_eq!(bits(&w_split), bits(&w_fused), "case {case}: centers");
            for &t in StateTensor::for_optimizer(kind).iter().skip(1) {
                assert_eq!(bits(split.tensor(t).unwrap()), bits(fused.tensor(t).unwrap()), "case {case}: {}", t.name());
            }
            assert_eq!(norms(&split), norms(&fused), "case {case}: norms");
            assert_eq!(split.steps(), fused.steps(), "case {case}: steps");
            finite_rows += usize::from(dim > 1 && w_fused.iter().all(|v| v.is_finite()));
        }
        // Most rows wider than one stayed finite, so the comparisons were of real values.
        assert!(finite_rows > 800, "only {finite_rows} finite rows");
    }

    /// The norm bound never passes an update the exact check refuses, over magnitudes from tiny to
    /// beyond the norm limit, NaN and ∞ in any operand, negative second moments and extreme
    /// hyper-parameters; and in a training regime it passes nearly everything, so the check
    /// rarely reads the state.
    #[test]
    fn norm_bound_never_passes_what_the_exact_check_refuses() {
        let mut draw = Draw(0);
        let mut scratch = vec![0.0f32; 5 * 512];
        let (mut bounded, mut refused) = (0, 0);
        for case in 0..40_000 {
            let kind = if case % 2 == 0 { OptimizerKind::Sgd } else { OptimizerKind::AdamW };
            let dim = [1, 3, 16, 100, 512][case % 5];
            let cfg = OptimizerConfig {
                kind,
                lr: 10f64.powf(-4.0 + 8.0 * draw.unit()) as f32,
                momentum: draw.unit() as f32,
                weight_decay: (draw.unit() * 2.0) as f32,
                beta1: draw.unit() as f32 * 0.999,
                beta2: draw.unit() as f32 * 0.9999,
                eps: 10f64.powf(-12.0 + 11.0 * draw.unit()) as f32,
            };
            let (lo, hi) = (-30.0, 25.0);
            let mut st = state(kind, dim, &mut draw, lo, hi, true);
            let (w, g) = (draw.row(dim, lo, hi, true), draw.row(dim, lo, hi, true));
            let rows = st.rows_ptr();
            // SAFETY: one row, one thread.
            let (by_bound, exact) = unsafe { (rows.update_is_bounded(&cfg, cfg.lr, 0, above(row_norm(&w)), above(row_norm(&g))), rows.update_is_finite_exactly(&cfg, cfg.lr, 0, 0, &w, &g, STORE, &mut scratch)) };
            assert!(!by_bound || exact, "case {case}: the bound passed an update the exact check refuses ({kind:?}, dim {dim}, {cfg:?})");
            bounded += usize::from(by_bound);
            refused += usize::from(!exact);
        }
        assert!(bounded > 5_000 && refused > 5_000, "the cases must exercise both verdicts: {bounded} bounded, {refused} refused");
        // Only the second moment overflows (g² > f32::MAX) while the step stays small: a tiny lr
        // against a large ε.
        let cfg = OptimizerConfig { kind: OptimizerKind::AdamW, lr: 1e-6, beta1: 0.9999, beta2: 0.999, eps: 1e3, ..Config::default().optimizer };
        let mut st = OptimizerState::<f32>::new(OptimizerKind::AdamW, 1, 4).unwrap();
        let rows = st.rows_ptr();
        let (w, g) = ([0.1f32; 4], [1e21f32, 0.0, 0.0, 0.0]);
        // SAFETY: as above.
        let (by_bound, exact) = unsafe { (rows.update_is_bounded(&cfg, cfg.lr, 0, above(row_norm(&w)), above(row_norm(&g))), rows.update_is_finite_exactly(&cfg, cfg.lr, 0, 0, &w, &g, STORE, &mut scratch)) };
        assert!(!exact && !by_bound, "exp_avg_sq overflows: exact {exact}, bound {by_bound}");

        // Training: centers of norm ~1, gradients up to 10, state of earlier steps, usual settings.
        let mut passed = 0;
        for case in 0..2_000 {
            let kind = if case % 2 == 0 { OptimizerKind::Sgd } else { OptimizerKind::AdamW };
            let cfg = OptimizerConfig { kind, lr: 0.1, momentum: 0.9, weight_decay: 5e-4, ..Config::default().optimizer };
            let mut st = state(kind, 512, &mut draw, -6.0, -2.0, false);
            let (w, g) = (draw.row(512, -2.5, -1.0, false), draw.row(512, -6.0, -1.0, false));
            let rows = st.rows_ptr();
            // SAFETY: as above.
            passed += usize::from(unsafe { rows.update_is_bounded(&cfg, cfg.lr, 0, above(row_norm(&w)), above(row_norm(&g))) });
        }
        assert!(passed >= 1_900, "the bound proved only {passed} of 2000 training updates");
    }

    /// The exact check judges the values as bf16 storage will hold them: a momentum that f32 holds
    /// (3.3995e38) lies above bf16's largest finite value (3.3895e38) and mostly rounds up to ∞.
    /// With f32 storage the same update is accepted.
    #[test]
    fn the_exact_check_judges_values_as_stored() {
        use half::bf16;
        let cfg = OptimizerConfig { kind: OptimizerKind::Sgd, momentum: 1.0, weight_decay: 0.0, ..Config::default().optimizer };
        let (lr, dim) = (1e-30f32, 8);
        let momentum = vec![bf16::MAX.to_f32(); dim];
        let (w, g) = (vec![0.5f32; dim], vec![1e36f32; dim]);
        let store = Store { how: Rounding::Stochastic, stream: crate::storage::step_stream(3, 0) };
        let mut scratch = vec![0.0f32; 5 * dim];
        let mut narrow = OptimizerState::<bf16>::new(OptimizerKind::Sgd, 1, dim).unwrap();
        narrow.write_rows(StateTensor::Momentum, 0, &momentum, dim).unwrap();
        let mut wide = OptimizerState::<f32>::new(OptimizerKind::Sgd, 1, dim).unwrap();
        wide.write_rows(StateTensor::Momentum, 0, &momentum, dim).unwrap();
        // SAFETY: one row, one thread.
        let (as_bf16, as_f32) = unsafe {
            (narrow.rows_ptr().update_is_finite(&cfg, lr, 0, 0, &w, &g, store, &mut scratch), wide.rows_ptr().update_is_finite(&cfg, lr, 0, 0, &w, &g, store, &mut scratch))
        };
        assert!(as_f32, "f32 storage holds the update");
        assert!(!as_bf16, "bf16 storage would hold ∞, yet the check passed it");
    }

    /// The norms beside the state follow every write: updates, `write_rows` and resets.
    #[test]
    fn state_norms_follow_every_write() {
        let mut draw = Draw(1 << 40);
        let dim = 37;
        for kind in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
            let cfg = OptimizerConfig { kind, ..Config::default().optimizer };
            let mut st = OptimizerState::<f32>::new(kind, 4, dim).unwrap();
            let check = |st: &OptimizerState<f32>| {
                for (t, norms) in match st {
                    OptimizerState::Sgd { momentum_norms, .. } => vec![(StateTensor::Momentum, momentum_norms)],
                    OptimizerState::AdamW { exp_avg_norms, exp_avg_sq_norms, .. } => vec![(StateTensor::ExpAvg, exp_avg_norms), (StateTensor::ExpAvgSq, exp_avg_sq_norms)],
                } {
                    for (r, row) in st.tensor(t).unwrap().chunks_exact(dim).enumerate() {
                        let want = if t == StateTensor::ExpAvgSq { nonnegative_row_norm(row) } else { row_norm(row) };
                        assert_eq!(norms[r].to_bits(), want.to_bits(), "{kind:?} {} row {r}", t.name());
                    }
                }
            };
            check(&st);
            for &t in StateTensor::for_optimizer(kind).iter().skip(1) {
                let rows = draw.row(2 * dim, -3.0, 3.0, false);
                st.write_rows(t, 1, &rows, dim).unwrap();
            }
            check(&st);
            let mut w = draw.row(dim, -2.0, 0.0, false);
            for step in 0..5 {
                let g = draw.row(dim, -3.0, 0.0, false);
                let rows = st.rows_ptr();
                // SAFETY: one thread.
                unsafe { rows.update(&cfg, 0.1, step % 4, 0, &mut w, &g, STORE, &mut []) };
                check(&st);
            }
            st.reset_rows(1, 2, dim);
            check(&st);
        }
    }
}
