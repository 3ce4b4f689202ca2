//! The CPU step with its GEMMs on oneDNN against the same step without it, and its f32 GEMMs on
//! the AVX-512 kernels against the `gemm` crate. Each side runs in a child process of this test
//! binary: one with the system's oneDNN, one where the loader cannot find it (`PFC_ONEDNN_LIBRARY`
//! naming a file that does not exist), one where it is switched off (empty), and one with
//! `PFC_CPU_GEMM=crate` as well, so each fallback is the real one a machine without libdnnl or
//! without AVX-512 takes.

use crate::common::*;
use partialfc::backend::cpu::gemm::{path, GemmPath};
use partialfc::batch::{Embeddings, GradOut, HostBatch};
use partialfc::config::{Config, DType};
use partialfc::ffi::*;
use partialfc::head::Head;
use std::path::{Path, PathBuf};

/// A step configuration: classes, local shards, rows of each local batch, dimension, sample rate.
struct Case {
    name: &'static str,
    classes: u64,
    rows: &'static [usize],
    d: usize,
    rate: f32,
}

/// Every GEMM shape the step uses: full and partial blocks of 256 classes, uneven shards, a shard
/// that samples nothing (rate 0.001 and no label on it), a local batch of no rows, d = 512.
const CASES: &[Case] = &[
    Case { name: "one shard, partial block", classes: 300, rows: &[32], d: 64, rate: 1.0 },
    Case { name: "three uneven shards, odd batch", classes: 1000, rows: &[13, 12, 12], d: 64, rate: 1.0 },
    Case { name: "sampled, d 512", classes: 6000, rows: &[40, 24], d: 512, rate: 0.1 },
    Case { name: "an empty shard", classes: 1000, rows: &[20, 0], d: 32, rate: 0.001 },
];

const STEPS: usize = 2;

fn run_case(case: &Case, dtype: i32) -> Vec<f32> {
    let n: usize = case.rows.iter().sum();
    let mut cfg = default_config();
    cfg.num_classes = case.classes;
    cfg.embedding_dim = case.d as u32;
    cfg.local_shards = case.rows.len() as u32;
    cfg.sample_rate = case.rate;
    cfg.compute_dtype = dtype;
    cfg.scale = 16.0;
    let head = TestHead::new(&cfg);
    let mut out = Vec::new();
    let mut rng = Rng(7 + case.classes);
    for _ in 0..STEPS {
        let emb: Vec<f32> = (0..n * case.d).map(|_| rng.normal() as f32).collect();
        // "an empty shard": every label on shard 0, so shard 1 samples no class at rate 0.001.
        let label_range = if case.rate < 0.01 { case.classes / 2 } else { case.classes };
        let labels: Vec<i64> = (0..n).map(|_| rng.below(label_range) as i64).collect();
        let (stats, grad) = head.step(&emb, &labels, case.d, case.rows);
        out.push(stats.loss as f32);
        out.extend_from_slice(&grad);
    }
    out.extend(head.centers(case.d));
    out
}

/// The GEMM path a head's step record reports (`PhaseTimes::gemm_path`) after one step.
fn reported_path(dtype: DType) -> &'static str {
    let cfg = Config { num_classes: 300, embedding_dim: 16, compute_dtype: dtype, ..Config::default() };
    let mut head = Head::new(cfg).unwrap();
    let (emb, labels) = (vec![0.5f32; 4 * 16], vec![1i64, 7, 299, 0]);
    let mut grad = vec![0f32; 4 * 16];
    head.train_step(&[HostBatch { embeddings: Embeddings::F32(&emb), labels: &labels }], &mut [GradOut::F32(&mut grad)]).unwrap();
    head.phase_times().gemm_path
}

/// In a child: runs every case in f32 and bf16 and writes the path taken (the process's choice,
/// and what a step's record reports) and the results.
fn child(dir: &Path) {
    let mut paths = String::new();
    for (dtype, name, d) in [(PFC_DTYPE_F32, "f32", DType::F32), (PFC_DTYPE_BF16, "bf16", DType::BF16)] {
        paths += &format!("{name} {} {}\n", path(d).name(), reported_path(d));
        for (i, case) in CASES.iter().enumerate() {
            let values = run_case(case, dtype);
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(dir.join(format!("{name}-{i}")), bytes).unwrap();
        }
    }
    std::fs::write(dir.join("paths"), paths).unwrap();
}

/// Runs this binary's `step_parity` in a child with `library` as `PFC_ONEDNN_LIBRARY` (None:
/// unset), the f32 GEMMs on the crate if `crate_f32`, and returns its result directory.
fn spawn(tag: &str, library: Option<&str>, crate_f32: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pfc-onednn-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = child_test(&test_path(module_path!(), "step_parity"));
    cmd.env("PFC_ONEDNN_TEST_OUT", &dir);
    match library {
        Some(l) => cmd.env("PFC_ONEDNN_LIBRARY", l),
        None => cmd.env_remove("PFC_ONEDNN_LIBRARY"),
    };
    match crate_f32 {
        true => cmd.env("PFC_CPU_GEMM", "crate"),
        false => cmd.env_remove("PFC_CPU_GEMM"),
    };
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{tag} child failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    dir
}

fn read(dir: &Path, name: &str) -> Vec<f32> {
    std::fs::read(dir.join(name)).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn step_parity() {
    if let Some(dir) = std::env::var_os("PFC_ONEDNN_TEST_OUT") {
        return child(Path::new(&dir));
    }
    let with = spawn("with", None, false);
    let missing = spawn("missing", Some("/nonexistent/libdnnl.so.2"), false);
    let off = spawn("off", Some(""), false);
    let plain = spawn("plain", Some(""), true);
    let paths = |d: &Path| std::fs::read_to_string(d.join("paths")).unwrap();
    // This machine has AVX-512 with AVX512-BF16 (the setup installs oneDNN): bf16 steps run on
    // oneDNN, f32 on the AVX-512 kernels, as do bf16 steps' rounded inputs without oneDNN.
    assert_eq!(paths(&with), format!("f32 {0} {0}\nbf16 {1} {1}\n", GemmPath::Avx512F32.name(), GemmPath::OneDnnBf16.name()));
    for d in [&missing, &off] {
        assert_eq!(paths(d), format!("f32 {0} {0}\nbf16 {0} {0}\n", GemmPath::Avx512F32.name()));
    }
    assert_eq!(paths(&plain), format!("f32 {0} {0}\nbf16 {0} {0}\n", GemmPath::Crate.name()));
    for (i, case) in CASES.iter().enumerate() {
        // Without oneDNN, hidden either way, the very same code runs: identical bits.
        for dtype in ["f32", "bf16"] {
            assert_eq!(read(&missing, &format!("{dtype}-{i}")), read(&off, &format!("{dtype}-{i}")), "{}: {dtype}", case.name);
        }
        // f32 never depends on oneDNN's presence.
        assert_eq!(read(&with, &format!("f32-{i}")), read(&off, &format!("f32-{i}")), "{}: f32", case.name);
        // bf16 on oneDNN's bf16 units vs bf16-rounded inputs multiplied in f32: the same inputs and
        // exact products, so again only the order of the f32 sums differs.
        let (a, b) = (read(&with, &format!("bf16-{i}")), read(&off, &format!("bf16-{i}")));
        let err = rel_err(&a, &b);
        assert!(err < 1e-5, "{}: bf16 oneDNN vs rounded inputs in f32: relative error {err:e}", case.name);
        // And bf16 stays within its input rounding of f32.
        let err = rel_err(&a, &read(&off, &format!("f32-{i}")));
        assert!(err < 2e-2, "{}: bf16 vs f32: relative error {err:e}", case.name);
        // The AVX-512 kernels against the crate (the paths above show the switch acted), on the
        // same f32 operands: at most the sums' order differs.
        for dtype in ["f32", "bf16"] {
            let (a, b) = (read(&off, &format!("{dtype}-{i}")), read(&plain, &format!("{dtype}-{i}")));
            let err = rel_err(&a, &b);
            assert!(err < 1e-5, "{}: {dtype}: AVX-512 kernels vs the crate: relative error {err:e}", case.name);
        }
    }
    for d in [with, missing, off, plain] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
