//! The step split in the C ABI: `pfc_train_compute` (forward + backward, gradients accumulated),
//! `pfc_train_apply` (one optimizer step), `pfc_train_discard`; `pfc_train_step` is compute +
//! apply. And non-finite steps (issue #11 item 1, SPEC §2b): PFC_ERR_NON_FINITE with nothing
//! changed — centers, optimizer state, step count and outputs — including a long randomized run at
//! aggressive learning rates.

use crate::common::*;
use partialfc::ffi::*;

const D: usize = 16;

fn config(classes: u64, rate: f32, shards: u32) -> pfc_config {
    let mut c = default_config();
    c.num_classes = classes;
    c.embedding_dim = D as u32;
    c.sample_rate = rate;
    c.local_shards = shards;
    c.seed = 5;
    c
}

/// A batch with its own gradient buffer; `grad` starts as a sentinel so that writes show.
struct Batch {
    emb: Vec<f32>,
    labels: Vec<i64>,
    grad: Vec<f32>,
    rows: Vec<usize>,
}

impl Batch {
    fn random(rng: &mut Rng, classes: u64, rows: &[usize]) -> Batch {
        let n: usize = rows.iter().sum();
        let emb = (0..n * D).map(|_| rng.normal() as f32).collect();
        let labels = (0..n).map(|_| rng.below(classes) as i64).collect();
        Batch { emb, labels, grad: vec![f32::from_bits(0x7fc0_1234); n * D], rows: rows.to_vec() }
    }

    fn c_batches(&mut self) -> Vec<pfc_batch> {
        let mut out = Vec::new();
        let mut at = 0;
        for &r in &self.rows {
            out.push(pfc_batch {
                embeddings: self.emb[at * D..].as_ptr().cast(),
                labels: self.labels[at..].as_ptr(),
                grad_embeddings: self.grad[at * D..].as_mut_ptr().cast(),
                batch_size: r as u64,
                dtype: PFC_DTYPE_F32,
                memory: PFC_MEMORY_HOST,
                stream: std::ptr::null_mut(),
            });
            at += r;
        }
        out
    }

    fn run(&mut self, f: extern "C" fn(*mut pfc_head, *const pfc_batch, u32, *mut pfc_step_stats) -> pfc_status, h: &TestHead) -> (pfc_status, pfc_step_stats) {
        let b = self.c_batches();
        let mut st = pfc_step_stats { loss: -7.0, accuracy: -7.0, step: 777, global_batch: 777, sampled_classes: 777 };
        let status = f(h.0, b.as_ptr(), b.len() as u32, &mut st);
        (status, st)
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn compute_then_apply_is_a_train_step() {
    for adamw in [false, true] {
        let mut cfg = config(503, 0.3, 2);
        if adamw {
            cfg.optimizer = PFC_OPTIMIZER_ADAMW;
            cfg.lr = 0.01;
        }
        let (a, b) = (TestHead::new(&cfg), TestHead::new(&cfg));
        let mut rng = Rng(3);
        for t in 0..4 {
            let mut x = Batch::random(&mut rng, 503, &[5, 7]);
            let mut y = Batch { grad: x.grad.clone(), emb: x.emb.clone(), labels: x.labels.clone(), rows: x.rows.clone() };
            let (sa, ta) = x.run(pfc_train_step, &a);
            ok(sa);
            let (sb, tb) = y.run(pfc_train_compute, &b);
            ok(sb);
            assert_eq!(tb.step, t, "compute does not advance the step count");
            ok(pfc_train_apply(b.0));
            assert_eq!(ta.step, t + 1);
            assert_eq!((ta.loss.to_bits(), ta.accuracy.to_bits(), ta.global_batch, ta.sampled_classes), (tb.loss.to_bits(), tb.accuracy.to_bits(), tb.global_batch, tb.sampled_classes));
            assert_eq!(bits(&x.grad), bits(&y.grad), "adamw={adamw} step {t}: gradients");
            assert_eq!(bits(&a.centers(D)), bits(&b.centers(D)), "adamw={adamw} step {t}: centers");
        }
    }
}

/// With plain SGD (no momentum, no weight decay) an update is −lr × the gradient, so two computes
/// then one apply must move the centers by the sum of what each compute alone moves them: the
/// accumulation runs over the union of the computes' sampled rows.
#[test]
fn computes_accumulate_over_the_union_of_sampled_rows() {
    let mut cfg = config(401, 0.2, 2);
    cfg.momentum = 0.0;
    cfg.weight_decay = 0.0;
    cfg.lr = 0.5;
    let mut rng = Rng(9);
    let mut x = Batch::random(&mut rng, 401, &[6, 3]);
    let mut y = Batch::random(&mut rng, 401, &[2, 8]);
    let both = TestHead::new(&cfg);
    let init = both.centers(D);
    ok(x.run(pfc_train_compute, &both).0);
    ok(y.run(pfc_train_compute, &both).0);
    ok(pfc_train_apply(both.0));
    let delta = |h: &TestHead| -> Vec<f32> { h.centers(D).iter().zip(&init).map(|(a, b)| a - b).collect() };
    let moved_rows = |v: &[f32]| -> Vec<usize> { v.chunks(D).enumerate().filter(|(_, r)| r.iter().any(|&x| x != 0.0)).map(|(i, _)| i).collect() };
    let moved = delta(&both);
    let mut want = vec![0f32; init.len()];
    let mut union = std::collections::BTreeSet::new();
    let mut single = Vec::new();
    for batch in [&mut x, &mut y] {
        let alone = TestHead::new(&cfg);
        ok(batch.run(pfc_train_step, &alone).0);
        let d = delta(&alone);
        let rows = moved_rows(&d);
        single.push(rows.len());
        union.extend(rows);
        want.iter_mut().zip(&d).for_each(|(w, v)| *w += v);
    }
    let e = rel_err(&moved, &want);
    assert!(e < 1e-5, "accumulated update differs from the sum of single updates: rel err {e}");
    // Exactly the rows either compute sampled moved, more than either alone.
    assert_eq!(moved_rows(&moved), union.into_iter().collect::<Vec<_>>());
    assert!(moved_rows(&moved).len() > single[0].max(single[1]), "{single:?}");
}

#[test]
fn apply_needs_gradients_and_discard_drops_them() {
    let cfg = config(300, 0.5, 1);
    let h = TestHead::new(&cfg);
    let init = h.centers(D);
    assert_eq!(pfc_train_apply(h.0), PFC_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("pfc_train_compute"), "{}", last_error());
    let mut rng = Rng(1);
    let mut x = Batch::random(&mut rng, 300, &[9]);
    ok(x.run(pfc_train_compute, &h).0);
    ok(pfc_train_discard(h.0));
    assert_eq!(pfc_train_apply(h.0), PFC_ERR_INVALID_ARGUMENT);
    assert_eq!(bits(&h.centers(D)), bits(&init));
    assert_eq!(pfc_train_apply(std::ptr::null_mut()), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_train_discard(std::ptr::null_mut()), PFC_ERR_NULL_ARGUMENT);
    // The next step is the head's first.
    let (s, st) = x.run(pfc_train_step, &h);
    ok(s);
    assert_eq!(st.step, 1);
}

/// Everything observable about a head: centers, and how it continues (a twin that never saw the
/// failed call must stay bit-identical, which covers optimizer state and the step count).
fn snapshot(h: &TestHead) -> Vec<u32> {
    bits(&h.centers(D))
}

/// A host that lowers its learning rate after PFC_ERR_NON_FINITE, as mixed-precision trainers do.
fn diverge(cfg: &pfc_config, steps: usize, seed: u64, lrs: &[f32]) -> (usize, usize) {
    let (h, twin) = (TestHead::new(cfg), TestHead::new(cfg));
    let mut rng = Rng(seed);
    let (mut ok_steps, mut refused) = (0, 0);
    for t in 0..steps {
        if rng.below(50) == 0 {
            let lr = lrs[rng.below(lrs.len() as u64) as usize];
            ok(pfc_set_learning_rate(h.0, lr));
            ok(pfc_set_learning_rate(twin.0, lr));
        }
        let shards = cfg.local_shards as usize;
        let rows: Vec<usize> = (0..shards).map(|_| 1 + rng.below(6) as usize).collect();
        let mut x = Batch::random(&mut rng, cfg.num_classes, &rows);
        let sentinel = bits(&x.grad);
        let before = snapshot(&h);
        let (status, st) = x.run(pfc_train_step, &h);
        match status {
            PFC_OK => {
                assert!(st.loss.is_finite() && st.accuracy.is_finite(), "step {t}: OK with loss {}", st.loss);
                assert!(x.grad.iter().all(|g| g.is_finite()), "step {t}: OK with a non-finite gradient");
                assert!(h.centers(D).iter().all(|c| c.is_finite()), "step {t}: OK with non-finite centers");
                let mut y = Batch { grad: sentinel.iter().map(|&b| f32::from_bits(b)).collect(), emb: x.emb.clone(), labels: x.labels.clone(), rows };
                let (s2, st2) = y.run(pfc_train_step, &twin);
                ok(s2);
                assert_eq!(st.step, st2.step);
                assert_eq!(bits(&x.grad), bits(&y.grad), "step {t}: the twin's gradients differ");
                ok_steps += 1;
            }
            PFC_ERR_NON_FINITE => {
                assert!(last_error().contains("NaN or Inf"), "{}", last_error());
                assert_eq!(snapshot(&h), before, "step {t}: a refused step changed centers");
                assert_eq!(bits(&x.grad), sentinel, "step {t}: a refused step wrote gradients");
                assert_eq!((st.step, st.loss), (777, -7.0), "step {t}: a refused step wrote its stats");
                refused += 1;
                ok(pfc_set_learning_rate(h.0, lrs[0]));
                ok(pfc_set_learning_rate(twin.0, lrs[0]));
            }
            other => panic!("step {t}: status {other}: {}", last_error()),
        }
        if t % 64 == 0 {
            assert_eq!(snapshot(&h), snapshot(&twin), "step {t}: the head and its twin diverged");
        }
    }
    assert_eq!(snapshot(&h), snapshot(&twin));
    (ok_steps, refused)
}

/// Issue #11's settings: AdamW lr 1e3 with weight decay 1e-2; SGD lr 1e4, weight decay 0.5,
/// momentum 1. Every step is OK with finite outputs or PFC_ERR_NON_FINITE with nothing changed.
#[test]
fn divergent_settings_are_refused_and_change_nothing() {
    let mut adamw = config(97, 0.5, 2);
    adamw.optimizer = PFC_OPTIMIZER_ADAMW;
    adamw.weight_decay = 1e-2;
    let mut sgd = config(97, 0.5, 2);
    sgd.weight_decay = 0.5;
    sgd.momentum = 1.0;
    for (name, cfg, lr) in [("adamw", adamw, 1e3f32), ("sgd", sgd, 1e4f32)] {
        let (good, refused) = diverge(&cfg, 400, 17, &[lr]);
        eprintln!("{name}: {good} steps OK, {refused} refused");
        assert!(refused > 0, "{name}: no step was refused at lr {lr}");
    }
}

/// Thousands of steps at randomly switched aggressive learning rates and both optimizers, shard
/// counts and sample rates: the head never holds a NaN and never diverges from a twin that skips
/// the refused steps.
#[test]
fn long_randomized_run_never_goes_non_finite() {
    let mut total = (0, 0);
    for (i, (adamw, shards, rate)) in [(false, 1, 1.0f32), (true, 2, 0.5), (false, 3, 0.25), (true, 1, 0.1)].into_iter().enumerate() {
        let mut cfg = config(61, rate, shards);
        if adamw {
            cfg.optimizer = PFC_OPTIMIZER_ADAMW;
            cfg.weight_decay = 1e-2;
        } else {
            cfg.momentum = 1.0;
            cfg.weight_decay = 0.5;
        }
        let lrs: &[f32] = if adamw { &[1e3, 1e2, 1.0, 1e-2] } else { &[1e4, 1e3, 10.0, 0.1] };
        let (good, refused) = diverge(&cfg, 4000, 100 + i as u64, lrs);
        total = (total.0 + good, total.1 + refused);
    }
    eprintln!("{} steps OK, {} refused", total.0, total.1);
    assert!(total.0 > 1000 && total.1 > 10, "{total:?}");
}
