//! Search on the GPUs (`ShardState::search` of the CUDA backend). Each shard multiplies the queries
//! by its centers a chunk of classes at a time with cuBLAS, and kernels/topk.cu keeps each query's
//! top k on the device, every score recomputed there with the CPU backend's arithmetic: the answer
//! is the CPU's (src/backend/cpu/search.rs) bit for bit. Centers never leave the device; k hits a
//! query come back from each shard, and the shards' lists merge on the host. Centers stored in bf16
//! are widened to f32 a chunk at a time, as the CPU widens them, and searched as f32 ones.

use super::device::device_error;
use super::plan::{class_chunks, THREADS};
use super::stored::StoredRows;
use crate::backend::cpu::selection_margin;
use crate::config::DType;
use crate::error::Result;
use crate::memory::{DeviceBuf, Workspace};
use crate::sharding::ShardRange;
use crate::topk::TopK;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

/// What search uses of one GPU's shard.
pub(super) struct Shard<'a> {
    /// The GPU's workspace: its stream, and the buffers of a search.
    pub work: &'a Arc<Workspace>,
    pub blas: &'a CudaBlas,
    /// The loaded kernels by entry name (kernels/topk.cu's among them).
    pub functions: &'a HashMap<&'static str, CudaFunction>,
    pub centers: &'a StoredRows,
    pub range: ShardRange,
    /// What one chunk's products may take (`plan::eval_chunk_bytes`).
    pub budget: usize,
}

/// The `k` best (cosine, class) pairs of each unit-norm query (rows of `d` values of `queries`)
/// over the shards' centers, best first, ties by smaller class id.
pub(super) fn search(shards: &[Shard<'_>], d: usize, queries: &[f32], k: usize) -> Result<Vec<Vec<(f32, u64)>>> {
    // Every shard's work is queued before any is read back, so that the GPUs search side by side.
    let queued = shards.iter().filter(|s| s.range.len > 0 && k > 0).map(|s| Ok((s, queue(s, d, queries, k)?))).collect::<Result<Vec<_>>>()?;
    let n = queries.len() / d;
    let mut best = TopK::new(n, k);
    for (shard, (hits, kept)) in queued {
        let keys: Vec<u64> = shard.work.stream().clone_dtoh(&hits.view()).map_err(|e| device_error("download of search results", e))?;
        for (q, row) in keys.chunks_exact(kept).enumerate() {
            for &key in row {
                let (score, local) = hit_of(key);
                best.push(q, score, shard.range.start + local as u64);
            }
        }
    }
    Ok(best.into_sorted())
}

/// Queues shard `s`'s search on its stream: returns its hits, `kept` keys a query (k capped at the
/// shard's classes, every one valid once the stream has run), each query's best first.
fn queue(s: &Shard<'_>, d: usize, queries: &[f32], k: usize) -> Result<(DeviceBuf<u64>, usize)> {
    let stream = s.work.stream();
    // cuBLAS works in the calling thread's current context.
    stream.context().bind_to_thread().map_err(|e| device_error("bind", e))?;
    let (n, rows) = (queries.len() / d, s.range.len as usize);
    let kept = k.min(rows);
    let unit = s.work.upload(queries, "search queries")?;
    let mut hits = s.work.take::<u64>(n * kept, "search results")?;
    // A chunk's products (4 bytes a query) and its classes' 1/‖c‖ (4 bytes), and bf16 centers
    // widened (4 bytes a value), within the budget.
    let widened_bytes = if s.centers.is_bf16() { 4 * d } else { 0 };
    let chunks = class_chunks(rows, n, 4 + widened_bytes, false, s.budget);
    let widest = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
    let products = s.work.take::<f32>(n * widest, "search cosines (queries × a chunk of classes)")?;
    let mut inv = s.work.take::<f32>(widest, "search center norms")?;
    let mut source = match s.centers {
        StoredRows::F32(all) => Source::F32(all),
        StoredRows::BF16(all) => Source::Widened(all, s.work.take::<f32>(widest * d, "search centers widened from bf16")?),
    };
    let (d32, k32, margin) = (d as i32, kept as i32, selection_margin(d));
    let mut have = 0usize;
    for chunk in chunks {
        let (count, first) = (chunk.len(), chunk.start as u32);
        let count32 = count as i32;
        let centers = match &mut source {
            Source::F32(all) => all.slice(chunk.start * d..chunk.end * d),
            Source::Widened(all, wide) => {
                let len = (count * d) as u64;
                let stored = all.slice(chunk.start * d..chunk.end * d);
                let mut b = stream.launch_builder(&s.functions["widen_bf16"]);
                b.arg(&stored).arg(&len).arg(&mut *wide);
                let cfg = LaunchConfig { grid_dim: ((count * d).div_ceil(THREADS as usize) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: arguments match kernels/normalize.cu `widen_bf16`; `wide` holds widest × d values.
                unsafe { b.launch(cfg) }.map_err(|e| device_error("widen_bf16", e))?;
                wide.slice(0..count * d)
            }
        };
        let mut b = stream.launch_builder(&s.functions["center_inv_norms"]);
        b.arg(&centers).arg(&count32).arg(&d32).arg(&mut inv);
        let cfg = LaunchConfig { grid_dim: (count.div_ceil(THREADS as usize) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match kernels/topk.cu `center_inv_norms`; `inv` holds `count` values.
        unsafe { b.launch(cfg) }.map_err(|e| device_error("center_inv_norms", e))?;
        {
            let (a, _a) = centers.device_ptr(stream);
            let (q, c) = (unit.ptr(), products.ptr());
            // products [n][count] = Q·Cᵀ; column-major: (count×n) = C(d×count)ᵀ·Q(d×n).
            // SAFETY: the pointers come from live allocations of at least the sizes the shapes address.
            unsafe { super::blas::gemm(s.blas, true, false, count, n, d, a, d, q, d, c, count, DType::F32, "cuBLAS GEMM of search")? };
        }
        let have32 = have as i32;
        let mut b = stream.launch_builder(&s.functions["topk_chunk"]);
        b.arg(&products).arg(&count32).arg(&inv).arg(&centers).arg(&d32).arg(&unit).arg(&first).arg(&k32).arg(&have32).arg(&margin).arg(&mut hits);
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match kernels/topk.cu `topk_chunk`; `hits` holds n × kept keys, of which
        // the first `have` a query are valid.
        unsafe { b.launch(cfg) }.map_err(|e| device_error("topk_chunk", e))?;
        have = (have + count).min(kept);
    }
    Ok((hits, kept))
}

/// Where a chunk's f32 centers come from: the stored ones, or bf16 ones widened into a buffer.
enum Source<'a> {
    F32(&'a CudaSlice<f32>),
    Widened(&'a CudaSlice<u16>, DeviceBuf<f32>),
}

/// The score and local row of a hit of kernels/topk.cu `hit_key`: the score's bits in total order
/// above, the row's complement below.
fn hit_of(key: u64) -> (f32, u32) {
    let ordered = (key >> 32) as u32;
    let bits = if ordered & 0x8000_0000 != 0 { ordered & 0x7FFF_FFFF } else { !ordered };
    (f32::from_bits(bits), !(key as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kernels/topk.cu `hit_key`.
    fn key_of(score: f32, row: u32) -> u64 {
        let bits = score.to_bits();
        let ordered = if bits & 0x8000_0000 != 0 { !bits } else { bits | 0x8000_0000 };
        (ordered as u64) << 32 | !row as u64
    }

    #[test]
    fn keys_order_hits_as_topk_does_and_read_back() {
        let scores = [f32::NEG_INFINITY, -1.0, -f32::MIN_POSITIVE, -1e-45, 0.0, 1e-45, 0.5, 1.0, f32::INFINITY, f32::NAN];
        let hits: Vec<(f32, u32)> = scores.iter().flat_map(|&s| [(s, 0), (s, 7), (s, u32::MAX - 1)]).collect();
        for &a in &hits {
            assert_eq!(hit_of(key_of(a.0, a.1)).0.to_bits(), a.0.to_bits());
            assert_eq!(hit_of(key_of(a.0, a.1)).1, a.1);
            for &b in &hits {
                let topk = a.0.total_cmp(&b.0).then(b.1.cmp(&a.1));
                assert_eq!(key_of(a.0, a.1).cmp(&key_of(b.0, b.1)), topk, "{a:?} vs {b:?}");
            }
        }
    }
}
