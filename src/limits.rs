//! Numeric limits every way into a head shares: the largest row norm that still normalizes in f32.

/// The largest L2 norm a center or embedding row may have: 2^62. Its square, 2^124, leaves f32 16×
/// headroom whatever the summation order, so every backend normalizes such a row; from about
/// 1.8e19 the squared norm overflows f32 and the row would normalize to zero, or to NaN.
pub(crate) const MAX_ROW_NORM: f64 = (1u64 << 62) as f64;

/// The first row of `values` (rows of `d` finite values) whose norm is above [`MAX_ROW_NORM`], and
/// that norm. Rows of any smaller norm, zero included, normalize as PyTorch's (eps 1e-12) would.
/// Every way centers enter a head (set_centers, checkpoints) checks them with this.
pub(crate) fn first_oversized_row(values: &[f32], d: usize) -> Option<(usize, f64)> {
    first_oversized(values.chunks_exact(d).map(|row| row.iter().copied()))
}

/// The first of `rows` whose norm is above [`MAX_ROW_NORM`], and that norm.
pub(crate) fn first_oversized<R: Iterator<Item = f32>>(rows: impl Iterator<Item = R>) -> Option<(usize, f64)> {
    rows.map(row_norm).enumerate().find(|&(_, n)| n > MAX_ROW_NORM)
}

/// Norms in float64: no finite f32 row overflows there.
fn row_norm(row: impl Iterator<Item = f32>) -> f64 {
    row.map(|v| v as f64 * v as f64).sum::<f64>().sqrt()
}
