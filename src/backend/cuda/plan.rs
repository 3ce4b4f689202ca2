//! Launch geometry and buffer plans of the CUDA step, as pure functions so that the host tests
//! them: the class chunks of the forward pass, the statistics kernels' grids.

use std::ops::Range;

/// Threads per block of the element-wise and per-row kernels.
pub(crate) const THREADS: u32 = 256;
/// Columns of the cosine matrix each `row_stats` block reduces.
pub(crate) const STATS_COLUMNS: usize = 512;
/// CUDA's limit on a grid's y (and z) dimension.
pub(crate) const MAX_GRID_Y: usize = 65_535;
/// Threads per row of `combine_row_stats` (one warp).
pub(crate) const COMBINE_LANES: usize = 32;
/// What one evaluation chunk's cosines and GEMM centers may take on a large GPU.
pub(crate) const EVAL_CHUNK_BYTES: usize = 1 << 30;

/// What one evaluation chunk may take on a GPU of `total` bytes: [`EVAL_CHUNK_BYTES`], or a
/// sixteenth of the device on a smaller one, so that evaluating leaves room for the training state.
pub(crate) fn eval_chunk_bytes(total: u64) -> usize {
    EVAL_CHUNK_BYTES.min((total / 16) as usize)
}

/// The class chunks of one forward pass over `k` sampled columns and `n` rows: consecutive column
/// ranges covering `0..k`. Every chunk fits one statistics launch (at most `MAX_GRID_Y` groups of
/// `STATS_COLUMNS`). With `keep` (training: the backward pass reads every cosine) the cosines are
/// one buffer and the chunks only split the launches; without it (evaluation) each chunk's
/// cosines (`4 n` bytes a column) and GEMM centers (`center_bytes` a column) also fit `budget`,
/// and the buffers are reused from chunk to chunk.
pub(crate) fn class_chunks(k: usize, n: usize, center_bytes: usize, keep: bool, budget: usize) -> Vec<Range<usize>> {
    let mut width = MAX_GRID_Y * STATS_COLUMNS;
    if !keep {
        let per_column = (4 * n + center_bytes).max(1);
        let fits = (budget / per_column) / STATS_COLUMNS * STATS_COLUMNS;
        width = width.min(fits.max(STATS_COLUMNS));
    }
    let mut chunks = Vec::with_capacity(k.div_ceil(width).max(1));
    let mut at = 0;
    while at < k {
        chunks.push(at..(at + width).min(k));
        at += width;
    }
    if chunks.is_empty() {
        chunks.push(0..0);
    }
    chunks
}

/// Grid of `row_stats` over `n` rows and `cols` columns: x over rows, y over column groups.
pub(crate) fn stats_grid(n: usize, cols: usize) -> (u32, u32, u32) {
    let groups = cols.div_ceil(STATS_COLUMNS).max(1);
    assert!(groups <= MAX_GRID_Y, "a class chunk of {cols} columns exceeds one statistics launch");
    (n.div_ceil(THREADS as usize).max(1) as u32, groups as u32, 1)
}

/// Grid of `combine_row_stats`: one warp per row.
pub(crate) fn combine_grid(n: usize) -> (u32, u32, u32) {
    ((n * COMBINE_LANES).div_ceil(THREADS as usize).max(1) as u32, 1, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_class_once_and_fit_one_statistics_launch() {
        for &(k, n, keep) in &[(0usize, 8usize, false), (1, 1, true), (511, 7, false), (20_011, 96, true), (10_000_000, 1024, false), (40_000_000, 1024, true), (40_000_000, 1, false)] {
            let chunks = class_chunks(k, n, 1024, keep, EVAL_CHUNK_BYTES);
            assert_eq!(chunks.first().unwrap().start, 0);
            assert_eq!(chunks.last().unwrap().end, k);
            for w in chunks.windows(2) {
                assert_eq!(w[0].end, w[1].start, "k {k}: chunks not contiguous");
            }
            for c in &chunks {
                let (_, y, _) = stats_grid(n, c.len());
                assert!(y as usize <= MAX_GRID_Y, "k {k}: grid height {y}");
            }
        }
    }

    #[test]
    fn the_statistics_grid_stays_under_65535_above_33_5m_classes() {
        // One shard of 40M classes trained at r = 1: one cosine buffer, two launches.
        let chunks = class_chunks(40_000_000, 1024, 1024, true, EVAL_CHUNK_BYTES);
        assert_eq!(chunks.len(), 2);
        assert_eq!(stats_grid(1024, chunks[0].len()), (4, 65_535, 1));
        assert!(stats_grid(1024, chunks[1].len()).1 <= 65_535);
    }

    #[test]
    fn evaluation_chunks_are_bounded_by_the_budget() {
        // 10M classes, N = 1024, bf16 centers at d = 512: all at once would be 51 GB.
        let (n, center_bytes) = (1024usize, 1024usize);
        let chunks = class_chunks(10_000_000, n, center_bytes, false, EVAL_CHUNK_BYTES);
        for c in &chunks {
            assert!(c.len() * (4 * n + center_bytes) <= EVAL_CHUNK_BYTES, "{} columns", c.len());
            assert!(c.len() >= STATS_COLUMNS);
        }
        assert!(chunks.len() > 40, "{} chunks", chunks.len());
        // A budget below one statistics group still makes progress.
        assert_eq!(class_chunks(2000, n, center_bytes, false, 1)[0], 0..STATS_COLUMNS);
        // A 16 GB GPU gets the full budget, a 4 GB one a sixteenth of it.
        assert_eq!(eval_chunk_bytes(16 << 30), EVAL_CHUNK_BYTES);
        assert_eq!(eval_chunk_bytes(4 << 30), 256 << 20);
        // Training keeps one buffer: chunks only where the grid demands.
        assert_eq!(class_chunks(1_000_000, n, center_bytes, true, EVAL_CHUNK_BYTES), vec![0..1_000_000]);
    }

    #[test]
    fn one_warp_per_row_in_combine() {
        assert_eq!(combine_grid(1024), (128, 1, 1));
        assert_eq!(combine_grid(1), (1, 1, 1));
        assert_eq!(combine_grid(9), (2, 1, 1));
    }
}
