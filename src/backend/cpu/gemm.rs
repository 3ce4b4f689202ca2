//! The one place the CPU backend multiplies matrices. Each call is single-threaded: parallelism
//! comes from running blocks of sampled classes on different threads, which keeps each block's
//! operands in that core's cache between the GEMM and the element-wise work around it.

/// A row-major-or-strided matrix operand: element (r, c) is at `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Operand { data, row_stride: cols, col_stride: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Operand { data, row_stride: 1, col_stride: cols }
    }
    fn spans(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst[m×n] (row-major) = a[m×k]·b[k×n]`, or `+=` when `accumulate`.
pub fn matmul(m: usize, n: usize, k: usize, dst: &mut [f32], a: Operand<'_>, b: Operand<'_>, accumulate: bool) {
    assert!(dst.len() >= m * n && a.spans(m, k) && b.spans(k, n), "matmul operands out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assert above keeps every addressed element inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product_with_transposes() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 - 1.0).collect(); // n×k
        let mut dst = vec![1.0f32; m * n];
        matmul(m, n, k, &mut dst, Operand::rows(&a, k), Operand::transposed(&bt, k), true);
        for r in 0..m {
            for c in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| a[r * k + p] * bt[c * k + p]).sum::<f32>();
                assert!((dst[r * n + c] - want).abs() < 1e-5);
            }
        }
    }
}
