//! Scoring all centers of a shard against a batch of queries: blocked GEMM, then each block's
//! scores offered to bounded heaps, blocks spread over the pool.
//!
//! The GEMM only *selects*. Its rounding depends on where a row sits (block width, edge tiles) and on
//! how many queries share the call, so two identical centers can come out one ulp apart. Every score
//! that reaches a heap is therefore recomputed by [`exact_score`], a function of the query row and
//! the center row alone: duplicate centers tie exactly (and list by ascending id), and a query gives
//! the same answer alone or in a batch, on any shard layout. A class is skipped only when its GEMM
//! score is below the heap's bar by more than the two computations can differ, so the selection is
//! exactly the top k under `exact_score`.

use super::gemm::{matmul, Operand};
use super::kernels;
use crate::error::Result;
use crate::topk::TopK;
use rayon::prelude::*;

/// Centers per block: their scores for a chunk of queries stay in cache while the heaps read them.
const CENTER_BLOCK: usize = 1024;
/// Queries per GEMM.
const QUERY_CHUNK: usize = 256;

/// A bound on |GEMM cosine − `exact_score`| for unit queries: both are sums of `d` products, each
/// within `(d − 1)·u·Σ|qᵢcᵢ| ≤ (d − 1)·u·‖c‖` of the true dot product whatever the summation order
/// (u = 2⁻²⁴), then scaled by 1/‖c‖ with one more rounding each. Doubled for safety. The CUDA
/// backend's search selects with cuBLAS's products by the same margin.
pub(crate) fn selection_margin(d: usize) -> f32 {
    (2 * d + 16) as f32 * f32::EPSILON
}

/// The cosine of unit query `q` and center `c` whose 1/‖c‖ is `inv` (from `row_inv_norms`, which
/// depends on the row alone). A center whose squared norm overflows f32 (`inv` = 0) is scored in
/// float64. Zero is always +0, so that ±0 tie. kernels/topk.cu `exact_score` is the same
/// arithmetic on the GPU: the two backends' searches agree bit for bit.
#[inline]
fn exact_score(q: &[f32], c: &[f32], inv: f32) -> f32 {
    let s = if inv > 0.0 {
        kernels::dot(q, c) * inv
    } else {
        (kernels::dot_f64(q, c) / kernels::dot_f64(c, c).sqrt().max(1e-12)) as f32
    };
    s + 0.0
}

/// The best `k` of `centers` (rows of `d`, class ids from `first_class`) for each unit-norm query,
/// on the library's pool.
pub fn scan(centers: &[f32], d: usize, first_class: u64, queries: &[f32], k: usize) -> Result<TopK> {
    let n = queries.len() / d;
    let rows = centers.len() / d;
    let blocks = rows.div_ceil(CENTER_BLOCK);
    let margin = selection_margin(d);
    crate::pool::install(|| (0..blocks)
        .into_par_iter()
        .with_min_len(crate::pool::min_blocks_per_task(blocks))
        .fold(
            || (TopK::new(n, k), Vec::new(), Vec::new(), Vec::new(), Vec::new()),
            |(mut best, mut scores, mut inv, mut ids, mut huge), b| {
                let (start, end) = (b * CENTER_BLOCK, ((b + 1) * CENTER_BLOCK).min(rows));
                let width = end - start;
                let block = &centers[start * d..end * d];
                ids.clear();
                ids.extend(0..width as u32);
                inv.resize(width, 0.0);
                kernels::row_inv_norms(block, d, &ids, &mut inv);
                // Rows whose squared norm overflows: their GEMM scores mean nothing, so they are
                // always scored exactly (there are normally none).
                huge.clear();
                huge.extend(inv.iter().enumerate().filter(|(_, &r)| r == 0.0).map(|(j, _)| j));
                for q0 in (0..n).step_by(QUERY_CHUNK) {
                    let qn = QUERY_CHUNK.min(n - q0);
                    scores.resize(qn * width, 0.0);
                    let chunk = &queries[q0 * d..(q0 + qn) * d];
                    matmul(qn, width, d, &mut scores, Operand::rows(chunk, d), Operand::transposed(block, d), false);
                    for (qi, row) in scores.chunks_exact(width).enumerate() {
                        let q = q0 + qi;
                        let query = &chunk[qi * d..(qi + 1) * d];
                        let offer = |best: &mut TopK, j: usize| {
                            let exact = exact_score(query, &block[j * d..(j + 1) * d], inv[j]);
                            best.push(q, exact, first_class + (start + j) as u64);
                        };
                        for &j in huge.iter() {
                            offer(&mut best, j);
                        }
                        let mut bar = best.threshold(q) - margin;
                        // Sixteen columns at a time, a branch-free test first: almost every group
                        // holds nothing above the bar once the heap is full.
                        for (g, (ss, rs)) in row.chunks(16).zip(inv.chunks(16)).enumerate() {
                            if !ss.iter().zip(rs).fold(false, |any, (&s, &r)| any | (s * r >= bar)) {
                                continue;
                            }
                            for (i, (&s, &r)) in ss.iter().zip(rs).enumerate() {
                                // NaN or ±∞ products come only from the overflowing rows handled above.
                                if s * r >= bar && r > 0.0 {
                                    offer(&mut best, g * 16 + i);
                                    bar = best.threshold(q) - margin;
                                }
                            }
                        }
                    }
                }
                (best, scores, inv, ids, huge)
            },
        )
        .map(|(best, ..)| best)
        .reduce(|| TopK::new(n, k), |mut a, b| {
            a.merge(b);
            a
        }))
}

/// Scales each nonzero row of `src` to unit L2 norm into `dst`, so that scores are cosines (zero
/// rows stay zero). Rows whose norm f32 cannot form — the square overflows (`inv` 0), or the norm
/// is near or under PyTorch's eps 1e-12, where the square may underflow — are normalized in float64.
pub(crate) fn unit_rows(src: &[f32], d: usize, dst: &mut [f32]) {
    let mut inv = vec![0.0; src.len() / d];
    kernels::normalize_rows(src, d, dst, &mut inv);
    for ((row, out), &r) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)).zip(&inv) {
        if r == 0.0 || r > 1e11 {
            let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            if norm == 0.0 {
                continue;
            }
            for (o, &v) in out.iter_mut().zip(row) {
                *o = (v as f64 / norm) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_do_not_depend_on_position_or_batch() {
        // The same center in every position of three blocks, one of them partial.
        let d = 40;
        let c: Vec<f32> = (0..d).map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.0).collect();
        let rows = 2 * CENTER_BLOCK + 37;
        let centers: Vec<f32> = (0..rows).flat_map(|_| c.iter().copied()).collect();
        let mut q: Vec<f32> = (0..3 * d).map(|i| ((i * 104_729) % 89) as f32 / 7.0 - 6.0).collect();
        let mut unit = vec![0.0; q.len()];
        unit_rows(&q, d, &mut unit);
        q.copy_from_slice(&unit);
        let k = 50;
        let all = scan(&centers, d, 10, &q, k).unwrap().into_sorted();
        for (i, hits) in all.iter().enumerate() {
            assert_eq!(hits.len(), k);
            assert!(hits.iter().all(|h| h.0.to_bits() == hits[0].0.to_bits()), "{hits:?}");
            assert_eq!(hits.iter().map(|h| h.1).collect::<Vec<_>>(), (10..10 + k as u64).collect::<Vec<_>>());
            let one = scan(&centers, d, 10, &q[i * d..(i + 1) * d], k).unwrap().into_sorted();
            assert_eq!(&one[0], hits);
        }
    }

    #[test]
    fn rows_with_overflowing_norms_score_their_cosine() {
        let d = 4;
        let centers = [1e30f32, 0.0, 0.0, 0.0, 0.0, 3e38, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0];
        let mut q = [2e30f32, 2e30, 0.0, 0.0];
        let src = q;
        unit_rows(&src, d, &mut q);
        assert!((q[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6 && q[0] == q[1]);
        let hits = scan(&centers, d, 0, &q, 3).unwrap().into_sorted();
        assert_eq!(hits[0].iter().map(|h| h.1).collect::<Vec<_>>(), vec![2, 0, 1]);
        assert!((hits[0][0].0 - 1.0).abs() < 1e-6);
        assert!((hits[0][1].0 - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(hits[0][1].0.to_bits(), hits[0][2].0.to_bits());
    }
}
