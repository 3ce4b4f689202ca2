//! Top-k by cosine: bounded heaps per query, merged across blocks, threads, shards and processes.
//! Order: higher score first, then smaller class id, so results are deterministic with ties.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

#[derive(Clone, Copy, Debug, PartialEq)]
struct Hit {
    score: f32,
    class: u64,
}

impl Eq for Hit {}

impl Ord for Hit {
    /// Greater is better.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then(other.class.cmp(&self.class))
    }
}

impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The best `k` hits of each of `n` queries seen so far.
pub struct TopK {
    k: usize,
    heaps: Vec<BinaryHeap<Reverse<Hit>>>,
}

impl TopK {
    pub fn new(queries: usize, k: usize) -> Self {
        // Heaps grow as hits arrive: with k near C, reserving k per query up front in every
        // per-thread partial result would multiply memory by the number of partial results.
        TopK { k, heaps: (0..queries).map(|_| BinaryHeap::with_capacity(k.min(64) + 1)).collect() }
    }

    /// The score a hit must beat to enter query `q`'s list (−∞ while it has fewer than k).
    #[inline]
    pub fn threshold(&self, q: usize) -> f32 {
        let heap = &self.heaps[q];
        if heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            heap.peek().map_or(f32::NEG_INFINITY, |w| w.0.score)
        }
    }

    #[inline]
    pub fn push(&mut self, q: usize, score: f32, class: u64) {
        let hit = Hit { score, class };
        let heap = &mut self.heaps[q];
        if heap.len() < self.k {
            heap.push(Reverse(hit));
        } else if let Some(mut worst) = heap.peek_mut() {
            if hit > worst.0 {
                *worst = Reverse(hit);
            }
        }
    }

    pub fn merge(&mut self, other: TopK) {
        for (q, heap) in other.heaps.into_iter().enumerate() {
            for Reverse(hit) in heap {
                self.push(q, hit.score, hit.class);
            }
        }
    }

    /// Each query's hits, best first.
    pub fn into_sorted(self) -> Vec<Vec<(f32, u64)>> {
        self.heaps
            .into_iter()
            .map(|heap| {
                let mut hits: Vec<Hit> = heap.into_iter().map(|r| r.0).collect();
                hits.sort_by(|a, b| b.cmp(a));
                hits.into_iter().map(|h| (h.score, h.class)).collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_with_ties_to_the_smaller_id() {
        let mut t = TopK::new(1, 3);
        for (s, c) in [(0.5, 9), (0.9, 4), (0.5, 2), (0.1, 1), (0.9, 7), (0.5, 3)] {
            t.push(0, s, c);
        }
        assert_eq!(t.into_sorted()[0], vec![(0.9, 4), (0.9, 7), (0.5, 2)]);
    }
}
