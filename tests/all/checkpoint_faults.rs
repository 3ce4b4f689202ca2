//! Crash safety of checkpoints and exports: a save that fails at any one of its writes (injected
//! through `partialfc::fsutil::inject_write_failures_after`), and a saving process killed with
//! SIGKILL at random moments, leave the previous checkpoint loadable and no temporary files behind.
//!
//! The injection is process-global and every test of this binary shares its process, so each
//! injecting test runs alone in a child process of its own (`alone_in_child`), where no other
//! test's writes can fail or use up its count; `child_saver` is the child process of the kill test
//! (this test binary re-executed), ignored unless asked for.

use crate::common::*;
use crate::persist::*;
use partialfc::ffi::*;
use partialfc::fsutil::inject_write_failures_after;
use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Removes the write limit even when an assertion fails.
struct Unlimited;
impl Drop for Unlimited {
    fn drop(&mut self) {
        inject_write_failures_after(None);
    }
}

fn shard_files(dir: &Path) -> Vec<String> {
    read_manifest(dir)["shards"].as_array().unwrap().iter().map(|s| s["file"].as_str().unwrap().to_string()).collect()
}

/// Enough rows per shard (C / 2 > 8192) that each tensor takes several writes.
const C: u64 = 20_000;
const D: usize = 4;

type State = (std::collections::BTreeMap<String, Vec<u8>>, serde_json::Value, serde_json::Value, serde_json::Value);

/// The state a fresh head holds after loading `dir`, or the load's status.
fn loaded_state(dir: &Path, adamw: bool) -> Result<State, pfc_status> {
    let h = TestHead::new(&config(C, D as u32, 1, adamw, 0.5));
    match load(&h, dir) {
        PFC_OK => Ok(state_of(&h)),
        s => Err(s),
    }
}

#[test]
fn a_save_failing_at_any_write_keeps_the_previous_checkpoint() {
    if !alone_in_child(module_path!(), "a_save_failing_at_any_write_keeps_the_previous_checkpoint") {
        return;
    }
    let _reset = Unlimited;
    for adamw in [false, true] {
        let h = TestHead::new(&config(C, D as u32, 2, adamw, 0.5));
        train(&h, C, D, 2, 0, 2);
        let s = Scratch::new("inject");
        let dir = s.path("ckpt");
        ok(save(&h, &dir));
        let old = state_of(&h);
        let old_files = shard_files(&dir);
        train(&h, C, D, 2, 2, 1);
        let new = state_of(&h);
        assert_ne!(old, new);

        // Loading writes nothing: it works with every write failing.
        inject_write_failures_after(Some(0));
        let probe = TestHead::new(&config(C, D as u32, 3, adamw, 0.5));
        ok(load(&probe, &dir));
        inject_write_failures_after(None);

        let (mut failures, mut kept_old) = (0u64, 0u64);
        let mut saw_new = false;
        for n in 0.. {
            inject_write_failures_after(Some(n));
            let status = save(&h, &dir);
            inject_write_failures_after(None);
            if status == PFC_OK {
                break;
            }
            assert!(n < 1000, "the save never succeeds");
            failures += 1;
            assert_eq!(status, PFC_ERR_IO, "write {n}: {}", last_error());
            assert!(last_error().contains("injected write failure"), "{}", last_error());
            // No temporary files; no shard files but the old checkpoint's and the new manifest's.
            let names = listing(&dir);
            assert!(names.iter().all(|f| !f.starts_with('.') || f == LOCK_FILE), "write {n}: temporary files left: {names:?}");
            let current = shard_files(&dir);
            for f in names.iter().filter(|f| f.starts_with("shard-")) {
                assert!(current.contains(f) || old_files.contains(f), "write {n}: stray file {f}");
            }
            // The directory loads, as the old state or (a failure after the manifest's rename) the new.
            let got = loaded_state(&dir, adamw).unwrap_or_else(|st| panic!("write {n}: load failed with {st}: {}", last_error()));
            if got == old {
                assert!(!saw_new, "write {n}: the old state came back after the new one was in place");
                kept_old += 1;
            } else {
                assert!(got == new, "write {n}: the loaded state is neither the old nor the new one");
                saw_new = true;
            }
        }
        // One create, a header, several chunks per tensor, flush and rename per shard file, the manifest.
        assert!(failures > 20, "only {failures} write points");
        assert!(kept_old + 3 >= failures, "{kept_old} of {failures}");
        assert_eq!(loaded_state(&dir, adamw).unwrap(), new);
        assert_clean(&dir);
        eprintln!("adamw {adamw}: a save fails at any of {failures} writes; {kept_old} left the old checkpoint");
    }
}

#[test]
fn a_first_save_failing_at_any_write_leaves_no_checkpoint_and_no_files() {
    if !alone_in_child(module_path!(), "a_first_save_failing_at_any_write_leaves_no_checkpoint_and_no_files") {
        return;
    }
    let _reset = Unlimited;
    let h = TestHead::new(&config(C, D as u32, 3, false, 1.0));
    let s = Scratch::new("inject-first");
    let mut failures = 0;
    for n in 0.. {
        let dir = s.path(&format!("ckpt-{n}"));
        inject_write_failures_after(Some(n));
        let status = save(&h, &dir);
        inject_write_failures_after(None);
        if status == PFC_OK {
            assert_clean(&dir);
            break;
        }
        failures += 1;
        assert_eq!(status, PFC_ERR_IO);
        let names = listing(&dir);
        if names.iter().any(|n| n == "manifest.json") {
            // Failed after the manifest's rename (syncing the directory): complete and loadable.
            assert!(names.iter().all(|f| !f.starts_with('.') || f == LOCK_FILE), "{names:?}");
            assert!(loaded_state(&dir, false).is_ok());
        } else {
            assert!(names.is_empty() || names == [LOCK_FILE], "write {n}: files left by a failed first save: {names:?}");
            assert_eq!(loaded_state(&dir, false), Err(PFC_ERR_CORRUPT));
        }
    }
    assert!(failures > 10);
}

#[test]
fn an_export_failing_at_any_write_keeps_the_previous_file() {
    if !alone_in_child(module_path!(), "an_export_failing_at_any_write_keeps_the_previous_file") {
        return;
    }
    let _reset = Unlimited;
    let h = TestHead::new(&config(C, D as u32, 2, false, 1.0));
    let s = Scratch::new("inject-export");
    let path = s.path("centers.npy");
    for format in [PFC_FORMAT_NPY, PFC_FORMAT_SAFETENSORS, PFC_FORMAT_FVECS] {
        std::fs::write(&path, b"previous export").unwrap();
        let mut failures = 0;
        for n in 0.. {
            inject_write_failures_after(Some(n));
            let status = pfc_export_centers(h.0, cpath(&path).as_ptr(), format, PFC_DTYPE_F32, 1);
            inject_write_failures_after(None);
            if status == PFC_OK {
                break;
            }
            failures += 1;
            assert_eq!(status, PFC_ERR_IO);
            let names = listing(&s.0);
            if names != ["centers.npy"] || std::fs::read(&path).unwrap() != b"previous export" {
                // Only a failure syncing the directory after the rename may leave the new file.
                assert_eq!(names, ["centers.npy"]);
                assert!(std::fs::metadata(&path).unwrap().len() as usize > C as usize * D * 4);
            }
        }
        // Create, header, the rows (4 MiB chunks), flush, rename, directory sync.
        assert!(failures >= 5 + (C * D as u64 * 4) / (4 << 20), "{failures}");
        assert!(std::fs::metadata(&path).unwrap().len() as usize >= C as usize * D * 4);
    }
}

// ------------------------------------------------------------------------------------------------
// A real process killed mid-save.

const KC: u64 = 60_000;
const KD: usize = 32;

/// The state a child starting at `start` has saved as its save `g` (g >= start): a fresh head with
/// seed `start` and random centers, trained one step per save, so that centers, momentum and step are all
/// non-trivial, differ from save to save, and identify the save.
fn generation(start: u64, g: u64) -> TestHead {
    let mut cfg = config(KC, KD as u32, 3, false, 0.5);
    cfg.seed = start;
    let h = TestHead::new(&cfg);
    let mut values = vec![0f32; KC as usize * KD];
    let mut rng = Rng(start);
    for v in values.iter_mut() {
        *v = rng.normal() as f32;
    }
    h.set_centers(&values);
    for i in start..=g {
        let (emb, labels) = batch(KC, KD, 12, i);
        h.step(&emb, &labels, KD, &even_split(12, 3));
    }
    h
}

/// The save a checkpoint holds: its child's `start` (the seed) and, from the step count, `g`.
fn generation_of(state: &State) -> (u64, u64) {
    let start = state.2.as_u64().unwrap();
    (start, start + state.1.as_u64().unwrap() - 1)
}

/// The child: saves one step after another into $PFC_CHILD_DIR until it is killed.
#[test]
#[ignore = "the child process of killed_saves_leave_a_loadable_checkpoint"]
fn child_saver() {
    let Some(dir) = std::env::var_os("PFC_CHILD_DIR") else { return };
    let start: u64 = std::env::var("PFC_CHILD_START").unwrap().parse().unwrap();
    let dir = std::path::PathBuf::from(dir);
    let h = generation(start, start);
    for g in start.. {
        if g > start {
            let (emb, labels) = batch(KC, KD, 12, g);
            h.step(&emb, &labels, KD, &even_split(12, 3));
        }
        ok(save(&h, &dir));
        println!("saved {g}");
    }
}

#[test]
fn killed_saves_leave_a_loadable_checkpoint() {
    let s = Scratch::new("killed");
    let dir = s.path("ckpt");
    ok(save(&generation(0, 0), &dir));
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("kill moments from seed {seed}");
    let mut rng = Rng(seed);
    let mut known = (0u64, 0u64); // the save the directory holds
    let (mut total_saves, mut mid_save_kills) = (0usize, 0usize);
    let kills = 8;
    for round in 1..=kills {
        let start = round * 1000;
        let mut child = child_test(&test_path(module_path!(), "child_saver"))
            .arg("--ignored")
            .env("PFC_CHILD_DIR", &dir)
            .env("PFC_CHILD_START", start.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let saved = Arc::new(Mutex::new(Vec::<u64>::new()));
        let reader = {
            let saved = saved.clone();
            let out = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(g) = line.strip_prefix("saved ") {
                        saved.lock().unwrap().push(g.trim().parse().unwrap());
                    }
                }
            })
        };
        // Let it save a few times, then kill it at a random moment.
        let t0 = Instant::now();
        let wait_for = 1 + rng.below(3) as usize;
        while saved.lock().unwrap().len() < wait_for && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(rng.below(80_000)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success(), "the child should have been killed");
        reader.join().unwrap();
        let saved = saved.lock().unwrap().clone();
        assert!(!saved.is_empty(), "round {round}: the child never completed a save");
        total_saves += saved.len();
        let names = listing(&dir);
        if names.iter().any(|n| n.starts_with('.') && n != LOCK_FILE) || names.len() > 5 {
            mid_save_kills += 1;
        }
        // The directory holds a complete checkpoint: the last reported save or the one in flight.
        let last = *saved.last().unwrap();
        let h = TestHead::new(&config(KC, KD as u32, 2, false, 0.5));
        let st = load(&h, &dir);
        assert_eq!(st, PFC_OK, "round {round}: {}", last_error());
        let state = state_of(&h);
        let (from, g) = generation_of(&state);
        assert_eq!(from, start, "round {round}: holds a save of another child");
        assert!(g == last || g == last + 1, "round {round}: holds save {g}, the child reported {last} last");
        assert!(state == state_of(&generation(start, g)), "round {round}: save {g} loaded with other contents");
        known = (start, g);
    }
    eprintln!("{kills} kills after {total_saves} completed saves; {mid_save_kills} left a save's files behind");
    assert!(mid_save_kills >= 1, "no kill landed inside a save");
    // The next save clears what the killed ones left.
    let h = generation(known.0, known.1 + 1);
    ok(save(&h, &dir));
    assert_clean(&dir);
}
