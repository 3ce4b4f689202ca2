//! bf16 storage of centers and optimizer state (`storage_dtype`, SPEC §2): what it keeps of f32
//! training, that its rounding is the documented one wherever it runs, and that everything that
//! reads or writes centers still works.

use partialfc::batch::{Embeddings, GradOut, HostBatch};
use partialfc::config::{Config, DType, OptimizerKind, Rounding};
use partialfc::error::Status;
use partialfc::head::Head;

const D: usize = 40;
const C: u64 = 600;

fn config(kind: OptimizerKind, storage: DType, shards: usize, rate: f32) -> Config {
    let mut cfg = Config { num_classes: C, embedding_dim: D, sample_rate: rate, seed: 11, ..Config::default() };
    cfg.local_shards = shards;
    cfg.world_size = shards;
    cfg.storage_dtype = storage;
    cfg.optimizer.kind = kind;
    cfg.optimizer.lr = if kind == OptimizerKind::AdamW { 0.01 } else { 0.1 };
    cfg
}

/// Embeddings and labels of batch `b`, 24 rows split over `shards`.
fn batch(b: u64, shards: usize) -> Vec<(Vec<f32>, Vec<i64>)> {
    crate::common::split_batch(b, 24, shards, D, C, 500)
}

fn train(head: &mut Head, data: &[(Vec<f32>, Vec<i64>)]) -> Result<(f64, Vec<f32>), partialfc::error::Error> {
    let inputs: Vec<HostBatch> = data.iter().map(|(e, l)| HostBatch { embeddings: Embeddings::F32(e), labels: l }).collect();
    let mut grads: Vec<Vec<f32>> = data.iter().map(|(e, _)| vec![0f32; e.len()]).collect();
    let mut outs: Vec<GradOut> = grads.iter_mut().map(|g| GradOut::F32(g)).collect();
    let stats = head.train_step(&inputs, &mut outs)?;
    Ok((stats.loss, grads.concat()))
}

fn centers(head: &Head) -> Vec<f32> {
    let mut out = vec![0f32; C as usize * D];
    head.get_centers(0, C, false, &mut out).unwrap();
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every stored value is a bf16: its low 16 bits are zero.
fn all_bf16(v: &[f32]) -> bool {
    v.iter().all(|x| x.to_bits() & 0xFFFF == 0)
}

/// A bf16 head starts from the f32 head's initial centers rounded to nearest, trains and stores
/// bf16 values only. Across shard counts the f32 arithmetic differs in its last bits (the
/// softmax sums are split differently), yet almost every stored value is the same bf16: the
/// rounding draws follow the global class, not the shard (drawn per shard row, half the values
/// not representable would round the other way).
#[test]
fn bf16_storage_trains_and_is_the_same_on_every_shard_layout() {
    for kind in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
        for rate in [1.0, 0.2] {
            let f32_head = Head::new(config(kind, DType::F32, 1, rate)).unwrap();
            let initial: Vec<f32> = centers(&f32_head).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
            let mut heads: Vec<Head> = [1, 2, 3].iter().map(|&s| Head::new(config(kind, DType::BF16, s, rate)).unwrap()).collect();
            assert_eq!(bits(&centers(&heads[0])), bits(&initial), "{kind:?} r = {rate}: initial centers");
            let mut losses = Vec::new();
            for b in 0..8 {
                let mut results = Vec::new();
                for (head, shards) in heads.iter_mut().zip([1, 2, 3]) {
                    results.push(train(head, &batch(b % 4, shards)).unwrap());
                }
                // Sampling keeps floor(r·n) classes per shard: only r = 1 trains the same classes.
                for (i, (loss, _)) in results.iter().enumerate().skip(1).filter(|_| rate == 1.0) {
                    assert!((loss - results[0].0).abs() < 1e-4 * results[0].0, "{kind:?} r = {rate} step {b}: loss {loss} with {} shards, {} with 1", i + 1, results[0].0);
                }
                losses.push(results[0].0);
                let first = centers(&heads[0]);
                assert!(all_bf16(&first), "{kind:?} r = {rate} step {b}: a center value is not a bf16");
                // A value one bf16 step apart moves its row's later arithmetic by far more than
                // f32's last bits: compare before such differences spread (tests/all/mpi.rs checks
                // layouts of the same shards bit for bit).
                for (i, head) in heads.iter().enumerate().skip(1).filter(|_| rate == 1.0 && b < 3) {
                    let other = centers(head);
                    let same = other.iter().zip(&first).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
                    assert!(same as f64 >= 0.99 * first.len() as f64, "{kind:?} r = {rate} step {b}: {} shards store {} of {} values as 1 shard does", i + 1, same, first.len());
                }
            }
            assert!(losses[7] < losses[3], "{kind:?} r = {rate}: the loss did not fall: {losses:?}");
        }
    }
}

/// An update far below bf16's spacing: weight decay taking 5e-5 a step off centers of 1, where
/// bf16's spacing is 2^-8 below 1 (a 78th of it). Round to nearest drops it every step and the
/// centers stay at 1; stochastic rounding follows the f32 twin on average, within the statistical
/// bound over the 24,000 values.
#[test]
fn small_updates_survive_stochastic_rounding_and_vanish_to_nearest() {
    let mut bias = Vec::new();
    for rounding in [Rounding::Stochastic, Rounding::Nearest] {
        let mut cfg = config(OptimizerKind::Sgd, DType::BF16, 2, 1.0);
        cfg.storage_rounding = rounding;
        cfg.optimizer.momentum = 0.0;
        cfg.optimizer.weight_decay = 0.5;
        cfg.optimizer.lr = 1e-4;
        let mut head = Head::new(cfg.clone()).unwrap();
        let ones = vec![1.0f32; C as usize * D];
        head.set_centers(0, C, &ones).unwrap();
        let mut twin = Head::new(Config { storage_dtype: DType::F32, ..cfg }).unwrap();
        twin.set_centers(0, C, &ones).unwrap();
        let steps = 20;
        for b in 0..steps {
            train(&mut head, &batch(b, 2)).unwrap();
            train(&mut twin, &batch(b, 2)).unwrap();
        }
        let (got, want) = (centers(&head), centers(&twin));
        let n = got.len() as f64;
        let mean_err = got.iter().zip(&want).map(|(&g, &w)| g as f64 - w as f64).sum::<f64>() / n;
        let decay = 1.0 - want.iter().map(|&w| w as f64).sum::<f64>() / n;
        bias.push((mean_err, decay));
    }
    let ((sr, decay), (rtn, _)) = (bias[0], bias[1]);
    assert!((decay - 20.0 * 5e-5).abs() < 1e-4, "the f32 twin decayed by {decay}");
    assert!((rtn - decay).abs() < 0.02 * decay, "to nearest: mean error {rtn}, expected the whole decay {decay}");
    // Per value, 20 Bernoulli steps of 2^-8 with p ≈ 1/78: a standard deviation of 2e-3, and
    // 1.3e-5 for the mean of 24,000; five of those.
    assert!(sr.abs() < 6.5e-5, "stochastic: mean error {sr} (the decay is {decay})");
}

#[test]
fn f16_storage_is_refused_with_a_reason() {
    let err = Head::new(config(OptimizerKind::Sgd, DType::F16, 1, 1.0)).err().expect("f16 storage accepted");
    assert_eq!(err.status, Status::InvalidArgument);
    assert!(err.message.contains("storage_dtype"), "{}", err.message);
}

/// A step whose update would take centers past the norm limit (2^62) is refused on a bf16 head as
/// on an f32 one, every stored value as it was, and the head trains on afterwards.
#[test]
fn a_refused_update_leaves_bf16_state_untouched() {
    let mut cfg = config(OptimizerKind::Sgd, DType::BF16, 2, 0.3);
    cfg.optimizer.lr = 1e4;
    let mut head = Head::new(cfg).unwrap();
    let huge = vec![(2f64.powi(61) / (D as f64).sqrt()) as f32; C as usize * D];
    head.set_centers(0, C, &huge).unwrap();
    let before = bits(&centers(&head));
    let err = train(&mut head, &batch(0, 2)).unwrap_err();
    assert_eq!(err.status, Status::NonFinite, "{}", err.message);
    assert_eq!(bits(&centers(&head)), before, "a refused step changed stored centers");
    head.set_learning_rate(0.1).unwrap();
    let ordinary: Vec<f32> = (0..C as usize * D).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
    head.set_centers(0, C, &ordinary).unwrap();
    train(&mut head, &batch(1, 2)).unwrap();
}
