//! The engine (f32, through the C ABI) against an independent float64 model of SPEC §1 for one
//! step at sample_rate 1: loss, returned embedding gradient and the center gradient recovered from
//! an SGD step with lr 1, momentum 0, weight decay 0 (ΔW = −gW). Every margin family, with and
//! without the inter-class filter, both margin-gradient modes, one and three local shards; and, in
//! exact mode, central finite differences of the model's loss against the engine's gradients and
//! against the model's own analytic gradient (which validates the model).

use crate::common::*;
use partialfc::ffi::*;

// ---------------------------------------------------------------------------------------------
// Deterministic data.

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Rows scaled to unit norm (PyTorch `normalize`: x / max(‖x‖, 1e-12)) and the divisors used.
fn normalize_rows(v: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut unit = v.to_vec();
    let mut norms = Vec::with_capacity(v.len() / d);
    for row in unit.chunks_exact_mut(d) {
        let n = norm(row).max(1e-12);
        row.iter_mut().for_each(|x| *x /= n);
        norms.push(n);
    }
    (unit, norms)
}

// ---------------------------------------------------------------------------------------------
// The float64 model of SPEC §1 (one step, sample_rate 1, every class, dense).

#[derive(Clone, Copy, Debug)]
struct Margin {
    s: f64,
    m1: f64,
    m2: f64,
    m3: f64,
    /// Inter-class filter threshold; 0 = off.
    filter: f64,
    exact: bool,
}

struct Problem {
    n: usize,
    c: usize,
    d: usize,
    /// N × d, the f32 values the engine sees, widened.
    e: Vec<f64>,
    y: Vec<usize>,
    /// C × d.
    w: Vec<f64>,
}

struct Reference {
    loss: f64,
    /// Each sample's loss.
    row_loss: Vec<f64>,
    /// ∂loss/∂e · world (SPEC §1.8's convention).
    grad_e: Vec<f64>,
    /// ∂loss/∂W.
    grad_w: Vec<f64>,
    /// Rows whose largest softmax probability exceeds 0.99 (a saturated softmax).
    saturated: usize,
}

/// Logit of column j for row i and ∂z/∂c under the configured gradient mode; `c` clamped.
fn logit(m: &Margin, c: f64, is_target: bool) -> (f64, f64) {
    if is_target {
        let theta = c.acos();
        let angle = m.m1 * theta + m.m2;
        let z = m.s * (angle.cos() - m.m3);
        let slope = if m.exact { m.s * m.m1 * angle.sin() / theta.sin() } else { m.s };
        (z, slope)
    } else if m.filter > 0.0 && c > m.filter {
        (0.0, 0.0)
    } else {
        (m.s * c, m.s)
    }
}

/// Raw cosines x·wᵀ (N × C, unclamped).
fn raw_cosines(p: &Problem, x: &[f64], w: &[f64]) -> Vec<f64> {
    let (n, c, d) = (p.n, p.c, p.d);
    let mut cos = vec![0.0; n * c];
    for i in 0..n {
        for j in 0..c {
            cos[i * c + j] = dot(&x[i * d..(i + 1) * d], &w[j * d..(j + 1) * d]);
        }
    }
    cos
}

/// One row's softmax cross-entropy over logits `z` with target `y` (SPEC §1.7's exact form):
/// the loss `log1p(R / T)`, with R = Σ_{j≠y} exp(z_j − max) and T = exp(z_y − max), and
/// `softmax − onehot` written into `dz`, the target's entry being −R/Σ. Float64 has digits to
/// spare, but the form is the one the engine must follow, and it keeps the model exact at any loss.
fn row_softmax(z: &[f64], y: usize, dz: &mut [f64]) -> f64 {
    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let rest: f64 = z.iter().enumerate().filter(|&(j, _)| j != y).map(|(_, v)| (v - max).exp()).sum();
    let target = (z[y] - max).exp();
    let sum = rest + target;
    for (j, d) in dz.iter_mut().enumerate() {
        *d = if j == y { -rest / sum } else { (z[j] - max).exp() / sum };
    }
    (rest / target).ln_1p()
}

/// The mean loss only (for finite differences).
fn model_loss(m: &Margin, p: &Problem, e: &[f64], w: &[f64]) -> f64 {
    let (x, _) = normalize_rows(e, p.d);
    let (wu, _) = normalize_rows(w, p.d);
    let cos = raw_cosines(p, &x, &wu);
    let mut total = 0.0;
    let (mut z, mut dz) = (vec![0.0; p.c], vec![0.0; p.c]);
    for i in 0..p.n {
        for j in 0..p.c {
            z[j] = logit(m, cos[i * p.c + j].clamp(-1.0, 1.0), j == p.y[i]).0;
        }
        total += row_softmax(&z, p.y[i], &mut dz);
    }
    total / p.n as f64
}

/// Loss and gradients of SPEC §1 in float64.
fn model(m: &Margin, p: &Problem, world: usize) -> Reference {
    let (n, c, d) = (p.n, p.c, p.d);
    let (x, enorm) = normalize_rows(&p.e, d);
    let (wu, wnorm) = normalize_rows(&p.w, d);
    let cos = raw_cosines(p, &x, &wu);
    // G = ∂loss/∂cos (N × C).
    let mut g = vec![0.0; n * c];
    let mut row_loss = Vec::with_capacity(n);
    let (mut z, mut dz) = (vec![0.0; c], vec![0.0; c]);
    let mut slope = vec![0.0; c];
    let mut saturated = 0;
    for i in 0..n {
        for j in 0..c {
            let (zz, sl) = logit(m, cos[i * c + j].clamp(-1.0, 1.0), j == p.y[i]);
            z[j] = zz;
            slope[j] = sl;
        }
        row_loss.push(row_softmax(&z, p.y[i], &mut dz));
        let largest_prob = dz.iter().enumerate().map(|(j, &v)| if j == p.y[i] { 1.0 + v } else { v }).fold(0.0, f64::max);
        saturated += usize::from(largest_prob > 0.99);
        for j in 0..c {
            let inside = (-1.0..=1.0).contains(&cos[i * c + j]);
            g[i * c + j] = if inside { dz[j] / n as f64 * slope[j] } else { 0.0 };
        }
    }
    let loss = row_loss.iter().sum::<f64>() / n as f64;
    // Back through the normalizations.
    let mut grad_e = vec![0.0; n * d];
    for i in 0..n {
        let mut gx = vec![0.0; d];
        for j in 0..c {
            let gij = g[i * c + j];
            for k in 0..d {
                gx[k] += gij * wu[j * d + k];
            }
        }
        let xi = &x[i * d..(i + 1) * d];
        let proj = dot(xi, &gx);
        for k in 0..d {
            grad_e[i * d + k] = (gx[k] - xi[k] * proj) / enorm[i] * world as f64;
        }
    }
    let mut grad_w = vec![0.0; c * d];
    for j in 0..c {
        let mut gw = vec![0.0; d];
        for i in 0..n {
            let gij = g[i * c + j];
            for k in 0..d {
                gw[k] += gij * x[i * d + k];
            }
        }
        let wj = &wu[j * d..(j + 1) * d];
        let proj = dot(wj, &gw);
        for k in 0..d {
            grad_w[j * d + k] = (gw[k] - wj[k] * proj) / wnorm[j];
        }
    }
    Reference { loss, row_loss, grad_e, grad_w, saturated }
}

// ---------------------------------------------------------------------------------------------
// Test data: targets correlated with their centers, a few centers planted next to embeddings of
// other classes (non-target cosines ≈ 0.9, above any filter threshold), one sample whose target
// cosine is strongly negative (m1·θ + m2 > π for the larger margins: no fallback), varied norms.

const THRESHOLD: f64 = 0.3;

struct Data {
    p: Problem,
    e32: Vec<f32>,
    w32: Vec<f32>,
    labels: Vec<i64>,
    /// Classes planted next to an embedding of another class.
    planted: Vec<usize>,
}

fn unit_random(rng: &mut Rng, d: usize) -> Vec<f64> {
    let v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
    let n = norm(&v);
    v.into_iter().map(|x| x / n).collect()
}

fn try_make(c: usize, d: usize, n: usize, seed: u64) -> Option<Data> {
    let mut rng = Rng(seed);
    // Centers: random directions, norms in [0.3, 3].
    let mut w = Vec::with_capacity(c * d);
    for _ in 0..c {
        let scale = rng.range(0.3, 3.0);
        w.extend(unit_random(&mut rng, d).into_iter().map(|v| v * scale));
    }
    // Labels, with some repeats (several samples of one class).
    let mut y: Vec<usize> = (0..n).map(|_| rng.below(c as u64) as usize).collect();
    y[1] = y[0];
    y[n - 1] = y[n / 2];
    // Embeddings: a·ŵ_y + unit noise, so that the target cosine is ≈ a/√(a²+1).
    let mut e = Vec::with_capacity(n * d);
    for i in 0..n {
        let a = if i == 2 { -1.6 } else if i == 3 { 0.0 } else { rng.range(0.3, 1.6) };
        let (wy, _) = normalize_rows(&w[y[i] * d..(y[i] + 1) * d], d);
        let noise = unit_random(&mut rng, d);
        let scale = rng.range(0.5, 3.0);
        let dir: Vec<f64> = wy.iter().zip(&noise).map(|(u, r)| a * u + r).collect();
        let k = scale / norm(&dir);
        e.extend(dir.into_iter().map(|v| v * k));
    }
    // Plant a few centers of unused classes next to embeddings of other classes.
    let mut planted = Vec::new();
    for &i in &[4usize, 5, n - 2] {
        let j = loop {
            let j = rng.below(c as u64) as usize;
            if !y.contains(&j) && !planted.contains(&j) {
                break j;
            }
        };
        let (xi, _) = normalize_rows(&e[i * d..(i + 1) * d], d);
        let noise = unit_random(&mut rng, d);
        let scale = rng.range(0.5, 2.0);
        let dir: Vec<f64> = xi.iter().zip(&noise).map(|(u, r)| u + 0.45 * r).collect();
        let k = scale / norm(&dir);
        for t in 0..d {
            w[j * d + t] = dir[t] * k;
        }
        planted.push(j);
    }
    // Round to f32: both sides see exactly these values.
    let e32: Vec<f32> = e.iter().map(|&v| v as f32).collect();
    let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    let p = Problem {
        n,
        c,
        d,
        e: e32.iter().map(|&v| v as f64).collect(),
        y: y.clone(),
        w: w32.iter().map(|&v| v as f64).collect(),
    };
    // Reject data near the filter threshold, near the clamp, or with θ near 0 or π for a target.
    let (x, _) = normalize_rows(&p.e, d);
    let (wu, _) = normalize_rows(&p.w, d);
    let cos = raw_cosines(&p, &x, &wu);
    let mut above = 0;
    for i in 0..n {
        for j in 0..c {
            let v = cos[i * c + j];
            if v.abs() > 0.99 {
                return None;
            }
            if j != y[i] {
                if (v - THRESHOLD).abs() < 1e-3 {
                    return None;
                }
                above += usize::from(v > THRESHOLD);
            }
        }
    }
    // The filter must act: the planted columns at least, plus some natural ones.
    if above < 5 {
        return None;
    }
    let labels = y.iter().map(|&v| v as i64).collect();
    Some(Data { p, e32, w32, labels, planted })
}

fn make_data(c: usize, d: usize, n: usize, seed: u64) -> Data {
    (0..100).find_map(|k| try_make(c, d, n, seed.wrapping_mul(1000).wrapping_add(k))).expect("no valid data in 100 seeds")
}

// ---------------------------------------------------------------------------------------------
// The engine through the C ABI.

struct EngineOut {
    loss: f64,
    /// Returned embedding gradient (local_shards × ∂loss/∂e).
    grad_e: Vec<f32>,
    /// (W_before − W_after) / lr, no momentum, no weight decay: the center gradient.
    grad_w: Vec<f64>,
}

fn run_engine(m: &Margin, data: &Data, shards: usize) -> EngineOut {
    run_engine_with(m, data, shards, 1.0, |_| {})
}

/// A step at learning rate `lr`; `before` sees the head once the centers are set.
fn run_engine_with(m: &Margin, data: &Data, shards: usize, lr: f32, before: impl FnOnce(&TestHead)) -> EngineOut {
    let p = &data.p;
    let mut cfg = default_config();
    cfg.num_classes = p.c as u64;
    cfg.embedding_dim = p.d as u32;
    cfg.sample_rate = 1.0;
    cfg.scale = m.s as f32;
    cfg.m1 = m.m1 as f32;
    cfg.m2 = m.m2 as f32;
    cfg.m3 = m.m3 as f32;
    cfg.interclass_filter = m.filter as f32;
    cfg.margin_grad = if m.exact { PFC_MARGIN_GRAD_EXACT } else { PFC_MARGIN_GRAD_STRAIGHT_THROUGH };
    cfg.optimizer = PFC_OPTIMIZER_SGD;
    cfg.lr = lr;
    cfg.momentum = 0.0;
    cfg.weight_decay = 0.0;
    cfg.local_shards = shards as u32;
    let head = TestHead::new(&cfg);
    assert_eq!(head.local_classes(), (0, p.c as u64));
    head.set_centers(&data.w32);
    assert_eq!(head.centers(p.d), data.w32, "pfc_get_centers does not return what pfc_set_centers wrote");
    before(&head);
    let (stats, grad_e) = head.step(&data.e32, &data.labels, p.d, &even_split(p.n, shards));
    assert_eq!(stats.global_batch, p.n as u64);
    assert_eq!(stats.sampled_classes, p.c as u64);
    let after = head.centers(p.d);
    let grad_w = data.w32.iter().zip(&after).map(|(&b, &a)| (b as f64 - a as f64) / lr as f64).collect();
    EngineOut { loss: stats.loss, grad_e, grad_w }
}

/// ‖a − b‖₂ / ‖b‖₂ in f64.
fn rel_err64(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    diff / norm(b).max(1e-300)
}

// ---------------------------------------------------------------------------------------------
// Cases.

const ARCFACE: (f64, f64, f64) = (1.0, 0.5, 0.0);
const COSFACE: (f64, f64, f64) = (1.0, 0.0, 0.4);
const SPHERE: (f64, f64, f64) = (1.35, 0.0, 0.0);
const COMBINED: (f64, f64, f64) = (1.2, 0.3, 0.2);

/// (name, margins, scale, C, d, N, seed): sizes differ per family; C and N not multiples of 3.
type Family = (&'static str, (f64, f64, f64), f64, usize, usize, usize, u64);
const FAMILIES: [Family; 5] = [
    ("arcface", ARCFACE, 40.0, 101, 32, 17, 1),
    ("cosface", COSFACE, 24.0, 152, 48, 23, 2),
    ("sphereface-m1", SPHERE, 16.0, 59, 16, 10, 3),
    ("combined", COMBINED, 32.0, 197, 64, 20, 4),
    // The default scale.
    ("arcface-s64", ARCFACE, 64.0, 83, 24, 14, 5),
];

const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;

fn margin_of(m: (f64, f64, f64), s: f64, filter: bool, exact: bool) -> Margin {
    Margin { s, m1: m.0, m2: m.1, m3: m.2, filter: if filter { THRESHOLD } else { 0.0 }, exact }
}

fn compare_family(family: usize) {
    let (name, mm, s, c, d, n, seed) = FAMILIES[family];
    let data = make_data(c, d, n, seed);
    let mut worst = (0.0f64, 0.0f64, 0.0f64);
    for filter in [false, true] {
        for exact in [true, false] {
            let m = margin_of(mm, s, filter, exact);
            let want = model(&m, &data.p, 1);
            // The case must exercise something: a loss that is neither ≈0 nor absurd.
            assert!(want.loss > 0.05 && want.loss < 200.0, "{name}: degenerate loss {}", want.loss);
            assert!(2 * want.saturated <= n, "{name}: {}/{n} rows have a saturated softmax", want.saturated);
            for shards in [1usize, 3] {
                let got = run_engine(&m, &data, shards);
                let tag = format!("{name} filter={filter} exact={exact} shards={shards}");
                let loss_err = (got.loss - want.loss).abs() / want.loss.abs();
                assert!(loss_err <= LOSS_TOL, "{tag}: loss {} vs f64 {} (rel {loss_err:.3e})", got.loss, want.loss);
                let ge: Vec<f64> = got.grad_e.iter().map(|&v| v as f64 / shards as f64).collect();
                let e_err = rel_err64(&ge, &want.grad_e);
                assert!(e_err <= GRAD_TOL, "{tag}: embedding gradient rel err {e_err:.3e}");
                let w_err = rel_err64(&got.grad_w, &want.grad_w);
                assert!(w_err <= GRAD_TOL, "{tag}: center gradient rel err {w_err:.3e}");
                println!("{tag}: saturated rows {}/{n}, loss {:.6} rel {loss_err:.2e}, grad_e rel {e_err:.2e}, grad_w rel {w_err:.2e}", want.saturated, want.loss);
                worst = (worst.0.max(loss_err), worst.1.max(e_err), worst.2.max(w_err));
            }
        }
    }
    println!("{name}: worst loss rel {:.2e}, grad_e rel {:.2e}, grad_w rel {:.2e}", worst.0, worst.1, worst.2);
}

#[test]
fn arcface_matches_f64_model() {
    compare_family(0);
}

#[test]
fn cosface_matches_f64_model() {
    compare_family(1);
}

#[test]
fn m1_margin_matches_f64_model() {
    compare_family(2);
}

#[test]
fn combined_margin_matches_f64_model() {
    compare_family(3);
}

/// The model's modes, filter and margins are not interchangeable: each switch changes the result
/// (else the comparisons above could pass with a feature ignored on both sides).
#[test]
fn arcface_default_scale_matches_f64_model() {
    compare_family(4);
}

#[test]
fn model_switches_matter() {
    let (_, mm, s, c, d, n, seed) = FAMILIES[3];
    let data = make_data(c, d, n, seed);
    let base = model(&margin_of(mm, s, false, true), &data.p, 1);
    let st = model(&margin_of(mm, s, false, false), &data.p, 1);
    let filt = model(&margin_of(mm, s, true, true), &data.p, 1);
    assert!(rel_err64(&st.grad_e, &base.grad_e) > 1e-2, "exact vs straight-through barely differ");
    assert!(rel_err64(&filt.grad_w, &base.grad_w) > 1e-2, "the filter barely changes the center gradient");
    assert!((filt.loss - base.loss).abs() > 1e-3 * base.loss, "the filter barely changes the loss");
    // The planted classes are filtered for their rows: with the filter their gradient comes only
    // from rows below the threshold.
    for &j in &data.planted {
        let g0 = norm(&base.grad_w[j * d..(j + 1) * d]);
        let g1 = norm(&filt.grad_w[j * d..(j + 1) * d]);
        assert!(g1 < g0, "planted class {j}: filtered gradient {g1} not below unfiltered {g0}");
    }
    // CosFace: m1 = 1, m2 = 0, so the exact derivative is s, the same as straight-through.
    let cf = make_data(FAMILIES[1].3, FAMILIES[1].4, FAMILIES[1].5, FAMILIES[1].6);
    let a = model(&margin_of(COSFACE, 32.0, true, true), &cf.p, 1);
    let b = model(&margin_of(COSFACE, 32.0, true, false), &cf.p, 1);
    assert!(rel_err64(&a.grad_e, &b.grad_e) < 1e-9 && rel_err64(&a.grad_w, &b.grad_w) < 1e-9);
}

// ---------------------------------------------------------------------------------------------
// Finite differences (exact mode).

/// Fourth-order central difference of the model loss along one coordinate.
fn fd(m: &Margin, p: &Problem, center: bool, idx: usize) -> f64 {
    const H: f64 = 1e-5;
    let mut e = p.e.clone();
    let mut w = p.w.clone();
    let mut at = |delta: f64| {
        if center {
            w[idx] = p.w[idx] + delta;
        } else {
            e[idx] = p.e[idx] + delta;
        }
        model_loss(m, p, &e, &w)
    };
    let (f1, f_1, f2, f_2) = (at(H), at(-H), at(2.0 * H), at(-2.0 * H));
    (8.0 * (f1 - f_1) - (f2 - f_2)) / (12.0 * H)
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |a, &b| a.max(b.abs()))
}

const FD_MODEL_TOL: f64 = 1e-6;
const FD_ENGINE_TOL: f64 = 1e-3;

fn fd_family(family: usize) {
    let (name, mm, s, c, d, n, seed) = FAMILIES[family];
    let data = make_data(c, d, n, seed);
    let p = &data.p;
    // Center rows to check: the target classes of a few rows, the planted classes, a few others.
    let mut classes: Vec<usize> = vec![p.y[0], p.y[2], p.y[3], p.y[n - 1]];
    classes.extend(&data.planted);
    let mut rng = Rng(seed ^ 0xFD);
    classes.extend((0..3).map(|_| rng.below(c as u64) as usize));
    classes.sort_unstable();
    classes.dedup();
    for filter in [false, true] {
        let m = margin_of(mm, s, filter, true);
        let want = model(&m, p, 1);
        let (scale_me, scale_mw) = (max_abs(&want.grad_e), max_abs(&want.grad_w));
        // Finite differences: every embedding entry, every entry of the chosen center rows.
        let fd_e: Vec<f64> = (0..n * d).map(|idx| fd(&m, p, false, idx)).collect();
        let w_idx: Vec<usize> = classes.iter().flat_map(|&j| (0..d).map(move |k| j * d + k)).collect();
        let fd_w: Vec<f64> = w_idx.iter().map(|&idx| fd(&m, p, true, idx)).collect();
        let tag = format!("{name} filter={filter}");
        let mut worst_model = 0.0f64;
        for (idx, &f) in fd_e.iter().enumerate() {
            let err = (f - want.grad_e[idx]).abs() / scale_me;
            assert!(err <= FD_MODEL_TOL, "{tag}: e[{idx}] fd {f} vs model {} ({err:.2e})", want.grad_e[idx]);
            worst_model = worst_model.max(err);
        }
        for (&idx, &f) in w_idx.iter().zip(&fd_w) {
            let err = (f - want.grad_w[idx]).abs() / scale_mw;
            assert!(err <= FD_MODEL_TOL, "{tag}: W[{},{}] fd {f} vs model {} ({err:.2e})", idx / d, idx % d, want.grad_w[idx]);
            worst_model = worst_model.max(err);
        }
        println!("{tag}: fd vs f64 model max {worst_model:.2e} ({} embedding, {} center entries)", fd_e.len(), fd_w.len());
        for shards in [1usize, 3] {
            let got = run_engine(&m, &data, shards);
            let got_e: Vec<f64> = got.grad_e.iter().map(|&v| v as f64 / shards as f64).collect();
            let (scale_e, scale_w) = (max_abs(&got_e), max_abs(&got.grad_w));
            let mut worst_engine = 0.0f64;
            for (idx, &f) in fd_e.iter().enumerate() {
                let err = (f - got_e[idx]).abs() / scale_e;
                assert!(err <= FD_ENGINE_TOL, "{tag} shards={shards}: e[{idx}] fd {f} vs engine {} ({err:.2e})", got_e[idx]);
                worst_engine = worst_engine.max(err);
            }
            for (&idx, &f) in w_idx.iter().zip(&fd_w) {
                let err = (f - got.grad_w[idx]).abs() / scale_w;
                assert!(err <= FD_ENGINE_TOL, "{tag} shards={shards}: W[{},{}] fd {f} vs engine {} ({err:.2e})", idx / d, idx % d, got.grad_w[idx]);
                worst_engine = worst_engine.max(err);
            }
            println!("{tag} shards={shards}: fd vs engine max {worst_engine:.2e}");
        }
    }
}

#[test]
fn finite_differences_arcface() {
    fd_family(0);
}

#[test]
fn finite_differences_cosface() {
    fd_family(1);
}

#[test]
fn finite_differences_m1_margin() {
    fd_family(2);
}

#[test]
fn finite_differences_combined_margin() {
    fd_family(3);
}

// ---------------------------------------------------------------------------------------------
// The confident regime (SPEC §1.7): a well-trained head, per-sample losses from 1e-2 down to 1e-7.
// There `log Σ − z_y` and `p_y − 1` with Σ ≈ 1 in f32 keep no digits; the exact form keeps what the
// f32 cosines times s allow.

/// Per-sample losses the rows are tuned to: sixteen confident ones, 1e-2 down to 1e-7, and one
/// ordinary one. One more row (its target logit below another column's) follows them.
fn confident_targets() -> Vec<f64> {
    let mut t: Vec<f64> = (0..16).map(|k| 10f64.powf(-2.0 - 5.0 * k as f64 / 15.0)).collect();
    t.push(0.5);
    t
}

/// Per-sample losses, and the gradients norm-wise over the whole case.
const CONFIDENT_TOL: f64 = 2e-5;
/// Each row's gradient on its own, confident rows included: the f32 cosines' rounding times s
/// (≈ 64 · 1e-7 per logit, amplified by the projection through the normalization) bounds this
/// near 3e-5; the old `p_y − 1` is off by ~1e-7 / loss, i.e. by 100% at 1e-7.
const CONFIDENT_ROW_GRAD_TOL: f64 = 5e-5;

/// Logits of one embedding row against unit centers `wu` (clamped cosines).
fn row_logits(m: &Margin, e: &[f64], wu: &[f64], y: usize) -> Vec<f64> {
    let (x, _) = normalize_rows(e, e.len());
    wu.chunks_exact(e.len()).enumerate().map(|(j, w)| logit(m, dot(&x, w).clamp(-1.0, 1.0), j == y).0).collect()
}

fn try_confident(m: &Margin, c: usize, d: usize, seed: u64) -> Option<Data> {
    let mut rng = Rng(seed);
    let targets = confident_targets();
    let n = targets.len() + 1;
    // Small center norms, as a trained head's are (they start at N(0, 0.01)): an SGD step with
    // lr 1e4 moves them by more than their size, so W_before − W_after measures even the 1e-7
    // rows' center gradients to f32 precision.
    let mut w = Vec::with_capacity(c * d);
    for _ in 0..c {
        let scale = rng.range(0.05, 0.2);
        w.extend(unit_random(&mut rng, d).into_iter().map(|v| v * scale));
    }
    // Distinct targets, so each target class's gradient is its row's.
    let mut classes: Vec<usize> = (0..c).collect();
    rng.shuffle(&mut classes);
    let y = classes[..n].to_vec();
    let mut planted = Vec::new();
    if m.filter > 0.0 {
        // Competitors beside three confident rows' centers (cosine ≈ 0.85): the filter removes them
        // (z = 0), which is what keeps those rows confident.
        for (slot, &i) in [0usize, 7, 14].iter().enumerate() {
            let j = classes[n + slot];
            let (wy, _) = normalize_rows(&w[y[i] * d..(y[i] + 1) * d], d);
            let noise = unit_random(&mut rng, d);
            let dir: Vec<f64> = wy.iter().zip(&noise).map(|(u, r)| u + 0.5 * r).collect();
            let k = rng.range(0.05, 0.2) / norm(&dir);
            w[j * d..(j + 1) * d].iter_mut().zip(&dir).for_each(|(o, v)| *o = v * k);
            planted.push(j);
        }
    }
    let (wu, _) = normalize_rows(&w, d);
    let mut e = Vec::with_capacity(n * d);
    for i in 0..n {
        let wy = &wu[y[i] * d..(y[i] + 1) * d];
        let noise = unit_random(&mut rng, d);
        let scale = rng.range(0.5, 3.0);
        let embed = |a: f64| -> Vec<f64> { wy.iter().zip(&noise).map(|(u, r)| (a * u + r) * scale).collect() };
        let a = match targets.get(i) {
            Some(&want) => {
                // Bisection on a (the loss falls as the embedding turns towards its center); a ≤ 6
                // keeps the target cosine below 0.99.
                let f = |a: f64| {
                    let z = row_logits(m, &embed(a), &wu, y[i]);
                    row_softmax(&z, y[i], &mut vec![0.0; c]).ln() - want.ln()
                };
                let (mut lo, mut hi) = (0.0f64, 6.0f64);
                if !(f(lo) > 0.0 && f(hi) < 0.0) {
                    return None;
                }
                for _ in 0..60 {
                    let mid = 0.5 * (lo + hi);
                    if f(mid) > 0.0 {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                lo
            }
            // Pointing away from its center: the target logit is far from the row's max.
            None => -1.0,
        };
        e.extend(embed(a));
    }
    let e32: Vec<f32> = e.iter().map(|&v| v as f32).collect();
    let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    let p = Problem { n, c, d, e: e32.iter().map(|&v| v as f64).collect(), y: y.clone(), w: w32.iter().map(|&v| v as f64).collect() };
    // Away from the clamp and the filter threshold, as the other cases.
    let (x, _) = normalize_rows(&p.e, d);
    let cos = raw_cosines(&p, &x, &normalize_rows(&p.w, d).0);
    for i in 0..n {
        for j in 0..c {
            let v = cos[i * c + j];
            if v.abs() > 0.99 || (m.filter > 0.0 && j != y[i] && (v - m.filter).abs() < 1e-3) {
                return None;
            }
        }
    }
    let last = row_logits(m, &p.e[(n - 1) * d..], &normalize_rows(&p.w, d).0, y[n - 1]);
    assert!(last.iter().any(|&z| z > last[y[n - 1]] + 1.0), "the last row's target must not be its max");
    let labels = y.iter().map(|&v| v as i64).collect();
    Some(Data { p, e32, w32, labels, planted })
}

/// ‖got − want‖ / ‖want‖ over row `row` (of width `d`).
fn row_rel_err(got: &[f64], want: &[f64], d: usize, row: usize) -> f64 {
    rel_err64(&got[row * d..(row + 1) * d], &want[row * d..(row + 1) * d])
}

#[test]
fn confident_regime_matches_f64_model() {
    let (c, d) = (64, 64);
    let mut worst = (0.0f64, 0.0f64, 0.0f64);
    for filter in [false, true] {
        for exact in [false, true] {
            let m = margin_of(ARCFACE, 64.0, filter, exact);
            let data = (0..100).find_map(|k| try_confident(&m, c, d, 7000 + k)).expect("no valid confident data in 100 seeds");
            let p = &data.p;
            let want = model(&m, p, 1);
            let confident = confident_targets().len() - 1;
            let smallest = want.row_loss[..confident].iter().cloned().fold(f64::INFINITY, f64::min);
            let largest = want.row_loss[..confident].iter().cloned().fold(0.0, f64::max);
            assert!(smallest < 2e-7 && largest > 5e-3, "confident losses span only [{smallest:.1e}, {largest:.1e}]");
            for shards in [1usize, 3] {
                let tag = format!("confident filter={filter} exact={exact} shards={shards}");
                // Each sample's own loss: evaluate it alone, before the step changes the centers.
                let mut row_loss = Vec::new();
                let got = run_engine_with(&m, &data, shards, 1e4, |head| {
                    for i in 0..p.n {
                        let stats = head.evaluate(&data.e32[i * d..(i + 1) * d], &data.labels[i..i + 1], d, &even_split(1, shards));
                        row_loss.push(stats.loss);
                    }
                });
                let ge: Vec<f64> = got.grad_e.iter().map(|&v| v as f64 / shards as f64).collect();
                let mut line = Vec::new();
                #[allow(clippy::needless_range_loop)] // i indexes five per-row arrays alike
                for i in 0..p.n {
                    let l_err = (row_loss[i] - want.row_loss[i]).abs() / want.row_loss[i];
                    let e_err = row_rel_err(&ge, &want.grad_e, d, i);
                    let w_err = row_rel_err(&got.grad_w, &want.grad_w, d, p.y[i]);
                    line.push(format!("{:.0e}:{l_err:.1e}/{e_err:.1e}/{w_err:.1e}", want.row_loss[i]));
                    worst = (worst.0.max(l_err), worst.1.max(e_err), worst.2.max(w_err));
                    assert!(
                        l_err <= CONFIDENT_TOL && e_err <= CONFIDENT_ROW_GRAD_TOL && w_err <= CONFIDENT_ROW_GRAD_TOL,
                        "{tag}: row {i} (f64 loss {:.3e}): engine loss {:.6e} rel {l_err:.2e}, grad_e rel {e_err:.2e}, \
                         target center grad rel {w_err:.2e}",
                        want.row_loss[i],
                        row_loss[i]
                    );
                }
                let loss_err = (got.loss - want.loss).abs() / want.loss;
                let (e_all, w_all) = (rel_err64(&ge, &want.grad_e), rel_err64(&got.grad_w, &want.grad_w));
                assert!(
                    loss_err <= CONFIDENT_TOL && e_all <= CONFIDENT_TOL && w_all <= CONFIDENT_TOL,
                    "{tag}: mean loss rel {loss_err:.2e}, grad_e {e_all:.2e}, grad_w {w_all:.2e}"
                );
                println!("{tag}: mean loss rel {loss_err:.2e}, grad_e {e_all:.2e}, grad_w {w_all:.2e}");
                println!("{tag}: per row, f64 loss: loss/grad_e/target center grad rel err {}", line.join(" "));
            }
        }
    }
    println!("confident regime: worst per-row loss rel {:.2e}, grad_e rel {:.2e}, target center grad rel {:.2e}", worst.0, worst.1, worst.2);
}

// ---------------------------------------------------------------------------------------------
// The golden files' steps against the float64 model: each step from the reference's own centers
// before it, so that the engine and the reference are measured against the same exact answer.

#[test]
fn golden_steps_match_f64_model() {
    for g in Golden::all() {
        let (c, d, world) = (g.usize("num_classes"), g.usize("embedding_dim"), g.usize("world_size"));
        let m = Margin {
            s: g.f32_of("scale") as f64,
            m1: g.f32_of("m1") as f64,
            m2: g.f32_of("m2") as f64,
            m3: g.f32_of("m3") as f64,
            filter: g.f32_of("interclass_filtering_threshold") as f64,
            exact: false,
        };
        let mut cfg = g.pfc_config(world as u32);
        // A plain SGD step at lr 1e4 measures the center gradient (see `try_confident`).
        let lr = 1e4f32;
        (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) = (PFC_OPTIMIZER_SGD, lr, 0.0, 0.0);
        for t in 0..g.usize("steps") {
            let w32 = if t == 0 { g.f32("weight_init") } else { g.f32(&format!("weight.{}", t - 1)) };
            let e32 = g.f32(&format!("emb.{t}"));
            let labels = g.i64(&format!("labels.{t}"));
            let n = labels.len();
            let p = Problem {
                n,
                c,
                d,
                e: e32.iter().map(|&v| v as f64).collect(),
                y: labels.iter().map(|&v| v as usize).collect(),
                w: w32.iter().map(|&v| v as f64).collect(),
            };
            let want = model(&m, &p, world);
            let head = TestHead::new(&cfg);
            head.set_centers(&w32);
            // Each sample's loss alone, where a small one would not be hidden by the mean.
            let (mut row_worst, mut row_smallest) = (0.0f64, f64::INFINITY);
            for i in 0..n {
                let got = head.evaluate(&e32[i * d..(i + 1) * d], &labels[i..i + 1], d, &even_split(1, world)).loss;
                row_worst = row_worst.max((got - want.row_loss[i]).abs() / want.row_loss[i]);
                row_smallest = row_smallest.min(want.row_loss[i]);
            }
            let (stats, grad_e) = head.step(&e32, &labels, d, &even_split(n, world));
            let grad_w: Vec<f64> = w32.iter().zip(&head.centers(d)).map(|(&b, &a)| (b as f64 - a as f64) / lr as f64).collect();
            let ge: Vec<f64> = grad_e.iter().map(|&v| v as f64).collect();
            let (loss_err, e_err, w_err) =
                ((stats.loss - want.loss).abs() / want.loss, rel_err64(&ge, &want.grad_e), rel_err64(&grad_w, &want.grad_w));
            let ref_loss = g.f32(&format!("loss.{t}"))[0] as f64;
            let ref_ge: Vec<f64> = g.f32(&format!("grad_emb.{t}")).iter().map(|&v| v as f64).collect();
            let (ref_loss_err, ref_e_err) = ((ref_loss - want.loss).abs() / want.loss, rel_err64(&ref_ge, &want.grad_e));
            println!(
                "{} step {t}: f64 loss {:.4e} (smallest sample {row_smallest:.2e}); engine vs f64: loss {loss_err:.2e}, \
                 worst sample {row_worst:.2e}, grad_e {e_err:.2e}, grad_w {w_err:.2e}; reference vs f64: loss {ref_loss_err:.2e}, \
                 grad_e {ref_e_err:.2e}",
                g.name, want.loss
            );
            assert!(
                loss_err <= CONFIDENT_TOL && row_worst <= CONFIDENT_TOL && e_err <= CONFIDENT_TOL && w_err <= CONFIDENT_TOL,
                "{} step {t}: engine vs f64 model: loss {loss_err:.2e}, worst sample {row_worst:.2e}, grad_e {e_err:.2e}, grad_w {w_err:.2e}",
                g.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// bf16 storage (SPEC §2 storage_dtype): several SGD-momentum steps of the engine storing bf16,
// against the model stepping in float64 and storing each updated center and momentum value
// rounded the documented way — up with probability equal to the discarded fraction, the 16 random
// bits from (seed, step, class, tensor, element) — decided on the float64 value.

/// `x` (float64) stored as bf16 with the 16 random bits `r`: the magnitude rounds up where the
/// discarded fraction of a bf16 step, in 2^-16 units, plus r reaches a whole step.
fn stochastic_bf16(x: f64, r: u32) -> f64 {
    let mag = x.abs();
    let mut lo = f32::from_bits((mag as f32).to_bits() & 0xFFFF_0000);
    if lo as f64 > mag {
        lo = f32::from_bits(lo.to_bits() - 0x1_0000);
    }
    let hi = f32::from_bits(lo.to_bits() + 0x1_0000) as f64;
    let frac = (mag - lo as f64) / (hi - lo as f64);
    let up = frac * 65536.0 + r as f64 >= 65536.0;
    (if up { hi } else { lo as f64 }).copysign(x)
}

/// The 16 random bits that round `element` of `tensor`'s row of `class` at optimizer step `step`.
fn rounding_bits(seed: u64, step: u64, class: usize, tensor: partialfc::state::StateTensor, d: usize, element: usize) -> u32 {
    use partialfc::storage::{draw_index, step_stream};
    let draw = partialfc::rng::at(step_stream(seed, step), draw_index(class as u64, tensor, d, element));
    ((draw >> (16 * (element % 4))) & 0xFFFF) as u32
}

#[test]
fn bf16_storage_matches_a_float64_model_that_rounds_the_same_way() {
    use partialfc::state::StateTensor;
    let (c, d, n, steps, seed) = (36usize, 20usize, 16usize, 6u64, 23u64);
    let (lr, momentum, wd) = (0.5f64, 0.9f64, 5e-4f64);
    let m = margin_of((1.0, 0.5, 0.0), 64.0, false, false);
    let mut cfg = default_config();
    cfg.num_classes = c as u64;
    cfg.embedding_dim = d as u32;
    cfg.lr = lr as f32;
    cfg.momentum = momentum as f32;
    cfg.weight_decay = wd as f32;
    cfg.seed = seed;
    cfg.local_shards = 2;
    cfg.storage_dtype = PFC_DTYPE_BF16;
    let head = TestHead::new(&cfg);
    let mut w: Vec<f64> = head.centers(d).iter().map(|&v| v as f64).collect();
    let mut buf = vec![0.0f64; c * d];
    let mut rng = Rng(seed);
    let (mut same, mut total, mut worst_steps) = (0usize, 0usize, 0u32);
    for step in 0..steps {
        let e32: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let y: Vec<usize> = (0..n).map(|_| rng.below(c as u64) as usize).collect();
        let labels: Vec<i64> = y.iter().map(|&v| v as i64).collect();
        let p = Problem { n, c, d, e: e32.iter().map(|&v| v as f64).collect(), y, w: w.clone() };
        let want = model(&m, &p, 2);
        let (stats, _) = head.step(&e32, &labels, d, &even_split(n, 2));
        assert!((stats.loss - want.loss).abs() <= 1e-5 * want.loss, "step {step}: loss {} vs the model's {}", stats.loss, want.loss);
        for j in 0..c {
            for k in 0..d {
                let i = j * d + k;
                let b = momentum * buf[i] + want.grad_w[i] + wd * w[i];
                buf[i] = stochastic_bf16(b, rounding_bits(seed, step, j, StateTensor::Momentum, d, k));
                w[i] = stochastic_bf16(w[i] - lr * b, rounding_bits(seed, step, j, StateTensor::Centers, d, k));
            }
        }
        let got = head.centers(d);
        for (&g, &x) in got.iter().zip(&w) {
            total += 1;
            if g as f64 == x {
                same += 1;
            } else {
                // Apart by whole bf16 steps: the f32 arithmetic put the value on the other side of
                // its rounding threshold, and the row's later steps followed from there.
                let steps_apart = (g.to_bits() as i64 - (x as f32).to_bits() as i64).unsigned_abs() >> 16;
                worst_steps = worst_steps.max(steps_apart as u32);
            }
        }
        // Both continue from what they store: the model from its own values, as the engine.
    }
    let share = same as f64 / total as f64;
    eprintln!("bf16 storage vs float64 model: {same} of {total} stored values identical ({share:.5}), others at most {worst_steps} bf16 steps apart");
    assert!(share >= 0.995, "only {same} of {total} stored values are the model's");
    assert!(worst_steps <= 4, "a value {worst_steps} bf16 steps from the model's");
}
