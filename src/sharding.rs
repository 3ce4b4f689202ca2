//! Which classes a shard owns (SPEC §1.1) and which of them it samples at a step (SPEC §1.3).

use crate::error::{try_reserve, try_zeroed, Result};
use crate::rng;

/// The contiguous block of global class ids `[start, start + len)` owned by one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardRange {
    pub rank: usize,
    pub start: u64,
    pub len: u64,
}

impl ShardRange {
    pub fn of(num_classes: u64, world_size: usize, rank: usize) -> Self {
        let s = world_size as u64;
        let r = rank as u64;
        let base = num_classes / s;
        let rem = num_classes % s;
        ShardRange { rank, start: base * r + r.min(rem), len: base + u64::from(r < rem) }
    }

    pub fn contains(&self, class: u64) -> bool {
        class >= self.start && class < self.start + self.len
    }
}

/// `k_r = floor(sample_rate · n_r)` as the reference computes it from a Python float: the rate is
/// taken as the decimal the user wrote (the shortest one that rounds to this f32), so 0.7 of 10
/// classes is 7, not the 6 that the f32 0.699999988 would give.
pub fn sample_count(sample_rate: f32, shard_len: u64) -> u64 {
    if sample_rate >= 1.0 {
        return shard_len;
    }
    let rate: f64 = sample_rate.to_string().parse().expect("a finite f32 prints as a decimal");
    (rate * shard_len as f64).floor() as u64
}

/// The sampling key of a class at a step: uniform, independent across classes, steps and seeds.
#[inline(always)]
pub fn sample_key(seed: u64, step: u64, class: u64) -> u64 {
    rng::at(rng::stream(seed, rng::PURPOSE_SAMPLING, step), class)
}

/// The sorted local indices a shard uses at `step`: its positives plus, when `k ≥ |P|`,
/// `k − |P|` negatives, those with the largest keys (ties by smaller class id). `labels` is the
/// global batch; labels outside the shard are ignored. Pure in (seed, step, class ids, labels).
/// Its buffers grow with the shard: exhausted memory is `OutOfMemory`, not an abort.
pub fn sample(range: ShardRange, sample_rate: f32, seed: u64, step: u64, labels: &[i64]) -> Result<Vec<u32>> {
    let n = range.len as usize;
    let k = sample_count(sample_rate, range.len) as usize;
    if k >= n {
        return collect_exact(0..n as u32, n);
    }
    let mut positive = try_zeroed::<bool>(n, "the sampler's positive flags")?;
    let mut positives = 0usize;
    for &label in labels {
        let class = label as u64;
        if range.contains(class) {
            let local = (class - range.start) as usize;
            if !positive[local] {
                positive[local] = true;
                positives += 1;
            }
        }
    }
    let positives_in_order = (0..n as u32).filter(|&j| positive[j as usize]);
    if k <= positives {
        return collect_exact(positives_in_order, positives);
    }
    let wanted = k - positives;
    // The largest keys of uniform u64s lie above a threshold that `wanted` + 8σ of them pass:
    // keeping only those keeps every chosen negative (all keys ≥ the threshold are kept, ties
    // included), unless fewer than `wanted` passed, then all are kept. At C = 1M, r = 0.1 that
    // is 16 MB per step less to write and page in.
    let candidates = n - positives;
    let expected = wanted as f64 + 8.0 * (wanted as f64).sqrt() + 64.0;
    let threshold = if expected >= candidates as f64 { 0 } else { ((1.0 - expected / candidates as f64) * u64::MAX as f64) as u64 };
    let base = rng::stream(seed, rng::PURPOSE_SAMPLING, step);
    let mut keyed = negatives_from(range, base, threshold, &positive, expected as usize)?;
    if keyed.len() < wanted {
        keyed = negatives_from(range, base, 0, &positive, candidates)?;
    }
    // Order: larger key first, then smaller class id; the first `wanted` are the negatives. The
    // `wanted`-th is found on a copy, and `keyed`, in class order, keeps those up to it: no sort.
    let order = |a: &(u64, u32), b: &(u64, u32)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
    if wanted < keyed.len() {
        let mut copy = Vec::new();
        try_reserve(&mut copy, keyed.len(), "the sampler's keys")?;
        copy.extend_from_slice(&keyed);
        let (_, &mut last, _) = copy.select_nth_unstable_by(wanted - 1, order);
        keyed.retain(|e| order(e, &last).is_le());
    }
    merge_ascending(positives_in_order, keyed.into_iter().map(|(_, j)| j), k)
}

/// `values` (`len` of them) in a vector whose allocation may fail.
fn collect_exact(values: impl Iterator<Item = u32>, len: usize) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    try_reserve(&mut out, len, "the sampled classes")?;
    out.extend(values);
    Ok(out)
}

/// (key, local class) of the shard's non-positive classes whose keys are at least `threshold`,
/// in class order; `capacity` is the count expected. The keys come a chunk at a time from a
/// vectorized loop, and are kept without a branch on each (a random tenth of them pass, which
/// would mispredict often): every key is stored, and the length advances past those kept.
fn negatives_from(range: ShardRange, base: u64, threshold: u64, positive: &[bool], capacity: usize) -> Result<Vec<(u64, u32)>> {
    const CHUNK: usize = 4096;
    let n = range.len as usize;
    let mut keys = [0u64; CHUNK];
    let mut kept = try_zeroed::<(u64, u32)>(capacity.min(n) + CHUNK, "the sampler's keys")?;
    let mut len = 0;
    for first in (0..n).step_by(CHUNK) {
        let chunk = &mut keys[..CHUNK.min(n - first)];
        rng::fill_at(base, range.start + first as u64, chunk);
        if kept.len() < len + chunk.len() {
            let grow = kept.len() + chunk.len();
            try_reserve(&mut kept, grow, "the sampler's keys")?;
            kept.resize(2 * kept.len() + chunk.len(), (0, 0));
        }
        for (i, &key) in chunk.iter().enumerate() {
            kept[len] = (key, (first + i) as u32);
            len += (key >= threshold) as usize;
        }
    }
    kept.truncate(len);
    // Positives are at most the batch: fewer than the keys that pass.
    kept.retain(|&(_, j)| !positive[j as usize]);
    Ok(kept)
}

/// The union of two ascending sequences of distinct values, in ascending order.
fn merge_ascending(a: impl Iterator<Item = u32>, b: impl Iterator<Item = u32>, len: usize) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    try_reserve(&mut out, len, "the sampled classes")?;
    let (mut a, mut b) = (a.peekable(), b.peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(&x), Some(&y)) if x < y => a.next(),
            (Some(_), Some(_)) | (None, Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, None) => return Ok(out),
        };
        out.extend(next);
    }
}

/// The local pieces of global classes `[first, first + count)`, which must lie within `ranges`:
/// (shard, first row in it, rows, offset of the piece in the caller's buffer in rows).
pub fn pieces(ranges: &[ShardRange], first: u64, count: u64) -> Vec<(usize, usize, usize, usize)> {
    let mut out = Vec::new();
    let mut class = first;
    let end = first + count;
    while class < end {
        let s = ranges.partition_point(|r| r.start + r.len <= class);
        let row = (class - ranges[s].start) as usize;
        let rows = (ranges[s].len - row as u64).min(end - class) as usize;
        out.push((s, row, rows, (class - first) as usize));
        class += rows as u64;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_covers_all_classes_contiguously() {
        for &(c, s) in &[(10u64, 3usize), (1001, 2), (997, 3), (5, 5), (1_000_003, 8)] {
            let mut next = 0;
            for r in 0..s {
                let range = ShardRange::of(c, s, r);
                assert_eq!(range.start, next);
                assert!(range.len == c / s as u64 || range.len == c / s as u64 + 1);
                next += range.len;
            }
            assert_eq!(next, c);
        }
    }

    #[test]
    fn sample_count_follows_the_decimal_rate() {
        assert_eq!(sample_count(0.7, 10), 7);
        assert_eq!(sample_count(0.9, 10), 9);
        assert_eq!(sample_count(0.35, 20), 7);
        assert_eq!(sample_count(0.1, 1_000_000), 100_000);
        assert_eq!(sample_count(0.1, 9), 0);
        assert_eq!(sample_count(1.0, 9), 9);
    }

    #[test]
    fn sample_key_matches_the_documented_formula() {
        // Pinned values: the CUDA kernel must reproduce these bits.
        assert_eq!(sample_key(0, 0, 0), rng::at(rng::stream(0, 1, 0), 0));
        assert_ne!(sample_key(1, 0, 0), sample_key(0, 0, 0));
        assert_ne!(sample_key(0, 1, 0), sample_key(0, 0, 0));
    }
}
