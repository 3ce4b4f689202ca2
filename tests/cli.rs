//! The `pfc` command line end to end.

use std::process::Command;

fn pfc(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pfc")).args(args).output().expect("run pfc");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn train_learns_identities_far_above_chance() {
    let (ok, out, err) = pfc(&["train", "--classes", "2000", "--dim", "64", "--steps", "120", "--batch", "128", "--shards", "3"]);
    assert!(ok, "pfc train failed: {err}");
    let last = out.lines().last().unwrap();
    let top1: f64 = last.rsplit("top-1 ").next().unwrap().trim_end_matches('%').parse().unwrap();
    // Chance is 1/2000 = 0.05%.
    assert!(top1 > 20.0, "held-out top-1 {top1}% in: {out}");
    let losses: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("step"))
        .map(|l| l.split("loss").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(losses.len() >= 3 && losses.last().unwrap() < losses.first().unwrap(), "loss did not fall: {losses:?}");
}

#[test]
fn bad_options_are_rejected_with_a_message() {
    let (ok, _, err) = pfc(&["train", "--margin", "sphereface"]);
    assert!(!ok && err.contains("--margin sphereface"), "{err}");
    let (ok, _, err) = pfc(&["train", "--sample-rate", "0"]);
    assert!(!ok && err.contains("sample_rate"), "{err}");
    let (ok, _, err) = pfc(&["train", "--classes", "many"]);
    assert!(!ok && err.contains("--classes"), "{err}");
}

#[test]
fn bench_times_a_small_configuration() {
    let (ok, out, err) = pfc(&["bench", "--classes", "5000", "--dim", "64", "--batch", "32", "--steps", "3", "--reference-dir", "/nonexistent"]);
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.starts_with("| 5000 | 0.1 |")), "{out}");
}
