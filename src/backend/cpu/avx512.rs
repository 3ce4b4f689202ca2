//! f32 GEMM kernels on AVX-512 for the step's block products. Stable Rust's `gemm` crate runs
//! AVX2 micro-kernels and packs both operands on every call; a step's block products have one
//! operand whose rows are already contiguous and in cache (a batch operand laid out once per
//! step, or the block's own centers), so these kernels read it in place and broadcast the other
//! operand's elements straight from its strided storage: no packing at all.

use std::arch::x86_64::*;

/// Rows of C per micro-tile (each an accumulator pair): 24 of the 32 vector registers.
const MR: usize = 12;
/// Columns of C per micro-tile: two vectors.
const NR: usize = 32;

/// Whether this CPU runs these kernels.
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

/// `c[m×n] (row stride ldc) = a[m×k]·b[k×n]`, or `+=` when `accumulate`; element (r, p) of `a`
/// is at `a[r·rs_a + p·cs_a]`, row p of `b` is the `n` contiguous values at `b[p·rs_b]`. Each
/// output is one f32 fused multiply-add chain over p in order, then added to `c` when
/// accumulating.
///
/// # Safety
/// The CPU must have AVX-512F ([`available`]); every addressed element of `a`, `b` and `c` must
/// be in bounds, and `c` must not overlap the operands.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(m: usize, n: usize, k: usize, a: *const f32, rs_a: usize, cs_a: usize, b: *const f32, rs_b: usize, c: *mut f32, ldc: usize, accumulate: bool) {
    let mut i = 0;
    while i + MR <= m {
        strips::<MR>(n, k, a.add(i * rs_a), rs_a, cs_a, b, rs_b, c.add(i * ldc), ldc, accumulate);
        i += MR;
    }
    let (a, c) = (a.add(i * rs_a), c.add(i * ldc));
    match m - i {
        0 => {}
        1 => strips::<1>(n, k, a, rs_a, cs_a, b, rs_b, c, ldc, accumulate),
        2 => strips::<2>(n, k, a, rs_a, cs_a, b, rs_b, c, ldc, accumulate),
        3 => strips::<3>(n, k, a, rs_a, cs_a, b, rs_b, c, ldc, accumulate),
        4 => strips::<4>(n, k, a, rs_a, cs_a, b, rs_b, c, ldc, accumulate),
        5 => strips::<5>(n, k, a, rs_a, cs_a, b, rs_b, c, ldc, accumulate),
        6 => strips::<6>(n, k, a, rs_a, cs_a, b, rs_b, c, ldc, accumulate),
        7 => strips::<7>(n, k, a, rs_a, cs_a, b, rs_b, c, ldc, accumulate),
        8 => strips::<8>(n, k, a, rs_a, cs_a, b, rs_b, c, ldc, accumulate),
        9 => strips::<9>(n, k, a, rs_a, cs_a, b, rs_b, c, ldc, accumulate),
        10 => strips::<10>(n, k, a, rs_a, cs_a, b, rs_b, c, ldc, accumulate),
        _ => strips::<11>(n, k, a, rs_a, cs_a, b, rs_b, c, ldc, accumulate),
    }
}

/// R rows of C, strip by strip of 32 columns: the R rows of `a` stay in L1 throughout.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn strips<const R: usize>(n: usize, k: usize, a: *const f32, rs_a: usize, cs_a: usize, b: *const f32, rs_b: usize, c: *mut f32, ldc: usize, accumulate: bool) {
    let mut j = 0;
    while j < n {
        let width = (n - j).min(NR);
        let masks = [lanes(width), lanes(width.saturating_sub(16))];
        tile::<R>(k, a, rs_a, cs_a, b.add(j), rs_b, c.add(j), ldc, masks, accumulate);
        j += NR;
    }
}

/// The first `count` (at most 16) lanes.
fn lanes(count: usize) -> __mmask16 {
    if count >= 16 {
        0xffff
    } else {
        ((1u32 << count) - 1) as __mmask16
    }
}

/// One R×32 tile of C (the columns the masks keep).
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(k: usize, a: *const f32, rs_a: usize, cs_a: usize, b: *const f32, rs_b: usize, c: *mut f32, ldc: usize, masks: [__mmask16; 2], accumulate: bool) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..k {
        let row = b.add(p * rs_b);
        let b0 = _mm512_maskz_loadu_ps(masks[0], row);
        let b1 = _mm512_maskz_loadu_ps(masks[1], row.add(16));
        let column = a.add(p * cs_a);
        for (i, sums) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*column.add(i * rs_a));
            sums[0] = _mm512_fmadd_ps(x, b0, sums[0]);
            sums[1] = _mm512_fmadd_ps(x, b1, sums[1]);
        }
    }
    for (i, sums) in acc.iter().enumerate() {
        let out = c.add(i * ldc);
        for (h, (&mask, &sum)) in masks.iter().zip(sums).enumerate() {
            let dst = out.add(16 * h);
            let value = if accumulate { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), sum) } else { sum };
            _mm512_mask_storeu_ps(dst, mask, value);
        }
    }
}
