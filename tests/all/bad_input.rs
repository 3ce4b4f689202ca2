//! Bad input through the C ABI (SPEC §2): every exported function answers it with the right status
//! and a clear message naming what was wrong, writes none of its outputs, and leaves the head
//! exactly as it was — centers bit-identical, and the next valid step bit-identical to the same
//! step on a head that never saw the bad calls (so the step counter, sampling, optimizer state and
//! learning rate are untouched too).

use crate::common::*;
use half::{bf16, f16};
use partialfc::ffi::*;
use std::ptr::{null, null_mut};

const C: u64 = 10;
const D: usize = 8;
const SHARDS: u32 = 2;
/// Uneven rows per local shard.
const ROWS: [usize; 2] = [5, 3];
const N: usize = ROWS[0] + ROWS[1];

// ------------------------------------------------------------------------------------------------
// Helpers

fn config() -> pfc_config {
    let mut c = default_config();
    c.num_classes = C;
    c.embedding_dim = D as u32;
    c.local_shards = SHARDS;
    c.seed = 11;
    c
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32) / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn labels_for(n: usize, classes: u64, seed: u64) -> Vec<i64> {
    (0..n as u64).map(|i| ((i * 7 + seed * 3) % classes) as i64).collect()
}

/// One batch per local shard over `emb`/`labels`/`grad` (elements of `elem` bytes), split by `rows`.
fn batches_of(emb: *const u8, labels: &[i64], grad: *mut u8, elem: usize, dtype: i32, d: usize, rows: &[usize]) -> Vec<pfc_batch> {
    let mut at = 0;
    rows.iter()
        .map(|&r| {
            let b = pfc_batch {
                embeddings: emb.wrapping_add(at * d * elem).cast(),
                labels: labels[at..].as_ptr(),
                grad_embeddings: if grad.is_null() { null_mut() } else { grad.wrapping_add(at * d * elem).cast() },
                batch_size: r as u64,
                dtype,
                memory: PFC_MEMORY_HOST,
                stream: null_mut(),
            };
            at += r;
            b
        })
        .collect()
}

/// The raw bits of every center this process owns.
fn center_bits(h: *mut pfc_head, d: usize) -> Vec<u32> {
    let (mut first, mut count) = (0, 0);
    ok(pfc_local_classes(h, &mut first, &mut count));
    let mut out = vec![0f32; count as usize * d];
    ok(pfc_get_centers(h, first, count, 0, out.as_mut_ptr()));
    out.iter().map(|v| v.to_bits()).collect()
}

const PRIMED: &str = "-777.25";

/// Leaves a known message in this thread's last error, so that a stale message is not mistaken
/// for the one a failing call should set.
fn prime_last_error() {
    let mut c = config();
    c.m1 = -777.25;
    let mut h = null_mut();
    assert_eq!(pfc_create(&c, &mut h), PFC_ERR_INVALID_ARGUMENT);
    assert!(h.is_null());
    assert!(last_error().contains(PRIMED), "priming message: {}", last_error());
}

/// Checks the status and that the fresh message is non-empty and names what was wrong.
#[track_caller]
fn expect_err(what: &str, status: pfc_status, want: pfc_status, needle: &str) -> String {
    let msg = last_error();
    assert_eq!(status, want, "{what}: status {status} (expected {want}); message: {msg:?}");
    assert!(!msg.trim().is_empty(), "{what}: empty error message");
    assert!(!msg.contains(PRIMED), "{what}: pfc_last_error still holds the previous message: {msg:?}");
    assert!(msg.to_lowercase().contains(&needle.to_lowercase()), "{what}: message {msg:?} does not mention {needle:?}");
    assert!(!msg.contains("internal error"), "{what}: reported as an internal error: {msg:?}");
    msg
}

/// Runs a call that must fail on `h`, checking status, message and that the centers did not change.
#[track_caller]
fn bad_call(what: &str, h: *mut pfc_head, want: pfc_status, needle: &str, call: impl FnOnce() -> pfc_status) {
    let before = center_bits(h, D);
    prime_last_error();
    let status = call();
    expect_err(what, status, want, needle);
    assert!(center_bits(h, D) == before, "{what}: centers changed by a failed call");
}

/// A stats struct full of values no step reports.
fn stats_sentinel() -> pfc_step_stats {
    pfc_step_stats { loss: -12345.5, accuracy: -7.25, step: 0xdead_beef, global_batch: 0xfeed, sampled_classes: 0xbad }
}

fn same_stats(a: &pfc_step_stats, b: &pfc_step_stats) -> bool {
    a.loss.to_bits() == b.loss.to_bits()
        && a.accuracy.to_bits() == b.accuracy.to_bits()
        && a.step == b.step
        && a.global_batch == b.global_batch
        && a.sampled_classes == b.sampled_classes
}

const GRAD_SENTINEL: f32 = 1234.5;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Call {
    Train,
    Evaluate,
}

fn call_step(kind: Call, h: *mut pfc_head, b: *const pfc_batch, n: u32, stats: *mut pfc_step_stats) -> pfc_status {
    match kind {
        Call::Train => pfc_train_step(h, b, n, stats),
        Call::Evaluate => pfc_evaluate(h, b, n, stats),
    }
}

/// A step on `target` (the head `h`, or NULL) that must fail: status, message, `h`'s centers, stats
/// and every gradient buffer untouched.
#[track_caller]
#[allow(clippy::too_many_arguments)]
fn bad_step(
    what: &str,
    kind: Call,
    h: *mut pfc_head,
    target: *mut pfc_head,
    b: &[pfc_batch],
    n: u32,
    want: pfc_status,
    needle: &str,
    grad: &[f32],
) {
    let what = format!("{kind:?}: {what}");
    let mut stats = stats_sentinel();
    let b_ptr = if b.is_empty() { null() } else { b.as_ptr() };
    bad_call(&what, h, want, needle, || call_step(kind, target, b_ptr, n, &mut stats));
    assert!(same_stats(&stats, &stats_sentinel()), "{what}: stats written by a failed call");
    assert!(grad.iter().all(|&g| g.to_bits() == GRAD_SENTINEL.to_bits()), "{what}: grad_embeddings written by a failed call");
}

/// Every way to hand `pfc_train_step` (`kind == Train`) or `pfc_evaluate` a bad batch, on `h`
/// (`classes` classes, dimension `D`, `SHARDS` shards).
fn bad_batches(kind: Call, h: *mut pfc_head, classes: u64) {
    let emb = values(N * D, 1);
    let labels = labels_for(N, classes, 1);
    let mut grad = vec![GRAD_SENTINEL; N * D];
    let grad_ptr: *mut u8 = grad.as_mut_ptr().cast();
    let good = batches_of(emb.as_ptr().cast(), &labels, grad_ptr, 4, PFC_DTYPE_F32, D, &ROWS);
    let train = kind == Call::Train;

    // NULL head, NULL batches, wrong batch counts.
    bad_step("NULL head", kind, h, null_mut(), &good, SHARDS, PFC_ERR_NULL_ARGUMENT, "head", &grad);
    bad_step("NULL batches", kind, h, h, &[], SHARDS, PFC_ERR_NULL_ARGUMENT, "batches", &grad);
    for n in [0, 1, 3, u32::MAX] {
        let b = if n == 0 { &good[..0] } else { &good[..] };
        bad_step(&format!("{n} batches for {SHARDS} shards"), kind, h, h, b, n, PFC_ERR_INVALID_ARGUMENT, "shard", &grad);
    }

    // NULL pointers inside a batch with rows.
    let mut b = good.clone();
    b[1].embeddings = null();
    bad_step("NULL embeddings", kind, h, h, &b, SHARDS, PFC_ERR_NULL_ARGUMENT, "embeddings", &grad);
    let mut b = good.clone();
    b[0].labels = null();
    bad_step("NULL labels", kind, h, h, &b, SHARDS, PFC_ERR_NULL_ARGUMENT, "labels", &grad);
    if train {
        let mut b = good.clone();
        b[1].grad_embeddings = null_mut();
        bad_step("NULL grad_embeddings", kind, h, h, &b, SHARDS, PFC_ERR_NULL_ARGUMENT, "grad_embeddings", &grad);
    }

    // Unknown enum values.
    for dtype in [3, -1, i32::MAX, i32::MIN] {
        let mut b = good.clone();
        b[1].dtype = dtype;
        bad_step(&format!("dtype {dtype}"), kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "dtype", &grad);
    }
    for memory in [2, -1, i32::MAX] {
        let mut b = good.clone();
        b[0].memory = memory;
        bad_step(&format!("memory {memory}"), kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "memory", &grad);
    }
    let mut b = good.clone();
    b[1].memory = PFC_MEMORY_DEVICE;
    bad_step("memory = DEVICE on the CPU backend", kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "device", &grad);

    // Sizes: empty global batch, absurd batch_size (rejected before anything is read).
    let mut b = good.clone();
    b.iter_mut().for_each(|x| x.batch_size = 0);
    bad_step("empty global batch", kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "empty", &grad);
    b.iter_mut().for_each(|x| {
        x.embeddings = null();
        x.labels = null();
        x.grad_embeddings = null_mut();
    });
    bad_step("empty global batch, NULL pointers", kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "empty", &grad);
    for rows in [(1u64 << 24) + 1, 1 << 40, u64::MAX] {
        let mut b = good.clone();
        b[1].batch_size = rows;
        bad_step(&format!("batch_size {rows}"), kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "batch_size", &grad);
    }

    // Labels outside [0, C), first and last row, either shard.
    for (row, label) in [(0, -1), (N - 1, classes as i64), (ROWS[0], i64::MIN), (2, i64::MAX), (ROWS[0] - 1, classes as i64 + 1)] {
        let mut l = labels.clone();
        l[row] = label;
        let b = batches_of(emb.as_ptr().cast(), &l, grad_ptr, 4, PFC_DTYPE_F32, D, &ROWS);
        bad_step(&format!("label {label} at row {row}"), kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "label", &grad);
    }

    // NaN and Inf in f32 embeddings.
    for (at, v) in [(0, f32::NAN), (N * D - 1, f32::INFINITY), (ROWS[0] * D + 3, f32::NEG_INFINITY), (17, -f32::NAN)] {
        let mut e = emb.clone();
        e[at] = v;
        let b = batches_of(e.as_ptr().cast(), &labels, grad_ptr, 4, PFC_DTYPE_F32, D, &ROWS);
        bad_step(&format!("f32 embedding {v} at {at}"), kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "NaN", &grad);
    }

    // NaN and Inf in f16 and bf16 embeddings (gradients in the same dtype).
    let mut grad16 = vec![f16::from_f32(GRAD_SENTINEL); N * D];
    let e16: Vec<f16> = emb.iter().map(|&v| f16::from_f32(v)).collect();
    for (at, v) in [(0, f16::NAN), (N * D - 1, f16::INFINITY), (ROWS[0] * D, f16::NEG_INFINITY)] {
        let mut e = e16.clone();
        e[at] = v;
        let b = batches_of(e.as_ptr().cast(), &labels, grad16.as_mut_ptr().cast(), 2, PFC_DTYPE_F16, D, &ROWS);
        bad_step(&format!("f16 embedding {v} at {at}"), kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "NaN", &grad);
        assert!(grad16.iter().all(|g| g.to_bits() == f16::from_f32(GRAD_SENTINEL).to_bits()), "f16 gradient written by a failed call");
    }
    let mut gradb = vec![bf16::from_f32(GRAD_SENTINEL); N * D];
    let eb: Vec<bf16> = emb.iter().map(|&v| bf16::from_f32(v)).collect();
    for (at, v) in [(5, bf16::NAN), (N * D - 2, bf16::INFINITY)] {
        let mut e = eb.clone();
        e[at] = v;
        let b = batches_of(e.as_ptr().cast(), &labels, gradb.as_mut_ptr().cast(), 2, PFC_DTYPE_BF16, D, &ROWS);
        bad_step(&format!("bf16 embedding {v} at {at}"), kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "NaN", &grad);
        assert!(gradb.iter().all(|g| g.to_bits() == bf16::from_f32(GRAD_SENTINEL).to_bits()), "bf16 gradient written by a failed call");
    }

    // A gradient buffer overlapping its embeddings (train only: evaluate ignores grad_embeddings).
    if train {
        // Room past the end, so that a wrongly accepted gradient would not write out of bounds.
        let mut e = emb.clone();
        e.resize(N * D + 2 * D, 0.0);
        let base: *mut f32 = e.as_mut_ptr();
        for (name, offset) in
            [("same buffer", 0isize), ("shifted by one value", 1), ("ending inside", -(ROWS[1] as isize * D as isize) + 1)]
        {
            let mut b = batches_of(base.cast_const().cast(), &labels, grad_ptr, 4, PFC_DTYPE_F32, D, &ROWS);
            // Batch 1's embeddings start at row ROWS[0]; point its gradient near them.
            let emb1 = base.wrapping_add(ROWS[0] * D);
            b[1].grad_embeddings = emb1.wrapping_offset(offset).cast();
            bad_step(
                &format!("grad_embeddings overlapping embeddings ({name})"),
                kind,
                h,
                h,
                &b,
                SHARDS,
                PFC_ERR_INVALID_ARGUMENT,
                "overlap",
                &grad,
            );
            assert!(e[..N * D] == emb[..], "embeddings written through an overlapping gradient");
        }
        // Across batches: into another batch's embeddings, a shared gradient buffer, the labels.
        let mut b = good.clone();
        b[0].grad_embeddings = emb.as_ptr().wrapping_add(ROWS[0] * D).cast_mut().cast();
        bad_step("grad_embeddings over another batch's embeddings", kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "overlap", &grad);
        let mut b = good.clone();
        b[1].grad_embeddings = b[0].grad_embeddings;
        bad_step("two batches sharing grad_embeddings", kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "overlap", &grad);
        let mut wide_labels = vec![0i64; N * D];
        wide_labels[..N].copy_from_slice(&labels);
        let mut b = batches_of(emb.as_ptr().cast(), &wide_labels, grad_ptr, 4, PFC_DTYPE_F32, D, &ROWS);
        b[0].labels = wide_labels.as_ptr();
        b[1].labels = wide_labels[ROWS[0]..].as_ptr();
        b[1].grad_embeddings = wide_labels.as_mut_ptr().cast();
        bad_step("grad_embeddings over the labels", kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "overlap", &grad);
        assert!(wide_labels[..N] == labels[..], "labels written through an overlapping gradient");
    }

    // Misaligned pointers: Rust slices need aligned elements, so they are refused, not read.
    let bytes: Vec<u8> = vec![0; (N * D + 4) * 8];
    let odd = |p: *const u8| p.wrapping_add(1);
    let aligned8 = bytes.as_ptr().wrapping_add(bytes.as_ptr().align_offset(8));
    let mut b = good.clone();
    b[0].embeddings = odd(aligned8).cast();
    bad_step("misaligned f32 embeddings", kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "aligned", &grad);
    let mut b = good.clone();
    b[1].labels = odd(aligned8).cast();
    bad_step("misaligned labels", kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "aligned", &grad);
    if train {
        let mut scratch = vec![0u64; N * D];
        let mut b = good.clone();
        b[1].grad_embeddings = odd(scratch.as_mut_ptr().cast()).cast_mut().cast();
        bad_step("misaligned grad_embeddings", kind, h, h, &b, SHARDS, PFC_ERR_INVALID_ARGUMENT, "aligned", &grad);
        assert!(scratch.iter().all(|&v| v == 0), "misaligned gradient buffer written");
    }
}

// ------------------------------------------------------------------------------------------------
// pfc_create, pfc_config_init, pfc_destroy

/// `pfc_create` must fail with `want` and a message naming `needle`, leaving `*out` untouched.
#[track_caller]
fn bad_create(what: &str, cfg: &pfc_config, want: pfc_status, needle: &str) {
    let sentinel = 0x5eed_usize as *mut pfc_head;
    let mut out = sentinel;
    prime_last_error();
    let status = pfc_create(cfg, &mut out);
    if status == PFC_OK {
        pfc_destroy(out);
    }
    expect_err(what, status, want, needle);
    assert_eq!(out, sentinel, "{what}: *out written by a failed pfc_create");
}

#[test]
fn create_rejects_bad_configs() {
    // The base configuration is valid.
    let h = TestHead::new(&config());
    drop(h);

    let sentinel = 0x5eed_usize as *mut pfc_head;
    let mut out = sentinel;
    prime_last_error();
    let s = pfc_create(null(), &mut out);
    expect_err("NULL cfg", s, PFC_ERR_NULL_ARGUMENT, "cfg");
    assert_eq!(out, sentinel);
    prime_last_error();
    expect_err("NULL out", pfc_create(&config(), null_mut()), PFC_ERR_NULL_ARGUMENT, "out");

    type Edit = Box<dyn Fn(&mut pfc_config)>;
    let cases: Vec<(&str, Edit, pfc_status, &str)> = vec![
        // Layout.
        ("struct_size 0", Box::new(|c| c.struct_size = 0), PFC_ERR_INCOMPATIBLE, "struct_size"),
        ("struct_size no layout had", Box::new(|c| c.struct_size -= 4), PFC_ERR_INCOMPATIBLE, "struct_size"),
        ("struct_size larger", Box::new(|c| c.struct_size += 8), PFC_ERR_INCOMPATIBLE, "struct_size"),
        ("struct_size garbage", Box::new(|c| c.struct_size = u32::MAX), PFC_ERR_INCOMPATIBLE, "struct_size"),
        // Sizes.
        ("num_classes 0", Box::new(|c| c.num_classes = 0), PFC_ERR_INVALID_ARGUMENT, "num_classes"),
        ("num_classes 2^40 + 1", Box::new(|c| c.num_classes = (1 << 40) + 1), PFC_ERR_INVALID_ARGUMENT, "num_classes"),
        ("num_classes u64::MAX", Box::new(|c| c.num_classes = u64::MAX), PFC_ERR_INVALID_ARGUMENT, "num_classes"),
        ("num_classes < shards", Box::new(|c| c.num_classes = 1), PFC_ERR_INVALID_ARGUMENT, "num_classes"),
        ("embedding_dim 0", Box::new(|c| c.embedding_dim = 0), PFC_ERR_INVALID_ARGUMENT, "embedding_dim"),
        ("embedding_dim 65537", Box::new(|c| c.embedding_dim = 65537), PFC_ERR_INVALID_ARGUMENT, "embedding_dim"),
        ("embedding_dim u32::MAX", Box::new(|c| c.embedding_dim = u32::MAX), PFC_ERR_INVALID_ARGUMENT, "embedding_dim"),
        ("local_shards 0", Box::new(|c| c.local_shards = 0), PFC_ERR_INVALID_ARGUMENT, "local_shards"),
        ("local_shards 65", Box::new(|c| c.local_shards = 65), PFC_ERR_INVALID_ARGUMENT, "local_shards"),
        ("local_shards u32::MAX", Box::new(|c| c.local_shards = u32::MAX), PFC_ERR_INVALID_ARGUMENT, "local_shards"),
        // A valid but unallocatable size: 2^40 classes × 65536 floats (2^58 bytes).
        (
            "2^40 classes of dimension 65536",
            Box::new(|c| {
                c.num_classes = 1 << 40;
                c.embedding_dim = 65536;
                c.local_shards = 1;
            }),
            PFC_ERR_OUT_OF_MEMORY,
            "allocate",
        ),
        // Sampling.
        ("sample_rate 0", Box::new(|c| c.sample_rate = 0.0), PFC_ERR_INVALID_ARGUMENT, "sample_rate"),
        ("sample_rate -0.5", Box::new(|c| c.sample_rate = -0.5), PFC_ERR_INVALID_ARGUMENT, "sample_rate"),
        ("sample_rate 1.0001", Box::new(|c| c.sample_rate = 1.0001), PFC_ERR_INVALID_ARGUMENT, "sample_rate"),
        ("sample_rate NaN", Box::new(|c| c.sample_rate = f32::NAN), PFC_ERR_INVALID_ARGUMENT, "sample_rate"),
        ("sample_rate Inf", Box::new(|c| c.sample_rate = f32::INFINITY), PFC_ERR_INVALID_ARGUMENT, "sample_rate"),
        // Unknown enum values.
        ("backend 2", Box::new(|c| c.backend = 2), PFC_ERR_INVALID_ARGUMENT, "backend"),
        ("backend -1", Box::new(|c| c.backend = -1), PFC_ERR_INVALID_ARGUMENT, "backend"),
        ("optimizer 2", Box::new(|c| c.optimizer = 2), PFC_ERR_INVALID_ARGUMENT, "optimizer"),
        ("optimizer -1", Box::new(|c| c.optimizer = -1), PFC_ERR_INVALID_ARGUMENT, "optimizer"),
        ("margin_grad 2", Box::new(|c| c.margin_grad = 2), PFC_ERR_INVALID_ARGUMENT, "margin_grad"),
        ("margin_grad i32::MIN", Box::new(|c| c.margin_grad = i32::MIN), PFC_ERR_INVALID_ARGUMENT, "margin_grad"),
        ("compute_dtype 3", Box::new(|c| c.compute_dtype = 3), PFC_ERR_INVALID_ARGUMENT, "compute_dtype"),
        ("compute_dtype -1", Box::new(|c| c.compute_dtype = -1), PFC_ERR_INVALID_ARGUMENT, "compute_dtype"),
        ("arcface_fallback 2", Box::new(|c| c.arcface_fallback = 2), PFC_ERR_INVALID_ARGUMENT, "arcface_fallback"),
        ("arcface_fallback -1", Box::new(|c| c.arcface_fallback = -1), PFC_ERR_INVALID_ARGUMENT, "arcface_fallback"),
        // Margin and optimizer values.
        ("scale 0", Box::new(|c| c.scale = 0.0), PFC_ERR_INVALID_ARGUMENT, "scale"),
        ("scale NaN", Box::new(|c| c.scale = f32::NAN), PFC_ERR_INVALID_ARGUMENT, "scale"),
        ("scale 3e38", Box::new(|c| c.scale = 3e38), PFC_ERR_INVALID_ARGUMENT, "scale"),
        ("m1 NaN", Box::new(|c| c.m1 = f32::NAN), PFC_ERR_INVALID_ARGUMENT, "m1"),
        ("m2 4", Box::new(|c| c.m2 = 4.0), PFC_ERR_INVALID_ARGUMENT, "m2"),
        ("m3 Inf", Box::new(|c| c.m3 = f32::INFINITY), PFC_ERR_INVALID_ARGUMENT, "m3"),
        ("interclass_filter 1", Box::new(|c| c.interclass_filter = 1.0), PFC_ERR_INVALID_ARGUMENT, "interclass_filter"),
        ("interclass_filter -0.1", Box::new(|c| c.interclass_filter = -0.1), PFC_ERR_INVALID_ARGUMENT, "interclass_filter"),
        ("lr -1", Box::new(|c| c.lr = -1.0), PFC_ERR_INVALID_ARGUMENT, "lr"),
        ("lr NaN", Box::new(|c| c.lr = f32::NAN), PFC_ERR_INVALID_ARGUMENT, "lr"),
        ("lr f32::MAX", Box::new(|c| c.lr = f32::MAX), PFC_ERR_INVALID_ARGUMENT, "lr"),
        ("weight_decay 1e30", Box::new(|c| c.weight_decay = 1e30), PFC_ERR_INVALID_ARGUMENT, "weight_decay"),
        ("momentum 1.5", Box::new(|c| c.momentum = 1.5), PFC_ERR_INVALID_ARGUMENT, "momentum"),
        ("weight_decay -1", Box::new(|c| c.weight_decay = -1.0), PFC_ERR_INVALID_ARGUMENT, "weight_decay"),
        (
            "AdamW beta1 1",
            Box::new(|c| {
                c.optimizer = PFC_OPTIMIZER_ADAMW;
                c.beta1 = 1.0;
            }),
            PFC_ERR_INVALID_ARGUMENT,
            "beta1",
        ),
        (
            "AdamW beta2 NaN",
            Box::new(|c| {
                c.optimizer = PFC_OPTIMIZER_ADAMW;
                c.beta2 = f32::NAN;
            }),
            PFC_ERR_INVALID_ARGUMENT,
            "beta2",
        ),
        (
            "AdamW eps 0",
            Box::new(|c| {
                c.optimizer = PFC_OPTIMIZER_ADAMW;
                c.eps = 0.0;
            }),
            PFC_ERR_INVALID_ARGUMENT,
            "eps",
        ),
        ("init_std -1", Box::new(|c| c.init_std = -1.0), PFC_ERR_INVALID_ARGUMENT, "init_std"),
        ("init_std NaN", Box::new(|c| c.init_std = f32::NAN), PFC_ERR_INVALID_ARGUMENT, "init_std"),
        ("init_std f32::MAX", Box::new(|c| c.init_std = f32::MAX), PFC_ERR_INVALID_ARGUMENT, "init_std"),
        // Process layout.
        ("world_size < local_shards", Box::new(|c| c.world_size = 1), PFC_ERR_INVALID_ARGUMENT, "world_size"),
        (
            "first_rank past world_size",
            Box::new(|c| {
                c.world_size = 2;
                c.first_rank = 1;
            }),
            PFC_ERR_INVALID_ARGUMENT,
            "first_rank",
        ),
        ("world_size > local_shards without nccl_id", Box::new(|c| c.world_size = 4), PFC_ERR_NULL_ARGUMENT, "nccl_id"),
        ("process_count 0", Box::new(|c| c.process_count = 0), PFC_ERR_INVALID_ARGUMENT, "process_count"),
        (
            "process_index past process_count",
            Box::new(|c| {
                c.process_count = 2;
                c.process_index = 2;
            }),
            PFC_ERR_INVALID_ARGUMENT,
            "process_index",
        ),
        ("process_count 2 without allgather", Box::new(|c| c.process_count = 2), PFC_ERR_NULL_ARGUMENT, "allgather"),
        // Backends.
        ("CUDA backend", Box::new(|c| c.backend = PFC_BACKEND_CUDA), PFC_ERR_UNAVAILABLE, "CUDA"),
        (
            "CUDA backend, one shard",
            Box::new(|c| {
                c.backend = PFC_BACKEND_CUDA;
                c.local_shards = 1;
            }),
            PFC_ERR_UNAVAILABLE,
            "CUDA",
        ),
    ];
    for (what, edit, want, needle) in &cases {
        let mut c = config();
        edit(&mut c);
        bad_create(what, &c, *want, needle);
    }

    // Pointers that only the CUDA backend or a multi-process run may use.
    let devices = [0i32, 1];
    let mut c = config();
    c.devices = devices.as_ptr();
    bad_create("devices with the CPU backend", &c, PFC_ERR_INVALID_ARGUMENT, "devices");
    let id = [7u8; PFC_NCCL_ID_BYTES];
    let mut c = config();
    c.world_size = 4;
    c.nccl_id = id.as_ptr();
    bad_create("multi-process CPU run", &c, PFC_ERR_UNAVAILABLE, "world_size");
}

#[test]
fn config_init_and_destroy_accept_null() {
    pfc_config_init(null_mut());
    pfc_destroy(null_mut());
    // pfc_config_init overwrites every field, whatever was there.
    let mut a = std::mem::MaybeUninit::<pfc_config>::uninit();
    unsafe { std::ptr::write_bytes(a.as_mut_ptr(), 0xa5, 1) };
    pfc_config_init(a.as_mut_ptr());
    let a = unsafe { a.assume_init() };
    assert_eq!(a.struct_size as usize, std::mem::size_of::<pfc_config>());
    assert!(a.devices.is_null() && a.nccl_id.is_null());
    assert_eq!((a.num_classes, a.embedding_dim, a.world_size, a.first_rank, a.local_shards), (0, 0, 0, 0, 1));
    // The defaults alone do not make a head: num_classes and embedding_dim are required.
    bad_create("defaults only", &a, PFC_ERR_INVALID_ARGUMENT, "num_classes");
}

// ------------------------------------------------------------------------------------------------
// pfc_train_step, pfc_evaluate

#[test]
fn train_step_rejects_bad_batches() {
    let h = TestHead::new(&config());
    bad_batches(Call::Train, h.0, C);
}

#[test]
fn evaluate_rejects_bad_batches() {
    let h = TestHead::new(&config());
    bad_batches(Call::Evaluate, h.0, C);
}

/// NULL stats is allowed; evaluation ignores grad_embeddings (NULL or not) and changes nothing.
#[test]
fn optional_pointers_may_be_null() {
    let h = TestHead::new(&config());
    let emb = values(N * D, 2);
    let labels = labels_for(N, C, 2);
    let b = batches_of(emb.as_ptr().cast(), &labels, null_mut(), 4, PFC_DTYPE_F32, D, &ROWS);
    let before = center_bits(h.0, D);
    ok(pfc_evaluate(h.0, b.as_ptr(), SHARDS, null_mut()));
    let mut stats = stats_sentinel();
    ok(pfc_evaluate(h.0, b.as_ptr(), SHARDS, &mut stats));
    assert_eq!((stats.step, stats.global_batch, stats.sampled_classes), (0, N as u64, C));
    assert!(center_bits(h.0, D) == before, "evaluate changed the centers");

    let mut grad = vec![0f32; N * D];
    let b = batches_of(emb.as_ptr().cast(), &labels, grad.as_mut_ptr().cast(), 4, PFC_DTYPE_F32, D, &ROWS);
    ok(pfc_train_step(h.0, b.as_ptr(), SHARDS, null_mut()));
    assert!(grad.iter().any(|&g| g != 0.0), "no gradient written with stats == NULL");
    ok(pfc_train_step(h.0, b.as_ptr(), SHARDS, &mut stats));
    assert_eq!(stats.step, 2, "a step with stats == NULL was not counted");

    // One shard may be empty, with NULL pointers.
    let mut b = batches_of(emb.as_ptr().cast(), &labels, grad.as_mut_ptr().cast(), 4, PFC_DTYPE_F32, D, &[N, 0]);
    b[1].embeddings = null();
    b[1].labels = null();
    b[1].grad_embeddings = null_mut();
    ok(pfc_train_step(h.0, b.as_ptr(), SHARDS, &mut stats));
    assert_eq!((stats.step, stats.global_batch), (3, N as u64));
}

// ------------------------------------------------------------------------------------------------
// pfc_set_learning_rate, pfc_local_classes, pfc_get_centers, pfc_set_centers

#[test]
fn set_learning_rate_rejects_bad_values() {
    let h = TestHead::new(&config());
    bad_call("NULL head", h.0, PFC_ERR_NULL_ARGUMENT, "head", || pfc_set_learning_rate(null_mut(), 0.1));
    for lr in [f32::NAN, -f32::NAN, -1.0, -1e-30, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 1e5] {
        bad_call(&format!("lr {lr}"), h.0, PFC_ERR_INVALID_ARGUMENT, "learning rate", || pfc_set_learning_rate(h.0, lr));
    }
    ok(pfc_set_learning_rate(h.0, 0.0));
    ok(pfc_set_learning_rate(h.0, 0.05));
}

#[test]
fn local_classes_rejects_null_and_writes_nothing() {
    let h = TestHead::new(&config());
    let (mut first, mut count) = (111u64, 222u64);
    bad_call("NULL head", h.0, PFC_ERR_NULL_ARGUMENT, "head", || pfc_local_classes(null(), &mut first, &mut count));
    assert_eq!((first, count), (111, 222), "outputs written with a NULL head");
    bad_call("NULL first", h.0, PFC_ERR_NULL_ARGUMENT, "first", || pfc_local_classes(h.0, null_mut(), &mut count));
    assert_eq!(count, 222, "count written although first is NULL");
    bad_call("NULL count", h.0, PFC_ERR_NULL_ARGUMENT, "count", || pfc_local_classes(h.0, &mut first, null_mut()));
    assert_eq!(first, 111, "first written although count is NULL");
    bad_call("both NULL", h.0, PFC_ERR_NULL_ARGUMENT, "NULL", || pfc_local_classes(h.0, null_mut(), null_mut()));
    ok(pfc_local_classes(h.0, &mut first, &mut count));
    assert_eq!((first, count), (0, C));
}

/// Ranges that are not within this process's classes `[0, C)`.
fn bad_ranges() -> Vec<(u64, u64)> {
    vec![(C, 1), (C - 1, 2), (0, C + 1), (5, C), (u64::MAX, 1), (1, u64::MAX), (u64::MAX, u64::MAX), (1 << 40, 3)]
}

#[test]
fn get_centers_rejects_bad_input_and_writes_nothing() {
    let h = TestHead::new(&config());
    let mut out = vec![GRAD_SENTINEL; (C as usize + 1) * D];
    let untouched = |out: &[f32]| out.iter().all(|v| v.to_bits() == GRAD_SENTINEL.to_bits());
    let p = out.as_mut_ptr();
    bad_call("NULL head", h.0, PFC_ERR_NULL_ARGUMENT, "head", || pfc_get_centers(null(), 0, 1, 0, p));
    bad_call("NULL out", h.0, PFC_ERR_NULL_ARGUMENT, "out", || pfc_get_centers(h.0, 0, 1, 0, null_mut()));
    for normalized in [2, -1, i32::MIN, i32::MAX] {
        bad_call(&format!("normalized = {normalized}"), h.0, PFC_ERR_INVALID_ARGUMENT, "normalized", || {
            pfc_get_centers(h.0, 0, 1, normalized, p)
        });
    }
    bad_call("count 0", h.0, PFC_ERR_INVALID_ARGUMENT, "count", || pfc_get_centers(h.0, 0, 0, 0, p));
    for (first, count) in bad_ranges() {
        for normalized in [0, 1] {
            bad_call(&format!("classes [{first}, +{count}) normalized {normalized}"), h.0, PFC_ERR_INVALID_ARGUMENT, "", || {
                pfc_get_centers(h.0, first, count, normalized, p)
            });
            let msg = last_error();
            assert!(msg.contains("class") || msg.contains("count"), "range error does not say what is wrong: {msg:?}");
        }
    }
    let misaligned = p.cast::<u8>().wrapping_add(1).cast::<f32>();
    bad_call("misaligned out", h.0, PFC_ERR_INVALID_ARGUMENT, "aligned", || pfc_get_centers(h.0, 0, 1, 0, misaligned));
    assert!(untouched(&out), "get_centers wrote its output on failure");
    // A valid call writes exactly count × d values.
    ok(pfc_get_centers(h.0, 3, 4, 1, p));
    assert!(out[..4 * D].iter().all(|v| v.is_finite() && v.to_bits() != GRAD_SENTINEL.to_bits()));
    assert!(untouched(&out[4 * D..]), "get_centers wrote past count × embedding_dim");
}

#[test]
fn set_centers_rejects_bad_input_and_changes_nothing() {
    let h = TestHead::new(&config());
    let good = values(C as usize * D, 3);
    let p = good.as_ptr();
    bad_call("NULL head", h.0, PFC_ERR_NULL_ARGUMENT, "head", || pfc_set_centers(null_mut(), 0, 1, p));
    bad_call("NULL in", h.0, PFC_ERR_NULL_ARGUMENT, "in", || pfc_set_centers(h.0, 0, 1, null()));
    bad_call("count 0", h.0, PFC_ERR_INVALID_ARGUMENT, "count", || pfc_set_centers(h.0, 0, 0, p));
    for (first, count) in bad_ranges() {
        bad_call(&format!("classes [{first}, +{count})"), h.0, PFC_ERR_INVALID_ARGUMENT, "", || pfc_set_centers(h.0, first, count, p));
        let msg = last_error();
        assert!(msg.contains("class") || msg.contains("count"), "range error does not say what is wrong: {msg:?}");
    }
    // One non-finite value anywhere, in a range spanning both shards, rejects the whole call.
    for (at, v) in [(0, f32::NAN), (C as usize * D - 1, f32::INFINITY), (5 * D + 2, f32::NEG_INFINITY), (4 * D, -f32::NAN)] {
        let mut bad = good.clone();
        bad[at] = v;
        bad_call(&format!("{v} at value {at}"), h.0, PFC_ERR_INVALID_ARGUMENT, "NaN", || pfc_set_centers(h.0, 0, C, bad.as_ptr()));
        bad_call(&format!("{v} at value {at} (sub-range)"), h.0, PFC_ERR_INVALID_ARGUMENT, "NaN", || {
            pfc_set_centers(h.0, (at / D) as u64, 1, bad[at / D * D..].as_ptr())
        });
    }
    ok(pfc_set_centers(h.0, 0, C, p));
    assert!(center_bits(h.0, D) == good.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
}

// ------------------------------------------------------------------------------------------------
// Failed calls leave no trace: the next steps equal those of a head that never saw them.

#[test]
fn failed_calls_do_not_change_later_steps() {
    // Sampling at r = 0.5 depends on the step counter; momentum on the optimizer state.
    let classes = 40u64;
    let mut cfg = config();
    cfg.num_classes = classes;
    cfg.sample_rate = 0.5;
    cfg.lr = 0.2;
    let (a, b) = (TestHead::new(&cfg), TestHead::new(&cfg));
    assert!(center_bits(a.0, D) == center_bits(b.0, D), "two heads with one seed start differently");

    let step_data: Vec<(Vec<f32>, Vec<i64>)> = (0..4).map(|t| (values(N * D, 100 + t), labels_for(N, classes, t))).collect();
    let step = |h: &TestHead, t: usize, with_stats: bool| -> (pfc_step_stats, Vec<f32>) {
        let (emb, labels) = &step_data[t];
        let mut grad = vec![0f32; N * D];
        let b = batches_of(emb.as_ptr().cast(), labels, grad.as_mut_ptr().cast(), 4, PFC_DTYPE_F32, D, &ROWS);
        let mut stats = stats_sentinel();
        ok(pfc_train_step(h.0, b.as_ptr(), SHARDS, if with_stats { &mut stats } else { null_mut() }));
        (stats, grad)
    };
    let same = |what: &str, (sa, ga): &(pfc_step_stats, Vec<f32>), (sb, gb): &(pfc_step_stats, Vec<f32>)| {
        assert!(
            same_stats(sa, sb),
            "{what}: stats differ: {} {} {} vs {} {} {}",
            sa.loss,
            sa.accuracy,
            sa.step,
            sb.loss,
            sb.accuracy,
            sb.step
        );
        assert!(ga.iter().zip(gb).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: gradients differ");
        assert!(center_bits(a.0, D) == center_bits(b.0, D), "{what}: centers differ");
    };

    same("step 1", &step(&a, 0, true), &step(&b, 0, true));

    // Every kind of failure on `a`, plus calls that succeed but must change nothing.
    bad_batches(Call::Train, a.0, classes);
    bad_batches(Call::Evaluate, a.0, classes);
    for lr in [f32::NAN, -1.0, f32::INFINITY] {
        assert_eq!(pfc_set_learning_rate(a.0, lr), PFC_ERR_INVALID_ARGUMENT);
    }
    let mut nan_centers = values(classes as usize * D, 9);
    nan_centers[classes as usize * D - 1] = f32::NAN;
    assert_eq!(pfc_set_centers(a.0, 0, classes, nan_centers.as_ptr()), PFC_ERR_INVALID_ARGUMENT);
    assert_eq!(pfc_set_centers(a.0, 0, classes + 1, nan_centers.as_ptr()), PFC_ERR_INVALID_ARGUMENT);
    assert_eq!(pfc_get_centers(a.0, 0, classes, 2, nan_centers.as_mut_ptr()), PFC_ERR_INVALID_ARGUMENT);
    let (emb, labels) = &step_data[1];
    let eval = batches_of(emb.as_ptr().cast(), labels, null_mut(), 4, PFC_DTYPE_F32, D, &ROWS);
    let mut stats = stats_sentinel();
    ok(pfc_evaluate(a.0, eval.as_ptr(), SHARDS, &mut stats));
    assert_eq!(stats.step, 1);
    let _ = center_bits(a.0, D);

    let s2 = (step(&a, 1, true), step(&b, 1, true));
    assert_eq!(s2.0 .0.step, 2, "failed calls moved the step counter");
    same("step 2 after the failed calls", &s2.0, &s2.1);
    // stats == NULL changes nothing but the reporting.
    let (ga, gb) = (step(&a, 2, false).1, step(&b, 2, true).1);
    assert!(ga.iter().zip(&gb).all(|(x, y)| x.to_bits() == y.to_bits()), "step 3 gradients differ");
    same("step 4", &step(&a, 3, true), &step(&b, 3, true));
}

// ------------------------------------------------------------------------------------------------
// pfc_last_error, pfc_version

#[test]
fn last_error_truncates_and_reports_full_length() {
    prime_last_error();
    let full = last_error();
    let len = pfc_last_error(null_mut(), 0);
    assert_eq!(len, full.len());
    assert_eq!(pfc_last_error(null_mut(), 64), len, "NULL buffer with a capacity");
    let mut buf = [b'x'; 16];
    assert_eq!(pfc_last_error(buf.as_mut_ptr().cast(), 0), len);
    assert!(buf.iter().all(|&c| c == b'x'), "cap 0 wrote to the buffer");
    assert_eq!(pfc_last_error(buf.as_mut_ptr().cast(), 1), len);
    assert_eq!(&buf[..2], b"\0x");
    assert_eq!(pfc_last_error(buf.as_mut_ptr().cast(), 6), len);
    assert_eq!(&buf[..5], &full.as_bytes()[..5]);
    assert_eq!(buf[5], 0);
    assert!(buf[6..].iter().all(|&c| c == b'x'), "wrote past cap");
    let mut exact = vec![b'x'; len + 2];
    assert_eq!(pfc_last_error(exact.as_mut_ptr().cast(), len + 1), len);
    assert_eq!(&exact[..len], full.as_bytes());
    assert_eq!(&exact[len..], b"\0x");
    // The message is per thread.
    let other = std::thread::spawn(|| pfc_last_error(null_mut(), 0)).join().unwrap();
    assert_eq!(other, 0, "a fresh thread sees another thread's error");
}

#[test]
fn version_is_static_semver() {
    let v = pfc_version();
    assert!(!v.is_null());
    assert_eq!(v, pfc_version());
    let s = unsafe { std::ffi::CStr::from_ptr(v) }.to_str().unwrap();
    assert_eq!(s, env!("CARGO_PKG_VERSION"));
    assert_eq!(s.split('.').count(), 3);
}
