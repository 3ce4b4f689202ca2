//! Exporting all centers as one file for search: safetensors (`centers` [C, d]), `.npy`, `.fvecs` or
//! a FAISS `IndexFlatIP` (ids = class ids), f32 or f16 (and bf16 as safetensors, the one of these
//! formats with a bfloat16 type), optionally L2-normalized. Values are rounded to nearest into the
//! narrower types; a bf16 head's centers exported as bf16 are its stored bits exactly. Rows are
//! streamed in bounded chunks, never gathered whole, and the file appears atomically (written
//! beside, synced, renamed). An f16 export refuses centers that f16 cannot hold rather than writing
//! infinities.

use crate::checkpoint::safetensors_header;
use crate::config::DType;
use crate::head::Head;
use crate::error::{try_zeroed, Error, Result, Status};
use crate::fsutil::{AtomicFile, PositionalFile};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    Npy,
    Fvecs,
    /// FAISS's `write_index` layout of an `IndexFlatIP`: fourcc `IxFI`, the index header, then the
    /// vectors as one float vector (its length counted in floats).
    Faiss,
}

/// Largest finite f16.
const F16_MAX: f32 = 65504.0;

fn header(format: Format, dtype: DType, classes: u64, dim: usize) -> Vec<u8> {
    let elem = dtype.size() as u64;
    match format {
        Format::Safetensors => {
            let name = match dtype {
                DType::F32 => "F32",
                DType::F16 => "F16",
                DType::BF16 => "BF16",
            };
            let meta = serde_json::json!({"format": "pt", "producer": format!("partialfc {}", env!("CARGO_PKG_VERSION"))});
            safetensors_header(&[("centers", name, vec![classes, dim as u64], classes * dim as u64 * elem)], &meta)
        }
        Format::Npy => {
            let descr = if dtype == DType::F16 { "<f2" } else { "<f4" };
            let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({classes}, {dim}), }}");
            // NPY 1.0: magic + version + u16 length + dict padded with spaces and a newline to 64 bytes.
            while (10 + dict.len() + 1) % 64 != 0 {
                dict.push(' ');
            }
            dict.push('\n');
            let mut out = b"\x93NUMPY\x01\x00".to_vec();
            out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
            out.extend_from_slice(dict.as_bytes());
            out
        }
        Format::Fvecs => Vec::new(),
        Format::Faiss => {
            let mut out = b"IxFI".to_vec();
            out.extend_from_slice(&(dim as i32).to_le_bytes());
            out.extend_from_slice(&(classes as i64).to_le_bytes());
            // Two fields FAISS no longer uses, written as it writes them.
            out.extend_from_slice(&(1i64 << 20).to_le_bytes());
            out.extend_from_slice(&(1i64 << 20).to_le_bytes());
            out.push(1); // is_trained
            out.extend_from_slice(&FAISS_METRIC_INNER_PRODUCT.to_le_bytes());
            out.extend_from_slice(&(classes * dim as u64).to_le_bytes());
            out
        }
    }
}

/// FAISS's `METRIC_INNER_PRODUCT`.
pub(crate) const FAISS_METRIC_INNER_PRODUCT: i32 = 0;

/// Bytes of one center in the file: its values, after fvecs' dimension field.
fn row_bytes(format: Format, dtype: DType, dim: usize) -> usize {
    dim * dtype.size() + if format == Format::Fvecs { 4 } else { 0 }
}

fn check_arguments(format: Format, dtype: DType) -> Result<()> {
    if format == Format::Npy && dtype == DType::BF16 {
        return Err(Error::invalid(".npy holds f32 or f16 (numpy has no bfloat16); export bf16 as safetensors"));
    }
    if matches!(format, Format::Fvecs | Format::Faiss) && dtype != DType::F32 {
        return Err(Error::invalid(".fvecs and FAISS indexes hold f32 vectors; export f16 as safetensors or .npy"));
    }
    Ok(())
}

/// Writes every center of `head` to `path`. Collective on a multi-process head: process 0 creates
/// the file (header, full length) beside its destination, every process writes its own classes'
/// rows at their offset and syncs them, and process 0 publishes the file once all have; any
/// process's failure fails the export everywhere and leaves no file.
pub fn export_centers(head: &Head, path: &Path, format: Format, dtype: DType, normalized: bool) -> Result<()> {
    let group = head.group();
    group.agree(check_arguments(format, dtype))?;
    let classes = head.config().num_classes;
    let d = head.config().embedding_dim;
    let header = header(format, dtype, classes, d);
    let row = row_bytes(format, dtype, d) as u64;
    // Process 0's file; its temporary name is everyone's.
    let mut file = None;
    let created = if group.index() == 0 {
        AtomicFile::create(path).and_then(|mut f| {
            f.write_all(&header)?;
            f.set_len(header.len() as u64 + classes * row)?;
            let temp = f.temp().as_os_str().as_bytes().to_vec();
            file = Some(f);
            Ok(temp)
        })
    } else {
        Ok(Vec::new())
    };
    let created = group.agree(created)?;
    let temp = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&group.allgather_varied(&created)?[0]));
    let written = write_rows(head, &temp, header.len() as u64, format, dtype, normalized);
    group.agree(written)?;
    group.agree(file.map_or(Ok(()), AtomicFile::commit))
}

/// This process's classes' rows, written into `temp` after its `header_len`-byte header.
fn write_rows(head: &Head, temp: &Path, header_len: u64, format: Format, dtype: DType, normalized: bool) -> Result<()> {
    let d = head.config().embedding_dim;
    let (first, count) = head.local_classes();
    let row = row_bytes(format, dtype, d);
    let chunk_rows = crate::checkpoint::chunk_rows(row) as u64;
    let mut rows = try_zeroed::<f32>(chunk_rows.min(count) as usize * d, "export chunk")?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(chunk_rows.min(count) as usize * row)
        .map_err(|_| Error::new(Status::OutOfMemory, "cannot allocate an export chunk"))?;
    let mut out = PositionalFile::open(temp)?;
    let mut at = first;
    while at < first + count {
        let n = chunk_rows.min(first + count - at);
        let chunk = &mut rows[..n as usize * d];
        head.get_centers(at, n, normalized, chunk)?;
        if dtype == DType::F16 {
            if let Some(i) = chunk.iter().position(|v| v.abs() > F16_MAX) {
                return Err(Error::invalid(format!(
                    "center of class {} holds {} (value {}), beyond f16's range (±{F16_MAX}): export normalized or as f32",
                    at + (i / d) as u64,
                    chunk[i],
                    i % d
                )));
            }
        }
        bytes.clear();
        for values in chunk.chunks_exact(d) {
            if format == Format::Fvecs {
                bytes.extend_from_slice(&(d as i32).to_le_bytes());
            }
            match dtype {
                DType::F16 => values.iter().for_each(|v| bytes.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
                DType::BF16 => values.iter().for_each(|v| bytes.extend_from_slice(&crate::storage::bf16_nearest(*v).to_le_bytes())),
                DType::F32 => values.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes())),
            }
        }
        out.write_at(header_len + at * row as u64, &bytes)?;
        at += n;
    }
    out.sync()
}
