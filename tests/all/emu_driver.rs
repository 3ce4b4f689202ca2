//! Self-tests of the emulated CUDA driver (tests/cuda-emulator/driver.cc) and of its execution model
//! for host-built kernels (blocks.cc), through cudarc as the backend uses the driver.
//!
//! The kernels are tests/cuda-emulator/selftest.cu, compiled by NVRTC and loaded as PTX; on the
//! emulation its host build (target/cuda-emulator/libpfc_emu_selftest.so, built by
//! scripts/cuda-emulator.sh) is loaded first so that the driver finds a host build for each entry.
//! Each test runs where CUDA is usable (`common::on_cuda`): on the emulation, in a child process, or
//! on a GPU, so what is asserted for both is what CUDA documents. Deliberate faults (a missing or
//! partial barrier, accesses past an allocation, freed memory), the settings that expose races
//! (PFC_EMU_ORDER, PFC_EMU_SEED, PFC_EMU_DELAY) and the counters are the emulation's alone. A fault
//! leaves its context unusable, so each runs in a process of its own (`worker`), whose stderr
//! carries the emulation's report.

use crate::common::{child_passed, child_test, counter_delta as delta, emu_counters as counters, emulated, emulator_dir, on_cuda, on_cuda_with, test_path, Rng, StreamGate};
use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{result, CudaContext, CudaModule, CudaStream, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use libloading::Library;
use serde_json::Value;
use std::ffi::c_void;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn err(code: CUresult) -> DriverError {
    DriverError(code)
}

/// A stream of GPU 0 and selftest.cu loaded there.
struct SelfTest {
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
}

fn selftest() -> SelfTest {
    static HOST_BUILD: OnceLock<Library> = OnceLock::new();
    let ctx = CudaContext::new(0).unwrap();
    if emulated() {
        // Registers the host builds of selftest.cu's kernels with the emulated driver, which refuses
        // a module with an entry point it has no host build of. Never unloaded: the driver's
        // registry points into it.
        HOST_BUILD.get_or_init(|| {
            let path = emulator_dir().join("libpfc_emu_selftest.so");
            // SAFETY: the library's initialisers only register its kernels with the driver.
            unsafe { Library::new(&path) }.unwrap_or_else(|e| panic!("{}: {e} (run bash scripts/cuda-emulator.sh)", path.display()))
        });
    }
    let opts = CompileOptions { arch: Some("sm_90"), ..Default::default() };
    let ptx = compile_ptx_with_opts(include_str!("../cuda-emulator/selftest.cu"), opts).unwrap();
    let module = ctx.load_module(ptx).unwrap();
    SelfTest { stream: ctx.new_stream().unwrap(), module }
}

impl SelfTest {
    fn raw(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    /// A device buffer holding `values`, in place when the call returns. Not freed: a test makes
    /// a few small ones, and its process (or the GPU check's) ends soon after.
    fn upload<T: Copy>(&self, values: &[T]) -> sys::CUdeviceptr {
        // SAFETY: the buffer holds exactly `values`; the synchronous copy is complete on return.
        unsafe {
            let p = result::malloc_sync(std::mem::size_of_val(values)).unwrap();
            result::memcpy_htod_sync(p, values).unwrap();
            p
        }
    }

    /// `len` values of type T from `p`, after the stream's work queued so far.
    fn download<T: Copy + Default>(&self, p: sys::CUdeviceptr, len: usize) -> Vec<T> {
        let mut out = vec![T::default(); len];
        // SAFETY: `p` holds at least `len` values of T; a copy to pageable memory is complete on
        // return, and the synchronization reports a fault of the work before it.
        unsafe { result::memcpy_dtoh_async(&mut out, p, self.raw()) }.unwrap();
        self.stream.synchronize().unwrap();
        out
    }

    /// Launches `kernel` with `args` (device pointers as u64, scalars as u32) on the stream.
    fn launch(&self, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[&dyn Arg]) -> Result<(), DriverError> {
        let f = self.module.load_function(kernel).unwrap();
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: every caller passes the kernel's parameters in order with their types, over
        // buffers as large as the kernel reads and writes, except where a fault is the point.
        unsafe { b.launch(LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: 0 }) }.map(|_| ())
    }
}

/// A kernel argument of a type selftest.cu takes.
trait Arg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}
impl Arg for u64 {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}
impl Arg for u32 {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}

/// `selftest_block_sum` or its twin without the barrier, over `blocks` blocks of `threads` threads
/// summing `per_block` values each: the sums, and the exact ones. Every value is an integer and
/// every sum below 2^24, so a correct reduction is exact in any order. `salt` sets this launch's
/// values apart from other launches' (a block that runs after another on the same host thread, or
/// on the same multiprocessor, may find in shared memory the sums its predecessor left).
fn block_sums(t: &SelfTest, kernel: &str, blocks: u32, threads: u32, per_block: u32, salt: u32) -> (Vec<f32>, Vec<f32>) {
    let values: Vec<f32> = (0..blocks * per_block).map(|i| (salt * blocks + i / per_block + 1 + i % 3) as f32).collect();
    let want: Vec<f32> = values.chunks(per_block as usize).map(|c| c.iter().sum()).collect();
    let input = t.upload(&values);
    let out = t.upload(&vec![f32::NAN; blocks as usize]);
    t.launch(kernel, (blocks, 1, 1), (threads, 1, 1), &[&input, &per_block, &out]).unwrap();
    (t.download(out, blocks as usize), want)
}

#[test]
fn a_block_reduction_and_a_ballot_compaction_are_exact() {
    if !on_cuda(module_path!(), "a_block_reduction_and_a_ballot_compaction_are_exact") {
        return;
    }
    let t = selftest();
    // 1000 values per block leave part of the last stride idle; 1024 threads fill all 32 warps.
    for (blocks, threads, per_block) in [(16, 256, 1000), (4, 1024, 3000), (8, 32, 100)] {
        let (got, want) = block_sums(&t, "selftest_block_sum", blocks, threads, per_block, 0);
        assert_eq!(got, want, "{blocks} blocks of {threads} threads, {per_block} values each");
    }

    // Segments of 500 over chunks of 96 threads (3 warps): the last chunk is partly past the segment.
    let (blocks, segment) = (6u32, 500u32);
    let mut rng = Rng(11);
    let values: Vec<i32> = (0..blocks * segment).map(|_| rng.below(11) as i32 - 5).collect();
    let input = t.upload(&values);
    let out = t.upload(&vec![i32::MIN; values.len()]);
    let counts = t.upload(&vec![u32::MAX; blocks as usize]);
    t.launch("selftest_compact", (blocks, 1, 1), (96, 1, 1), &[&input, &segment, &out, &counts]).unwrap();
    let (got, got_counts) = (t.download::<i32>(out, values.len()), t.download::<u32>(counts, blocks as usize));
    for (b, seg) in values.chunks(segment as usize).enumerate() {
        let kept: Vec<i32> = seg.iter().copied().filter(|&v| v > 0).collect();
        assert_eq!(got_counts[b] as usize, kept.len(), "block {b}'s count");
        let at = b * segment as usize;
        assert_eq!(&got[at..at + kept.len()], &kept[..], "block {b}'s kept values, in order");
        assert!(got[at + kept.len()..at + segment as usize].iter().all(|&v| v == i32::MIN), "block {b} wrote past its kept values");
    }
}

/// Runs the reduction without its barrier next to the one with it: the first gives wrong sums in
/// at least `min_wrong` of 64 blocks, the second none. Warp 0 reads the other warps' sums from
/// shared memory right after their lane 0 writes them, with no barrier between: in the round of
/// the emulation where that happens, each of warp 0's lanes 1–7 runs before or after the other
/// warp's lane 0 as the order puts them, and a block's sum is right only when every write comes
/// first.
fn check_missing_barrier(min_wrong: usize) {
    let t = selftest();
    let (got, want) = block_sums(&t, "selftest_block_sum_unsynced", 64, 256, 512, 1);
    let wrong = got.iter().zip(&want).filter(|(g, w)| g != w).count();
    assert!(wrong >= min_wrong, "only {wrong} of 64 blocks went wrong without the barrier: {got:?}");
    let (got, want) = block_sums(&t, "selftest_block_sum", 64, 256, 512, 2);
    assert_eq!(got, want, "with the barrier");
}

#[test]
fn a_missing_barrier_gives_wrong_sums_in_the_shuffled_order() {
    if !on_cuda(module_path!(), "a_missing_barrier_gives_wrong_sums_in_the_shuffled_order") || !emulated() {
        // A GPU's warps may happen to run in the one order that hides the race.
        return;
    }
    // A block comes out right with probability about 2^-7: 48 of 64 leaves a wide margin.
    check_missing_barrier(48);
}

#[test]
fn a_missing_barrier_gives_wrong_sums_under_another_seed() {
    if !on_cuda_with(module_path!(), "a_missing_barrier_gives_wrong_sums_under_another_seed", &[("PFC_EMU_SEED", "20240613")]) || !emulated() {
        // As above.
        return;
    }
    check_missing_barrier(48);
}

#[test]
fn a_missing_barrier_gives_wrong_sums_in_every_block_in_forward_order() {
    if !on_cuda_with(module_path!(), "a_missing_barrier_gives_wrong_sums_in_every_block_in_forward_order", &[("PFC_EMU_ORDER", "forward")])
        || !emulated()
    {
        // As above.
        return;
    }
    // Forward, warp 0's lanes run before every other warp's lane 0.
    check_missing_barrier(64);
}

/// This test binary running `worker` in a process of its own as `role`, with the loader path and
/// emulation settings of this one; asserts that it ran and passed and returns its stderr.
fn in_worker(role: &str, env: &[(&str, &str)]) -> String {
    let path = test_path(module_path!(), "worker");
    let mut cmd = child_test(&path);
    cmd.arg("--ignored").env("PFC_EMU_SELFTEST_ROLE", role);
    for (k, v) in env {
        cmd.env(k, v);
    }
    child_passed(&cmd.output().unwrap(), &format!("worker {role}"))
}

#[test]
fn a_barrier_not_every_thread_reaches_fails_the_launch() {
    if !on_cuda(module_path!(), "a_barrier_not_every_thread_reaches_fails_the_launch") || !emulated() {
        // A GPU's outcome is undefined (a hang, or a barrier the exited threads count at).
        return;
    }
    let stderr = in_worker("partial-barrier", &[]);
    for part in ["kernel selftest_partial_barrier: block (0,0,0) cannot go on", "wait at __syncthreads", "have exited"] {
        assert!(stderr.contains(part), "no {part:?} in the report:\n{stderr}");
    }
}

#[test]
fn off_by_one_writes_fault_the_context() {
    if !on_cuda(module_path!(), "off_by_one_writes_fault_the_context") || !emulated() {
        // A GPU faults only past the allocation's page, if at all.
        return;
    }
    // 63 floats end within an 8-byte word whose rest is canary, checked after the launch; 64 end at
    // the guard page.
    for (n, bytes) in [(63, 252), (64, 256)] {
        let stderr = in_worker(&format!("write-past:{n}"), &[]);
        let at = format!("0 bytes past the end of a {bytes}-byte allocation");
        assert!(stderr.contains("kernel selftest_copy_inclusive: out-of-bounds access at 0x") && stderr.contains(&at), "{n} values: no report of a write {at}:\n{stderr}");
    }
}

#[test]
fn an_off_by_one_read_faults_the_context() {
    if !on_cuda(module_path!(), "an_off_by_one_read_faults_the_context") || !emulated() {
        // As above.
        return;
    }
    // Reads can be caught at the guard page only: 64 floats end at it (a read of the canary after
    // 63 would go unnoticed, as a GPU notices no read inside an allocation's page).
    let stderr = in_worker("read-past:64", &[]);
    let at = "0 bytes past the end of a 256-byte allocation";
    assert!(stderr.contains("kernel selftest_copy_inclusive: out-of-bounds access at 0x") && stderr.contains(at), "no report of a read {at}:\n{stderr}");
}

#[test]
fn launches_outside_the_device_limits_are_refused() {
    if !on_cuda(module_path!(), "launches_outside_the_device_limits_are_refused") {
        return;
    }
    let t = selftest();
    let (input, out) = (t.upload(&[1f32; 2048]), t.upload(&[0f32; 2]));
    let per_block = 1024u32;
    let invalid = Err(err(CUresult::CUDA_ERROR_INVALID_VALUE));
    for (grid, block) in [((1, 1, 1), (1025, 1, 1)), ((1, 1, 1), (32, 32, 2)), ((1, 1, 1), (1, 1, 65)), ((1, 65536, 1), (32, 1, 1)), ((1, 1, 65536), (32, 1, 1))] {
        assert_eq!(t.launch("selftest_block_sum", grid, block, &[&input, &per_block, &out]), invalid, "grid {grid:?}, block {block:?}");
    }
    // The refusals leave the context usable: a launch at the limit of 1024 threads runs.
    t.launch("selftest_block_sum", (2, 1, 1), (1024, 1, 1), &[&input, &per_block, &out]).unwrap();
    assert_eq!(t.download::<f32>(out, 2), [1024.0, 1024.0]);
}

#[test]
fn an_unknown_kernel_is_not_found() {
    if !on_cuda(module_path!(), "an_unknown_kernel_is_not_found") {
        return;
    }
    let t = selftest();
    assert_eq!(t.module.load_function("selftest_no_such_kernel").unwrap_err(), err(CUresult::CUDA_ERROR_NOT_FOUND));
    assert_eq!(t.module.load_function("selftest_block_sum").map(|_| ()), Ok(()));
    if emulated() {
        // A module with an entry point that has no host build is refused at load.
        let ptx = compile_ptx_with_opts(
            "extern \"C\" __global__ void selftest_without_host_build(float* p) { p[0] = 1.0f; }",
            CompileOptions { arch: Some("sm_90"), ..Default::default() },
        )
        .unwrap();
        assert_eq!(t.stream.context().load_module(ptx).map(|_| ()), Err(err(CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU)));
    }
}

#[test]
fn allocations_beyond_the_device_memory_are_refused() {
    if !on_cuda_with(module_path!(), "allocations_beyond_the_device_memory_are_refused", &[("PFC_EMU_DEVICE_MEMORY", "64M")]) {
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    // SAFETY: GPU 0 exists (the context above).
    let total = unsafe { result::device::total_mem(0) }.unwrap();
    if emulated() {
        assert_eq!(total, 64 << 20, "PFC_EMU_DEVICE_MEMORY=64M");
    }
    let oom = Err(err(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
    // SAFETY: allocations of this context, each freed once below; nothing reads or writes them.
    unsafe {
        assert_eq!(result::malloc_sync(total + 1), oom, "more than the whole device");
        let big = result::malloc_sync(total / 4 * 3).unwrap();
        assert_eq!(result::malloc_sync(total / 2), oom, "half the device while three quarters are taken");
        let small = result::malloc_sync(1 << 20).unwrap();
        result::free_sync(big).unwrap();
        let half = result::malloc_sync(total / 2).unwrap();
        result::free_sync(half).unwrap();
        result::free_sync(small).unwrap();
    }
    // A refused allocation is no fault: the context is fine.
    ctx.synchronize().unwrap();
}

#[test]
fn copies_to_freed_memory_are_refused() {
    if !on_cuda(module_path!(), "copies_to_freed_memory_are_refused") || !emulated() {
        // On a GPU the freed range may stay mapped or be handed out again: undefined.
        return;
    }
    let t = selftest();
    let p = t.upload(&[1u32; 64]);
    // SAFETY: `p` is freed once; the copies to it are refused before they touch it.
    unsafe {
        result::free_sync(p).unwrap();
        let invalid = Err(err(CUresult::CUDA_ERROR_INVALID_VALUE));
        assert_eq!(result::memcpy_htod_sync(p, &[2u32; 64]), invalid, "upload");
        assert_eq!(result::memcpy_dtoh_async(&mut [0u32; 64], p, t.raw()), invalid, "download");
        assert_eq!(result::memset_d8_async(p, 0, 256, t.raw()), invalid, "memset");
        assert_eq!(result::free_sync(p), invalid, "a second free");
    }
    // A stream-ordered free queued twice: the second is refused when called, not lost on the stream.
    let r = t.upload(&[5u32; 8]);
    // SAFETY: `r` is freed once on the stream; the second free is refused before it is queued.
    unsafe {
        result::free_async(r, t.raw()).unwrap();
        assert_eq!(result::free_async(r, t.raw()), Err(err(CUresult::CUDA_ERROR_INVALID_VALUE)), "a second queued free");
    }
    // Refused calls are not faults: the context goes on.
    let q = t.upload(&[3u32; 4]);
    assert_eq!(t.download::<u32>(q, 4), [3; 4]);
}

#[test]
fn a_copy_waits_behind_a_held_host_function_while_the_host_goes_on() {
    if !on_cuda(module_path!(), "a_copy_waits_behind_a_held_host_function_while_the_host_goes_on") {
        return;
    }
    let t = selftest();
    let other = t.stream.context().new_stream().unwrap();
    let (src, dst) = (t.upload(&[7u32; 256]), t.upload(&[0u32; 256]));
    let gate = StreamGate::hold(t.raw());
    // SAFETY: both buffers hold 1 KiB; `done` is destroyed once, after its stream passed it.
    unsafe {
        result::memcpy_dtod_async(dst, src, 1024, t.raw()).unwrap();
        // Destroying an event whose record is still queued returns at once, as the driver's does.
        let pending = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).unwrap();
        result::event::record(pending, t.raw()).unwrap();
        result::event::destroy(pending).unwrap();
        let done = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).unwrap();
        result::event::record(done, t.raw()).unwrap();
        // The calls returned while the stream is held: nothing behind the host function has run.
        assert_eq!(sys::cuStreamQuery(t.raw()), CUresult::CUDA_ERROR_NOT_READY);
        assert_eq!(result::event::query(done), Err(err(CUresult::CUDA_ERROR_NOT_READY)));
        let mut early = [1u32; 256];
        result::memcpy_dtoh_async(&mut early, dst, other.cu_stream()).unwrap();
        other.synchronize().unwrap();
        assert_eq!(early, [0; 256], "the copy ran before the host function queued ahead of it returned");
        gate.open();
        result::event::synchronize(done).unwrap();
        assert_eq!(sys::cuStreamQuery(t.raw()), CUresult::CUDA_SUCCESS);
        result::event::destroy(done).unwrap();
    }
    assert!(!gate.timed_out(), "the host function was still held after 30 s");
    assert_eq!(t.download::<u32>(dst, 256), [7; 256]);
}

/// u32s in the buffers of the test below, and memsets of them queued ahead of the copy.
const STALE_LEN: usize = 1024;
const STALE_WRITES: u32 = 200;

/// Queues STALE_WRITES memsets of `buf` on `a`, the last writing `last`, then a copy of `buf` to
/// `dst` on `b`, after `a`'s memsets when `event` is given; returns `dst` once `b` is done.
fn copy_behind_writes(a: &CudaStream, b: &CudaStream, buf: u64, dst: u64, last: u32, event: Option<sys::CUevent>) -> Vec<u32> {
    // SAFETY: `buf` and `dst` hold STALE_LEN u32s; `event` (if any) is live.
    unsafe {
        for k in (0..STALE_WRITES).rev() {
            sys::cuMemsetD32Async(buf, last - k, STALE_LEN, a.cu_stream()).result().unwrap();
        }
        if let Some(e) = event {
            result::event::record(e, a.cu_stream()).unwrap();
            result::stream::wait_event(b.cu_stream(), e, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT).unwrap();
        }
        result::memcpy_dtod_async(dst, buf, STALE_LEN * 4, b.cu_stream()).unwrap();
        let mut out = vec![0u32; STALE_LEN];
        result::memcpy_dtoh_async(&mut out, dst, b.cu_stream()).unwrap();
        b.synchronize().unwrap();
        a.synchronize().unwrap();
        out
    }
}

#[test]
fn a_missing_cross_stream_wait_reads_stale_data_and_an_event_wait_does_not() {
    if !on_cuda_with(module_path!(), "a_missing_cross_stream_wait_reads_stale_data_and_an_event_wait_does_not", &[("PFC_EMU_DELAY", "7")]) {
        return;
    }
    let t = selftest();
    let (a, b) = (t.stream.clone(), t.stream.context().new_stream().unwrap());
    let (buf, dst) = (t.upload(&[0u32; STALE_LEN]), t.upload(&[0u32; STALE_LEN]));
    if emulated() {
        // PFC_EMU_DELAY holds every stream operation 0–2 ms: the 200 memsets take about 200 ms, the
        // copy on the other stream, which waits for nothing, a millisecond or two.
        let got = copy_behind_writes(&a, &b, buf, dst, 1000, None);
        assert!(got.iter().any(|&v| v != 1000), "the copy that waits for nothing saw every memset done");
    }
    // SAFETY: destroyed once, after both streams are done with it.
    unsafe {
        let e = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).unwrap();
        let got = copy_behind_writes(&a, &b, buf, dst, 2000, Some(e));
        assert_eq!(got, [2000; STALE_LEN], "the copy that waits for the memsets' event");
        result::event::destroy(e).unwrap();
    }
}

/// An event is recorded only on a stream of the context it was created in (the driver's
/// CUDA_ERROR_INVALID_HANDLE otherwise); a stream of another GPU may still wait for it.
#[test]
fn an_event_is_recorded_only_on_a_stream_of_its_own_context() {
    if !on_cuda(module_path!(), "an_event_is_recorded_only_on_a_stream_of_its_own_context") {
        return;
    }
    if result::init().and_then(|()| result::device::get_count()).unwrap() < 2 {
        assert!(!emulated(), "the emulation offers four GPUs");
        return;
    }
    let (a, b) = (CudaContext::new(0).unwrap(), CudaContext::new(1).unwrap());
    let (on_a, on_b) = (a.new_stream().unwrap(), b.new_stream().unwrap());
    a.bind_to_thread().unwrap();
    // SAFETY: the event is destroyed once, after the streams passed it.
    unsafe {
        let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).unwrap();
        assert_eq!(result::event::record(event, on_b.cu_stream()), Err(err(CUresult::CUDA_ERROR_INVALID_HANDLE)), "recorded on GPU 1's stream");
        result::event::record(event, on_a.cu_stream()).unwrap();
        result::stream::wait_event(on_b.cu_stream(), event, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT).unwrap();
        on_b.synchronize().unwrap();
        result::event::destroy(event).unwrap();
    }
}

#[test]
fn elapsed_time_needs_completed_timing_events() {
    if !on_cuda(module_path!(), "elapsed_time_needs_completed_timing_events") {
        return;
    }
    let t = selftest();
    let s = t.raw();
    let invalid = Err(err(CUresult::CUDA_ERROR_INVALID_HANDLE));
    // SAFETY: every event is destroyed once, after its stream passed it.
    unsafe {
        let (start, end) = (result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).unwrap(), result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).unwrap());
        let untimed = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).unwrap();
        assert_eq!(result::event::elapsed(start, end), invalid, "events never recorded");
        result::event::record(start, s).unwrap();
        let gate = StreamGate::hold(s);
        result::event::record(end, s).unwrap();
        result::event::record(untimed, s).unwrap();
        assert_eq!(result::event::elapsed(start, end), Err(err(CUresult::CUDA_ERROR_NOT_READY)), "the end event is still queued");
        // The start event has passed before the host's clock starts: on a loaded machine the
        // stream's thread may reach it late, which would shorten the interval measured below.
        result::event::synchronize(start).unwrap();
        let held = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        gate.open();
        result::event::synchronize(end).unwrap();
        let ms = result::event::elapsed(start, end).unwrap();
        // The stream was held between the two events for at least as long as the host slept.
        assert!(ms.is_finite() && ms >= 25.0 && ms <= held.elapsed().as_secs_f32() * 1000.0 + 25.0, "{ms} ms");
        assert_eq!(result::event::elapsed(start, untimed), invalid, "an event without timing");
        for e in [start, end, untimed] {
            result::event::destroy(e).unwrap();
        }
    }
}

fn pool_attribute(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> u64 {
    let mut v = 0u64;
    // SAFETY: every attribute read here is a cuuint64_t.
    unsafe { result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()) }.unwrap();
    v
}

fn set_pool_attribute(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute, mut v: u64) -> Result<(), DriverError> {
    // SAFETY: as above.
    unsafe { result::mem_pool::set_attribute(pool, attr, (&mut v as *mut u64).cast()) }
}

#[test]
fn the_pool_keeps_or_releases_freed_memory_by_its_threshold() {
    use sys::CUmemPool_attribute::*;
    if !on_cuda(module_path!(), "the_pool_keeps_or_releases_freed_memory_by_its_threshold") {
        return;
    }
    let t = selftest();
    let s = t.raw();
    // SAFETY: GPU 0 exists.
    let pool = unsafe { result::device::get_default_mem_pool(0) }.unwrap();
    let threshold = pool_attribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD);
    let size = 32usize << 20;
    let alloc_and_free = || {
        // SAFETY: a stream-ordered allocation freed on the same stream, untouched in between.
        unsafe {
            let p = result::malloc_async(s, size).unwrap();
            result::free_async(p, s).unwrap();
        }
        t.stream.synchronize().unwrap();
    };

    // Kept: the pool holds what was freed to it across a synchronization.
    set_pool_attribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX).unwrap();
    alloc_and_free();
    let kept = pool_attribute(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT);
    assert!(kept >= size as u64, "{kept} bytes reserved after freeing {size} with no release threshold");
    let used = pool_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT);
    assert!(pool_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH) >= used + size as u64, "the high watermark missed the allocation");

    // Given back at the next synchronization once the threshold is 0.
    set_pool_attribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, 0).unwrap();
    if emulated() {
        // A GPU may release at once; the emulation releases at synchronizations only.
        assert_eq!(pool_attribute(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT), kept, "released before a synchronization");
    }
    t.stream.synchronize().unwrap();
    let released = pool_attribute(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT);
    assert!(released + size as u64 <= kept, "{released} bytes still reserved of {kept} after a synchronization with threshold 0");
    if emulated() {
        assert_eq!(released, used, "the emulated pool keeps exactly what is in use");
    }

    // The high watermark resets to what is in use now, then follows the next allocation.
    set_pool_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0).unwrap();
    assert!(pool_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH) <= used, "the high watermark after its reset");
    // SAFETY: as in `alloc_and_free`, with a read of the watermark while the allocation lives.
    unsafe {
        let p = result::malloc_async(s, size / 4).unwrap();
        let high = pool_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH);
        assert!(high >= used + size as u64 / 4 && high < used + size as u64, "{high} after an allocation of {} bytes", size / 4);
        result::free_async(p, s).unwrap();
    }
    t.stream.synchronize().unwrap();
    if emulated() {
        // Only a reset to 0 is documented.
        assert_eq!(set_pool_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH, 1), Err(err(CUresult::CUDA_ERROR_INVALID_VALUE)));
    }
    set_pool_attribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, threshold).unwrap();
}

#[test]
fn the_counters_count_what_was_done() {
    if !on_cuda(module_path!(), "the_counters_count_what_was_done") || !emulated() {
        // The counters are the emulation's.
        return;
    }
    let t = selftest();
    let s = t.raw();
    let before = counters(0).unwrap();
    // SAFETY: every buffer is as large as what is done with it; each is freed once, and the event
    // destroyed once, after the stream passed them.
    unsafe {
        let (a, b) = (result::malloc_sync(1024).unwrap(), result::malloc_sync(1024).unwrap());
        let c = result::malloc_async(s, 4096).unwrap();
        result::memset_d8_async(a, 0, 1000, s).unwrap();
        sys::cuMemsetD32Async(b, 1, 200, s).result().unwrap();
        result::memcpy_htod_async(c, &[1f32; 512], s).unwrap();
        result::memcpy_dtoh_async(&mut [0u8; 100], a, s).unwrap();
        result::memcpy_dtod_async(b, a, 512, s).unwrap();
        for _ in 0..3 {
            t.launch("selftest_block_sum", (1, 1, 1), (64, 1, 1), &[&c, &512u32, &a]).unwrap();
        }
        t.launch("selftest_compact", (1, 1, 1), (64, 1, 1), &[&b, &256u32, &c, &a]).unwrap();
        t.stream.synchronize().unwrap();
        t.stream.synchronize().unwrap();
        result::free_async(c, s).unwrap();
        result::ctx::synchronize().unwrap();
        // cuMemFree synchronizes the context first, and that counts.
        result::free_sync(a).unwrap();
        let e = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).unwrap();
        result::event::record(e, s).unwrap();
        result::event::synchronize(e).unwrap();
        result::event::destroy(e).unwrap();
        // Work refused (here on a stream that no longer exists) is not counted.
        let gone = result::stream::create(result::stream::StreamKind::NonBlocking).unwrap();
        result::stream::destroy(gone).unwrap();
        let refused = Err(err(CUresult::CUDA_ERROR_INVALID_HANDLE));
        assert_eq!(result::memset_d8_async(b, 0, 16, gone), refused, "a memset");
        assert_eq!(result::memcpy_dtod_async(b, b, 16, gone), refused, "a copy");
        let f = t.module.load_function("selftest_block_sum").unwrap();
        let n = 16u32;
        let mut params = [&b as *const u64 as *mut c_void, &n as *const u32 as *mut c_void, &b as *const u64 as *mut c_void];
        assert_eq!(result::launch_kernel(f.cu_function(), (1, 1, 1), (32, 1, 1), 0, gone, &mut params), refused, "a launch");
        result::free_sync(b).unwrap();
    }
    let after = counters(0).unwrap();
    let want = [
        ("allocations", 3),
        ("frees", 3),
        ("memsets", 2),
        ("memset_bytes", 1800),
        ("htod", 1),
        ("htod_bytes", 2048),
        ("dtoh", 1),
        ("dtoh_bytes", 100),
        ("dtod", 1),
        ("synchronizations", 6),
        ("launches.selftest_block_sum", 3),
        ("launches.selftest_compact", 1),
        ("launches.selftest_block_sum_unsynced", 0),
    ];
    for (key, n) in want {
        assert_eq!(delta(&before, &after, key), n, "{key}: {before} → {after}");
    }
    // Another GPU's counters are its own; a GPU the emulation lacks has none.
    let other = counters(1).unwrap();
    assert_eq!(other["allocations"], 0, "{other}");
    assert_eq!(other["launches"], serde_json::json!({}), "{other}");
    assert_eq!(counters(4), None, "PFC_EMU_DEVICES is 4 by default");
}

#[test]
fn the_counters_file_is_written_at_exit() {
    if !on_cuda(module_path!(), "the_counters_file_is_written_at_exit") || !emulated() {
        // As above.
        return;
    }
    let file = std::env::temp_dir().join(format!("pfc-emu-counters-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&file);
    in_worker("counters-file", &[("PFC_EMU_COUNTERS", file.to_str().unwrap())]);
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    std::fs::remove_file(&file).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let devices = json["devices"].as_array().unwrap_or_else(|| panic!("no devices: {text}"));
    assert_eq!(devices.len(), 4, "{text}");
    let gpu0 = &devices[0];
    // Two synchronizations: cudarc's first new_stream synchronizes the context, then the worker.
    for (key, n) in [("allocations", 1), ("memsets", 1), ("memset_bytes", 4096), ("synchronizations", 2)] {
        assert_eq!(gpu0[key], n, "{key}: {text}");
    }
    assert_eq!(gpu0["launches"], serde_json::json!({"selftest_block_sum": 2}), "{text}");
    assert_eq!(devices[1]["allocations"], 0, "{text}");
}

/// The processes of the tests above that end in a fault or at exit, by PFC_EMU_SELFTEST_ROLE;
/// nothing without it.
#[test]
#[ignore = "a worker process of the tests above"]
fn worker() {
    let Ok(role) = std::env::var("PFC_EMU_SELFTEST_ROLE") else { return };
    let t = selftest();
    let sticky = |code: CUresult| {
        // The context keeps the error: every later call on it returns it.
        // SAFETY: a 16-byte allocation, never used.
        assert_eq!(unsafe { result::malloc_sync(16) }, Err(err(code)), "an allocation after the fault");
        assert_eq!(t.stream.synchronize(), Err(err(code)), "a second synchronization");
        assert_eq!(result::ctx::synchronize(), Err(err(code)), "the context's synchronization");
    };
    match role.split_once(':').unwrap_or((&role, "")) {
        ("partial-barrier", _) => {
            let out = t.upload(&[0f32; 64]);
            // 48 of 64 threads wait at the barrier; the launch itself is accepted.
            t.launch("selftest_partial_barrier", (1, 1, 1), (64, 1, 1), &[&out, &48u32]).unwrap();
            assert_eq!(t.stream.synchronize(), Err(err(CUresult::CUDA_ERROR_LAUNCH_FAILED)));
            sticky(CUresult::CUDA_ERROR_LAUNCH_FAILED);
            assert_eq!(t.launch("selftest_partial_barrier", (1, 1, 1), (64, 1, 1), &[&out, &64u32]), Err(err(CUresult::CUDA_ERROR_LAUNCH_FAILED)));
        }
        (access @ ("write-past" | "read-past"), n) => {
            let n: u32 = n.parse().unwrap();
            // The buffer the kernel overruns holds n floats, the other n + 1.
            let (short, long) = (vec![1f32; n as usize], vec![1f32; n as usize + 1]);
            let (input, out) = if access == "write-past" { (t.upload(&long), t.upload(&short)) } else { (t.upload(&short), t.upload(&long)) };
            t.launch("selftest_copy_inclusive", ((n + 1).div_ceil(32), 1, 1), (32, 1, 1), &[&input, &out, &n]).unwrap();
            assert_eq!(t.stream.synchronize(), Err(err(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS)));
            sticky(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS);
            // SAFETY: `input` holds at least n floats.
            assert_eq!(unsafe { result::memcpy_htod_sync(input, &short) }, Err(err(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS)));
        }
        ("counters-file", _) => {
            // SAFETY: a 4 KiB buffer, set on the stream, read by the kernels within its size.
            unsafe {
                let p = result::malloc_sync(4096).unwrap();
                result::memset_d8_async(p, 0, 4096, t.raw()).unwrap();
                for _ in 0..2 {
                    t.launch("selftest_block_sum", (1, 1, 1), (32, 1, 1), &[&p, &512u32, &p]).unwrap();
                }
            }
            t.stream.synchronize().unwrap();
            // The driver writes PFC_EMU_COUNTERS when this process exits.
        }
        _ => panic!("unknown role {role}"),
    }
}
