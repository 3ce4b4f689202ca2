//! Why the CPU backend uses the `gemm` crate, one single-threaded call per block of classes: the forward product of SPEC §6
//! (256×512 embeddings times 100,000 centers) by each candidate, on all of this machine's threads.
//!
//!     cargo run --release --example gemm_choice
//!
//! Results are recorded in docs/benchmarks.md.

use rayon::prelude::*;
use std::time::Instant;

const N: usize = 256;
const D: usize = 512;
const K: usize = 100_000;
/// Classes per call; `BLOCK=1024 cargo run …` tries other sizes.
fn block() -> usize {
    std::env::var("BLOCK").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let x: Vec<f32> = (0..N * D).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let w: Vec<f32> = (0..K * D).map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut out = vec![0f32; N * K];
    let flops = 2.0 * (N * K * D) as f64;
    let threads = rayon::current_num_threads();
    println!("C[k×n] = W[k×d]·Xᵀ, n = {N}, d = {D}, k = {K}, {threads} threads; best of 5");

    let t = best_of(5, || {
        out.par_chunks_mut(block() * N).enumerate().for_each(|(b, c)| {
            let rows = c.len() / N;
            let wb = &w[b * block() * D..(b * block() + rows) * D];
            unsafe {
                gemm::gemm(rows, N, D, c.as_mut_ptr(), 1, N as isize, false, wb.as_ptr(), 1, D as isize, x.as_ptr(), D as isize, 1, 0.0f32, 1.0f32, false, false, false, gemm::Parallelism::None);
            }
        })
    });
    println!("gemm crate, blocks of {} on rayon (partialfc) {:>7.1} GFLOP/s", block(), flops / t / 1e9);

    let t = best_of(5, || {
        out.par_chunks_mut(block() * N).enumerate().for_each(|(b, c)| {
            let rows = c.len() / N;
            let wb = &w[b * block() * D..(b * block() + rows) * D];
            unsafe { matrixmultiply::sgemm(rows, D, N, 1.0, wb.as_ptr(), D as isize, 1, x.as_ptr(), 1, D as isize, 0.0, c.as_mut_ptr(), N as isize, 1) };
        })
    });
    println!("matrixmultiply, blocks of {} on rayon {:>7.1} GFLOP/s", block(), flops / t / 1e9);

}
