//! Exporting all centers as one file for search: safetensors (`centers` [C, d]), `.npy` or `.fvecs`,
//! f32 or f16, optionally L2-normalized. Rows are streamed in chunks, never gathered whole, and the
//! file appears atomically (written beside, synced, renamed).

use crate::checkpoint::safetensors_header;
use crate::config::DType;
use crate::engine::Head;
use crate::error::{Error, Result, Status};
use crate::fsutil::AtomicFile;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    Npy,
    Fvecs,
}

/// Rows converted and written per chunk.
const CHUNK_ROWS: u64 = 4096;

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
    }
}

/// Writes every center of `head` to `path`.
pub fn export_centers(head: &Head, path: &Path, format: Format, dtype: DType, normalized: bool) -> Result<()> {
    if dtype == DType::BF16 {
        return Err(Error::invalid("export dtype must be f32 or f16 (numpy and FAISS have no bfloat16)"));
    }
    if format == Format::Fvecs && dtype != DType::F32 {
        return Err(Error::invalid(".fvecs holds f32 vectors; export f16 as safetensors or .npy"));
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
    let mut file = AtomicFile::create(path)?;
    file.write_all(&header(format, dtype, classes, d))?;
    let mut rows = vec![0f32; CHUNK_ROWS as usize * d];
    let mut bytes = Vec::with_capacity(CHUNK_ROWS as usize * (d * 4 + 4));
    let mut at = 0;
    while at < classes {
        let n = CHUNK_ROWS.min(classes - at);
        let chunk = &mut rows[..n as usize * d];
        head.get_centers(at, n, normalized, chunk)?;
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
