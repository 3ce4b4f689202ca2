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
}

impl DeviceRows {
    fn new(stream: &Arc<CudaStream>, e: &[f32], l: &[i64]) -> DeviceRows {
        DeviceRows { e: stream.clone_htod(e).unwrap(), l: stream.clone_htod(l).unwrap(), g: stream.clone_htod(&vec![7f32; e.len()]).unwrap() }
    }

    fn batch(&mut self, stream: &Arc<CudaStream>) -> pfc_batch {
        let (ep, _a) = self.e.device_ptr(stream);
        let (lp, _b) = self.l.device_ptr(stream);
        let (gp, _c) = self.g.device_ptr_mut(stream);
        device_batch(ep, lp, gp, self.l.len(), stream.cu_stream().cast())
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

const COUNTED: [&str; 12] = [
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
];

fn emulated() -> bool {
    std::env::var_os("PFC_EMU_CHILD").is_some()
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
/// centers are those of a head given the same rows as host batches.
#[test]
fn a_warm_step_on_device_batches_allocates_nothing_and_waits_only_for_its_verdicts() {
    if !on_cuda(module_path!(), "a_warm_step_on_device_batches_allocates_nothing_and_waits_only_for_its_verdicts") {
        return;
    }
    let (c, d, n) = (5003u64, 64usize, 40usize);
    let cfg = config(c, d, 0.2, PFC_DTYPE_F32, 1);
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
        assert_eq!(got, want[step], "step {step}: the gradient a kernel read after a step without statistics");
    }
    assert_eq!(device_head.centers(d), host_head.centers(d));
    match (before, after) {
        (Some(before), Some(after)) => {
            let want: Vec<(String, u64)> = [
                ("allocations", 0),
                ("frees", 0),
                ("memsets", 0),
                ("htod", 0),
                ("dtoh", 2),
                ("dtoh_bytes", 2 * 48),
                ("synchronizations", 0),
                ("launches.cublasGemmEx", 3),
                ("launches.row_stats", 1),
                ("launches.cos_gradient", 1),
                ("launches.target_logits", 1),
                ("launches.sample_keys", 1),
            ]
            .iter()
            .map(|&(k, v)| (k.to_string(), v))
            .collect();
            assert_eq!(per_step(&before, &after, measured as u64, &COUNTED), want, "per warm step");
        }
        _ => {
            assert!(!emulated(), "the emulation's counters could not be read");
            // A GPU's driver counts nothing: the pool holding as much after three more steps as
            // after the warm-up shows that no step allocated beyond its workspace.
            assert_eq!(pool_after, pool_before, "the memory pool's (used, reserved) bytes moved across warm steps");
        }
    }
}
