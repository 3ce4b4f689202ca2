//! How centers and optimizer state are stored (`storage_dtype`, SPEC §2): f32, or bf16 with every
//! updated value rounded stochastically. One definition for both backends (kernels/storage.cuh
//! computes the same bits) and for the files that convert between the two.
//!
//! A value `x` computed in f32 becomes the bf16 `(bits(x) + r) >> 16`, `r` 16 random bits: its
//! magnitude is rounded up with probability equal to the discarded fraction, so the stored value's
//! expectation is `x` exactly and an update a hundred times below bf16's spacing still moves a
//! center by its own size on average, where rounding to nearest would drop it every time. `r` is a
//! pure function of (seed, optimizer step, global class, tensor, element) — [`draw_index`] — so the
//! rounding is reproducible and the same on every layout of shards, processes and backends.

use crate::config::Rounding;
use crate::rng;
use crate::state::StateTensor;
use half::bf16;

/// One stored element type: what a center or state row holds in memory.
pub trait Stored: Copy + Default + Send + Sync + 'static {
    /// Widens stored values to f32 (exactly).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Narrows f32 values that [`round_row`] has left representable (exactly).
    fn narrow(src: &[f32], dst: &mut [Self]);
    /// Narrows arbitrary f32 values, rounding to nearest (a warm start or a checkpoint written in
    /// f32 loaded into a bf16 head).
    fn narrow_nearest(src: &[f32], dst: &mut [Self]);
    /// Whether values are rounded before they are stored (`round_row` does something).
    const ROUNDS: bool;
    /// The values themselves where they are f32 (no copy needed).
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    fn as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]>;
    fn f32_ptr(values: *mut Self) -> Option<*mut f32>;
}

impl Stored for f32 {
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow_nearest(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    const ROUNDS: bool = false;
    fn as_f32(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }
    fn as_f32_mut(values: &mut [f32]) -> Option<&mut [f32]> {
        Some(values)
    }
    fn f32_ptr(values: *mut f32) -> Option<*mut f32> {
        Some(values)
    }
}

impl Stored for bf16 {
    fn widen(src: &[bf16], dst: &mut [f32]) {
        widen_bf16(src, dst)
    }
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        truncate_bf16(src, dst)
    }
    fn narrow_nearest(src: &[f32], dst: &mut [bf16]) {
        nearest_bf16(src, dst)
    }
    const ROUNDS: bool = true;
    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [bf16]) -> Option<&mut [f32]> {
        None
    }
    fn f32_ptr(_: *mut bf16) -> Option<*mut f32> {
        None
    }
}

crate::simd::multiversion! {
    fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = f32::from_bits((v.to_bits() as u32) << 16);
        }
    }
}

crate::simd::multiversion! {
    fn truncate_bf16(src: &[f32], dst: &mut [bf16]) {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = bf16::from_bits((v.to_bits() >> 16) as u16);
        }
    }
}

/// To nearest, ties to even (half's `bf16::from_f32`, NaN kept a quiet NaN), with integer
/// operations that vectorize.
#[inline(always)]
fn nearest_bits(b: u32) -> u32 {
    let nan = b & 0x7FFF_FFFF > 0x7F80_0000;
    if nan { (b >> 16) | 0x0040 } else { b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16 }
}

/// `x` rounded to the nearest bf16, ties to even: what a bf16 head stores of a value it is given.
#[inline(always)]
pub fn bf16_nearest(x: f32) -> bf16 {
    bf16::from_bits(nearest_bits(x.to_bits()) as u16)
}

crate::simd::multiversion! {
    fn nearest_bf16(src: &[f32], dst: &mut [bf16]) {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = bf16_nearest(v);
        }
    }
}

/// The stream of one optimizer step's rounding draws.
pub fn step_stream(seed: u64, step: u64) -> u64 {
    rng::stream(seed, rng::PURPOSE_ROUNDING, step)
}

/// The place of a tensor's rows among a class's draws (centers 0, then the optimizer's in
/// `StateTensor::for_optimizer` order): four slots, the most any optimizer keeps.
pub fn tensor_slot(tensor: StateTensor) -> u64 {
    match tensor {
        StateTensor::Centers => 0,
        StateTensor::Momentum | StateTensor::ExpAvg => 1,
        StateTensor::ExpAvgSq => 2,
    }
}

/// Values per 64-bit draw: 16 bits each.
pub const PER_DRAW: usize = 4;

/// The draw whose 16-bit lane `element % 4` rounds `element` of `tensor`'s row of global class
/// `class` (rows of `dim` values): every (class, tensor, element) has its own, whatever the shard
/// holding the class.
pub fn draw_index(class: u64, tensor: StateTensor, dim: usize, element: usize) -> u64 {
    let per_row = dim.div_ceil(PER_DRAW) as u64;
    (class * 4 + tensor_slot(tensor)) * per_row + (element / PER_DRAW) as u64
}

/// Where one row's rounding draws come from: the step's stream and the row's first draw.
#[derive(Clone, Copy, Debug)]
pub struct RowKey {
    pub stream: u64,
    pub first_draw: u64,
}

impl RowKey {
    pub fn new(stream: u64, class: u64, tensor: StateTensor, dim: usize) -> RowKey {
        RowKey { stream, first_draw: draw_index(class, tensor, dim, 0) }
    }
}

/// `x` rounded to bf16 by 16 random bits `r` (as f32 bits: the low half zero). A magnitude above
/// bf16's largest may round up to ∞, which the checks before an update refuse; a NaN stays the
/// quiet NaN rounding to nearest gives, where the sum would carry it into a zero the checks pass.
#[inline(always)]
pub fn stochastic_bits(x: u32, r: u32) -> u32 {
    let nan = x & 0x7FFF_FFFF > 0x7F80_0000;
    if nan { nearest_bits(x) << 16 } else { x.wrapping_add(r) & 0xFFFF_0000 }
}

/// Draws per chunk of [`round_row`]: 1 KiB of them on the stack.
const CHUNK_DRAWS: usize = 128;

crate::simd::multiversion! {
    /// Rounds one row's values in place to what bf16 stores (`how`): each value then is exactly a
    /// bf16 and [`Stored::narrow`] packs it.
    pub fn round_row(values: &mut [f32], how: Rounding, key: RowKey) {
        match how {
            Rounding::Nearest => {
                for v in values.iter_mut() {
                    *v = f32::from_bits(nearest_bits(v.to_bits()) << 16);
                }
            }
            Rounding::Stochastic => {
                let mut draws = [0u64; CHUNK_DRAWS];
                let mut lanes = [0u16; CHUNK_DRAWS * PER_DRAW];
                for (c, chunk) in values.chunks_mut(CHUNK_DRAWS * PER_DRAW).enumerate() {
                    let n = chunk.len().div_ceil(PER_DRAW);
                    rng::fill_at(key.stream, key.first_draw + (c * CHUNK_DRAWS) as u64, &mut draws[..n]);
                    // Lane j of a draw is its bits 16j..16j + 16: the draws' little-endian bytes.
                    for (pair, &draw) in lanes.chunks_exact_mut(PER_DRAW).zip(&draws[..n]) {
                        for (j, lane) in pair.iter_mut().enumerate() {
                            *lane = (draw >> (16 * j)) as u16;
                        }
                    }
                    for (v, &r) in chunk.iter_mut().zip(&lanes) {
                        *v = f32::from_bits(stochastic_bits(v.to_bits(), r as u32));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(step: u64, class: u64) -> RowKey {
        RowKey::new(step_stream(7, step), class, StateTensor::Centers, 512)
    }

    /// The mean of many stochastically rounded copies of one value is the value, within the
    /// statistical bound; to nearest, it is a fixed error the size of the value's offset.
    #[test]
    fn stochastic_rounding_is_unbiased_and_nearest_is_not() {
        for &x in &[1.0f32 + 3.0 * f32::EPSILON, 0.3, -0.7e-3, 1.0e30, -2.5e-39, 123.456] {
            let samples = 200_000;
            let mut sum = 0.0f64;
            for s in 0..samples / 512 {
                let mut row = vec![x; 512];
                round_row(&mut row, Rounding::Stochastic, key(s as u64, 3));
                sum += row.iter().map(|&v| v as f64).sum::<f64>();
            }
            let n = (samples / 512 * 512) as f64;
            let mean = sum / n;
            let lo = f32::from_bits(x.to_bits() & 0xFFFF_0000) as f64;
            let hi = f32::from_bits((x.to_bits() & 0xFFFF_0000) + 0x1_0000) as f64;
            // Bernoulli between the neighbours: standard deviation of the mean ≤ (hi − lo)/(2√n).
            let bound = 5.0 * (hi - lo).abs() / (2.0 * n.sqrt());
            assert!((mean - x as f64).abs() <= bound, "{x}: mean {mean}, off by {} > {bound}", mean - x as f64);
            let mut row = vec![x; 1];
            round_row(&mut row, Rounding::Nearest, key(0, 0));
            assert_eq!(row[0].to_bits(), half::bf16::from_f32(x).to_f32().to_bits(), "{x}: nearest");
        }
    }

    #[test]
    fn representable_values_stay_and_draws_are_reproducible_and_distinct() {
        let mut nan = [f32::from_bits(0x7FFF_FFFF), f32::from_bits(0xFFFF_FFFF), f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        round_row(&mut nan, Rounding::Stochastic, key(1, 1));
        assert!(nan[..3].iter().all(|v| v.is_nan()) && nan[3] == f32::INFINITY && nan[4] == f32::NEG_INFINITY, "{nan:?}");
        let exact: Vec<f32> = (0..512).map(|i| half::bf16::from_f32(i as f32 * 0.37 - 50.0).to_f32()).collect();
        let mut row = exact.clone();
        round_row(&mut row, Rounding::Stochastic, key(4, 9));
        assert_eq!(row, exact);
        let values: Vec<f32> = (0..515).map(|i| 1.0 + i as f32 * 1e-5).collect();
        let round = |step, class| {
            let mut r = values.clone();
            round_row(&mut r, Rounding::Stochastic, RowKey::new(step_stream(7, step), class, StateTensor::Centers, 515));
            r
        };
        assert_eq!(round(1, 2), round(1, 2));
        assert_ne!(round(1, 2), round(2, 2));
        assert_ne!(round(1, 2), round(1, 3));
        // Lane by lane, the definition.
        let k = RowKey::new(step_stream(7, 1), 2, StateTensor::Centers, 515);
        for (e, (&v, &r)) in values.iter().zip(&round(1, 2)).enumerate() {
            let draw = rng::at(k.stream, draw_index(2, StateTensor::Centers, 515, e));
            let bits = ((draw >> (16 * (e % 4))) & 0xFFFF) as u32;
            assert_eq!(r.to_bits(), stochastic_bits(v.to_bits(), bits), "element {e}");
        }
        // Every (class, tensor, element) its own draw.
        assert_ne!(draw_index(2, StateTensor::Centers, 515, 0), draw_index(2, StateTensor::Momentum, 515, 0));
        assert_eq!(draw_index(2, StateTensor::ExpAvgSq, 515, 514) + 1, draw_index(3, StateTensor::Centers, 515, 0) - 129);
    }

    #[test]
    fn widen_narrow_round_trip() {
        let values: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 1.37e-3).collect();
        let mut b = vec![bf16::ZERO; 100];
        <bf16 as Stored>::narrow_nearest(&values, &mut b);
        for (x, y) in values.iter().zip(&b) {
            assert_eq!(bf16::from_f32(*x).to_bits(), y.to_bits());
        }
        let mut w = vec![0.0; 100];
        <bf16 as Stored>::widen(&b, &mut w);
        let mut again = vec![bf16::ZERO; 100];
        <bf16 as Stored>::narrow(&w, &mut again);
        assert_eq!(b, again);
    }
}
