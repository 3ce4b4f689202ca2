//! Finite but extreme values (SPEC §2b, issue 11 items 3 and 11): rows whose norm cannot be formed
//! in f32 are refused where they enter — centers (pfc_set_centers) and embeddings (steps,
//! evaluation) — so evaluation, steps and search never report NaN; rows of any norm below that
//! limit, zero rows included, work with finite results; search scores are cosines whatever the
//! queries' norm (a zero query scores 0 everywhere).

use crate::common::*;
use partialfc::ffi::*;

const C: u64 = 12;
const D: usize = 8;
const N: usize = 6;
/// The largest row norm the library accepts (2^62: its square, 2^124, leaves 16× headroom below
/// f32's maximum for any summation order).
const LIMIT: f64 = 4.611_686_018_427_388e18;

fn config() -> pfc_config {
    let mut c = default_config();
    c.num_classes = C;
    c.embedding_dim = D as u32;
    c.local_shards = 2;
    c.seed = 9;
    c
}

fn embeddings(seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..N * D).map(|_| r.normal() as f32).collect()
}

fn labels() -> Vec<i64> {
    (0..N as i64).map(|i| (i * 5) % C as i64).collect()
}

/// The two shards' batches, of 4 and 2 rows.
fn batches(emb: &[f32], labels: &[i64], grad: &mut [f32]) -> Vec<pfc_batch> {
    host_batches(emb, labels, grad, D, &[4, 2])
}

fn evaluate(h: &TestHead, emb: &[f32]) -> (pfc_status, pfc_step_stats) {
    let (l, mut g) = (labels(), vec![0f32; N * D]);
    let b = batches(emb, &l, &mut g);
    let mut stats = pfc_step_stats::default();
    let s = pfc_evaluate(h.0, b.as_ptr(), 2, &mut stats);
    (s, stats)
}

fn train(h: &TestHead, emb: &[f32]) -> (pfc_status, pfc_step_stats, Vec<f32>) {
    let (l, mut g) = (labels(), vec![0f32; N * D]);
    let b = batches(emb, &l, &mut g);
    let mut stats = pfc_step_stats::default();
    let s = pfc_train_step(h.0, b.as_ptr(), 2, &mut stats);
    (s, stats, g)
}

fn search(h: &TestHead, queries: &[f32], k: u32) -> (pfc_status, Vec<i64>, Vec<f32>) {
    let n = queries.len() / D;
    let (mut ids, mut scores) = (vec![-7i64; n * k as usize], vec![-7f32; n * k as usize]);
    let s = pfc_search(h.0, queries.as_ptr(), n as u64, k, ids.as_mut_ptr(), scores.as_mut_ptr());
    (s, ids, scores)
}

/// Centers with row `row` replaced by `value` in every coordinate.
fn with_row(h: &TestHead, row: usize, value: f32) -> Vec<f32> {
    let mut c = h.centers(D);
    c[row * D..(row + 1) * D].iter_mut().for_each(|v| *v = value);
    c
}

#[test]
fn set_centers_refuses_rows_that_cannot_be_normalized() {
    let h = TestHead::new(&config());
    let before = h.centers(D);
    // 1e19 × √8 ≈ 2.8e19: its squared norm overflows f32. 3e38: the value. Also a single
    // enormous coordinate among ordinary ones, on the second shard.
    for (row, value) in [(0usize, 3e38f32), (3, -3e38), (7, 1e19), (11, 2e18)] {
        let bad = with_row(&h, row, value);
        let s = pfc_set_centers(h.0, 0, C, bad.as_ptr());
        assert_eq!(s, PFC_ERR_INVALID_ARGUMENT, "row {row} of {value}: {}", last_error());
        let msg = last_error();
        assert!(msg.contains(&format!("class {row}")) && msg.contains("norm"), "{msg}");
        // A sub-range names the global class too.
        let s = pfc_set_centers(h.0, row as u64, 1, bad[row * D..].as_ptr());
        assert_eq!(s, PFC_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains(&format!("class {row}")), "{}", last_error());
        assert_eq!(h.centers(D), before, "a refused set_centers changed the centers");
    }
    let mut one = before.clone();
    one[9 * D + 3] = 5e18;
    assert_eq!(pfc_set_centers(h.0, 0, C, one.as_ptr()), PFC_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("class 9"), "{}", last_error());
}

#[test]
fn every_accepted_norm_gives_finite_evaluation_steps_and_search() {
    // Just below the limit, enormous, tiny (squares underflow in f32) and zero rows.
    let per_coordinate = (LIMIT / (D as f64).sqrt() * 0.999) as f32;
    for value in [per_coordinate, -per_coordinate, 1e15, 1e-25, 0.0] {
        let h = TestHead::new(&config());
        let centers = with_row(&h, 2, value);
        ok(pfc_set_centers(h.0, 0, C, centers.as_ptr()));
        let emb = embeddings(1);
        let (s, stats) = evaluate(&h, &emb);
        ok(s);
        assert!(stats.loss.is_finite() && stats.accuracy.is_finite(), "row of {value}: evaluation loss {} accuracy {}", stats.loss, stats.accuracy);
        let (_, ids, scores) = search(&h, &emb, C as u32);
        assert!(scores.iter().all(|s| s.is_finite() && s.abs() <= 1.0 + 1e-5), "row of {value}: scores {scores:?}");
        assert!(ids.iter().all(|&i| (0..C as i64).contains(&i)));
        for _ in 0..3 {
            let (s, stats, grad) = train(&h, &emb);
            ok(s);
            assert!(stats.loss.is_finite() && grad.iter().all(|g| g.is_finite()), "row of {value}: step loss {}", stats.loss);
        }
        assert!(h.centers(D).iter().all(|c| c.is_finite()));
        let (s, stats) = evaluate(&h, &emb);
        ok(s);
        assert!(stats.loss.is_finite(), "row of {value}: evaluation after training: loss {}", stats.loss);
    }
}

#[test]
fn embeddings_that_cannot_be_normalized_are_refused() {
    let h = TestHead::new(&config());
    let before = h.centers(D);
    for value in [3e38f32, 1e19] {
        let mut emb = embeddings(2);
        emb[5 * D..6 * D].iter_mut().for_each(|v| *v = value);
        let (s, _) = evaluate(&h, &emb);
        assert_eq!(s, PFC_ERR_INVALID_ARGUMENT, "{value}: {}", last_error());
        // Row 5 of the global batch is row 1 of batch 1.
        assert!(last_error().contains("batch 1") && last_error().contains("row 1") && last_error().contains("norm"), "{}", last_error());
        let (s, _, grad) = train(&h, &emb);
        assert_eq!(s, PFC_ERR_INVALID_ARGUMENT, "{value}: {}", last_error());
        assert!(grad.iter().all(|&g| g == 0.0), "a refused step wrote gradients");
    }
    assert_eq!(h.centers(D), before);
    // Large but accepted embeddings give the same results as their unit rows (cosines only).
    let emb = embeddings(3);
    let big: Vec<f32> = emb.iter().map(|v| v * 1e17).collect();
    let (s, a) = evaluate(&h, &emb);
    ok(s);
    let (s, b) = evaluate(&h, &big);
    ok(s);
    assert!((a.loss - b.loss).abs() < 1e-4 * a.loss.abs(), "{} vs {}", a.loss, b.loss);
}

#[test]
fn search_scores_are_cosines_whatever_the_query_norm() {
    let h = TestHead::new(&config());
    let q = embeddings(4);
    let (s, want_ids, want) = search(&h, &q, 5);
    ok(s);
    for scale in [1e-25f32, 1e-30, 1e20, 1e30] {
        let scaled: Vec<f32> = q.iter().map(|v| v * scale).collect();
        let (s, ids, scores) = search(&h, &scaled, 5);
        ok(s);
        assert_eq!(ids, want_ids, "queries × {scale}");
        for (a, b) in scores.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5, "queries × {scale}: score {a}, the unit query's {b}");
        }
    }
    // A zero query has cosine 0 with every class (PyTorch's normalize leaves it zero): the k
    // smallest ids, and the other queries' results are unchanged.
    let mut zero = q.clone();
    zero[2 * D..3 * D].iter_mut().for_each(|v| *v = 0.0);
    let (s, ids, scores) = search(&h, &zero, 5);
    ok(s);
    assert_eq!(&ids[10..15], &[0, 1, 2, 3, 4]);
    assert!(scores[10..15].iter().all(|&v| v == 0.0));
    assert_eq!((&ids[..10], &scores[..10]), (&want_ids[..10], &want[..10]));
}
