//! Checkpoints: a directory holding `manifest.json` (format, configuration, step, seed, learning
//! rate, the shard table with each file's size and CRC-32, and its own CRC-32 on a second line) and
//! one safetensors file per shard with its centers and all optimizer state.
//!
//! Crash safety: shard files get names unique to the save (never those of a file already in the
//! directory), the manifest is replaced atomically last, and only then are the previous save's files
//! removed — a crash at any point leaves a manifest whose files are all present and complete. A save
//! that fails removes the shard files it wrote unless its manifest got into place; a successful save
//! removes whatever earlier crashed saves left (unreferenced shard files, temporary files). One
//! directory has one writer at a time.
//!
//! Loading verifies everything before changing anything — the manifest byte for byte against its
//! checksum line, each file's size and CRC-32, tensor names, types, shapes and finiteness — and reads
//! each class's rows from whichever shard file holds them, so a checkpoint loads into any shard count.

use crate::config::OptimizerKind;
use crate::engine::{Head, Restored};
use crate::error::{try_zeroed, Error, Result, Status};
use crate::fsutil::{io_error, sync_dir, AtomicFile};
use crate::optimizer::StateTensor;
use crate::sharding::ShardRange;
use serde_json::{json, Value};
use std::fs;
use std::path::Path;

pub(crate) const FORMAT: &str = "partialfc-checkpoint";
pub(crate) const FORMAT_VERSION: u64 = 1;
const MANIFEST: &str = "manifest.json";
/// Rows copied per write while streaming a shard's tensors.
const CHUNK_ROWS: u64 = 8192;

fn corrupt(message: impl Into<String>) -> Error {
    Error::new(Status::Corrupt, message)
}

fn optimizer_name(kind: OptimizerKind) -> &'static str {
    match kind {
        OptimizerKind::Sgd => "sgd",
        OptimizerKind::AdamW => "adamw",
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
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

/// Writes a checkpoint of `head` into `dir` (created if needed).
pub fn save(head: &Head, dir: &Path) -> Result<()> {
    let cfg = head.config();
    let (first, count) = head.local_classes();
    if first != 0 || count != cfg.num_classes {
        return Err(Error::new(Status::Unavailable, "this process owns only part of the classes; multi-process checkpoints need the distributed backend"));
    }
    fs::create_dir_all(dir).map_err(|e| io_error("cannot create checkpoint directory", dir, e))?;
    let save_id = fresh_save_id(dir, cfg.world_size);
    let names: Vec<String> = (0..cfg.world_size).map(|r| shard_name(&save_id, r)).collect();
    match write_checkpoint(head, dir, &names) {
        Ok(()) => {
            // The new manifest is durable: nothing else of ours in `dir` is referenced any more —
            // the previous save's shards, and whatever a crashed or failed save left behind.
            remove_unreferenced(dir, &names);
            Ok(())
        }
        Err(e) => {
            // Unless the new manifest made it into place (a failure after its rename), the shard
            // files this save committed are referenced by nothing: remove them.
            let installed = read_manifest(dir).is_ok_and(|m| m.shards.iter().any(|s| names.contains(&s.file)));
            if !installed {
                for name in &names {
                    let _ = fs::remove_file(dir.join(name));
                }
            }
            Err(e)
        }
    }
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

/// Whether `name` is a file a save of this module writes: a shard file, or the temporary file of a
/// shard or of the manifest (see `AtomicFile`).
fn is_checkpoint_file(name: &str) -> bool {
    (name.starts_with("shard-") && name.ends_with(".safetensors"))
        || ((name.starts_with(".shard-") || name.starts_with(".manifest.json.")) && name.contains(".tmp-"))
}

/// Best effort: removes this module's files in `dir` that are not in `keep`, then syncs `dir`. One
/// directory has one writer at a time.
fn remove_unreferenced(dir: &Path, keep: &[String]) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut removed = false;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_checkpoint_file(name) && !keep.iter().any(|k| k == name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            removed |= fs::remove_file(entry.path()).is_ok();
        }
    }
    if removed {
        let _ = sync_dir(dir);
    }
}

/// Writes the shard files `names` (one per rank) and then the manifest that names them.
fn write_checkpoint(head: &Head, dir: &Path, names: &[String]) -> Result<()> {
    let cfg = head.config();
    let d = cfg.embedding_dim as u64;
    let tensors = StateTensor::for_optimizer(cfg.optimizer.kind);
    let mut shards = Vec::new();
    for (rank, name) in names.iter().enumerate() {
        let range = ShardRange::of(cfg.num_classes, cfg.world_size, rank);
        let mut layout: Vec<(&str, &str, Vec<u64>, u64)> =
            tensors.iter().map(|t| (t.name(), "F32", vec![range.len, d], range.len * d * 4)).collect();
        if cfg.optimizer.kind == OptimizerKind::AdamW {
            layout.push(("steps", "U32", vec![range.len], range.len * 4));
        }
        let meta = json!({"start": range.start.to_string(), "len": range.len.to_string(), "rank": rank.to_string()});
        let mut file = AtomicFile::create(&dir.join(name))?;
        let mut crc = crc32fast::Hasher::new();
        let mut size = 0u64;
        let mut put = |file: &mut AtomicFile, bytes: &[u8]| -> Result<()> {
            crc.update(bytes);
            size += bytes.len() as u64;
            file.write_all(bytes)
        };
        put(&mut file, &safetensors_header(&layout, &meta))?;
        let mut rows = vec![0f32; (CHUNK_ROWS * d) as usize];
        let mut bytes = Vec::new();
        for &tensor in tensors {
            let mut at = range.start;
            while at < range.start + range.len {
                let n = CHUNK_ROWS.min(range.start + range.len - at);
                let chunk = &mut rows[..(n * d) as usize];
                head.read_state(tensor, at, n, chunk)?;
                bytes.clear();
                chunk.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
                put(&mut file, &bytes)?;
                at += n;
            }
        }
        if cfg.optimizer.kind == OptimizerKind::AdamW {
            let mut steps = vec![0u32; range.len as usize];
            head.read_steps(range.start, range.len, &mut steps)?;
            bytes.clear();
            steps.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
            put(&mut file, &bytes)?;
        }
        let crc = crc.finalize();
        file.commit()?;
        shards.push(json!({"rank": rank, "start": range.start, "len": range.len, "file": name, "bytes": size, "crc32": crc}));
    }
    let m = &cfg.margin;
    let body = json!({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library": env!("CARGO_PKG_VERSION"),
        "num_classes": cfg.num_classes,
        "embedding_dim": cfg.embedding_dim,
        "optimizer": optimizer_name(cfg.optimizer.kind),
        "step": head.steps_taken(),
        "seed": cfg.seed,
        "lr": head.learning_rate(),
        "sample_rate": cfg.sample_rate,
        "margin": {"scale": m.scale, "m1": m.m1, "m2": m.m2, "m3": m.m3, "interclass_filter": m.interclass_filter},
        "world_size": cfg.world_size,
        "shards": shards,
    })
    .to_string();
    let mut manifest = AtomicFile::create(&dir.join(MANIFEST))?;
    manifest.write_all(format!("{body}\ncrc32 {:08x}\n", crc32fast::hash(body.as_bytes())).as_bytes())?;
    manifest.commit()
}

struct ShardEntry {
    start: u64,
    len: u64,
    file: String,
    bytes: u64,
    crc32: u32,
}

struct Manifest {
    num_classes: u64,
    embedding_dim: u64,
    optimizer: String,
    step: u64,
    seed: u64,
    lr: f32,
    shards: Vec<ShardEntry>,
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value> {
    v.get(key).ok_or_else(|| corrupt(format!("checkpoint manifest lacks \"{key}\"")))
}

fn uint(v: &Value, key: &str) -> Result<u64> {
    field(v, key)?.as_u64().ok_or_else(|| corrupt(format!("checkpoint manifest: \"{key}\" is not an unsigned integer")))
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(if dir.is_dir() {
                corrupt(format!("{} is missing: not a complete checkpoint", path.display()))
            } else {
                Error::new(Status::Io, format!("no checkpoint directory at {}", dir.display()))
            })
        }
        Err(e) => return Err(io_error("cannot read", &path, e)),
    };
    let text = String::from_utf8(text).map_err(|_| corrupt(format!("{} is not UTF-8", path.display())))?;
    // Exactly `body \n crc32 xxxxxxxx \n` as `save` writes it: any other byte is damage.
    let (body, check) = text.split_once('\n').unwrap_or((&text, ""));
    if check != format!("crc32 {:08x}\n", crc32fast::hash(body.as_bytes())) {
        return Err(corrupt(format!("{} fails its checksum: altered or truncated", path.display())));
    }
    let v: Value = serde_json::from_str(body).map_err(|e| corrupt(format!("{}: {e}", path.display())))?;
    if field(&v, "format")?.as_str() != Some(FORMAT) {
        return Err(corrupt(format!("{} is not a partialfc checkpoint manifest", path.display())));
    }
    let version = uint(&v, "format_version")?;
    if version != FORMAT_VERSION {
        return Err(Error::new(Status::Incompatible, format!("checkpoint format version {version}; this library reads {FORMAT_VERSION}")));
    }
    let lr = field(&v, "lr")?.as_f64().filter(|x| x.is_finite() && *x >= 0.0).ok_or_else(|| corrupt("checkpoint manifest: bad \"lr\""))? as f32;
    let mut shards = Vec::new();
    for s in field(&v, "shards")?.as_array().ok_or_else(|| corrupt("checkpoint manifest: \"shards\" is not a list"))? {
        let file = field(s, "file")?.as_str().ok_or_else(|| corrupt("checkpoint manifest: bad shard file name"))?;
        if file.is_empty() || file.contains(['/', '\\', '\0']) || file.starts_with('.') {
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
    let m = Manifest {
        num_classes: uint(&v, "num_classes")?,
        embedding_dim: uint(&v, "embedding_dim")?,
        optimizer: field(&v, "optimizer")?.as_str().ok_or_else(|| corrupt("checkpoint manifest: \"optimizer\" is not a string"))?.to_string(),
        step: uint(&v, "step")?,
        seed: uint(&v, "seed")?,
        lr,
        shards,
    };
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

/// Reads a checkpoint from `dir` into `head`, resharding as needed. On any error the head is
/// unchanged.
pub fn load(head: &mut Head, dir: &Path) -> Result<()> {
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
    if m.optimizer != optimizer_name(kind) {
        return Err(Error::new(
            Status::Incompatible,
            format!("checkpoint holds {} optimizer state; this head uses {}", m.optimizer, optimizer_name(kind)),
        ));
    }
    let d = cfg.embedding_dim;
    let (first, count) = head.local_classes();
    let tensors = StateTensor::for_optimizer(kind);
    let mut restored = Restored {
        tensors: tensors.iter().map(|&t| Ok((t, try_zeroed::<f32>(count as usize * d, "checkpoint state")?))).collect::<Result<_>>()?,
        steps: if kind == OptimizerKind::AdamW { Some(try_zeroed::<u32>(count as usize, "checkpoint step counts")?) } else { None },
        step: m.step,
        seed: m.seed,
        lr: m.lr,
    };
    for s in m.shards.iter().filter(|s| s.start < first + count && first < s.start + s.len) {
        let path = dir.join(&s.file);
        if path.is_dir() {
            return Err(corrupt(format!("checkpoint file {} is a directory", path.display())));
        }
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(corrupt(format!("checkpoint file {} is missing", path.display()))),
            Err(e) => return Err(io_error("cannot read", &path, e)),
        };
        if bytes.len() as u64 != s.bytes || crc32fast::hash(&bytes) != s.crc32 {
            return Err(corrupt(format!("checkpoint file {} fails its size or checksum: truncated or altered", path.display())));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(format!("{}: {e}", path.display())))?;
        // Rows of this shard that this process owns.
        let lo = s.start.max(first);
        let hi = (s.start + s.len).min(first + count);
        let (src_row, dst_row, rows) = ((lo - s.start) as usize, (lo - first) as usize, (hi - lo) as usize);
        for (tensor, dst) in restored.tensors.iter_mut() {
            let view = st.tensor(tensor.name()).map_err(|e| corrupt(format!("{}: {e}", path.display())))?;
            if view.dtype() != safetensors::Dtype::F32 || view.shape() != [s.len as usize, d] {
                return Err(corrupt(format!("{}: tensor {} has the wrong type or shape", path.display(), tensor.name())));
            }
            let data = &view.data()[src_row * d * 4..(src_row + rows) * d * 4];
            for (o, b) in dst[dst_row * d..(dst_row + rows) * d].iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            if let Some(at) = dst[dst_row * d..(dst_row + rows) * d].iter().position(|v| !v.is_finite()) {
                return Err(corrupt(format!("{}: tensor {} holds NaN or Inf at value {at}", path.display(), tensor.name())));
            }
        }
        if let Some(steps) = restored.steps.as_mut() {
            let view = st.tensor("steps").map_err(|e| corrupt(format!("{}: {e}", path.display())))?;
            if view.dtype() != safetensors::Dtype::U32 || view.shape() != [s.len as usize] {
                return Err(corrupt(format!("{}: tensor steps has the wrong type or shape", path.display())));
            }
            let data = &view.data()[src_row * 4..(src_row + rows) * 4];
            for (o, b) in steps[dst_row..dst_row + rows].iter_mut().zip(data.chunks_exact(4)) {
                *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
    head.restore(restored)
}
