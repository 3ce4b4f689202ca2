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
pub(crate) const PURPOSE_ROUNDING: u64 = 3;

/// A uniform in (0, 1) from the top 53 bits.
#[inline(always)]
fn unit_open(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

/// Box–Muller on one 64-bit draw per uniform, with the logarithm and the sine and cosine given: the
/// one definition that the reference (libm's) and the fast path ([`ln`], [`sin_cos`]) share.
#[inline(always)]
fn box_muller(a: u64, b: u64, log: impl Fn(f64) -> f64, sincos: impl Fn(f64) -> (f64, f64)) -> (f64, f64) {
    let r = (-2.0 * log(unit_open(a))).sqrt();
    let (s, c) = sincos(std::f64::consts::TAU * unit_open(b));
    (r * c, r * s)
}

/// Standard normal pair by Box–Muller from one 64-bit draw per uniform, with libm's `log`, `sin`
/// and `cos`: the definition of every initial center (kernels/init.cu computes the same).
#[inline]
pub fn normal_pair(a: u64, b: u64) -> (f64, f64) {
    box_muller(a, b, f64::ln, f64::sin_cos)
}

/// One pair of a center by the definition: [`normal_pair`] of draws `a` and `b`, times `std`,
/// rounded to f32.
fn reference_pair(a: u64, b: u64, std: f64) -> (f32, f32) {
    let (z0, z1) = normal_pair(a, b);
    ((z0 * std) as f32, (z1 * std) as f32)
}

/// Fills one class center with N(0, std²) drawn from (seed, global class id), independent of sharding:
/// values 2p and 2p + 1 are [`reference_pair`] of the stream's draws 2p and 2p + 1. Computed the
/// fast way ([`center_block`]) and bit for bit the same.
pub fn init_center(seed: u64, class: u64, std: f32, row: &mut [f32]) {
    fill_center(stream(seed, PURPOSE_INIT, class), std as f64, row);
}

/// Pairs per block of the fast path: one AVX-512 register of f64s.
const LANES: usize = 8;

crate::simd::multiversion! {
    /// [`init_center`]'s row, block by block ([`center_block`]).
    fn fill_center(base: u64, std: f64, row: &mut [f32]) {
        for (block, chunk) in row.chunks_mut(2 * LANES).enumerate() {
            let mut a = [0u64; LANES];
            let mut b = [0u64; LANES];
            for j in 0..LANES {
                let pair = (block * LANES + j) as u64;
                a[j] = at(base, 2 * pair);
                b[j] = at(base, 2 * pair + 1);
            }
            let values = center_block(&a, &b, std);
            match <&mut [f32; 2 * LANES]>::try_from(&mut *chunk) {
                Ok(full) => *full = values,
                Err(_) => chunk.copy_from_slice(&values[..chunk.len()]),
            }
        }
    }
}

/// [`reference_pair`] of each (a[j], b[j]), values 2j and 2j + 1, computed with [`ln`] and
/// [`sin_cos`]: branch-free, so that the loops vectorize. Where a value might round to another f32
/// than libm's product (about one block in 3,000), the block is recomputed by the definition.
///
/// The fast product `z·std` is within [`FAST_REL_ERR`] of libm's, relatively: [`ln`] and
/// [`sin_cos`] are within about 1 ulp of the true values (the tests measure at most 2^-52 from
/// libm's), glibc's are within 1 ulp (the maxima of its test suite on x86-64, libm-test-ulps),
/// `sqrt` halves the logarithm's error, and the roundings of sqrt, r·c and ·std add 2^-53 each,
/// each side: under 2^-49 in all (the tests measure 2^-50.4), 2^9 below the bound. Rounding to f32
/// is monotonic, so where `z·std·(1 ∓ FAST_REL_ERR)` round to the same f32, libm's product, which
/// lies between them, rounds to it too.
#[inline(always)]
fn center_block(a: &[u64; LANES], b: &[u64; LANES], std: f64) -> [f32; 2 * LANES] {
    let mut z0 = [0f64; LANES];
    let mut z1 = [0f64; LANES];
    for j in 0..LANES {
        (z0[j], z1[j]) = box_muller(a[j], b[j], ln, sin_cos);
    }
    let mut v0 = [0f32; LANES];
    let mut v1 = [0f32; LANES];
    let mut sure = true;
    for j in 0..LANES {
        let (x, sure_x) = round_if_sure(z0[j] * std);
        let (y, sure_y) = round_if_sure(z1[j] * std);
        v0[j] = x;
        v1[j] = y;
        sure &= sure_x & sure_y;
    }
    if !sure {
        for j in 0..LANES {
            (v0[j], v1[j]) = reference_pair(a[j], b[j], std);
        }
    }
    let mut values = [0f32; 2 * LANES];
    for j in 0..LANES {
        values[2 * j] = v0[j];
        values[2 * j + 1] = v1[j];
    }
    values
}

/// The fast path's bound on its error relative to the definition's product (see [`center_block`]).
const FAST_REL_ERR: f64 = 1.0 / (1u64 << 40) as f64;

/// `y` rounded to f32, and whether every value within [`FAST_REL_ERR`] of `y` rounds the same.
/// Bits are compared, so that ±0 (std = 0) and ±∞ (a large std) count by their sign.
#[inline(always)]
fn round_if_sure(y: f64) -> (f32, bool) {
    let lo = (y * (1.0 - FAST_REL_ERR)) as f32;
    let hi = (y * (1.0 + FAST_REL_ERR)) as f32;
    (hi, lo.to_bits() == hi.to_bits())
}

/// Natural logarithm of a positive normal f64, branch-free: fdlibm's `__ieee754_log` (error under
/// 1 ulp) without its special cases, which Box–Muller's uniforms in [2^-54, 1) never reach.
#[inline(always)]
fn ln(x: f64) -> f64 {
    const LN2_HI: f64 = 0.6931471803691238;
    const LN2_LO: f64 = 1.9082149292705877e-10;
    const LG1: f64 = 0.6666666666666735;
    const LG2: f64 = 0.3999999999940942;
    const LG3: f64 = 0.2857142874366239;
    const LG4: f64 = 0.22222198432149784;
    const LG5: f64 = 0.1818357216161805;
    const LG6: f64 = 0.15313837699209373;
    const LG7: f64 = 0.14798198605116586;
    let bits = x.to_bits();
    let mantissa = bits & 0x000f_ffff_ffff_ffff;
    // Set where the mantissa is at least √2: then x = 2^(k+1)·(m/2), so that f = m - 1 lies in
    // [√2/2 - 1, √2 - 1).
    let up = (mantissa + 0x0009_5f64_0000_0000) & 0x0010_0000_0000_0000;
    let k = ((bits >> 52) as i64 - 1023 + (up >> 52) as i64) as f64;
    let f = f64::from_bits(mantissa | (up ^ 0x3ff0_0000_0000_0000)) - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let r = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7))) + w * (LG2 + w * (LG4 + w * LG6));
    let hfsq = 0.5 * f * f;
    k * LN2_HI - ((hfsq - (s * (hfsq + r) + k * LN2_LO)) - f)
}

/// (sin t, cos t) for t in [0, 2π + π/4], branch-free. t - kπ/2 is exact to about 2^-53 relative:
/// π/2 is split in fdlibm's three 33-bit parts and a fourth (so k·part is exact for k ≤ 4 and the
/// split's own error, 7.4e-49, is nothing next to the smallest |t - kπ/2| of any double, 6.1e-17
/// at t = fl(π/2)), and fdlibm's `__kernel_sin`/`__kernel_cos` (under 1 ulp) take the rest.
#[inline(always)]
fn sin_cos(t: f64) -> (f64, f64) {
    const PIO2_1: f64 = 1.5707963267341256;
    const PIO2_2: f64 = 6.077100506303966e-11;
    const PIO2_3: f64 = 2.0222662487111665e-21;
    const PIO2_3T: f64 = 8.4784276603689e-32;
    const S1: f64 = -0.16666666666666632;
    const S2: f64 = 0.00833333333332249;
    const S3: f64 = -0.0001984126982985795;
    const S4: f64 = 2.7557313707070068e-06;
    const S5: f64 = -2.5050760253406863e-08;
    const S6: f64 = 1.58969099521155e-10;
    const C1: f64 = 0.0416666666666666;
    const C2: f64 = -0.001388888888887411;
    const C3: f64 = 2.480158728947673e-05;
    const C4: f64 = -2.7557314351390663e-07;
    const C5: f64 = 2.087572321298175e-09;
    const C6: f64 = -1.1359647557788195e-11;
    // Adding 1.5·2^52 rounds to an integer, which then sits in the low bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let big = t * std::f64::consts::FRAC_2_PI + ROUND;
    let q = big.to_bits();
    let k = big - ROUND;
    let x = (((t - k * PIO2_1) - k * PIO2_2) - k * PIO2_3) - k * PIO2_3T;
    let z = x * x;
    let w = z * z;
    let sin_x = x + z * x * (S1 + z * (S2 + z * (S3 + z * S4) + z * w * (S5 + z * S6)));
    let r = z * (C1 + z * (C2 + z * C3)) + w * w * (C4 + z * (C5 + z * C6));
    let hz = 0.5 * z;
    let one_less = 1.0 - hz;
    let cos_x = one_less + (((1.0 - one_less) - hz) + z * r);
    // t = kπ/2 + x: the quadrant k mod 4 swaps sine and cosine (odd k) and sets their signs.
    let odd = 0u64.wrapping_sub(q & 1);
    let (s, c) = (sin_x.to_bits(), cos_x.to_bits());
    let sin_t = f64::from_bits((s & !odd | c & odd) ^ ((q & 2) << 62));
    let cos_t = f64::from_bits((c & !odd | s & odd) ^ (((q + 1) & 2) << 62));
    (sin_t, cos_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A center by the definition, one libm pair at a time.
    fn reference_center(seed: u64, class: u64, std: f32, d: usize) -> Vec<u32> {
        let base = stream(seed, PURPOSE_INIT, class);
        (0..d as u64)
            .map(|i| {
                let pair = reference_pair(at(base, i / 2 * 2), at(base, i / 2 * 2 + 1), std as f64);
                if i % 2 == 0 { pair.0 } else { pair.1 }.to_bits()
            })
            .collect()
    }

    fn fast_center(seed: u64, class: u64, std: f32, d: usize) -> Vec<u32> {
        let mut row = vec![f32::NAN; d];
        init_center(seed, class, std, &mut row);
        row.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn init_center_is_the_definition_bit_for_bit() {
        let dims = [1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 64, 127, 512, 513];
        // ±0 and the smallest subnormal std (every value 0 or subnormal in f32), large ones (overflow
        // to ±∞ past f32::MAX).
        let stds = [0.0, -0.0, f32::from_bits(1), 1e-40, 1e-30, 1e-6, 0.01, 1.0, 3.0, 1e20, 1e38, f32::MAX];
        let mut values = 0;
        for seed in [0, 1, 42, 0xDEAD_BEEF, u64::MAX] {
            for &d in &dims {
                for &std in &stds {
                    for class in (0..40).chain([1 << 31, u64::MAX]) {
                        assert_eq!(fast_center(seed, class, std, d), reference_center(seed, class, std, d), "seed {seed}, class {class}, std {std:e}, d {d}");
                        values += d;
                    }
                }
            }
        }
        // The default init_std at d = 512: about 250 blocks take the fallback.
        for class in 0..20_000 {
            assert_eq!(fast_center(7, class, 0.01, 512), reference_center(7, class, 0.01, 512), "class {class}");
            values += 512;
        }
        assert!(values > 13_000_000);
    }

    /// |x / y - 1|.
    fn rel(x: f64, y: f64) -> f64 {
        ((x - y) / y).abs()
    }

    #[test]
    fn fast_functions_stay_within_the_error_budget() {
        let (mut ln_err, mut sin_err, mut cos_err, mut pair_err) = (0f64, 0f64, 0f64, 0f64);
        let mut sin_cos_at = |t: f64| {
            let (s, c) = sin_cos(t);
            sin_err = sin_err.max(rel(s, t.sin()));
            cos_err = cos_err.max(rel(c, t.cos()));
        };
        // Box–Muller's own arguments, random...
        for i in 0..4_000_000 {
            let (a, b) = (at(0xE77, 2 * i), at(0xE77, 2 * i + 1));
            sin_cos_at(std::f64::consts::TAU * unit_open(b));
            let (f0, f1) = box_muller(a, b, ln, sin_cos);
            let (r0, r1) = normal_pair(a, b);
            pair_err = pair_err.max(rel(f0, r0)).max(rel(f1, r1));
        }
        // ...the ends of t's range, and the doubles around every kπ/4: zeros of sine or cosine
        // (k even), where the reduction's error would show, and the switches of quadrant (k odd).
        for i in 0..100_000u64 {
            sin_cos_at(std::f64::consts::TAU * unit_open(i << 11));
            sin_cos_at(std::f64::consts::TAU * unit_open(u64::MAX - (i << 11)));
        }
        for k in 1..=8 {
            let t = k as f64 * std::f64::consts::FRAC_PI_4;
            for i in -100_000..100_000i64 {
                sin_cos_at(f64::from_bits(t.to_bits().wrapping_add_signed(i)));
            }
        }
        let mut ln_at = |u: f64| ln_err = ln_err.max(rel(ln(u), u.ln()));
        // The logarithm's uniforms, random, next to 1 (ln u → 0) and around √2·2^e, where the
        // normalisation switches, in every binade of [2^-54, 1).
        for i in 0..4_000_000 {
            ln_at(unit_open(at(0x1A, i)));
        }
        for i in 0..100_000u64 {
            ln_at(unit_open(u64::MAX - (i << 11)));
        }
        for e in -54..0 {
            let switch = std::f64::consts::SQRT_2 * 2f64.powi(e);
            for i in -1000..1000i64 {
                ln_at(f64::from_bits(switch.to_bits().wrapping_add_signed(i)));
            }
        }
        // Two errors of 1 ulp each side at most, and center_block's budget for the product.
        let ulp = f64::EPSILON;
        assert!(ln_err <= 2.0 * ulp && sin_err <= 2.0 * ulp && cos_err <= 2.0 * ulp, "ln {ln_err:e}, sin {sin_err:e}, cos {cos_err:e}");
        assert!(pair_err <= 2f64.powi(-49), "{pair_err:e}");
        assert!(FAST_REL_ERR >= 2f64.powi(9 - 49));
    }

    #[test]
    fn round_if_sure_vouches_only_for_values_away_from_every_rounding_boundary() {
        // Half the gap to the next f32 away from zero.
        let half_ulp = |v: f32| (f32::from_bits(v.to_bits() + 1) as f64 - v as f64).abs() / 2.0;
        for v in [1.0f32, 0.3, -7.5e-3, 1e-38, f32::from_bits(1), f32::MAX / 2.0] {
            let mid = v as f64 + half_ulp(v) * v.signum() as f64;
            assert!(!round_if_sure(mid).1, "{v:e}");
            // Ties and near-ties, on both sides, and well clear of them.
            for off in [1e-3, 1e-6] {
                assert!(!round_if_sure(mid * (1.0 + off * FAST_REL_ERR)).1, "{v:e}");
                assert!(!round_if_sure(mid * (1.0 - off * FAST_REL_ERR)).1, "{v:e}");
            }
            assert_eq!(round_if_sure(v as f64), (v, true));
            assert_eq!(round_if_sure(mid * (1.0 - 4.0 * FAST_REL_ERR)), (v, true), "{v:e}");
        }
        // The overflow threshold, f32::MAX + half an ulp, and past it; zeros keep their sign.
        assert!(!round_if_sure(f32::MAX as f64 + 2f64.powi(103)).1);
        assert_eq!(round_if_sure(-2.0 * f32::MAX as f64), (f32::NEG_INFINITY, true));
        let (zero, sure) = round_if_sure(-1e-300);
        assert!(sure && zero.to_bits() == (-0.0f32).to_bits());
    }

    /// Draws (a, b) where the fast path's own product rounds to another f32 than libm's: aimed at
    /// f32 rounding boundaries, u chosen so that r·cos θ (even `trial`) or r·sin θ (odd) is a
    /// midpoint between two f32s, then the neighbouring uniforms searched.
    fn pairs_the_fast_path_rounds_otherwise(trials: u64) -> Vec<(u64, u64, usize)> {
        let mut found = Vec::new();
        for trial in 0..trials {
            let side = (trial % 2) as usize;
            let b = at(0xB0D, trial);
            let t = std::f64::consts::TAU * unit_open(b);
            let trig = if side == 0 { t.cos() } else { t.sin() };
            let z = [normal_pair(at(0xA0D, trial), b).0, normal_pair(at(0xA0D, trial), b).1][side];
            let v = z as f32;
            let step = (f32::from_bits(v.to_bits() + 1) as f64 - v as f64).abs() / 2.0;
            let mid = if (z - v as f64).abs() < 1e-300 { v as f64 + step * z.signum() } else { v as f64 + step * (z - v as f64).signum() };
            let r = mid / trig;
            let u = (-r * r / 2.0).exp();
            let k = (u * (1u64 << 53) as f64 - 0.5) as i64;
            for a in (k - 16..=k + 16).filter(|&k| (0..1 << 53).contains(&k)).map(|k| (k as u64) << 11) {
                let fast = box_muller(a, b, ln, sin_cos);
                let want = reference_pair(a, b, 1.0);
                if ([fast.0, fast.1][side] as f32).to_bits() != [want.0, want.1][side].to_bits() {
                    found.push((a, b, side));
                }
            }
        }
        found
    }

    #[test]
    fn blocks_near_rounding_boundaries_take_the_definitions_values() {
        let found = pairs_the_fast_path_rounds_otherwise(4000);
        assert!(found.len() >= 5, "only {} pairs where the fast product rounds otherwise", found.len());
        for (i, &(a, b, side)) in found.iter().enumerate() {
            let lane = i % LANES;
            let mut la: [u64; LANES] = std::array::from_fn(|j| at(0x1A9E, (i * LANES + j) as u64));
            let mut lb: [u64; LANES] = std::array::from_fn(|j| at(0x1B9E, (i * LANES + j) as u64));
            la[lane] = a;
            lb[lane] = b;
            let got = center_block(&la, &lb, 1.0);
            for j in 0..LANES {
                let want = reference_pair(la[j], lb[j], 1.0);
                assert_eq!((got[2 * j].to_bits(), got[2 * j + 1].to_bits()), (want.0.to_bits(), want.1.to_bits()), "pair {i} ({a:#x}, {b:#x}, side {side}), lane {j}");
            }
        }
    }
}
