//! A search-only index: the centers of an exported file (safetensors, `.npy`, `.fvecs` or a FAISS
//! `IndexFlatIP`, f32 or f16; safetensors also bf16) or of a checkpoint directory (f32 or bf16), held as f32 rows and searched by cosine
//! with the heads' own search (`search::top_k` over the CPU backend's scan). A serving process needs
//! neither optimizer state nor a training configuration.
//!
//! Files are hostile until proven otherwise: only regular files are read, every size is checked
//! against the file's length before anything is allocated or read, values must be finite, and
//! memory is allocated fallibly.

use crate::config::{MAX_CLASSES, MAX_EMBEDDING_DIM};
use crate::error::{try_zeroed, Error, Result, Status};
use crate::fsutil::RegularFile;
use std::path::Path;

pub struct Index {
    classes: u64,
    dim: usize,
    /// `classes × dim`, row-major, class order.
    centers: Vec<f32>,
}

/// Element types an exported file may hold.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Elem {
    F32,
    F16,
    BF16,
}

impl Elem {
    fn bytes(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F16 | Elem::BF16 => 2,
        }
    }
}

fn corrupt(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(Status::Corrupt, format!("{}: {why}", path.display()))
}

impl Index {
    /// Opens an exported centers file or a checkpoint directory.
    pub fn open(path: &Path) -> Result<Index> {
        if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
            let (classes, dim, centers) = crate::checkpoint::read_centers(path)?;
            return Ok(Index { classes, dim, centers });
        }
        let mut file = RegularFile::open(path, "index file")?
            .ok_or_else(|| Error::new(Status::Io, format!("no file or checkpoint directory at {}", path.display())))?;
        let mut magic = [0u8; 8];
        if file.size() < 8 {
            return Err(corrupt(path, "too short to be an exported centers file"));
        }
        file.read_exact(&mut magic)?;
        file.seek(0)?;
        let (classes, dim, elem, layout) = if magic.starts_with(b"\x93NUMPY") {
            npy_layout(&mut file)?
        } else if magic.starts_with(b"IxFI") {
            faiss_layout(&mut file)?
        } else if magic.starts_with(b"IxF2") || magic.starts_with(b"IxFl") {
            return Err(corrupt(path, "a FAISS flat index with another metric; partialfc exports and reads IndexFlatIP"));
        } else if u64::from_le_bytes(magic) <= file.size().saturating_sub(8) && peek_byte(&mut file, 8)? == Some(b'{') {
            safetensors_layout(&mut file)?
        } else {
            fvecs_layout(&mut file)?
        };
        let centers = read_rows(&mut file, classes, dim, elem, layout)?;
        Ok(Index { classes, dim, centers })
    }

    pub fn classes(&self) -> u64 {
        self.classes
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The `k` best classes by cosine for each query (rows of `queries`): `(ids, scores)`.
    pub fn search(&self, queries: &[f32], k: usize) -> Result<(Vec<i64>, Vec<f32>)> {
        crate::head::search::top_k(queries, self.dim, self.classes, k, |unit, k| {
            Ok(crate::backend::cpu::scan_centers(&self.centers, self.dim, 0, unit, k)?.into_sorted())
        })
    }
}

/// Where the rows are: at `offset`, each preceded by `skip` bytes (fvecs' dimension field); `ends`
/// when nothing may follow them (all formats but safetensors, whose header places every tensor).
#[derive(Clone, Copy)]
struct Layout {
    offset: u64,
    skip: u64,
    ends: bool,
}

fn peek_byte(file: &mut RegularFile, at: u64) -> Result<Option<u8>> {
    if at >= file.size() {
        return Ok(None);
    }
    file.seek(at)?;
    let mut b = [0u8];
    file.read_exact(&mut b)?;
    file.seek(0)?;
    Ok(Some(b[0]))
}

fn check_shape(path: &Path, classes: u64, dim: u64) -> Result<()> {
    if classes == 0 || classes > MAX_CLASSES || dim == 0 || dim > MAX_EMBEDDING_DIM as u64 {
        return Err(corrupt(path, format!("{classes} centers of dimension {dim}: not an exported centers file")));
    }
    Ok(())
}

/// The file must end exactly where the rows do.
fn check_length(file: &RegularFile, classes: u64, dim: usize, elem: Elem, layout: Layout) -> Result<()> {
    let want = classes
        .checked_mul(layout.skip + dim as u64 * elem.bytes() as u64)
        .and_then(|b| b.checked_add(layout.offset))
        .ok_or_else(|| corrupt(file.path(), "sizes overflow"))?;
    if want != file.size() {
        return Err(corrupt(file.path(), format!("holds {} bytes; {classes} centers of dimension {dim} need {want}", file.size())));
    }
    Ok(())
}

fn safetensors_layout(file: &mut RegularFile) -> Result<(u64, usize, Elem, Layout)> {
    let path = file.path().to_path_buf();
    let mut n = [0u8; 8];
    file.read_exact(&mut n)?;
    let header_len = u64::from_le_bytes(n);
    if header_len > 100_000_000 {
        return Err(corrupt(&path, "safetensors header too large"));
    }
    let header = file.read_vec(header_len, "safetensors header")?;
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header).map_err(|e| corrupt(&path, e))?;
    if 8 + header_len + meta.data_len() as u64 != file.size() {
        return Err(corrupt(&path, "safetensors data does not match the file's length"));
    }
    let info = meta.info("centers").ok_or_else(|| corrupt(&path, "no tensor \"centers\" (a partialfc export holds centers [C, d])"))?;
    let elem = match info.dtype {
        safetensors::Dtype::F32 => Elem::F32,
        safetensors::Dtype::F16 => Elem::F16,
        safetensors::Dtype::BF16 => Elem::BF16,
        other => return Err(corrupt(&path, format!("centers are {other:?}; expected F32, F16 or BF16"))),
    };
    let [classes, dim] = info.shape[..] else {
        return Err(corrupt(&path, format!("centers have shape {:?}; expected [C, d]", info.shape)));
    };
    check_shape(&path, classes as u64, dim as u64)?;
    let layout = Layout { offset: 8 + header_len + info.data_offsets.0 as u64, skip: 0, ends: false };
    // Only the centers' bytes are read; their extent was validated against the file by `Metadata`.
    Ok((classes as u64, dim, elem, layout))
}

fn npy_layout(file: &mut RegularFile) -> Result<(u64, usize, Elem, Layout)> {
    let path = file.path().to_path_buf();
    let mut pre = [0u8; 8];
    file.read_exact(&mut pre)?;
    let (len, at) = match pre[6] {
        1 => {
            let mut l = [0u8; 2];
            file.read_exact(&mut l)?;
            (u16::from_le_bytes(l) as u64, 10)
        }
        2 | 3 => {
            let mut l = [0u8; 4];
            file.read_exact(&mut l)?;
            (u32::from_le_bytes(l) as u64, 12)
        }
        v => return Err(corrupt(&path, format!(".npy version {v} is unknown"))),
    };
    if len > 1 << 20 {
        return Err(corrupt(&path, ".npy header too large"));
    }
    let dict = file.read_vec(len, ".npy header")?;
    let dict = std::str::from_utf8(&dict).map_err(|_| corrupt(&path, ".npy header is not text"))?;
    let value = |key: &str| -> Result<&str> {
        let from = dict.find(&format!("'{key}':")).ok_or_else(|| corrupt(&path, format!(".npy header lacks '{key}'")))?;
        Ok(dict[from + key.len() + 3..].trim_start())
    };
    let descr = value("descr")?;
    let elem = if descr.starts_with("'<f4'") {
        Elem::F32
    } else if descr.starts_with("'<f2'") {
        Elem::F16
    } else {
        return Err(corrupt(&path, "the .npy array is not little-endian float32 or float16"));
    };
    if !value("fortran_order")?.starts_with("False") {
        return Err(corrupt(&path, "the .npy array is in Fortran order; expected rows"));
    }
    let shape = value("shape")?;
    let inner = shape.strip_prefix('(').and_then(|s| s.split_once(')')).map(|(s, _)| s).ok_or_else(|| corrupt(&path, "bad .npy shape"))?;
    let dims: Vec<u64> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>().map_err(|_| corrupt(&path, "bad .npy shape")))
        .collect::<Result<_>>()?;
    let [classes, dim] = dims[..] else {
        return Err(corrupt(&path, format!(".npy array has shape {dims:?}; expected (C, d)")));
    };
    check_shape(&path, classes, dim)?;
    Ok((classes, dim as usize, elem, Layout { offset: at + len, skip: 0, ends: true }))
}

fn faiss_layout(file: &mut RegularFile) -> Result<(u64, usize, Elem, Layout)> {
    let path = file.path().to_path_buf();
    // fourcc, d, ntotal, two unused i64, is_trained, metric_type, vector length in floats.
    let mut h = [0u8; 4 + 4 + 8 + 16 + 1 + 4 + 8];
    file.read_exact(&mut h)?;
    let dim = i32::from_le_bytes(h[4..8].try_into().unwrap());
    let total = i64::from_le_bytes(h[8..16].try_into().unwrap());
    let metric = i32::from_le_bytes(h[33..37].try_into().unwrap());
    let floats = u64::from_le_bytes(h[37..45].try_into().unwrap());
    if dim <= 0 || total <= 0 {
        return Err(corrupt(&path, format!("FAISS index of {total} vectors of dimension {dim}")));
    }
    if metric != crate::export::FAISS_METRIC_INNER_PRODUCT {
        return Err(corrupt(&path, format!("FAISS metric {metric}; expected inner product")));
    }
    check_shape(&path, total as u64, dim as u64)?;
    if Some(floats) != (total as u64).checked_mul(dim as u64) {
        return Err(corrupt(&path, "FAISS vector length does not match ntotal × d"));
    }
    Ok((total as u64, dim as usize, Elem::F32, Layout { offset: h.len() as u64, skip: 0, ends: true }))
}

fn fvecs_layout(file: &mut RegularFile) -> Result<(u64, usize, Elem, Layout)> {
    let path = file.path().to_path_buf();
    let mut d = [0u8; 4];
    file.read_exact(&mut d)?;
    let dim = i32::from_le_bytes(d);
    if dim <= 0 || dim as usize > MAX_EMBEDDING_DIM {
        return Err(corrupt(&path, "not a safetensors, .npy, .fvecs or FAISS file of centers"));
    }
    let record = 4 + 4 * dim as u64;
    if !file.size().is_multiple_of(record) {
        return Err(corrupt(&path, format!(".fvecs of dimension {dim} cannot hold {} bytes", file.size())));
    }
    let classes = file.size() / record;
    check_shape(&path, classes, dim as u64)?;
    Ok((classes, dim as usize, Elem::F32, Layout { offset: 0, skip: 4, ends: true }))
}

/// Reads the rows `layout` describes, in bounded chunks, into fallibly allocated f32 rows.
fn read_rows(file: &mut RegularFile, classes: u64, dim: usize, elem: Elem, layout: Layout) -> Result<Vec<f32>> {
    if layout.ends {
        check_length(file, classes, dim, elem, layout)?;
    }
    let values = (classes as usize).checked_mul(dim).ok_or_else(|| Error::new(Status::OutOfMemory, "index too large"))?;
    let mut centers = try_zeroed::<f32>(values, "index centers")?;
    let record = layout.skip as usize + dim * elem.bytes();
    let per_chunk = crate::checkpoint::chunk_rows(record);
    let mut buf = try_zeroed::<u8>(per_chunk.min(classes as usize) * record, "index chunk")?;
    file.seek(layout.offset)?;
    let mut row = 0usize;
    while row < classes as usize {
        let n = per_chunk.min(classes as usize - row);
        let chunk = &mut buf[..n * record];
        file.read_exact(chunk)?;
        for (r, rec) in chunk.chunks_exact(record).enumerate() {
            if layout.skip != 0 && rec[..4] != (dim as i32).to_le_bytes() {
                return Err(corrupt(file.path(), format!("vector {} has another dimension", row + r)));
            }
            let dst = &mut centers[(row + r) * dim..(row + r + 1) * dim];
            let data = &rec[layout.skip as usize..];
            match elem {
                Elem::F32 => dst.iter_mut().zip(data.chunks_exact(4)).for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                Elem::F16 => dst.iter_mut().zip(data.chunks_exact(2)).for_each(|(o, b)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                Elem::BF16 => dst.iter_mut().zip(data.chunks_exact(2)).for_each(|(o, b)| *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            }
            if let Some(at) = dst.iter().position(|v| !v.is_finite()) {
                return Err(corrupt(file.path(), format!("center of class {} holds NaN or Inf (value {at})", row + r)));
            }
        }
        row += n;
    }
    Ok(centers)
}
