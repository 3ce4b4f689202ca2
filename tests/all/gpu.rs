//! The CUDA backend against the CPU backend and the golden files. Each test runs where CUDA is: on a
//! GPU machine (scripts/gpu-check.sh sets PFC_REQUIRE_GPU=1), else in a child process on the host
//! emulation of the driver, cuBLAS and NCCL (tests/cuda-emulator/, `on_cuda`); a CUDA head that
//! cannot be created there is a failure, never a skip.

use crate::common::*;
use partialfc::ffi::*;

/// A CUDA head for `cfg`.
fn cuda_head(cfg: &pfc_config) -> TestHead {
    let mut c = *cfg;
    c.backend = PFC_BACKEND_CUDA;
    let mut h = std::ptr::null_mut();
    let status = pfc_create(&c, &mut h);
    assert_eq!(status, PFC_OK, "pfc_create(CUDA): {}", last_error());
    TestHead(h)
}

/// Centers drawn on the device (kernels/init.cu) against the CPU backend's: the same generator, the
/// device's double log/cos/sin within 2 ulp of the host's, so after rounding to f32 a value is
/// bit-equal but for about one in 10^8, and then one f32 ulp away.
fn assert_initial_centers_agree(gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len());
    let mut differ = 0;
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        if g.to_bits() != c.to_bits() {
            differ += 1;
            assert!((g.to_bits() as i64 - c.to_bits() as i64).abs() <= 1 && g.signum() == c.signum(), "initial center value {i}: {g} vs {c}");
        }
    }
    assert!(differ <= 1 + cpu.len() / 1_000_000, "{differ} of {} initial center values differ", cpu.len());
}

pub(crate) fn data(c: u64, d: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng(seed);
    let e = (0..n * d).map(|_| rng.normal() as f32).collect();
    let l = (0..n).map(|_| rng.below(c) as i64).collect();
    (e, l)
}

pub(crate) fn config(c: u64, d: usize, rate: f32, compute: i32) -> pfc_config {
    let mut cfg = default_config();
    cfg.num_classes = c;
    cfg.embedding_dim = d as u32;
    cfg.sample_rate = rate;
    cfg.compute_dtype = compute;
    cfg.scale = 32.0;
    cfg
}

#[test]
fn cuda_matches_cpu_step_by_step() {
    if !on_cuda(module_path!(), "cuda_matches_cpu_step_by_step") {
        return;
    }
    for (rate, compute, tol) in [(1.0, PFC_DTYPE_F32, 1e-4), (0.1, PFC_DTYPE_F32, 1e-4), (0.3, PFC_DTYPE_BF16, 3e-2), (0.3, PFC_DTYPE_F16, 5e-3)] {
        let (c, d, n) = (5003u64, 128usize, 96usize);
        let cfg = config(c, d, rate, compute);
        let gpu = cuda_head(&cfg);
        let cpu = TestHead::new(&cfg);
        assert_initial_centers_agree(&gpu.centers(d), &cpu.centers(d));
        for step in 0..3 {
            let (e, l) = data(c, d, n, 100 + step);
            let (before, before_g) = (cpu.centers(d), gpu.centers(d));
            let (sc, gc) = cpu.step(&e, &l, d, &[n]);
            let (sg, gg) = gpu.step(&e, &l, d, &[n]);
            assert_eq!(sc.sampled_classes, sg.sampled_classes, "r {rate}: sampled set sizes differ");
            assert!((sc.loss - sg.loss).abs() <= tol * sc.loss, "r {rate} dtype {compute}: loss {} vs {}", sc.loss, sg.loss);
            assert!(rel_err(&gg, &gc) <= 10.0 * tol, "r {rate} dtype {compute}: gradient {}", rel_err(&gg, &gc));
            let (wc, wg) = (cpu.centers(d), gpu.centers(d));
            // The same rows moved: the GPU sampled exactly the CPU's set.
            for j in 0..c as usize {
                let moved_c = wc[j * d..(j + 1) * d] != before[j * d..(j + 1) * d];
                let moved_g = wg[j * d..(j + 1) * d] != before_g[j * d..(j + 1) * d];
                assert_eq!(moved_c, moved_g, "r {rate}: class {j} moved on one backend only");
            }
            assert!(rel_err(&wg, &wc) <= tol, "r {rate} dtype {compute}: centers {}", rel_err(&wg, &wc));
        }
    }
}

#[test]
fn cuda_matches_the_golden_files() {
    if !on_cuda(module_path!(), "cuda_matches_the_golden_files") {
        return;
    }
    for g in Golden::all() {
        let cfg = g.pfc_config(1);
        let head = cuda_head(&cfg);
        let d = g.usize("embedding_dim");
        let world = g.usize("world_size") as f32;
        head.set_centers(&g.f32("weight_init"));
        for t in 0..g.usize("steps") {
            let labels = g.i64(&format!("labels.{t}"));
            let (st, grad) = head.step(&g.f32(&format!("emb.{t}")), &labels, d, &[labels.len()]);
            let want = g.f32(&format!("loss.{t}"))[0] as f64;
            assert!((st.loss - want).abs() <= 1e-4 * want, "{} step {t}: loss {} vs {want}", g.name, st.loss);
            let want_grad: Vec<f32> = g.f32(&format!("grad_emb.{t}")).iter().map(|v| v / world).collect();
            assert!(rel_err(&grad, &want_grad) <= 1e-4, "{} step {t}: gradient", g.name);
            assert!(rel_err(&head.centers(d), &g.f32(&format!("weight.{t}"))) <= 1e-4, "{} step {t}: centers", g.name);
        }
    }
}

#[test]
fn cuda_rejects_bad_input_and_keeps_its_centers() {
    if !on_cuda(module_path!(), "cuda_rejects_bad_input_and_keeps_its_centers") {
        return;
    }
    let cfg = config(1000, 64, 0.5, PFC_DTYPE_F32);
    let head = cuda_head(&cfg);
    let before = head.centers(64);
    let (e, mut l) = data(1000, 64, 8, 5);
    l[3] = 1000;
    let mut grad = vec![0f32; e.len()];
    let b = host_batches(&e, &l, &mut grad, 64, &[8]);
    assert_eq!(pfc_train_step(head.0, b.as_ptr(), 1, std::ptr::null_mut()), PFC_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("label"));
    assert_eq!(head.centers(64), before);
}

#[test]
fn nccl_unique_id_on_a_gpu_machine() {
    if !on_cuda(module_path!(), "nccl_unique_id_on_a_gpu_machine") {
        return;
    }
    let mut id = [0u8; PFC_NCCL_ID_BYTES];
    assert_eq!(pfc_nccl_unique_id(id.as_mut_ptr()), PFC_OK, "{}", last_error());
    assert!(id.iter().any(|&b| b != 0), "no id written");
}

/// Classes, dimension and rows of the device-batch tests.
const DEVICE_BATCH_JOB: (u64, usize, usize) = (5003, 64, 40);

/// Two CUDA heads alike on GPU 0, one to take device batches and one host batches, and GPU 0's
/// context for the caller's buffers.
fn device_and_host_heads() -> (TestHead, TestHead, std::sync::Arc<cudarc::driver::CudaContext>) {
    let (c, d, _) = DEVICE_BATCH_JOB;
    let cfg = config(c, d, 0.2, PFC_DTYPE_F32);
    (cuda_head(&cfg), cuda_head(&cfg), cudarc::driver::CudaContext::new(0).expect("GPU 0"))
}

#[test]
fn device_pointers_ordered_on_a_callers_stream() {
    // Every stream operation delayed at random on the emulation: a missing wait reads unfinished data.
    if !on_cuda_with(module_path!(), "device_pointers_ordered_on_a_callers_stream", &[("PFC_EMU_DELAY", "1")]) {
        return;
    }
    let (c, d, n) = DEVICE_BATCH_JOB;
    let (device_head, host_head, ctx) = device_and_host_heads();
    let stream = ctx.new_stream().expect("a caller's stream");
    // The batch buffers of a trainer: written by device work queued on its stream right before the
    // step (here copies from staging buffers, as a backbone's last kernel would write them), and
    // the gradient read by a kernel queued right after it (the library's own `convert_f32`, f32 to
    // f32: a copy).
    let convert = {
        use cudarc::driver::sys::CUdevice_attribute::{CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR};
        use partialfc::backend::cuda::kernels::{arch_of, cubin_for};
        let arch = arch_of((ctx.attribute(MAJOR).unwrap(), ctx.attribute(MINOR).unwrap()));
        let (_, cubin) = cubin_for(&arch).unwrap().into_iter().find(|(k, _)| k.file == "normalize.cu").unwrap();
        ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).unwrap().load_function("convert_f32").unwrap()
    };
    let mut e_d = stream.alloc_zeros::<f32>(n * d).unwrap();
    let mut l_d = stream.alloc_zeros::<i64>(n).unwrap();
    let mut g_d = stream.alloc_zeros::<f32>(n * d).unwrap();
    let mut g_out = stream.alloc_zeros::<f32>(n * d).unwrap();
    for step in 0..3 {
        let (e, l) = data(c, d, n, 300 + step);
        let (e_staged, l_staged) = (stream.clone_htod(&e).unwrap(), stream.clone_htod(&l).unwrap());
        stream.synchronize().unwrap();
        stream.memcpy_dtod(&e_staged, &mut e_d).unwrap();
        stream.memcpy_dtod(&l_staged, &mut l_d).unwrap();
        let b = {
            let (ep, _a) = cudarc::driver::DevicePtr::device_ptr(&e_d, &stream);
            let (lp, _b) = cudarc::driver::DevicePtr::device_ptr(&l_d, &stream);
            let (gp, _c) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut g_d, &stream);
            device_batch(ep, lp, gp, n, stream.cu_stream().cast())
        };
        let mut st = pfc_step_stats::default();
        ok(pfc_train_step(device_head.0, &b, 1, &mut st));
        {
            use cudarc::driver::PushKernelArg;
            let (len, f32_code) = ((n * d) as u64, PFC_DTYPE_F32);
            let mut launch = stream.launch_builder(&convert);
            launch.arg(&g_d).arg(&len).arg(&mut g_out).arg(&f32_code);
            // SAFETY: kernels/normalize.cu `convert_f32(const float*, u64, void*, int)`; both buffers hold n·d floats.
            unsafe { launch.launch(cudarc::driver::LaunchConfig::for_num_elems(len as u32)) }.unwrap();
        }
        let got: Vec<f32> = stream.clone_dtoh(&g_out).unwrap();
        let (want_stats, want) = host_head.step(&e, &l, d, &[n]);
        assert_eq!(st.loss, want_stats.loss, "step {step}: device-memory loss");
        assert_eq!(got, want, "step {step}: device-memory gradient");
    }
    assert_eq!(device_head.centers(d), host_head.centers(d));
}

/// A NULL `pfc_batch.stream` is the legacy default stream: inputs copied there without a
/// synchronisation are read only after the copies, and the gradient written before the caller's
/// next legacy-stream copy reads it.
#[test]
fn device_pointers_ordered_on_the_null_stream() {
    // Every stream operation delayed at random on the emulation: a missing wait reads unfinished data.
    if !on_cuda_with(module_path!(), "device_pointers_ordered_on_the_null_stream", &[("PFC_EMU_DELAY", "1")]) {
        return;
    }
    use cudarc::driver::result::{free_sync, malloc_sync, memcpy_dtoh_async, memcpy_htod_async, stream::synchronize};
    let (c, d, n) = DEVICE_BATCH_JOB;
    let (device_head, host_head, ctx) = device_and_host_heads();
    ctx.bind_to_thread().unwrap();
    let legacy = std::ptr::null_mut();
    // SAFETY: raw allocations of the sizes used below, freed at the end; every copy is on the legacy stream.
    unsafe {
        let (ep, lp, gp) = (malloc_sync(n * d * 4).unwrap(), malloc_sync(n * 8).unwrap(), malloc_sync(n * d * 4).unwrap());
        for step in 0..3 {
            let (e, l) = data(c, d, n, 700 + step);
            memcpy_htod_async(ep, &e, legacy).unwrap();
            memcpy_htod_async(lp, &l, legacy).unwrap();
            let b = device_batch(ep, lp, gp, n, std::ptr::null_mut());
            let mut st = pfc_step_stats::default();
            ok(pfc_train_step(device_head.0, &b, 1, &mut st));
            let mut got = vec![0f32; n * d];
            memcpy_dtoh_async(&mut got, gp, legacy).unwrap();
            synchronize(legacy).unwrap();
            let (want_stats, want) = host_head.step(&e, &l, d, &[n]);
            assert_eq!(st.loss, want_stats.loss, "step {step}: NULL-stream loss");
            assert_eq!(got, want, "step {step}: NULL-stream gradient");
        }
        for p in [ep, lp, gp] {
            free_sync(p).unwrap();
        }
    }
    assert_eq!(device_head.centers(d), host_head.centers(d));
}

/// Evaluation over more classes than one chunk holds (a chunk's cosines and centers may take 1 GiB,
/// or a sixteenth of a smaller GPU: on the emulation's 64 MiB device, 4 MiB), against the CPU
/// backend; a training step after it still matches, so nothing of the evaluation stayed behind in
/// the step's buffers.
#[test]
fn cuda_evaluation_over_several_class_chunks_matches_cpu() {
    if !on_cuda_with(module_path!(), "cuda_evaluation_over_several_class_chunks_matches_cpu", &[("PFC_EMU_DEVICE_MEMORY", "64M")]) {
        return;
    }
    let (d, n) = (64usize, 8usize);
    let total = cudarc::driver::result::init().and_then(|_| unsafe { cudarc::driver::result::device::total_mem(0) }).expect("GPU 0");
    let budget = (1usize << 30).min(total / 16);
    // Two chunks and a part of a third: each column is N f32 cosines and one f32 center.
    let c = (budget / (4 * n + 4 * d) * 5 / 2) as u64;
    let cfg = config(c, d, 0.01, PFC_DTYPE_F32);
    let gpu = cuda_head(&cfg);
    let cpu = TestHead::new(&cfg);
    let (e, mut l) = data(c, d, n, 900);
    // Targets in both chunks.
    l[0] = 5;
    l[1] = c as i64 - 3;
    let (ec, eg) = (cpu.evaluate(&e, &l, d, &[n]), gpu.evaluate(&e, &l, d, &[n]));
    assert_eq!(ec.sampled_classes, c);
    assert_eq!(eg.sampled_classes, c);
    assert!((ec.loss - eg.loss).abs() <= 1e-4 * ec.loss, "evaluation loss {} vs {}", ec.loss, eg.loss);
    assert_eq!(ec.accuracy, eg.accuracy);
    let ((sc, gc), (sg, gg)) = (cpu.step(&e, &l, d, &[n]), gpu.step(&e, &l, d, &[n]));
    assert!((sc.loss - sg.loss).abs() <= 1e-4 * sc.loss, "step after evaluation: loss {} vs {}", sc.loss, sg.loss);
    assert!(rel_err(&gg, &gc) <= 1e-3, "step after evaluation: gradient {}", rel_err(&gg, &gc));
}

/// One shard's f32 batch in device memory at these addresses, ordered on `stream`.
pub(crate) fn device_batch(embeddings: u64, labels: u64, grad: u64, n: usize, stream: *mut std::ffi::c_void) -> pfc_batch {
    pfc_batch {
        embeddings: embeddings as *const _,
        labels: labels as *const _,
        grad_embeddings: grad as *mut _,
        batch_size: n as u64,
        dtype: PFC_DTYPE_F32,
        memory: PFC_MEMORY_DEVICE,
        stream,
    }
}

/// The NCCL path on a one-GPU machine: a job formed the NCCL way (world_size 1, an id from
/// pfc_nccl_unique_id) runs every collective of the step through a one-rank communicator, and
/// matches the CPU backend, including the compute/apply split.
#[test]
fn cuda_through_a_one_rank_nccl_communicator_matches_cpu() {
    if !on_cuda(module_path!(), "cuda_through_a_one_rank_nccl_communicator_matches_cpu") {
        return;
    }
    let (c, d, n) = (4001u64, 64usize, 48usize);
    let cfg = config(c, d, 0.3, PFC_DTYPE_F32);
    let mut id = [0u8; PFC_NCCL_ID_BYTES];
    let mut nccl_cfg = cfg;
    nccl_cfg.world_size = 1;
    nccl_cfg.nccl_id = id.as_ptr();
    assert_eq!(pfc_nccl_unique_id(id.as_mut_ptr()), PFC_OK, "NCCL: {}", last_error());
    let gpu = cuda_head(&nccl_cfg);
    let cpu = TestHead::new(&cfg);
    for step in 0..3 {
        let (e, l) = data(c, d, n, 500 + step);
        let sc = cpu.step(&e, &l, d, &[n]);
        let (sg, gg) = gpu.step(&e, &l, d, &[n]);
        assert_eq!(sc.0.sampled_classes, sg.sampled_classes);
        assert!((sc.0.loss - sg.loss).abs() <= 1e-4 * sc.0.loss, "step {step}: loss {} vs {}", sc.0.loss, sg.loss);
        assert!(rel_err(&gg, &sc.1) <= 1e-3, "step {step}: gradient {}", rel_err(&gg, &sc.1));
        assert!(rel_err(&gpu.centers(d), &cpu.centers(d)) <= 1e-4, "step {step}: centers");
    }
}

/// PFC_ERR_NON_FINITE on the GPU: SGD at lr 1e4, weight decay 0.5, momentum 1 diverges within a
/// few steps; every refused step leaves the centers bit-identical.
#[test]
fn cuda_refuses_non_finite_steps() {
    if !on_cuda(module_path!(), "cuda_refuses_non_finite_steps") {
        return;
    }
    let (c, d, n) = (997u64, 32usize, 16usize);
    let mut cfg = config(c, d, 0.5, PFC_DTYPE_F32);
    cfg.lr = 1e4;
    cfg.weight_decay = 0.5;
    cfg.momentum = 1.0;
    let gpu = cuda_head(&cfg);
    let mut refused = 0;
    for step in 0..40 {
        let (e, l) = data(c, d, n, 700 + step);
        let before = gpu.centers(d);
        let mut grad = vec![7f32; e.len()];
        let b = host_batches(&e, &l, &mut grad, d, &[l.len()]);
        match pfc_train_step(gpu.0, b.as_ptr(), 1, std::ptr::null_mut()) {
            PFC_OK => assert!(gpu.centers(d).iter().all(|v| v.is_finite()) && grad.iter().all(|v| v.is_finite())),
            PFC_ERR_NON_FINITE => {
                refused += 1;
                assert_eq!(gpu.centers(d), before, "step {step}: a refused step changed centers");
                assert!(grad.iter().all(|&v| v == 7.0), "step {step}: a refused step wrote gradients");
            }
            s => panic!("step {step}: status {s}: {}", last_error()),
        }
    }
    assert!(refused > 0, "no step was refused");
}

/// Gradient accumulation on the GPU equals the CPU's (two computes, one apply).
#[test]
fn cuda_accumulates_like_cpu() {
    if !on_cuda(module_path!(), "cuda_accumulates_like_cpu") {
        return;
    }
    let (c, d, n) = (3001u64, 64usize, 24usize);
    let cfg = config(c, d, 0.2, PFC_DTYPE_F32);
    let gpu = cuda_head(&cfg);
    let cpu = TestHead::new(&cfg);
    for h in [&cpu, &gpu] {
        for seed in [1, 2] {
            let (e, l) = data(c, d, n, 900 + seed);
            let mut grad = vec![0f32; e.len()];
            let b = host_batches(&e, &l, &mut grad, d, &[l.len()]);
            ok(pfc_train_compute(h.0, b.as_ptr(), 1, std::ptr::null_mut()));
        }
        ok(pfc_train_apply(h.0));
    }
    assert!(rel_err(&gpu.centers(d), &cpu.centers(d)) <= 1e-4, "accumulated centers {}", rel_err(&gpu.centers(d), &cpu.centers(d)));
}

/// Two processes' worth of CUDA heads (threads here) joined by a host all-gather that behaves as
/// MPI_Allgather (every process must send as many bytes): the NCCL bootstrap through the callback
/// and NCCL between them, with one GPU each and with one GPU against two (processes of unequal shard
/// counts), against a CPU head of as many shards; with the adaptive margins too, every process
/// computing the CPU head's running statistics (CurricularFace's from target cosines exchanged
/// between the processes). Needs three GPUs (NCCL refuses two ranks on one
/// GPU); on a one-GPU machine the one-rank communicator test above covers the NCCL code and
/// tests/all/mpi.rs the process group.
#[test]
fn cuda_over_two_processes_matches_one_process() {
    if !on_cuda(module_path!(), "cuda_over_two_processes_matches_one_process") {
        return;
    }
    let count = cudarc::driver::result::init().and_then(|_| cudarc::driver::result::device::get_count()).expect("the CUDA driver");
    if count < 3 {
        // The lent GPU machine has one GPU; the emulation has four, and runs this job on every commit.
        assert!(std::env::var_os("PFC_EMU_CHILD").is_none(), "the emulation offers {count} GPUs");
        eprintln!("{count} GPU(s): the two-process NCCL jobs need three");
        return;
    }
    for layout in [vec![vec![0], vec![1]], vec![vec![0], vec![1, 2]]] {
        two_processes_match_one(&layout, PFC_MARGIN_COMBINED);
    }
    for margin in [PFC_MARGIN_ADAFACE, PFC_MARGIN_CURRICULAR] {
        two_processes_match_one(&[vec![0], vec![1, 2]], margin);
    }
}

fn two_processes_match_one(layout: &[Vec<i32>], margin: i32) {
    use std::sync::{Arc, Barrier, Mutex};
    struct Group {
        slots: Mutex<Vec<Vec<u8>>>,
        barrier: Barrier,
    }
    struct Member {
        group: Arc<Group>,
        index: usize,
    }
    unsafe extern "C" fn allgather(ctx: *mut std::ffi::c_void, send: *const std::ffi::c_void, bytes: usize, recv: *mut std::ffi::c_void) -> i32 {
        let m = &*(ctx as *const Member);
        m.group.slots.lock().unwrap()[m.index] = std::slice::from_raw_parts(send.cast::<u8>(), bytes).to_vec();
        m.group.barrier.wait();
        let all = m.group.slots.lock().unwrap().clone();
        // MPI_Allgather's contract: one size everywhere, `recv` holding process_count × bytes.
        let same = all.iter().all(|part| part.len() == bytes);
        if same {
            std::ptr::copy_nonoverlapping(all.concat().as_ptr(), recv.cast::<u8>(), bytes * all.len());
        }
        m.group.barrier.wait();
        if same { 0 } else { 1 }
    }
    let (c, d, n) = (6007u64, 64usize, 36usize);
    let shards: Vec<usize> = layout.iter().map(|g| g.len()).collect();
    let world = shards.iter().sum::<usize>();
    let rows = even_split(n, world);
    let mut cfg = config(c, d, 0.3, PFC_DTYPE_F32);
    cfg.margin_kind = margin;
    let group = Arc::new(Group { slots: Mutex::new(vec![Vec::new(); layout.len()]), barrier: Barrier::new(layout.len()) });
    let batches: Vec<(Vec<f32>, Vec<i64>)> = (0..3).map(|s| data(c, d, n, 1100 + s)).collect();
    let reference = TestHead::new(&{
        let mut r = cfg;
        r.local_shards = world as u32;
        r
    });
    let want: Vec<(f64, Vec<f32>)> = batches.iter().map(|(e, l)| {
        let (st, g) = reference.step(e, l, d, &rows);
        (st.loss, g)
    }).collect();
    let threads: Vec<_> = layout
        .iter()
        .enumerate()
        .map(|(p, devices)| {
            let (group, batches, devices) = (group.clone(), batches.clone(), devices.clone());
            let first: usize = shards[..p].iter().sum();
            let mine = rows[first..first + devices.len()].to_vec();
            let at: usize = rows[..first].iter().sum();
            let count = layout.len() as u32;
            std::thread::spawn(move || {
                let member = Box::new(Member { group, index: p });
                let mut c2 = config(c, d, 0.3, PFC_DTYPE_F32);
                c2.margin_kind = margin;
                c2.backend = PFC_BACKEND_CUDA;
                c2.local_shards = devices.len() as u32;
                c2.devices = devices.as_ptr();
                c2.process_count = count;
                c2.process_index = p as u32;
                c2.allgather = Some(allgather);
                c2.allgather_ctx = (&*member as *const Member).cast_mut().cast();
                let mut h = std::ptr::null_mut();
                ok(pfc_create(&c2, &mut h));
                let h = TestHead(h);
                let total: usize = mine.iter().sum();
                let mut out = Vec::new();
                for (e, l) in &batches {
                    let (st, g) = h.step(&e[at * d..(at + total) * d], &l[at..at + total], d, &mine);
                    out.push((st.loss, g));
                }
                let state = h.margin_state();
                drop(h);
                drop(member);
                (out, state)
            })
        })
        .collect();
    let (results, states): (Vec<_>, Vec<_>) = threads.into_iter().map(|t| t.join().unwrap()).unzip();
    let want_state = reference.margin_state();
    for (p, state) in states.iter().enumerate() {
        if margin == PFC_MARGIN_COMBINED {
            assert!(state.is_empty(), "{layout:?}: process {p} keeps statistics {state:?}");
        } else {
            crate::gpu_margins::assert_same_statistics(state, &want_state, &format!("{layout:?}, margin {margin}, process {p}"));
        }
    }
    for (t, (loss, grad)) in want.iter().enumerate() {
        for (p, r) in results.iter().enumerate() {
            assert!((r[t].0 - loss).abs() <= 1e-4 * loss, "{layout:?}: step {t} process {p}: loss {} vs {loss}", r[t].0);
        }
        let got: Vec<f32> = results.iter().flat_map(|r| r[t].1.iter().copied()).collect();
        assert!(rel_err(&got, grad) <= 1e-3, "{layout:?}: step {t}: gradients {}", rel_err(&got, grad));
    }
}
