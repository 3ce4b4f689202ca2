//! The adaptive margins (SPEC §1.6a, issue #25) on the CUDA backend, against the CPU backend:
//! AdaFace and CurricularFace sampled at r < 1 over 1, 2 and 3 GPUs, their running statistics moved
//! only by training steps that succeed, and checkpoints that carry them between the backends. Their
//! golden files on CUDA are in golden.rs, their per-step device work in gpu_step.rs. As in gpu.rs
//! each test runs where CUDA is (`on_cuda`): on a GPU machine, else on the host emulation.

use crate::adaptive_margins::batch;
use crate::common::*;
use crate::gpu_jobs::{cuda_head, has_gpus};
use crate::persist::{self, load, save, Scratch, Snapshot};
use partialfc::ffi::*;

const KINDS: [i32; 2] = [PFC_MARGIN_ADAFACE, PFC_MARGIN_CURRICULAR];

/// gpu_jobs.rs's configuration with adaptive margin `kind`; AdaFace's running statistics take a
/// tenth of each batch, so that a few steps move them far.
fn adaptive(kind: i32, c: u64, d: usize, rate: f32, shards: usize) -> pfc_config {
    let mut cfg = crate::gpu_jobs::config(c, d, rate, PFC_DTYPE_F32, shards);
    cfg.margin_kind = kind;
    if kind == PFC_MARGIN_ADAFACE {
        cfg.adaface_t_alpha = 0.1;
    }
    cfg
}

/// A new head's statistics: AdaFace's authors' 20 and 100, CurricularFace's t = 0.
fn initial(kind: i32) -> Vec<f32> {
    if kind == PFC_MARGIN_ADAFACE { vec![20.0, 100.0] } else { vec![0.0] }
}

/// The statistics of two heads that saw the same batches, within 1e-6 of their scale: AdaFace's
/// norms (tens) come from the same rows and differ only where the sums' orders do; CurricularFace's
/// t, a mean of cosines (scale 1) near 0, from centers that differ by the backends' rounding.
pub(crate) fn assert_same_statistics(gpu: &[f32], cpu: &[f32], what: &str) {
    assert!(!cpu.is_empty() && gpu.len() == cpu.len(), "{what}: {gpu:?} vs {cpu:?}");
    let close = gpu.iter().zip(cpu).all(|(&g, &c)| (g as f64 - c as f64).abs() <= 1e-6 * (c as f64).abs().max(1.0));
    assert!(close, "{what}: running statistics {gpu:?} vs the CPU's {cpu:?}");
}

/// AdaFace and CurricularFace over 1, 2 and 3 GPUs against CPU heads of as many shards, at r = 1
/// and r = 0.3 (the same classes sampled, so the same rows moved), on batches whose norms spread
/// over [1, 30]: loss, gradients, centers and running statistics after every step; an evaluation
/// then matches and leaves the statistics as they were, bit for bit.
#[test]
fn cuda_adaptive_margins_match_cpu_on_one_two_and_three_gpus() {
    if !on_cuda(module_path!(), "cuda_adaptive_margins_match_cpu_on_one_two_and_three_gpus") {
        return;
    }
    for g in [1usize, 2, 3] {
        if has_gpus(g, &format!("the adaptive margins over {g} GPUs")) {
            for kind in KINDS {
                for rate in [1.0, 0.3] {
                    match_cpu(kind, g, rate);
                }
            }
        }
    }
}

fn match_cpu(kind: i32, g: usize, rate: f32) {
    let (c, d, n) = (1501u64, 32usize, 36usize);
    let what = format!("margin {kind}, {g} GPUs, r {rate}");
    let cfg = adaptive(kind, c, d, rate, g);
    let devices: Vec<i32> = (0..g as i32).collect();
    let (cpu, gpu) = (TestHead::new(&cfg), cuda_head(&cfg, &devices));
    assert_eq!(gpu.margin_state(), initial(kind), "{what}: initial statistics");
    for step in 0..3 {
        let (e, l) = batch(c, d, n, 40 * g as u64 + step);
        let rows = even_split(n, g);
        let (before_c, before_g) = (cpu.centers(d), gpu.centers(d));
        let (sc, gc) = cpu.step(&e, &l, d, &rows);
        let (sg, gg) = gpu.step(&e, &l, d, &rows);
        let what = format!("{what}, step {step}");
        assert_eq!(sc.sampled_classes, sg.sampled_classes, "{what}");
        assert!((sc.loss - sg.loss).abs() <= 1e-4 * sc.loss, "{what}: loss {} vs {}", sg.loss, sc.loss);
        assert!(rel_err(&gg, &gc) <= 1e-3, "{what}: gradient {}", rel_err(&gg, &gc));
        let (wc, wg) = (cpu.centers(d), gpu.centers(d));
        let moved = |w: &[f32], before: &[f32]| -> Vec<bool> { w.chunks_exact(d).zip(before.chunks_exact(d)).map(|(a, b)| a != b).collect() };
        assert_eq!(moved(&wg, &before_g), moved(&wc, &before_c), "{what}: other classes moved");
        assert!(rel_err(&wg, &wc) <= 1e-4, "{what}: centers {}", rel_err(&wg, &wc));
        assert_same_statistics(&gpu.margin_state(), &cpu.margin_state(), &what);
    }
    let kept = gpu.margin_state();
    let (e, l) = batch(c, d, n, 7);
    let (ec, eg) = (cpu.evaluate(&e, &l, d, &even_split(n, g)), gpu.evaluate(&e, &l, d, &even_split(n, g)));
    assert!((ec.loss - eg.loss).abs() <= 1e-4 * ec.loss, "{what}: evaluation loss {} vs {}", eg.loss, ec.loss);
    assert_eq!(ec.accuracy, eg.accuracy, "{what}: evaluation accuracy");
    assert_eq!(gpu.margin_state(), kept, "{what}: evaluation moved the running statistics");
}

/// Refused steps leave the running statistics where they were on the GPU — a batch with a NaN
/// (refused before the step), a center update that would not be finite (refused after the
/// forward pass computed new statistics), statistics of the wrong count — and so does evaluation;
/// statistics set through `pfc_set_margin_state` are the GPUs' next step's, and a compute and a
/// step then move them as on the CPU, the steps matching the CPU head's. Both adaptive kinds.
#[test]
fn cuda_adaptive_statistics_move_only_with_successful_training_steps() {
    if !on_cuda(module_path!(), "cuda_adaptive_statistics_move_only_with_successful_training_steps") {
        return;
    }
    let devices = [0, 1];
    if !has_gpus(devices.len(), "the adaptive margins over 2 GPUs") {
        return;
    }
    for kind in KINDS {
        statistics_after_refusals(kind, &devices);
    }
}

fn statistics_after_refusals(kind: i32, devices: &[i32]) {
    let (c, d, n) = (300u64, 16usize, 24usize);
    let mut cfg = adaptive(kind, c, d, 0.5, devices.len());
    cfg.weight_decay = 0.5;
    let (cpu, gpu) = (TestHead::new(&cfg), cuda_head(&cfg, devices));
    let rows = even_split(n, devices.len());
    let (e, mut l) = batch(c, d, n, 3);
    // Class 0, whose center is made huge below, is a positive: sampled whatever the rate.
    l[0] = 0;
    let initial = initial(kind);
    for h in [&cpu, &gpu] {
        h.evaluate(&e, &l, d, &rows);
    }
    assert_eq!(gpu.margin_state(), initial, "margin {kind}: evaluation moved the statistics");
    let mut grad = vec![0f32; n * d];
    let mut bad = e.clone();
    bad[5] = f32::NAN;
    let b = host_batches(&bad, &l, &mut grad, d, &rows);
    assert_eq!(pfc_train_step(gpu.0, b.as_ptr(), b.len() as u32, std::ptr::null_mut()), PFC_ERR_INVALID_ARGUMENT, "{}", last_error());
    assert_eq!(gpu.margin_state(), initial, "margin {kind}: a batch refused for its NaN moved the statistics");
    // Class 0's center of norm 4e18 (below 2^62), which an update at lr 1e4 with weight decay 0.5
    // takes past what normalizes in f32: the whole step is refused, after its forward pass.
    let centers = gpu.centers(d);
    let mut huge = centers.clone();
    huge[..d].iter_mut().for_each(|v| *v = 1e18);
    gpu.set_centers(&huge);
    ok(pfc_set_learning_rate(gpu.0, 1e4));
    let b = host_batches(&e, &l, &mut grad, d, &rows);
    assert_eq!(pfc_train_step(gpu.0, b.as_ptr(), b.len() as u32, std::ptr::null_mut()), PFC_ERR_NON_FINITE, "{}", last_error());
    assert_eq!(gpu.margin_state(), initial, "margin {kind}: a step refused as non-finite moved the statistics");
    gpu.set_centers(&centers);
    ok(pfc_set_learning_rate(gpu.0, cfg.lr));
    let set: Vec<f32> = if kind == PFC_MARGIN_ADAFACE { vec![12.5, 4.0] } else { vec![0.25] };
    assert_eq!(pfc_set_margin_state(gpu.0, set.as_ptr(), set.len() as u32 + 1), PFC_ERR_INVALID_ARGUMENT, "margin {kind}: too many values");
    assert_eq!(gpu.margin_state(), initial, "margin {kind}: statistics refused by count were written");
    for h in [&cpu, &gpu] {
        ok(pfc_set_margin_state(h.0, set.as_ptr(), set.len() as u32));
    }
    assert_eq!(gpu.margin_state(), set, "margin {kind}: statistics set");
    // A compute (a training forward pass of its own, its update left pending), then a step.
    for call in [pfc_train_compute, pfc_train_step] {
        let mut out = Vec::new();
        for h in [&cpu, &gpu] {
            let b = host_batches(&e, &l, &mut grad, d, &rows);
            let mut stats = pfc_step_stats::default();
            ok(call(h.0, b.as_ptr(), b.len() as u32, &mut stats));
            out.push((stats.loss, grad.clone()));
        }
        assert!((out[0].0 - out[1].0).abs() <= 1e-4 * out[0].0, "margin {kind}: loss {} vs {}", out[1].0, out[0].0);
        assert!(rel_err(&out[1].1, &out[0].1) <= 1e-3, "margin {kind}: gradient {}", rel_err(&out[1].1, &out[0].1));
        assert_ne!(gpu.margin_state(), initial, "margin {kind}: a successful training call left the statistics");
        assert_same_statistics(&gpu.margin_state(), &cpu.margin_state(), &format!("margin {kind}, after a training call"));
    }
    assert!(rel_err(&gpu.centers(d), &cpu.centers(d)) <= 1e-4, "margin {kind}: centers {}", rel_err(&gpu.centers(d), &cpu.centers(d)));
}

/// Checkpoints carry the running statistics between the backends exactly, for both adaptive
/// kinds: one saved by 2 GPUs loads into CPU heads of 1 and 3 shards with the same statistics and
/// saves the same manifest values; one saved by a CPU head loads into 3 GPUs, whose next steps
/// match the CPU's, statistics included. A combined-margin CUDA head refuses an adaptive margin's
/// checkpoint and keeps no statistics.
#[test]
fn cuda_adaptive_checkpoints_cross_to_and_from_cpu() {
    if !on_cuda(module_path!(), "cuda_adaptive_checkpoints_cross_to_and_from_cpu") {
        return;
    }
    if !has_gpus(3, "adaptive-margin checkpoints over 2 and 3 GPUs") {
        return;
    }
    for (kind, name) in KINDS.into_iter().zip(["adaface", "curricular"]) {
        checkpoints_cross(kind, name);
    }
}

fn checkpoints_cross(kind: i32, name: &str) {
    let (c, d, n) = (500u64, 16usize, 18usize);
    let train = |h: &TestHead, shards: usize, from: u64, steps: u64| -> Vec<f64> {
        (from..from + steps)
            .map(|t| {
                let (e, l) = batch(c, d, n, 100 + t);
                h.step(&e, &l, d, &even_split(n, shards)).0.loss
            })
            .collect()
    };
    let gpu = cuda_head(&adaptive(kind, c, d, 0.5, 2), &[0, 1]);
    train(&gpu, 2, 0, 3);
    let a = Scratch::new("gpu-margins-cuda-ckpt");
    ok(save(&gpu, &a.0));
    let saved = gpu.margin_state();
    assert_ne!(saved, initial(kind), "{name}");
    let manifest = Snapshot::read(&a.0).manifest;
    assert_eq!(manifest["margin_kind"], name);
    let listed: Vec<f32> = manifest["margin_state"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    assert_eq!(listed, saved, "{name}: the manifest's statistics are not the GPUs'");
    for shards in [1usize, 3] {
        let mut other = adaptive(kind, c, d, 0.5, shards);
        other.seed = 999;
        let cpu = TestHead::new(&other);
        ok(load(&cpu, &a.0));
        assert_eq!(cpu.margin_state(), saved, "{name}: statistics after loading into {shards} CPU shards");
        let b = Scratch::new("gpu-margins-cpu-resave");
        ok(save(&cpu, &b.0));
        assert_eq!(Snapshot::read(&b.0).manifest["margin_state"], manifest["margin_state"], "{name}: {shards} CPU shards saved other statistics");
    }

    let cpu = TestHead::new(&adaptive(kind, c, d, 0.5, 3));
    train(&cpu, 3, 0, 4);
    let b = Scratch::new("gpu-margins-cpu-ckpt");
    ok(save(&cpu, &b.0));
    let mut other = adaptive(kind, c, d, 0.5, 3);
    other.seed = 999;
    let gpu = cuda_head(&other, &[0, 1, 2]);
    ok(load(&gpu, &b.0));
    assert_eq!(gpu.margin_state(), cpu.margin_state(), "{name}: statistics after loading into 3 GPUs");
    assert!(persist::bits(&gpu.centers(d)) == persist::bits(&cpu.centers(d)), "{name}: centers after loading into 3 GPUs");
    let (on_cpu, on_gpu) = (train(&cpu, 3, 4, 2), train(&gpu, 3, 4, 2));
    for (t, (lc, lg)) in on_cpu.iter().zip(&on_gpu).enumerate() {
        assert!((lc - lg).abs() <= 1e-4 * lc, "{name}: step {t} after loading: loss {lg} vs {lc}");
    }
    assert_same_statistics(&gpu.margin_state(), &cpu.margin_state(), &format!("{name}: steps after loading"));

    let combined = cuda_head(&crate::gpu_jobs::config(c, d, 0.5, PFC_DTYPE_F32, 2), &[0, 1]);
    assert_eq!(load(&combined, &b.0), PFC_ERR_INCOMPATIBLE, "{name}: {}", last_error());
    assert!(combined.margin_state().is_empty(), "{name}");
}
