//! Checkpoints, export and search of one job over several processes (issue #9; SPEC §2a), with real
//! processes under OpenMPI running tests/mpi/persist.c: a checkpoint saved by 2 processes × 2 shards
//! loads into 1 × 1, 1 × 3, 3 × 1 (and 1 × 4, 2 × 2) with identical centers and optimizer state;
//! training continued from it agrees between layouts with the same total shard count; exports are
//! byte-identical files and searches identical results whatever the layout — with f32 storage and
//! with bf16 storage (BF16 checkpoint tensors); killing one process mid-save leaves the previous
//! checkpoint loadable.

use crate::common::*;
use crate::native::{compile, describe, lib_dir, mpirun, scratch};
use crate::persist::*;
use partialfc::ffi::*;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let exe = scratch("mpi-persist").join("persist");
        compile("mpicc", &["-std=c11", "-O1"], "tests/mpi/persist.c", lib_dir(), &exe);
        exe
    })
}

/// Runs the program over one process per entry of `shards` and checks that all finished.
fn job(dir: &Path, shards: &[usize], args: &[&str]) {
    job_storing(dir, shards, args, "");
}

/// `job` with the heads storing `storage` ("" for f32, "bf16").
fn job_storing(dir: &Path, shards: &[usize], args: &[&str], storage: &str) {
    let list = shards.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let mut cmd = mpirun(shards.len());
    cmd.arg(exe()).arg(dir).arg(&list).args(args).env("PFC_PERSIST_STORAGE", storage);
    let out = cmd.output().expect("cannot run mpirun (OpenMPI is installed by scripts/setup.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", describe(&format!("{cmd:?}"), &out));
    for r in 0..shards.len() {
        assert!(text.contains(&format!("rank {r}: done")), "rank {r} did not finish:\n{text}");
    }
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn npy_f32(path: PathBuf) -> Vec<f32> {
    let bytes = read(path);
    let header = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[header..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Classes of the save-loop job (tests/mpi/persist.c).
const LOOP_CLASSES: u64 = 200_003;
const TRAINED: u64 = 4;
const MORE: u64 = 3;
const EXPORTS: [&str; 5] = ["safetensors", "bf16.safetensors", "npy", "fvecs", "faiss"];

#[test]
fn checkpoints_exports_and_searches_are_the_same_in_every_layout() {
    same_in_every_layout("");
}

#[test]
fn bf16_checkpoints_exports_and_searches_are_the_same_in_every_layout() {
    same_in_every_layout("bf16");
}

/// A job of 2 processes × 2 shards storing `storage` trains and saves; the checkpoint loads into
/// other layouts with the same state, exports and searches.
fn same_in_every_layout(storage: &str) {
    let s = Scratch::new("persist-mpi");
    let dir = &s.0;
    let job = |dir: &Path, shards: &[usize], args: &[&str]| job_storing(dir, shards, args, storage);
    job(dir, &[2, 2], &["train", &TRAINED.to_string()]);
    let saved = Snapshot::read(&dir.join("ckpt"));
    assert_eq!(saved.shards, 4);
    let stored = if storage == "bf16" { safetensors::Dtype::BF16 } else { safetensors::Dtype::F32 };
    assert_eq!(saved.dtypes["centers"], stored);
    assert_eq!(saved.manifest["storage_dtype"], if storage == "bf16" { "bf16" } else { "f32" });
    assert_eq!(saved.manifest["step"], TRAINED);
    assert!(saved.tensors.contains_key("exp_avg_sq") && saved.tensors.contains_key("steps"));
    // The manifest names every process's shards and nothing else is left.
    assert_clean(&dir.join("ckpt"));

    let layouts: [(&str, &[usize]); 5] = [("1x1", &[1]), ("1x3", &[3]), ("3x1", &[1, 1, 1]), ("1x4", &[4]), ("2x2", &[2, 2])];
    for (tag, shards) in layouts {
        job(dir, shards, &["resume", &MORE.to_string(), &TRAINED.to_string(), tag]);
        // Loaded into this layout and saved again: every tensor, step, seed and learning rate.
        let again = Snapshot::read(&dir.join(format!("ckpt-{tag}")));
        assert_eq!(again.shards, shards.iter().sum::<usize>(), "{tag}");
        assert!(again.state() == saved.state(), "{tag}: the state differs after a round trip");
        for ext in EXPORTS {
            assert!(read(dir.join(format!("export.{ext}"))) == read(dir.join(format!("export-{tag}.{ext}"))), "{tag}: .{ext} export differs");
        }
        assert_eq!(read(dir.join("search.bin")), read(dir.join(format!("search-{tag}.bin"))), "{tag}: search results differ");
    }
    // Training continued from the checkpoint: the same run whenever the total shard count is.
    for (a, b) in [("1x3", "3x1"), ("1x4", "2x2")] {
        let (x, y) = (npy_f32(dir.join(format!("after-{a}.npy"))), npy_f32(dir.join(format!("after-{b}.npy"))));
        let err = rel_err(&x, &y);
        assert!(err <= 1e-6, "{a} vs {b}: relative error {err}");
        eprintln!("continued training, {a} vs {b}: relative error {err:e}");
    }
    // The continued runs moved the centers.
    let start: Vec<f32> = saved.f32("centers");
    let after = npy_f32(dir.join("after-2x2.npy"));
    assert!(rel_err(&after, &start) > 1e-4);
}

#[test]
fn killing_one_process_mid_save_leaves_a_loadable_checkpoint() {
    let s = Scratch::new("persist-mpi-kill");
    let dir = &s.0;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("kill moments from seed {seed}");
    let mut rng = Rng(seed);
    let mut mid_save = 0;
    // Rounds until two kills landed inside a save (leaving its files behind), ten at most.
    let mut rounds = 0;
    while rounds < 10 && mid_save < 2 {
        let round = rounds;
        rounds += 1;
        let mut cmd = mpirun(2);
        cmd.arg(exe()).arg(dir).arg("1,1").arg("save-loop").stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("cannot run mpirun");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut pids, mut saved) = (std::collections::BTreeMap::new(), 0u64);
        let want = 2 + rng.below(3);
        let t0 = Instant::now();
        while (pids.len() < 2 || saved < want) && t0.elapsed() < Duration::from_secs(60) {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                let w: Vec<&str> = line.split(' ').collect();
                match w[..] {
                    ["pid", r, p] => {
                        pids.insert(r.parse::<usize>().unwrap(), p.parse::<i32>().unwrap());
                    }
                    ["saved", g] => saved = g.parse().unwrap(),
                    _ => {}
                }
            }
        }
        assert!(pids.len() == 2 && saved >= want, "round {round}: the job did not get going ({pids:?}, saved {saved})");
        // Alternately the process that publishes manifests and the other one, while a save's shard
        // files are being written (a temporary file is there), a random moment later.
        let victim = round % 2;
        let t1 = Instant::now();
        while !listing(&dir.join("ckpt")).iter().any(|n| n.starts_with(".shard-")) {
            assert!(t1.elapsed() < Duration::from_secs(30), "round {round}: no save began");
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_micros(rng.below(5_000)));
        unsafe { libc::kill(pids[&victim], libc::SIGKILL) };
        let _ = child.wait();
        let _ = reader.join();
        // The last save reported before the kill (its line may have come after the kill).
        for line in rx.try_iter() {
            if let Some(g) = line.strip_prefix("saved ") {
                saved = g.parse().unwrap();
            }
        }
        let names = listing(&dir.join("ckpt"));
        eprintln!("round {round}: killed rank {} after save {saved}: {names:?}", round % 2);
        if names.iter().any(|n| n.starts_with('.') && n != LOCK_FILE) || names.len() > 4 {
            mid_save += 1;
        }
        // A complete checkpoint of the last reported save or the one in flight, in one process.
        let h = TestHead::new(&config(LOOP_CLASSES, 16, 2, true, 0.5));
        let st = load(&h, &dir.join("ckpt"));
        assert_eq!(st, PFC_OK, "round {round} (killed rank {}): {}", round % 2, last_error());
        let step = read_manifest(&dir.join("ckpt"))["step"].as_u64().unwrap();
        assert!(step == saved || step == saved + 1, "round {round}: holds step {step}, the job reported {saved} last");
    }
    eprintln!("{mid_save} of {rounds} kills left a save's files behind");
    assert!(mid_save >= 1, "no kill landed inside a save");
    // A later save of the whole job clears what the killed saves left.
    job(dir, &[1, 1], &["save-once"]);
    assert_clean(&dir.join("ckpt"));
}

#[test]
fn a_failing_callback_fails_saves_and_exports_everywhere_and_keeps_what_was_there() {
    let s = Scratch::new("persist-mpi-fail");
    let dir = &s.0;
    let mut cmd = mpirun(3);
    cmd.arg(exe()).arg(dir).arg("1,2,1").arg("fail-save");
    let out = cmd.output().expect("cannot run mpirun");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", describe(&format!("{cmd:?}"), &out));
    let points: Vec<usize> = text.lines().filter_map(|l| l.strip_prefix("failure points ")).map(|n| n.trim().parse().unwrap()).collect();
    assert_eq!(points.len(), 3, "{text}");
    assert!(points.iter().all(|&p| p == points[0] && p >= 6), "{text}");
    let exports: Vec<usize> = text.lines().filter_map(|l| l.strip_prefix("export failure points ")).map(|n| n.trim().parse().unwrap()).collect();
    assert!(exports.len() == 3 && exports.iter().all(|&p| p == exports[0] && p >= 4), "{text}");
    let names = listing(dir);
    assert!(names.iter().all(|n| !n.starts_with('.')), "temporary files left: {names:?}");
    // What the failures left is a complete checkpoint: the first save's or a later one's.
    let h = TestHead::new(&config(997, 16, 4, true, 0.5));
    ok(load(&h, &dir.join("ckpt")));
}
