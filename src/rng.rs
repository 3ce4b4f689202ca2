//! Counter-based randomness: every random quantity is a pure function of (seed, counters), so the
//! CPU and CUDA backends, and any shard layout, draw the same numbers. The CUDA kernels implement the
//! same `mix64` bit for bit.

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finalizer: a bijection on u64 with full avalanche.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The part of a stream base fixed by the seed and the purpose (kernels/init.cu takes it).
#[inline]
pub fn purpose_base(seed: u64, purpose: u64) -> u64 {
    mix64(seed ^ purpose.wrapping_mul(GOLDEN_GAMMA))
}

/// A stream base for one purpose and one counter (e.g. sampling at step t).
#[inline]
pub fn stream(seed: u64, purpose: u64, counter: u64) -> u64 {
    mix64(purpose_base(seed, purpose) ^ counter)
}

/// The i-th value of a stream: SplitMix64's own sequence, started at the stream base.
#[inline(always)]
pub fn at(stream_base: u64, index: u64) -> u64 {
    mix64(stream_base.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)))
}

crate::simd::multiversion! {
    /// `out[i] = at(stream_base, first + i)`: vectorized, 64-bit multiplies and all (AVX-512DQ
    /// has them), where a loop around [`at`] that also branches on each value is not.
    pub(crate) fn fill_at(stream_base: u64, first: u64, out: &mut [u64]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = at(stream_base, first + i as u64);
        }
    }
}

pub(crate) const PURPOSE_SAMPLING: u64 = 1;
pub(crate) const PURPOSE_INIT: u64 = 2;

/// A uniform in (0, 1) from the top 53 bits.
#[inline(always)]
fn unit_open(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

/// Standard normal pair by Box–Muller from one 64-bit draw per uniform.
#[inline]
pub fn normal_pair(a: u64, b: u64) -> (f64, f64) {
    let r = (-2.0 * unit_open(a).ln()).sqrt();
    let t = std::f64::consts::TAU * unit_open(b);
    (r * t.cos(), r * t.sin())
}

/// Fills one class center with N(0, std²) drawn from (seed, global class id), independent of sharding.
pub fn init_center(seed: u64, class: u64, std: f32, row: &mut [f32]) {
    let base = stream(seed, PURPOSE_INIT, class);
    let mut i = 0;
    while i < row.len() {
        let pair = i as u64 / 2;
        let (z0, z1) = normal_pair(at(base, 2 * pair), at(base, 2 * pair + 1));
        row[i] = (z0 * std as f64) as f32;
        if i + 1 < row.len() {
            row[i + 1] = (z1 * std as f64) as f32;
        }
        i += 2;
    }
}
