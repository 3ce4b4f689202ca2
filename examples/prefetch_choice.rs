//! How the CPU backend prefetches a block's scattered center rows: the forward pass's norm pass
//! at C = 1,000,000, r = 0.1 (100,000 ascending rows of 2 KiB spread over a 2 GB table, blocks of
//! 256 rows on all of this machine's threads), read with no software prefetch, with the rows two
//! ahead prefetched into L1 (`T0`) or into L2 (`T1`), and by the library's own pass
//! (`kernels::row_inv_norms`). The four alternate, so that the machine's drift falls on each alike.
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

/// Ascending ids with gaps of 1 to 17 (one row in nine on average, about what r = 0.1 samples, and
/// short enough that 100,000 of them fit the table).
fn scattered_ids() -> Vec<u32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = 0u64;
    std::iter::from_fn(|| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        next += 1 + state % 17;
        (next < CLASSES as u64).then_some(next as u32)
    })
    .take(100_000)
    .collect()
}

/// 1/‖row‖ of rows `ids`, prefetching the rows two ahead with `HINT` when `PREFETCH`. Compiled for
/// the instructions the library's own pass runs with on this CPU (its AVX-512 version), so that
/// only the prefetch differs between the variants.
///
/// # Safety
/// The CPU must have the enabled features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn norms_by_hand<const PREFETCH: bool, const HINT: i32>(table: &[f32], ids: &[u32], out: &mut [f32]) {
    for (r, (o, &j)) in out.iter_mut().zip(ids).enumerate() {
        if let Some(&ahead) = ids.get(r + PREFETCH_AHEAD).filter(|_| PREFETCH) {
            let start = table[ahead as usize * D..].as_ptr().cast::<i8>();
            for offset in (0..D * 4).step_by(64) {
                // SAFETY: the address is inside the table (a prefetch would not fault anyway).
                unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(start.add(offset)) };
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
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1};
        let detected = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq");
        if !detected {
            println!("this measurement compares prefetches under the library's AVX-512 pass: this CPU lacks AVX-512");
            return;
        }
        let table: Vec<f32> = (0..CLASSES * D).into_par_iter().map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let ids = scattered_ids();
        let mut outs = vec![vec![0f32; ids.len()]; 4];
        let bytes = (ids.len() * D * 4) as f64;
        // SAFETY (the three by hand): AVX-512 was detected above.
        let variants: [(&str, NormPass); 4] = [
            ("no software prefetch", &|ids, out| unsafe { norms_by_hand::<false, _MM_HINT_T0>(&table, ids, out) }),
            ("rows 2 ahead into L1 (T0)", &|ids, out| unsafe { norms_by_hand::<true, _MM_HINT_T0>(&table, ids, out) }),
            ("rows 2 ahead into L2 (T1)", &|ids, out| unsafe { norms_by_hand::<true, _MM_HINT_T1>(&table, ids, out) }),
            ("kernels::row_inv_norms (the library's)", &|ids, out| row_inv_norms(&table, D, ids, out)),
        ];
        let mut times = vec![Vec::new(); variants.len()];
        for _ in 0..ROUNDS {
            for ((t, (_, run)), out) in times.iter_mut().zip(&variants).zip(outs.iter_mut()) {
                let start = Instant::now();
                ids.par_chunks(BLOCK).zip(out.par_chunks_mut(BLOCK)).for_each(|(ids, out)| run(ids, out));
                t.push(start.elapsed().as_secs_f64());
            }
        }
        println!("{} scattered rows of {} KiB from a {:.1} GB table, {} threads, medians of {ROUNDS} alternations:", ids.len(), D * 4 / 1024, (CLASSES * D * 4) as f64 / 1e9, rayon::current_num_threads());
        for ((name, _), t) in variants.iter().zip(times) {
            let m = median(t);
            println!("  {name:<40} {:6.2} ms  {:5.1} GB/s", m * 1e3, bytes / m / 1e9);
        }
        // Every variant computed the same norms (the same pass, but for its prefetches).
        assert!(outs.iter().all(|o| o == &outs[3]) && outs[3].iter().all(|v| v.is_finite()));
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("this measurement is of x86-64 prefetch hints");
}
