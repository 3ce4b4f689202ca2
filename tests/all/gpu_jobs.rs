//! Whole jobs on the CUDA backend, against the CPU backend: heads over 1, 2 and 4 GPUs of one
//! process, the golden files on each, exhausted device memory, checkpoints crossing between the
//! backends, export and search, `pfc train --backend cuda`, and 2 processes × 2 GPUs under mpirun.
//! As in gpu.rs each test runs where CUDA is (`on_cuda`): on a GPU machine, else on the host
//! emulation (tests/cuda-emulator/, four GPUs). A job that needs more GPUs than a GPU machine has
//! says so and is not run there; on the emulation nothing is left out.

use crate::common::*;
use crate::persist::{self, bits, cpath, load, save, state_of, Scratch, Snapshot};
use partialfc::ffi::*;

/// The GPUs the driver offers.
fn gpu_count() -> usize {
    cudarc::driver::result::init().and_then(|_| cudarc::driver::result::device::get_count()).expect("the CUDA driver") as usize
}

/// Whether `want` GPUs are here for `job`; where not, says so — allowed on a GPU machine with
/// fewer, never on the emulation, which offers four.
pub(crate) fn has_gpus(want: usize, job: &str) -> bool {
    let count = gpu_count();
    if count >= want {
        return true;
    }
    assert!(std::env::var_os("PFC_EMU_CHILD").is_none(), "the emulation offers {count} GPUs; {job} needs {want}");
    eprintln!("{job} needs {want} GPUs and this machine has {count}: not run here");
    false
}

/// GPUs 0..g, or all of them on a machine with fewer: for tests whose subject is not the GPU count.
fn up_to(g: usize) -> Vec<i32> {
    (0..g.min(gpu_count()) as i32).collect()
}

/// A CUDA head for `cfg` with one shard on each of `devices`.
pub(crate) fn cuda_head(cfg: &pfc_config, devices: &[i32]) -> TestHead {
    let mut c = *cfg;
    c.backend = PFC_BACKEND_CUDA;
    c.local_shards = devices.len() as u32;
    c.devices = devices.as_ptr();
    let mut h = std::ptr::null_mut();
    let status = pfc_create(&c, &mut h);
    assert_eq!(status, PFC_OK, "pfc_create(CUDA on GPUs {devices:?}): {}", last_error());
    TestHead(h)
}

/// gpu.rs's configuration on `shards` local shards.
pub(crate) fn config(c: u64, d: usize, rate: f32, compute: i32, shards: usize) -> pfc_config {
    let mut cfg = crate::gpu::config(c, d, rate, compute);
    cfg.local_shards = shards as u32;
    cfg
}

/// Shards of 1, 2 and 4 GPUs against CPU heads of as many shards (the shard count decides the
/// sampled sets at r < 1): the same classes sampled, so the same center rows moved, and loss,
/// gradients and centers within the compute dtype's tolerance, over a few steps — the last with an
/// empty shard — and an evaluation. The bf16 heads list their GPUs in reverse, so that shard ranks
/// and device ordinals differ.
#[test]
fn cuda_on_one_two_and_four_gpus_matches_cpu() {
    if !on_cuda(module_path!(), "cuda_on_one_two_and_four_gpus_matches_cpu") {
        return;
    }
    // At r = 1 on one GPU, 2003 classes are four column groups of the statistics kernels.
    let (c, d, n) = (2003u64, 32usize, 50usize);
    for g in [1usize, 2, 4] {
        if !has_gpus(g, &format!("a head over {g} GPUs")) {
            continue;
        }
        for (rate, compute, tol) in [(1.0, PFC_DTYPE_F32, 1e-4), (0.3, PFC_DTYPE_F32, 1e-4), (0.3, PFC_DTYPE_BF16, 3e-2), (0.3, PFC_DTYPE_F16, 5e-3)] {
            let mut devices = up_to(g);
            if compute == PFC_DTYPE_BF16 {
                devices.reverse();
            }
            let what = format!("GPUs {devices:?}, r {rate}, dtype {compute}");
            let cfg = config(c, d, rate, compute, g);
            let cpu = TestHead::new(&cfg);
            let gpu = cuda_head(&cfg, &devices);
            assert!(rel_err(&gpu.centers(d), &cpu.centers(d)) <= 1e-6, "{what}: initial centers differ");
            for step in 0..3 {
                let (e, l) = crate::gpu::data(c, d, n, 100 * g as u64 + step);
                let mut rows = even_split(n, g);
                if step == 2 {
                    rows[g - 1] += std::mem::take(&mut rows[0]);
                }
                let (before_c, before_g) = (cpu.centers(d), gpu.centers(d));
                let (sc, gc) = cpu.step(&e, &l, d, &rows);
                let (sg, gg) = gpu.step(&e, &l, d, &rows);
                let what = format!("{what}, step {step} of rows {rows:?}");
                assert_eq!((sc.sampled_classes, sc.step, sc.global_batch), (sg.sampled_classes, sg.step, sg.global_batch), "{what}");
                assert!((sc.loss - sg.loss).abs() <= tol * sc.loss, "{what}: loss {} vs {}", sg.loss, sc.loss);
                assert!(rel_err(&gg, &gc) <= 10.0 * tol, "{what}: gradient {}", rel_err(&gg, &gc));
                let (wc, wg) = (cpu.centers(d), gpu.centers(d));
                let rows_moved = |after: &[f32], before: &[f32]| -> Vec<bool> {
                    after.chunks_exact(d).zip(before.chunks_exact(d)).map(|(a, b)| a != b).collect()
                };
                let (moved_c, moved_g) = (rows_moved(&wc, &before_c), rows_moved(&wg, &before_g));
                if let Some(j) = (0..c as usize).find(|&j| moved_c[j] != moved_g[j]) {
                    panic!("{what}: class {j} moved on the {} only", if moved_c[j] { "CPU" } else { "GPU" });
                }
                let moved = moved_c.iter().filter(|&&m| m).count() as u64;
                assert_eq!(moved, sc.sampled_classes, "{what}: every sampled center moves (weight decay), no other");
                assert!(rel_err(&wg, &wc) <= tol, "{what}: centers {}", rel_err(&wg, &wc));
            }
            let (e, l) = crate::gpu::data(c, d, n, 7);
            let (ec, eg) = (cpu.evaluate(&e, &l, d, &even_split(n, g)), gpu.evaluate(&e, &l, d, &even_split(n, g)));
            assert_eq!((ec.sampled_classes, eg.sampled_classes), (c, c), "{what}: evaluation covers every class");
            assert!((ec.loss - eg.loss).abs() <= tol * ec.loss, "{what}: evaluation loss {} vs {}", eg.loss, ec.loss);
        }
    }
}

/// The reference's vectors through 1, 2 and 4 GPUs (at r = 1 sharding does not change the result),
/// within 1e-4 as on the CPU (golden.rs).
#[test]
fn cuda_golden_files_on_one_two_and_four_gpus() {
    if !on_cuda(module_path!(), "cuda_golden_files_on_one_two_and_four_gpus") {
        return;
    }
    for g in [1usize, 2, 4] {
        if !has_gpus(g, &format!("the golden files over {g} GPUs")) {
            continue;
        }
        for gold in Golden::all() {
            let (c, d) = (gold.usize("num_classes"), gold.usize("embedding_dim"));
            let world = gold.usize("world_size") as f32;
            let head = cuda_head(&gold.pfc_config(g as u32), &up_to(g));
            head.set_centers(&gold.f32("weight_init"));
            for t in 0..gold.usize("steps") {
                let what = format!("{} on {g} GPUs, step {t}", gold.name);
                let labels = gold.i64(&format!("labels.{t}"));
                let n = labels.len();
                let (st, grad) = head.step(&gold.f32(&format!("emb.{t}")), &labels, d, &even_split(n, g));
                let want = gold.f32(&format!("loss.{t}"))[0] as f64;
                assert!((st.loss - want).abs() <= 1e-4 * want, "{what}: loss {} vs {want}", st.loss);
                assert_eq!((st.global_batch, st.sampled_classes), (n as u64, c as u64), "{what}");
                // The reference returns world_size × the local gradient; a head of g shards g × it.
                let want_grad: Vec<f32> = gold.f32(&format!("grad_emb.{t}")).iter().map(|v| v / world * g as f32).collect();
                assert!(rel_err(&grad, &want_grad) <= 1e-4, "{what}: gradient {}", rel_err(&grad, &want_grad));
                let e = rel_err(&head.centers(d), &gold.f32(&format!("weight.{t}")));
                assert!(e <= 1e-4, "{what}: centers {e}");
            }
        }
    }
}

/// The device memory of GPU 0.
fn device_memory() -> usize {
    // Initialises the driver.
    gpu_count();
    let dev = cudarc::driver::result::device::get(0).expect("GPU 0");
    // SAFETY: a device handle the driver just gave.
    unsafe { cudarc::driver::result::device::total_mem(dev) }.expect("GPU 0's memory")
}

/// Device memory runs out (the emulation's GPUs have 8 MiB here): a head whose optimizer state
/// does not fit is refused with PFC_ERR_OUT_OF_MEMORY naming it, and leaves nothing allocated; a
/// head that fits, given batches whose buffers do not, refuses those steps the same way, naming the
/// buffer, and changes nothing — centers, gradients, statistics, step count, accumulated gradients;
/// it evaluates the batch whose cosines did not fit (evaluation works in chunks sized to the
/// device), and then trains on batches that fit as the CPU does. Before the fixes in
/// src/backend/cuda/step.rs a batch too large for the GPU gave PFC_ERR_DEVICE ("CUDA upload"), and
/// a step refused on one GPU left the other's cosines allocated, so the next batch that fitted
/// was refused too.
#[test]
fn exhausted_device_memory_is_reported_and_changes_nothing() {
    const MIB: usize = 1 << 20;
    if !on_cuda_with(module_path!(), "exhausted_device_memory_is_reported_and_changes_nothing", &[("PFC_EMU_DEVICE_MEMORY", "8M")]) {
        return;
    }
    let total = device_memory();
    if total > 64 * MIB {
        assert!(std::env::var_os("PFC_EMU_CHILD").is_none(), "the emulation's GPU has {total} bytes, not the 8 MiB asked for");
        eprintln!("GPU 0 has {} MiB: exhausting it takes the emulation's small devices, not run here", total / MIB);
        return;
    }
    if !has_gpus(2, "the out-of-memory job") {
        return;
    }
    let d = 32usize;
    let row_bytes = d * 4;
    // Centers of 60% of each GPU fit, their momentum beside them does not.
    let big = (2 * total * 6 / 10 / row_bytes) as u64;
    let mut cfg = config(big, d, 1.0, PFC_DTYPE_F32, 2);
    cfg.backend = PFC_BACKEND_CUDA;
    let devices = [0, 1];
    cfg.devices = devices.as_ptr();
    let mut h = std::ptr::null_mut();
    assert_eq!(pfc_create(&cfg, &mut h), PFC_ERR_OUT_OF_MEMORY, "{}", last_error());
    assert!(h.is_null(), "a failed create wrote its output");
    let message = last_error();
    assert!(message.contains("GPU 0") && message.contains("momentum"), "{message}");
    // The refused head freed its centers: centers and momentum of 40% each fit now.
    drop(cuda_head(&config(2 * (total * 4 / 10 / row_bytes) as u64, d, 1.0, PFC_DTYPE_F32, 2), &devices));

    let c = 4000u64;
    let cfg = config(c, d, 1.0, PFC_DTYPE_F32, 2);
    let cpu = TestHead::new(&cfg);
    let gpu = cuda_head(&cfg, &devices);
    let before = gpu.centers(d);
    // Each batch fails at another buffer: its shards' embeddings (a GPU's worth each), the
    // gathered global batch (90% of a GPU), the cosines of 2000 classes a GPU (150% of one), or,
    // the cosines fitting (55%), their gradient beside them in the backward pass.
    let rows_for_cosines = |share: usize| total * share / 100 / (4 * c as usize / 2);
    let cosine_rows = rows_for_cosines(150);
    let batches = [
        (2 * (total / row_bytes + 1), "the batch's embeddings"),
        (total * 9 / 10 / row_bytes, "the gathered embeddings"),
        (cosine_rows, "cosines"),
        (rows_for_cosines(55), "cosine gradient"),
    ];
    for (n, buffer) in batches {
        let (e, l) = crate::gpu::data(c, d, n, 41);
        let mut grad = vec![7f32; n * d];
        let b = host_batches(&e, &l, &mut grad, d, &even_split(n, 2));
        let mut stats = pfc_step_stats { loss: -1.0, step: 99, ..Default::default() };
        for (call, name) in [(pfc_train_step as extern "C" fn(_, _, _, _) -> _, "pfc_train_step"), (pfc_train_compute, "pfc_train_compute")] {
            assert_eq!(call(gpu.0, b.as_ptr(), 2, &mut stats), PFC_ERR_OUT_OF_MEMORY, "{name} of {n} rows: {}", last_error());
            let message = last_error();
            assert!(message.contains("GPU 0") && message.contains(buffer), "{name} of {n} rows does not name {buffer:?}: {message}");
        }
        assert_eq!((stats.loss, stats.step), (-1.0, 99), "a refused step of {n} rows wrote its statistics");
        assert!(grad.iter().all(|&v| v == 7.0), "a refused step of {n} rows wrote gradients");
        assert!(bits(&gpu.centers(d)) == bits(&before), "a refused step of {n} rows changed centers");
        assert_eq!(pfc_train_apply(gpu.0), PFC_ERR_INVALID_ARGUMENT, "a refused compute of {n} rows accumulated gradients");
    }
    let (e, l) = crate::gpu::data(c, d, cosine_rows, 41);
    let (ec, eg) = (cpu.evaluate(&e, &l, d, &even_split(cosine_rows, 2)), gpu.evaluate(&e, &l, d, &even_split(cosine_rows, 2)));
    assert!((ec.loss - eg.loss).abs() <= 1e-4 * ec.loss, "evaluation in chunks: loss {} vs {}", eg.loss, ec.loss);
    assert_eq!(ec.accuracy, eg.accuracy);
    // Batches that fit a GPU (cosines and their gradient 70% of it), whatever the refused steps
    // left behind: once, the other GPU kept its cosines from the step refused on GPU 0.
    for (step, n) in [rows_for_cosines(35), 48].into_iter().enumerate() {
        let (e, l) = crate::gpu::data(c, d, n, 50 + step as u64);
        let (sc, gc) = cpu.step(&e, &l, d, &even_split(n, 2));
        let (sg, gg) = gpu.step(&e, &l, d, &even_split(n, 2));
        assert_eq!(sg.step, step as u64 + 1, "the refused steps counted");
        assert!((sc.loss - sg.loss).abs() <= 1e-4 * sc.loss, "step {step} after the refusal: loss {} vs {}", sg.loss, sc.loss);
        assert!(rel_err(&gg, &gc) <= 1e-3, "step {step} after the refusal: gradient {}", rel_err(&gg, &gc));
        assert!(rel_err(&gpu.centers(d), &cpu.centers(d)) <= 1e-4, "step {step} after the refusal: centers");
    }
}

/// Checkpoints cross between the backends bit for bit, SGD and AdamW (per-class step counts
/// included): one written by 2 GPUs loads into CPU heads of 1 and 3 shards, which save the same
/// state; one written by 4 CPU shards loads into 4 GPUs, which save the same state and go on
/// training as the CPU does. (A GPU machine with fewer GPUs runs it on those it has.)
#[test]
fn checkpoints_cross_between_cuda_and_cpu_exactly() {
    if !on_cuda(module_path!(), "checkpoints_cross_between_cuda_and_cpu_exactly") {
        return;
    }
    let (c, d) = (500u64, 16usize);
    let (two, four) = (up_to(2), up_to(4));
    for adamw in [false, true] {
        let what = if adamw { "AdamW" } else { "SGD" };
        let cfg = persist::config(c, d as u32, two.len() as u32, adamw, 0.5);
        let gpu = cuda_head(&cfg, &two);
        persist::train(&gpu, c, d, two.len(), 0, 4);
        ok(pfc_set_learning_rate(gpu.0, 0.0371));
        let a = Scratch::new("gpu-jobs-cuda-ckpt");
        ok(save(&gpu, &a.0));
        let saved = Snapshot::read(&a.0);
        assert_eq!(saved.shards, two.len());
        assert_eq!(saved.manifest["step"], 4);
        assert!(bits(&saved.f32("centers")) == bits(&gpu.centers(d)), "{what}: the checkpoint's centers are not the GPUs'");
        if adamw {
            // Sampling at r = 0.5: some classes were updated at every step, some at fewer.
            let steps = saved.u32("steps");
            assert!(steps.contains(&4) && steps.iter().any(|&s| s > 0 && s < 4), "{what}: step counts {steps:?}");
        }
        for shards in [1u32, 3] {
            let mut other = persist::config(c, d as u32, shards, adamw, 0.5);
            other.seed = 999;
            let cpu = TestHead::new(&other);
            ok(load(&cpu, &a.0));
            assert!(bits(&cpu.centers(d)) == bits(&gpu.centers(d)), "{what}: centers after loading into {shards} CPU shards");
            assert!(state_of(&cpu) == saved.state(), "{what}: the state of {shards} CPU shards differs from the GPUs'");
        }

        let cfg = persist::config(c, d as u32, four.len() as u32, adamw, 0.5);
        let cpu = TestHead::new(&cfg);
        persist::train(&cpu, c, d, four.len(), 0, 5);
        let b = Scratch::new("gpu-jobs-cpu-ckpt");
        ok(save(&cpu, &b.0));
        let want = Snapshot::read(&b.0).state();
        let mut other = cfg;
        other.seed = 999;
        let gpu = cuda_head(&other, &four);
        ok(load(&gpu, &b.0));
        assert!(state_of(&gpu) == want, "{what}: the state of {} GPUs differs from the CPU's", four.len());
        // The loaded seed, step and optimizer state drive the next steps: the same sampled classes,
        // the same step numbers, the same losses.
        let (on_cpu, on_gpu) = (persist::train(&cpu, c, d, four.len(), 5, 2), persist::train(&gpu, c, d, four.len(), 5, 2));
        for (sc, sg) in on_cpu.iter().zip(&on_gpu) {
            assert_eq!((sc.step, sc.sampled_classes), (sg.step, sg.sampled_classes), "{what}: steps after loading");
            assert!((sc.loss - sg.loss).abs() <= 1e-4 * sc.loss, "{what} step {}: loss {} vs {}", sc.step, sg.loss, sc.loss);
        }
    }
}

/// Exports of a CUDA head's trained centers are byte-identical to a CPU head's holding the same
/// centers, in every format and dtype; searches return the same ids and scores, also through an
/// index opened on the CUDA head's export.
#[test]
fn cuda_export_and_search_match_cpu() {
    if !on_cuda(module_path!(), "cuda_export_and_search_match_cpu") {
        return;
    }
    let (c, d) = (3000u64, 32usize);
    let devices = up_to(2);
    let cfg = config(c, d, 0.5, PFC_DTYPE_F32, devices.len());
    let gpu = cuda_head(&cfg, &devices);
    for step in 0..2 {
        let (e, l) = crate::gpu::data(c, d, 32, 700 + step);
        gpu.step(&e, &l, d, &even_split(32, devices.len()));
    }
    let cpu = TestHead::new(&config(c, d, 0.5, PFC_DTYPE_F32, 3));
    cpu.set_centers(&gpu.centers(d));
    let s = Scratch::new("gpu-jobs-export");
    for (format, ext) in [(PFC_FORMAT_SAFETENSORS, "safetensors"), (PFC_FORMAT_NPY, "npy"), (PFC_FORMAT_FVECS, "fvecs"), (PFC_FORMAT_FAISS, "faiss")] {
        for dtype in [PFC_DTYPE_F32, PFC_DTYPE_F16] {
            if dtype == PFC_DTYPE_F16 && (format == PFC_FORMAT_FVECS || format == PFC_FORMAT_FAISS) {
                continue;
            }
            for normalized in [0, 1] {
                let path = |who: &str| s.path(&format!("{who}-{dtype}-{normalized}.{ext}"));
                ok(pfc_export_centers(gpu.0, cpath(&path("gpu")).as_ptr(), format, dtype, normalized));
                ok(pfc_export_centers(cpu.0, cpath(&path("cpu")).as_ptr(), format, dtype, normalized));
                let (from_gpu, from_cpu) = (std::fs::read(path("gpu")).unwrap(), std::fs::read(path("cpu")).unwrap());
                assert!(from_gpu == from_cpu, ".{ext} dtype {dtype} normalized {normalized}: the CUDA head's export differs from the CPU head's");
            }
        }
    }
    let mut rng = Rng(5);
    let (n, k) = (9usize, 7u32);
    let queries: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    let search = |f: &dyn Fn(*mut i64, *mut f32) -> pfc_status| {
        let mut ids = vec![-1i64; n * k as usize];
        let mut scores = vec![f32::NAN; n * k as usize];
        ok(f(ids.as_mut_ptr(), scores.as_mut_ptr()));
        (ids, bits(&scores))
    };
    let on_gpu = search(&|ids, scores| pfc_search(gpu.0, queries.as_ptr(), n as u64, k, ids, scores));
    let on_cpu = search(&|ids, scores| pfc_search(cpu.0, queries.as_ptr(), n as u64, k, ids, scores));
    assert_eq!(on_gpu, on_cpu, "search on the CUDA head");
    let mut ix = std::ptr::null_mut();
    ok(pfc_index_open(cpath(&s.path("gpu-0-0.safetensors")).as_ptr(), &mut ix));
    let on_index = search(&|ids, scores| pfc_index_search(ix, queries.as_ptr(), n as u64, k, ids, scores));
    pfc_index_close(ix);
    assert_eq!(on_index, on_cpu, "search of the CUDA head's export");
}

/// `pfc_search` of `n × k` results over `queries`: ids and the scores' bits.
fn search_of(h: &TestHead, queries: &[f32], d: usize, k: usize) -> (Vec<i64>, Vec<u32>) {
    let n = queries.len() / d;
    let mut ids = vec![-1i64; n * k];
    let mut scores = vec![f32::NAN; n * k];
    ok(pfc_search(h.0, queries.as_ptr(), n as u64, k as u32, ids.as_mut_ptr(), scores.as_mut_ptr()));
    (ids, bits(&scores))
}

/// Search on 4 GPUs gives the CPU head's ids and scores bit for bit where the GPU's selection and
/// rescoring are put to the test: exact ties (duplicate centers and power-of-two multiples, and a
/// run of 1,200 classes of one direction crossing chunks and shards, which must list by ascending
/// id), rows whose squared norm is subnormal or underflows, k above a chunk's classes, and every
/// class. The emulation's 16 MiB GPUs bound a chunk's products to 512 classes at 300 queries, so
/// each shard of 2,000 classes searches in several chunks. A query alone gets its answer in the batch.
/// The same with centers stored in bf16 (each head rounds them to nearest), which the GPUs widen a
/// chunk at a time as the CPU does.
#[test]
fn cuda_search_matches_cpu_with_ties_across_chunks_and_shards() {
    if !on_cuda_with(module_path!(), "cuda_search_matches_cpu_with_ties_across_chunks_and_shards", &[("PFC_EMU_DEVICE_MEMORY", "16M")]) {
        return;
    }
    let (c, d, n) = (8000usize, 24usize, 300usize);
    let (mut centers, mut queries) = crate::export_search::search_problem(c, d, n, 23);
    let mut rng = Rng(31);
    let base: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
    let run = 1700..2900;
    for i in run.clone() {
        for j in 0..d {
            centers[i * d + j] = base[j] * [1.0f32, 4.0, 0.5, 0.125][i % 4];
        }
    }
    for (row, scale) in [(5usize, 1e-20f32), (2950, 1e-30), (4000, 2e17), (7999, 3e-23)] {
        for j in 0..d {
            centers[row * d + j] *= scale;
        }
    }
    for j in 0..d {
        queries[j] = base[j] * 3.0;
    }
    for storage in [PFC_DTYPE_F32, PFC_DTYPE_BF16] {
        let devices = up_to(4);
        let gpu = cuda_head(&pfc_config { storage_dtype: storage, ..config(c as u64, d, 1.0, PFC_DTYPE_F32, devices.len()) }, &devices);
        gpu.set_centers(&centers);
        let cpu = TestHead::new(&pfc_config { storage_dtype: storage, ..config(c as u64, d, 1.0, PFC_DTYPE_F32, 3) });
        cpu.set_centers(&centers);
        let chunk_launches = || crate::common::emu_counters(0).map(|v| v["launches"]["topk_chunk"].as_u64().unwrap_or(0));
        for k in [1usize, 37, 700] {
            let before = chunk_launches();
            let (ids, scores) = search_of(&gpu, &queries, d, k);
            if let (Some(before), Some(after)) = (before, chunk_launches()) {
                assert!(after - before >= 2, "storage {storage}, k {k}: GPU 0 searched its 2,000 classes in {} chunk(s)", after - before);
            }
            assert!((ids.clone(), scores.clone()) == search_of(&cpu, &queries, d, k), "storage {storage}, k {k}: the GPUs' search differs from the CPU's");
            let tied: Vec<i64> = (run.start as i64..).take(k).collect();
            assert_eq!(ids[..k], tied, "storage {storage}, k {k}: equal scores must list by ascending id");
            assert!(scores[..k].iter().all(|&s| s == scores[0]), "storage {storage}, k {k}: duplicate directions must score identically");
            for q in [0, 1, n / 2, n - 1] {
                let alone = search_of(&gpu, &queries[q * d..(q + 1) * d], d, k);
                let r = q * k..(q + 1) * k;
                assert!(alone == (ids[r.clone()].to_vec(), scores[r].to_vec()), "storage {storage}, k {k}: query {q} alone differs from the batch");
            }
        }
        let few = &queries[..3 * d];
        assert!(search_of(&gpu, few, d, c) == search_of(&cpu, few, d, c), "storage {storage}: the full ranking differs from the CPU's");
    }
}

/// Search leaves the centers on the GPUs: each GPU receives the queries once and sends back each
/// query's k hits — within the n × k × (4 + 8) bytes of a score and an id apiece, where its
/// centers are 2,500 times that — from kernels of its own and cuBLAS. The counters are the
/// emulation's.
#[test]
fn cuda_search_copies_no_centers_to_the_host() {
    use crate::common::{counter_delta as delta, emu_counters as counters, emulated};
    if !on_cuda(module_path!(), "cuda_search_copies_no_centers_to_the_host") || !emulated() {
        return;
    }
    let (c, d, n, k) = (20_000usize, 64usize, 12usize, 10usize);
    let devices = up_to(4);
    let cfg = config(c as u64, d, 1.0, PFC_DTYPE_F32, devices.len());
    let gpu = cuda_head(&cfg, &devices);
    let cpu = TestHead::new(&cfg);
    let mut rng = Rng(8);
    let centers: Vec<f32> = (0..c * d).map(|_| rng.normal() as f32).collect();
    gpu.set_centers(&centers);
    cpu.set_centers(&centers);
    let queries: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    let before: Vec<_> = devices.iter().map(|&g| counters(g).unwrap()).collect();
    let hits = search_of(&gpu, &queries, d, k);
    for (&g, before) in devices.iter().zip(&before) {
        let after = counters(g).unwrap();
        let shard_bytes = (c / devices.len() * d * 4) as u64;
        let down = delta(before, &after, "dtoh_bytes");
        assert!(down <= (n * k * 12) as u64 && down * 1000 < shard_bytes, "GPU {g}: search copied {down} bytes to the host; its centers are {shard_bytes}");
        assert_eq!(delta(before, &after, "htod_bytes"), (n * d * 4) as u64, "GPU {g}: the queries, once");
        for kernel in ["cublasGemmEx", "center_inv_norms", "topk_chunk"] {
            assert!(delta(before, &after, &format!("launches.{kernel}")) > 0, "GPU {g}: no {kernel}");
        }
    }
    assert!(hits == search_of(&cpu, &queries, d, k), "the GPUs' search differs from the CPU's");
}

/// The `pfc` binary: cargo's, or where the GPU check staged it (PFC_BIN).
fn pfc_binary() -> std::path::PathBuf {
    std::env::var_os("PFC_BIN").map_or_else(|| env!("CARGO_BIN_EXE_pfc").into(), Into::into)
}

/// `pfc train --backend cuda` on two GPUs runs, reports and writes its outputs, and its logged
/// losses follow a CPU run of the same job (the backbone learns from the head's gradients, so the
/// two runs drift apart only by the backends' rounding).
#[test]
fn pfc_train_with_the_cuda_backend_matches_the_cpu_backend() {
    if !on_cuda(module_path!(), "pfc_train_with_the_cuda_backend_matches_the_cpu_backend") {
        return;
    }
    let shards = up_to(2).len().to_string();
    let s = Scratch::new("gpu-jobs-cli");
    let run = |backend: &str| -> String {
        let out_dir = s.path(backend);
        let args = ["train", "--backend", backend, "--shards", &shards, "--classes", "300", "--dim", "16", "--batch", "32", "--steps", "12"];
        // The emulation's (or the GPU check's) loader path passes on with the environment.
        let out = std::process::Command::new(pfc_binary())
            .args(args)
            .args(["--eval-identities", "20", "--log-every", "4", "--out"])
            .arg(&out_dir)
            .output()
            .expect("run pfc");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "pfc {}: {stderr}\n{stdout}", args.join(" "));
        assert!(stdout.contains(&format!("{shards} {backend} shards")), "{stdout}");
        assert!(stdout.contains("identification") && stdout.contains("TAR"), "pfc train --backend {backend} did not report:\n{stdout}");
        for file in ["centers.safetensors", "train.jsonl", "summary.json"] {
            assert!(out_dir.join(file).is_file(), "--backend {backend} wrote no {file}");
        }
        stdout
    };
    // Every step's loss at full precision, from the step log.
    let losses = |backend: &str| -> Vec<f64> {
        let log = std::fs::read_to_string(s.path(backend).join("train.jsonl")).unwrap();
        log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
    };
    let cuda = run("cuda");
    run("cpu");
    let (lc, lp) = (losses("cuda"), losses("cpu"));
    assert!(lc.len() == 12 && lc.len() == lp.len(), "logged steps: cuda {lc:?}, cpu {lp:?}\n{cuda}");
    assert_eq!(cuda.lines().filter(|l| l.starts_with("step")).count(), 3, "--log-every 4 over 12 steps:\n{cuda}");
    for (g, c) in lc.iter().zip(&lp) {
        assert!((g - c).abs() <= 1e-3 * c, "losses drift apart: cuda {lc:?}, cpu {lp:?}");
    }
    let exported = |backend: &str| -> Vec<f32> {
        let bytes = std::fs::read(s.path(backend).join("centers.safetensors")).unwrap();
        let t = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        t.tensor("centers").unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let (ec, ep) = (exported("cuda"), exported("cpu"));
    assert!(rel_err(&ec, &ep) <= 1e-3, "exported centers: {}", rel_err(&ec, &ep));
}

/// A tests/mpi/parity.c case of 2 processes × 2 shards on the CUDA backend with margin `margin`
/// (`PFC_MARGIN_*`), checked against the one-process CPU head within f32's tolerances.
fn cuda_mpi_case(name: &str, rate: f32, adamw: bool, margin: i32) -> crate::mpi::Case {
    let case = crate::mpi::synthetic(name, 4, &[2, 2], rate, adamw);
    let config = case.dir.join("config.txt");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("backend {PFC_BACKEND_CUDA}\ntol 1e-4\ngrad_tol 1e-3\nmargin_kind {margin}\n"));
    std::fs::write(&config, text).unwrap();
    case
}

/// One job of 2 processes × 2 GPUs under mpirun: tests/mpi/parity.c with `backend 1` forms it
/// through MPI_Allgather (process 0's NCCL id shared that way) and steps it over NCCL between the
/// processes, with uneven and empty shard batches; every process checks its loss, gradients and
/// centers after every step against one process of 4 CPU shards fed the whole batch, and with the
/// adaptive margins their running statistics. Each shard has the GPU of its global rank (the
/// emulation gives each process four GPUs of its own).
#[test]
fn two_processes_of_two_gpus_under_mpirun_match_four_cpu_shards() {
    if !on_cuda(module_path!(), "two_processes_of_two_gpus_under_mpirun_match_four_cpu_shards") {
        return;
    }
    if !has_gpus(4, "2 processes × 2 GPUs (a GPU for each of the job's 4 shards)") {
        return;
    }
    let cases = [(1.0, false, PFC_MARGIN_COMBINED), (0.3, false, PFC_MARGIN_COMBINED), (0.3, true, PFC_MARGIN_COMBINED), (0.3, false, PFC_MARGIN_ADAFACE), (0.3, false, PFC_MARGIN_CURRICULAR)];
    for (rate, adamw, margin) in cases {
        let case = cuda_mpi_case(&format!("cuda-{rate}-{adamw}-{margin}"), rate, adamw, margin);
        let out = crate::mpi::run_parity(&case.dir, 2, &[]);
        eprintln!("2 processes × 2 GPUs, r {rate}, adamw {adamw}, margin {margin}: {}", out.lines().next().unwrap_or_default());
    }
}


/// One process of a 2-process CUDA job runs out of device memory inside a step (its GPUs are made
/// small): the step fails with PFC_ERR_OUT_OF_MEMORY and the same message on both processes, and
/// neither is left waiting for the other in a collective.
#[test]
fn a_process_out_of_device_memory_fails_the_step_everywhere() {
    if !on_cuda(module_path!(), "a_process_out_of_device_memory_fails_the_step_everywhere") {
        return;
    }
    if std::env::var_os("PFC_EMU_CHILD").is_none() {
        // A real GPU's memory cannot be made small for one process.
        return;
    }
    let case = cuda_mpi_case("cuda-oom", 1.0, false, PFC_MARGIN_COMBINED);
    let parity = crate::mpi::parity_exe();
    // Two application contexts: the second process's emulated GPUs hold the head but not a step.
    // A process left waiting in a collective would wait for the emulated NCCL's timeout, cut short.
    let mut cmd = crate::native::mpirun(1);
    cmd.env("PFC_EMU_NCCL_TIMEOUT_S", "20").arg(parity).arg(&case.dir).arg("--expect-oom");
    cmd.args([":", "-n", "1", "env", "PFC_EMU_DEVICE_MEMORY=80K"]).arg(parity).arg(&case.dir).arg("--expect-oom");
    let out = cmd.output().expect("mpirun");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "mpirun failed ({}):\n{text}", out.status);
    assert_eq!(text.matches("checks passed").count(), 2, "{text}");
    assert_eq!(text.matches("out of memory at step").count(), 2, "{text}");
    text.lines().filter(|l| l.contains("out of memory at step")).for_each(|l| eprintln!("{l}"));
}

/// A job formed the NCCL way (world_size 4, first_rank and one id, no host callback), two
/// "processes" of two GPUs each (threads here): bad input on global shard 3 fails the step on both
/// with one message naming that process's shards and its batch, and changes nothing.
#[test]
fn a_job_formed_over_nccl_alone_names_the_process_with_bad_input() {
    if !on_cuda(module_path!(), "a_job_formed_over_nccl_alone_names_the_process_with_bad_input") {
        return;
    }
    if !has_gpus(4, "a job of 2 processes × 2 GPUs") {
        return;
    }
    let (c, d, n) = (2003u64, 32usize, 16usize);
    let mut id = [0u8; PFC_NCCL_ID_BYTES];
    ok(pfc_nccl_unique_id(id.as_mut_ptr()));
    let results: Vec<(i32, String, bool)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2u32)
            .map(|p| {
                scope.spawn(move || {
                    let devices = [2 * p as i32, 2 * p as i32 + 1];
                    let mut cfg = config(c, d, 0.5, PFC_DTYPE_F32, 2);
                    cfg.backend = PFC_BACKEND_CUDA;
                    cfg.devices = devices.as_ptr();
                    cfg.world_size = 4;
                    cfg.first_rank = 2 * p;
                    cfg.nccl_id = id.as_ptr();
                    let mut h = std::ptr::null_mut();
                    ok(pfc_create(&cfg, &mut h));
                    let head = TestHead(h);
                    let before = head.centers(d);
                    let (e, mut l) = crate::gpu::data(c, d, n, 60 + p as u64);
                    if p == 1 {
                        l[n - 1] = c as i64; // in this process's second batch: global shard 3
                    }
                    let mut grad = vec![0f32; e.len()];
                    let batches = host_batches(&e, &l, &mut grad, d, &[n / 2, n / 2]);
                    let status = pfc_train_step(head.0, batches.as_ptr(), 2, std::ptr::null_mut());
                    (status, last_error(), head.centers(d) == before)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for (p, (status, message, unchanged)) in results.iter().enumerate() {
        assert_eq!(*status, PFC_ERR_INVALID_ARGUMENT, "process {p}: {message}");
        assert!(message.contains("the process of shards 2..=3") && message.contains("batch 1"), "process {p}: {message}");
        assert!(unchanged, "process {p}: a refused step changed centers");
    }
    assert_eq!(results[0].1, results[1].1, "the processes' messages differ");
}
