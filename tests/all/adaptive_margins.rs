//! The adaptive margins of SPEC §1.6a through the C ABI (issue #25): their configuration, their
//! running statistics (moved only by training steps that succeed, checkpointed with the margin
//! kind). Their arithmetic against the authors' heads is tests/all/golden.rs; on the CUDA backend,
//! tests/all/gpu_margins.rs.

use crate::common::*;
use partialfc::ffi::*;
use std::ffi::CString;

fn adaptive(kind: i32, c: u64, d: usize) -> pfc_config {
    let mut cfg = default_config();
    cfg.num_classes = c;
    cfg.embedding_dim = d as u32;
    cfg.margin_kind = kind;
    cfg
}

fn adaface(c: u64, d: usize) -> pfc_config {
    adaptive(PFC_MARGIN_ADAFACE, c, d)
}

fn create(cfg: &pfc_config) -> (pfc_status, String) {
    let mut h = std::ptr::null_mut();
    let status = pfc_create(cfg, &mut h);
    if status == PFC_OK {
        drop(TestHead(h));
        return (status, String::new());
    }
    assert!(h.is_null(), "a failed create wrote its output");
    (status, last_error())
}

/// Rows of norms spread over [1, 30], so that AdaFace's margins differ by row.
pub(crate) fn batch(c: u64, d: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng(seed);
    let mut e = Vec::with_capacity(n * d);
    for _ in 0..n {
        let scale = rng.range(1.0, 30.0) as f32;
        e.extend((0..d).map(|_| rng.normal() as f32 * scale / (d as f32).sqrt()));
    }
    (e, (0..n).map(|_| rng.below(c) as i64).collect())
}

#[test]
fn adaface_refuses_the_combined_margins_options_and_parameters_out_of_range() {
    let base = adaface(100, 8);
    assert_eq!(create(&base).0, PFC_OK, "{}", create(&base).1);
    type Spoil = fn(&mut pfc_config);
    let cases: [(&str, Spoil); 10] = [
        ("m1", |c| c.m1 = 1.2),
        ("m2", |c| c.m2 = 0.3),
        ("m3", |c| c.m3 = 0.1),
        ("interclass_filter", |c| c.interclass_filter = 0.2),
        ("margin_grad", |c| c.margin_grad = PFC_MARGIN_GRAD_EXACT),
        ("arcface_fallback", |c| c.arcface_fallback = 1),
        ("adaface_h", |c| c.adaface_h = 0.0),
        ("adaface_t_alpha", |c| c.adaface_t_alpha = 1.5),
        ("margin_m", |c| c.margin_m = -0.2),
        ("margin_kind", |c| c.margin_kind = 7),
    ];
    for (field, spoil) in cases {
        let mut cfg = base;
        spoil(&mut cfg);
        let (status, message) = create(&cfg);
        assert_eq!(status, PFC_ERR_INVALID_ARGUMENT, "{field}: {message}");
        assert!(message.starts_with(field), "{field}: {message}");
    }
}

/// Evaluation, a batch refused as bad input and a step refused as non-finite leave the statistics
/// as they were. The non-finite step: a center of norm 4e18 (below 2^62) that an update at lr 1e4
/// with the head's weight decay of 0.5 would take past what normalizes in f32. The head is left as
/// it was, at learning rate `lr`.
fn refusals_leave_the_statistics(head: &TestHead, e: &[f32], l: &[i64], d: usize, lr: f32) {
    let (initial, n) = (head.margin_state(), l.len());
    head.evaluate(e, l, d, &[n]);
    assert_eq!(head.margin_state(), initial, "evaluation updated the statistics");
    let mut bad = e.to_vec();
    bad[5] = f32::NAN;
    let mut grad = vec![0f32; n * d];
    let b = host_batches(&bad, l, &mut grad, d, &[n]);
    assert_eq!(pfc_train_step(head.0, b.as_ptr(), 1, std::ptr::null_mut()), PFC_ERR_INVALID_ARGUMENT);
    assert_eq!(head.margin_state(), initial, "a refused batch updated the statistics");
    let centers = head.centers(d);
    let mut huge = centers.clone();
    huge[..d].iter_mut().for_each(|v| *v = 1e18);
    head.set_centers(&huge);
    ok(pfc_set_learning_rate(head.0, 1e4));
    let b = host_batches(e, l, &mut grad, d, &[n]);
    assert_eq!(pfc_train_step(head.0, b.as_ptr(), 1, std::ptr::null_mut()), PFC_ERR_NON_FINITE, "{}", last_error());
    assert_eq!(head.margin_state(), initial, "a step refused as non-finite updated the statistics");
    head.set_centers(&centers);
    ok(pfc_set_learning_rate(head.0, lr));
}

/// The running statistics start at the authors' 20 and 100; evaluation and refused steps leave
/// them; each successful training step, compute included, folds its global batch in with weight
/// t_alpha, the same on every shard count.
#[test]
fn adaface_statistics_move_only_with_successful_training_steps() {
    let (c, d, n) = (300u64, 16usize, 24usize);
    let mut cfg = adaface(c, d);
    cfg.adaface_t_alpha = 0.25;
    cfg.weight_decay = 0.5;
    let head = TestHead::new(&cfg);
    assert_eq!(head.margin_state(), vec![20.0, 100.0]);
    let (e, l) = batch(c, d, n, 3);
    refusals_leave_the_statistics(&head, &e, &l, d, cfg.lr);
    let mut grad = vec![0f32; n * d];
    let norms: Vec<f64> = e.chunks(d).map(|r| r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt().clamp(0.001, 100.0)).collect();
    let mean = norms.iter().sum::<f64>() / n as f64;
    let std = (norms.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64).sqrt();
    let (mut want_mean, mut want_std) = (20.0f64, 100.0f64);
    for step in 0..2 {
        // A compute before the step's apply: a training forward pass of its own.
        let b = host_batches(&e, &l, &mut grad, d, &[n]);
        let call = if step == 0 { pfc_train_compute } else { pfc_train_step };
        ok(call(head.0, b.as_ptr(), 1, std::ptr::null_mut()));
        want_mean = 0.25 * mean + 0.75 * want_mean;
        want_std = 0.25 * std + 0.75 * want_std;
        let got = head.margin_state();
        assert!((got[0] as f64 - want_mean).abs() <= 1e-5 * want_mean && (got[1] as f64 - want_std).abs() <= 1e-5 * want_std, "step {step}: {got:?} vs [{want_mean}, {want_std}]");
    }
    // Three shards see the same global batch, hence the same statistics.
    cfg.local_shards = 3;
    let sharded = TestHead::new(&cfg);
    let b = host_batches(&e, &l, &mut grad, d, &even_split(n, 3));
    ok(pfc_train_step(sharded.0, b.as_ptr(), 3, std::ptr::null_mut()));
    let mut one = cfg;
    one.local_shards = 1;
    let single = TestHead::new(&one);
    single.step(&e, &l, d, &[n]);
    assert_eq!(sharded.margin_state(), single.margin_state());
}

/// A checkpoint keeps the running statistics and the margin kind: loaded into a new head of the
/// same margin, on one shard or resharded over three, they come back exactly; a head of another
/// margin refuses it as incompatible, and keeps its own.
#[test]
fn checkpoints_keep_the_statistics_and_refuse_another_margin() {
    let (c, d, n) = (200u64, 8usize, 16usize);
    for (kind, name, other_kind) in [(PFC_MARGIN_ADAFACE, "adaface", PFC_MARGIN_COMBINED), (PFC_MARGIN_CURRICULAR, "curricular", PFC_MARGIN_ADAFACE)] {
        let cfg = adaptive(kind, c, d);
        let head = TestHead::new(&cfg);
        let (e, l) = batch(c, d, n, 9);
        head.step(&e, &l, d, &[n]);
        let saved = head.margin_state();
        let dir = crate::native::scratch(&format!("{name}-checkpoint"));
        let path = CString::new(dir.join("ckpt").to_str().unwrap()).unwrap();
        ok(pfc_save_checkpoint(head.0, path.as_ptr()));
        head.step(&e, &l, d, &[n]);
        assert_ne!(head.margin_state(), saved, "{name}");
        let fresh = TestHead::new(&cfg);
        ok(pfc_load_checkpoint(fresh.0, path.as_ptr()));
        assert_eq!(fresh.margin_state(), saved, "{name}");
        // Resharded: three shards load the one shard's checkpoint and go on as it does.
        let resharded = TestHead::new(&pfc_config { local_shards: 3, ..cfg });
        ok(pfc_load_checkpoint(resharded.0, path.as_ptr()));
        assert_eq!(resharded.margin_state(), saved, "{name}");
        fresh.step(&e, &l, d, &[n]);
        resharded.step(&e, &l, d, &even_split(n, 3));
        assert_eq!(resharded.margin_state(), fresh.margin_state(), "{name}: the step after a resharded load");
        let other = TestHead::new(&adaptive(other_kind, c, d));
        let before = other.margin_state();
        assert_eq!(pfc_load_checkpoint(other.0, path.as_ptr()), PFC_ERR_INCOMPATIBLE, "{name}");
        assert!(last_error().contains(name), "{}", last_error());
        assert_eq!(other.margin_state(), before, "{name}");
    }
}

/// CurricularFace's t starts at 0; evaluation and refused steps leave it; each successful training
/// step, compute included, folds in the mean target cosine of its global batch with weight 0.01
/// (the cosines of the centers before the step's update), the same on every shard count.
#[test]
fn curricular_t_moves_only_with_successful_training_steps() {
    let (c, d, n) = (300u64, 16usize, 24usize);
    let mut cfg = adaptive(PFC_MARGIN_CURRICULAR, c, d);
    cfg.weight_decay = 0.5;
    let head = TestHead::new(&cfg);
    assert_eq!(head.margin_state(), vec![0.0]);
    let (e, l) = batch(c, d, n, 5);
    refusals_leave_the_statistics(&head, &e, &l, d, cfg.lr);
    let mut grad = vec![0f32; n * d];
    let mut want = 0.0f64;
    for step in 0..3 {
        let w = head.centers(d);
        let cosines: Vec<f64> = e
            .chunks(d)
            .zip(&l)
            .map(|(x, &y)| {
                let wy = &w[y as usize * d..(y as usize + 1) * d];
                let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>();
                dot(x, wy) / (dot(x, x).sqrt() * dot(wy, wy).sqrt())
            })
            .collect();
        want = 0.01 * cosines.iter().sum::<f64>() / n as f64 + 0.99 * want;
        let b = host_batches(&e, &l, &mut grad, d, &[n]);
        let call = if step == 0 { pfc_train_compute } else { pfc_train_step };
        ok(call(head.0, b.as_ptr(), 1, std::ptr::null_mut()));
        let got = head.margin_state()[0] as f64;
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1e-3), "step {step}: t = {got}, want {want}");
    }
    let mut three = cfg;
    three.local_shards = 3;
    let sharded = TestHead::new(&three);
    let single = TestHead::new(&cfg);
    for _ in 0..2 {
        let b = host_batches(&e, &l, &mut grad, d, &even_split(n, 3));
        ok(pfc_train_step(sharded.0, b.as_ptr(), 3, std::ptr::null_mut()));
        single.step(&e, &l, d, &[n]);
    }
    assert_eq!(sharded.margin_state(), single.margin_state());
}

/// The adaptive kinds' own fields beside a kind that does not take them are refused naming the
/// field (a `margin_m` meant for ArcFace would otherwise be ignored without a word).
#[test]
fn fields_of_another_margin_kind_are_refused_by_name() {
    type Case = (i32, &'static str, fn(&mut pfc_config));
    let cases: [Case; 4] = [
        (PFC_MARGIN_COMBINED, "margin_m", |c| c.margin_m = 0.7),
        (PFC_MARGIN_COMBINED, "adaface_t_alpha", |c| c.adaface_t_alpha = 5.0),
        (PFC_MARGIN_CURRICULAR, "adaface_h", |c| c.adaface_h = 0.9),
        (PFC_MARGIN_CURRICULAR, "adaface_t_alpha", |c| c.adaface_t_alpha = -3.0),
    ];
    for (kind, field, set) in cases {
        let mut cfg = adaptive(kind, 100, 8);
        set(&mut cfg);
        let (status, message) = create(&cfg);
        assert_eq!(status, PFC_ERR_INVALID_ARGUMENT, "{field} beside kind {kind}: {message}");
        assert!(message.starts_with(field) && message.contains("default"), "{message}");
    }
    let mut curricular = adaptive(PFC_MARGIN_CURRICULAR, 100, 8);
    curricular.margin_m = 0.3;
    assert_eq!(create(&curricular).0, PFC_OK, "CurricularFace takes margin_m");
}

/// Statistics the running updates cannot reach are refused where they enter, and change nothing:
/// a CurricularFace t beyond [−1, 1] (3e38 made every later step non-finite; −50 flipped the hard
/// negatives' weight), an AdaFace standard deviation below 0 or mean outside the norm clip.
#[test]
fn unreachable_statistics_are_refused() {
    for (kind, bad) in [
        (PFC_MARGIN_CURRICULAR, vec![3e38f32]),
        (PFC_MARGIN_CURRICULAR, vec![-50.0]),
        (PFC_MARGIN_ADAFACE, vec![20.0, -100.0]),
        (PFC_MARGIN_ADAFACE, vec![1000.0, 10.0]),
    ] {
        let head = TestHead::new(&adaptive(kind, 100, 8));
        let before = head.margin_state();
        assert_eq!(pfc_set_margin_state(head.0, bad.as_ptr(), bad.len() as u32), PFC_ERR_INVALID_ARGUMENT, "{bad:?}");
        assert!(last_error().contains("outside what they can reach"), "{}", last_error());
        assert_eq!(head.margin_state(), before, "{bad:?}");
    }
}

/// `pfc_margin_state`'s pointers and capacity: a NULL `len`, or a NULL `out` with room asked for,
/// is refused and writes nothing; capacity 0 asks the count; a short capacity gets the first values.
#[test]
fn margin_state_checks_its_pointers_and_honours_its_capacity() {
    let head = TestHead::new(&adaface(50, 4));
    let mut out = [-1f32; 2];
    let mut len = 99u32;
    assert_eq!(pfc_margin_state(head.0, out.as_mut_ptr(), 2, std::ptr::null_mut()), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_margin_state(head.0, std::ptr::null_mut(), 2, &mut len), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_margin_state(std::ptr::null(), out.as_mut_ptr(), 2, &mut len), PFC_ERR_NULL_ARGUMENT);
    assert_eq!((len, out), (99, [-1.0, -1.0]), "a refused call wrote its outputs");
    ok(pfc_margin_state(head.0, std::ptr::null_mut(), 0, &mut len));
    assert_eq!(len, 2);
    ok(pfc_margin_state(head.0, out.as_mut_ptr(), 1, &mut len));
    assert_eq!((len, out), (2, [20.0, -1.0]));
}
