//! How the CPU backend prefetches a block's scattered center rows: the forward pass's norm pass
//! at C = 1,000,000, r = 0.1 (100,000 ascending rows of 2 KiB spread over a 2 GB table, blocks of
//! 256 rows on all of this machine's threads), read with no software prefetch, with the rows two
//! ahead prefetched into L1 (`T0`), and by the library's own pass (`kernels::row_inv_norms`, which
//! prefetches them into L2). The three alternate, so that the machine's drift falls on each alike.
//!
//!     cargo run --release --example prefetch_choice
//!
//! Results are recorded in docs/benchmarks.md.

use partialfc::backend::cpu::kernels::{dot, row_inv_norms, PREFETCH_AHEAD};
use rayon::prelude::*;
use std::time::Instant;

const CLASSES: usize = 1_000_000;
const D: usize = 512;
const BLOCK: usize = 256;
const ROUNDS: usize = 9;

/// Ascending ids with gaps of 1 to 19 (one row in ten on average, as r = 0.1 samples).
fn scattered_ids() -> Vec<u32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = 0u64;
    std::iter::from_fn(|| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        next += 1 + state % 19;
        (next < CLASSES as u64).then_some(next as u32)
    })
    .take(100_000)
    .collect()
}

/// 1/‖row‖ of rows `ids`, prefetching the rows two ahead into L1 (`into_l1`) or not at all.
fn norms_by_hand(table: &[f32], ids: &[u32], out: &mut [f32], into_l1: bool) {
    for (r, (o, &j)) in out.iter_mut().zip(ids).enumerate() {
        if into_l1 {
            if let Some(&ahead) = ids.get(r + PREFETCH_AHEAD) {
                let start = table[ahead as usize * D..].as_ptr().cast::<i8>();
                for offset in (0..D * 4).step_by(64) {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: a prefetch has no architectural effect; the address is in the table.
                    unsafe {
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(start.add(offset))
                    };
                }
            }
        }
        let row = &table[j as usize * D..(j as usize + 1) * D];
        *o = 1.0 / dot(row, row).sqrt().max(1e-12);
    }
}

/// One way of computing a block's norms: its ids in, their 1/‖row‖ out.
type NormPass<'a> = &'a (dyn Fn(&[u32], &mut [f32]) + Sync);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let table: Vec<f32> = (0..CLASSES * D).into_par_iter().map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let ids = scattered_ids();
    let mut out = vec![0f32; ids.len()];
    let bytes = (ids.len() * D * 4) as f64;
    let variants: [(&str, NormPass); 3] = [
        ("no software prefetch", &|ids, out| norms_by_hand(&table, ids, out, false)),
        ("rows 2 ahead into L1 (T0)", &|ids, out| norms_by_hand(&table, ids, out, true)),
        ("kernels::row_inv_norms: into L2 (T1)", &|ids, out| row_inv_norms(&table, D, ids, out)),
    ];
    let mut times = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for (t, (_, run)) in times.iter_mut().zip(&variants) {
            let start = Instant::now();
            ids.par_chunks(BLOCK).zip(out.par_chunks_mut(BLOCK)).for_each(|(ids, out)| run(ids, out));
            t.push(start.elapsed().as_secs_f64());
        }
    }
    println!("{} scattered rows of {} KiB from a {:.1} GB table, {} threads, medians of {ROUNDS} alternations:", ids.len(), D * 4 / 1024, (CLASSES * D * 4) as f64 / 1e9, rayon::current_num_threads());
    for ((name, _), t) in variants.iter().zip(times) {
        let m = median(t);
        println!("  {name:<38} {:6.2} ms  {:5.1} GB/s", m * 1e3, bytes / m / 1e9);
    }
    // Keeps the passes' results alive.
    assert!(out.iter().all(|v| v.is_finite()));
}
