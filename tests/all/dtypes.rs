//! Half-precision inputs and compute dtypes through the C ABI.

use crate::common::*;
use half::{bf16, f16};
use partialfc::ffi::*;

const C: u64 = 300;
const D: usize = 64;
const N: usize = 32;

fn data(seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut e = vec![0f32; N * D];
    partialfc::rng::init_center(seed, 1, 1.0, &mut e);
    let labels = (0..N).map(|i| (partialfc::rng::at(seed, i as u64) % C) as i64).collect();
    (e, labels)
}

fn config(compute: i32, rate: f32) -> pfc_config {
    let mut c = default_config();
    c.num_classes = C;
    c.embedding_dim = D as u32;
    c.compute_dtype = compute;
    c.sample_rate = rate;
    c.scale = 16.0;
    c
}

fn step_raw(head: &TestHead, emb: *const core::ffi::c_void, grad: *mut core::ffi::c_void, labels: &[i64], dtype: i32) -> pfc_step_stats {
    let b = pfc_batch {
        embeddings: emb,
        labels: labels.as_ptr(),
        grad_embeddings: grad,
        batch_size: labels.len() as u64,
        dtype,
        memory: PFC_MEMORY_HOST,
        stream: std::ptr::null_mut(),
    };
    let mut st = pfc_step_stats::default();
    ok(pfc_train_step(head.0, &b, 1, &mut st));
    st
}

#[test]
fn half_precision_embeddings_give_the_f32_result_rounded() {
    let (e, labels) = data(3);
    // Inputs exactly representable in each half type, so the f32 run sees the same values.
    let e16: Vec<f16> = e.iter().map(|&v| f16::from_f32(v)).collect();
    let eb16: Vec<bf16> = e.iter().map(|&v| bf16::from_f32(v)).collect();
    for dtype in [PFC_DTYPE_F16, PFC_DTYPE_BF16] {
        let as_f32: Vec<f32> = if dtype == PFC_DTYPE_F16 { e16.iter().map(|v| v.to_f32()).collect() } else { eb16.iter().map(|v| v.to_f32()).collect() };
        let reference = TestHead::new(&config(PFC_DTYPE_F32, 1.0));
        let (st32, g32) = reference.step(&as_f32, &labels, D, &[N]);
        let head = TestHead::new(&config(PFC_DTYPE_F32, 1.0));
        let mut g = vec![0u16; N * D];
        let src: *const core::ffi::c_void = if dtype == PFC_DTYPE_F16 { e16.as_ptr().cast() } else { eb16.as_ptr().cast() };
        let st = step_raw(&head, src, g.as_mut_ptr().cast(), &labels, dtype);
        assert_eq!(st.loss, st32.loss);
        for (i, (&bits, &want)) in g.iter().zip(&g32).enumerate() {
            let expect = if dtype == PFC_DTYPE_F16 { f16::from_f32(want).to_bits() } else { bf16::from_f32(want).to_bits() };
            assert_eq!(bits, expect, "dtype {dtype} element {i}");
        }
        assert_eq!(head.centers(D), reference.centers(D));
    }
}

#[test]
fn half_precision_compute_stays_close_to_f32_and_really_rounds() {
    let (e, labels) = data(5);
    for rate in [1.0f32, 0.3] {
        let reference = TestHead::new(&config(PFC_DTYPE_F32, rate));
        let (st32, g32) = reference.step(&e, &labels, D, &[N]);
        let w32 = reference.centers(D);
        // bf16 keeps 8 mantissa bits, f16 11: tolerances follow.
        for (dtype, tol) in [(PFC_DTYPE_BF16, 3e-2), (PFC_DTYPE_F16, 4e-3)] {
            let head = TestHead::new(&config(dtype, rate));
            let (st, g) = head.step(&e, &labels, D, &[N]);
            assert!((st.loss - st32.loss).abs() / st32.loss < tol, "dtype {dtype} r {rate}: loss {} vs {}", st.loss, st32.loss);
            let eg = rel_err(&g, &g32);
            assert!(eg < 10.0 * tol && eg > 0.0, "dtype {dtype} r {rate}: gradient rel err {eg}");
            let w = head.centers(D);
            assert!(rel_err(&w, &w32) < tol && w != w32, "dtype {dtype} r {rate}: centers");
            assert_eq!(st.sampled_classes, st32.sampled_classes);
        }
    }
}
