//! Randomized damage to a small checkpoint's files — bit flips, byte changes, truncations,
//! insertions, deletions, duplicated runs, appended and replaced contents, in the manifest and in the
//! shard files — loaded through the C ABI thousands of times: never a crash or panic, always
//! PFC_ERR_CORRUPT, and the head bit-identical. A second round repairs the checksums after each
//! damage, so that the JSON and safetensors parsers and the shape checks behind them see the damage
//! too: then any of OK, CORRUPT or INCOMPATIBLE may be right, but a refused load changes nothing.
//!
//! Both rounds run on a checkpoint of f32 storage and on one of bf16 storage (BF16 tensors, two bytes
//! a value), each loaded into a head of the same storage.
//!
//! PFC_FUZZ_SEED and PFC_FUZZ_CASES override the seed and the number of cases of each round.

use crate::common::*;
use crate::persist::*;
use partialfc::ffi::*;
use std::path::Path;

const C: u64 = 10;
const D: usize = 4;

fn seed() -> u64 {
    std::env::var("PFC_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_2024)
}

fn cases() -> usize {
    std::env::var("PFC_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(3000)
}

/// One random change of `b` (never a no-op); returns its description.
fn damage(b: &mut Vec<u8>, rng: &mut Rng) -> String {
    let n = b.len();
    // Positions favour both ends, where the headers, lengths and checksum lines are.
    let at = |rng: &mut Rng, len: usize| {
        let len = len.max(1);
        match rng.below(8) {
            0 | 1 => len - 1 - (rng.below(12) as usize).min(len - 1),
            2 => (rng.below(12) as usize).min(len - 1),
            _ => rng.below(len as u64) as usize,
        }
    };
    loop {
        let before = b.clone();
        let what = match rng.below(9) {
            0 => {
                let i = at(rng, n);
                let bit = rng.below(8);
                b[i] ^= 1 << bit;
                format!("bit {bit} of byte {i} flipped")
            }
            1 => {
                let i = at(rng, n);
                b[i] = rng.below(256) as u8;
                format!("byte {i} set")
            }
            2 => {
                // A printable or structural character: keeps JSON plausible.
                let i = at(rng, n);
                b[i] = b"0123456789{}[]\",: -.eE\nabcdef"[rng.below(29) as usize];
                format!("byte {i} set to a JSON character")
            }
            3 => {
                let len = at(rng, n);
                b.truncate(len);
                format!("truncated to {len}")
            }
            4 => {
                let i = at(rng, n + 1);
                let k = 1 + rng.below(16) as usize;
                let ins: Vec<u8> = (0..k).map(|_| rng.below(256) as u8).collect();
                b.splice(i..i, ins);
                format!("{k} bytes inserted at {i}")
            }
            5 => {
                let i = at(rng, n);
                let k = (1 + rng.below(32) as usize).min(n - i);
                b.drain(i..i + k);
                format!("{k} bytes deleted at {i}")
            }
            6 => {
                let i = at(rng, n);
                let k = (1 + rng.below(32) as usize).min(n - i);
                let run = b[i..i + k].to_vec();
                b.splice(i..i, run);
                format!("{k} bytes at {i} duplicated")
            }
            7 => {
                let k = 1 + rng.below(64) as usize;
                b.extend((0..k).map(|_| rng.below(256) as u8));
                format!("{k} bytes appended")
            }
            _ => {
                let len = rng.below(2 * n as u64 + 1) as usize;
                *b = (0..len).map(|_| rng.below(256) as u8).collect();
                format!("replaced by {len} random bytes")
            }
        };
        if *b != before {
            return what;
        }
    }
}

/// Replaces a file's contents in place. Not `fs::write`: ext4 flushes a file truncated to zero and
/// rewritten when it is closed (auto_da_alloc), which made this test wait on the disk.
fn overwrite(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).unwrap();
    f.write_all(bytes).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
}

struct Fixture {
    _scratch: Scratch,
    dir: std::path::PathBuf,
    /// The victim's own state, to restore it after a load that (rightly) succeeded.
    home: std::path::PathBuf,
    files: Vec<String>,
    originals: Vec<Vec<u8>>,
}

/// A trained checkpoint, and a victim head of another state, both storing `storage` (PFC_DTYPE_*).
fn fixture(storage: i32) -> (Fixture, TestHead, Vec<u32>) {
    let s = Scratch::new("fuzz");
    let dir = s.path("ckpt");
    let home = s.path("home");
    let mut cfg = config(C, D as u32, 2, true, 0.5);
    cfg.storage_dtype = storage;
    let h = TestHead::new(&cfg);
    train(&h, C, D, 2, 0, 3);
    ok(save(&h, &dir));
    let mut cfg = config(C, D as u32, 3, true, 0.5);
    cfg.storage_dtype = storage;
    cfg.seed = 77;
    let victim = TestHead::new(&cfg);
    train(&victim, C, D, 3, 10, 2);
    ok(save(&victim, &home));
    let mut files = vec!["manifest.json".to_string()];
    files.extend(read_manifest(&dir)["shards"].as_array().unwrap().iter().map(|s| s["file"].as_str().unwrap().to_string()));
    let originals = files.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
    let before = bits(&victim.centers(D));
    (Fixture { _scratch: s, dir, home, files, originals }, victim, before)
}

impl Fixture {
    fn restore(&self) {
        for (f, b) in self.files.iter().zip(&self.originals) {
            overwrite(&self.dir.join(f), b);
        }
    }
}

#[test]
fn random_damage_is_always_detected() {
    random_damage_detected(PFC_DTYPE_F32, 0);
}

#[test]
fn random_damage_to_a_bf16_checkpoint_is_always_detected() {
    random_damage_detected(PFC_DTYPE_BF16, 0x0bf1_6bf1_6bf1_6bf1);
}

fn random_damage_detected(storage: i32, salt: u64) {
    let (fx, victim, before) = fixture(storage);
    let mut rng = Rng(seed() ^ salt);
    let n = cases();
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for case in 0..n {
        // The manifest about a third of the time, else one of the shard files.
        let which = if rng.below(3) == 0 { 0 } else { 1 + rng.below(fx.files.len() as u64 - 1) as usize };
        let mut bytes = fx.originals[which].clone();
        let what = damage(&mut bytes, &mut rng);
        overwrite(&fx.dir.join(&fx.files[which]), &bytes);
        let status = load(&victim, &fx.dir);
        assert_eq!(
            status,
            PFC_ERR_CORRUPT,
            "case {case} (seed {}): {} {what}: status {status}: {}",
            seed(),
            fx.files[which],
            last_error()
        );
        assert_eq!(bits(&victim.centers(D)), before, "case {case}: centers changed");
        *kinds.entry(if which == 0 { "manifest" } else { "shard" }).or_default() += 1;
        overwrite(&fx.dir.join(&fx.files[which]), &fx.originals[which]);
    }
    // The whole state, not only the centers, is the victim's own.
    let home = Snapshot::read(&fx.home).state();
    assert_eq!(state_of(&victim), home);
    // And the undamaged files still load.
    ok(load(&victim, &fx.dir));
    assert_ne!(bits(&victim.centers(D)), before);
    eprintln!("{n} damaged checkpoints rejected: {kinds:?}");
}

/// Rewrites the manifest's checksum line, and the sizes and checksums of the shard files in it, to
/// match whatever the files now hold (when the manifest body still parses).
fn reseal_all(dir: &Path, body: Option<Vec<u8>>) {
    let body = body.unwrap_or_else(|| manifest_body(&std::fs::read(dir.join("manifest.json")).unwrap()).to_vec());
    let body = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(mut m) if m["shards"].is_array() => {
            for s in m["shards"].as_array_mut().unwrap() {
                if let Some(bytes) = s["file"].as_str().filter(|f| !f.is_empty() && !f.contains('/')).and_then(|f| std::fs::read(dir.join(f)).ok()) {
                    s["bytes"] = (bytes.len() as u64).into();
                    s["crc32"] = crc32fast::hash(&bytes).into();
                }
            }
            m.to_string().into_bytes()
        }
        _ => body,
    };
    overwrite(&dir.join("manifest.json"), &manifest_file(&body));
}

#[test]
fn random_damage_behind_valid_checksums_never_crashes_or_half_loads() {
    damage_behind_valid_checksums(PFC_DTYPE_F32, 0);
}

#[test]
fn random_damage_to_a_bf16_checkpoint_behind_valid_checksums_never_crashes_or_half_loads() {
    damage_behind_valid_checksums(PFC_DTYPE_BF16, 0x0bf1_6bf1_6bf1_6bf1);
}

fn damage_behind_valid_checksums(storage: i32, salt: u64) {
    let (fx, victim, before) = fixture(storage);
    let mut rng = Rng(seed() ^ 0xabcdef ^ salt);
    let n = cases();
    let mut outcomes = std::collections::BTreeMap::<i32, usize>::new();
    for case in 0..n {
        let which = if rng.below(2) == 0 { 0 } else { 1 + rng.below(fx.files.len() as u64 - 1) as usize };
        let mut bytes = fx.originals[which].clone();
        if which == 0 {
            // Damage the inner object only; the checksum is rebuilt below.
            bytes = manifest_body(&bytes).to_vec();
        }
        let what = damage(&mut bytes, &mut rng);
        if which == 0 {
            reseal_all(&fx.dir, Some(bytes));
        } else {
            overwrite(&fx.dir.join(&fx.files[which]), &bytes);
            reseal_all(&fx.dir, None);
        }
        let status = load(&victim, &fx.dir);
        assert!(
            [PFC_OK, PFC_ERR_CORRUPT, PFC_ERR_INCOMPATIBLE].contains(&status),
            "case {case} (seed {}): {} {what}: status {status}: {}",
            seed(),
            fx.files[which],
            last_error()
        );
        *outcomes.entry(status).or_default() += 1;
        if status == PFC_OK {
            // The damage was harmless to the format (a changed value, padding): put the victim back.
            ok(load(&victim, &fx.home));
        }
        assert_eq!(bits(&victim.centers(D)), before, "case {case}: {what}: status {status} but the centers changed");
        fx.restore();
    }
    assert_eq!(state_of(&victim), Snapshot::read(&fx.home).state());
    eprintln!("{n} damaged checkpoints with valid checksums: status → count {outcomes:?}");
    assert!(outcomes.get(&PFC_ERR_CORRUPT).copied().unwrap_or(0) > n / 4, "{outcomes:?}");
}
