//! The `pfc` command line end to end.

use std::process::Command;

fn pfc(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pfc")).args(args).output().expect("run pfc");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn out_dir(name: &str) -> String {
    let dir = crate::common::test_tmpdir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir.to_string_lossy().into_owned()
}

/// The number after `key` on the first line containing `line_has`.
fn figure(out: &str, line_has: &str, key: &str) -> f64 {
    let line = out.lines().find(|l| l.contains(line_has)).unwrap_or_else(|| panic!("no line with {line_has:?} in:\n{out}"));
    let rest = line.split(key).nth(1).unwrap_or_else(|| panic!("no {key:?} in {line:?}"));
    rest.trim_start().split(|c: char| !(c.is_ascii_digit() || c == '.')).next().unwrap().parse().unwrap()
}

const SMALL: &[&str] = &["--classes", "2000", "--dim", "64", "--steps", "150", "--batch", "128", "--shards", "3", "--eval-identities", "300", "--log-every", "30", "--noise", "0.6"];

#[test]
fn train_learns_identities_and_evaluates_far_above_chance() {
    let out = out_dir("train");
    let mut args = vec!["train", "--out", &out];
    args.extend_from_slice(SMALL);
    let (ok, stdout, err) = pfc(&args);
    assert!(ok, "pfc train failed: {err}");
    // Chance: top-1 1/2000 = 0.05%; TAR at FAR 1e-3 about 0.1%.
    let top1 = figure(&stdout, "identification", "top-1");
    let tar = figure(&stdout, "FAR 1e-3", "TAR");
    assert!(top1 > 20.0 && tar > 20.0, "top-1 {top1}%, TAR {tar}%:\n{stdout}");
    let losses: Vec<f64> = stdout.lines().filter(|l| l.starts_with("step")).map(|l| figure(l, "step", "loss")).collect();
    assert!(losses.len() >= 3 && losses.last().unwrap() < losses.first().unwrap(), "loss did not fall: {losses:?}");
    assert!(std::path::Path::new(&out).join("centers.safetensors").is_file());
    check_records(std::path::Path::new(&out), 150, 0.1);
    // No image is blurred unless asked.
    let summary = summary(&out);
    assert!(!stdout.contains("low quality"), "{stdout}");
    assert_eq!((summary["low_quality"].as_f64(), summary["low_quality_share"].as_f64()), (Some(0.0), Some(0.0)), "{summary}");
    assert!(summary["blur"].is_null() && summary["norm_quality_correlation"].is_null() && summary["top1_low_quality"].is_null(), "{summary}");
}

fn summary(out: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(std::path::Path::new(out).join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).unwrap()
}

/// `--low-quality` blurs its share of the images (training, verification and identification), and
/// after training the embedding's norm tells a blurred image from a clean one (the signal AdaFace's
/// margin reads); blurred probes are harder to verify and to identify.
#[test]
fn train_with_low_quality_images_gives_embeddings_whose_norm_carries_quality() {
    let out = out_dir("train-low-quality");
    let mut args = vec!["train", "--out", &out, "--low-quality", "0.3", "--blur", "0.6"];
    args.extend_from_slice(SMALL);
    let (ok, stdout, err) = pfc(&args);
    assert!(ok, "pfc train --low-quality failed: {err}");
    let s = summary(&out);
    let get = |key: &str| s[key].as_f64().unwrap_or_else(|| panic!("{key} in {s}"));
    assert_eq!((get("low_quality"), get("blur")), (0.3, 0.6), "{s}");
    // 150 steps × 128 images: 6 standard deviations of the share are 0.02.
    assert!((get("low_quality_share") - 0.3).abs() < 0.02, "{s}");
    assert!(get("norm_quality_correlation") > 0.5, "{s}");
    for far in ["1e-3", "1e-4"] {
        assert!(get(&format!("tar_far_{far}_low_quality")) < get(&format!("tar_far_{far}")), "{s}");
    }
    assert!(get("top1_low_quality") < get("top1") && get("top1") > 0.2, "{s}");
    let correlation = figure(&stdout, "embedding norm vs quality", "correlation");
    assert!((correlation - get("norm_quality_correlation")).abs() < 1e-3, "{stdout}");
}

/// `--margin adaface` and `--margin curricular` (SPEC §1.6a) train as the combined margin does,
/// far above chance.
#[test]
fn train_learns_with_the_adaptive_margins() {
    for margin in ["adaface", "curricular"] {
        let out = out_dir(&format!("train-{margin}"));
        let mut args = vec!["train", "--out", &out, "--margin", margin];
        args.extend_from_slice(SMALL);
        let (ok, stdout, err) = pfc(&args);
        assert!(ok, "pfc train --margin {margin} failed: {err}");
        let top1 = figure(&stdout, "identification", "top-1");
        let tar = figure(&stdout, "FAR 1e-3", "TAR");
        assert!(top1 > 20.0 && tar > 20.0, "{margin}: top-1 {top1}%, TAR {tar}%:\n{stdout}");
        let summary = summary(&out);
        assert_eq!(summary["margin"], margin, "{summary}");
    }
}

/// The step log, the curves and the summary that `pfc train` leaves in its output folder.
fn check_records(out: &std::path::Path, steps: u64, lr: f64) {
    let log = std::fs::read_to_string(out.join("train.jsonl")).expect("train.jsonl");
    let records: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect();
    assert_eq!(records.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), (1..=steps).collect::<Vec<_>>());
    for r in &records {
        assert_eq!(r["learning_rate"].as_f64(), Some(lr), "{r}");
        assert!(r["loss"].as_f64().is_some_and(|l| l.is_finite() && l > 0.0), "{r}");
        assert!(r["accuracy"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{r}");
        assert!(r["images_per_second"].as_f64().is_some_and(|v| v > 0.0), "{r}");
        assert!(r["sampled_classes"].as_u64().is_some_and(|c| c > 0), "{r}");
    }
    assert!(log.contains(&format!("\"learning_rate\":{lr}")), "the learning rate is not written as {lr}:\n{log}");

    let png = std::fs::File::open(out.join("curves.png")).expect("curves.png");
    let mut reader = png::Decoder::new(std::io::BufReader::new(png)).read_info().expect("curves.png decodes");
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(frame.color_type, png::ColorType::Rgb);
    assert!(frame.width >= 600 && frame.height >= 400, "{}x{}", frame.width, frame.height);
    // Both curves are drawn: the loss in blue, the accuracy in red.
    let count = |rgb: [u8; 3]| pixels[..frame.buffer_size()].chunks_exact(3).filter(|p| *p == rgb).count();
    assert!(count([31, 119, 180]) > 200 && count([214, 39, 40]) > 200, "the curves are missing from curves.png");

    let summary = std::fs::read_to_string(out.join("summary.json")).expect("summary.json");
    let parsed: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(parsed["lr"].as_f64(), Some(lr));
    // No float noise: every number has at most 8 significant digits (0.1, not 0.10000000149011612).
    for number in summary.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e')).filter(|w| w.contains('.')) {
        let digits = number.split('e').next().unwrap().chars().filter(|c| c.is_ascii_digit()).collect::<String>();
        assert!(digits.trim_start_matches('0').len() <= 8, "{number} in summary.json:\n{summary}");
    }
}

#[test]
fn train_resumes_from_its_checkpoint_exactly() {
    resumes_exactly("resume", &[]);
}

/// The same with bf16 storage: the checkpoint holds bf16 (BF16 tensors, named in the manifest and
/// summary.json), and the resumed job's stochastic rounding draws what the uninterrupted one drew.
#[test]
fn train_with_bf16_storage_resumes_from_its_checkpoint_exactly() {
    let b = resumes_exactly("resume-bf16", &["--storage", "bf16"]);
    let dir = std::path::Path::new(&b).join("checkpoint");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["manifest"]["storage_dtype"], "bf16");
    let shard = manifest["manifest"]["shards"][0]["file"].as_str().unwrap();
    let bytes = std::fs::read(dir.join(shard)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("centers").unwrap().dtype(), safetensors::Dtype::BF16);
    assert_eq!(summary(&b)["storage"], "bf16");
}

/// Steps 1..40 in one job against 1..20 then 21..40 resumed from the checkpoint, with `extra`
/// options: the same loss and accuracy at step 40. Returns the resumed job's output folder.
fn resumes_exactly(name: &str, extra: &[&str]) -> String {
    let (a, b) = (out_dir(&format!("{name}-a")), out_dir(&format!("{name}-b")));
    let mut common = vec!["--classes", "500", "--dim", "32", "--batch", "64", "--eval-identities", "50", "--log-every", "10", "--checkpoint-every", "20"];
    common.extend_from_slice(extra);
    let mut whole = vec!["train", "--out", &a, "--steps", "40"];
    whole.extend_from_slice(&common);
    let (ok, full, err) = pfc(&whole);
    assert!(ok, "{err}");
    let mut first = vec!["train", "--out", &b, "--steps", "20"];
    first.extend_from_slice(&common);
    assert!(pfc(&first).0);
    let mut rest = vec!["train", "--out", &b, "--steps", "40", "--resume"];
    rest.extend_from_slice(&common);
    let (ok, resumed, err) = pfc(&rest);
    assert!(ok, "{err}");
    let last = |s: &str| s.lines().filter(|l| l.starts_with("step") && l.contains("40/40")).map(|l| l.split("img/s").next().unwrap().rsplit_once(' ').unwrap().0.to_string()).next();
    // Same loss and accuracy at the last step (the rate differs).
    let strip = |s: Option<String>| s.map(|l| l.split("acc").next().unwrap().to_string());
    assert_eq!(strip(last(&full)), strip(last(&resumed)), "{extra:?}\nfull:\n{full}\nresumed:\n{resumed}");
    assert!(strip(last(&full)).is_some());
    // The resumed job's step log holds every step once, the first job's steps included.
    check_records(std::path::Path::new(&b), 40, 0.1);
    b
}

/// `--storage bf16` and `--storage bf16-nearest` train far above chance, and summary.json says
/// which storage ran.
#[test]
fn train_learns_with_bf16_storage() {
    for storage in ["bf16", "bf16-nearest"] {
        let out = out_dir(&format!("train-{storage}"));
        let mut args = vec!["train", "--out", &out, "--storage", storage];
        args.extend_from_slice(SMALL);
        let (ok, stdout, err) = pfc(&args);
        assert!(ok, "pfc train --storage {storage} failed: {err}");
        assert!(stdout.contains(&format!("{storage} storage")), "{stdout}");
        let top1 = figure(&stdout, "identification", "top-1");
        let tar = figure(&stdout, "FAR 1e-3", "TAR");
        assert!(top1 > 20.0 && tar > 20.0, "{storage}: top-1 {top1}%, TAR {tar}%:\n{stdout}");
        assert_eq!(summary(&out)["storage"], storage);
    }
}

#[test]
fn bad_options_are_rejected_with_a_message() {
    for (args, needle) in [
        (vec!["train", "--margin", "sphereface"], "--margin sphereface"),
        (vec!["train", "--sample-rate", "0"], "sample_rate"),
        (vec!["train", "--classes", "many"], "--classes"),
        (vec!["train", "--label-noise", "1.5"], "--label-noise"),
        (vec!["train", "--low-quality", "1.5"], "--low-quality 1.5 is outside [0, 1]"),
        (vec!["train", "--low-quality=-0.1"], "--low-quality -0.1 is outside [0, 1]"),
        (vec!["train", "--low-quality", "0.2", "--blur", "1"], "--blur 1 is outside (0, 1)"),
        (vec!["train", "--low-quality", "0.2", "--blur", "0"], "--blur 0 is outside (0, 1)"),
        (vec!["train", "--blur", "0.5"], "--blur 0.5 has no effect without --low-quality"),
        (vec!["train", "--backend", "tpu"], "--backend tpu"),
        (vec!["train", "--storage", "f16"], "--storage f16: expected f32, bf16 or bf16-nearest"),
        (vec!["train", "--backend", "cuda"], "CUDA"),
    ] {
        let (ok, _, err) = pfc(&args);
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn resume_without_a_checkpoint_is_an_error() {
    let out = out_dir("no-checkpoint");
    let (ok, _, err) = pfc(&["train", "--resume", "--out", &out, "--classes", "100", "--steps", "1"]);
    assert!(!ok && err.contains("--resume") && err.contains("checkpoint"), "{err}");
}

#[test]
fn bench_times_a_small_configuration() {
    let (ok, out, err) = pfc(&["bench", "--classes", "5000", "--dim", "64", "--batch", "32", "--steps", "3", "--reference-dir", "/nonexistent"]);
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.starts_with("| 5000 | 0.1 |")), "{out}");
}

/// `--storage f32,bf16` times both storages side by side, each with the process's peak resident
/// memory from its head's creation on: 200,000 × 64 centers and momentum take 102.4 MB in f32,
/// 51.2 MB in bf16, and the peaks differ by about that.
#[test]
fn bench_times_each_storage_with_its_peak_memory() {
    let (ok, out, err) = pfc(&["bench", "--classes", "200k", "--dim", "64", "--batch", "32", "--steps", "2", "--storage", "f32,bf16", "--json", "--reference-dir", "/nonexistent"]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|l| l["storage"].as_str().unwrap()).collect::<Vec<_>>(), ["f32", "bf16"], "{out}");
    assert!(lines.iter().all(|l| l["classes"] == 200_000), "{out}");
    let peak = |i: usize| lines[i]["peak_rss_bytes"].as_u64().unwrap_or_else(|| panic!("no peak_rss_bytes: {out}")) as f64;
    let saved = peak(0) - peak(1);
    assert!((saved - 51.2e6).abs() < 12e6, "f32 peak {} B, bf16 peak {} B: {saved} B apart, not about 51.2 MB\n{out}", peak(0), peak(1));
    for storage in ["f32", "bf16"] {
        let row = out.lines().find(|l| l.starts_with(&format!("| 200000 | 0.1 | f32 | {storage} |"))).unwrap_or_else(|| panic!("no {storage} row:\n{out}"));
        assert!(row.contains(" GiB |"), "no peak RSS in {row}");
    }
    let (ok, _, err) = pfc(&["bench", "--classes", "1000", "--storage", "f16", "--reference-dir", "/nonexistent"]);
    assert!(!ok && err.contains("--storage f16"), "{err}");
}

#[test]
fn bench_help_explains_every_option_within_the_repository() {
    let (ok, help, err) = pfc(&["bench", "--help"]);
    assert!(ok, "{err}");
    assert!(!help.contains("../"), "pfc bench --help points outside the repository:\n{help}");
    // In the long help each option line is followed by its description, indented further; an
    // undocumented option has none, or only its `[default: …]`.
    let lines: Vec<&str> = help.lines().collect();
    for (i, line) in lines.iter().enumerate().filter(|(_, l)| l.trim_start().starts_with('-')) {
        let description: String = lines[i + 1..]
            .iter()
            .take_while(|l| l.starts_with("          ") && !l.trim_start().starts_with('-'))
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join(" ");
        let words = description.split("[default:").next().unwrap().trim();
        assert!(!words.is_empty(), "undocumented option: {line:?}\n{help}");
    }
    for flag in ["--classes", "--sample-rate", "--dim", "--batch", "--shards", "--reference-dir", "--reference-script"] {
        assert!(help.contains(flag), "{flag} is missing from:\n{help}");
    }
}

#[test]
fn bench_refuses_to_time_nothing() {
    for (args, needle) in [
        (vec!["bench", "--classes", "1000", "--dim", "16", "--batch", "8", "--steps", "0", "--reference-dir", "/nonexistent"], "--steps 0"),
        (vec!["bench", "--search", "--classes", "1000", "--dim", "16", "--runs", "0"], "--runs 0"),
        (vec!["bench", "--init", "--classes", "1000", "--dim", "16", "--runs", "0"], "--runs 0"),
        (vec!["bench", "--init", "--classes", "1000", "--dim", "0"], "--dim 0"),
    ] {
        let (ok, _, err) = pfc(&args);
        assert!(!ok && err.contains(needle) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn bench_init_times_the_initialisation_against_a_fill() {
    let (ok, out, err) = pfc(&["bench", "--init", "--classes", "1000", "--dim", "17", "--runs", "3"]);
    assert!(ok, "{err}");
    assert!(out.contains("C = 1000, d = 17") && out.contains("medians of 3 passes"), "{out}");
    for row in ["| fill with a constant |", "| rng::init_center |"] {
        assert!(out.lines().any(|l| l.starts_with(row) && l.contains(" M | ")), "{row} is missing from:\n{out}");
    }
}

#[test]
fn train_divergence_is_reported_as_such_naming_the_learning_rate() {
    // Full softmax at lr 1e4: the centers blow up within a hundred steps.
    let out = out_dir("diverge");
    let (ok, _, err) = pfc(&[
        "train", "--out", &out, "--lr", "1e4", "--sample-rate", "1", "--classes", "2000", "--dim", "64", "--batch", "128", "--steps", "300",
        "--eval-identities", "10", "--log-every", "100",
    ]);
    assert!(!ok, "lr 1e4 trained to the end: {err}");
    assert!(err.contains("diverged") && err.contains("--lr 10000") && !err.contains("embedding row"), "{err}");
}

/// A tiny `pfc train` run in `out` to `steps`, checkpointing every 5 steps.
fn tiny_run(out: &str, steps: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["train", "--out", out, "--steps", steps, "--checkpoint-every", "5"];
    args.extend_from_slice(&["--classes", "100", "--dim", "16", "--batch", "16", "--eval-identities", "10"]);
    args.extend_from_slice(extra);
    pfc(&args)
}

#[test]
fn resume_refuses_a_backbone_holding_nan() {
    let out = out_dir("nan-backbone");
    let (ok, _, err) = tiny_run(&out, "5", &[]);
    assert!(ok, "{err}");
    // One NaN in the first layer's weights, checksum-free: the backbone file is the CLI's own.
    let path = std::path::Path::new(&out).join("checkpoint/backbone.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let (header, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let at = 8 + header + meta.info("w1").unwrap().data_offsets.0 + 4 * 17;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let (ok, _, err) = tiny_run(&out, "10", &["--resume"]);
    assert!(!ok && err.contains("w1") && err.contains("NaN"), "{err}");
}

#[test]
fn resume_refuses_a_target_before_the_checkpoint() {
    let out = out_dir("resume-past");
    let (ok, _, err) = tiny_run(&out, "5", &[]);
    assert!(ok, "{err}");
    let (ok, stdout, err) = tiny_run(&out, "4", &["--resume"]);
    assert!(!ok && err.contains("step 5") && err.contains("--steps 4"), "{stdout}\n{err}");
}
