//! The CPU backend's GEMM engines, one single-threaded call per block of classes, on all of this
//! machine's threads: the forward product of SPEC §6 (256×512 embeddings times 100,000 centers) by
//! the `gemm` crate and by `matrixmultiply`, then the step's three products through partialfc's
//! own `matmul` (f32 on the AVX-512 kernels where the CPU has them, bf16 on oneDNN).
//!
//!     cargo run --release --example gemm_choice
//!
//! Results are recorded in docs/benchmarks.md.

use half::bf16;
use partialfc::backend::cpu::gemm::{matmul, onednn_kernel, path, Element, GemmPath, Operand};
use partialfc::backend::cpu::dnnl::DataType as Dt;
use partialfc::config::DType;
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
    println!("gemm crate, blocks of {} on rayon {:>7.1} GFLOP/s", block(), flops / t / 1e9);

    let t = best_of(5, || {
        out.par_chunks_mut(block() * N).enumerate().for_each(|(b, c)| {
            let rows = c.len() / N;
            let wb = &w[b * block() * D..(b * block() + rows) * D];
            unsafe { matrixmultiply::sgemm(rows, D, N, 1.0, wb.as_ptr(), D as isize, 1, x.as_ptr(), 1, D as isize, 0.0, c.as_mut_ptr(), N as isize, 1) };
        })
    });
    println!("matrixmultiply, blocks of {} on rayon {:>7.1} GFLOP/s", block(), flops / t / 1e9);

    // partialfc's own matmul (bf16 on oneDNN when loaded; PFC_ONEDNN_LIBRARY= empty hides it), for the
    // three products of a block in the step: cosines, embedding gradient, center gradient.
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    println!("partialfc matmul: f32 {}, bf16 {} ({})", path(DType::F32).name(), path(DType::BF16).name(), onednn_kernel(Dt::Bf16).unwrap_or_default());
    // The forward product's batch operand as the step passes it: transposed, rows contiguous, for
    // the AVX-512 f32 kernels; the batch itself otherwise.
    let mut xt = vec![0f32; N * D];
    (0..N * D).for_each(|e| xt[(e % D) * N + e / D] = x[e]);
    let f32_batch = if path(DType::F32) == GemmPath::Avx512F32 { Operand::rows(&xt, N) } else { Operand::transposed(&x, D) };
    fn products<T: Element>(w: &[T], x: &[T], batch: Operand<'_, T>, out: &mut [f32]) -> [f64; 3] {
        let bk = block();
        let forward = best_of(5, || {
            out.par_chunks_mut(bk * N).enumerate().for_each(|(b, c)| {
                let rows = c.len() / N;
                matmul(rows, N, D, c, Operand::rows(&w[b * bk * D..(b * bk + rows) * D], D), batch, false);
            })
        });
        // ∂/∂x += gᵀ·W and ∂/∂W = g·x̂ per block, g (rows×N) taken from the centers' storage.
        let grad_x = best_of(5, || {
            w.par_chunks(bk * D).for_each_init(
                || vec![0f32; N * D],
                |acc, wblk| {
                    let rows = wblk.len() / D;
                    matmul(N, D, rows, acc, Operand::transposed(&wblk[..rows * N], N), Operand::rows(wblk, D), true);
                },
            )
        });
        let mut grads = vec![0f32; K * D];
        let grad_w = best_of(5, || {
            grads.par_chunks_mut(bk * D).zip(w.par_chunks(bk * D)).for_each(|(c, wblk)| {
                let rows = wblk.len() / D;
                matmul(rows, D, N, c, Operand::rows(&wblk[..rows * N], N), Operand::rows(x, D), false);
            })
        });
        [forward, grad_x, grad_w]
    }
    for (name, t) in [("f32", products(&w, &x, f32_batch, &mut out)), ("bf16", products(&wb, &xb, Operand::transposed(&xb, D), &mut out))] {
        println!(
            "partialfc matmul {name:>4}: cosines {:>6.1}, embedding gradient {:>6.1}, center gradient {:>6.1} GFLOP/s",
            flops / t[0] / 1e9,
            flops / t[1] / 1e9,
            flops / t[2] / 1e9
        );
    }

}
