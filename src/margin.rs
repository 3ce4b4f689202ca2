//! The margins on the target logit (SPEC §1.6, §1.6a) and their derivatives (SPEC §1.8), and the
//! adaptive margins' running statistics. Computed in f64: they run once per sample, so precision
//! costs nothing here.

use crate::config::{MarginConfig, MarginGrad, MarginKind};
use crate::error::{Error, Result};

/// Keeps `dz/dc = s·m1·sin(m1θ+m2)/sin θ` finite as θ → 0 or π.
const MIN_SIN_THETA: f64 = 1e-6;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TargetLogit {
    /// The target logit `z_y`.
    pub logit: f32,
    /// `∂z_y/∂c_y` under the configured gradient mode.
    pub dlogit_dcos: f32,
}

/// The target logit of a clamped cosine `c`.
pub fn target_logit(m: &MarginConfig, c: f32) -> TargetLogit {
    let s = m.scale as f64;
    let (m1, m2, m3) = (m.m1 as f64, m.m2 as f64, m.m3 as f64);
    let c = (c as f64).clamp(-1.0, 1.0);
    let theta = c.acos();
    let angle = m1 * theta + m2;
    let (cos_margin, dcos_margin_dc) = if m.arcface_fallback && angle > std::f64::consts::PI {
        // The original ArcFace rule keeps the logit monotonic in θ where cos(θ + m2) turns back.
        (c - m2 * m2.sin(), 1.0)
    } else {
        let sin_theta = theta.sin().max(MIN_SIN_THETA);
        (angle.cos(), m1 * angle.sin() / sin_theta)
    };
    let dlogit_dcos = match m.grad {
        MarginGrad::StraightThrough => s,
        MarginGrad::Exact => s * dcos_margin_dc,
    };
    TargetLogit { logit: (s * (cos_margin - m3)) as f32, dlogit_dcos: dlogit_dcos as f32 }
}

/// AdaFace's clamp of every cosine to [−1 + eps, 1 − eps], and of the target's moved angle to
/// [eps, π − eps].
pub const ADAFACE_EPS: f64 = 1e-3;
/// AdaFace's clip of each embedding norm before its statistics.
pub(crate) const ADAFACE_NORM_RANGE: (f64, f64) = (0.001, 100.0);

/// The largest |cosine| a margin lets through; beyond it the clamp holds and no gradient flows.
pub fn cosine_bound(m: &MarginConfig) -> f32 {
    match m.kind {
        MarginKind::AdaFace { .. } => (1.0 - ADAFACE_EPS) as f32,
        _ => 1.0,
    }
}

/// CurricularFace's weight of the newest batch's mean target cosine in t.
pub(crate) const CURRICULAR_T_ALPHA: f64 = 0.01;

/// The largest |∂z/∂c| of a non-target logit: s, and under CurricularFace s·(|t| + 2), a hard
/// negative's s·(t + 2c) at |c| ≤ 1.
pub fn non_target_slope_bound(m: &MarginConfig, state: MarginState) -> f64 {
    let s = (m.scale as f64).abs();
    match state {
        MarginState::Curricular { t } => s * ((t as f64).abs() + 2.0),
        _ => s,
    }
}

/// A margin's running statistics (SPEC §1.6a): part of the head's state, the same on every shard
/// and process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MarginState {
    /// The combined margin keeps none.
    None,
    /// AdaFace's running mean and standard deviation of the clipped embedding norms.
    AdaFace { mean: f32, std: f32 },
    /// CurricularFace's t, the running mean of the target cosines.
    Curricular { t: f32 },
}

impl MarginState {
    /// A new head's statistics: AdaFace's authors start at 20 and 100, CurricularFace's at t = 0.
    pub fn initial(kind: MarginKind) -> MarginState {
        match kind {
            MarginKind::AdaFace { .. } => MarginState::AdaFace { mean: 20.0, std: 100.0 },
            MarginKind::Curricular { .. } => MarginState::Curricular { t: 0.0 },
            MarginKind::Combined => MarginState::None,
        }
    }

    /// As `pfc_margin_state` lists them.
    pub fn values(&self) -> Vec<f32> {
        match *self {
            MarginState::None => Vec::new(),
            MarginState::AdaFace { mean, std } => vec![mean, std],
            MarginState::Curricular { t } => vec![t],
        }
    }

    /// The statistics of `kind` from their listed values (a checkpoint's).
    /// Only values the statistics can reach are taken (SPEC §2b): AdaFace's mean within the norm clip
    /// [0.001, 100] and its standard deviation at least 0, CurricularFace's t, a running mean of
    /// clamped cosines, within [−1, 1]. Anything else would jam or invert the margin later.
    pub fn from_values(kind: MarginKind, values: &[f32]) -> Result<MarginState> {
        let want = MarginState::initial(kind).values().len();
        if values.len() != want || values.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(format!("the margin's running statistics: expected {want} finite values, got {values:?}")));
        }
        let (state, reachable) = match kind {
            MarginKind::AdaFace { .. } => {
                let (mean, std) = (values[0], values[1]);
                let (lo, hi) = ADAFACE_NORM_RANGE;
                (MarginState::AdaFace { mean, std }, (lo..=hi).contains(&(mean as f64)) && std >= 0.0)
            }
            MarginKind::Curricular { .. } => (MarginState::Curricular { t: values[0] }, (-1.0..=1.0).contains(&values[0])),
            MarginKind::Combined => (MarginState::None, true),
        };
        if !reachable {
            return Err(Error::invalid(format!(
                "the margin's running statistics {values:?} are outside what they can reach (AdaFace: mean in [0.001, 100], std >= 0; CurricularFace: t in [-1, 1])"
            )));
        }
        Ok(state)
    }

    /// After a training batch whose rows are `rows` (its global batch's: AdaFace's raw embedding
    /// norms, CurricularFace's target cosines). AdaFace folds the batch's mean and unbiased standard
    /// deviation of the clipped norms in with weight t_alpha; a batch of one row has no standard
    /// deviation and leaves σ̄ as it is rather than make it NaN. CurricularFace folds in the mean of
    /// the target cosines clamped to [−1, 1] with weight 0.01.
    pub fn after_batch(self, kind: MarginKind, rows: &[f64]) -> MarginState {
        let n = rows.len() as f64;
        match (self, kind) {
            (MarginState::AdaFace { mean, std }, MarginKind::AdaFace { t_alpha, .. }) => {
                let clipped: Vec<f64> = rows.iter().map(|r| r.clamp(ADAFACE_NORM_RANGE.0, ADAFACE_NORM_RANGE.1)).collect();
                let batch_mean = clipped.iter().sum::<f64>() / n;
                let a = t_alpha as f64;
                let fold = |new: f64, old: f32| (a * new + (1.0 - a) * old as f64) as f32;
                let std = if clipped.len() > 1 {
                    let var = clipped.iter().map(|x| (x - batch_mean) * (x - batch_mean)).sum::<f64>() / (n - 1.0);
                    fold(var.sqrt(), std)
                } else {
                    std
                };
                MarginState::AdaFace { mean: fold(batch_mean, mean), std }
            }
            (MarginState::Curricular { t }, MarginKind::Curricular { .. }) => {
                let mean = rows.iter().map(|c| c.clamp(-1.0, 1.0)).sum::<f64>() / n;
                MarginState::Curricular { t: (CURRICULAR_T_ALPHA * mean + (1.0 - CURRICULAR_T_ALPHA) * t as f64) as f32 }
            }
            (state, _) => state,
        }
    }

    /// Each row's margin parameter from its `after_batch` row: AdaFace's scaler
    /// g = clip((n − μ̄)/(σ̄ + eps)·h, −1, 1), CurricularFace's hard-negative threshold cos(θ_y + m)
    /// (non-target cosines above it are hard); empty for the combined margin.
    pub fn row_margins(&self, kind: MarginKind, rows: &[f64]) -> Vec<f32> {
        match (self, kind) {
            (MarginState::AdaFace { mean, std }, MarginKind::AdaFace { h, .. }) => rows
                .iter()
                .map(|n| {
                    let n = n.clamp(ADAFACE_NORM_RANGE.0, ADAFACE_NORM_RANGE.1);
                    ((n - *mean as f64) / (*std as f64 + ADAFACE_EPS) * h as f64).clamp(-1.0, 1.0) as f32
                })
                .collect(),
            (MarginState::Curricular { .. }, MarginKind::Curricular { m }) => {
                let (sin_m, cos_m) = (m as f64).sin_cos();
                rows.iter()
                    .map(|c| {
                        let c = c.clamp(-1.0, 1.0);
                        (c * cos_m - (1.0 - c * c).sqrt() * sin_m) as f32
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// CurricularFace's t, which hard negatives carry (`c·(t + c)`); 0 for the other kinds.
    pub fn hard_negative_t(&self) -> f32 {
        match *self {
            MarginState::Curricular { t } => t,
            _ => 0.0,
        }
    }
}

/// The target logit of raw cosine `raw` under the configured margin, `g` being the row's AdaFace
/// scaler (`MarginState::row_margins`; unused by the other kinds). A clamp that holds gives the
/// logit of the clamped cosine (the slope's zero is the caller's, where the clamp holds).
pub fn target(m: &MarginConfig, raw: f32, g: f32) -> TargetLogit {
    match m.kind {
        MarginKind::AdaFace { m: margin, .. } => adaface_target(m.scale, margin, raw, g),
        _ => target_logit(&combined_target(m), raw.clamp(-1.0, 1.0)),
    }
}

/// The combined margin whose target logit a margin takes (not AdaFace's, which is its own):
/// CurricularFace's is ArcFace's with the authors' fallback below cos(π − m), its gradient exact.
pub fn combined_target(m: &MarginConfig) -> MarginConfig {
    match m.kind {
        MarginKind::Curricular { m: margin } => MarginConfig { m1: 1.0, m2: margin, m3: 0.0, grad: MarginGrad::Exact, arcface_fallback: true, ..*m },
        _ => *m,
    }
}

/// AdaFace's target logit `s·(cos(clip(θ − m·g, eps, π − eps)) − (m + m·g))` of the cosine clamped
/// to [−1 + eps, 1 − eps], and its exact derivative `s·sin(angle)/sin θ` (0 where the angle's clip
/// holds; `g` carries no gradient).
fn adaface_target(scale: f32, margin: f32, raw: f32, g: f32) -> TargetLogit {
    let (s, m, g) = (scale as f64, margin as f64, g as f64);
    let bound = (1.0 - ADAFACE_EPS) as f32;
    let c = raw.clamp(-bound, bound) as f64;
    let theta = c.acos();
    let moved = theta - m * g;
    let angle = moved.clamp(ADAFACE_EPS, std::f64::consts::PI - ADAFACE_EPS);
    let slope = if angle == moved { s * angle.sin() / theta.sin() } else { 0.0 };
    TargetLogit { logit: (s * (angle.cos() - (m + m * g))) as f32, dlogit_dcos: slope as f32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(m1: f32, m2: f32, m3: f32, grad: MarginGrad) -> MarginConfig {
        MarginConfig { kind: crate::config::MarginKind::Combined, scale: 64.0, m1, m2, m3, interclass_filter: 0.0, grad, arcface_fallback: false }
    }

    #[test]
    fn arcface_and_cosface_match_their_closed_forms() {
        let c = 0.3f32;
        let arc = target_logit(&cfg(1.0, 0.5, 0.0, MarginGrad::StraightThrough), c);
        let expect = 64.0 * ((0.3f64).acos() + 0.5).cos();
        assert!((arc.logit as f64 - expect).abs() < 1e-4);
        assert_eq!(arc.dlogit_dcos, 64.0);
        let cos = target_logit(&cfg(1.0, 0.0, 0.4, MarginGrad::StraightThrough), c);
        assert!((cos.logit as f64 - 64.0 * (0.3 - 0.4)).abs() < 1e-4);
    }

    #[test]
    fn exact_derivative_matches_finite_differences() {
        for &(m1, m2, m3) in &[(1.0f32, 0.5f32, 0.0f32), (1.0, 0.0, 0.4), (1.35, 0.0, 0.0), (1.2, 0.3, 0.2)] {
            let m = cfg(m1, m2, m3, MarginGrad::Exact);
            for &c in &[-0.7f64, -0.2, 0.1, 0.45, 0.8] {
                let h = 1e-4;
                let f = |x: f64| target_logit(&m, x as f32).logit as f64;
                let fd = (f(c + h) - f(c - h)) / (2.0 * h);
                let d = target_logit(&m, c as f32).dlogit_dcos as f64;
                assert!((fd - d).abs() <= 2e-2 * d.abs().max(1.0), "m=({m1},{m2},{m3}) c={c}: fd {fd} vs {d}");
            }
        }
    }

    #[test]
    fn curricular_target_threshold_and_t_follow_the_authors_formulas() {
        let m = MarginConfig { kind: MarginKind::Curricular { m: 0.5 }, ..cfg(1.0, 0.0, 0.0, MarginGrad::StraightThrough) };
        let (sin_m, cos_m) = 0.5f64.sin_cos();
        for &c in &[-0.95f64, -0.6, 0.1, 0.7] {
            let t = target(&m, c as f32, 0.0);
            let want = if c > (std::f64::consts::PI - 0.5).cos() { c * cos_m - (1.0 - c * c).sqrt() * sin_m } else { c - 0.5 * sin_m };
            assert!((t.logit as f64 - 64.0 * want).abs() < 1e-3, "c={c}: {} vs {}", t.logit, 64.0 * want);
            let h = 1e-5;
            let fd = (target(&m, (c + h) as f32, 0.0).logit as f64 - target(&m, (c - h) as f32, 0.0).logit as f64) / (2.0 * h);
            assert!((fd - t.dlogit_dcos as f64).abs() <= 2e-2 * fd.abs().max(1.0), "c={c}: fd {fd} vs {}", t.dlogit_dcos);
        }
        let state = MarginState::initial(m.kind).after_batch(m.kind, &[0.5, 1.5, -0.25]);
        assert_eq!(state, MarginState::Curricular { t: (0.01 * (0.5 + 1.0 - 0.25) / 3.0) as f32 });
        let thresholds = state.row_margins(m.kind, &[0.5]);
        assert!((thresholds[0] as f64 - (0.5f64.acos() + 0.5).cos()).abs() < 1e-6);
        assert!((non_target_slope_bound(&m, state) - 64.0 * (state.hard_negative_t() as f64 + 2.0)).abs() < 1e-9);
    }

    #[test]
    fn fallback_applies_only_past_pi() {
        let mut m = cfg(1.0, 0.5, 0.0, MarginGrad::Exact);
        m.arcface_fallback = true;
        let near_minus_one = target_logit(&m, -0.99);
        let expect = 64.0 * (-0.99 - 0.5 * 0.5f64.sin());
        assert!((near_minus_one.logit as f64 - expect).abs() < 1e-3);
        assert_eq!(near_minus_one.dlogit_dcos, 64.0);
        let inside = target_logit(&m, 0.5);
        assert!((inside.logit as f64 - 64.0 * ((0.5f64).acos() + 0.5).cos()).abs() < 1e-3);
    }
}
