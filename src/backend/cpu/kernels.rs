//! Element-wise kernels of the CPU backend. Each is written once as plain loops over contiguous
//! rows and compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at run time: the inner loops
//! run over the batch dimension, so LLVM vectorizes them without intrinsics.

use half::bf16;

use crate::simd::multiversion;

/// `exp(x)` to about 2 ulp for x ≤ 88 (Cephes' polynomial), branch-free so it vectorizes. Inputs
/// below −87.3 return ≈ 1e-38 instead of a denormal: irrelevant next to the row's largest term, 1.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.336_54, 88.722_83);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the bits of n + 1.5·2²³, whose low mantissa bits hold n in two's complement: `n as
    // i32` saturates (NaN → 0), which LLVM compiles to scalar code per lane and the whole loop
    // around this function stops being vectorized. A NaN x gives a NaN y, and the product stays NaN.
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    y * scale
}

/// How a cosine becomes a logit outside the target column.
#[derive(Clone, Copy, Debug)]
pub struct LogitParams<'a> {
    pub scale: f32,
    /// Inter-class filter threshold; 0 disables it.
    pub filter: f32,
    /// Cosines are clamped to [−bound, bound] (1, or AdaFace's 1 − eps), and get no gradient
    /// where the clamp holds.
    pub bound: f32,
    /// Each row's hard-negative threshold: a non-target cosine above it becomes `c·(hard_t + c)`
    /// (CurricularFace; +∞ for the other margins, whose rows have none).
    pub hard_above: &'a [f32],
    pub hard_t: f32,
}

/// The non-target logit of a raw (unclamped) cosine in a row whose hard-negative threshold is
/// `hard_above`, whether the filter removed it, and ∂z/∂c over s (1, or t + 2c when it is hard).
#[inline(always)]
fn non_target(p: &LogitParams<'_>, raw: f32, hard_above: f32) -> (f32, bool, f32) {
    let c = raw.clamp(-p.bound, p.bound);
    let filtered = p.filter > 0.0 && c > p.filter;
    let hard = c > hard_above;
    let (value, slope) = if hard { (c * (p.hard_t + c), p.hard_t + 2.0 * c) } else { (c, 1.0) };
    (if filtered { 0.0 } else { p.scale * value }, filtered, slope)
}

/// Per-row statistics of one shard's logits, accumulated block by block.
pub struct RowAccumulator {
    /// Running max of the logits.
    pub max: Vec<f32>,
    /// Σ exp(z − max).
    pub sum: Vec<f32>,
    /// The same sum over the non-target columns only (filtered ones included, at z = 0). Summed on
    /// its own rather than taken as `sum − exp(z_y − max)`: when p_y → 1 that difference keeps
    /// none of f32's digits, and the loss (`log1p`) and the target's gradient come from it.
    pub rest: Vec<f32>,
    /// Largest margin-free cosine among non-target columns (for top-1 accuracy).
    pub cos_other: Vec<f32>,
    block_max: Vec<f32>,
    block_sum: Vec<f32>,
    block_rest: Vec<f32>,
}

impl RowAccumulator {
    pub fn new(rows: usize) -> Self {
        RowAccumulator {
            max: vec![f32::NEG_INFINITY; rows],
            sum: vec![0.0; rows],
            rest: vec![0.0; rows],
            cos_other: vec![f32::NEG_INFINITY; rows],
            block_max: vec![0.0; rows],
            block_sum: vec![0.0; rows],
            block_rest: vec![0.0; rows],
        }
    }

    /// Empties the accumulator for another pass over the same rows.
    pub fn reset(&mut self) {
        self.max.fill(f32::NEG_INFINITY);
        self.sum.fill(0.0);
        self.rest.fill(0.0);
        self.cos_other.fill(f32::NEG_INFINITY);
    }

    /// Adds a block of cosines laid out `[columns][n]` whose first column is `first_col`. Rows whose
    /// label column `col[i]` lies in the block take `target_logit[i]` there instead. Overwrites the
    /// block with its gradient seeds (see [`block_sum`]) and returns the block's row maxima, which
    /// the seeds are relative to.
    pub fn add_block(&mut self, cos: &mut [f32], n: usize, first_col: i32, col: &[i32], target_logit: &[f32], p: LogitParams) -> &[f32] {
        self.block_max.fill(f32::NEG_INFINITY);
        self.block_sum.fill(0.0);
        self.block_rest.fill(0.0);
        block_max(cos, n, first_col, col, target_logit, p, &mut self.block_max, &mut self.cos_other);
        block_sum(cos, n, first_col, col, target_logit, p, &self.block_max, &mut self.block_sum, &mut self.block_rest);
        merge_log_sum_exp(&mut self.max, [&mut self.sum, &mut self.rest], &self.block_max, [&self.block_sum, &self.block_rest]);
        &self.block_max
    }

    /// Folds another accumulator over the same rows into this one.
    pub fn merge(&mut self, other: &RowAccumulator) {
        merge_log_sum_exp(&mut self.max, [&mut self.sum, &mut self.rest], &other.max, [&other.sum, &other.rest]);
        for (a, &b) in self.cos_other.iter_mut().zip(&other.cos_other) {
            *a = a.max(b);
        }
    }
}

/// (max, sums of exp(z − max)) combined without overflow: the sums are rescaled to the larger max.
fn merge_log_sum_exp(max: &mut [f32], sums: [&mut [f32]; 2], other_max: &[f32], other_sums: [&[f32]; 2]) {
    let [sum, rest] = sums;
    let [other_sum, other_rest] = other_sums;
    for i in 0..max.len() {
        let (m, om) = (max[i], other_max[i]);
        if om == f32::NEG_INFINITY {
            continue;
        }
        if om > m {
            let f = (m - om).exp();
            sum[i] = sum[i] * f + other_sum[i];
            rest[i] = rest[i] * f + other_rest[i];
            max[i] = om;
        } else {
            let f = (om - m).exp();
            sum[i] += other_sum[i] * f;
            rest[i] += other_rest[i] * f;
        }
    }
}

multiversion! {
    pub fn block_max(cos: &[f32], n: usize, first_col: i32, col: &[i32], target_logit: &[f32], p: LogitParams, max: &mut [f32], cos_other: &mut [f32]) {
        let (col, target_logit, max, cos_other, hard_above) = (&col[..n], &target_logit[..n], &mut max[..n], &mut cos_other[..n], &p.hard_above[..n]);
        for (j, row) in cos.chunks_exact(n).enumerate() {
            let column = first_col + j as i32;
            for i in 0..n {
                let is_target = col[i] == column;
                let (z, _, _) = non_target(&p, row[i], hard_above[i]);
                let z = if is_target { target_logit[i] } else { z };
                max[i] = max[i].max(z);
                let c = if is_target { f32::NEG_INFINITY } else { row[i].clamp(-1.0, 1.0) };
                cos_other[i] = cos_other[i].max(c);
            }
        }
    }
}

/// The gradient seed of a logit whose ∂loss/∂cos is 0: the clamp to [−1, 1] was active, or the
/// inter-class filter removed it. Real seeds, exponentials times a finite slope (negative for some
/// of CurricularFace's hard negatives), are finite.
const NO_GRADIENT: f32 = f32::NEG_INFINITY;

multiversion! {
    /// Adds exp(z − max) over a block to `sum` (and, outside the target column, to `rest`), and
    /// leaves in each entry its gradient seed for [`cos_gradient`]: that exponential times ∂z/∂c
    /// over s (1 but on CurricularFace's hard negatives), or [`NO_GRADIENT`]. The backward pass then
    /// needs no exponential of its own.
    pub fn block_sum(cos: &mut [f32], n: usize, first_col: i32, col: &[i32], target_logit: &[f32], p: LogitParams, max: &[f32], sum: &mut [f32], rest: &mut [f32]) {
        let (col, target_logit, max, sum, rest, hard_above) = (&col[..n], &target_logit[..n], &max[..n], &mut sum[..n], &mut rest[..n], &p.hard_above[..n]);
        for (j, row) in cos.chunks_exact_mut(n).enumerate() {
            let column = first_col + j as i32;
            for i in 0..n {
                let raw = row[i];
                let is_target = col[i] == column;
                let (z, filtered, slope) = non_target(&p, raw, hard_above[i]);
                let z = if is_target { target_logit[i] } else { z };
                let e = exp(z - max[i]);
                sum[i] += e;
                rest[i] += if is_target { 0.0 } else { e };
                let inside = (-p.bound..=p.bound).contains(&raw);
                row[i] = if !inside || (!is_target && filtered) { NO_GRADIENT } else if is_target { e } else { e * slope };
            }
        }
    }
}

/// Everything the backward pass needs per row of the global batch.
pub struct RowGradParams<'a> {
    pub col: &'a [i32],
    /// ∂z_y/∂c_y for rows whose target is on this shard.
    pub target_slope: &'a [f32],
    /// Global row max and 1 / Σexp after the all-reduce.
    pub max: &'a [f32],
    pub inv_sum: &'a [f32],
    /// Σ_{j≠y} p_j: the target's `1 − p_y`, without the cancellation of forming it from p_y.
    pub non_target_mass: &'a [f32],
    /// 1 / N: the loss is a mean over the global batch.
    pub inv_batch: f32,
}

multiversion! {
    /// Writes ∂loss/∂cos of a block of gradient seeds ([`block_sum`]'s) into `out`: `(softmax −
    /// onehot)/N · ∂z/∂c`, zero where the seed says so. `seed_scale[i]` is exp(block max − row
    /// max)·(1 / Σexp)·(1 / N) for row i, turning a seed into its probability over N. The target
    /// column's `p_y − 1` is `−Σ_{j≠y} p_j`, exact when p_y is near 1. Into a block's scratch, not
    /// over the seeds: the seeds' table then stays clean in the cache, and is not written back to
    /// memory (4·k·N bytes a step, 102 MB at k = 100,000 sampled classes and N = 256).
    pub fn cos_gradient(seeds: &[f32], n: usize, first_col: i32, g: &RowGradParams<'_>, p: LogitParams, seed_scale: &[f32], out: &mut [f32]) {
        cos_gradient_as(seeds, n, first_col, g, p, seed_scale, out, |v| v)
    }
}

multiversion! {
    /// [`cos_gradient`] rounded to bf16, the operand of GEMMs on bf16 units.
    pub fn cos_gradient_bf16(seeds: &[f32], n: usize, first_col: i32, g: &RowGradParams<'_>, p: LogitParams, seed_scale: &[f32], out: &mut [bf16]) {
        cos_gradient_as(seeds, n, first_col, g, p, seed_scale, out, bf16_of)
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cos_gradient_as<T>(seeds: &[f32], n: usize, first_col: i32, g: &RowGradParams<'_>, p: LogitParams, seed_scale: &[f32], out: &mut [T], convert: impl Fn(f32) -> T) {
    let (col, slope, mass, seed_scale) = (&g.col[..n], &g.target_slope[..n], &g.non_target_mass[..n], &seed_scale[..n]);
    for (j, (row, grads)) in seeds.chunks_exact(n).zip(out.chunks_exact_mut(n)).enumerate() {
        let column = first_col + j as i32;
        for i in 0..n {
            let seed = row[i];
            let grad = if col[i] == column { -mass[i] * g.inv_batch * slope[i] } else { seed * seed_scale[i] * p.scale };
            grads[i] = convert(if seed == NO_GRADIENT { 0.0 } else { grad });
        }
    }
}

multiversion! {
    /// [`cos_gradient`]'s `seed_scale` for a block whose row maxima are `block_max`.
    pub fn seed_scales(block_max: &[f32], g: &RowGradParams<'_>, out: &mut [f32]) {
        for (((o, &b), &m), &s) in out.iter_mut().zip(block_max).zip(g.max).zip(g.inv_sum) {
            *o = exp(b - m) * s * g.inv_batch;
        }
    }
}

/// Writes `src`'s rows scaled to unit L2 norm into `dst`, and their 1/‖row‖.
pub fn normalize_rows(src: &[f32], dim: usize, dst: &mut [f32], inv_norm: &mut [f32]) {
    dst.copy_from_slice(src);
    normalize_rows_inplace(dst, dim, inv_norm);
}

/// A dot product with independent lane accumulators, so that it vectorizes without reassociation.
/// Its summation order is fixed (lanes, then the tail), whatever the CPU features: search relies on
/// it, and kernels/topk.cu `cpu_dot` repeats it operation for operation on the GPU.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A dot product summed in f64 (the products of f32 or narrower values are exact there).
pub fn dot_f64<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x.into() * y.into()).sum()
}

multiversion! {
    /// Whether every value is finite: `x·0` is NaN exactly for NaN and ±Inf, and a NaN survives any
    /// sum, so this is one vectorized pass without branches.
    pub fn all_finite(v: &[f32]) -> bool {
        const LANES: usize = 16;
        let mut acc = [0.0f32; LANES];
        let chunks = v.chunks_exact(LANES);
        let tail = chunks.remainder().iter().fold(0.0f32, |a, &x| a + x * 0.0);
        for c in chunks {
            for l in 0..LANES {
                acc[l] += c[l] * 0.0;
            }
        }
        !(acc.iter().sum::<f32>() + tail).is_nan()
    }
}

/// `half::bf16::from_f32`'s rounding (to nearest, ties to even; NaN stays a quiet NaN), written
/// with integer operations that vectorize: half's own branches keep LLVM from it.
#[inline(always)]
fn bf16_of(x: f32) -> bf16 {
    let b = x.to_bits();
    let nan = b & 0x7FFF_FFFF > 0x7F80_0000;
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    bf16::from_bits((if nan { (b >> 16) | 0x0040 } else { rounded }) as u16)
}

multiversion! {
    /// `dst[i] = bf16(src[i] · scale)`: a GEMM operand rounded for the bf16 units.
    pub fn to_bf16_scaled(src: &[f32], scale: f32, dst: &mut [bf16]) {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = bf16_of(v * scale);
        }
    }
}

multiversion! {
    /// `dst[i] = bf16(src[i])`.
    pub fn to_bf16(src: &[f32], dst: &mut [bf16]) {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = bf16_of(v);
        }
    }
}

multiversion! {
    /// Scales rows to unit L2 norm (PyTorch's `normalize`, eps 1e-12) and writes their 1/‖row‖.
    pub fn normalize_rows_inplace(rows: &mut [f32], dim: usize, inv_norms: &mut [f32]) {
        for (row, inv) in rows.chunks_exact_mut(dim).zip(inv_norms.iter_mut()) {
            let r = inv_norm(row);
            *inv = r;
            row.iter_mut().for_each(|v| *v *= r);
        }
    }
}

multiversion! {
    /// Back through a normalization `u = v/‖v‖`, given `dir = v` and `dir_scale = 1/‖v‖`:
    /// `grad ← (grad − û(û·grad))·factor` with `û = dir·dir_scale`, in place.
    pub fn project_out(dir: &[f32], dir_scale: f32, factor: f32, grad: &mut [f32]) {
        let along = along(dir, dir_scale, grad);
        for (g, &v) in grad.iter_mut().zip(dir) {
            *g = projected(*g, v, along, factor);
        }
    }
}

/// The component of `grad` along `dir` that [`project_out`] removes, as a multiple of `dir`.
#[inline(always)]
pub(crate) fn along(dir: &[f32], dir_scale: f32, grad: &[f32]) -> f32 {
    dot(dir, grad) * dir_scale * dir_scale
}

/// One value of [`project_out`]'s result: the same operations, so the same bits, wherever it is
/// computed.
#[inline(always)]
pub(crate) fn projected(grad: f32, dir: f32, along: f32, factor: f32) -> f32 {
    (grad - dir * along) * factor
}

/// Rows ahead of the one being worked on that [`prefetch_ahead`] starts loading.
pub const PREFETCH_AHEAD: usize = 2;

/// Starts loading row `row` (`dim` values) of the table at `table` into the cache. The sampled
/// rows of a shard are scattered over its table, so the hardware's prefetchers only catch on
/// inside each row, after its first misses. A pointer, not a slice: the row may be another
/// thread's to write meanwhile, and a prefetch accesses no memory. Into L2 (`T1`), not L1: a
/// center row (512 f32, 2 KiB) is 32 lines, more than L1's miss buffers hold in flight, and
/// loading into L1 stalls on them (`cargo run --release --example prefetch_choice`; results in
/// docs/benchmarks.md).
#[inline(always)]
pub fn prefetch_row<T>(table: *const T, row: usize, dim: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = table.wrapping_add(row * dim).cast::<i8>();
        for offset in (0..dim * std::mem::size_of::<T>()).step_by(64) {
            // SAFETY: a prefetch has no architectural effect, whatever the address.
            #[allow(unused_unsafe)]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(start.wrapping_add(offset))
            };
        }
    }
}

/// [`prefetch_row`] of row `ids[i + PREFETCH_AHEAD]`, if there is one: while row `ids[i]` is
/// worked on, the next scattered rows load.
#[inline(always)]
pub fn prefetch_ahead<T>(table: *const T, dim: usize, ids: &[u32], i: usize) {
    if let Some(&ahead) = ids.get(i + PREFETCH_AHEAD) {
        prefetch_row(table, ahead as usize, dim);
    }
}

/// 1/‖row‖ with PyTorch's `normalize` eps, 1e-12.
#[inline(always)]
fn inv_norm(row: &[f32]) -> f32 {
    1.0 / dot(row, row).sqrt().max(1e-12)
}

multiversion! {
    /// 1/‖row‖ of the rows `ids` of a row-major matrix.
    pub fn row_inv_norms(matrix: &[f32], dim: usize, ids: &[u32], out: &mut [f32]) {
        for (r, (o, &j)) in out.iter_mut().zip(ids).enumerate() {
            prefetch_ahead(matrix.as_ptr(), dim, ids, r);
            *o = inv_norm(&matrix[j as usize * dim..(j as usize + 1) * dim]);
        }
    }
}

multiversion! {
    /// [`row_inv_norms`] into `inv`, and each row times it rounded to bf16 into the rows of `out`,
    /// in one pass over each row: a bf16 GEMM operand of unit rows.
    pub fn unit_rows_bf16(matrix: &[f32], dim: usize, ids: &[u32], inv: &mut [f32], out: &mut [bf16]) {
        for (r, ((o, &j), dst)) in inv.iter_mut().zip(ids).zip(out.chunks_exact_mut(dim)).enumerate() {
            prefetch_ahead(matrix.as_ptr(), dim, ids, r);
            let row = &matrix[j as usize * dim..(j as usize + 1) * dim];
            *o = inv_norm(row);
            for (d, &v) in dst.iter_mut().zip(row) {
                *d = bf16_of(v * *o);
            }
        }
    }
}

multiversion! {
    /// Multiplies row r (of `width` values) by `factors[r]`.
    pub fn scale_rows(rows: &mut [f32], width: usize, factors: &[f32]) {
        for (row, &f) in rows.chunks_exact_mut(width).zip(factors) {
            row.iter_mut().for_each(|v| *v *= f);
        }
    }
}

/// `dst.copy_from_slice(src)` with stores that bypass the cache, for a large table written once
/// and read back only after it has left the cache anyway: ordinary stores would first read
/// every line of `dst` from memory, doubling the traffic of writing it.
pub fn stream_copy(src: &[f32], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "stream_copy lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_sfence, _mm_stream_ps};
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        dst[..head].copy_from_slice(&src[..head]);
        let (body, tail) = (dst[head..].chunks_exact_mut(4), src[head..].chunks_exact(4));
        let rest = tail.remainder();
        for (d, s) in body.zip(tail) {
            // SAFETY: `d` is 16-byte aligned (after `head`) and both chunks hold 4 values; SSE is
            // part of x86_64.
            unsafe { _mm_stream_ps(d.as_mut_ptr(), _mm_loadu_ps(s.as_ptr())) };
        }
        let len = dst.len();
        dst[len - rest.len()..].copy_from_slice(rest);
        // Streaming stores are weakly ordered: fence them before another thread may read them.
        // SAFETY: SSE is part of x86_64.
        unsafe { _mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// `dst` (`cols` rows of `src.len() / cols`) becomes the transpose of `src` (rows of `cols`).
pub fn transpose(src: &[f32], cols: usize, dst: &mut [f32]) {
    let rows = src.len() / cols;
    for (r, row) in src.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            dst[c * rows + r] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_halfs() {
        let specials = [0.0f32, -0.0, 1.0, f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-40, -1e-45, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::from_bits(0x7F80_0001), f32::from_bits(0xFFBF_FFFF)];
        // Every rounding case of the low 16 bits (below, at and above the half-way point, with an
        // even and an odd last kept bit), over spread exponents and both signs, and pseudo-random bits.
        let lows = [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF];
        let mut values: Vec<f32> = specials.to_vec();
        for hi in (0..=0xFFFFu32).step_by(37) {
            values.extend(lows.iter().map(|&lo| f32::from_bits(hi << 16 | lo)));
        }
        values.extend((0..100_000u64).map(|i| f32::from_bits(crate::rng::at(42, i) as u32)));
        let mut got = vec![bf16::ZERO; values.len()];
        to_bf16(&values, &mut got);
        for (&v, g) in values.iter().zip(&got) {
            assert_eq!(g.to_bits(), bf16::from_f32(v).to_bits(), "{v:e} ({:#010x})", v.to_bits());
        }
        let mut scaled = vec![bf16::ZERO; values.len()];
        to_bf16_scaled(&values, 0.37, &mut scaled);
        for (&v, g) in values.iter().zip(&scaled) {
            assert_eq!(g.to_bits(), bf16::from_f32(v * 0.37).to_bits(), "{v:e} · 0.37");
        }
    }

    #[test]
    fn stream_copy_copies_every_alignment_and_length() {
        let src: Vec<f32> = (0..300).map(|i| i as f32 * 0.5 - 7.0).collect();
        for offset in 0..8 {
            for len in [0, 1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 255] {
                let mut dst = vec![f32::NAN; offset + len + 8];
                stream_copy(&src[offset..offset + len], &mut dst[offset..offset + len]);
                assert!(dst[..offset].iter().chain(&dst[offset + len..]).all(|v| v.is_nan()), "wrote outside, offset {offset} len {len}");
                assert_eq!(&dst[offset..offset + len], &src[offset..offset + len], "offset {offset} len {len}");
            }
        }
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0.0f64;
        let mut x = -80.0f32;
        while x <= 80.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert!(exp(-200.0) < 1e-37);
    }
}
