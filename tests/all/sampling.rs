//! PartialFC sampling (SPEC §1.3) and the sparse update it drives (SPEC §1.9).
//!
//! The pure sampler (`partialfc::sharding::sample`) is checked for its contract (positives, size,
//! order), for the statistics of its negatives (uniform, independent across steps, seeds and shards;
//! each statistic is also shown to reject a deliberately wrong sampler, so it can fail), and for
//! reproducibility. Then heads driven through the C ABI are checked to change exactly the sampled
//! rows, and only their optimizer state.

use crate::common::*;
use partialfc::ffi::*;
use partialfc::sharding::{sample, sample_count, sample_key, ShardRange};
use std::collections::BTreeSet;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The distinct local indices of `labels` that fall in `range`, sorted.
fn positives(range: ShardRange, labels: &[i64]) -> Vec<u32> {
    let set: BTreeSet<u32> = labels
        .iter()
        .filter(|&&l| range.contains(l as u64))
        .map(|&l| (l as u64 - range.start) as u32)
        .collect();
    set.into_iter().collect()
}

/// The set SPEC §1.3 describes, built the slow obvious way from the documented key: positives,
/// plus the `k − |P|` non-positives with the largest `sample_key` (ties by smaller class id).
fn reference_sample(range: ShardRange, rate: f32, seed: u64, step: u64, labels: &[i64]) -> Vec<u32> {
    let n = range.len;
    let k = sample_count(rate, n);
    if k >= n {
        return (0..n as u32).collect();
    }
    let pos = positives(range, labels);
    let mut out: BTreeSet<u32> = pos.iter().copied().collect();
    if k as usize > pos.len() {
        let mut keyed: Vec<(u64, u32)> = (0..n as u32)
            .filter(|j| !out.contains(j))
            .map(|j| (sample_key(seed, step, range.start + j as u64), j))
            .collect();
        keyed.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        out.extend(keyed[..k as usize - pos.len()].iter().map(|&(_, j)| j));
    }
    out.into_iter().collect()
}

/// One-sided 1e-6 upper quantile of χ²(df), by the Wilson–Hilferty approximation (accurate to a
/// fraction of a percent at these df; the plain normal approximation df + z·√(2df) is lower).
fn chi2_bound(df: f64) -> f64 {
    const Z: f64 = 4.753_424; // Φ⁻¹(1 − 1e-6)
    let a = 2.0 / (9.0 * df);
    df * (1.0 - a + Z * a.sqrt()).powi(3)
}

/// Pearson statistic of per-class inclusion counts against uniform inclusion, `per_step` of
/// `classes` candidates chosen in each of `steps` draws. Each count is Binomial(steps, p), so the
/// variance `E·(1 − p)` is the denominator; the counts sum to a constant, hence df = classes − 1.
fn uniformity_statistic(counts: &[u64], per_step: usize, steps: usize) -> (f64, f64) {
    let classes = counts.len();
    let p = per_step as f64 / classes as f64;
    let e = steps as f64 * p;
    assert_eq!(counts.iter().sum::<u64>(), (per_step * steps) as u64, "each draw must pick exactly {per_step}");
    let stat = counts.iter().map(|&o| (o as f64 - e).powi(2) / (e * (1.0 - p))).sum();
    (stat, chi2_bound(classes as f64 - 1.0))
}

/// Mean and variance of the overlap of two independent uniform subsets of sizes `a` and `b` of `n`.
fn hypergeometric(n: usize, a: usize, b: usize) -> (f64, f64) {
    let (n, a, b) = (n as f64, a as f64, b as f64);
    let mean = a * b / n;
    let var = b * (a / n) * ((n - a) / n) * ((n - b) / (n - 1.0));
    (mean, var)
}

/// Asserts (or, with `expect_pass = false`, reports) that the overlaps look like those of
/// independent uniform sets: mean within 5 standard errors, variance within a factor 1.25.
fn overlaps_look_independent(overlaps: &[usize], n: usize, a: usize, b: usize) -> Result<(), String> {
    let (mean, var) = hypergeometric(n, a, b);
    let m = overlaps.len() as f64;
    let got_mean = overlaps.iter().sum::<usize>() as f64 / m;
    let got_var = overlaps.iter().map(|&o| (o as f64 - got_mean).powi(2)).sum::<f64>() / (m - 1.0);
    let se = (var / m).sqrt();
    if (got_mean - mean).abs() > 5.0 * se {
        return Err(format!("mean overlap {got_mean:.4}, independent sets give {mean:.4} ± {se:.4}"));
    }
    if !(got_var / var > 0.8 && got_var / var < 1.25) {
        return Err(format!("overlap variance {got_var:.4}, independent sets give {var:.4}"));
    }
    Ok(())
}

fn overlap(a: &[u32], b: &[u32]) -> usize {
    // Both sorted.
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

fn minus(a: &[u32], b: &[u32]) -> Vec<u32> {
    a.iter().copied().filter(|x| b.binary_search(x).is_err()).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. The contract of one sampled set
// ---------------------------------------------------------------------------------------------

#[test]
fn sampled_set_holds_every_positive_sorted_unique_with_the_documented_size() {
    let mut rng = Rng(0x5eed_0001);
    let rates = [0.0005f32, 0.003, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.77, 0.999, 1.0];
    let (mut fewer, mut equal, mut more, mut all) = (0, 0, 0, 0);
    for case in 0..400 {
        let c = 1 + rng.below(if case % 4 == 0 { 40 } else { 3000 });
        let s = 1 + rng.below(8.min(c)) as usize;
        let rate = if case % 3 == 0 { (rng.uniform() as f32).max(1e-4) } else { rates[rng.below(rates.len() as u64) as usize] };
        let seed = rng.next_u64();
        let step = rng.below(1_000_000);
        // A batch with duplicates: labels drawn from a random pool of identities.
        let pool: Vec<i64> = (0..1 + rng.below(200)).map(|_| rng.below(c) as i64).collect();
        let labels: Vec<i64> = (0..rng.below(300)).map(|_| pool[rng.below(pool.len() as u64) as usize]).collect();
        for r in 0..s {
            let range = ShardRange::of(c, s, r);
            let n = range.len;
            let got = sample(range, rate, seed, step, &labels).unwrap();
            let pos = positives(range, &labels);
            let k = ((rate as f64) * n as f64).floor() as u64;
            let k = if rate >= 1.0 { n } else { k };
            assert_eq!(sample_count(rate, n), k, "k for rate {rate}, n {n}");
            let ctx = format!("C={c} S={s} r={r} rate={rate} k={k} |P|={} seed={seed} step={step}", pos.len());
            assert!(got.windows(2).all(|w| w[0] < w[1]), "{ctx}: not sorted and unique: {got:?}");
            assert!(got.iter().all(|&j| (j as u64) < n), "{ctx}: index outside [0, {n})");
            for p in &pos {
                assert!(got.binary_search(p).is_ok(), "{ctx}: positive {p} missing");
            }
            assert_eq!(got.len() as u64, k.max(pos.len() as u64), "{ctx}: size");
            if (k as usize) < pos.len() {
                assert_eq!(got, pos, "{ctx}: with k < |P| the set is P alone");
            }
            assert_eq!(got, reference_sample(range, rate, seed, step, &labels), "{ctx}: not the top keys of sample_key");
            match (k as usize).cmp(&pos.len()) {
                _ if k == n => all += 1,
                std::cmp::Ordering::Less => fewer += 1,
                std::cmp::Ordering::Equal => equal += 1,
                std::cmp::Ordering::Greater => more += 1,
            }
        }
    }
    // The random cases must have exercised every branch.
    assert!(fewer > 20 && equal > 0 && more > 100 && all > 20, "k<|P| {fewer}, k=|P| {equal}, k>|P| {more}, all {all}");
}

#[test]
fn positives_from_a_batch_spread_over_shards_are_found_on_their_owner() {
    // Uneven partition: C = 1001 over 4 shards; every label lands on exactly one shard's set.
    let (c, s) = (1001u64, 4usize);
    let labels: Vec<i64> = vec![0, 250, 251, 500, 501, 750, 751, 1000, 1000, 0, 249];
    let mut seen = BTreeSet::new();
    for r in 0..s {
        let range = ShardRange::of(c, s, r);
        for j in sample(range, 0.01, 9, 3, &labels).unwrap() {
            seen.insert(range.start + j as u64);
        }
    }
    for &l in &labels {
        assert!(seen.contains(&(l as u64)), "label {l} not sampled on its shard");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Negatives are uniform and independent across steps
// ---------------------------------------------------------------------------------------------

const UNI_STEPS: usize = 2000;

/// Inclusion counts of each non-positive class over `UNI_STEPS` draws by `draw(t)` (local ids).
fn negative_counts(n: usize, pos: &[u32], mut draw: impl FnMut(u64) -> Vec<u32>) -> (Vec<u64>, Vec<Vec<u32>>) {
    let mut counts = vec![0u64; n];
    let mut sets = Vec::with_capacity(UNI_STEPS);
    for t in 0..UNI_STEPS as u64 {
        let got = draw(t);
        let neg = minus(&got, pos);
        assert_eq!(neg.len() + pos.len(), got.len(), "positives must all be present");
        for &j in &neg {
            counts[j as usize] += 1;
        }
        sets.push(neg);
    }
    let non_pos: Vec<u64> = (0..n).filter(|j| pos.binary_search(&(*j as u32)).is_err()).map(|j| counts[j]).collect();
    (non_pos, sets)
}

/// The uniform-negatives check on one shard: the χ² bound holds and consecutive steps overlap like
/// independent draws.
fn check_uniform_on(range: ShardRange, labels: &[i64], seed: u64) {
    let rate = 0.1f32;
    let n = range.len as usize;
    let k = sample_count(rate, range.len) as usize;
    let pos = positives(range, labels);
    assert!(k > pos.len());
    let wanted = k - pos.len();
    let (counts, sets) = negative_counts(n, &pos, |t| sample(range, rate, seed, t, labels).unwrap());
    let (stat, bound) = uniformity_statistic(&counts, wanted, UNI_STEPS);
    eprintln!("shard {range:?}: χ² {stat:.1} (bound {bound:.1})");
    assert!(stat < bound, "shard {range:?}: χ² {stat:.1} ≥ 1e-6 bound {bound:.1} (df {})", counts.len() - 1);
    // The statistic is not degenerate either: a sampler that is too even is as wrong as a biased one.
    assert!(stat > (counts.len() as f64) * 0.5, "shard {range:?}: χ² {stat:.1} implausibly small");
    let pool = n - pos.len();
    for lag in [1usize, 2, 3, 17, 256, 1024] {
        let ov: Vec<usize> = (lag..sets.len()).map(|t| overlap(&sets[t], &sets[t - lag])).collect();
        overlaps_look_independent(&ov, pool, wanted, wanted).unwrap_or_else(|e| panic!("shard {range:?}, steps t and t−{lag}: {e}"));
    }
}

#[test]
fn negatives_are_uniform_over_steps() {
    // One shard of 200 classes, five fixed positives, 15 negatives out of 195 per step.
    let labels = [3i64, 50, 51, 120, 199, 50, 3];
    check_uniform_on(ShardRange::of(200, 1, 0), &labels, 12345);
    // The middle shard of three (global ids 200..400): keys must be taken at global ids and the
    // shard offset must not bias anything; labels of other shards are ignored.
    let labels = [203i64, 250, 251, 320, 399, 0, 17, 450, 599];
    check_uniform_on(ShardRange::of(600, 3, 1), &labels, 777);
}

#[test]
fn negatives_are_uniform_over_seeds_and_independent_between_seeds() {
    let range = ShardRange::of(200, 1, 0);
    let labels = [7i64, 8, 9];
    let pos = positives(range, &labels);
    let wanted = sample_count(0.1, 200) as usize - pos.len();
    let (counts, sets) = negative_counts(200, &pos, |t| sample(range, 0.1, 1000 + t, 42, &labels).unwrap());
    let (stat, bound) = uniformity_statistic(&counts, wanted, UNI_STEPS);
    eprintln!("over seeds: χ² {stat:.1} (bound {bound:.1})");
    assert!(stat < bound, "over seeds: χ² {stat:.1} ≥ {bound:.1}");
    let ov: Vec<usize> = (1..sets.len()).map(|t| overlap(&sets[t], &sets[t - 1])).collect();
    overlaps_look_independent(&ov, 200 - pos.len(), wanted, wanted).unwrap_or_else(|e| panic!("adjacent seeds: {e}"));
}

/// The statistics above must be able to fail: samplers with the kind of defect a real
/// implementation could have are rejected by the very same checks.
#[test]
fn the_uniformity_and_independence_checks_reject_biased_samplers() {
    let range = ShardRange::of(200, 1, 0);
    let labels = [3i64, 50, 51, 120, 199];
    let pos = positives(range, &labels);
    let n = 200usize;
    let wanted = sample_count(0.1, 200) as usize - pos.len();
    let seed = 12345u64;
    let negatives: Vec<u32> = (0..n as u32).filter(|j| pos.binary_search(j).is_err()).collect();
    let top = |mut keyed: Vec<(f64, u32)>| -> Vec<u32> {
        keyed.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        let mut out: Vec<u32> = pos.clone();
        out.extend(keyed[..wanted].iter().map(|&(_, j)| j));
        out.sort_unstable();
        out
    };
    let u = |t: u64, j: u32| ((sample_key(seed, t, j as u64) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;

    // (a) Slightly prefers low class ids: weighted keys u^(1/w) with w from 1.2 down to 0.8.
    let tilted = |t: u64| {
        top(negatives
            .iter()
            .map(|&j| {
                let w = 1.0 + 0.2 * (1.0 - 2.0 * j as f64 / (n - 1) as f64);
                (u(t, j).ln() / w, j)
            })
            .collect())
    };
    // (b) Keys truncated to 5 bits with ties to the smaller id (a too-narrow radix select).
    let coarse = |t: u64| top(negatives.iter().map(|&j| ((sample_key(seed, t, j as u64) >> 59) as f64, j)).collect());
    for (name, f) in [("tilted", &tilted as &dyn Fn(u64) -> Vec<u32>), ("5-bit keys", &coarse)] {
        let (counts, _) = negative_counts(n, &pos, f);
        let (stat, bound) = uniformity_statistic(&counts, wanted, UNI_STEPS);
        eprintln!("{name}: {stat:.1} vs {bound:.1}");
        assert!(stat > bound, "{name} sampler passed the χ² check: {stat:.1} < {bound:.1}");
    }
    // The fair sampler fed the same keys passes, so the failures above are the bias's doing.
    let fair = |t: u64| top(negatives.iter().map(|&j| (u(t, j), j)).collect());
    let (counts, sets) = negative_counts(n, &pos, fair);
    let (stat, bound) = uniformity_statistic(&counts, wanted, UNI_STEPS);
    assert!(stat < bound, "fair sampler: χ² {stat:.1} ≥ {bound:.1}");
    let ov: Vec<usize> = (1..sets.len()).map(|t| overlap(&sets[t], &sets[t - 1])).collect();
    overlaps_look_independent(&ov, n - pos.len(), wanted, wanted).unwrap();

    // (c) Uniform marginals but steps not independent: the key ignores the low bit of the step,
    // so steps come in identical pairs. χ² cannot see it; the overlap check must.
    let paired = |t: u64| top(negatives.iter().map(|&j| (u(t / 2, j), j)).collect());
    let (counts, sets) = negative_counts(n, &pos, paired);
    let (stat, bound) = uniformity_statistic(&counts, wanted, UNI_STEPS);
    assert!(stat < 2.0 * bound, "paired sampler has roughly uniform marginals: {stat:.1}");
    let ov: Vec<usize> = (1..sets.len()).map(|t| overlap(&sets[t], &sets[t - 1])).collect();
    assert!(overlaps_look_independent(&ov, n - pos.len(), wanted, wanted).is_err(), "paired steps passed the independence check");
    // (d) A key that drifts slowly with the step (key = hash(class) + step·δ, a "rotating" pattern).
    let drifting = |t: u64| top(negatives.iter().map(|&j| ((u(0, j) + t as f64 * 0.003).fract(), j)).collect());
    let (_, sets) = negative_counts(n, &pos, drifting);
    let ov: Vec<usize> = (1..sets.len()).map(|t| overlap(&sets[t], &sets[t - 1])).collect();
    assert!(overlaps_look_independent(&ov, n - pos.len(), wanted, wanted).is_err(), "drifting keys passed the independence check");
}

// ---------------------------------------------------------------------------------------------
// 3. Shards draw independent negatives
// ---------------------------------------------------------------------------------------------

#[test]
fn shards_of_equal_size_draw_independent_local_patterns() {
    let (c, s, rate, seed) = (600u64, 3usize, 0.1f32, 2024u64);
    let ranges: Vec<ShardRange> = (0..s).map(|r| ShardRange::of(c, s, r)).collect();
    assert!(ranges.iter().all(|r| r.len == 200));
    let k = sample_count(rate, 200) as usize;
    let steps = 1000u64;
    let sets: Vec<Vec<Vec<u32>>> = ranges.iter().map(|&range| (0..steps).map(|t| sample(range, rate, seed, t, &[]).unwrap()).collect()).collect();
    for (a, b) in [(0, 1), (1, 2), (0, 2)] {
        let ov: Vec<usize> = (0..steps as usize).map(|t| overlap(&sets[a][t], &sets[b][t])).collect();
        overlaps_look_independent(&ov, 200, k, k).unwrap_or_else(|e| panic!("shards {a} and {b} at the same step: {e}"));
        assert!(ov.iter().all(|&o| o < k), "shards {a} and {b} drew the same local pattern at some step");
    }
    // What the reference does (every rank seeded alike, i.e. keys by local index) fails the check.
    let local_keys = |range: ShardRange, t: u64| {
        let shifted = ShardRange { start: 0, ..range };
        sample(shifted, rate, seed, t, &[]).unwrap()
    };
    let ov: Vec<usize> = (0..steps).map(|t| overlap(&local_keys(ranges[0], t), &local_keys(ranges[1], t))).collect();
    assert!(overlaps_look_independent(&ov, 200, k, k).is_err());
    // Uneven shards too (C = 601 over 3): patterns of the shared first 200 local ids are independent.
    let (r0, r2) = (ShardRange::of(601, 3, 0), ShardRange::of(601, 3, 2));
    assert_eq!((r0.len, r2.len), (201, 200));
    let (k0, k2) = (sample_count(rate, 201) as usize, sample_count(rate, 200) as usize);
    let ov: Vec<usize> = (0..steps).map(|t| overlap(&sample(r0, rate, seed, t, &[]).unwrap(), &sample(r2, rate, seed, t, &[]).unwrap())).collect();
    // Overlap within [0, 200) of a k0-of-201 set and a k2-of-200 set: close to the hypergeometric
    // figure on 201 classes (the extra class shifts the mean by ~0.5%).
    overlaps_look_independent(&ov, 201, k0, k2).unwrap_or_else(|e| panic!("uneven shards: {e}"));
}

// ---------------------------------------------------------------------------------------------
// 4. Reproducible, and a function of the label *set*
// ---------------------------------------------------------------------------------------------

#[test]
fn sampling_is_reproducible_and_depends_on_seed_step_and_the_label_set_only() {
    let mut rng = Rng(0x5eed_0004);
    let (c, s) = (5000u64, 2usize);
    let range = ShardRange::of(c, s, 1);
    let labels: Vec<i64> = (0..64).map(|_| rng.below(c) as i64).collect();
    let rate = 0.1f32;
    for &(seed, step) in &[(0u64, 0u64), (1, 0), (0, 1), (u64::MAX, 123_456_789), (42, 7)] {
        let a = sample(range, rate, seed, step, &labels).unwrap();
        assert_eq!(a, sample(range, rate, seed, step, &labels).unwrap(), "not reproducible");
        assert_ne!(a, sample(range, rate, seed ^ 1, step, &labels).unwrap(), "seed {seed} and {} give the same set", seed ^ 1);
        assert_ne!(a, sample(range, rate, seed.wrapping_add(1 << 40), step, &labels).unwrap(), "high seed bits ignored");
        assert_ne!(a, sample(range, rate, seed, step + 1, &labels).unwrap(), "steps {step} and {} give the same set", step + 1);
        assert_ne!(a, sample(range, rate, seed, step ^ (1 << 33), &labels).unwrap(), "high step bits ignored");
        // Order, duplicates and labels of other shards do not matter.
        let mut shuffled = labels.clone();
        rng.shuffle(&mut shuffled);
        assert_eq!(a, sample(range, rate, seed, step, &shuffled).unwrap(), "depends on label order");
        let mut dup = labels.clone();
        dup.extend_from_slice(&labels[..20]);
        dup.extend_from_slice(&labels[5..9]);
        rng.shuffle(&mut dup);
        assert_eq!(a, sample(range, rate, seed, step, &dup).unwrap(), "depends on duplicates");
        let mut foreign = labels.clone();
        foreign.extend((0..100).map(|_| rng.below(range.start) as i64));
        rng.shuffle(&mut foreign);
        assert_eq!(a, sample(range, rate, seed, step, &foreign).unwrap(), "depends on labels of other shards");
        // A new positive on this shard is included and displaces exactly one negative.
        let extra = (0..range.len as u32).find(|j| a.binary_search(j).is_err()).unwrap();
        let mut more = labels.clone();
        more.push((range.start + extra as u64) as i64);
        let b = sample(range, rate, seed, step, &more).unwrap();
        assert_eq!(b.len(), a.len());
        assert_eq!(minus(&b, &a), vec![extra]);
        assert_eq!(minus(&a, &b).len(), 1);
    }
    // Keys are pure functions of their arguments and differ in each.
    assert_eq!(sample_key(5, 6, 7), sample_key(5, 6, 7));
    assert_ne!(sample_key(5, 6, 7), sample_key(5, 6, 8));
    assert_ne!(sample_key(5, 6, 7), sample_key(5, 7, 7));
    assert_ne!(sample_key(5, 6, 7), sample_key(6, 6, 7));
}

#[test]
fn the_same_class_gets_the_same_key_whatever_the_shard_layout() {
    // Keys depend on the global class id only, so a class that is a negative candidate under two
    // layouts is ranked by the same key in both: the CUDA backend and any resharded run agree.
    let (c, seed, step) = (1000u64, 99u64, 5u64);
    let one = ShardRange::of(c, 1, 0);
    let rate = 0.1f32;
    for s in [2usize, 4, 7] {
        for r in 0..s {
            let range = ShardRange::of(c, s, r);
            let got = sample(range, rate, seed, step, &[]).unwrap();
            assert_eq!(got, reference_sample(range, rate, seed, step, &[]));
        }
    }
    // With one shard the set is the 100 largest keys of all classes.
    let mut keys: Vec<(u64, u64)> = (0..c).map(|j| (sample_key(seed, step, j), j)).collect();
    keys.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut want: Vec<u32> = keys[..100].iter().map(|&(_, j)| j as u32).collect();
    want.sort_unstable();
    assert_eq!(sample(one, rate, seed, step, &[]).unwrap(), want);
}

// ---------------------------------------------------------------------------------------------
// 6. sample_count and its edges
// ---------------------------------------------------------------------------------------------

#[test]
fn sample_count_and_degenerate_rates() {
    for n in [0u64, 1, 2, 7, 200, 1_000_003] {
        assert_eq!(sample_count(1.0, n), n);
    }
    assert_eq!(sample_count(0.1, 200), 20);
    assert_eq!(sample_count(0.1, 9), 0);
    assert_eq!(sample_count(0.1, 10), 1);
    assert_eq!(sample_count(0.25, 4), 1);
    assert_eq!(sample_count(0.5, 3), 1);
    assert_eq!(sample_count(0.999, 10), 9);
    assert_eq!(sample_count(0.001, 500), 0);
    assert_eq!(sample_count(0.1, 1_000_000), 100_000);
    assert_eq!(sample_count(0.5, 0), 0);

    // Rate 1: every class, in order, whatever the labels.
    let range = ShardRange::of(1001, 2, 1);
    let all: Vec<u32> = (0..range.len as u32).collect();
    assert_eq!(sample(range, 1.0, 3, 4, &[]).unwrap(), all);
    assert_eq!(sample(range, 1.0, 3, 4, &[600, 600, 0, 1000]).unwrap(), all);
    // k rounds up to n only at rate 1: 0.999 of 500 is 499.
    let r500 = ShardRange::of(500, 1, 0);
    assert_eq!(sample(r500, 0.999, 3, 4, &[]).unwrap().len(), 499);
    // k = 0 and no positives: nothing at all; with positives: exactly them.
    assert_eq!(sample(r500, 0.001, 3, 4, &[]).unwrap(), Vec::<u32>::new());
    let other_shard = ShardRange::of(1000, 2, 1);
    assert_eq!(sample(other_shard, 0.001, 3, 4, &[1, 2, 499]).unwrap(), Vec::<u32>::new(), "labels of shard 0 only");
    assert_eq!(sample(r500, 0.001, 3, 4, &[9, 2, 9]).unwrap(), vec![2, 9]);
    // k = |P| exactly: no negatives.
    assert_eq!(sample(ShardRange::of(30, 1, 0), 0.1, 3, 4, &[29, 0, 5]).unwrap(), vec![0, 5, 29]);
    // An empty shard (more shards than classes) samples nothing.
    let empty = ShardRange { rank: 0, start: 10, len: 0 };
    assert_eq!(sample(empty, 0.5, 1, 1, &[10]).unwrap(), Vec::<u32>::new());
    assert_eq!(sample(empty, 1.0, 1, 1, &[]).unwrap(), Vec::<u32>::new());
    // Negatives fill the whole non-positive pool when k = n − 1.
    let r10 = ShardRange::of(10, 1, 0);
    let got = sample(r10, 0.95, 1, 1, &[4]).unwrap();
    assert_eq!(got.len(), 9);
    assert!(got.contains(&4));
}

// ---------------------------------------------------------------------------------------------
// 5. Through the C ABI: exactly the sampled rows move
// ---------------------------------------------------------------------------------------------

struct AbiCase {
    name: &'static str,
    shards: u32,
    adamw: bool,
    weight_decay: f32,
}

const C: u64 = 301; // uneven over 3 shards
const D: usize = 16;
const RATE: f32 = 0.1;
const SEED: u64 = 0xC0FFEE;

fn abi_config(case: &AbiCase) -> pfc_config {
    let mut c = default_config();
    c.num_classes = C;
    c.embedding_dim = D as u32;
    c.sample_rate = RATE;
    c.seed = SEED;
    // A small scale keeps every sampled column's softmax probability far from 0, so every sampled
    // row's gradient (hence its update) is visible in f32.
    c.scale = 4.0;
    c.local_shards = case.shards;
    c.weight_decay = case.weight_decay;
    if case.adamw {
        c.optimizer = PFC_OPTIMIZER_ADAMW;
        c.lr = 1e-3;
    } else {
        c.optimizer = PFC_OPTIMIZER_SGD;
        c.lr = 0.1;
        c.momentum = 0.9;
    }
    c
}

/// The global class ids the head samples at `step` for this global batch (shard order).
fn expected_sampled(shards: u32, step: u64, labels: &[i64]) -> Vec<u64> {
    let s = shards as usize;
    let mut out = Vec::new();
    for r in 0..s {
        let range = ShardRange::of(C, s, r);
        out.extend(sample(range, RATE, SEED, step, labels).unwrap().into_iter().map(|j| range.start + j as u64));
    }
    out
}

/// Global ids of the rows whose bits differ between two center snapshots.
fn changed_rows(before: &[f32], after: &[f32]) -> Vec<u64> {
    before
        .chunks_exact(D)
        .zip(after.chunks_exact(D))
        .enumerate()
        .filter(|(_, (a, b))| a.iter().zip(b.iter()).any(|(x, y)| x.to_bits() != y.to_bits()))
        .map(|(i, _)| i as u64)
        .collect()
}

fn batch(rng: &mut Rng, n: usize, lo: u64, hi: u64) -> (Vec<f32>, Vec<i64>) {
    let emb: Vec<f32> = (0..n * D).map(|_| rng.normal() as f32).collect();
    let labels: Vec<i64> = (0..n).map(|_| (lo + rng.below(hi - lo)) as i64).collect();
    (emb, labels)
}

fn run_abi_case(case: &AbiCase) {
    let cfg = abi_config(case);
    let head = TestHead::new(&cfg);
    assert_eq!(head.local_classes(), (0, C));
    let split = even_split(24, case.shards as usize);
    let mut rng = Rng(0xAB1 ^ case.shards as u64);
    let name = case.name;

    // Three steps with different label sets, so that the sampled sets differ.
    let batches: Vec<(Vec<f32>, Vec<i64>)> = (0..3).map(|_| batch(&mut rng, 24, 0, C)).collect();
    let mut snapshots = vec![head.centers(D)];
    let mut sets = Vec::new();
    for (t, (emb, labels)) in batches.iter().enumerate() {
        if t == 1 {
            // Neither a failed step nor an evaluation advances the step index or moves a center.
            let mut bad = labels.clone();
            bad[0] = C as i64;
            let mut grad = vec![0f32; emb.len()];
            let b = pfc_batch {
                embeddings: emb.as_ptr().cast(),
                labels: bad.as_ptr(),
                grad_embeddings: grad.as_mut_ptr().cast(),
                batch_size: 24,
                dtype: PFC_DTYPE_F32,
                memory: PFC_MEMORY_HOST,
                stream: std::ptr::null_mut(),
            };
            if case.shards == 1 {
                assert_ne!(pfc_train_step(head.0, &b, 1, std::ptr::null_mut()), PFC_OK);
                let mut stats = pfc_step_stats::default();
                let good = pfc_batch { labels: labels.as_ptr(), ..b };
                ok(pfc_evaluate(head.0, &good, 1, &mut stats));
                assert_eq!(stats.sampled_classes, C, "{name}: evaluation uses every class");
                assert_eq!(head.centers(D), *snapshots.last().unwrap(), "{name}: failed step or evaluation moved centers");
            }
        }
        let (stats, _) = head.step(emb, labels, D, &split);
        let want = expected_sampled(case.shards, t as u64, labels);
        assert_eq!(stats.step, t as u64 + 1, "{name}: stats.step");
        assert_eq!(stats.sampled_classes, want.len() as u64, "{name} step {t}: sampled_classes");
        assert!(stats.loss.is_finite());
        let now = head.centers(D);
        let changed = changed_rows(snapshots.last().unwrap(), &now);
        assert_eq!(
            changed,
            want,
            "{name} step {t}: changed rows (left) are not the sampled set (right); moved but unsampled: {:?}, sampled but unmoved: {:?}",
            changed.iter().filter(|x| want.binary_search(x).is_err()).collect::<Vec<_>>(),
            want.iter().filter(|x| changed.binary_search(x).is_err()).collect::<Vec<_>>()
        );
        snapshots.push(now);
        sets.push(want);
    }
    // The sets must overlap partially for the momentum checks below to mean anything.
    let only_first: Vec<u64> = sets[0].iter().copied().filter(|x| sets[1].binary_search(x).is_err()).collect();
    let both: Vec<u64> = sets[0].iter().copied().filter(|x| sets[1].binary_search(x).is_ok()).collect();
    assert!(only_first.len() >= 10, "{name}: {} rows sampled at step 0 but not step 1", only_first.len());
    assert!(!both.is_empty() || case.shards > 1, "{name}: no row sampled at both steps");
    // Rows carrying momentum/moments from step 0 did not move at step 1 (already implied by the
    // changed-set equality, stated here for the reader): no state is applied to unsampled rows.
    for &row in &only_first {
        let r = row as usize * D..(row as usize + 1) * D;
        assert_eq!(snapshots[1][r.clone()], snapshots[2][r], "{name}: row {row} moved at step 1 without being sampled");
    }

    if case.adamw && case.weight_decay == 0.0 {
        // Per-row bias correction: a row updated for the first time at step 1 gets AdamW's first
        // update, lr·g/(|g| + eps) ≈ ±lr per element, not the 0.744·lr a global step count of 2
        // would give.
        let lr = cfg.lr as f64;
        let first_at_1: Vec<u64> = sets[1].iter().copied().filter(|x| sets[0].binary_search(x).is_err()).collect();
        assert!(first_at_1.len() >= 10);
        // |ΔW| / lr at step 1, element by element, over the given rows.
        let ratios = |rows: &[u64]| -> Vec<f64> {
            rows.iter()
                .flat_map(|&row| row as usize * D..(row as usize + 1) * D)
                .map(|e| (snapshots[2][e] as f64 - snapshots[1][e] as f64).abs() / lr)
                .collect()
        };
        let first = ratios(&first_at_1);
        let near = first.iter().filter(|&&q| (q - 1.0).abs() < 0.01).count();
        assert!(
            near * 10 >= first.len() * 9,
            "{name}: only {near}/{} first updates are ±lr: AdamW bias correction is not per row",
            first.len()
        );
        // A row sampled at steps 0 and 1 has its second update: not all ±lr.
        if !both.is_empty() {
            let far = ratios(&both).iter().filter(|&&q| (q - 1.0).abs() > 0.01).count();
            assert!(far > 0, "{name}: rows sampled twice still got first-step updates");
        }
    }
}

#[test]
fn abi_sgd_one_shard_moves_only_sampled_rows() {
    run_abi_case(&AbiCase { name: "sgd/1 shard/wd 0", shards: 1, adamw: false, weight_decay: 0.0 });
    run_abi_case(&AbiCase { name: "sgd/1 shard/wd 5e-4", shards: 1, adamw: false, weight_decay: 5e-4 });
}

#[test]
fn abi_sgd_three_shards_moves_only_sampled_rows() {
    run_abi_case(&AbiCase { name: "sgd/3 shards/wd 0", shards: 3, adamw: false, weight_decay: 0.0 });
    run_abi_case(&AbiCase { name: "sgd/3 shards/wd 0.05", shards: 3, adamw: false, weight_decay: 0.05 });
}

#[test]
fn abi_adamw_moves_only_sampled_rows() {
    run_abi_case(&AbiCase { name: "adamw/1 shard/wd 0", shards: 1, adamw: true, weight_decay: 0.0 });
    run_abi_case(&AbiCase { name: "adamw/3 shards/wd 0", shards: 3, adamw: true, weight_decay: 0.0 });
    run_abi_case(&AbiCase { name: "adamw/1 shard/wd 0.1", shards: 1, adamw: true, weight_decay: 0.1 });
    run_abi_case(&AbiCase { name: "adamw/3 shards/wd 0.1", shards: 3, adamw: true, weight_decay: 0.1 });
}

#[test]
fn abi_shards_with_nothing_to_sample_stay_put() {
    // Rate 0.005 of ≤ 301 classes per shard gives k = 0: only positives are sampled, shards without
    // positives sample nothing, and the step still succeeds.
    for shards in [1u32, 3] {
        let case = AbiCase { name: "k=0", shards, adamw: false, weight_decay: 5e-4 };
        let mut cfg = abi_config(&case);
        cfg.sample_rate = 0.005;
        let head = TestHead::new(&cfg);
        let before = head.centers(D);
        let mut rng = Rng(77);
        // Every label in shard 0's range [0, 101).
        let (emb, labels) = batch(&mut rng, 12, 0, 101);
        let (stats, grad) = head.step(&emb, &labels, D, &even_split(12, shards as usize));
        assert!(stats.loss.is_finite() && grad.iter().all(|g| g.is_finite()), "shards={shards}: non-finite result");
        let pos: BTreeSet<u64> = labels.iter().map(|&l| l as u64).collect();
        let pos: Vec<u64> = pos.into_iter().collect();
        assert_eq!(stats.sampled_classes, pos.len() as u64);
        assert_eq!(changed_rows(&before, &head.centers(D)), pos, "shards={shards}: only the positives move");
    }
}
