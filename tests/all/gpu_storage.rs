//! bf16 storage of centers and optimizer state on the CUDA backend (`storage_dtype`, SPEC §2),
//! against the CPU backend's and src/storage.rs's definition of the rounding: the device's
//! rounding bit for bit, initial centers, whole heads step by step, checkpoints through a CUDA
//! bf16 head, refused updates, and the device memory the storage takes. As in gpu.rs each test
//! runs where CUDA is (`on_cuda`): on a GPU machine, else on the host emulation.

use crate::common::*;
use crate::gpu_jobs::cuda_head;
use crate::persist::{self, bits, load, save, state_of, Scratch, Snapshot};
use cudarc::driver::{CudaContext, CudaFunction, PushKernelArg};
use partialfc::batch::{Batches, Embeddings, GradOut, HostBatch, Outputs};
use partialfc::checkpoint;
use partialfc::config::{BackendKind, Config, DType, OptimizerKind, Rounding};
use partialfc::ffi::*;
use partialfc::head::Head;
use partialfc::state::StateTensor;
use partialfc::storage::{round_row, step_stream, RowKey};
use std::path::Path;
use std::sync::Arc;

/// An entry point of the library's kernels/gradient.cu, as the library compiles and loads it.
fn gradient_kernel(ctx: &Arc<CudaContext>, name: &str) -> CudaFunction {
    use cudarc::driver::sys::CUdevice_attribute::{CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR};
    use partialfc::backend::cuda::kernels::{arch_of, cubin_for};
    let arch = arch_of((ctx.attribute(MAJOR).unwrap(), ctx.attribute(MINOR).unwrap()));
    let (_, cubin) = cubin_for(&arch).unwrap().into_iter().find(|(k, _)| k.file == "gradient.cu").unwrap();
    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).unwrap().load_function(name).unwrap()
}

/// Values that exercise the rounding: random bit patterns of every exponent, subnormals of both
/// signs, values bf16 holds exactly, halfway cases, the largest finite f32 (which rounds up to ∞
/// unless its 16 random bits are zero), the smallest normals, and ±0.
fn rounding_cases(count: usize) -> Vec<f32> {
    let mut rng = Rng(0xB0F16);
    let mut v = vec![0.0, -0.0, f32::MAX, -f32::MAX, f32::MIN_POSITIVE, -f32::MIN_POSITIVE, 1.0, -1.0];
    v.extend([0x0000_0001u32, 0x0000_FFFF, 0x0001_0000, 0x0000_8000, 0x007F_FFFF, 0x3F80_8000, 0x3F81_8000, 0x7F7F_0000, 0x4049_0FDB]
        .iter()
        .flat_map(|&b| [f32::from_bits(b), -f32::from_bits(b)]));
    while v.len() < count {
        let bits = rng.next_u64() as u32;
        let x = match v.len() % 4 {
            // Any finite value.
            0 | 1 => f32::from_bits(bits),
            // A subnormal.
            2 => f32::from_bits(bits & 0x807F_FFFF),
            // A bf16.
            _ => f32::from_bits(bits & 0xFFFF_0000),
        };
        if x.is_finite() {
            v.push(x);
        }
    }
    v.truncate(count);
    v
}

/// kernels/storage.cuh's rounding on the device is src/storage.rs `round_row`, bit for bit, in both
/// modes, for every element of rows that span several threads and end off a draw's four lanes,
/// keyed by the global class (the shard's first class plus the row) and the tensor. Driven through
/// `update_sgd_bf16` at lr −1 with no momentum or weight decay over zero rows, so that the new
/// momentum and center are the gradient itself, stored. A NaN is stored as a NaN. The check
/// (commit 0) judges the values as stored: f32's largest value in the momentum passes in f32 and
/// is refused in bf16, where it rounds up to ∞.
#[test]
fn the_device_rounding_is_round_row_bit_for_bit() {
    if !on_cuda(module_path!(), "the_device_rounding_is_round_row_bit_for_bit") {
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let (bf16_update, f32_update) = (gradient_kernel(&ctx, "update_sgd_bf16"), gradient_kernel(&ctx, "update_sgd"));
    let (dim, local_rows, start) = (515usize, 6usize, 1_000_003u64);
    let rows: Vec<u32> = vec![5, 0, 2];
    let k = rows.len();
    let mut grads = rounding_cases(k * dim);
    grads[dim + 7] = f32::from_bits(0x7FFF_FFFF);
    grads[2 * dim + 9] = f32::from_bits(0xFFC0_0000);
    let seed_stream = step_stream(42, 1_234_567);
    let launch = |f: &CudaFunction, bf16: bool, grads: &[f32], lr: f32, commit: i32, nearest: i32| {
        let zeros = if bf16 { 2 } else { 4 } * local_rows * dim;
        let centers = stream.alloc_zeros::<u8>(zeros).unwrap();
        let momentum = stream.alloc_zeros::<u8>(zeros).unwrap();
        let (rows_d, grads_d, verdict) = (stream.clone_htod(&rows).unwrap(), stream.clone_htod(grads).unwrap(), stream.alloc_zeros::<u64>(6).unwrap());
        let (k32, d32, zero) = (k as i32, dim as i32, 0f32);
        let mut b = stream.launch_builder(f);
        b.arg(&centers).arg(&momentum).arg(&rows_d).arg(&grads_d).arg(&k32).arg(&d32).arg(&lr).arg(&zero).arg(&zero).arg(&commit).arg(&verdict);
        if bf16 {
            b.arg(&seed_stream).arg(&nearest).arg(&start);
        }
        let cfg = cudarc::driver::LaunchConfig { grid_dim: (k as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: kernels/gradient.cu `update_sgd[_bf16]`: rows of `dim` stored values, `k` rows
        // and gradients, a verdict record of 6 words.
        unsafe { b.launch(cfg) }.unwrap();
        let (c, m, v): (Vec<u8>, Vec<u8>, Vec<u64>) = (stream.clone_dtoh(&centers).unwrap(), stream.clone_dtoh(&momentum).unwrap(), stream.clone_dtoh(&verdict).unwrap());
        (c, m, v[0])
    };
    let widen = |bytes: &[u8]| -> Vec<f32> { bytes.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect() };
    for (how, nearest) in [(Rounding::Stochastic, 0), (Rounding::Nearest, 1)] {
        let (centers, momentum, flags) = launch(&bf16_update, true, &grads, -1.0, 1, nearest);
        assert_eq!(flags, 0, "{how:?}: an update wrote the verdict");
        let (centers, momentum) = (widen(&centers), widen(&momentum));
        let mut compared = 0;
        for (j, &row) in rows.iter().enumerate() {
            let class = start + row as u64;
            // What the kernel computes before storing: 0·0 + (g + 0·0), then 0 − (−1)·that.
            let update: Vec<f32> = grads[j * dim..(j + 1) * dim].iter().map(|&g| 0.0f32 * 0.0 + (g + 0.0 * 0.0)).collect();
            for (tensor, stored) in [(StateTensor::Momentum, &momentum), (StateTensor::Centers, &centers)] {
                let mut want = update.clone();
                round_row(&mut want, how, RowKey::new(seed_stream, class, tensor, dim));
                let got = &stored[row as usize * dim..(row as usize + 1) * dim];
                for (e, ((&g, &w), &x)) in got.iter().zip(&want).zip(&update).enumerate() {
                    if x.is_nan() {
                        assert!(g.is_nan(), "{how:?} {tensor:?} class {class} element {e}: NaN stored as {g}");
                        continue;
                    }
                    assert_eq!(g.to_bits(), w.to_bits(), "{how:?} {tensor:?} class {class} element {e}: {x:e} ({:#010x}) stored as {g:e}, round_row gives {w:e}", x.to_bits());
                    compared += 1;
                }
            }
            // Rows not in the update stay zero.
        }
        assert_eq!(compared, 2 * (k * dim - 2));
        for r in (0..local_rows).filter(|r| !rows.contains(&(*r as u32))) {
            assert!(centers[r * dim..(r + 1) * dim].iter().chain(&momentum[r * dim..(r + 1) * dim]).all(|&v| v.to_bits() == 0), "{how:?}: row {r} written");
        }
    }
    // The check judges the momentum as stored: f32::MAX stays finite in f32, and becomes ∞ in bf16
    // but where its 16 random bits are zero.
    let (element, class) = (3usize, start + rows[0] as u64);
    let draw = partialfc::rng::at(seed_stream, partialfc::storage::draw_index(class, StateTensor::Momentum, dim, element));
    assert_ne!((draw >> (16 * (element % 4))) & 0xFFFF, 0, "the case needs a draw that rounds f32::MAX up");
    let mut finite = vec![0.5f32; k * dim];
    let (_, _, flags) = launch(&bf16_update, true, &finite, 0.0, 0, 0);
    assert_eq!(flags, 0, "an update of finite values refused");
    finite[element] = f32::MAX;
    let (_, _, in_f32) = launch(&f32_update, false, &finite, 0.0, 0, 0);
    let (_, _, in_bf16) = launch(&bf16_update, true, &finite, 0.0, 0, 0);
    assert_eq!((in_f32, in_bf16), (0, 8), "the verdicts (VERDICT_UPDATE is 8) of f32::MAX stored in f32 and in bf16");
}

const C: u64 = 2003;
const D: usize = 32;
const N: usize = 50;

fn config(kind: OptimizerKind, rate: f32, rounding: Rounding, shards: usize) -> Config {
    let mut cfg = Config { num_classes: C, embedding_dim: D, sample_rate: rate, seed: 29, ..Config::default() };
    cfg.margin.scale = 32.0;
    cfg.storage_dtype = DType::BF16;
    cfg.storage_rounding = rounding;
    cfg.local_shards = shards;
    cfg.world_size = shards;
    cfg.optimizer.kind = kind;
    if kind == OptimizerKind::AdamW {
        cfg.optimizer.lr = 0.01;
        cfg.optimizer.weight_decay = 0.01;
    }
    cfg
}

fn on_gpus(cfg: &Config) -> Config {
    Config { backend: BackendKind::Cuda, devices: (0..cfg.local_shards as i32).collect(), ..cfg.clone() }
}

/// One training step of the global batch (`e`, `l`) split evenly over the head's shards.
fn train(head: &mut Head, e: &[f32], l: &[i64]) -> f64 {
    step(head, e, l, true)
}

/// Forward and backward of the global batch (`e`, `l`) split evenly over the head's shards, its
/// center gradients accumulated; with `apply`, then the optimizer step (`train_step`).
fn step(head: &mut Head, e: &[f32], l: &[i64], apply: bool) -> f64 {
    let rows = even_split(l.len(), head.config().local_shards);
    let mut at = 0;
    let mut inputs = Vec::new();
    for &r in &rows {
        inputs.push(HostBatch { embeddings: Embeddings::F32(&e[at * D..(at + r) * D]), labels: &l[at..at + r] });
        at += r;
    }
    let mut grads: Vec<Vec<f32>> = rows.iter().map(|&r| vec![0f32; r * D]).collect();
    let mut outs: Vec<GradOut> = grads.iter_mut().map(|g| GradOut::F32(g)).collect();
    head.compute(Batches::Host(&inputs), Outputs::Host(&mut outs), apply, true).unwrap().loss
}

fn centers(head: &Head) -> Vec<f32> {
    let mut out = vec![0f32; C as usize * D];
    head.get_centers(0, C, false, &mut out).unwrap();
    out
}

/// Tensor `name` of the checkpoint in `dir`, every class in order, as f32: stored f32 as it is,
/// stored bf16 widened (whichever the checkpoint format keeps).
fn checkpoint_tensor(dir: &Path, name: &str) -> Vec<f32> {
    let bytes = &Snapshot::read(dir).tensors[name];
    match bytes.len() / (C as usize * D) {
        4 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        2 => bytes.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect(),
        w => panic!("{name}: {w} bytes a value"),
    }
}

/// The configurations compared: SGD with momentum and AdamW, r = 1 and r < 1, one GPU and two,
/// stochastic rounding and to nearest.
const CASES: [(OptimizerKind, f32, Rounding, usize); 5] = [
    (OptimizerKind::Sgd, 1.0, Rounding::Stochastic, 1),
    (OptimizerKind::Sgd, 0.3, Rounding::Stochastic, 2),
    (OptimizerKind::AdamW, 1.0, Rounding::Stochastic, 2),
    (OptimizerKind::AdamW, 0.3, Rounding::Stochastic, 1),
    (OptimizerKind::Sgd, 0.3, Rounding::Nearest, 1),
];

/// A CUDA head storing bf16 computes in f32 and stores each result as src/storage.rs rounds it:
/// step after step, an f32 CUDA head given the bf16 head's whole state (through its checkpoint)
/// takes the same step, and every value the bf16 head then stores — centers and each optimizer
/// tensor — is the f32 head's `round_row`ed with the step's key (seed, step, global class,
/// tensor), bit for bit. Rows the step did not touch round to themselves.
#[test]
fn cuda_bf16_storage_is_its_f32_step_rounded_by_round_row() {
    if !on_cuda(module_path!(), "cuda_bf16_storage_is_its_f32_step_rounded_by_round_row") {
        return;
    }
    for (kind, rate, rounding, shards) in CASES {
        let cfg = config(kind, rate, rounding, shards);
        let mut narrow = Head::new(on_gpus(&cfg)).unwrap();
        let mut wide = Head::new(Config { storage_dtype: DType::F32, ..on_gpus(&cfg) }).unwrap();
        for step in 0..3 {
            let what = format!("{kind:?} r {rate} {rounding:?} on {shards} GPU(s), step {step}");
            let before = Scratch::new("bf16-before");
            checkpoint::save(&narrow, &before.0).unwrap();
            checkpoint::load(&mut wide, &before.0).unwrap();
            let index = narrow.steps_taken();
            assert_eq!(wide.steps_taken(), index, "{what}");
            let (e, l) = crate::gpu::data(C, D, N, 700 + step);
            train(&mut narrow, &e, &l);
            train(&mut wide, &e, &l);
            assert_stored_is_rounded(&narrow, &wide, &cfg, index, &what);
        }
    }
}

/// Every value the bf16 head `narrow` stores — centers and each optimizer tensor — is what the f32
/// head `wide` stores after the same calls, `round_row`ed with optimizer step `index`'s key.
fn assert_stored_is_rounded(narrow: &Head, wide: &Head, cfg: &Config, index: u64, what: &str) {
    let (narrow_dir, wide_dir) = (Scratch::new("bf16-after"), Scratch::new("f32-after"));
    checkpoint::save(narrow, &narrow_dir.0).unwrap();
    checkpoint::save(wide, &wide_dir.0).unwrap();
    for &tensor in StateTensor::for_optimizer(cfg.optimizer.kind) {
        let (got, mut want) = (checkpoint_tensor(&narrow_dir.0, tensor.name()), checkpoint_tensor(&wide_dir.0, tensor.name()));
        for (class, row) in want.chunks_exact_mut(D).enumerate() {
            round_row(row, cfg.storage_rounding, RowKey::new(step_stream(cfg.seed, index), class as u64, tensor, D));
        }
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!("{what}: {} of class {} element {}: stored {:e}, the f32 step rounded {:e}", tensor.name(), i / D, i % D, got[i], want[i]);
        }
    }
}

/// The step split on a CUDA head storing bf16: two computes accumulate over the union of their
/// sampled rows, then `apply` rounds that one update with the head's step as `train_step` does —
/// every stored value is what an f32 CUDA head given the same state and calls stores, `round_row`ed.
#[test]
fn cuda_bf16_storage_rounds_an_accumulated_update_as_one_step() {
    if !on_cuda(module_path!(), "cuda_bf16_storage_rounds_an_accumulated_update_as_one_step") {
        return;
    }
    for (kind, rate, rounding, shards) in [CASES[1], CASES[3]] {
        let cfg = config(kind, rate, rounding, shards);
        let mut narrow = Head::new(on_gpus(&cfg)).unwrap();
        let (e, l) = crate::gpu::data(C, D, N, 900);
        train(&mut narrow, &e, &l);
        let before = Scratch::new("split-before");
        checkpoint::save(&narrow, &before.0).unwrap();
        let mut wide = Head::new(Config { storage_dtype: DType::F32, ..on_gpus(&cfg) }).unwrap();
        checkpoint::load(&mut wide, &before.0).unwrap();
        let index = narrow.steps_taken();
        for head in [&mut narrow, &mut wide] {
            for batch in [901, 902] {
                let (e, l) = crate::gpu::data(C, D, N, batch);
                step(head, &e, &l, false);
            }
            head.apply().unwrap();
        }
        assert_stored_is_rounded(&narrow, &wide, &cfg, index, &format!("{kind:?} r {rate} {rounding:?} on {shards} GPU(s), an accumulated update"));
    }
}

/// A CUDA head storing bf16 against a CPU head storing bf16, same configuration and batches (on
/// two GPUs against two CPU shards: the same sampled sets). Initial centers are the same bf16
/// values (the f32 draws agree to one f32 ulp in 10^8, which rounding to nearest almost never
/// carries). In the first step, wherever the two backends' f32 steps (heads storing f32, started
/// from the same bf16 centers) give the same bits, so do their bf16 steps: the rounding draws are
/// the same. After each step every stored value is a bf16, the same rows moved, and the centers
/// agree within the f32 parity tests' tolerance after the first step (a tenth of bf16's spacing
/// after more), all but a few values bit for bit (a wrong draw would part a third of them).
#[test]
fn cuda_bf16_storage_matches_cpu_bf16_storage() {
    if !on_cuda(module_path!(), "cuda_bf16_storage_matches_cpu_bf16_storage") {
        return;
    }
    for (kind, rate, rounding, shards) in CASES {
        let what = format!("{kind:?} r {rate} {rounding:?} on {shards} GPU(s)");
        let cfg = config(kind, rate, rounding, shards);
        let mut cpu = Head::new(cfg.clone()).unwrap();
        let mut gpu = Head::new(on_gpus(&cfg)).unwrap();
        let initial = centers(&cpu);
        let differ = centers(&gpu).iter().zip(&initial).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert!(differ <= 2, "{what}: {differ} initial center values differ");
        let wide = Config { storage_dtype: DType::F32, ..cfg.clone() };
        let (mut cpu_f32, mut gpu_f32) = (Head::new(wide.clone()).unwrap(), Head::new(on_gpus(&wide)).unwrap());
        for head in [&mut cpu_f32, &mut gpu_f32, &mut gpu] {
            head.set_centers(0, C, &initial).unwrap();
        }
        for step in 0..3 {
            let (e, l) = crate::gpu::data(C, D, N, 300 + step);
            let (before_c, before_g) = (centers(&cpu), centers(&gpu));
            let (lc, lg) = (train(&mut cpu, &e, &l), train(&mut gpu, &e, &l));
            let what = format!("{what}, step {step}");
            assert!((lc - lg).abs() <= 1e-4 * lc, "{what}: loss {lg} vs {lc}");
            let (wc, wg) = (centers(&cpu), centers(&gpu));
            assert!(wg.iter().all(|v| v.to_bits() & 0xFFFF == 0), "{what}: a stored center value is not a bf16");
            let moved = |after: &[f32], before: &[f32]| -> Vec<bool> { after.chunks_exact(D).zip(before.chunks_exact(D)).map(|(a, b)| a != b).collect() };
            assert_eq!(moved(&wg, &before_g), moved(&wc, &before_c), "{what}: different rows moved");
            // The f32 parity tests' tolerance where both start from the same centers; after that,
            // a value one bf16 step apart (a relative 2^-8) moves its row's next updates by more
            // than f32's last bits, AdamW's above all: a tenth of bf16's relative spacing.
            let tol = if step == 0 { 1e-4 } else { 1e-3 };
            assert!(rel_err(&wg, &wc) <= tol, "{what}: centers {}", rel_err(&wg, &wc));
            let same = wg.iter().zip(&wc).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
            assert!(same as f64 >= 0.99 * wc.len() as f64, "{what}: {} of {} center values differ", wc.len() - same, wc.len());
            if step == 0 {
                train(&mut cpu_f32, &e, &l);
                train(&mut gpu_f32, &e, &l);
                let (fc, fg) = (centers(&cpu_f32), centers(&gpu_f32));
                let changed = (0..fc.len()).filter(|&i| fc[i] != initial[i]).count();
                let agree: Vec<usize> = (0..fc.len()).filter(|&i| fc[i].to_bits() == fg[i].to_bits() && fc[i] != initial[i]).collect();
                assert!(agree.len() * 10 >= changed, "{what}: the f32 steps agree on only {} of {changed} new values", agree.len());
                if let Some(&i) = agree.iter().find(|&&i| wc[i].to_bits() != wg[i].to_bits()) {
                    panic!("{what}: class {} element {}: the f32 steps agree ({:e}), the bf16 ones store {:e} (CPU) and {:e} (CUDA)", i / D, i % D, fc[i], wc[i], wg[i]);
                }
            }
        }
    }
}

/// A CUDA bf16 head's checkpoint: saved after some steps, it loads into a new CUDA bf16 head and
/// into a CPU bf16 head with every tensor as saved (the stored values cross the f32 boundary
/// exactly both ways), and the reloaded CUDA head trains on exactly as the original does. A CUDA
/// f32 head's checkpoint loads into a CUDA bf16 head rounded to nearest; the bf16 one into a CUDA
/// f32 head exactly.
#[test]
fn a_cuda_bf16_head_checkpoints_and_reloads_exactly() {
    if !on_cuda(module_path!(), "a_cuda_bf16_head_checkpoints_and_reloads_exactly") {
        return;
    }
    let (c, d) = (700u64, 24usize);
    for adamw in [false, true] {
        let what = if adamw { "AdamW" } else { "SGD" };
        let mut cfg = persist::config(c, d as u32, 1, adamw, 0.5);
        cfg.storage_dtype = PFC_DTYPE_BF16;
        let gpu = cuda_head(&cfg, &[0]);
        persist::train(&gpu, c, d, 1, 0, 3);
        let dir = Scratch::new("cuda-bf16");
        ok(save(&gpu, &dir.0));
        let (saved, saved_centers) = (state_of(&gpu), gpu.centers(d));
        let (again, cpu) = (cuda_head(&cfg, &[0]), TestHead::new(&cfg));
        ok(load(&again, &dir.0));
        ok(load(&cpu, &dir.0));
        assert!(state_of(&again) == saved, "{what}: a CUDA bf16 head's state after loading its checkpoint");
        assert!(state_of(&cpu) == saved, "{what}: a CPU bf16 head's state after loading the CUDA bf16 checkpoint");
        persist::train(&gpu, c, d, 1, 3, 2);
        persist::train(&again, c, d, 1, 3, 2);
        assert!(state_of(&again) == state_of(&gpu), "{what}: the reloaded head trained on differently");

        let mut f32_cfg = cfg;
        f32_cfg.storage_dtype = PFC_DTYPE_F32;
        let wide = cuda_head(&f32_cfg, &[0]);
        ok(load(&wide, &dir.0));
        assert!(bits(&wide.centers(d)) == bits(&saved_centers), "{what}: the bf16 checkpoint's centers in an f32 head");
        persist::train(&wide, c, d, 1, 0, 2);
        let f32_dir = Scratch::new("cuda-f32");
        ok(save(&wide, &f32_dir.0));
        let narrow = cuda_head(&cfg, &[0]);
        ok(load(&narrow, &f32_dir.0));
        let nearest: Vec<u32> = wide.centers(d).iter().map(|&v| half::bf16::from_f32(v).to_f32().to_bits()).collect();
        assert!(bits(&narrow.centers(d)) == nearest, "{what}: an f32 checkpoint's centers in a bf16 head, rounded to nearest");
    }
}

/// A CUDA bf16 head's exports are byte for byte a CPU bf16 head's holding the same centers (bf16
/// values, which `pfc_set_centers` keeps as they are), in each format and dtype, normalized or not.
#[test]
fn a_cuda_bf16_heads_export_is_the_cpu_bf16_heads() {
    if !on_cuda(module_path!(), "a_cuda_bf16_heads_export_is_the_cpu_bf16_heads") {
        return;
    }
    let (c, d, n) = (1500u64, 24usize, 16usize);
    let cfg = |shards| pfc_config { storage_dtype: PFC_DTYPE_BF16, ..crate::gpu_jobs::config(c, d, 0.5, PFC_DTYPE_F32, shards) };
    let gpu = cuda_head(&cfg(2), &[0, 1]);
    for step in 0..2 {
        let (e, l) = crate::gpu::data(c, d, n, 40 + step);
        gpu.step(&e, &l, d, &[n / 2, n / 2]);
    }
    let cpu = TestHead::new(&cfg(3));
    cpu.set_centers(&gpu.centers(d));
    assert!(bits(&cpu.centers(d)) == bits(&gpu.centers(d)), "bf16 centers set on a bf16 head changed");
    let s = Scratch::new("gpu-bf16-export");
    for (format, ext) in [(PFC_FORMAT_SAFETENSORS, "safetensors"), (PFC_FORMAT_NPY, "npy"), (PFC_FORMAT_FVECS, "fvecs")] {
        for dtype in [PFC_DTYPE_F32, PFC_DTYPE_F16].into_iter().filter(|&t| t == PFC_DTYPE_F32 || format != PFC_FORMAT_FVECS) {
            for normalized in [0, 1] {
                let path = |who: &str| s.path(&format!("{who}-{dtype}-{normalized}.{ext}"));
                ok(pfc_export_centers(gpu.0, persist::cpath(&path("gpu")).as_ptr(), format, dtype, normalized));
                ok(pfc_export_centers(cpu.0, persist::cpath(&path("cpu")).as_ptr(), format, dtype, normalized));
                assert!(std::fs::read(path("gpu")).unwrap() == std::fs::read(path("cpu")).unwrap(), ".{ext} dtype {dtype} normalized {normalized}: the exports differ");
            }
        }
    }
}

/// A step whose update would take a center past what normalizes (a center of norm 4e18 at lr 1e4
/// with weight decay) is refused as non-finite on a CUDA bf16 head, with SGD and AdamW, and
/// leaves every stored tensor and step count as it was; the CPU bf16 head refuses it too.
#[test]
fn a_refused_update_leaves_cuda_bf16_storage_untouched() {
    if !on_cuda(module_path!(), "a_refused_update_leaves_cuda_bf16_storage_untouched") {
        return;
    }
    let (c, d, n) = (500u64, 16usize, 12usize);
    for adamw in [false, true] {
        let what = if adamw { "AdamW" } else { "SGD" };
        let mut cfg = persist::config(c, d as u32, 1, adamw, 1.0);
        cfg.storage_dtype = PFC_DTYPE_BF16;
        cfg.weight_decay = 0.5;
        for head in [cuda_head(&cfg, &[0]), TestHead::new(&cfg)] {
            persist::train(&head, c, d, 1, 0, 3);
            let mut huge = head.centers(d);
            huge[..d].iter_mut().for_each(|v| *v = 1e18);
            head.set_centers(&huge);
            ok(pfc_set_learning_rate(head.0, 1e4));
            let before = state_of(&head);
            let (e, l) = persist::batch(c, d, n, 9);
            let mut grad = vec![0f32; n * d];
            let b = host_batches(&e, &l, &mut grad, d, &[n]);
            assert_eq!(pfc_train_step(head.0, b.as_ptr(), 1, std::ptr::null_mut()), PFC_ERR_NON_FINITE, "{what}: {}", last_error());
            assert!(state_of(&head).0 == before.0, "{what}: a refused update changed the stored tensors");
        }
    }
}

/// Bytes the default memory pool of GPU 0 hands out once the device has finished its work (the
/// frees of a head destroyed before included).
fn pool_used(ctx: &CudaContext) -> u64 {
    use cudarc::driver::{result, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT};
    ctx.synchronize().unwrap();
    let mut v = 0u64;
    // SAFETY: a u64 attribute of the device's default pool.
    unsafe {
        let pool = result::device::get_default_mem_pool(result::device::get(0).unwrap()).unwrap();
        result::mem_pool::get_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, (&mut v as *mut u64).cast()).unwrap();
    }
    v
}

/// Centers and state in bf16 take half the device memory of f32: a head of 200,000 classes at
/// d = 64 holds 102.4 MB with SGD (centers and momentum) and 153.6 MB with AdamW in f32, half that
/// in bf16, beside the head's own bookkeeping (AdamW's step counts, 4 bytes a class, among it).
#[test]
fn bf16_storage_takes_half_the_device_memory() {
    if !on_cuda(module_path!(), "bf16_storage_takes_half_the_device_memory") {
        return;
    }
    let (c, d) = (200_000u64, 64usize);
    let ctx = CudaContext::new(0).unwrap();
    for adamw in [false, true] {
        let tensors = if adamw { 3 } else { 2 };
        let held = |dtype| {
            let mut cfg = persist::config(c, d as u32, 1, adamw, 0.1);
            cfg.storage_dtype = dtype;
            let before = pool_used(&ctx);
            let head = cuda_head(&cfg, &[0]);
            let used = pool_used(&ctx) - before;
            drop(head);
            used
        };
        let (wide, narrow) = (held(PFC_DTYPE_F32), held(PFC_DTYPE_BF16));
        let values = tensors * c * d as u64;
        // Beside the stored values: step counts (800 kB with AdamW), a few small buffers, and on
        // a GPU the pool's rounding of each allocation.
        let slack = 16 << 20;
        assert!(wide >= 4 * values && wide < 4 * values + slack, "adamw {adamw}: f32 storage holds {wide} bytes for {values} values");
        assert!(narrow >= 2 * values && narrow < 2 * values + slack, "adamw {adamw}: bf16 storage holds {narrow} bytes for {values} values");
    }
}
