//! Helpers shared by the checkpoint, fault, fuzz and export/search tests: scratch directories, small
//! heads trained a few steps, and reading a checkpoint's tensors back with the safetensors crate.

use crate::common::*;
use partialfc::ffi::*;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh, empty directory under cargo's per-target temporary directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = crate::common::test_tmpdir()
            .join(format!("{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn cpath(p: &Path) -> CString {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn save(h: &TestHead, dir: &Path) -> pfc_status {
    pfc_save_checkpoint(h.0, cpath(dir).as_ptr())
}

pub fn load(h: &TestHead, dir: &Path) -> pfc_status {
    pfc_load_checkpoint(h.0, cpath(dir).as_ptr())
}

/// A small configuration: `c` classes of dimension `d` on `shards` local shards.
pub fn config(c: u64, d: u32, shards: u32, adamw: bool, rate: f32) -> pfc_config {
    let mut cfg = default_config();
    cfg.num_classes = c;
    cfg.embedding_dim = d;
    cfg.local_shards = shards;
    cfg.sample_rate = rate;
    cfg.scale = 16.0;
    cfg.m2 = 0.3;
    cfg.seed = 1234;
    cfg.init_std = 0.5;
    if adamw {
        cfg.optimizer = PFC_OPTIMIZER_ADAMW;
        cfg.lr = 0.01;
        cfg.weight_decay = 0.01;
    } else {
        cfg.lr = 0.2;
    }
    cfg
}

/// A deterministic batch of `n` rows for step `i`: embeddings near their class's direction.
pub fn batch(c: u64, d: usize, n: usize, i: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng(0xC0FFEE ^ i.wrapping_mul(0x9E37_79B9));
    let labels: Vec<i64> = (0..n).map(|_| rng.below(c) as i64).collect();
    let emb = (0..n * d).map(|_| rng.normal() as f32).collect();
    (emb, labels)
}

/// Trains `steps` steps numbered from `from` with the global batch split evenly over the head's shards.
pub fn train(h: &TestHead, c: u64, d: usize, shards: usize, from: u64, steps: u64) -> Vec<pfc_step_stats> {
    (from..from + steps)
        .map(|i| {
            let (emb, labels) = batch(c, d, 12, i);
            h.step(&emb, &labels, d, &even_split(12, shards)).0
        })
        .collect()
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Everything a checkpoint directory holds, shard files concatenated in class order.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub manifest: serde_json::Value,
    /// tensor name → little-endian bytes of all classes' rows.
    pub tensors: BTreeMap<String, Vec<u8>>,
    /// tensor name → its safetensors dtype (the same in every shard file).
    pub dtypes: BTreeMap<String, safetensors::Dtype>,
    pub shards: usize,
}

impl Snapshot {
    pub fn read(dir: &Path) -> Snapshot {
        let manifest = read_manifest(dir);
        let mut tensors: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut dtypes = BTreeMap::new();
        let shards = manifest["shards"].as_array().unwrap();
        for s in shards {
            let bytes = std::fs::read(dir.join(s["file"].as_str().unwrap())).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let len = s["len"].as_u64().unwrap() as usize;
            for (name, view) in st.tensors() {
                assert_eq!(view.shape()[0], len, "{name}: rows");
                assert_eq!(*dtypes.entry(name.clone()).or_insert(view.dtype()), view.dtype(), "{name}: dtype differs between shards");
                tensors.entry(name).or_default().extend_from_slice(view.data());
            }
        }
        let shards = shards.len();
        Snapshot { manifest, tensors, dtypes, shards }
    }

    /// A tensor's values as f32: F32 as is, BF16 widened (exactly).
    pub fn f32(&self, name: &str) -> Vec<f32> {
        let bytes = &self.tensors[name];
        match self.dtypes[name] {
            safetensors::Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            safetensors::Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32()).collect(),
            other => panic!("{name} is {other:?}, not a float tensor"),
        }
    }

    pub fn u32(&self, name: &str) -> Vec<u32> {
        self.tensors[name].chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    /// Training state proper: tensors plus step, seed and learning rate (not the shard table).
    pub fn state(&self) -> (BTreeMap<String, Vec<u8>>, serde_json::Value, serde_json::Value, serde_json::Value) {
        (self.tensors.clone(), self.manifest["step"].clone(), self.manifest["seed"].clone(), self.manifest["lr"].clone())
    }
}

/// The head's whole training state, through a save into a scratch directory.
pub fn state_of(h: &TestHead) -> (BTreeMap<String, Vec<u8>>, serde_json::Value, serde_json::Value, serde_json::Value) {
    let dir = Scratch::new("state-of");
    ok(save(h, &dir.0));
    Snapshot::read(&dir.0).state()
}

/// Names in `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// The lock file (and journal) every checkpoint directory written by the library holds.
pub const LOCK_FILE: &str = ".partialfc.lock";

/// Asserts that `dir` holds exactly a manifest, the shard files it names and the lock file: no
/// temporary files, no files of abandoned saves.
#[track_caller]
pub fn assert_clean(dir: &Path) {
    let names = listing(dir);
    let mut want: Vec<String> =
        read_manifest(dir)["shards"].as_array().unwrap().iter().map(|s| s["file"].as_str().unwrap().to_string()).collect();
    want.push("manifest.json".into());
    want.push(LOCK_FILE.into());
    want.sort();
    assert_eq!(names, want, "{} holds files other than the manifest and its shards", dir.display());
}

/// Copies every file of directory `from` into a fresh directory `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A manifest file around inner object `body`, with its correct checksum, as the library writes it.
pub fn manifest_file(body: &[u8]) -> Vec<u8> {
    let mut out = format!("{{\"checksum\":\"crc32:{:08x}\",\"manifest\":", crc32fast::hash(body)).into_bytes();
    out.extend_from_slice(body);
    out.extend_from_slice(b"}\n");
    out
}

/// The inner object's bytes of a manifest file as the library writes it.
pub fn manifest_body(file: &[u8]) -> &[u8] {
    let head = br#"{"checksum":"crc32:xxxxxxxx","manifest":"#.len();
    &file[head..file.len() - 2]
}

/// Rewrites the manifest of `dir` from `body` with a correct checksum.
pub fn write_manifest(dir: &Path, body: &serde_json::Value) {
    std::fs::write(dir.join("manifest.json"), manifest_file(body.to_string().as_bytes())).unwrap();
}

/// The inner object of the manifest of `dir`, parsed from the whole file as any JSON reader would.
pub fn read_manifest(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let whole: serde_json::Value = serde_json::from_str(&text).unwrap();
    whole["manifest"].clone()
}

/// After shard files of `dir` were rewritten, updates their sizes and checksums in the manifest
/// (and the manifest's own checksum line).
pub fn reseal(dir: &Path) {
    let mut m = read_manifest(dir);
    for s in m["shards"].as_array_mut().unwrap() {
        if let Ok(bytes) = std::fs::read(dir.join(s["file"].as_str().unwrap())) {
            s["bytes"] = (bytes.len() as u64).into();
            s["crc32"] = crc32fast::hash(&bytes).into();
        }
    }
    write_manifest(dir, &m);
}
