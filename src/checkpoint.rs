//! Checkpoints: a directory holding `manifest.json` and one safetensors file per shard with its
//! centers and all optimizer state.
//!
//! The manifest is one JSON document, `{"checksum":"crc32:xxxxxxxx","manifest":{…}}`, the checksum
//! taken over the bytes of the inner object exactly as written: `jq` and `json.load` read it, and
//! load still notices any altered byte. The inner object holds the format and its version, the
//! configuration, step, seed and learning rate, and the shard table with each file's size and CRC-32.
//!
//! Writers: `.partialfc.lock` (see `fsutil::DirLock`) gives the directory one writer at a time and is
//! also the journal of saves in progress. Before a save creates any file it appends a line naming
//! everything it may create (its save id and shard count; its shard and temporary files are named
//! from them) and the files of the manifest it supersedes. Shard files get names unique to the save,
//! the manifest is replaced atomically last, and only then are the files of journaled saves removed
//! — those the new manifest does not name. So a crash at any point leaves a manifest whose files are
//! all present and complete, and a save deletes only files this library wrote there.
//!
//! Saving refuses, before touching any file, a state that loading would refuse (values that are not
//! finite, a learning rate or step counts the head itself would not accept): the same checks run on
//! both sides. Loading verifies everything before changing anything — the manifest byte for byte,
//! each file's type, size and CRC-32, tensor names, types and shapes, every value — reading regular
//! files only, never more bytes than the manifest declares, in bounded chunks; it reads each class's
//! rows from whichever shard file holds them, so a checkpoint loads into any shard count.
//!
//! Centers and optimizer state are saved in the head's storage dtype (`storage_dtype`, SPEC §2),
//! as is: safetensors `F32`, or `BF16` for a bf16 head (half the bytes; AdamW's step counts stay
//! `U32`), the manifest naming it (`"storage_dtype": "f32"` or `"bf16"`; a manifest without it is
//! f32, as every checkpoint was before bf16 storage). Either loads into either head: a bf16
//! checkpoint into an f32 head exactly (every bf16 is an f32), an f32 one into a bf16 head rounded
//! to nearest, ties to even — the rounded values must still be ones the head accepts (finite, a
//! center's norm within the bound), else the load is refused as incompatible.

use crate::config::{check_learning_rate, check_steps, DType, MarginKind, OptimizerKind};
use crate::margin::MarginState;
use crate::head::{Head, Restored};
use crate::error::{try_zeroed, Error, Result, Status};
use crate::fsutil::{io_error, temp_path, AtomicFile, DirLock, RegularFile};
use crate::state::StateTensor;
use crate::sharding::ShardRange;
use crate::storage::Stored;
use half::bf16;
use serde_json::{json, Value};
use std::fs;
use std::path::Path;

pub(crate) const FORMAT: &str = "partialfc-checkpoint";
/// The newest format this reads and writes: 3 holds bf16 state (`storage_dtype`). A checkpoint
/// of f32 state is still written as format 2, which versions before bf16 storage read; bf16 state
/// is format 3, which they refuse as a newer format (`PFC_ERR_INCOMPATIBLE`) instead of finding
/// its tensors of an unknown type corrupt.
pub(crate) const FORMAT_VERSION: u64 = 3;
const F32_FORMAT_VERSION: u64 = 2;

/// The format a checkpoint of state stored as `storage` is written in.
fn format_version(storage: DType) -> u64 {
    if storage == DType::F32 { F32_FORMAT_VERSION } else { FORMAT_VERSION }
}
const MANIFEST: &str = "manifest.json";
/// The manifest's fixed opening, up to its checksum's hex digits.
const MANIFEST_HEAD: &str = "{\"checksum\":\"crc32:";
/// Between the checksum's digits and the inner object.
const MANIFEST_MID: &str = "\",\"manifest\":";
/// A manifest of a million shards stays below this; anything larger is not ours.
const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// The journal is a few lines per save in flight.
const MAX_JOURNAL_BYTES: u64 = 64 << 20;
/// safetensors' own bound on a header.
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;
/// Bytes per read or write while streaming tensors: bounded whatever the embedding dimension.
const CHUNK_BYTES: usize = 4 << 20;

/// Rows of `row_bytes` each that fit one streaming chunk (at least one).
pub(crate) fn chunk_rows(row_bytes: usize) -> usize {
    (CHUNK_BYTES / row_bytes.max(1)).max(1)
}

fn corrupt(message: impl Into<String>) -> Error {
    Error::new(Status::Corrupt, message)
}

fn optimizer_name(kind: OptimizerKind) -> &'static str {
    match kind {
        OptimizerKind::Sgd => "sgd",
        OptimizerKind::AdamW => "adamw",
    }
}

/// How the manifest names a storage dtype.
fn storage_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F32 | DType::F16 => "f32",
    }
}

/// The safetensors dtype of the per-row tensors of a head storing `dtype`, and its name in a header.
fn stored_tensor_dtype(dtype: DType) -> (safetensors::Dtype, &'static str) {
    match dtype {
        DType::BF16 => (safetensors::Dtype::BF16, "BF16"),
        DType::F32 | DType::F16 => (safetensors::Dtype::F32, "F32"),
    }
}

/// Values as bf16 rounds them to nearest, ties to even (what a bf16 head stores of them).
fn round_to_bf16(values: &mut [f32]) {
    let mut narrow = [bf16::ZERO; 256];
    for chunk in values.chunks_mut(narrow.len()) {
        let narrow = &mut narrow[..chunk.len()];
        <bf16 as Stored>::narrow_nearest(chunk, narrow);
        <bf16 as Stored>::widen(narrow, chunk);
    }
}

/// A safetensors header for tensors laid out back to back in the given order.
pub(crate) fn safetensors_header(tensors: &[(&str, &str, Vec<u64>, u64)], metadata: &Value) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), metadata.clone());
    let mut offset = 0u64;
    for (name, dtype, shape, bytes) in tensors {
        map.insert((*name).into(), json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let mut text = Value::Object(map).to_string();
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

/// The first value of `values` (rows of `d` from class `first`) that no head may hold, as a message.
fn first_bad_value(tensor: StateTensor, values: &[f32], first: u64, d: usize) -> Option<String> {
    if let Some(at) = values.iter().position(|v| !v.is_finite()) {
        return Some(format!("{} of class {} holds NaN or Inf (value {} of the row)", tensor.name(), first + (at / d) as u64, at % d));
    }
    // The bound `pfc_set_centers` puts on a center: one whose norm f32 cannot normalize.
    let oversized = if tensor == StateTensor::Centers { crate::limits::first_oversized_row(values, d) } else { None };
    oversized.map(|(row, norm)| {
        format!("the center of class {} has norm {norm:.3e}, above {:.3e}: it cannot be normalized in f32", first + row as u64, crate::limits::MAX_ROW_NORM)
    })
}

/// Checks that loading would accept the head's state; reads it in bounded chunks and writes nothing.
fn check_saveable(head: &Head) -> Result<()> {
    let refuse = |why: String| Error::invalid(format!("cannot save this head: {why}"));
    let non_finite = |why: String| {
        Error::new(Status::NonFinite, format!("cannot save this head: {why}; it diverged or was given bad values (load a good checkpoint or set its centers)"))
    };
    check_learning_rate(head.learning_rate()).map_err(|e| refuse(e.message))?;
    check_steps(head.steps_taken(), &[]).map_err(|e| refuse(e.message))?;
    let cfg = head.config();
    let d = cfg.embedding_dim;
    let (first, count) = head.local_classes();
    let rows = chunk_rows(d * 4) as u64;
    let mut chunk = try_zeroed::<f32>(rows.min(count) as usize * d, "checkpoint chunk")?;
    for &tensor in StateTensor::for_optimizer(cfg.optimizer.kind) {
        let mut at = first;
        while at < first + count {
            let n = rows.min(first + count - at);
            let values = &mut chunk[..n as usize * d];
            head.read_state(tensor, at, n, values)?;
            if let Some(why) = first_bad_value(tensor, values, at, d) {
                return Err(non_finite(why));
            }
            at += n;
        }
    }
    if cfg.optimizer.kind == OptimizerKind::AdamW {
        let mut steps = try_zeroed::<u32>(rows.min(count) as usize, "checkpoint chunk")?;
        let mut at = first;
        while at < first + count {
            let n = rows.min(first + count - at);
            head.read_steps(at, n, &mut steps[..n as usize])?;
            check_steps(head.steps_taken(), &steps[..n as usize]).map_err(|e| refuse(e.message))?;
            at += n;
        }
    }
    Ok(())
}

/// Writes a checkpoint of `head` into `dir` (created if needed). Collective on a multi-process
/// head: every process writes its own shards into the one directory (a shared filesystem across
/// machines); process 0 holds the directory's lock, journals the save and publishes the manifest
/// only after every process's shard files are durable. Any process's failure fails the save on all.
pub fn save(head: &Head, dir: &Path) -> Result<()> {
    let group = head.group();
    let cfg = head.config();
    group.agree(check_saveable(head))?;
    // Process 0 takes the directory and names the save; every process learns the name.
    let mut lead: Option<(DirLock, Journal, JournalEntry)> = None;
    let begun = if group.index() == 0 {
        begin_save(dir, cfg.world_size).map(|(lock, pending, own)| {
            let id = own.save.clone().into_bytes();
            lead = Some((lock, pending, own));
            id
        })
    } else {
        Ok(Vec::new())
    };
    let begun = group.agree(begun)?;
    let save_id = String::from_utf8_lossy(&group.allgather_varied(&begun)?[0]).into_owned();
    let entry = JournalEntry { save: save_id.clone(), shards: cfg.world_size, supersedes: Vec::new() };
    let ranks = cfg.first_rank..cfg.first_rank + cfg.local_shards;
    let names = entry.shard_files();
    let mine: Vec<String> = names[ranks.clone()].to_vec();
    // Whether process 0 may have published the manifest: then only it may tell which files are
    // referenced, and the others leave theirs to the next save's clean-up.
    let mut may_publish = false;
    let outcome = (|| -> Result<()> {
        let written = fs::create_dir_all(dir)
            .map_err(|e| io_error("cannot create checkpoint directory", dir, e))
            .and_then(|()| write_shards(head, dir, &save_id, ranks.clone()));
        let table = group.agree(written).inspect_err(|e| may_publish = e.status == Status::Communication)?;
        may_publish = true;
        // Every shard file of the job is durable: process 0 publishes the manifest naming them all.
        let tables = group.allgather_varied(&serde_json::to_vec(&table).expect("JSON values serialize"))?;
        let published = match &lead {
            Some(_) => (|| {
                let mut shards = Vec::new();
                for t in &tables {
                    let part: Vec<Value> = serde_json::from_slice(t).map_err(|e| Error::new(Status::Communication, format!("a process sent a bad shard table: {e}")))?;
                    shards.extend(part);
                }
                write_manifest(head, dir, &save_id, shards)
            })(),
            None => Ok(()),
        };
        group.agree(published)
    })();
    match outcome {
        Ok(()) => {
            if let Some((mut lock, pending, own)) = lead {
                // The new manifest is durable: nothing journaled is referenced any more but its files.
                for entry in pending.entries.iter().chain([&own]) {
                    entry.remove_stale(dir, &names);
                }
                let _ = crate::fsutil::sync_dir(dir);
                let _ = lock.clear();
            }
            Ok(())
        }
        Err(e) => {
            // Unless the new manifest made it into place (a failure after its rename), the files
            // this process wrote are referenced by nothing: remove them. Process 0 knows; another
            // process knows only while the manifest cannot have been published yet. What stays is
            // journaled: the next save removes it.
            let knows = lead.is_some() || !may_publish;
            let installed = read_manifest(dir).is_ok_and(|m| m.shards.iter().any(|s| names.contains(&s.file)));
            if knows && !installed {
                let mut files = Vec::new();
                for name in &mine {
                    files.extend(temp_path(&dir.join(name), &save_id).ok());
                    files.push(dir.join(name));
                }
                if lead.is_some() {
                    files.extend(temp_path(&dir.join(MANIFEST), &save_id).ok());
                }
                remove_regular(files, &[]);
            }
            Err(e)
        }
    }
}

/// Process 0's start of a save: the directory, its lock, the journal of earlier saves, and this
/// save's journal line, durable before any file of the save exists.
fn begin_save(dir: &Path, world_size: usize) -> Result<(DirLock, Journal, JournalEntry)> {
    fs::create_dir_all(dir).map_err(|e| io_error("cannot create checkpoint directory", dir, e))?;
    let mut lock = DirLock::exclusive(dir)?;
    let pending = Journal::parse(&lock.contents(MAX_JOURNAL_BYTES)?);
    let own = JournalEntry { save: fresh_save_id(dir, world_size), shards: world_size, supersedes: manifest_files(dir) };
    lock.append(own.line().as_bytes())?;
    Ok((lock, pending, own))
}

fn shard_name(save_id: &str, rank: usize) -> String {
    format!("shard-{save_id}-{rank:05}.safetensors")
}

/// A save id whose shard file names exist nowhere in `dir`, so that a save never overwrites a file
/// the current manifest references.
fn fresh_save_id(dir: &Path, world_size: usize) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.as_nanos() as u64).unwrap_or(0);
    let mut seed = std::process::id() as u64 ^ now;
    loop {
        let id = format!("{:016x}", crate::rng::mix64(seed));
        if (0..world_size).all(|r| !dir.join(shard_name(&id, r)).exists()) {
            return id;
        }
        seed = seed.wrapping_add(1);
    }
}

/// One save that began in a directory: what it may have created, and the files of the manifest it
/// was to replace.
#[derive(Debug, PartialEq)]
struct JournalEntry {
    save: String,
    shards: usize,
    supersedes: Vec<String>,
}

impl JournalEntry {
    fn line(&self) -> String {
        format!("{}\n", json!({"save": self.save, "shards": self.shards, "supersedes": self.supersedes}))
    }

    fn shard_files(&self) -> Vec<String> {
        (0..self.shards).map(|r| shard_name(&self.save, r)).collect()
    }

    /// The files this save may have written: its shards, their and the manifest's temporary files.
    fn own_files(&self, dir: &Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for shard in self.shard_files() {
            files.extend(temp_path(&dir.join(&shard), &self.save).ok());
            files.push(dir.join(shard));
        }
        files.extend(temp_path(&dir.join(MANIFEST), &self.save).ok());
        files
    }

    /// After a newer manifest is in place: every file this save wrote or made stale (the shards of
    /// the manifest it superseded) except those in `keep`, the newer manifest's.
    fn remove_stale(&self, dir: &Path, keep: &[String]) {
        let mut files = self.own_files(dir);
        files.extend(self.supersedes.iter().map(|f| dir.join(f)));
        remove_regular(files, keep);
    }
}

/// Removes those of `files` that are regular files and not named in `keep`.
fn remove_regular(files: Vec<std::path::PathBuf>, keep: &[String]) {
    for path in files {
        let named = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let regular = fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
        if regular && !keep.iter().any(|k| k == named) {
            let _ = fs::remove_file(&path);
        }
    }
}

/// The saves a directory's lock file records as begun and not cleaned up after.
struct Journal {
    entries: Vec<JournalEntry>,
}

impl Journal {
    /// Lines that are not a complete entry (a crash while appending one, before its save created
    /// anything) are skipped.
    fn parse(bytes: &[u8]) -> Journal {
        let entries = bytes
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
            .filter_map(|v| {
                let save = v.get("save")?.as_str().filter(|s| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))?;
                let shards = usize::try_from(v.get("shards")?.as_u64()?).ok()?;
                let supersedes = v.get("supersedes")?.as_array()?.iter().filter_map(|f| f.as_str().filter(|f| plain_name(f)).map(String::from)).collect();
                Some(JournalEntry { save: save.to_string(), shards, supersedes })
            })
            .collect();
        Journal { entries }
    }
}

/// A file name inside the directory: no path separators, not hidden, not the manifest.
fn plain_name(file: &str) -> bool {
    !(file.is_empty() || file.contains(['/', '\\', '\0']) || file.starts_with('.') || file == MANIFEST)
}

/// The shard files the manifest in `dir` names, if it is one this library can read (any version).
fn manifest_files(dir: &Path) -> Vec<String> {
    let Ok(Some(file)) = RegularFile::open(&dir.join(MANIFEST), "checkpoint manifest") else { return Vec::new() };
    let Ok(bytes) = file.read_all(MAX_MANIFEST_BYTES, "checkpoint manifest") else { return Vec::new() };
    let text = String::from_utf8_lossy(&bytes);
    let body = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("manifest").cloned())
        .or_else(|| text.split('\n').next().and_then(|line| serde_json::from_str::<Value>(line).ok()));
    let Some(body) = body.filter(|b| b.get("format").and_then(Value::as_str) == Some(FORMAT)) else { return Vec::new() };
    let shards = body.get("shards").and_then(Value::as_array).cloned().unwrap_or_default();
    shards.iter().filter_map(|s| s.get("file")?.as_str().filter(|f| plain_name(f)).map(String::from)).collect()
}

/// Writes the shard files of global ranks `ranks` (this process's) of save `save_id`: their
/// entries of the manifest's shard table.
fn write_shards(head: &Head, dir: &Path, save_id: &str, ranks: std::ops::Range<usize>) -> Result<Vec<Value>> {
    let cfg = head.config();
    let d = cfg.embedding_dim;
    let tensors = StateTensor::for_optimizer(cfg.optimizer.kind);
    let (stored, stored_name) = stored_tensor_dtype(cfg.storage_dtype);
    let rows_per_chunk = chunk_rows(d * 4);
    let mut rows = try_zeroed::<f32>(rows_per_chunk * d, "checkpoint chunk")?;
    let mut steps = try_zeroed::<u32>(rows_per_chunk, "checkpoint chunk")?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(rows_per_chunk * d * 4).map_err(|_| Error::new(Status::OutOfMemory, "cannot allocate a checkpoint chunk"))?;
    let mut shards = Vec::new();
    for rank in ranks {
        let name = shard_name(save_id, rank);
        let range = ShardRange::of(cfg.num_classes, cfg.world_size, rank);
        let d64 = d as u64;
        let elem = cfg.storage_dtype.size() as u64;
        let mut layout: Vec<(&str, &str, Vec<u64>, u64)> =
            tensors.iter().map(|t| (t.name(), stored_name, vec![range.len, d64], range.len * d64 * elem)).collect();
        if cfg.optimizer.kind == OptimizerKind::AdamW {
            layout.push(("steps", "U32", vec![range.len], range.len * 4));
        }
        let meta = json!({"start": range.start.to_string(), "len": range.len.to_string(), "rank": rank.to_string()});
        let mut file = AtomicFile::create_tagged(&dir.join(&name), save_id)?;
        let mut crc = crc32fast::Hasher::new();
        let mut size = 0u64;
        let mut put = |file: &mut AtomicFile, bytes: &[u8]| -> Result<()> {
            crc.update(bytes);
            size += bytes.len() as u64;
            file.write_all(bytes)
        };
        put(&mut file, &safetensors_header(&layout, &meta))?;
        let end = range.start + range.len;
        for &tensor in tensors {
            let mut at = range.start;
            while at < end {
                let n = (rows_per_chunk as u64).min(end - at);
                let chunk = &mut rows[..n as usize * d];
                head.read_state(tensor, at, n, chunk)?;
                bytes.clear();
                match stored {
                    // A bf16 head reads back exactly widened values: their high halves are the stored bits.
                    safetensors::Dtype::BF16 => chunk.iter().for_each(|v| {
                        debug_assert_eq!(v.to_bits() & 0xFFFF, 0, "a bf16 head read back a value bf16 cannot hold");
                        bytes.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes())
                    }),
                    _ => chunk.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes())),
                }
                put(&mut file, &bytes)?;
                at += n;
            }
        }
        if cfg.optimizer.kind == OptimizerKind::AdamW {
            let mut at = range.start;
            while at < end {
                let n = (rows_per_chunk as u64).min(end - at);
                let chunk = &mut steps[..n as usize];
                head.read_steps(at, n, chunk)?;
                bytes.clear();
                chunk.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
                put(&mut file, &bytes)?;
                at += n;
            }
        }
        let crc = crc.finalize();
        file.commit()?;
        shards.push(json!({"rank": rank, "start": range.start, "len": range.len, "file": name, "bytes": size, "crc32": crc}));
    }
    Ok(shards)
}

/// A margin kind as checkpoints name it.
fn margin_kind_name(kind: MarginKind) -> &'static str {
    match kind {
        MarginKind::Combined => "combined",
        MarginKind::AdaFace { .. } => "adaface",
        MarginKind::Curricular { .. } => "curricular",
    }
}

/// Writes and publishes the manifest of save `save_id` over the shard table `shards` (any order).
fn write_manifest(head: &Head, dir: &Path, save_id: &str, mut shards: Vec<Value>) -> Result<()> {
    let cfg = head.config();
    shards.sort_by_key(|s| s.get("rank").and_then(Value::as_u64).unwrap_or(u64::MAX));
    let m = &cfg.margin;
    let body = json!({
        "format": FORMAT,
        "format_version": format_version(cfg.storage_dtype),
        "library": env!("CARGO_PKG_VERSION"),
        "save": save_id,
        "num_classes": cfg.num_classes,
        "embedding_dim": cfg.embedding_dim,
        "optimizer": optimizer_name(cfg.optimizer.kind),
        "storage_dtype": storage_name(cfg.storage_dtype),
        "step": head.steps_taken(),
        "seed": cfg.seed,
        "lr": head.learning_rate(),
        "sample_rate": cfg.sample_rate,
        "margin": {"scale": m.scale, "m1": m.m1, "m2": m.m2, "m3": m.m3, "interclass_filter": m.interclass_filter},
        "margin_kind": margin_kind_name(m.kind),
        "margin_state": head.margin_state()?,
        "world_size": cfg.world_size,
        "shards": shards,
    })
    .to_string();
    let mut manifest = AtomicFile::create_tagged(&dir.join(MANIFEST), save_id)?;
    manifest.write_all(manifest_text(&body).as_bytes())?;
    manifest.commit()
}

/// The manifest file for inner object `body`: one JSON document carrying `body`'s checksum.
fn manifest_text(body: &str) -> String {
    format!("{MANIFEST_HEAD}{:08x}{MANIFEST_MID}{body}}}\n", crc32fast::hash(body.as_bytes()))
}

pub(crate) struct ShardEntry {
    pub start: u64,
    pub len: u64,
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
}

pub(crate) struct Manifest {
    pub num_classes: u64,
    pub embedding_dim: u64,
    pub optimizer: OptimizerKind,
    /// How centers and optimizer state are stored in the shard files: F32 or BF16.
    pub storage: DType,
    /// The margin kind's name and its running statistics (SPEC §1.6a); a manifest from before
    /// the adaptive margins names none: the combined margin, without statistics.
    pub margin_kind: String,
    pub margin_state: Vec<f32>,
    pub step: u64,
    pub seed: u64,
    pub lr: f32,
    pub shards: Vec<ShardEntry>,
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value> {
    v.get(key).ok_or_else(|| corrupt(format!("checkpoint manifest lacks \"{key}\"")))
}

fn uint(v: &Value, key: &str) -> Result<u64> {
    field(v, key)?.as_u64().ok_or_else(|| corrupt(format!("checkpoint manifest: \"{key}\" is not an unsigned integer")))
}

/// The inner object of a manifest file, checked byte for byte against its checksum: exactly the
/// layout `manifest_text` writes, any other byte is damage. An intact manifest of another format
/// version — format 1 had a checksum line after the JSON instead of a wrapper — is incompatible.
fn manifest_body(path: &Path, text: &str) -> Result<Value> {
    let checked = |digits: &str, body: &str| digits == format!("{:08x}", crc32fast::hash(body.as_bytes()));
    let wrapped = text
        .strip_prefix(MANIFEST_HEAD)
        .and_then(|rest| Some((rest.get(..8)?, rest.get(8..)?.strip_prefix(MANIFEST_MID)?.strip_suffix("}\n")?)))
        .filter(|(digits, body)| checked(digits, body));
    let legacy = || {
        let (body, line) = text.split_once('\n')?;
        Some(body).filter(|body| line.strip_prefix("crc32 ").and_then(|l| l.strip_suffix('\n')).is_some_and(|d| checked(d, body)))
    };
    let (body, layout_version) = match wrapped {
        Some((_, body)) => (body, None),
        None => match legacy() {
            Some(body) => (body, Some(1)),
            None => return Err(corrupt(format!("{} fails its checksum: altered or truncated", path.display()))),
        },
    };
    let v: Value = serde_json::from_str(body).map_err(|e| corrupt(format!("{}: {e}", path.display())))?;
    // A manifest in format 1's layout is format 1, whatever it claims.
    let version = layout_version.or_else(|| v.get("format_version").and_then(Value::as_u64));
    if v.get("format").and_then(Value::as_str) == Some(FORMAT) {
        if let Some(version) = version.filter(|n| !(F32_FORMAT_VERSION..=FORMAT_VERSION).contains(n)) {
            let hint = if version < F32_FORMAT_VERSION { "; load it with the partialfc version that wrote it and save it again" } else { "" };
            return Err(Error::new(
                Status::Incompatible,
                format!("{}: checkpoint format version {version}; this version of partialfc reads formats {F32_FORMAT_VERSION} and {FORMAT_VERSION}{hint}", path.display()),
            ));
        }
    }
    Ok(v)
}

pub(crate) fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let Some(file) = RegularFile::open(&path, "checkpoint manifest")? else {
        return Err(if dir.is_dir() {
            corrupt(format!("{} is missing: not a complete checkpoint", path.display()))
        } else {
            Error::new(Status::Io, format!("no checkpoint directory at {}", dir.display()))
        });
    };
    let text = file.read_all(MAX_MANIFEST_BYTES, "checkpoint manifest")?;
    let text = String::from_utf8(text).map_err(|_| corrupt(format!("{} is not UTF-8", path.display())))?;
    let v = manifest_body(&path, &text)?;
    if field(&v, "format")?.as_str() != Some(FORMAT) {
        return Err(corrupt(format!("{} is not a partialfc checkpoint manifest", path.display())));
    }
    let version = uint(&v, "format_version")?;
    if !(F32_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(corrupt(format!("{}: bad format version", path.display())));
    }
    // The same checks as a head's own setters: a checkpoint cannot smuggle in what they refuse.
    let lr = field(&v, "lr")?.as_f64().ok_or_else(|| corrupt("checkpoint manifest: \"lr\" is not a number"))?;
    check_learning_rate(lr as f32).map_err(|e| corrupt(format!("checkpoint manifest: {}", e.message)))?;
    let step = uint(&v, "step")?;
    check_steps(step, &[]).map_err(|e| corrupt(format!("checkpoint manifest: {}", e.message)))?;
    let optimizer = match field(&v, "optimizer")?.as_str() {
        Some("sgd") => OptimizerKind::Sgd,
        Some("adamw") => OptimizerKind::AdamW,
        Some(other) => return Err(Error::new(Status::Incompatible, format!("checkpoint holds state of an unknown optimizer {other:?}"))),
        None => return Err(corrupt("checkpoint manifest: \"optimizer\" is not a string")),
    };
    // Absent from the manifests written before bf16 storage: they are f32.
    let storage = match v.get("storage_dtype") {
        None => DType::F32,
        Some(s) => match s.as_str() {
            Some("f32") => DType::F32,
            Some("bf16") => DType::BF16,
            Some(other) => return Err(Error::new(Status::Incompatible, format!("checkpoint stores its state as {other:?}; this version of partialfc reads f32 and bf16"))),
            None => return Err(corrupt("checkpoint manifest: \"storage_dtype\" is not a string")),
        },
    };
    if version < format_version(storage) {
        return Err(corrupt(format!("{}: bf16 state in a format {version} manifest, which holds f32 only", path.display())));
    }
    let mut shards = Vec::new();
    for s in field(&v, "shards")?.as_array().ok_or_else(|| corrupt("checkpoint manifest: \"shards\" is not a list"))? {
        let file = field(s, "file")?.as_str().ok_or_else(|| corrupt("checkpoint manifest: bad shard file name"))?;
        if !plain_name(file) {
            return Err(corrupt(format!("checkpoint manifest names a file outside the checkpoint: {file}")));
        }
        let crc = uint(s, "crc32")?;
        shards.push(ShardEntry {
            start: uint(s, "start")?,
            len: uint(s, "len")?,
            file: file.to_string(),
            bytes: uint(s, "bytes")?,
            crc32: u32::try_from(crc).map_err(|_| corrupt("checkpoint manifest: bad crc32"))?,
        });
    }
    let margin_kind = match v.get("margin_kind") {
        None => margin_kind_name(MarginKind::Combined).to_string(),
        Some(k) => k.as_str().ok_or_else(|| corrupt("checkpoint manifest: \"margin_kind\" is not a string"))?.to_string(),
    };
    let margin_state = match v.get("margin_state") {
        None => Vec::new(),
        Some(list) => list
            .as_array()
            .ok_or_else(|| corrupt("checkpoint manifest: \"margin_state\" is not a list"))?
            .iter()
            .map(|x| x.as_f64().map(|x| x as f32).ok_or_else(|| corrupt("checkpoint manifest: \"margin_state\" holds a non-number")))
            .collect::<Result<Vec<f32>>>()?,
    };
    let m = Manifest {
        num_classes: uint(&v, "num_classes")?,
        embedding_dim: uint(&v, "embedding_dim")?,
        optimizer,
        storage,
        margin_kind,
        margin_state,
        step,
        seed: uint(&v, "seed")?,
        lr: lr as f32,
        shards,
    };
    if m.num_classes == 0 || m.num_classes > crate::config::MAX_CLASSES {
        return Err(corrupt(format!("checkpoint manifest: {} classes", m.num_classes)));
    }
    if m.embedding_dim == 0 || m.embedding_dim > crate::config::MAX_EMBEDDING_DIM as u64 {
        return Err(corrupt(format!("checkpoint manifest: embedding dimension {}", m.embedding_dim)));
    }
    // The shards must tile [0, C) in order.
    let mut next = 0u64;
    for s in &m.shards {
        if s.start != next || s.len == 0 {
            return Err(corrupt("checkpoint manifest: shards do not cover the classes contiguously"));
        }
        next = s.start.checked_add(s.len).ok_or_else(|| corrupt("checkpoint manifest: shard range overflows"))?;
    }
    if next != m.num_classes {
        return Err(corrupt("checkpoint manifest: shards do not cover every class"));
    }
    Ok(m)
}

/// Where the rows of classes `[first, first + count)` go, per tensor.
pub(crate) struct RowsOut {
    pub first: u64,
    pub count: u64,
    /// Tensors to keep, `count × d` values each; the others are verified and dropped.
    pub tensors: Vec<(StateTensor, Vec<f32>)>,
    /// AdamW's step counts, when wanted.
    pub steps: Option<Vec<u32>>,
    /// The storage dtype of the head the rows go to: values the file holds more precisely are
    /// rounded to it as the head would store them, and checked as such.
    pub storage: DType,
}

impl RowsOut {
    /// Fallibly allocated room for `tensors` (and the step counts) of `count` classes, for a head
    /// storing `storage`.
    pub fn new(first: u64, count: u64, d: usize, tensors: &[StateTensor], steps: bool, storage: DType) -> Result<RowsOut> {
        let values = (count as usize).checked_mul(d).ok_or_else(|| Error::new(Status::OutOfMemory, "checkpoint state too large"))?;
        Ok(RowsOut {
            first,
            count,
            storage,
            tensors: tensors.iter().map(|&t| Ok((t, try_zeroed::<f32>(values, "checkpoint state")?))).collect::<Result<_>>()?,
            steps: if steps { Some(try_zeroed::<u32>(count as usize, "checkpoint step counts")?) } else { None },
        })
    }
}

/// Reads the rows `out` asks for from the shard files of `m` in `dir`, verifying every file they
/// touch completely.
pub(crate) fn read_rows(dir: &Path, m: &Manifest, out: &mut RowsOut) -> Result<()> {
    let (first, end) = (out.first, out.first + out.count);
    let mut buf = Vec::new();
    for s in m.shards.iter().filter(|s| s.start < end && first < s.start + s.len) {
        read_shard(dir, m, s, out, &mut buf)?;
    }
    Ok(())
}

fn read_shard(dir: &Path, m: &Manifest, s: &ShardEntry, out: &mut RowsOut, buf: &mut Vec<u8>) -> Result<()> {
    let path = dir.join(&s.file);
    let shown = path.display();
    let mut f = RegularFile::open(&path, "checkpoint file")?.ok_or_else(|| corrupt(format!("checkpoint file {shown} is missing")))?;
    let damaged = || corrupt(format!("checkpoint file {shown} fails its size or checksum: truncated or altered"));
    if f.size() != s.bytes || s.bytes < 8 {
        return Err(damaged());
    }
    let mut crc = crc32fast::Hasher::new();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)?;
    crc.update(&n);
    let header_len = u64::from_le_bytes(n);
    if header_len > MAX_SAFETENSORS_HEADER || header_len > s.bytes - 8 {
        return Err(damaged());
    }
    let header = f.read_vec(header_len, "checkpoint header")?;
    crc.update(&header);
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header).map_err(|e| corrupt(format!("{shown}: {e}")))?;
    if 8 + header_len + meta.data_len() as u64 != s.bytes {
        return Err(damaged());
    }
    // Exactly the tensors a head of this optimizer keeps, of their types and shapes.
    let d = m.embedding_dim as usize;
    let tensors = StateTensor::for_optimizer(m.optimizer);
    let with_steps = m.optimizer == OptimizerKind::AdamW;
    let names = meta.offset_keys();
    if names.len() != tensors.len() + usize::from(with_steps) {
        return Err(corrupt(format!("{shown}: holds tensors {names:?}; expected {:?}{}", tensors.iter().map(|t| t.name()).collect::<Vec<_>>(), if with_steps { " and steps" } else { "" })));
    }
    let len = s.len as usize;
    let stored = stored_tensor_dtype(m.storage).0;
    for name in &names {
        let info = meta.info(name).expect("a listed tensor");
        let want = match tensors.iter().find(|t| t.name() == name) {
            Some(_) => (stored, vec![len, d]),
            None if with_steps && name == "steps" => (safetensors::Dtype::U32, vec![len]),
            None => return Err(corrupt(format!("{shown}: unexpected tensor {name}"))),
        };
        if (info.dtype, &info.shape) != (want.0, &want.1) {
            return Err(corrupt(format!("{shown}: tensor {name} has the wrong type or shape")));
        }
    }
    // Stream the tensors in file order: every byte checksummed, the wanted rows converted and checked.
    let (lo, hi) = (out.first.max(s.start), (out.first + out.count).min(s.start + s.len));
    for name in &names {
        let tensor = tensors.iter().copied().find(|t| t.name() == name);
        let (cols, elem) = if tensor.is_some() { (d, m.storage.size()) } else { (1, 4) };
        let row_bytes = cols * elem;
        let per_chunk = chunk_rows(row_bytes);
        if buf.len() < per_chunk.min(len) * row_bytes {
            buf.clear();
            buf.try_reserve_exact(per_chunk.min(len) * row_bytes).map_err(|_| Error::new(Status::OutOfMemory, "cannot allocate a checkpoint chunk"))?;
            buf.resize(per_chunk.min(len) * row_bytes, 0);
        }
        let mut row = 0usize;
        while row < len {
            let n = per_chunk.min(len - row);
            let chunk = &mut buf[..n * row_bytes];
            f.read_exact(chunk)?;
            crc.update(chunk);
            // The part of this chunk's classes that `out` wants.
            let (c0, c1) = (s.start + row as u64, s.start + (row + n) as u64);
            let (w0, w1) = (c0.max(lo), c1.min(hi));
            if w0 < w1 {
                let src = &chunk[(w0 - c0) as usize * row_bytes..(w1 - c0) as usize * row_bytes];
                let at = (w0 - out.first) as usize;
                match tensor {
                    Some(t) => {
                        if let Some((_, dst)) = out.tensors.iter_mut().find(|(kept, _)| *kept == t) {
                            let dst = &mut dst[at * d..(at + (w1 - w0) as usize) * d];
                            match m.storage {
                                DType::BF16 => dst.iter_mut().zip(src.chunks_exact(2)).for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                                _ => dst.iter_mut().zip(src.chunks_exact(4)).for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                            }
                        }
                    }
                    None => {
                        if let Some(steps) = out.steps.as_mut() {
                            let dst = &mut steps[at..at + (w1 - w0) as usize];
                            for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                                *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                            }
                        }
                    }
                }
            }
            row += n;
        }
    }
    if crc.finalize() != s.crc32 {
        return Err(damaged());
    }
    // The file is what was saved; its values must still be ones a head accepts.
    if lo < hi {
        let rows = (lo - out.first) as usize..(hi - out.first) as usize;
        let rounds = out.storage == DType::BF16 && m.storage != DType::BF16;
        for (t, dst) in out.tensors.iter_mut() {
            let values = &mut dst[rows.start * d..rows.end * d];
            if let Some(why) = first_bad_value(*t, values, lo, d) {
                return Err(corrupt(format!("{shown}: {why}")));
            }
            if rounds {
                round_to_bf16(values);
                if let Some(why) = first_bad_value(*t, values, lo, d) {
                    return Err(Error::new(
                        Status::Incompatible,
                        format!("{shown}: rounded to bf16 for this head's storage, {why}; load the checkpoint into a head storing f32"),
                    ));
                }
            }
        }
        if let Some(steps) = &out.steps {
            check_steps(m.step, &steps[rows]).map_err(|e| corrupt(format!("{shown}: {}", e.message)))?;
        }
    }
    Ok(())
}

/// Reads a checkpoint from `dir` into `head`, resharding as needed: each process reads the rows of
/// its own classes, whatever layout wrote them. On any process's error every process fails and
/// every head is unchanged. A head poisoned by a failed exchange is usable again after a load.
pub fn load(head: &mut Head, dir: &Path) -> Result<()> {
    load_from(head, Ok(dir))
}

/// `load` of a directory argument that may be bad on some process (agreed first, on a head that
/// the load may heal).
pub(crate) fn load_from(head: &mut Head, dir: Result<&Path>) -> Result<()> {
    let poisoned = head.group().check().err();
    head.group().heal();
    let outcome = head.group().agree(dir).and_then(|dir| {
        let read = read_state(head, dir);
        head.group().agree(read)
    });
    match outcome {
        Ok(restored) => head.restore(restored),
        Err(e) => {
            if let Some(p) = poisoned {
                head.group().poison(&p.message);
            }
            Err(e)
        }
    }
}

/// This process's part of the checkpoint in `dir`, verified completely.
fn read_state(head: &Head, dir: &Path) -> Result<Restored> {
    let _reading = DirLock::shared(dir)?;
    let m = read_manifest(dir)?;
    let cfg = head.config();
    if m.num_classes != cfg.num_classes || m.embedding_dim != cfg.embedding_dim as u64 {
        return Err(Error::new(
            Status::Incompatible,
            format!(
                "checkpoint has {} classes of dimension {}; this head has {} of dimension {}",
                m.num_classes, m.embedding_dim, cfg.num_classes, cfg.embedding_dim
            ),
        ));
    }
    let kind = cfg.optimizer.kind;
    if m.optimizer != kind {
        return Err(Error::new(
            Status::Incompatible,
            format!("checkpoint holds {} optimizer state; this head uses {}", optimizer_name(m.optimizer), optimizer_name(kind)),
        ));
    }
    if m.margin_kind != margin_kind_name(cfg.margin.kind) {
        return Err(Error::new(
            Status::Incompatible,
            format!("checkpoint holds the running statistics of margin {:?}; this head's margin is {:?}", m.margin_kind, margin_kind_name(cfg.margin.kind)),
        ));
    }
    let margin_state = MarginState::from_values(cfg.margin.kind, &m.margin_state).map_err(|e| corrupt(format!("checkpoint manifest: {}", e.message)))?.values();
    let (first, count) = head.local_classes();
    let mut rows = RowsOut::new(first, count, cfg.embedding_dim, StateTensor::for_optimizer(kind), kind == OptimizerKind::AdamW, cfg.storage_dtype)?;
    read_rows(dir, &m, &mut rows)?;
    Ok(Restored { tensors: rows.tensors, steps: rows.steps, step: m.step, seed: m.seed, lr: m.lr, margin_state })
}

/// All centers of the checkpoint in `dir`, verified as `load` verifies them: `(classes, dim, rows)`.
pub(crate) fn read_centers(dir: &Path) -> Result<(u64, usize, Vec<f32>)> {
    let _reading = DirLock::shared(dir)?;
    let m = read_manifest(dir)?;
    let d = m.embedding_dim as usize;
    // The values as the checkpoint holds them, widened exactly where it holds bf16.
    let mut rows = RowsOut::new(0, m.num_classes, d, &[StateTensor::Centers], false, DType::F32)?;
    read_rows(dir, &m, &mut rows)?;
    let (_, centers) = rows.tensors.pop().expect("centers were asked for");
    Ok((m.num_classes, d, centers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn head(adamw: bool) -> Head {
        let mut cfg = Config { num_classes: 50, embedding_dim: 8, local_shards: 2, world_size: 2, ..Config::default() };
        if adamw {
            cfg.optimizer.kind = OptimizerKind::AdamW;
        }
        Head::new(cfg).unwrap()
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("pfc-unit-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).map(|e| (e.file_name().into_string().unwrap(), fs::read(e.path()).unwrap())).collect();
        v.sort();
        v
    }

    /// Item 2 of issue #11: a head holding what load would refuse is not saved, and the good
    /// checkpoint in the directory stays byte for byte.
    #[test]
    fn a_state_load_would_refuse_is_not_saved_and_the_directory_is_untouched() {
        for adamw in [false, true] {
            let dir = scratch(&format!("refuse-{adamw}"));
            let mut h = head(adamw);
            save(&h, &dir).unwrap();
            let before = listing(&dir);
            let (first, count) = h.local_classes();
            let d = h.config().embedding_dim;
            let tensors = StateTensor::for_optimizer(h.config().optimizer.kind);
            let state = |h: &Head| -> Vec<(StateTensor, Vec<f32>)> {
                tensors.iter().map(|&t| {
                    let mut v = vec![0f32; count as usize * d];
                    h.read_state(t, first, count, &mut v).unwrap();
                    (t, v)
                }).collect()
            };
            let good = state(&h);
            let mut cases: Vec<(String, Status, Restored)> = Vec::new();
            for (i, &t) in tensors.iter().enumerate() {
                for bad in [f32::NAN, f32::INFINITY] {
                    let mut tensors = good.clone();
                    tensors[i].1[count as usize * d - 3] = bad;
                    let steps = adamw.then(|| vec![0u32; count as usize]);
                    cases.push((format!("{} {bad}", t.name()), Status::NonFinite, Restored { tensors, steps, step: 5, seed: 1, lr: 0.1, margin_state: Vec::new() }));
                }
            }
            if adamw {
                let mut steps = vec![3u32; count as usize];
                steps[7] = 6;
                cases.push(("a row stepped more often than the head".into(), Status::InvalidArgument, Restored { tensors: good.clone(), steps: Some(steps), step: 5, seed: 1, lr: 0.1, margin_state: Vec::new() }));
            }
            cases.push(("a step count beyond the limit".into(), Status::InvalidArgument, Restored { tensors: good.clone(), steps: adamw.then(|| vec![0u32; count as usize]), step: u64::MAX, seed: 1, lr: 0.1, margin_state: Vec::new() }));
            cases.push(("an infinite learning rate".into(), Status::InvalidArgument, Restored { tensors: good.clone(), steps: adamw.then(|| vec![0u32; count as usize]), step: 5, seed: 1, lr: f32::INFINITY, margin_state: Vec::new() }));
            for (what, status, bad) in cases {
                h.restore(bad).unwrap();
                let e = save(&h, &dir).unwrap_err();
                assert_eq!(e.status, status, "{what}: {}", e.message);
                assert!(e.message.contains("cannot save"), "{what}: {}", e.message);
                assert_eq!(listing(&dir), before, "{what}: the directory changed");
                // Nor into a new directory: nothing is created.
                let fresh = dir.join("fresh");
                assert!(save(&h, &fresh).is_err());
                assert!(!fresh.exists(), "{what}");
            }
            // The good checkpoint still loads.
            let mut other = head(adamw);
            load(&mut other, &dir).unwrap();
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn journal_lines_that_are_not_whole_entries_are_skipped() {
        let entry = JournalEntry { save: "0123456789abcdef".into(), shards: 3, supersedes: vec!["shard-x.safetensors".into()] };
        let mut text = entry.line().into_bytes();
        text.extend_from_slice(b"{\"save\":\"0123456789abcdef\",\"shards\":2,\"supersedes\":[\"../etc\",\".hidden\",\"ok\"]}\n");
        text.extend_from_slice(b"{\"save\":\"short\",\"shards\":1,\"supersedes\":[]}\n{\"save\":\"0123456789ab");
        let j = Journal::parse(&text);
        assert_eq!(j.entries.len(), 2);
        assert_eq!(j.entries[0], entry);
        assert_eq!(j.entries[1].supersedes, vec!["ok".to_string()]);
    }
}
