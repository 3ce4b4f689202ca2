//! Exporting all centers as one file for search: safetensors (`centers` [C, d]), `.npy`, `.fvecs` or
//! a FAISS `IndexFlatIP` (ids = class ids), f32 or f16, optionally L2-normalized. Rows are streamed
//! in bounded chunks, never gathered whole, and the file appears atomically (written beside, synced,
//! renamed). An f16 export refuses centers that f16 cannot hold rather than writing infinities.

use crate::checkpoint::safetensors_header;
use crate::config::DType;
use crate::engine::Head;
use crate::error::{try_zeroed, Error, Result, Status};
use crate::fsutil::AtomicFile;
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
            let name = if dtype == DType::F16 { "F16" } else { "F32" };
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

/// Writes every center of `head` to `path`.
pub fn export_centers(head: &Head, path: &Path, format: Format, dtype: DType, normalized: bool) -> Result<()> {
    if dtype == DType::BF16 {
        return Err(Error::invalid("export dtype must be f32 or f16 (numpy and FAISS have no bfloat16)"));
    }
    if matches!(format, Format::Fvecs | Format::Faiss) && dtype != DType::F32 {
        return Err(Error::invalid(".fvecs and FAISS indexes hold f32 vectors; export f16 as safetensors or .npy"));
    }
    let (first, count) = head.local_classes();
    let classes = head.config().num_classes;
    if first != 0 || count != classes {
        return Err(Error::new(
            Status::Unavailable,
            "this process owns only part of the classes; multi-process export needs the distributed backend",
        ));
    }
    let d = head.config().embedding_dim;
    let chunk_rows = crate::checkpoint::chunk_rows(d * 4) as u64;
    let mut rows = try_zeroed::<f32>(chunk_rows.min(classes) as usize * d, "export chunk")?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(rows.len() * 4 + chunk_rows as usize * 4)
        .map_err(|_| Error::new(Status::OutOfMemory, "cannot allocate an export chunk"))?;
    let mut file = AtomicFile::create(path)?;
    file.write_all(&header(format, dtype, classes, d))?;
    let mut at = 0;
    while at < classes {
        let n = chunk_rows.min(classes - at);
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
        for row in chunk.chunks_exact(d) {
            if format == Format::Fvecs {
                bytes.extend_from_slice(&(d as i32).to_le_bytes());
            }
            match dtype {
                DType::F16 => row.iter().for_each(|v| bytes.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
                _ => row.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes())),
            }
        }
        file.write_all(&bytes)?;
        at += n;
    }
    file.commit()
}
