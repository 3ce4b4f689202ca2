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

/// Where an operand's rows are: row r at `base + r·stride`, or, gathered, at `base + ids[r]·stride`.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub base: *const f32,
    pub stride: usize,
    pub ids: Option<&'a [u32]>,
}

/// Row p of the second operand, for the inner loop: one variant per kind of [`Rows`], so that the
/// loop carries no branch.
trait RowsOf: Copy {
    unsafe fn row(&self, p: usize) -> *const f32;
}
#[derive(Clone, Copy)]
struct Strided(*const f32, usize);
impl RowsOf for Strided {
    #[inline(always)]
    unsafe fn row(&self, p: usize) -> *const f32 {
        self.0.add(p * self.1)
    }
}
#[derive(Clone, Copy)]
struct Gathered(*const f32, usize, *const u32);
impl RowsOf for Gathered {
    #[inline(always)]
    unsafe fn row(&self, p: usize) -> *const f32 {
        self.0.add(*self.2.add(p) as usize * self.1)
    }
}

/// The first operand as a micro-tile reads it: element (i, p) of R rows starting at `first`.
trait TileOf: Copy {
    type Tile<const R: usize>: Copy;
    unsafe fn tile<const R: usize>(&self, first: usize) -> Self::Tile<R>;
    unsafe fn at<const R: usize>(tile: &Self::Tile<R>, i: usize, p: usize) -> f32;
}
/// Rows at a stride, columns at `cs`: one base pointer per tile, so that rows at stride 1 (a
/// transposed operand) are immediate offsets from it.
#[derive(Clone, Copy)]
struct StridedA(*const f32, usize, usize);
impl TileOf for StridedA {
    type Tile<const R: usize> = StridedA;
    #[inline(always)]
    unsafe fn tile<const R: usize>(&self, first: usize) -> StridedA {
        StridedA(self.0.add(first * self.1), self.1, self.2)
    }
    #[inline(always)]
    unsafe fn at<const R: usize>(tile: &StridedA, i: usize, p: usize) -> f32 {
        *tile.0.add(p * tile.2 + i * tile.1)
    }
}
/// Gathered rows: one pointer per row of the tile.
#[derive(Clone, Copy)]
struct GatheredA(Gathered);
impl TileOf for GatheredA {
    type Tile<const R: usize> = [*const f32; R];
    #[inline(always)]
    unsafe fn tile<const R: usize>(&self, first: usize) -> [*const f32; R] {
        std::array::from_fn(|i| self.0.row(first + i))
    }
    #[inline(always)]
    unsafe fn at<const R: usize>(tile: &[*const f32; R], i: usize, p: usize) -> f32 {
        *tile[i].add(p)
    }
}

/// `c[m×n] (row stride ldc) = a[m×k]·b[k×n]`, or `+=` when `accumulate`: element (r, p) of `a` is
/// at `a.row(r)[p·cs_a]` (`cs_a` is 1 for gathered rows), row p of `b` is the `n` contiguous
/// values at `b.row(p)`. Each output is one f32 fused multiply-add chain over p in order, then
/// added to `c` when accumulating.
///
/// # Safety
/// The CPU must have AVX-512F ([`available`]); every addressed element of `a`, `b` and `c` must
/// be in bounds, and `c` must not overlap the operands.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(m: usize, n: usize, k: usize, a: Rows<'_>, cs_a: usize, b: Rows<'_>, c: *mut f32, ldc: usize, accumulate: bool) {
    let gathered = |r: &Rows<'_>, ids: &[u32]| Gathered(r.base, r.stride, ids.as_ptr());
    match (a.ids, b.ids) {
        (None, None) => rows_of(m, n, k, StridedA(a.base, a.stride, cs_a), Strided(b.base, b.stride), c, ldc, accumulate),
        (None, Some(ib)) => rows_of(m, n, k, StridedA(a.base, a.stride, cs_a), gathered(&b, ib), c, ldc, accumulate),
        (Some(ia), None) => rows_of(m, n, k, GatheredA(gathered(&a, ia)), Strided(b.base, b.stride), c, ldc, accumulate),
        (Some(ia), Some(ib)) => rows_of(m, n, k, GatheredA(gathered(&a, ia)), gathered(&b, ib), c, ldc, accumulate),
    }
}

#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_of<A: TileOf, B: RowsOf>(m: usize, n: usize, k: usize, a: A, b: B, c: *mut f32, ldc: usize, accumulate: bool) {
    let mut i = 0;
    while i + MR <= m {
        strips::<MR, A, B>(n, k, a.tile::<MR>(i), b, c.add(i * ldc), ldc, accumulate);
        i += MR;
    }
    let c = c.add(i * ldc);
    match m - i {
        0 => {}
        1 => strips::<1, A, B>(n, k, a.tile::<1>(i), b, c, ldc, accumulate),
        2 => strips::<2, A, B>(n, k, a.tile::<2>(i), b, c, ldc, accumulate),
        3 => strips::<3, A, B>(n, k, a.tile::<3>(i), b, c, ldc, accumulate),
        4 => strips::<4, A, B>(n, k, a.tile::<4>(i), b, c, ldc, accumulate),
        5 => strips::<5, A, B>(n, k, a.tile::<5>(i), b, c, ldc, accumulate),
        6 => strips::<6, A, B>(n, k, a.tile::<6>(i), b, c, ldc, accumulate),
        7 => strips::<7, A, B>(n, k, a.tile::<7>(i), b, c, ldc, accumulate),
        8 => strips::<8, A, B>(n, k, a.tile::<8>(i), b, c, ldc, accumulate),
        9 => strips::<9, A, B>(n, k, a.tile::<9>(i), b, c, ldc, accumulate),
        10 => strips::<10, A, B>(n, k, a.tile::<10>(i), b, c, ldc, accumulate),
        _ => strips::<11, A, B>(n, k, a.tile::<11>(i), b, c, ldc, accumulate),
    }
}

/// R rows of C, strip by strip of 32 columns: those R rows of `a` stay in L1 throughout.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn strips<const R: usize, A: TileOf, B: RowsOf>(n: usize, k: usize, a: A::Tile<R>, b: B, c: *mut f32, ldc: usize, accumulate: bool) {
    let mut j = 0;
    while j < n {
        let width = (n - j).min(NR);
        let masks = [lanes(width), lanes(width.saturating_sub(16))];
        tile::<R, A, B>(k, &a, b, j, c.add(j), ldc, masks, accumulate);
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

/// One R×32 tile of C, columns [j, j + 32) (those the masks keep).
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize, A: TileOf, B: RowsOf>(k: usize, a: &A::Tile<R>, b: B, j: usize, c: *mut f32, ldc: usize, masks: [__mmask16; 2], accumulate: bool) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..k {
        let row = b.row(p).add(j);
        let b0 = _mm512_maskz_loadu_ps(masks[0], row);
        // The second half may lie past the operand's end, when its mask is empty.
        let b1 = _mm512_maskz_loadu_ps(masks[1], row.wrapping_add(16));
        for (i, sums) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(A::at::<R>(a, i, p));
            sums[0] = _mm512_fmadd_ps(x, b0, sums[0]);
            sums[1] = _mm512_fmadd_ps(x, b1, sums[1]);
        }
    }
    for (i, sums) in acc.iter().enumerate() {
        let out = c.add(i * ldc);
        for (h, (&mask, &sum)) in masks.iter().zip(sums).enumerate() {
            let dst = out.wrapping_add(16 * h);
            let value = if accumulate { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), sum) } else { sum };
            _mm512_mask_storeu_ps(dst, mask, value);
        }
    }
}
