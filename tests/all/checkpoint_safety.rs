//! Checkpoint directories under hostile and careless use (issue #11, items 5, 7 and 9; issue #13's
//! manifest): two writers at once (real processes and threads), FIFOs, device links and sparse files
//! in place of checkpoint files, buffers under an address-space limit in a child process, the
//! manifest read by `json.load` and `jq`, and format-1 checkpoints refused as incompatible.
//!
//! Child processes are this test binary re-executed with `--ignored --exact checkpoint_safety::<child>`
//! and an environment variable naming their task; the children do nothing when run without it.

use crate::common::*;
use crate::persist::*;
use partialfc::ffi::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs child test `name` of this module with `env`, returning its output.
fn child(name: &str, env: &[(&str, String)]) -> std::process::Child {
    let mut cmd = child_test(&test_path(module_path!(), name));
    cmd.arg("--ignored").stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Runs `f` on a thread and fails if it takes longer than `limit` (a blocked open would hang).
fn within<T: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what} did not return within {limit:?}: it blocks"))
}

// ------------------------------------------------------------------------------------------------
// Item 7: one writer per directory.

const WC: u64 = 30_000;
const WD: usize = 32;

/// The head a writer with `seed` saves: untrained, so its state is a function of the seed.
fn writer_head(seed: u64) -> TestHead {
    let mut cfg = config(WC, WD as u32, 2, true, 1.0);
    cfg.seed = seed;
    TestHead::new(&cfg)
}

/// Saves `head` into `dir` again and again for `time`: `(saves that succeeded, refusals)`. Any
/// other outcome fails.
fn save_repeatedly(head: &TestHead, dir: &Path, time: Duration) -> (usize, usize) {
    let (mut saved, mut refused) = (0, 0);
    let t0 = Instant::now();
    while t0.elapsed() < time {
        match save(head, dir) {
            PFC_OK => saved += 1,
            PFC_ERR_IO => {
                let msg = last_error();
                assert!(msg.contains("another head or process is saving or loading"), "{msg}");
                refused += 1;
            }
            s => panic!("save returned {s}: {}", last_error()),
        }
    }
    (saved, refused)
}

/// After concurrent writers: the directory holds exactly one writer's complete checkpoint.
fn assert_one_writers_checkpoint(dir: &Path, seeds: &[u64]) {
    assert_clean(dir);
    let h = TestHead::new(&config(WC, WD as u32, 3, true, 1.0));
    ok(load(&h, dir));
    let got = bits(&h.centers(WD));
    assert!(seeds.iter().any(|&s| bits(&writer_head(s).centers(WD)) == got), "the checkpoint is none of the writers'");
}

#[test]
#[ignore = "child process of two_processes_saving_into_one_directory"]
fn child_writer() {
    let Some(dir) = std::env::var_os("PFC_WRITER_DIR") else { return };
    println!();
    let seed: u64 = std::env::var("PFC_WRITER_SEED").unwrap().parse().unwrap();
    let h = writer_head(seed);
    let (saved, refused) = save_repeatedly(&h, Path::new(&dir), Duration::from_secs(3));
    println!("saved {saved} refused {refused}");
}

#[test]
fn two_processes_saving_into_one_directory() {
    let s = Scratch::new("writers");
    let dir = s.path("ckpt");
    let kids: Vec<_> = [11u64, 22]
        .iter()
        .map(|seed| child("child_writer", &[("PFC_WRITER_DIR", dir.display().to_string()), ("PFC_WRITER_SEED", seed.to_string())]))
        .collect();
    let mut refused = 0;
    for kid in kids {
        let out = kid.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "a writer failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
        let line = text.lines().find(|l| l.starts_with("saved ")).unwrap_or_else(|| panic!("no report: {text}"));
        let n: Vec<usize> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
        eprintln!("writer: {line}");
        refused += n[1];
    }
    assert!(refused > 0, "the writers never overlapped");
    assert_one_writers_checkpoint(&dir, &[11, 22]);
}

#[test]
fn two_heads_in_threads_saving_into_one_directory() {
    let s = Scratch::new("writer-threads");
    let dir = s.path("ckpt");
    let seeds = [33u64, 44];
    let results: Vec<(usize, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = seeds
            .iter()
            .map(|&seed| {
                let dir = dir.clone();
                scope.spawn(move || save_repeatedly(&writer_head(seed), &dir, Duration::from_secs(2)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("threads: (saved, refused) {results:?}");
    assert!(results.iter().map(|r| r.1).sum::<usize>() > 0, "the writers never overlapped");
    assert_one_writers_checkpoint(&dir, &seeds);
}

// ------------------------------------------------------------------------------------------------
// Item 9: regular files only, never more than declared.

/// A small trained checkpoint of a head storing `storage` (PFC_DTYPE_*).
fn small_checkpoint(tag: &str, storage: i32) -> (Scratch, PathBuf, Vec<String>) {
    let s = Scratch::new(tag);
    let dir = s.path("ckpt");
    let mut cfg = config(300, 16, 3, true, 1.0);
    cfg.storage_dtype = storage;
    let h = TestHead::new(&cfg);
    train(&h, 300, 16, 3, 0, 2);
    ok(save(&h, &dir));
    let files = read_manifest(&dir)["shards"].as_array().unwrap().iter().map(|s| s["file"].as_str().unwrap().to_string()).collect();
    (s, dir, files)
}

fn mkfifo(path: &Path) {
    let c = cpath(path);
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", path.display());
}

/// A load of `dir` into a fresh head, within 20 s: its status and message; a failed load must leave
/// the head as it was.
fn load_fresh(dir: &Path) -> (pfc_status, String) {
    let dir = dir.to_path_buf();
    let (st, msg, unchanged) = within(Duration::from_secs(20), "pfc_load_checkpoint", move || {
        let h = TestHead::new(&config(300, 16, 2, true, 1.0));
        let before = bits(&h.centers(16));
        let st = load(&h, &dir);
        let msg = last_error();
        (st, msg, bits(&h.centers(16)) == before)
    });
    assert!(st == PFC_OK || unchanged, "status {st} ({msg}) but the head changed");
    (st, msg)
}

#[test]
fn fifos_devices_and_oversized_files_are_refused_without_blocking_or_reading() {
    type Trap = Box<dyn Fn(&Path, &[String])>;
    let traps: Vec<(&str, Trap, &str)> = vec![
        ("a FIFO as manifest.json", Box::new(|d, _| {
            std::fs::remove_file(d.join("manifest.json")).unwrap();
            mkfifo(&d.join("manifest.json"));
        }), "FIFO"),
        ("a FIFO as a shard", Box::new(|d, f| {
            std::fs::remove_file(d.join(&f[1])).unwrap();
            mkfifo(&d.join(&f[1]));
        }), "FIFO"),
        ("a shard linked to /dev/zero", Box::new(|d, f| {
            std::fs::remove_file(d.join(&f[2])).unwrap();
            std::os::unix::fs::symlink("/dev/zero", d.join(&f[2])).unwrap();
        }), "device"),
        ("manifest.json linked to /dev/zero", Box::new(|d, _| {
            std::fs::remove_file(d.join("manifest.json")).unwrap();
            std::os::unix::fs::symlink("/dev/zero", d.join("manifest.json")).unwrap();
        }), "device"),
        ("a sparse 2 GiB shard", Box::new(|d, f| {
            let file = std::fs::OpenOptions::new().write(true).open(d.join(&f[0])).unwrap();
            file.set_len(2 << 30).unwrap();
        }), "fails its size"),
        ("a FIFO as the lock file", Box::new(|d, _| {
            std::fs::remove_file(d.join(LOCK_FILE)).unwrap();
            mkfifo(&d.join(LOCK_FILE));
        }), "FIFO"),
    ];
    for (storage, (what, trap, says)) in [PFC_DTYPE_F32, PFC_DTYPE_BF16].into_iter().flat_map(|st| traps.iter().map(move |t| (st, t))) {
        let what = format!("{what}, storage {storage}");
        let (_s, dir, files) = small_checkpoint("hostile", storage);
        trap(&dir, &files);
        let (st, msg) = load_fresh(&dir);
        assert_eq!(st, PFC_ERR_CORRUPT, "{what}: {msg}");
        assert!(msg.contains(says), "{what}: {msg}");
        // A search-only index refuses it the same way.
        let d2 = dir.clone();
        let (st, msg) = within(Duration::from_secs(20), "pfc_index_open", move || {
            let mut ix = std::ptr::null_mut();
            let st = pfc_index_open(cpath(&d2).as_ptr(), &mut ix);
            assert!(ix.is_null());
            (st, last_error())
        });
        assert_eq!(st, PFC_ERR_CORRUPT, "index, {what}: {msg}");
    }
    // A real shard linked from elsewhere is an ordinary file and loads.
    let (s, dir, files) = small_checkpoint("linked", PFC_DTYPE_BF16);
    let away = s.path("away.safetensors");
    std::fs::rename(dir.join(&files[1]), &away).unwrap();
    std::os::unix::fs::symlink(&away, dir.join(&files[1])).unwrap();
    let (st, msg) = load_fresh(&dir);
    assert_eq!(st, PFC_OK, "{msg}");
}

// ------------------------------------------------------------------------------------------------
// Item 5: checkpoint and export buffers under an address-space limit.

/// This process's address space in bytes (VmSize).
fn address_space() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn limit_address_space(extra: u64) {
    let limit = address_space() + extra;
    let r = libc::rlimit { rlim_cur: limit, rlim_max: libc::RLIM_INFINITY };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &r) }, 0);
}

fn unlimit_address_space() {
    let r = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &r) }, 0);
}

fn status_name(s: pfc_status) -> &'static str {
    match s {
        PFC_OK => "ok",
        PFC_ERR_OUT_OF_MEMORY => "oom",
        PFC_ERR_CORRUPT => "corrupt",
        _ => "other",
    }
}

const BIG_D: u32 = 1 << 16;
const BIG_C: u64 = 64;

#[test]
#[ignore = "child process of checkpoint_and_export_buffers_under_an_address_space_limit"]
fn child_under_limit() {
    let Some(dir) = std::env::var_os("PFC_LIMIT_DIR") else { return };
    println!();
    let dir = PathBuf::from(dir);
    let mut cfg = config(BIG_C, BIG_D, 2, false, 1.0);
    cfg.init_std = 0.01;
    let h = TestHead::new(&cfg);
    let q: Vec<f32> = (0..BIG_D as usize).map(|i| (i % 7) as f32).collect();
    let (mut ids, mut scores) = (vec![0i64; 3], vec![0f32; 3]);
    ok(pfc_search(h.0, q.as_ptr(), 1, 3, ids.as_mut_ptr(), scores.as_mut_ptr()));
    ok(save(&h, &dir.join("before")));
    // The same checkpoint with a sparse 2 GiB first shard: read whole, it would not fit.
    let sparse = dir.join("sparse");
    copy_dir(&dir.join("before"), &sparse);
    let first = read_manifest(&sparse)["shards"][0]["file"].as_str().unwrap().to_string();
    std::fs::OpenOptions::new().write(true).open(sparse.join(first)).unwrap().set_len(2 << 30).unwrap();
    let report = |what: &str, st: pfc_status| println!("{what} {}", status_name(st));
    // Too little for a copy of the state (before anything large was freed for malloc to reuse):
    // loading must say so, and change nothing.
    let before = bits(&h.centers(BIG_D as usize));
    limit_address_space(8 << 20);
    report("load-tight", load(&h, &dir.join("before")));
    let mut ix = std::ptr::null_mut();
    report("index-tight", pfc_index_open(cpath(&dir.join("before")).as_ptr(), &mut ix));
    pfc_index_close(ix);
    unlimit_address_space();
    // Room for the chunks the library needs, far less than a whole-shard or 8192-row buffer.
    limit_address_space(192 << 20);
    report("save", save(&h, &dir.join("under")));
    report("export-npy-f16", pfc_export_centers(h.0, cpath(&dir.join("c.npy")).as_ptr(), PFC_FORMAT_NPY, PFC_DTYPE_F16, 1));
    report("export-faiss", pfc_export_centers(h.0, cpath(&dir.join("c.faiss")).as_ptr(), PFC_FORMAT_FAISS, PFC_DTYPE_F32, 0));
    report("load", load(&h, &dir.join("before")));
    report("load-sparse", load(&h, &dir.join("sparse")));
    unlimit_address_space();
    println!("unchanged {}", bits(&h.centers(BIG_D as usize)) == before);
    // A head storing bf16: its checkpoint and bf16 export stream in chunks as well.
    cfg.storage_dtype = PFC_DTYPE_BF16;
    let b = TestHead::new(&cfg);
    limit_address_space(192 << 20);
    report("save-bf16", save(&b, &dir.join("under-bf16")));
    report("export-bf16", pfc_export_centers(b.0, cpath(&dir.join("c.safetensors")).as_ptr(), PFC_FORMAT_SAFETENSORS, PFC_DTYPE_BF16, 0));
    report("load-bf16", load(&b, &dir.join("under-bf16")));
    report("load-f32-into-bf16", load(&b, &dir.join("before")));
    unlimit_address_space();
}

#[test]
fn checkpoint_and_export_buffers_under_an_address_space_limit() {
    let s = Scratch::new("limit");
    // One malloc arena: a thread's own arena reserves 64 MiB of address space up front, which would
    // let allocations below that escape the limit.
    let env = [("PFC_LIMIT_DIR", s.0.display().to_string()), ("MALLOC_ARENA_MAX", "1".to_string())];
    let out = child("child_under_limit", &env).wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "the child died ({}): {text}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let got: std::collections::BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once(' ')).collect();
    eprintln!("{got:?}");
    for ok_op in ["save", "export-npy-f16", "export-faiss", "load", "save-bf16", "export-bf16", "load-bf16", "load-f32-into-bf16"] {
        assert_eq!(got.get(ok_op), Some(&"ok"), "{ok_op} under the limit: {text}");
    }
    assert_eq!(got.get("load-sparse"), Some(&"corrupt"), "{text}");
    assert_eq!(got.get("load-tight"), Some(&"oom"), "{text}");
    assert_eq!(got.get("index-tight"), Some(&"oom"), "{text}");
    assert_eq!(got.get("unchanged"), Some(&"true"), "{text}");
    // What was written under the limit is complete.
    let h = TestHead::new(&config(BIG_C, BIG_D, 1, false, 1.0));
    ok(load(&h, &s.path("under")));
    let mut ix = std::ptr::null_mut();
    ok(pfc_index_open(cpath(&s.path("c.faiss")).as_ptr(), &mut ix));
    pfc_index_close(ix);
    let mut cfg = config(BIG_C, BIG_D, 1, false, 1.0);
    cfg.storage_dtype = PFC_DTYPE_BF16;
    ok(load(&TestHead::new(&cfg), &s.path("under-bf16")));
    ok(pfc_index_open(cpath(&s.path("c.safetensors")).as_ptr(), &mut ix));
    pfc_index_close(ix);
}

// ------------------------------------------------------------------------------------------------
// Issue #13: the manifest is JSON for everyone; format 1 is refused as incompatible.

#[test]
fn the_manifest_is_read_by_python_json_and_jq() {
    let (_s, dir, files) = small_checkpoint("json", PFC_DTYPE_F32);
    let path = dir.join("manifest.json");
    let script = "import json, sys\nm = json.load(open(sys.argv[1]))\nprint(m['checksum'])\nprint(m['manifest']['format'], m['manifest']['format_version'], m['manifest']['step'])\nprint(' '.join(s['file'] for s in m['manifest']['shards']))";
    let out = Command::new("python3").args(["-c", script]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let m = read_manifest(&dir);
    assert_eq!(lines[0], format!("crc32:{:08x}", crc32fast::hash(m.to_string().as_bytes())));
    assert_eq!(lines[1], "partialfc-checkpoint 2 2");
    assert_eq!(lines[2], files.join(" "));
    let out = Command::new("jq").args(["-r", ".manifest.shards[].crc32"]).arg(&path).output().expect("jq (installed by scripts/test.sh)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let crcs: Vec<u64> = String::from_utf8_lossy(&out.stdout).lines().map(|l| l.parse().unwrap()).collect();
    let want: Vec<u64> = files.iter().map(|f| crc32fast::hash(&std::fs::read(dir.join(f)).unwrap()) as u64).collect();
    assert_eq!(crcs, want);
}

#[test]
fn format_1_checkpoints_are_refused_as_incompatible() {
    let (_s, dir, _) = small_checkpoint("format-1", PFC_DTYPE_F32);
    // The layout this library wrote before: the JSON object, then a line with its CRC-32.
    let mut m = read_manifest(&dir);
    m["format_version"] = 1.into();
    m.as_object_mut().unwrap().remove("save");
    let body = m.to_string();
    std::fs::write(dir.join("manifest.json"), format!("{body}\ncrc32 {:08x}\n", crc32fast::hash(body.as_bytes()))).unwrap();
    let (st, msg) = load_fresh(&dir);
    assert_eq!(st, PFC_ERR_INCOMPATIBLE, "{msg}");
    assert!(msg.contains("format version 1") && msg.contains("reads formats 2 and 3"), "{msg}");
    // A save replaces it, removing the files its manifest names and nothing else.
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let old: Vec<String> = m["shards"].as_array().unwrap().iter().map(|s| s["file"].as_str().unwrap().to_string()).collect();
    let h = TestHead::new(&config(300, 16, 2, true, 1.0));
    ok(save(&h, &dir));
    assert!(old.iter().all(|f| !dir.join(f).exists()));
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"mine");
    let (st, msg) = load_fresh(&dir);
    assert_eq!(st, PFC_OK, "{msg}");
}
