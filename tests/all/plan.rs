//! `pfc plan` end to end: the built binary's figures against values worked out by hand here.
//! Every expected figure is written as its arithmetic on literals, never through the plan's code.

use serde_json::Value;
use std::process::Command;

fn pfc(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pfc")).arg("plan").args(args).output().expect("run pfc plan");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn plan_json(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = pfc(&all);
    assert!(ok, "pfc plan {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn at(v: &Value, path: &str) -> u64 {
    let mut cur = v;
    for key in path.split('.') {
        cur = &cur[key];
    }
    cur.as_u64().unwrap_or_else(|| panic!("{path} is not an unsigned integer: {cur}"))
}

/// Checks one strategy's figures: memory (centers, optimizer, state row norms, center gradients,
/// logits) and communication (embedding all-gather, labels, softmax statistics, gradient), totals
/// included.
fn check(v: &Value, strategy: &str, memory: [u64; 5], comm: [u64; 4]) {
    let m = ["centers", "optimizer_state", "row_norms", "center_gradients", "logits"];
    for (key, want) in m.iter().zip(memory) {
        assert_eq!(at(v, &format!("{strategy}.memory.{key}")), want, "{strategy} memory {key}");
    }
    assert_eq!(at(v, &format!("{strategy}.memory.total")), memory.iter().sum::<u64>(), "{strategy} memory total");
    let c = ["embedding_all_gather", "label_all_gather", "softmax_statistics", "gradient"];
    for (key, want) in c.iter().zip(comm) {
        assert_eq!(at(v, &format!("{strategy}.communication.{key}")), want, "{strategy} communication {key}");
    }
    assert_eq!(at(v, &format!("{strategy}.communication.total")), comm.iter().sum::<u64>(), "{strategy} communication total");
}

#[test]
fn headline_configuration_is_the_default() {
    // S = 64, B = 64, N = 4096, d = 512, C = 10,000,000, r = 0.1, f32, SGD.
    let v = plan_json(&[]);
    assert_eq!(at(&v, "config.gpus"), 64);
    assert_eq!(at(&v, "config.global_batch"), 64 * 64);
    assert_eq!(at(&v, "config.classes"), 10_000_000);
    assert_eq!(at(&v, "config.dim"), 512);
    assert_eq!(v["config"]["sample_rate"].as_f64(), Some(0.1));
    assert_eq!(at(&v, "sharding.classes_per_gpu_max"), 156_250); // 10,000,000 / 64
    assert_eq!(at(&v, "sharding.classes_per_gpu_min"), 156_250);
    assert_eq!(at(&v, "sharding.sampled_per_gpu"), 15_625); // floor(0.1 × 156,250)

    // Data parallel: every GPU holds all C centers, its momentum and the dense C × d gradient;
    // logits B × C; the gradient all-reduce sends 2 × (L − L/S) elements with L = C × d.
    check(
        &v,
        "data_parallel",
        [
            10_000_000 * 512 * 4, // 20,480,000,000
            10_000_000 * 512 * 4,
            0,
            10_000_000 * 512 * 4,
            64 * 10_000_000 * 4, // 2,560,000,000
        ],
        [0, 0, 0, 2 * (5_120_000_000 - 80_000_000) * 4], // 40,320,000,000
    );
    assert_eq!(at(&v, "data_parallel.communication.gradient"), 40_320_000_000);
    assert_eq!(at(&v, "data_parallel.memory.total"), 64_000_000_000);

    // Model parallel and PartialFC share centers, state and all of the communication.
    let embeddings = 63 * 64 * 512 * 4; // (S−1) chunks of B × d f32 = 8,257,536
    let labels = 63 * 64 * 8 + 63 * 8; // i64 labels, then one u64 batch size per GPU = 32,760
    let softmax = 2 * (3 * 4096 - 3 * 64) * 4 + 2 * (3 * 4096 - 3 * 64) * 4; // 96,768 + 96,768 = 193,536
    assert_eq!((embeddings, labels, softmax), (8_257_536, 32_760, 193_536));
    let comm = [embeddings, labels, softmax, embeddings];
    // On GPUs (the default engine) nothing beside the momentum: the CUDA engine keeps no row norms.
    check(&v, "model_parallel", [156_250 * 512 * 4, 156_250 * 512 * 4, 0, 0, 4096 * 156_250 * 4], comm);
    check(&v, "partial_fc", [156_250 * 512 * 4, 156_250 * 512 * 4, 0, 0, 4096 * 15_625 * 4], comm);
    // The CPU engine keeps each momentum row's f32 norm beside it.
    let cpu = plan_json(&["--engine", "cpu"]);
    check(&cpu, "partial_fc", [156_250 * 512 * 4, 156_250 * 512 * 4, 156_250 * 4, 0, 4096 * 15_625 * 4], comm);
    assert_eq!(cpu["config"]["engine"], "cpu");
    assert_eq!(v["config"]["engine"], "cuda");
    assert_eq!(at(&v, "model_parallel.memory.logits"), 2_560_000_000);
    assert_eq!(at(&v, "partial_fc.memory.logits"), 256_000_000);
    assert_eq!(at(&v, "partial_fc.communication.total"), 16_741_368);

    // Collective payloads: the brief's "32 KB" is 2 f32 per sample; the engine moves 3 + 3.
    assert_eq!(at(&v, "payload.softmax_max_all_reduce"), 3 * 4096 * 4);
    assert_eq!(at(&v, "payload.softmax_sum_all_reduce"), 3 * 4096 * 4); // 49,152
    assert_eq!(at(&v, "payload.embedding_all_gather"), 4096 * 512 * 4);
    assert_eq!(at(&v, "payload.center_gradient_all_reduce"), 10_000_000 * 512 * 4);
    assert!(v["backbone"].is_null());
}

#[test]
fn table_shows_exact_bytes_and_binary_units() {
    let (ok, out, err) = pfc(&[]);
    assert!(ok, "{err}");
    let row = |label: &str| {
        out.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no row {label:?} in:\n{out}")).to_string()
    };
    // 20,480,000,000 / 2^30 = 19.07; 320,000,000 / 2^20 = 305.18.
    let centers = row("  centers (f32)");
    assert!(centers.contains("20,480,000,000 B (19.07 GiB)") && centers.contains("320,000,000 B (305.18 MiB)"), "{centers}");
    // 2,560,000,000 / 2^30 = 2.38; 256,000,000 / 2^20 = 244.14.
    let logits = row("  logits (f32)");
    assert!(logits.contains("2,560,000,000 B (2.38 GiB)") && logits.contains("256,000,000 B (244.14 MiB)"), "{logits}");
    let softmax = row("  softmax statistics");
    assert!(softmax.contains("193,536 B (189.00 KiB)"), "{softmax}");
    let gradient = row("  gradient  ");
    assert!(gradient.contains("40,320,000,000 B (37.55 GiB)") && gradient.contains("8,257,536 B (7.88 MiB)"), "{gradient}");
    for label in [
        "  optimizer (SGD momentum)",
        "  center gradients",
        "  total memory",
        "  embedding all-gather",
        "  label all-gather",
        "  total communication",
    ] {
        row(label);
    }
    assert!(out.contains("1 GiB = 2^30 B"), "units legend missing");
    assert!(out.contains("2(S-1)/S") && out.contains("ring"), "ring legend missing");
    assert!(out.contains("Throughput is not computed"));
    assert!(!out.contains("host backbone") && !out.contains("gradient all-reduce"), "no backbone rows without --backbone-params");

    // Decimal units on request: 20,480,000,000 B = 20.48 GB.
    let (ok, out, _) = pfc(&["--si"]);
    assert!(ok && out.contains("20,480,000,000 B (20.48 GB)") && out.contains("1 GB = 10^9 B"), "{out}");
}

#[test]
fn uneven_shards_adamw_bf16_and_a_backbone() {
    // S = 8, B = 5 (N = 40), d = 3, C = 1,000,003 = 8 × 125,000 + 3: three GPUs hold 125,001 classes.
    let args = ["--gpus", "8", "--batch-per-gpu", "5", "--dim", "3", "--classes", "1,000,003", "--sample-rate", "0.3", "--engine", "cpu"];
    let mut all = args.to_vec();
    all.extend_from_slice(&["--optimizer", "adamw", "--dtype", "bf16", "--backbone-params", "65M"]);
    let v = plan_json(&all);
    assert_eq!(at(&v, "sharding.classes_per_gpu_max"), 125_001);
    assert_eq!(at(&v, "sharding.classes_per_gpu_min"), 125_000);
    assert_eq!(at(&v, "sharding.gpus_with_max"), 3);
    assert_eq!(at(&v, "sharding.sampled_per_gpu"), 37_500); // floor(0.3 × 125,001) = floor(37,500.3)
    assert_eq!(at(&v, "config.dtype_bytes"), 2);

    // DP AdamW: two f32 moments per element plus one 4-byte step; the all-reduce of L = 3,000,009
    // elements: 3,000,009 / 8 = 375,001 (remainder 1), the busiest GPU sends 2 × (L − 375,001) × 4.
    check(
        &v,
        "data_parallel",
        [1_000_003 * 3 * 4, 2 * 1_000_003 * 3 * 4 + 4, 0, 1_000_003 * 3 * 4, 5 * 1_000_003 * 2],
        [0, 0, 0, 2 * (3_000_009 - 375_001) * 4],
    );
    assert_eq!(at(&v, "data_parallel.memory.optimizer_state"), 24_000_076);
    assert_eq!(at(&v, "data_parallel.communication.gradient"), 21_000_064);

    // Sharded: the largest shard, AdamW with a u32 step count per row; bf16 embeddings both ways.
    let comm = [
        7 * 5 * 3 * 2,                          // embedding all-gather: 210
        7 * 5 * 8 + 7 * 8,                      // labels + batch sizes: 336
        2 * (120 - 15) * 4 + 2 * (120 - 15) * 4, // MAX and SUM of 3N = 120 each: 1,680
        7 * 5 * 3 * 2,                          // gradient reduce-scatter: 210
    ];
    let state = 2 * 125_001 * 3 * 4 + 125_001 * 4; // 3,500,028
    // Two f32 norms per row, one of each moment's row.
    check(&v, "model_parallel", [125_001 * 3 * 4, state, 2 * 125_001 * 4, 0, 40 * 125_001 * 2], comm);
    check(&v, "partial_fc", [125_001 * 3 * 4, state, 2 * 125_001 * 4, 0, 40 * 37_500 * 2], comm);

    // The backbone: 65,000,000 f32 gradients, all-reduced; 65,000,000 / 8 = 8,125,000.
    assert_eq!(at(&v, "backbone.params"), 65_000_000);
    assert_eq!(at(&v, "backbone.gradient_bytes"), 65_000_000 * 4);
    assert_eq!(at(&v, "backbone.all_reduce_sent"), 2 * (65_000_000 - 8_125_000) * 4); // 455,000,000
                                                                                      // ... and never counted as the head's.
    assert_eq!(at(&v, "partial_fc.communication.total"), 210 + 336 + 1_680 + 210);

    // The table shows it on its own rows.
    let (ok, out, err) = pfc(&all);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.starts_with("  gradient all-reduce")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("455,000,000 B (433.92 MiB)"), "{row}"); // 455,000,000 / 2^20 = 433.92
    let total = out.lines().find(|l| l.starts_with("  step total, head + backbone")).unwrap_or_else(|| panic!("{out}"));
    assert!(total.contains("455,002,436 B"), "{total}"); // 455,000,000 + 2,436
    assert!(out.contains("n = 125,001 on 3 GPUs, 125,000 on the others"), "{out}");
}

#[test]
fn few_classes_per_shard_bound_the_positives() {
    // S = 3, B = 4 (N = 12), d = 2, C = 10 = 3 × 3 + 1: n = 4 on GPU 0; k = floor(0.5 × 4) = 2.
    let v = plan_json(&["--gpus", "3", "--batch-per-gpu", "4", "--dim", "2", "--classes", "10", "--sample-rate", "0.5", "--engine", "cpu"]);
    assert_eq!(at(&v, "sharding.classes_per_gpu_max"), 4);
    assert_eq!(at(&v, "sharding.classes_per_gpu_min"), 3);
    assert_eq!(at(&v, "sharding.sampled_per_gpu"), 2);
    // Up to min(N, n) = 4 distinct positives can land on one shard, and positives are always kept.
    assert_eq!(at(&v, "sharding.sampled_per_gpu_bound"), 4);
    // DP all-reduce of L = 20 elements over 3 GPUs: 20 / 3 = 6, busiest GPU 2 × 14 × 4.
    check(&v, "data_parallel", [10 * 2 * 4, 10 * 2 * 4, 0, 10 * 2 * 4, 4 * 10 * 4], [0, 0, 0, 2 * (20 - 6) * 4]);
    let comm = [2 * 4 * 2 * 4, 2 * 4 * 8 + 2 * 8, 2 * (36 - 12) * 4 + 2 * (36 - 12) * 4, 2 * 4 * 2 * 4];
    check(&v, "model_parallel", [4 * 2 * 4, 4 * 2 * 4, 4 * 4, 0, 12 * 4 * 4], comm);
    check(&v, "partial_fc", [4 * 2 * 4, 4 * 2 * 4, 4 * 4, 0, 12 * 2 * 4], comm);
    let (ok, out, _) = pfc(&["--gpus", "3", "--batch-per-gpu", "4", "--dim", "2", "--classes", "10", "--sample-rate", "0.5"]);
    assert!(ok && out.contains("samples up to min(N, n) = 4"), "{out}");
}

#[test]
fn one_gpu_sends_nothing_and_rate_one_is_model_parallel() {
    // S = 1: no peer to talk to; k from the decimal rate: floor(0.7 × 10) = 7 (f32 0.7 would give 6).
    let v = plan_json(&["--gpus", "1", "--batch-per-gpu", "8", "--dim", "4", "--classes", "10", "--sample-rate", "0.7", "--engine", "cpu"]);
    assert_eq!(at(&v, "sharding.sampled_per_gpu"), 7);
    check(&v, "data_parallel", [10 * 4 * 4, 10 * 4 * 4, 0, 10 * 4 * 4, 8 * 10 * 4], [0, 0, 0, 0]);
    check(&v, "partial_fc", [10 * 4 * 4, 10 * 4 * 4, 10 * 4, 0, 8 * 7 * 4], [0, 0, 0, 0]);

    // r = 1: PartialFC is model parallel; f16 halves the logits and the embedding traffic.
    let v = plan_json(&[
        "--gpus",
        "4",
        "--batch-per-gpu",
        "16",
        "--dim",
        "128",
        "--classes",
        "100000",
        "--sample-rate",
        "1",
        "--dtype",
        "f16",
    ]);
    assert_eq!(at(&v, "sharding.sampled_per_gpu"), 25_000);
    assert_eq!(v["partial_fc"], v["model_parallel"]);
    assert_eq!(at(&v, "partial_fc.memory.logits"), 64 * 25_000 * 2);
    assert_eq!(at(&v, "partial_fc.communication.embedding_all_gather"), 3 * 16 * 128 * 2);
    // Center gradients stay f32: 2 × (12,800,000 − 3,200,000) × 4.
    assert_eq!(at(&v, "data_parallel.communication.gradient"), 76_800_000);
}

/// CurricularFace sends one f32 per sample more in MP and PartialFC (an all-reduce MAX of the target
/// cosines before the statistics); AdaFace sends nothing more; DP, whose softmax is local, neither.
#[test]
fn curricular_adds_the_target_cosine_exchange() {
    let base = ["--gpus", "8", "--batch-per-gpu", "32", "--dim", "64", "--classes", "1000"];
    let with = |margin: &str| plan_json(&[&base[..], &["--margin", margin]].concat());
    let without_config = |mut v: Value| {
        v.as_object_mut().unwrap().remove("config");
        v
    };
    let (combined, adaface, curricular) = (plan_json(&base), with("adaface"), with("curricular"));
    assert_eq!(combined, with("combined"));
    assert_eq!(combined["config"]["margin"], "combined");
    assert_eq!(curricular["config"]["margin"], "curricular");
    assert_eq!(without_config(adaface), without_config(combined.clone()));
    let n = 8 * 32u64;
    assert_eq!(at(&curricular, "payload.target_cosine_all_reduce"), n * 4);
    assert_eq!(at(&combined, "payload.target_cosine_all_reduce"), 0);
    for strategy in ["model_parallel", "partial_fc"] {
        let extra = 2 * (n - n / 8) * 4;
        let key = format!("{strategy}.communication.softmax_statistics");
        assert_eq!(at(&curricular, &key), at(&combined, &key) + extra, "{strategy}");
        let key = format!("{strategy}.communication.total");
        assert_eq!(at(&curricular, &key), at(&combined, &key) + extra, "{strategy}");
    }
    assert_eq!(curricular["data_parallel"], combined["data_parallel"]);
    let (ok, text, _) = pfc(&["--margin", "curricular"]);
    assert!(ok && text.contains("CurricularFace"), "{text}");
}

/// `--storage bf16` stores centers and optimizer state in 2 bytes a value: half the centers and
/// moments (and, in data parallel, the dense gradient and its all-reduce); AdamW's u32 step counts,
/// the engine's f32 row norms, the logits and the sharded strategies' traffic stay as they are.
#[test]
fn bf16_storage_halves_the_centers_and_their_state() {
    // One CPU process holding 10M identities at d = 512 with SGD: what issue #26 trains on 24 GB.
    let one = ["--gpus", "1", "--batch-per-gpu", "256", "--dim", "512", "--classes", "10M", "--sample-rate", "0.1", "--engine", "cpu"];
    let f32 = plan_json(&one);
    let bf16 = plan_json(&[&one[..], &["--storage", "bf16"]].concat());
    assert_eq!((f32["config"]["storage"].as_str(), at(&f32, "config.storage_bytes")), (Some("f32"), 4));
    assert_eq!((bf16["config"]["storage"].as_str(), at(&bf16, "config.storage_bytes")), (Some("bf16"), 2));
    assert_eq!(at(&bf16, "sharding.sampled_per_gpu"), 1_000_000);
    let logits = 256 * 1_000_000 * 4; // 1,024,000,000
    check(&f32, "partial_fc", [10_000_000 * 512 * 4, 10_000_000 * 512 * 4, 10_000_000 * 4, 0, logits], [0, 0, 0, 0]);
    check(&bf16, "partial_fc", [10_000_000 * 512 * 2, 10_000_000 * 512 * 2, 10_000_000 * 4, 0, logits], [0, 0, 0, 0]);
    assert_eq!(at(&f32, "partial_fc.memory.total"), 42_024_000_000);
    assert_eq!(at(&bf16, "partial_fc.memory.total"), 21_544_000_000);
    check(&bf16, "data_parallel", [10_000_000 * 512 * 2, 10_000_000 * 512 * 2, 0, 10_000_000 * 512 * 2, 256 * 10_000_000 * 4], [0, 0, 0, 0]);

    // AdamW on uneven shards: two bf16 moments per value, a u32 step count and two f32 norms per row.
    let args = ["--gpus", "8", "--batch-per-gpu", "5", "--dim", "3", "--classes", "1,000,003", "--sample-rate", "0.3", "--optimizer", "adamw", "--engine", "cpu"];
    let f32 = plan_json(&args);
    let bf16 = plan_json(&[&args[..], &["--storage", "bf16"]].concat());
    let comm = [7 * 5 * 3 * 4, 7 * 5 * 8 + 7 * 8, 2 * (120 - 15) * 4 + 2 * (120 - 15) * 4, 7 * 5 * 3 * 4];
    check(&bf16, "model_parallel", [125_001 * 3 * 2, 2 * 125_001 * 3 * 2 + 125_001 * 4, 2 * 125_001 * 4, 0, 40 * 125_001 * 4], comm);
    check(&f32, "model_parallel", [125_001 * 3 * 4, 2 * 125_001 * 3 * 4 + 125_001 * 4, 2 * 125_001 * 4, 0, 40 * 125_001 * 4], comm);
    // Data parallel: its gradient is in the parameters' dtype, and so is its all-reduce.
    check(
        &bf16,
        "data_parallel",
        [1_000_003 * 3 * 2, 2 * 1_000_003 * 3 * 2 + 4, 0, 1_000_003 * 3 * 2, 5 * 1_000_003 * 4],
        [0, 0, 0, 2 * (3_000_009 - 375_001) * 2],
    );
    assert_eq!(at(&bf16, "payload.center_gradient_all_reduce"), 3_000_009 * 2);

    let (ok, out, err) = pfc(&[&one[..], &["--storage", "bf16"]].concat());
    assert!(ok, "{err}");
    assert!(out.contains("bf16 storage of centers and optimizer state (2 B)"), "{out}");
    let row = |label: &str| out.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no row {label:?} in:\n{out}")).to_string();
    assert!(row("  centers (bf16)").contains("10,240,000,000 B (9.54 GiB)"), "{out}"); // 10,240,000,000 / 2^30 = 9.54
    assert!(row("  state row norms (f32)").contains("40,000,000 B (38.15 MiB)"), "{out}"); // 40,000,000 / 2^20 = 38.15
    assert!(row("  total memory").contains("21,544,000,000 B (20.06 GiB)"), "{out}"); // 21,544,000,000 / 2^30 = 20.06
}

#[test]
fn bad_options_are_rejected_with_a_message() {
    let cases: [(&[&str], &str); 10] = [
        (&["--gpus", "0"], "--gpus 0"),
        (&["--sample-rate", "1.5"], "(0, 1]"),
        (&["--sample-rate", "0"], "--sample-rate 0"),
        (&["--sample-rate", "NaN"], "--sample-rate NaN"),
        (&["--dtype", "f64"], "'f64'"),
        (&["--optimizer", "adam"], "'adam'"),
        (&["--storage", "f16"], "'f16'"),
        (&["--classes", "10", "--gpus", "64"], "every GPU needs at least one class"),
        (&["--classes", "ten"], "--classes"),
        (&["--batch-per-gpu", "0"], "--batch-per-gpu 0"),
    ];
    for (args, message) in cases {
        let (ok, out, err) = pfc(args);
        assert!(!ok, "pfc plan {args:?} succeeded: {out}");
        assert!(err.contains(message), "pfc plan {args:?}: {message:?} not in {err:?}");
        assert!(out.is_empty(), "pfc plan {args:?} printed a table: {out}");
    }
    let (_, _, err) = pfc(&["--dtype", "f64"]);
    assert!(err.contains("f32") && err.contains("bf16"), "the valid dtypes are listed: {err}");
    let (_, _, err) = pfc(&["--storage", "f16"]);
    assert!(err.contains("f32") && err.contains("bf16"), "the valid storage dtypes are listed: {err}");
    // Figures past 2^64 bytes are refused, not wrapped: 10^12 classes × 10^7 dims × 4 B.
    let (ok, _, err) = pfc(&["--gpus", "1", "--classes", "1000G", "--dim", "10000000"]);
    assert!(!ok && err.contains("2^64"), "{err}");
}
