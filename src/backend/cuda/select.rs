//! The host side of GPU sampling (kernels/sampling.cu): the radix select that finds the k-th
//! largest 64-bit key from per-byte histograms, and the block offsets of the stable compaction. Pure
//! functions, so the selection logic is tested here against src/sharding.rs without a GPU.

/// `(threshold, take_equal)`: the k-th largest key, and how many keys equal to it belong to the k
/// largest (the smallest class ids among them). `histogram(prefix, mask, shift)` counts, among keys
/// with `key & mask == prefix`, each value of the byte at `shift`.
pub fn kth_largest<E>(k: u64, mut histogram: impl FnMut(u64, u64, i32) -> Result<Vec<u32>, E>) -> Result<(u64, u32), E> {
    let (mut prefix, mut mask, mut remaining) = (0u64, 0u64, k);
    for pass in 0..8 {
        let shift = 56 - 8 * pass;
        let counts = histogram(prefix, mask, shift)?;
        // From the top byte value down, skip whole bins while they hold fewer than the keys still wanted.
        let mut bin = 255usize;
        while bin > 0 && (counts[bin] as u64) < remaining {
            remaining -= counts[bin] as u64;
            bin -= 1;
        }
        prefix |= (bin as u64) << shift;
        mask |= 0xFFu64 << shift;
    }
    Ok((prefix, remaining as u32))
}

/// Exclusive prefix sums over blocks of the selected keys and of the keys equal to the threshold,
/// given each block's counts above and equal to it; and the total selected.
pub fn compaction_offsets(above: &[u32], equal: &[u32], take_equal: u32) -> (Vec<u32>, Vec<u32>, u32) {
    let (mut sel_before, mut eq_before) = (Vec::with_capacity(above.len()), Vec::with_capacity(above.len()));
    let (mut sel, mut eq) = (0u32, 0u32);
    for (&a, &e) in above.iter().zip(equal) {
        sel_before.push(sel);
        eq_before.push(eq);
        sel += a + (eq + e).min(take_equal) - eq.min(take_equal);
        eq += e;
    }
    (sel_before, eq_before, sel)
}

/// The compaction kernel writes `total` ids into a buffer of `k`: anything but equality (a
/// histogram or count read back wrong) is refused before it runs, in release builds too.
pub fn check_selected(total: u32, k: usize) -> crate::error::Result<()> {
    if total as usize == k {
        return Ok(());
    }
    Err(crate::error::Error::new(
        crate::error::Status::Device,
        format!("GPU sampling selected {total} classes where {k} were wanted; nothing was written (a device read-back was wrong)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng;
    use crate::sharding::{sample, sample_count, ShardRange};

    /// What `radix_histogram` computes.
    fn histogram(keys: &[u64], prefix: u64, mask: u64, shift: i32) -> Result<Vec<u32>, ()> {
        let mut h = vec![0u32; 256];
        for &k in keys.iter().filter(|&&k| k & mask == prefix) {
            h[((k >> shift) & 0xFF) as usize] += 1;
        }
        Ok(h)
    }

    /// What `count_selected` and `compact_selected` compute, block by block of `block` keys.
    fn compact(keys: &[u64], threshold: u64, take_equal: u32, block: usize) -> Vec<u32> {
        let blocks: Vec<&[u64]> = keys.chunks(block).collect();
        let above: Vec<u32> = blocks.iter().map(|b| b.iter().filter(|&&k| k > threshold).count() as u32).collect();
        let equal: Vec<u32> = blocks.iter().map(|b| b.iter().filter(|&&k| k == threshold).count() as u32).collect();
        let (sel_before, eq_before, total) = compaction_offsets(&above, &equal, take_equal);
        let mut out = vec![u32::MAX; total as usize];
        for (b, chunk) in blocks.iter().enumerate() {
            let (mut eq_rank, mut pos) = (eq_before[b], sel_before[b]);
            for (i, &k) in chunk.iter().enumerate() {
                let eq = k == threshold;
                let sel = k > threshold || (eq && eq_rank < take_equal);
                if eq {
                    eq_rank += 1;
                }
                if sel {
                    out[pos as usize] = (b * block + i) as u32;
                    pos += 1;
                }
            }
        }
        out
    }

    /// The GPU path end to end on the host: keys, select, compaction.
    fn gpu_sample(range: ShardRange, rate: f32, seed: u64, step: u64, labels: &[i64]) -> Vec<u32> {
        let n = range.len as usize;
        let want = sample_count(rate, range.len) as usize;
        if want >= n {
            return (0..n as u32).collect();
        }
        let base = rng::stream(seed, rng::PURPOSE_SAMPLING, step);
        let mut keys: Vec<u64> = (0..range.len).map(|j| rng::at(base, range.start + j)).collect();
        for &l in labels {
            if range.contains(l as u64) {
                keys[(l as u64 - range.start) as usize] = u64::MAX;
            }
        }
        let positives = keys.iter().filter(|&&k| k == u64::MAX).count();
        let k = want.max(positives) as u64;
        let (threshold, take_equal) = kth_largest(k, |p, m, s| histogram(&keys, p, m, s)).unwrap();
        compact(&keys, threshold, take_equal, 1024)
    }

    #[test]
    fn a_selected_count_other_than_k_is_an_error_before_compaction() {
        let keys: Vec<u64> = (0..5000u64).map(rng::mix64).collect();
        let (threshold, take_equal) = kth_largest(700, |p, m, s| histogram(&keys, p, m, s)).unwrap();
        let blocks: Vec<&[u64]> = keys.chunks(1024).collect();
        let mut above: Vec<u32> = blocks.iter().map(|b| b.iter().filter(|&&k| k > threshold).count() as u32).collect();
        let equal: Vec<u32> = blocks.iter().map(|b| b.iter().filter(|&&k| k == threshold).count() as u32).collect();
        assert!(check_selected(compaction_offsets(&above, &equal, take_equal).2, 700).is_ok());
        // One block's count read back one too high: the kernel would write past the buffer.
        above[2] += 1;
        let e = check_selected(compaction_offsets(&above, &equal, take_equal).2, 700).unwrap_err();
        assert_eq!(e.status, crate::error::Status::Device);
        assert!(e.message.contains("701") && e.message.contains("700"), "{}", e.message);
    }

    #[test]
    fn gpu_selection_picks_the_cpu_set() {
        let mut state = 0x5EEDu64;
        for case in 0..300u64 {
            state = rng::mix64(state + case);
            let classes = 1 + state % 5000;
            let shards = 1 + (state >> 20) as usize % 4;
            let rate = [0.001f32, 0.05, 0.1, 0.3, 0.7, 1.0][(state >> 30) as usize % 6];
            let labels: Vec<i64> = (0..(state >> 40) % 300).map(|i| (rng::mix64(state ^ i) % classes) as i64).collect();
            for r in 0..shards.min(classes as usize) {
                let range = ShardRange::of(classes, shards, r);
                let cpu = sample(range, rate, case, case * 7, &labels).unwrap();
                assert_eq!(gpu_sample(range, rate, case, case * 7, &labels), cpu, "case {case} shard {r}");
            }
        }
    }

    #[test]
    fn ties_at_the_threshold_go_to_the_smallest_ids_across_blocks() {
        // 3000 keys in five values, so the k-th largest sits in a run of equal keys spanning blocks.
        let keys: Vec<u64> = (0..3000u64).map(|i| (rng::mix64(i) % 5) << 40 | 7).collect();
        for k in [1u64, 17, 599, 600, 1200, 1201, 2999, 3000] {
            let (threshold, take_equal) = kth_largest(k, |p, m, s| histogram(&keys, p, m, s)).unwrap();
            let got = compact(&keys, threshold, take_equal, 1024);
            let mut order: Vec<u32> = (0..3000).collect();
            order.sort_by(|&a, &b| keys[b as usize].cmp(&keys[a as usize]).then(a.cmp(&b)));
            let mut want = order[..k as usize].to_vec();
            want.sort_unstable();
            assert_eq!(got, want, "k = {k}");
        }
    }
}
