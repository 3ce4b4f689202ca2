//! The combined margin on the target logit (SPEC §1.6) and its derivative (SPEC §1.8). Computed in
//! f64: it runs once per sample, so precision costs nothing here.

use crate::config::{MarginConfig, MarginGrad};

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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(m1: f32, m2: f32, m3: f32, grad: MarginGrad) -> MarginConfig {
        MarginConfig { scale: 64.0, m1, m2, m3, interclass_filter: 0.0, grad, arcface_fallback: false }
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
