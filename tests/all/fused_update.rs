//! `train_step` applies the optimizer step inside the backward pass when the forward pass proves
//! it safe (`Update::Apply`): no pass of its own over the sampled rows. That path must give, bit
//! for bit, what the deferred path gives (`compute`, then `apply` after the job's verdict), and it
//! must be the path ordinary steps take; steps it cannot prove safe must still be refused with
//! nothing changed.

use partialfc::batch::{Batches, Embeddings, GradOut, HostBatch, Outputs};
use partialfc::checkpoint;
use partialfc::config::{Config, DType, MarginGrad, OptimizerKind};
use partialfc::error::Status;
use partialfc::head::Head;
use partialfc::rng;

const D: usize = 48;

fn config(kind: OptimizerKind, dtype: DType, shards: usize, rate: f32) -> Config {
    let mut cfg = Config { num_classes: 2_000, embedding_dim: D, sample_rate: rate, seed: 9, ..Config::default() };
    cfg.local_shards = shards;
    cfg.world_size = shards;
    cfg.compute_dtype = dtype;
    cfg.optimizer.kind = kind;
    cfg.optimizer.lr = if kind == OptimizerKind::AdamW { 0.01 } else { 0.1 };
    cfg.optimizer.momentum = 0.9;
    cfg.optimizer.weight_decay = 5e-4;
    cfg
}

/// Per shard: embeddings and labels of batch `b`.
fn batch(b: u64, shards: usize, classes: u64) -> Vec<(Vec<f32>, Vec<i64>)> {
    (0..shards)
        .map(|s| {
            let rows = 7 + s;
            let mut e = vec![0f32; rows * D];
            rng::init_center(100 + b, s as u64, 1.0, &mut e);
            let labels = (0..rows).map(|r| (rng::at(rng::stream(b, 3, s as u64), r as u64) % classes) as i64).collect();
            (e, labels)
        })
        .collect()
}

/// One step on `head`, by `train_step` or by `compute` then `apply`; the gradients returned.
fn step(head: &mut Head, data: &[(Vec<f32>, Vec<i64>)], split: bool) -> Result<Vec<Vec<f32>>, partialfc::error::Error> {
    let inputs: Vec<HostBatch> = data.iter().map(|(e, l)| HostBatch { embeddings: Embeddings::F32(e), labels: l }).collect();
    let mut grads: Vec<Vec<f32>> = data.iter().map(|(e, _)| vec![0f32; e.len()]).collect();
    let mut outs: Vec<GradOut> = grads.iter_mut().map(|g| GradOut::F32(g)).collect();
    if split {
        head.compute(Batches::Host(&inputs), Outputs::Host(&mut outs), false, true)?;
        head.apply()?;
    } else {
        head.train_step(&inputs, &mut outs)?;
    }
    Ok(grads)
}

fn centers(head: &Head) -> Vec<u32> {
    let c = head.config().num_classes;
    let mut out = vec![0f32; c as usize * D];
    head.get_centers(0, c, false, &mut out).unwrap();
    out.iter().map(|v| v.to_bits()).collect()
}

/// The shard files of a checkpoint of `head`: centers and optimizer state (their names carry the
/// save's random id, their contents do not).
fn checkpoint_shards(head: &Head, dir: &std::path::Path) -> Vec<Vec<u8>> {
    checkpoint::save(head, dir).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("shard-")).collect();
    files.sort();
    assert!(!files.is_empty(), "no shard files in {}", dir.display());
    files.into_iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn the_update_inside_the_backward_pass_is_the_deferred_update_bit_for_bit() {
    let tmp = std::env::temp_dir().join(format!("pfc-fused-{}", std::process::id()));
    for kind in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
        // GEMMs in f32 or bf16, and centers stored in f32 or bf16: both paths round the same
        // values with the same draws.
        for (dtype, storage) in [(DType::F32, DType::F32), (DType::BF16, DType::F32), (DType::F32, DType::BF16)] {
            for (shards, rate) in [(1, 1.0), (2, 0.3), (3, 0.05)] {
                let what = format!("{kind:?} {dtype:?} GEMMs, {storage:?} storage, {shards} shards r = {rate}");
                let cfg = Config { storage_dtype: storage, ..config(kind, dtype, shards, rate) };
                let (mut fused, mut deferred) = (Head::new(cfg.clone()).unwrap(), Head::new(cfg).unwrap());
                for b in 0..6 {
                    let data = batch(b, shards, 2_000);
                    let (gf, gd) = (step(&mut fused, &data, false).unwrap(), step(&mut deferred, &data, true).unwrap());
                    assert!(fused.phase_times().update_in_backward, "{what}, step {b}: train_step did not update in the backward pass");
                    assert!(!deferred.phase_times().update_in_backward, "{what}, step {b}: compute updated");
                    let bits = |g: &[Vec<f32>]| g.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&gf), bits(&gd), "{what}, step {b}: embedding gradients");
                    assert_eq!(centers(&fused), centers(&deferred), "{what}, step {b}: centers");
                }
                let (a, b) = (tmp.join("fused"), tmp.join("deferred"));
                assert!(checkpoint_shards(&fused, &a) == checkpoint_shards(&deferred, &b), "{what}: the checkpoints' shards (centers, optimizer state) differ");
                std::fs::remove_dir_all(&tmp).unwrap();
            }
        }
    }
}

/// Gradient accumulation (`compute` without `apply`) leaves rows accumulated: the next
/// `train_step` cannot be proven over them alone and takes the deferred path, with the same result
/// as a twin that applies both computes' sum.
#[test]
fn accumulated_gradients_take_the_deferred_path() {
    for storage in [DType::F32, DType::BF16] {
        accumulated_gradients_take_the_deferred_path_with(storage);
    }
}

fn accumulated_gradients_take_the_deferred_path_with(storage: DType) {
    let cfg = Config { storage_dtype: storage, ..config(OptimizerKind::Sgd, DType::F32, 2, 0.3) };
    let (mut a, mut b) = (Head::new(cfg.clone()).unwrap(), Head::new(cfg).unwrap());
    let (first, second) = (batch(0, 2, 2_000), batch(1, 2, 2_000));
    for head in [&mut a, &mut b] {
        let inputs: Vec<HostBatch> = first.iter().map(|(e, l)| HostBatch { embeddings: Embeddings::F32(e), labels: l }).collect();
        let mut grads: Vec<Vec<f32>> = first.iter().map(|(e, _)| vec![0f32; e.len()]).collect();
        let mut outs: Vec<GradOut> = grads.iter_mut().map(|g| GradOut::F32(g)).collect();
        head.compute(Batches::Host(&inputs), Outputs::Host(&mut outs), false, true).unwrap();
    }
    step(&mut a, &second, false).unwrap();
    assert!(!a.phase_times().update_in_backward, "a step over accumulated rows was fused");
    step(&mut b, &second, true).unwrap();
    assert_eq!(centers(&a), centers(&b));
}

/// An update that would push centers past the norm limit (2^62): weight decay at the largest
/// learning rate over centers of norm 2^61. No proof, and the deferred path's check refuses the
/// step with every center as it was.
#[test]
fn an_update_that_cannot_be_proven_is_checked_and_refused() {
    let mut cfg = config(OptimizerKind::Sgd, DType::F32, 2, 0.3);
    cfg.optimizer.lr = 1e4;
    let mut head = Head::new(cfg).unwrap();
    let c = head.config().num_classes;
    let huge = vec![(2f64.powi(61) / (D as f64).sqrt()) as f32; c as usize * D];
    head.set_centers(0, c, &huge).unwrap();
    let before = centers(&head);
    let err = step(&mut head, &batch(0, 2, 2_000), false).unwrap_err();
    assert_eq!(err.status, Status::NonFinite, "{}", err.message);
    assert!(!head.phase_times().update_in_backward);
    assert_eq!(centers(&head), before, "a refused step changed centers");
}

/// With f16 operands, ∂loss/∂cos must fit f16 (≤ 65504). The exact ArcFace slope at θ = 0 is
/// s·sin(m2)/1e-6 (m2 = 3: about 9e6) and, with the target logit far below the others, the target's
/// entry is about that over N = 1: f16 rounds it to ∞. The forward pass must not prove such a step,
/// and the checked path refuses it with every center as it was.
#[test]
fn f16_operands_out_of_range_are_not_proven() {
    let mut cfg = config(OptimizerKind::Sgd, DType::F16, 1, 1.0);
    cfg.margin.grad = MarginGrad::Exact;
    cfg.margin.m2 = 3.0;
    let mut head = Head::new(cfg).unwrap();
    // Class 5's center, one-hot, and the embedding along it: a cosine of exactly 1 in f16 too.
    let mut axis = vec![0f32; D];
    axis[0] = 1.0;
    head.set_centers(5, 1, &axis).unwrap();
    let before = centers(&head);
    let err = step(&mut head, &[(axis, vec![5i64])], false).unwrap_err();
    assert_eq!(err.status, Status::NonFinite, "{}", err.message);
    assert!(!head.phase_times().update_in_backward, "a step with ∂loss/∂cos beyond f16's range was proven");
    assert_eq!(centers(&head), before, "a refused step changed centers");
}
