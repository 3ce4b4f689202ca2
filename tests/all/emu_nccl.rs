//! The emulated NCCL (tests/cuda-emulator/nccl.cc): collectives in one process and across processes.
//!
//! Each test runs where CUDA is usable (`common::on_cuda`): on the emulation, in a child process, or
//! on a GPU machine against the real NCCL, so what is asserted is what NCCL documents, with results
//! compared exactly with a host computation (the test data's sums are exact in any order). NCCL is
//! loaded as libnccl.so.2 and called directly, as src/comm/nccl.rs does. What the real library
//! leaves undefined or handles otherwise (collectives that disagree hang there, a dead peer, a buffer
//! outside device memory, the launch counters) is checked on the emulation only. The emulation has
//! four GPUs; on a machine with fewer, a test uses what there is.

use crate::common::{child_passed, child_test, on_cuda, test_path, Rng};
use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError, ValidAsZeroBits};
use half::{bf16, f16};
use libloading::Library;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt::Debug;
use std::process::{Child, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

// ncclDataType_t, ncclRedOp_t and ncclResult_t values (nccl.h).
const INT8: c_int = 0;
const UINT8: c_int = 1;
const INT32: c_int = 2;
const UINT32: c_int = 3;
const INT64: c_int = 4;
const UINT64: c_int = 5;
const FLOAT16: c_int = 6;
const FLOAT32: c_int = 7;
const FLOAT64: c_int = 8;
const BFLOAT16: c_int = 9;
const SUM: c_int = 0;
const PROD: c_int = 1;
const MAX: c_int = 2;
const MIN: c_int = 3;
const AVG: c_int = 4;
const INVALID_ARGUMENT: c_int = 4;
const INVALID_USAGE: c_int = 5;
const REMOTE_ERROR: c_int = 6;

/// Whether this process runs on the emulation (the child `on_cuda` starts, or a worker it spawned).
fn emulated() -> bool {
    std::env::var_os("PFC_EMU_CHILD").is_some()
}

/// The GPUs a test spreads its ranks over: the emulation's four, or this machine's (at most four).
fn gpus() -> usize {
    if emulated() {
        4
    } else {
        (CudaContext::device_count().unwrap() as usize).min(4)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Id([u8; 128]);

type Comm = *mut c_void;
type Stream = *mut c_void;

struct Nccl {
    _lib: Library,
    get_unique_id: unsafe extern "C" fn(*mut Id) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_last_error: unsafe extern "C" fn(Comm) -> *const c_char,
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    init_rank: unsafe extern "C" fn(*mut Comm, c_int, Id, c_int) -> c_int,
    destroy: unsafe extern "C" fn(Comm) -> c_int,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int,
    reduce_scatter: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int,
    group_start: unsafe extern "C" fn() -> c_int,
    group_end: unsafe extern "C" fn() -> c_int,
}

// SAFETY: NCCL's entry points may be called from any thread.
unsafe impl Sync for Nccl {}
unsafe impl Send for Nccl {}

fn nccl() -> &'static Nccl {
    static NCCL: OnceLock<Nccl> = OnceLock::new();
    NCCL.get_or_init(|| {
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        let lib = unsafe { Library::new("libnccl.so.2") }.expect("libnccl.so.2");
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the type is NCCL's documented signature.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.expect($name)
            };
        }
        Nccl {
            get_unique_id: sym!("ncclGetUniqueId"),
            get_error_string: sym!("ncclGetErrorString"),
            get_last_error: sym!("ncclGetLastError"),
            get_version: sym!("ncclGetVersion"),
            init_rank: sym!("ncclCommInitRank"),
            destroy: sym!("ncclCommDestroy"),
            all_gather: sym!("ncclAllGather"),
            all_reduce: sym!("ncclAllReduce"),
            reduce_scatter: sym!("ncclReduceScatter"),
            group_start: sym!("ncclGroupStart"),
            group_end: sym!("ncclGroupEnd"),
            _lib: lib,
        }
    })
}

fn text(p: *const c_char) -> String {
    assert!(!p.is_null());
    // SAFETY: NCCL returns NUL-terminated strings that outlive the call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn raw(stream: &CudaStream) -> Stream {
    stream.cu_stream() as Stream
}

// Thin wrappers: device pointers as the driver's integers, results as NCCL's codes.
impl Nccl {
    fn error_string(&self, code: c_int) -> String {
        // SAFETY: any code is accepted.
        text(unsafe { (self.get_error_string)(code) })
    }
    fn last_error(&self) -> String {
        // SAFETY: the communicator argument is unused.
        text(unsafe { (self.get_last_error)(std::ptr::null_mut()) })
    }
    #[track_caller]
    fn ok(&self, code: c_int) {
        assert_eq!(code, 0, "{} ({})", self.error_string(code), self.last_error());
    }
    fn unique_id(&self) -> Id {
        let mut id = Id([0; 128]);
        // SAFETY: writes the 128-byte id.
        self.ok(unsafe { (self.get_unique_id)(&mut id) });
        id
    }
    fn init(&self, comm: *mut Comm, nranks: usize, id: Id, rank: isize) -> c_int {
        // SAFETY: `comm` is NULL or points to a handle to write.
        unsafe { (self.init_rank)(comm, nranks as c_int, id, rank as c_int) }
    }
    fn start(&self) -> c_int {
        // SAFETY: no arguments.
        unsafe { (self.group_start)() }
    }
    fn end(&self) -> c_int {
        // SAFETY: no arguments.
        unsafe { (self.group_end)() }
    }
    fn gather(&self, send: u64, recv: u64, count: usize, dtype: c_int, comm: Comm, stream: &CudaStream) -> c_int {
        // SAFETY: the buffers are the callers' live device memory (or NULL, to be refused).
        unsafe { (self.all_gather)(send as *const c_void, recv as *mut c_void, count, dtype, comm, raw(stream)) }
    }
    #[allow(clippy::too_many_arguments)]
    fn reduce(&self, send: u64, recv: u64, count: usize, dtype: c_int, op: c_int, comm: Comm, stream: &CudaStream) -> c_int {
        // SAFETY: as for `gather`.
        unsafe { (self.all_reduce)(send as *const c_void, recv as *mut c_void, count, dtype, op, comm, raw(stream)) }
    }
    #[allow(clippy::too_many_arguments)]
    fn scatter(&self, send: u64, recv: u64, count: usize, dtype: c_int, op: c_int, comm: Comm, stream: &CudaStream) -> c_int {
        // SAFETY: as for `gather`.
        unsafe { (self.reduce_scatter)(send as *const c_void, recv as *mut c_void, count, dtype, op, comm, raw(stream)) }
    }
}

/// The emulated driver's count of `name` launched on GPU `device`.
fn launches(device: usize, name: &str) -> u64 {
    crate::common::emu_counters(device as c_int).expect("an emulated GPU")["launches"][name].as_u64().unwrap_or(0)
}

/// This process's ranks `first..first + n` of a communicator of `world`, one per GPU
/// `first_device..`, initialised by this thread inside one group as src/comm/nccl.rs does.
struct Ranks {
    streams: Vec<Arc<CudaStream>>,
    comms: Vec<Comm>,
    world: usize,
    first: usize,
}

impl Ranks {
    fn new(n: usize, first_device: usize, world: usize, first: usize, id: Id) -> Ranks {
        let lib = nccl();
        let streams: Vec<_> = (0..n).map(|i| CudaContext::new(first_device + i).unwrap().new_stream().unwrap()).collect();
        let mut comms = vec![std::ptr::null_mut(); n];
        lib.ok(lib.start());
        for (i, stream) in streams.iter().enumerate() {
            stream.context().bind_to_thread().unwrap();
            lib.ok(lib.init(&mut comms[i], world, id, (first + i) as isize));
            assert!(!comms[i].is_null());
        }
        lib.ok(lib.end());
        Ranks { streams, comms, world, first }
    }

    /// Every rank of one process, on GPUs 0.. of this machine.
    fn all(world: usize) -> Ranks {
        Ranks::new(world, 0, world, 0, nccl().unique_id())
    }

    /// One collective on every local rank inside one group: rank i sends `sends[i]` and receives
    /// `recv_len` elements; `call(lib, send, recv, comm, stream)` makes the NCCL call.
    fn run<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        sends: &[Vec<T>],
        recv_len: usize,
        call: impl Fn(&Nccl, u64, u64, Comm, &CudaStream) -> c_int,
    ) -> Vec<Vec<T>> {
        let lib = nccl();
        let send: Vec<CudaSlice<T>> = self.streams.iter().zip(sends).map(|(s, v)| s.clone_htod(v).unwrap()).collect();
        let mut recv: Vec<CudaSlice<T>> = self.streams.iter().map(|s| s.alloc_zeros(recv_len).unwrap()).collect();
        lib.ok(lib.start());
        for (i, stream) in self.streams.iter().enumerate() {
            let (s, _s) = send[i].device_ptr(stream);
            let (r, _r) = recv[i].device_ptr_mut(stream);
            lib.ok(call(lib, s, r, self.comms[i], stream));
        }
        lib.ok(lib.end());
        self.streams.iter().zip(&recv).map(|(s, b)| s.clone_dtoh(b).unwrap()).collect()
    }

    /// Global ranks of this process.
    fn ranks(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.comms.len()
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for &c in &self.comms {
            // SAFETY: each communicator is destroyed once.
            let code = unsafe { (nccl().destroy)(c) };
            if !std::thread::panicking() {
                nccl().ok(code);
            }
        }
    }
}

/// Rank `rank`'s test values: multiples of 1/8 below 128 in magnitude, so sums over a few ranks are
/// exact in f32 in any order.
fn f32s(rank: usize, len: usize, salt: u64) -> Vec<f32> {
    (0..len as u64).map(|i| ((rank as u64 * 7919 + i * 31 + salt * 104_729) % 2001) as f32 / 8.0 - 125.0).collect()
}

/// Values beyond 32 bits, negative and positive.
fn i64s(rank: usize, len: usize) -> Vec<i64> {
    (0..len as i64).map(|i| (rank as i64 + 1) * 1_000_000_000_007 - i * 3_000_000_019).collect()
}

#[track_caller]
fn same<T: PartialEq + Debug>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: element {i} of {} is {:?}, expected {:?}", got.len(), got[i], want[i]);
    }
}

/// Element-wise `f` over every rank's values in rank order.
fn fold<T: Copy>(all: &[Vec<T>], f: impl Fn(T, T) -> T) -> Vec<T> {
    (0..all[0].len()).map(|i| all[1..].iter().fold(all[0][i], |acc, v| f(acc, v[i]))).collect()
}

/// The collectives the library uses, on `r`'s ranks, against the host: all-gather of f32 (more
/// than one slot of the emulation's rendezvous per rank) and of i64, all-reduce sum and max of
/// f32, reduce-scatter sum of f32.
fn check_library_collectives(r: &Ranks) {
    let world = r.world;

    let count = 150_001;
    let sends: Vec<_> = r.ranks().map(|g| f32s(g, count, 1)).collect();
    let want: Vec<f32> = (0..world).flat_map(|g| f32s(g, count, 1)).collect();
    for got in r.run(&sends, count * world, |n, s, d, c, st| n.gather(s, d, count, FLOAT32, c, st)) {
        same(&got, &want, "all-gather f32");
    }

    for count in [1, 70_001] {
        let sends: Vec<_> = r.ranks().map(|g| i64s(g, count)).collect();
        let want: Vec<i64> = (0..world).flat_map(|g| i64s(g, count)).collect();
        for got in r.run(&sends, count * world, |n, s, d, c, st| n.gather(s, d, count, INT64, c, st)) {
            same(&got, &want, "all-gather i64");
        }
    }

    let count = 300_007;
    let all: Vec<_> = (0..world).map(|g| f32s(g, count, 2)).collect();
    let sends: Vec<_> = r.ranks().map(|g| all[g].clone()).collect();
    for (op, want, what) in [(SUM, fold(&all, |a, b| a + b), "all-reduce sum f32"), (MAX, fold(&all, f32::max), "all-reduce max f32")] {
        for got in r.run(&sends, count, |n, s, d, c, st| n.reduce(s, d, count, FLOAT32, op, c, st)) {
            same(&got, &want, what);
        }
    }

    let count = 50_001;
    let all: Vec<_> = (0..world).map(|g| f32s(g, count * world, 3)).collect();
    let sum = fold(&all, |a, b| a + b);
    let sends: Vec<_> = r.ranks().map(|g| all[g].clone()).collect();
    let got = r.run(&sends, count, |n, s, d, c, st| n.scatter(s, d, count, FLOAT32, SUM, c, st));
    for (g, got) in r.ranks().zip(got) {
        same(&got, &sum[g * count..(g + 1) * count], "reduce-scatter sum f32");
    }
}

#[test]
fn every_gpu_of_one_process_in_one_communicator_matches_the_host() {
    if !on_cuda(module_path!(), "every_gpu_of_one_process_in_one_communicator_matches_the_host") {
        return;
    }
    let lib = nccl();
    let mut version = 0;
    // SAFETY: writes one int.
    lib.ok(unsafe { (lib.get_version)(&mut version) });
    assert!(version >= 2_00_00, "version code {version}");
    let r = Ranks::all(gpus());
    let counts = |d| ["ncclAllGather", "ncclAllReduce", "ncclReduceScatter"].map(|name| launches(d, name));
    let before: Vec<_> = (0..r.world).filter(|_| emulated()).map(counts).collect();
    check_library_collectives(&r);
    for (d, before) in before.iter().enumerate() {
        let after = counts(d);
        assert_eq!([0, 1, 2].map(|k| after[k] - before[k]), [3, 2, 1], "GPU {d}'s launches");
    }
}

#[test]
fn in_place_collectives_match_the_host() {
    if !on_cuda(module_path!(), "in_place_collectives_match_the_host") {
        return;
    }
    let lib = nccl();
    let r = Ranks::all(gpus());
    let world = r.world;
    let count = 140_003;
    let f = std::mem::size_of::<f32>() as u64;

    // All-reduce with sendbuff == recvbuff.
    let all: Vec<_> = (0..world).map(|g| f32s(g, count, 4)).collect();
    let mut bufs: Vec<_> = r.streams.iter().zip(&all).map(|(s, v)| s.clone_htod(v).unwrap()).collect();
    lib.ok(lib.start());
    for (i, stream) in r.streams.iter().enumerate() {
        let (p, _p) = bufs[i].device_ptr_mut(stream);
        lib.ok(lib.reduce(p, p, count, FLOAT32, SUM, r.comms[i], stream));
    }
    lib.ok(lib.end());
    let sum = fold(&all, |a, b| a + b);
    for (s, b) in r.streams.iter().zip(&bufs) {
        same(&s.clone_dtoh(b).unwrap(), &sum, "in-place all-reduce");
    }

    // All-gather with sendbuff at recvbuff + rank · count: each rank's block is already in place.
    let want: Vec<f32> = (0..world).flat_map(|g| f32s(g, count, 5)).collect();
    bufs = (0..world)
        .map(|g| {
            let mut v = vec![0f32; count * world];
            v[g * count..(g + 1) * count].copy_from_slice(&want[g * count..(g + 1) * count]);
            r.streams[g].clone_htod(&v).unwrap()
        })
        .collect();
    lib.ok(lib.start());
    for (i, stream) in r.streams.iter().enumerate() {
        let (p, _p) = bufs[i].device_ptr_mut(stream);
        lib.ok(lib.gather(p + i as u64 * count as u64 * f, p, count, FLOAT32, r.comms[i], stream));
    }
    lib.ok(lib.end());
    for (s, b) in r.streams.iter().zip(&bufs) {
        same(&s.clone_dtoh(b).unwrap(), &want, "in-place all-gather");
    }

    // Reduce-scatter with recvbuff at sendbuff + rank · count: rank i's block receives its sum.
    let all: Vec<_> = (0..world).map(|g| f32s(g, count * world, 6)).collect();
    let sum = fold(&all, |a, b| a + b);
    bufs = r.streams.iter().zip(&all).map(|(s, v)| s.clone_htod(v).unwrap()).collect();
    lib.ok(lib.start());
    for (i, stream) in r.streams.iter().enumerate() {
        let (p, _p) = bufs[i].device_ptr_mut(stream);
        lib.ok(lib.scatter(p, p + i as u64 * count as u64 * f, count, FLOAT32, SUM, r.comms[i], stream));
    }
    lib.ok(lib.end());
    for (i, (s, b)) in r.streams.iter().zip(&bufs).enumerate() {
        same(&s.clone_dtoh(b).unwrap()[i * count..(i + 1) * count], &sum[i * count..(i + 1) * count], "in-place reduce-scatter");
    }
}

/// All-reduce of every rank's `make(rank)` with `op` against `host` folded over the ranks (avg:
/// `finish` applied to the fold).
fn check_all_reduce<T: DeviceRepr + ValidAsZeroBits + Copy + PartialEq + Debug>(
    r: &Ranks,
    dtype: c_int,
    op: c_int,
    make: impl Fn(usize) -> Vec<T>,
    host: impl Fn(T, T) -> T,
    finish: impl Fn(T) -> T,
    what: &str,
) {
    let all: Vec<_> = (0..r.world).map(&make).collect();
    let want: Vec<T> = fold(&all, host).into_iter().map(finish).collect();
    let count = want.len();
    let sends: Vec<_> = r.ranks().map(|g| all[g].clone()).collect();
    for got in r.run(&sends, count, |n, s, d, c, st| n.reduce(s, d, count, dtype, op, c, st)) {
        same(&got, &want, what);
    }
}

#[test]
fn every_type_and_reduction_matches_the_host() {
    if !on_cuda(module_path!(), "every_type_and_reduction_matches_the_host") {
        return;
    }
    let r = Ranks::all(gpus());
    let n = r.world;
    use std::convert::identity as id;
    let ints = |g: usize, len: usize| (0..len).map(move |i| ((g * 2_654_435_761 + i * 40_503) % 2_000_003) as i64 - 1_000_001);
    check_all_reduce(&r, INT8, MIN, |g| ints(g, 1000).map(|v| v as i8).collect(), |a: i8, b| a.min(b), id, "int8 min");
    // 600 000 bytes: more than one slot of the emulation's rendezvous; sums wrap.
    check_all_reduce(&r, UINT8, SUM, |g| ints(g, 600_000).map(|v| v as u8).collect(), u8::wrapping_add, id, "uint8 sum");
    check_all_reduce(&r, INT32, SUM, |g| ints(g, 1000).map(|v| v as i32 * 1000).collect(), i32::wrapping_add, id, "int32 sum");
    check_all_reduce(&r, INT32, PROD, |g| ints(g, 1000).map(|v| v as i32).collect(), i32::wrapping_mul, id, "int32 prod");
    check_all_reduce(&r, INT32, AVG, |g| ints(g, 1000).map(|v| v as i32).collect(), i32::wrapping_add, |v| v / n as i32, "int32 avg");
    check_all_reduce(&r, UINT32, MAX, |g| ints(g, 1000).map(|v| v as u32).collect(), u32::max, id, "uint32 max");
    check_all_reduce(&r, INT64, MIN, |g| i64s(g, 1000), i64::min, id, "int64 min");
    check_all_reduce(&r, UINT64, SUM, |g| i64s(g, 1000).into_iter().map(|v| v as u64).collect(), u64::wrapping_add, id, "uint64 sum");
    check_all_reduce(&r, FLOAT64, AVG, |g| f32s(g, 1000, 7).into_iter().map(f64::from).collect(), |a, b| a + b, |v| v / n as f64, "float64 avg");
    // Powers of two: products exact in any order.
    let powers = |g: usize| (0..1000).map(|i| ((g * 7 + i * 3) % 9) as i32 - 4).map(|e| if e % 2 == 0 { 2f32.powi(e) } else { -(2f32.powi(e)) }).collect();
    check_all_reduce(&r, FLOAT32, PROD, powers, |a, b| a * b, id, "float32 prod");
    check_all_reduce(&r, FLOAT32, MIN, |g| f32s(g, 1000, 9), f32::min, id, "float32 min");
    // Halves travel as their bits. The emulation forms sums in f32 and rounds them once, to nearest
    // even; NCCL rounds at each step of its ring, so sums that round are compared on the emulation.
    if emulated() {
        // Integers of [-2000, 2000]: exact in f16, with sums of every parity, so ties to even occur.
        let wide = |g: usize| {
            let mut rng = Rng(1000 + g as u64);
            (0..4000).map(|_| rng.below(4001) as f32 - 2000.0).collect::<Vec<_>>()
        };
        let f16_bits = |v: f32| f16::from_f32(v).to_bits();
        let bf16_bits = |v: f32| bf16::from_f32(v).to_bits();
        let f16_value = |b: u16| f16::from_bits(b).to_f32();
        let bf16_value = |b: u16| bf16::from_bits(b).to_f32();
        check_halves(&r, FLOAT16, SUM, wide, f16_bits, f16_value, "float16 sum");
        // Multiples of f16's smallest subnormal, averaged: rounding among subnormals.
        let tiny = |g| wide(g).into_iter().map(|v| v * 2f32.powi(-24)).collect();
        check_halves(&r, FLOAT16, AVG, tiny, f16_bits, f16_value, "float16 avg of subnormals");
        check_halves(&r, BFLOAT16, SUM, |g| wide(g).into_iter().map(|v| v * 1e-30).collect(), bf16_bits, bf16_value, "bfloat16 sum");
        check_halves(&r, BFLOAT16, AVG, wide, bf16_bits, bf16_value, "bfloat16 avg");
    }
}

/// All-reduce (`op` sum or avg) of a 16-bit float type, `values(rank)` in it by `bits`, against
/// their f32 sum (divided by the ranks for avg) rounded to it once.
fn check_halves(r: &Ranks, dtype: c_int, op: c_int, values: impl Fn(usize) -> Vec<f32>, bits: impl Fn(f32) -> u16, value: impl Fn(u16) -> f32, what: &str) {
    let all: Vec<Vec<u16>> = (0..r.world).map(|g| values(g).into_iter().map(&bits).collect()).collect();
    let count = all[0].len();
    let want: Vec<u16> = (0..count)
        .map(|i| {
            let sum: f32 = all.iter().map(|v| value(v[i])).sum();
            bits(if op == AVG { sum / r.world as f32 } else { sum })
        })
        .collect();
    let sends: Vec<_> = r.ranks().map(|g| all[g].clone()).collect();
    for got in r.run(&sends, count, |n, s, d, c, st| n.reduce(s, d, count, dtype, op, c, st)) {
        same(&got, &want, what);
    }
}

#[test]
fn group_calls_start_at_the_outermost_group_end() {
    if !on_cuda(module_path!(), "group_calls_start_at_the_outermost_group_end") {
        return;
    }
    let lib = nccl();
    let r = Ranks::all(gpus());
    let (world, count) = (r.world, 1000);

    // Collectives called inside (nested) groups are queued at the outermost ncclGroupEnd: a copy
    // into their send buffers issued after the calls but before that end is what they reduce.
    let old: Vec<_> = (0..world).map(|g| f32s(g, count, 11)).collect();
    let new: Vec<_> = (0..world).map(|g| f32s(g, count, 12)).collect();
    let mut send: Vec<_> = r.streams.iter().zip(&old).map(|(s, v)| s.clone_htod(v).unwrap()).collect();
    let mut recv: Vec<CudaSlice<f32>> = r.streams.iter().map(|s| s.alloc_zeros(count).unwrap()).collect();
    lib.ok(lib.start());
    lib.ok(lib.start());
    for (i, stream) in r.streams.iter().enumerate() {
        let (s, _s) = send[i].device_ptr(stream);
        let (d, _d) = recv[i].device_ptr_mut(stream);
        lib.ok(lib.reduce(s, d, count, FLOAT32, SUM, r.comms[i], stream));
    }
    lib.ok(lib.end());
    for (i, stream) in r.streams.iter().enumerate() {
        stream.memcpy_htod(&new[i], &mut send[i]).unwrap();
    }
    lib.ok(lib.end());
    let want = fold(&new, |a, b| a + b);
    for (s, b) in r.streams.iter().zip(&recv) {
        same(&s.clone_dtoh(b).unwrap(), &want, "all-reduce of a nested group");
    }

    assert_eq!(lib.end(), INVALID_USAGE, "ncclGroupEnd outside a group");

    // A call refused inside a group fails its ncclGroupEnd, which then launches none of the group's
    // calls: the ranks' next collectives still pair up.
    let before = emulated().then(|| launches(0, "ncclAllReduce"));
    lib.ok(lib.start());
    for (i, stream) in r.streams.iter().enumerate() {
        let (s, _s) = send[i].device_ptr(stream);
        let (d, _d) = recv[i].device_ptr_mut(stream);
        lib.ok(lib.reduce(s, d, count, FLOAT32, SUM, r.comms[i], stream));
        if i + 1 == world {
            assert_eq!(lib.reduce(s, d, count, 99, SUM, r.comms[i], stream), INVALID_ARGUMENT);
        }
    }
    assert_eq!(lib.end(), INVALID_ARGUMENT, "the group's error");
    if let Some(before) = before {
        assert_eq!(launches(0, "ncclAllReduce"), before, "a failed group launched a collective");
    }
    let all: Vec<_> = (0..world).map(|g| f32s(g, count, 13)).collect();
    for got in r.run(&all, count, |n, s, d, c, st| n.reduce(s, d, count, FLOAT32, MAX, c, st)) {
        same(&got, &fold(&all, f32::max), "all-reduce after a failed group");
    }
}

#[test]
fn communicators_made_outside_a_group() {
    if !on_cuda(module_path!(), "communicators_made_outside_a_group") {
        return;
    }
    let lib = nccl();
    // One rank: ncclCommInitRank returns at once, and every collective is a copy.
    let stream = CudaContext::new(0).unwrap().new_stream().unwrap();
    stream.context().bind_to_thread().unwrap();
    let mut comm = std::ptr::null_mut();
    lib.ok(lib.init(&mut comm, 1, lib.unique_id(), 0));
    let one = Ranks { streams: vec![stream], comms: vec![comm], world: 1, first: 0 };
    check_library_collectives(&one);
    drop(one);

    // Two threads, one rank each: each ncclCommInitRank returns once the other has joined.
    if gpus() < 2 {
        eprintln!("one GPU: the two-rank part needs two");
        return;
    }
    let id = lib.unique_id();
    let count = 5000;
    let all: Vec<_> = (0..2).map(|g| f32s(g, count, 14)).collect();
    let want = fold(&all, |a, b| a + b);
    std::thread::scope(|scope| {
        for (rank, mine) in all.iter().enumerate() {
            let want = &want;
            scope.spawn(move || {
                let stream = CudaContext::new(rank).unwrap().new_stream().unwrap();
                stream.context().bind_to_thread().unwrap();
                let mut comm = std::ptr::null_mut();
                lib.ok(lib.init(&mut comm, 2, id, rank as isize));
                let r = Ranks { streams: vec![stream], comms: vec![comm], world: 2, first: rank };
                let got = r.run(std::slice::from_ref(mine), count, |n, s, d, c, st| n.reduce(s, d, count, FLOAT32, SUM, c, st));
                same(&got[0], want, "all-reduce of ranks on two threads");
            });
        }
    });
}

#[test]
fn invalid_arguments_are_refused() {
    if !on_cuda(module_path!(), "invalid_arguments_are_refused") {
        return;
    }
    let lib = nccl();
    for (code, text) in [
        (0, "no error"),
        (1, "unhandled cuda error"),
        (2, "unhandled system error"),
        (3, "internal error"),
        (4, "invalid argument"),
        (5, "invalid usage"),
        (6, "remote process exited or there was a network error"),
        (7, "NCCL operation in progress"),
        (99, "unknown result code"),
    ] {
        assert!(lib.error_string(code).starts_with(text), "{code}: {}", lib.error_string(code));
    }
    // SAFETY: NULL is to be refused.
    assert_eq!(unsafe { (lib.get_unique_id)(std::ptr::null_mut()) }, INVALID_ARGUMENT);

    let stream = CudaContext::new(0).unwrap().new_stream().unwrap();
    stream.context().bind_to_thread().unwrap();
    let id = lib.unique_id();
    let mut comm = std::ptr::null_mut();
    for (nranks, rank, what) in [(0, 0, "nranks 0"), (2, 2, "rank 2"), (2, -1, "rank -1")] {
        assert_eq!(lib.init(&mut comm, nranks, id, rank), INVALID_ARGUMENT, "{what}");
        if emulated() {
            assert!(lib.last_error().contains(what), "{what}: {}", lib.last_error());
        }
    }
    assert_eq!(lib.init(std::ptr::null_mut(), 1, id, 0), INVALID_ARGUMENT, "NULL comm");
    if emulated() {
        assert_eq!(lib.init(&mut comm, 1, Id([0; 128]), 0), INVALID_ARGUMENT, "an id not from ncclGetUniqueId");
        assert!(lib.last_error().contains("ncclGetUniqueId"), "{}", lib.last_error());
    }

    lib.ok(lib.init(&mut comm, 1, id, 0));
    let mut buf = stream.alloc_zeros::<f32>(16).unwrap();
    let (p, _p) = buf.device_ptr_mut(&stream);
    let null = std::ptr::null_mut();
    let calls: [(&str, &dyn Fn() -> c_int); 7] = [
        ("comm is NULL", &|| lib.reduce(p, p, 16, FLOAT32, SUM, null, &stream)),
        ("datatype 10", &|| lib.reduce(p, p, 16, 10, SUM, comm, &stream)),
        ("datatype -1", &|| lib.gather(p, p, 16, -1, comm, &stream)),
        ("reduction 5", &|| lib.reduce(p, p, 16, FLOAT32, 5, comm, &stream)),
        ("reduction -1", &|| lib.scatter(p, p, 4, FLOAT32, -1, comm, &stream)),
        // NCCL checks buffers only in its debug check mode (NCCL_CHECK_POINTERS); the emulation always.
        ("sendbuff is NULL", &|| lib.reduce(0, p, 16, FLOAT32, SUM, comm, &stream)),
        ("recvbuff is NULL", &|| lib.gather(p, 0, 4, FLOAT32, comm, &stream)),
    ];
    for (what, call) in calls {
        if what.contains("buff") && !emulated() {
            continue;
        }
        assert_eq!(call(), INVALID_ARGUMENT, "{what}");
        if emulated() {
            assert!(lib.last_error().contains(what), "{what}: {}", lib.last_error());
        }
    }
    // Nothing to move: NULL buffers are fine.
    lib.ok(lib.reduce(0, 0, 0, FLOAT32, SUM, comm, &stream));
    lib.ok(lib.scatter(0, 0, 0, FLOAT32, SUM, comm, &stream));
    stream.synchronize().unwrap();
    // SAFETY: NULL is a no-op.
    lib.ok(unsafe { (lib.destroy)(std::ptr::null_mut()) });

    if emulated() {
        // A stream of another GPU than the communicator's.
        let other = CudaContext::new(1).unwrap().new_stream().unwrap();
        assert_eq!(lib.reduce(p, p, 16, FLOAT32, SUM, comm, &other), INVALID_USAGE);
        assert!(lib.last_error().contains("GPU 1"), "{}", lib.last_error());
        // A buffer in host memory passes the call and faults when the collective runs, as a kernel's
        // access would.
        let host = [0f32; 16];
        lib.ok(lib.reduce(host.as_ptr() as u64, p, 16, FLOAT32, SUM, comm, &stream));
        assert_eq!(stream.synchronize().unwrap_err(), DriverError(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS));
    }
    // SAFETY: destroyed once.
    lib.ok(unsafe { (lib.destroy)(comm) });
    if emulated() {
        // SAFETY: the emulation keeps a set of live communicators, so a destroyed one is refused.
        assert_eq!(unsafe { (lib.destroy)(comm) }, INVALID_ARGUMENT, "a destroyed communicator");
    }
}

// ---- Across processes -----------------------------------------------------------------------------

fn hex(id: &Id) -> String {
    id.0.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Id {
    let mut id = Id([0; 128]);
    for (i, b) in id.0.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    id
}

/// This test binary running `worker` as `role` (process `process`, id `id`) in a child of its own,
/// which inherits this process's loader path.
fn spawn(role: &str, id: &Id, process: usize, env: &[(&str, String)]) -> Child {
    let mut cmd = child_test(&test_path(module_path!(), "worker"));
    cmd.arg("--ignored").env("PFC_EMU_NCCL_ROLE", role).env("PFC_EMU_NCCL_ID", hex(id)).env("PFC_EMU_NCCL_PROCESS", process.to_string());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Waits for a `spawn`ed worker, asserts that it ran and passed, and returns its stderr.
fn finish(child: Child, what: &str) -> String {
    child_passed(&child.wait_with_output().unwrap(), what)
}

#[test]
fn two_processes_of_two_ranks_each_match_the_host() {
    if !on_cuda(module_path!(), "two_processes_of_two_ranks_each_match_the_host") {
        return;
    }
    let per_process = gpus() / 2;
    if per_process == 0 {
        eprintln!("one GPU: two processes need two");
        return;
    }
    let id = nccl().unique_id();
    let workers: Vec<_> = (0..2).map(|p| spawn("ranks", &id, p, &[("PFC_EMU_NCCL_RANKS", per_process.to_string())])).collect();
    for (p, w) in workers.into_iter().enumerate() {
        finish(w, &format!("process {p}"));
    }
}

#[test]
fn collectives_that_disagree_fail_instead_of_hanging() {
    if !on_cuda(module_path!(), "collectives_that_disagree_fail_instead_of_hanging") || !emulated() {
        // NCCL itself hangs.
        return;
    }
    let stderr = finish(spawn("disagree", &nccl().unique_id(), 0, &[]), "the disagreeing ranks");
    assert!(stderr.contains("ncclInvalidUsage") && stderr.contains("same collectives in the same order"), "{stderr}");
}

#[test]
fn a_dead_or_missing_peer_fails_instead_of_hanging() {
    if !on_cuda(module_path!(), "a_dead_or_missing_peer_fails_instead_of_hanging") || !emulated() {
        // NCCL's own detection differs (its watchdogs, its network timeouts).
        return;
    }
    let lib = nccl();
    // Rank 1 joins from another process, which then exits: rank 0's collective fails.
    let id = lib.unique_id();
    let peer = spawn("join-and-exit", &id, 1, &[]);
    let stream = CudaContext::new(0).unwrap().new_stream().unwrap();
    stream.context().bind_to_thread().unwrap();
    let mut comm = std::ptr::null_mut();
    lib.ok(lib.init(&mut comm, 2, id, 0));
    finish(peer, "the peer that exits");
    let mut buf = stream.alloc_zeros::<f32>(8).unwrap();
    {
        let (p, _p) = buf.device_ptr_mut(&stream);
        lib.ok(lib.reduce(p, p, 8, FLOAT32, SUM, comm, &stream));
    }
    let t = Instant::now();
    assert_eq!(stream.synchronize().unwrap_err(), DriverError(CUresult::CUDA_ERROR_LAUNCH_FAILED));
    assert!(t.elapsed() < Duration::from_secs(30), "took {:?}", t.elapsed());
    // SAFETY: destroyed once.
    lib.ok(unsafe { (lib.destroy)(comm) });

    // A rank whose peers never come gives up after PFC_EMU_NCCL_TIMEOUT_S.
    finish(spawn("alone", &lib.unique_id(), 0, &[("PFC_EMU_NCCL_TIMEOUT_S", "1".into())]), "the rank alone");
}

/// The other processes of the tests above, by PFC_EMU_NCCL_ROLE; nothing without it.
#[test]
#[ignore = "a worker process of the tests above"]
fn worker() {
    let Ok(role) = std::env::var("PFC_EMU_NCCL_ROLE") else { return };
    let lib = nccl();
    let id = unhex(&std::env::var("PFC_EMU_NCCL_ID").unwrap());
    let process: usize = std::env::var("PFC_EMU_NCCL_PROCESS").unwrap().parse().unwrap();
    match role.as_str() {
        "ranks" => {
            let per: usize = std::env::var("PFC_EMU_NCCL_RANKS").unwrap().parse().unwrap();
            let r = Ranks::new(per, process * per, 2 * per, process * per, id);
            check_library_collectives(&r);
        }
        "disagree" => {
            // Ranks 0 and 1 call different collectives as their first.
            let r = Ranks::new(2, 0, 2, 0, id);
            let bufs: Vec<CudaSlice<f32>> = r.streams.iter().map(|s| s.alloc_zeros(32).unwrap()).collect();
            lib.ok(lib.start());
            {
                let (a, _a) = bufs[0].device_ptr(&r.streams[0]);
                let (b, _b) = bufs[1].device_ptr(&r.streams[1]);
                lib.ok(lib.reduce(a, a, 16, FLOAT32, SUM, r.comms[0], &r.streams[0]));
                lib.ok(lib.gather(b, b, 16, FLOAT32, r.comms[1], &r.streams[1]));
            }
            lib.ok(lib.end());
            let t = Instant::now();
            for s in &r.streams {
                assert_eq!(s.synchronize().unwrap_err(), DriverError(CUresult::CUDA_ERROR_LAUNCH_FAILED));
            }
            assert!(t.elapsed() < Duration::from_secs(30), "took {:?}", t.elapsed());
            // The contexts keep the error: later calls cannot queue.
            let (a, _a) = bufs[0].device_ptr(&r.streams[0]);
            assert_eq!(lib.reduce(a, a, 16, FLOAT32, SUM, r.comms[0], &r.streams[0]), 1, "ncclUnhandledCudaError");
        }
        "join-and-exit" => {
            CudaContext::new(0).unwrap().bind_to_thread().unwrap();
            let mut comm = std::ptr::null_mut();
            lib.ok(lib.init(&mut comm, 2, id, process as isize));
        }
        "alone" => {
            CudaContext::new(0).unwrap().bind_to_thread().unwrap();
            let mut comm = std::ptr::null_mut();
            let t = Instant::now();
            assert_eq!(lib.init(&mut comm, 2, id, 0), REMOTE_ERROR);
            assert!(comm.is_null());
            assert!(t.elapsed() >= Duration::from_secs(1) && t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
            assert!(lib.last_error().contains("timed out"), "{}", lib.last_error());
        }
        _ => panic!("unknown role {role}"),
    }
}
