//! A step is a pure function of the head's state and the batch: two heads with the same seed fed
//! the same batches give bit-identical losses, gradients and centers, whatever the worker pool's
//! work stealing did (the floating-point reductions over tasks of sampled classes must not depend
//! on how the tasks were split).

use crate::common::*;

const C: u64 = 60_000;
const D: usize = 32;
const N: usize = 12;

fn run() -> (Vec<(u64, Vec<u32>)>, Vec<u32>) {
    let mut cfg = default_config();
    cfg.num_classes = C;
    cfg.embedding_dim = D as u32;
    cfg.local_shards = 3;
    cfg.sample_rate = 0.5; // ~40 blocks of sampled classes per shard: many tasks to split and steal
    cfg.seed = 1000;
    let h = TestHead::new(&cfg);
    let mut rng = Rng(77);
    let steps = (0..4)
        .map(|_| {
            let labels: Vec<i64> = (0..N).map(|_| rng.below(C) as i64).collect();
            let emb: Vec<f32> = (0..N * D).map(|_| rng.normal() as f32).collect();
            let (stats, grad) = h.step(&emb, &labels, D, &even_split(N, 3));
            (stats.loss.to_bits(), grad.iter().map(|g| g.to_bits()).collect())
        })
        .collect();
    (steps, h.centers(D).iter().map(|c| c.to_bits()).collect())
}

#[test]
fn steps_are_bit_identical_run_after_run() {
    let first = run();
    for attempt in 1..6 {
        let again = run();
        for (i, (a, b)) in first.0.iter().zip(&again.0).enumerate() {
            assert!(a.0 == b.0, "run {attempt}, step {i}: the loss differs");
            assert!(a.1 == b.1, "run {attempt}, step {i}: the gradients differ");
        }
        assert!(first.1 == again.1, "run {attempt}: the centers differ");
    }
}
