//! Batch sizes that differ between shards and between steps, and the reported statistics.

use crate::common::*;
use partialfc::ffi::*;

const C: u64 = 157;
const D: usize = 24;

fn config(shards: u32) -> pfc_config {
    let mut c = default_config();
    c.num_classes = C;
    c.embedding_dim = D as u32;
    c.local_shards = shards;
    c.scale = 20.0;
    c
}

fn batch(seed: u64, n: usize) -> (Vec<f32>, Vec<i64>) {
    let mut e = vec![0f32; n * D];
    partialfc::rng::init_center(seed, 9, 1.0, &mut e);
    (e, (0..n).map(|i| (partialfc::rng::at(seed, i as u64) % C) as i64).collect())
}

#[test]
fn uneven_and_changing_batches_match_a_single_shard() {
    // The same global batches, split unevenly (some shards empty) and sized differently per step.
    let one = TestHead::new(&config(1));
    let four = TestHead::new(&config(4));
    let splits: [&[usize]; 4] = [&[5, 0, 11, 1], &[0, 0, 0, 9], &[30, 2, 2, 2], &[1, 1, 1, 1]];
    for (t, split) in splits.iter().enumerate() {
        let n: usize = split.iter().sum();
        let (e, l) = batch(t as u64 + 1, n);
        let (s1, g1) = one.step(&e, &l, D, &[n]);
        let (s4, g4) = four.step(&e, &l, D, split);
        assert!((s1.loss - s4.loss).abs() <= 1e-5 * s1.loss, "step {t}: {} vs {}", s1.loss, s4.loss);
        assert_eq!(s1.accuracy, s4.accuracy);
        assert_eq!((s4.global_batch, s4.step, s4.sampled_classes), (n as u64, t as u64 + 1, C));
        // Four shards return 4× the mean-loss gradient.
        let g4: Vec<f32> = g4.iter().map(|v| v / 4.0).collect();
        assert!(rel_err(&g4, &g1) < 1e-5, "step {t}: gradient");
        assert!(rel_err(&four.centers(D), &one.centers(D)) < 1e-6, "step {t}: centers");
    }
}

#[test]
fn accuracy_counts_rows_whose_target_cosine_is_the_largest() {
    let head = TestHead::new(&config(3));
    let (mut e, l) = batch(42, 40);
    let w = head.centers(D);
    // Make the first 25 rows point at their own class center: those are certainly right.
    for i in 0..25 {
        let c = l[i] as usize;
        e[i * D..(i + 1) * D].copy_from_slice(&w[c * D..(c + 1) * D]);
    }
    let cos = |i: usize, c: usize| -> f64 {
        let (x, y) = (&e[i * D..(i + 1) * D], &w[c * D..(c + 1) * D]);
        let dot: f64 = x.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum();
        let nx: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        dot / nx / ny
    };
    let correct = (0..40).filter(|&i| (0..C as usize).all(|c| c == l[i] as usize || cos(i, c) < cos(i, l[i] as usize))).count();
    assert!(correct >= 25);
    let b = [
        pfc_batch { embeddings: e.as_ptr().cast(), labels: l.as_ptr(), grad_embeddings: std::ptr::null_mut(), batch_size: 40, dtype: PFC_DTYPE_F32, memory: PFC_MEMORY_HOST, stream: std::ptr::null_mut() },
        pfc_batch { embeddings: std::ptr::null(), labels: std::ptr::null(), grad_embeddings: std::ptr::null_mut(), batch_size: 0, dtype: PFC_DTYPE_F32, memory: PFC_MEMORY_HOST, stream: std::ptr::null_mut() },
        pfc_batch { embeddings: std::ptr::null(), labels: std::ptr::null(), grad_embeddings: std::ptr::null_mut(), batch_size: 0, dtype: PFC_DTYPE_F32, memory: PFC_MEMORY_HOST, stream: std::ptr::null_mut() },
    ];
    let mut st = pfc_step_stats::default();
    ok(pfc_evaluate(head.0, b.as_ptr(), 3, &mut st));
    assert_eq!(st.accuracy, correct as f64 / 40.0);
    assert_eq!((st.step, st.global_batch, st.sampled_classes), (0, 40, C));
}
