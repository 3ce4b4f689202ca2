//! Scoring all centers of a shard against a batch of queries: blocked GEMM, then each block's
//! scores offered to bounded heaps, blocks spread over the pool.

use super::gemm::{matmul, Operand};
use super::kernels;
use crate::search::TopK;
use rayon::prelude::*;

/// Centers per block: their scores for a chunk of queries stay in cache while the heaps read them.
const CENTER_BLOCK: usize = 1024;
/// Queries per GEMM.
const QUERY_CHUNK: usize = 256;

/// The best `k` of `centers` (rows of `d`, class ids from `first_class`) for each unit-norm query.
pub fn scan(centers: &[f32], d: usize, first_class: u64, queries: &[f32], k: usize) -> TopK {
    let n = queries.len() / d;
    let rows = centers.len() / d;
    let blocks = rows.div_ceil(CENTER_BLOCK);
    let tasks = blocks.div_ceil(4 * rayon::current_num_threads()).max(1);
    (0..blocks)
        .into_par_iter()
        .with_min_len(tasks)
        .fold(
            || (TopK::new(n, k), Vec::new(), Vec::new(), Vec::new()),
            |(mut best, mut scores, mut inv, mut ids), b| {
                let (start, end) = (b * CENTER_BLOCK, ((b + 1) * CENTER_BLOCK).min(rows));
                let width = end - start;
                let block = &centers[start * d..end * d];
                ids.clear();
                ids.extend(0..width as u32);
                inv.resize(width, 0.0);
                kernels::row_inv_norms(block, d, &ids, &mut inv);
                for q0 in (0..n).step_by(QUERY_CHUNK) {
                    let qn = QUERY_CHUNK.min(n - q0);
                    scores.resize(qn * width, 0.0);
                    let chunk = &queries[q0 * d..(q0 + qn) * d];
                    matmul(qn, width, d, &mut scores, Operand::rows(chunk, d), Operand::transposed(block, d), false);
                    for (qi, row) in scores.chunks_exact(width).enumerate() {
                        let q = q0 + qi;
                        let mut bar = best.threshold(q);
                        for (j, (&s, &r)) in row.iter().zip(&inv).enumerate() {
                            let score = s * r;
                            if score >= bar {
                                best.push(q, score, first_class + (start + j) as u64);
                                bar = best.threshold(q);
                            }
                        }
                    }
                }
                (best, scores, inv, ids)
            },
        )
        .map(|(best, ..)| best)
        .reduce(|| TopK::new(n, k), |mut a, b| {
            a.merge(b);
            a
        })
}
