//! Exhausted memory in a step's own buffers (issue #11 item 5; SPEC §2b): evaluation scratch that
//! grows with the global batch, the gathered batch, the cosine and gradient scratch. Under an
//! address-space limit (RLIMIT_AS) in a child process, every such call returns
//! PFC_ERR_OUT_OF_MEMORY — the process is never aborted — and the head keeps working for batches
//! that fit.

use crate::common::*;
use partialfc::ffi::*;

const D: usize = 8;
const CHILD: &str = "PFC_OOM_CHILD";

fn vm_size_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// `shards` equal batches over all the rows.
fn batches(emb: &[f32], labels: &[i64], grad: &mut [f32], shards: usize) -> Vec<pfc_batch> {
    host_batches(emb, labels, grad, D, &vec![labels.len() / shards; shards])
}

/// Runs the test `name` of this module again in a child process with `env` set, and returns its
/// output; the child must not die.
fn run_child(name: &str, env: &str) -> String {
    let out = child_test(&test_path(module_path!(), name))
        .env(env, "1")
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "the child died ({}): {text}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    text
}

/// The value of the child's `key=value` line (the harness prints its own words before the child's
/// first line).
fn value(text: &str, key: &str) -> i32 {
    let token = text.split_whitespace().find(|t| t.starts_with(&format!("{key}="))).unwrap_or_else(|| panic!("no {key} in:\n{text}"));
    token.split('=').nth(1).unwrap().parse().unwrap()
}

/// Runs in the child: prints one `name=status` line per call.
fn child() {
    let mut cfg = default_config();
    cfg.num_classes = 2000;
    cfg.embedding_dim = D as u32;
    let one = TestHead::new(&cfg);
    cfg.local_shards = 2;
    let two = TestHead::new(&cfg);
    // Inputs first, then the limit: 2M rows (64 MiB of embeddings) whose evaluation scratch
    // (256 classes × the global batch per task) and cosines (2000 × 2M) cannot fit.
    let n = 1 << 21;
    let emb: Vec<f32> = (0..n * D).map(|i| ((i % 13) as f32) - 6.0 + 0.5).collect();
    let labels: Vec<i64> = (0..n).map(|i| (i % 2000) as i64).collect();
    let mut grad = vec![0f32; n * D];
    let small_n = 64;
    let mut small_grad = vec![0f32; small_n * D];
    let limit = vm_size_bytes() + (768 << 20);
    let rl = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: plain syscall on this process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0);
    let mut st = pfc_step_stats::default();
    for (name, head, shards) in [("one", &one, 1usize), ("two", &two, 2)] {
        let b = batches(&emb, &labels, &mut grad, shards);
        println!("{name}-evaluate={}", pfc_evaluate(head.0, b.as_ptr(), b.len() as u32, &mut st));
        println!("{name}-train={}", pfc_train_step(head.0, b.as_ptr(), b.len() as u32, &mut st));
        println!("{name}-compute={}", pfc_train_compute(head.0, b.as_ptr(), b.len() as u32, &mut st));
        let b = batches(&emb[..small_n * D], &labels[..small_n], &mut small_grad, shards);
        println!("{name}-small={}", pfc_train_step(head.0, b.as_ptr(), b.len() as u32, &mut st));
        println!("{name}-small-step={}", st.step);
    }
}

#[test]
fn step_buffers_report_out_of_memory_under_an_address_space_limit() {
    if std::env::var_os(CHILD).is_some() {
        child();
        std::process::exit(0);
    }
    let text = run_child("step_buffers_report_out_of_memory_under_an_address_space_limit", CHILD);
    let get = |key: &str| value(&text, key);
    for head in ["one", "two"] {
        for call in ["evaluate", "train", "compute"] {
            assert_eq!(get(&format!("{head}-{call}")), PFC_ERR_OUT_OF_MEMORY, "{head} {call}:\n{text}");
        }
        assert_eq!(get(&format!("{head}-small")), PFC_OK, "{head}: a batch that fits failed after the refusals:\n{text}");
        assert_eq!(get(&format!("{head}-small-step")), 1, "{head}: a refused step counted:\n{text}");
    }
}

const SAMPLER_CHILD: &str = "PFC_OOM_SAMPLER_CHILD";

/// The sampler's buffers grow with the shard, not the batch: under an address-space limit that the
/// centers fit but a key per class does not, a step is refused with PFC_ERR_OUT_OF_MEMORY, counts
/// nothing, and the same step succeeds once the limit is lifted.
#[test]
fn sampling_reports_out_of_memory_under_an_address_space_limit() {
    if std::env::var_os(SAMPLER_CHILD).is_some() {
        // 16M classes of d = 8: 1 GiB of centers and momentum, then 128 MiB of headroom, which the
        // sampler's flags (16 MiB) fit and its keys (16 bytes for each of 0.99 · 16M classes) do not.
        let mut cfg = default_config();
        cfg.num_classes = 16 << 20;
        cfg.embedding_dim = D as u32;
        cfg.sample_rate = 0.99;
        let head = TestHead::new(&cfg);
        let emb: Vec<f32> = (0..4 * D).map(|i| (i % 7) as f32 - 3.0 + 0.25).collect();
        let labels: Vec<i64> = vec![3, 70_000, 9_000_000, 16_000_000];
        let mut grad = vec![0f32; 4 * D];
        let b = batches(&emb, &labels, &mut grad, 1);
        let mut st = pfc_step_stats::default();
        let limit = vm_size_bytes() + (128 << 20);
        let mut rl = libc::rlimit { rlim_cur: limit, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: plain syscalls on this process.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0);
        println!("limited={}", pfc_train_step(head.0, b.as_ptr(), 1, &mut st));
        println!("limited-step={}", st.step);
        rl.rlim_cur = libc::RLIM_INFINITY;
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0);
        println!("lifted={}", pfc_train_step(head.0, b.as_ptr(), 1, &mut st));
        println!("lifted-step={}", st.step);
        std::process::exit(0);
    }
    let text = run_child("sampling_reports_out_of_memory_under_an_address_space_limit", SAMPLER_CHILD);
    for (key, want) in [("limited", PFC_ERR_OUT_OF_MEMORY), ("limited-step", 0), ("lifted", PFC_OK), ("lifted-step", 1)] {
        assert_eq!(value(&text, key), want, "{key}:\n{text}");
    }
}
