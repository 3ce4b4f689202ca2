//! What a CUDA training step does on the device, counted: after a warm-up step no allocation and
//! no memset, no staging of device batches through the host, and no wait but for the verdicts
//! (issue "The CUDA step as designed"); device batches checked where they lie. The counts come
//! from the emulation's counters (tests/cuda-emulator/README.md); on a GPU, where the driver
//! counts nothing, the memory pool's use standing still across warm steps is what is checked.

use crate::common::*;
use crate::gpu::{data, device_batch};
use crate::gpu_jobs::{config, cuda_head};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PushKernelArg};
use partialfc::ffi::*;
use serde_json::Value;
use std::sync::Arc;

/// The library's own `convert_f32` (f32 to f32: a copy), as a caller's kernel reading a gradient.
fn copy_kernel(ctx: &Arc<CudaContext>) -> CudaFunction {
    use cudarc::driver::sys::CUdevice_attribute::{CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR};
    use partialfc::backend::cuda::kernels::{arch_of, cubin_for};
    let arch = arch_of((ctx.attribute(MAJOR).unwrap(), ctx.attribute(MINOR).unwrap()));
    let (_, cubin) = cubin_for(&arch).unwrap().into_iter().find(|(k, _)| k.file == "normalize.cu").unwrap();
    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).unwrap().load_function("convert_f32").unwrap()
}

/// A trainer's device buffers for one batch on `stream`.
struct DeviceRows {
    e: CudaSlice<f32>,
    l: CudaSlice<i64>,
    g: CudaSlice<f32>,
    rows: usize,
}

impl DeviceRows {
    /// A batch of `l.len()` rows (buffers of one value where there are none: CUDA allocates no
    /// empty buffer), its gradient buffer filled with 7s.
    fn new(stream: &Arc<CudaStream>, e: &[f32], l: &[i64]) -> DeviceRows {
        let upload = |v: &[f32]| stream.clone_htod(if v.is_empty() { &[0f32][..] } else { v }).unwrap();
        let labels = stream.clone_htod(if l.is_empty() { &[0i64][..] } else { l }).unwrap();
        DeviceRows { e: upload(e), l: labels, g: upload(&vec![7f32; e.len()]), rows: l.len() }
    }

    fn batch(&mut self, stream: &Arc<CudaStream>) -> pfc_batch {
        let (ep, _a) = self.e.device_ptr(stream);
        let (lp, _b) = self.l.device_ptr(stream);
        let (gp, _c) = self.g.device_ptr_mut(stream);
        device_batch(ep, lp, gp, self.rows, stream.cu_stream().cast())
    }
}

/// Per-step counts of GPU `device` over `steps` steps: `(counter, value)` as `emu_counters` names them.
fn per_step(before: &Value, after: &Value, steps: u64, keys: &[&str]) -> Vec<(String, u64)> {
    keys.iter()
        .map(|&k| {
            let total = counter_delta(before, after, k);
            assert_eq!(total % steps, 0, "{k}: {total} over {steps} steps is not the same every step");
            (k.to_string(), total / steps)
        })
        .collect()
}

const COUNTED: [&str; 16] = [
    "allocations",
    "frees",
    "memsets",
    "htod",
    "dtoh",
    "dtoh_bytes",
    "synchronizations",
    "launches.cublasGemmEx",
    "launches.row_stats",
    "launches.cos_gradient",
    "launches.target_logits",
    "launches.sample_keys",
    "launches.embedding_norms",
    "launches.adaface_scalers",
    "launches.target_cosines",
    "launches.curricular_margins",
];

/// Every margin kind: the adaptive ones must keep the combined margin's budget.
const MARGINS: [i32; 3] = [PFC_MARGIN_COMBINED, PFC_MARGIN_ADAFACE, PFC_MARGIN_CURRICULAR];

/// The counts of [`COUNTED`] a warm training step with `margin` (`PFC_MARGIN_*`) must make on a
/// GPU: no allocation, free, memset or synchronisation; `uploads` and `reads` copies, the reads of
/// `read_bytes` in all; the cosines written by one GEMM and passed over by one kernel forward and
/// one backward; one sampling. AdaFace adds its norms and its statistics with the row scalers,
/// CurricularFace its target cosines (and their all-reduce) and its t with the rows' thresholds,
/// one launch each, and nothing else: their running statistics stay on the device.
fn warm_step(uploads: u64, reads: u64, read_bytes: u64, margin: i32) -> Vec<(String, u64)> {
    let (adaface, curricular) = (u64::from(margin == PFC_MARGIN_ADAFACE), u64::from(margin == PFC_MARGIN_CURRICULAR));
    let counts = [0, 0, 0, uploads, reads, read_bytes, 0, 3, 1, 1, 1, 1, adaface, adaface, curricular, curricular];
    COUNTED.iter().zip(counts).map(|(k, v)| (k.to_string(), v)).collect()
}

/// Bytes the default memory pool of GPU `ordinal` holds for the head, used and reserved.
fn pool_use(ordinal: i32) -> (u64, u64) {
    use cudarc::driver::{result, sys::CUmemPool_attribute::*};
    // SAFETY: the attributes are u64 values of the device's default pool.
    unsafe {
        let pool = result::device::get_default_mem_pool(result::device::get(ordinal).unwrap()).unwrap();
        let get = |a| {
            let mut v = 0u64;
            result::mem_pool::get_attribute(pool, a, (&mut v as *mut u64).cast()).unwrap();
            v
        };
        (get(CU_MEMPOOL_ATTR_USED_MEM_CURRENT), get(CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT))
    }
}

/// A trainer's loop on device batches without statistics (`stats == NULL`), as a backbone would
/// run it: its kernel reads each gradient right after the step on its own stream. After two
/// warm-up steps, each step allocates and sets nothing, copies nothing from the host, and reads
/// back two verdicts of 48 bytes: the device batch's checks, before anything is exchanged, and the
/// step's finiteness, before anything changes (the sampled count is not read: the 40 rows cannot
/// hold more positives than the 1,000 negatives budget). The cosines are written once (one GEMM)
/// and read by two kernels (`row_stats` forward, `cos_gradient` backward). The gradients and
/// centers are those of a head given the same rows as host batches. The same with the adaptive
/// margins, whose running statistics never leave the device in a step.
#[test]
fn a_warm_step_on_device_batches_allocates_nothing_and_waits_only_for_its_verdicts() {
    if !on_cuda(module_path!(), "a_warm_step_on_device_batches_allocates_nothing_and_waits_only_for_its_verdicts") {
        return;
    }
    for margin in MARGINS {
        warm_steps_on_device_batches(margin);
    }
}

fn warm_steps_on_device_batches(margin: i32) {
    let (c, d, n) = (5003u64, 64usize, 40usize);
    let mut cfg = config(c, d, 0.2, PFC_DTYPE_F32, 1);
    cfg.margin_kind = margin;
    let (warm, measured) = (2usize, 3usize);
    let batches: Vec<(Vec<f32>, Vec<i64>)> = (0..warm + measured).map(|s| data(c, d, n, 500 + s as u64)).collect();
    let host_head = cuda_head(&cfg, &[0]);
    let want: Vec<Vec<f32>> = batches.iter().map(|(e, l)| host_head.step(e, l, d, &[n]).1).collect();

    let device_head = cuda_head(&cfg, &[0]);
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let copy = copy_kernel(&ctx);
    // Everything of the test's own is on the device before the counted steps.
    let mut rows: Vec<DeviceRows> = batches.iter().map(|(e, l)| DeviceRows::new(&stream, e, l)).collect();
    let mut read: Vec<CudaSlice<f32>> = (0..batches.len()).map(|_| stream.alloc_zeros::<f32>(n * d).unwrap()).collect();
    let len = (n * d) as u64;
    let mut counted = None;
    for (step, (r, out)) in rows.iter_mut().zip(read.iter_mut()).enumerate() {
        if step == warm {
            stream.synchronize().unwrap();
            counted = Some((emu_counters(0), pool_use(0)));
        }
        let b = r.batch(&stream);
        ok(pfc_train_step(device_head.0, &b, 1, std::ptr::null_mut()));
        let mut launch = stream.launch_builder(&copy);
        launch.arg(&r.g).arg(&len).arg(out).arg(&PFC_DTYPE_F32);
        // SAFETY: kernels/normalize.cu `convert_f32(const float*, u64, void*, int)`; both hold n·d floats.
        unsafe { launch.launch(cudarc::driver::LaunchConfig::for_num_elems(len as u32)) }.unwrap();
    }
    let (before, pool_before) = counted.unwrap();
    let after = emu_counters(0);
    let pool_after = pool_use(0);
    for (step, out) in read.iter().enumerate() {
        let got: Vec<f32> = stream.clone_dtoh(out).unwrap();
        assert_eq!(got, want[step], "margin {margin}, step {step}: the gradient a kernel read after a step without statistics");
    }
    assert_eq!(device_head.centers(d), host_head.centers(d), "margin {margin}");
    assert_eq!(device_head.margin_state(), host_head.margin_state(), "margin {margin}");
    match (before, after) {
        (Some(before), Some(after)) => {
            assert_eq!(per_step(&before, &after, measured as u64, &COUNTED), warm_step(0, 2, 2 * 48, margin), "margin {margin}, per warm step");
        }
        _ => {
            assert!(!emulated(), "the emulation's counters could not be read");
            // A GPU's driver counts nothing: the pool holding as much after three more steps as
            // after the warm-up shows that no step allocated beyond its workspace.
            assert_eq!(pool_after, pool_before, "margin {margin}: the memory pool's (used, reserved) bytes moved across warm steps");
        }
    }
}

/// Device batches with a bad row are refused where they lie: a label outside [0, C) (above, and
/// negative), a NaN, an Inf, a row whose norm (above 2^62) cannot be normalized in f32 — each with
/// the status and message the same rows get as a host batch, nothing written to the gradient
/// buffer, no center moved, AdaFace's running statistics as they were; and the next good step
/// matches a head that never saw them.
#[test]
fn device_batches_with_bad_rows_are_refused_on_the_device_and_change_nothing() {
    if !on_cuda(module_path!(), "device_batches_with_bad_rows_are_refused_on_the_device_and_change_nothing") {
        return;
    }
    let (c, d, n) = (3001u64, 32usize, 24usize);
    let mut cfg = config(c, d, 0.3, PFC_DTYPE_F32, 1);
    cfg.margin_kind = PFC_MARGIN_ADAFACE;
    let (device_head, host_head) = (cuda_head(&cfg, &[0]), cuda_head(&cfg, &[0]));
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let (e, l) = data(c, d, n, 77);
    let before = device_head.centers(d);
    type Spoil = fn(&mut Vec<f32>, &mut Vec<i64>, usize);
    let spoils: [(&str, Spoil); 6] = [
        ("label C", |_, l, _| l[5] = 3001),
        ("label -1", |_, l, _| l[9] = -1),
        ("NaN", |e, _, d| e[7 * d + 3] = f32::NAN),
        ("Inf", |e, _, d| e[2 * d] = f32::NEG_INFINITY),
        ("norm above 2^62", |e, _, d| e[11 * d..12 * d].iter_mut().for_each(|v| *v = 1e18)),
        ("NaN after a bad label", |e, l, d| {
            e[d] = f32::NAN;
            l[20] = 5000;
        }),
    ];
    for (what, spoil) in spoils {
        let (mut bad_e, mut bad_l) = (e.clone(), l.clone());
        spoil(&mut bad_e, &mut bad_l, d);
        let mut rows = DeviceRows::new(&stream, &bad_e, &bad_l);
        let b = rows.batch(&stream);
        let mut stats = pfc_step_stats { loss: -1.0, step: 99, ..Default::default() };
        assert_eq!(pfc_train_step(device_head.0, &b, 1, &mut stats), PFC_ERR_INVALID_ARGUMENT, "{what}");
        let on_device = last_error();
        let mut grad = vec![0f32; bad_e.len()];
        let hb = host_batches(&bad_e, &bad_l, &mut grad, d, &[n]);
        assert_eq!(pfc_train_step(host_head.0, hb.as_ptr(), 1, std::ptr::null_mut()), PFC_ERR_INVALID_ARGUMENT, "{what} (host batch)");
        assert_eq!(on_device, last_error(), "{what}: the device batch's message differs from the host batch's");
        assert_eq!((stats.loss, stats.step), (-1.0, 99), "{what}: statistics written");
        let written: Vec<f32> = stream.clone_dtoh(&rows.g).unwrap();
        assert!(written.iter().all(|&v| v == 7.0), "{what}: the gradient buffer was written");
        assert_eq!(device_head.centers(d), before, "{what}: centers moved");
        assert_eq!(device_head.margin_state(), [20.0, 100.0], "{what}: the running statistics moved");
    }
    let mut rows = DeviceRows::new(&stream, &e, &l);
    let b = rows.batch(&stream);
    ok(pfc_train_step(device_head.0, &b, 1, std::ptr::null_mut()));
    let (_, want) = host_head.step(&e, &l, d, &[n]);
    assert_eq!(stream.clone_dtoh(&rows.g).unwrap(), want);
    assert_eq!(device_head.centers(d), host_head.centers(d));
    assert_eq!(device_head.margin_state(), host_head.margin_state());
}

/// Two GPUs of one process fed host batches, with statistics, where the global batch (96 rows)
/// has more rows than a shard's negatives budget (50 of ~1,000 classes): after a warm-up step,
/// each step still allocates and sets nothing; each GPU's reads are the sampled count (8 bytes,
/// which the GEMMs' shapes need), the step's verdict (48 bytes) and its shard's gradient (the host
/// output), and GPU 0's also the two reduced statistics the caller asked for. (A step sampling more
/// classes than any before it allocates what grew.) Host batches are
/// uploaded once: embeddings and labels. Losses and gradients match the CPU backend; with the
/// adaptive margins too, and their running statistics, which each GPU computes for itself, with no
/// more copies.
#[test]
fn a_warm_step_on_two_gpus_reads_back_its_count_verdict_statistics_and_outputs_only() {
    if !on_cuda(module_path!(), "a_warm_step_on_two_gpus_reads_back_its_count_verdict_statistics_and_outputs_only") {
        return;
    }
    if !crate::gpu_jobs::has_gpus(2, "a two-GPU step") {
        return;
    }
    for margin in MARGINS {
        warm_steps_on_two_gpus(margin);
    }
}

fn warm_steps_on_two_gpus(margin: i32) {
    let (c, d, n) = (2003u64, 32usize, 96usize);
    let mut cfg = config(c, d, 0.05, PFC_DTYPE_F32, 2);
    cfg.margin_kind = margin;
    let (gpu, cpu) = (cuda_head(&cfg, &[0, 1]), TestHead::new(&cfg));
    let (warm, measured) = (1usize, 3usize);
    let mut counted = Vec::new();
    // The same labels every step, so that every step samples as many classes (positives beyond
    // the budget make the count, and the step's shape, vary); a larger step would grow buffers.
    let (_, l) = data(c, d, n, 40);
    for step in 0..warm + measured {
        let (e, _) = data(c, d, n, 40 + step as u64);
        let mut grad = vec![0f32; n * d];
        let b = host_batches(&e, &l, &mut grad, d, &[n / 2, n / 2]);
        let mut stats = pfc_step_stats::default();
        if step == warm {
            counted = (0..2).map(|g| (emu_counters(g), pool_use(g))).collect();
        }
        ok(pfc_train_step(gpu.0, b.as_ptr(), 2, &mut stats));
        let (want, want_grad) = cpu.step(&e, &l, d, &[n / 2, n / 2]);
        assert!((stats.loss - want.loss).abs() <= 1e-4 * want.loss, "margin {margin}, step {step}: loss {} vs {}", stats.loss, want.loss);
        assert!(rel_err(&grad, &want_grad) < 1e-3, "margin {margin}, step {step}: gradient {}", rel_err(&grad, &want_grad));
    }
    let stats_bytes = 2 * 3 * n as u64 * 4;
    let shard_grad = (n / 2 * d * 4) as u64;
    for (g, (before, pool_before)) in counted.into_iter().enumerate() {
        match (before, emu_counters(g as i32)) {
            (Some(before), Some(after)) => {
                let (reads, read_bytes) = if g == 0 { (5, 8 + stats_bytes + 48 + shard_grad) } else { (3, 8 + 48 + shard_grad) };
                assert_eq!(per_step(&before, &after, measured as u64, &COUNTED), warm_step(2, reads, read_bytes, margin), "margin {margin}, GPU {g}, per warm step");
            }
            _ => {
                assert!(!emulated(), "the emulation's counters could not be read");
                assert_eq!(pool_use(g as i32), pool_before, "margin {margin}, GPU {g}: the memory pool's (used, reserved) bytes moved across warm steps");
            }
        }
    }
    // Read after the counted steps: reading them is a copy of its own.
    let (got, want) = (gpu.margin_state(), cpu.margin_state());
    if margin == PFC_MARGIN_COMBINED {
        assert!(got.is_empty() && want.is_empty(), "the combined margin keeps statistics: {got:?}, {want:?}");
    } else {
        crate::gpu_margins::assert_same_statistics(&got, &want, &format!("margin {margin}"));
    }
}

/// Device batches on two GPUs, the second with no rows this step: the gradient is ordered on each
/// caller's stream from that GPU's own context (an event recorded on another context's stream is
/// refused by the driver), and the step matches the same rows given as host batches.
#[test]
fn device_batches_on_two_gpus_one_without_rows_match_host_batches() {
    if !on_cuda(module_path!(), "device_batches_on_two_gpus_one_without_rows_match_host_batches") {
        return;
    }
    if !crate::gpu_jobs::has_gpus(2, "device batches on two GPUs") {
        return;
    }
    let (c, d, n) = (2003u64, 32usize, 20usize);
    let cfg = config(c, d, 0.5, PFC_DTYPE_F32, 2);
    let (device_head, host_head) = (cuda_head(&cfg, &[0, 1]), cuda_head(&cfg, &[0, 1]));
    let contexts = [CudaContext::new(0).unwrap(), CudaContext::new(1).unwrap()];
    let streams: Vec<Arc<CudaStream>> = contexts.iter().map(|c| c.new_stream().unwrap()).collect();
    for (step, split) in [[n, 0], [n / 2, n - n / 2], [0, n]].into_iter().enumerate() {
        let (e, l) = data(c, d, n, 60 + step as u64);
        let mut rows: Vec<DeviceRows> = streams
            .iter()
            .zip([0..split[0], split[0]..n])
            .map(|(s, r)| DeviceRows::new(s, &e[r.start * d..r.end * d], &l[r.clone()]))
            .collect();
        let batches: Vec<pfc_batch> = rows.iter_mut().zip(&streams).map(|(r, s)| r.batch(s)).collect();
        ok(pfc_train_step(device_head.0, batches.as_ptr(), 2, std::ptr::null_mut()));
        let (_, want) = host_head.step(&e, &l, d, &split);
        let got: Vec<f32> = rows.iter().zip(&streams).flat_map(|(r, s)| if r.rows == 0 { Vec::new() } else { s.clone_dtoh(&r.g).unwrap() }).collect();
        assert_eq!(got, want, "step {step} ({split:?} rows)");
    }
    assert_eq!(device_head.centers(d), host_head.centers(d));
}
