//! Helpers shared by the integration tests: the golden files, driving a head through the C ABI, and
//! running a test of this binary in a child process of its own.

use partialfc::ffi::*;
use safetensors::SafeTensors;
use std::path::PathBuf;
use std::process::Command;

/// `../shared` beside the repository, or `PFC_SHARED_DIR` (the GPU machine gets a staged copy).
pub fn shared_dir() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidate = std::env::var_os("PFC_SHARED_DIR").map(PathBuf::from).unwrap_or_else(|| here.join("../shared"));
    assert!(candidate.join("golden").is_dir(), "../shared/golden not found beside the repository");
    candidate
}

pub struct Golden {
    pub name: String,
    pub config: serde_json::Value,
    bytes: Vec<u8>,
}

/// Golden files whose `head` is one of these hold the adaptive margins of SPEC §1.6a, from their
/// authors' heads.
const ADAPTIVE_MARGIN_HEADS: [&str; 2] = ["adaface", "curricular"];

impl Golden {
    /// Every combined-margin case: the reference PartialFC_V2's files (they name no `head`).
    pub fn all() -> Vec<Golden> {
        let cases: Vec<Golden> = Golden::read_all().into_iter().filter(|g| g.head().is_none()).collect();
        assert!(!cases.is_empty(), "no combined-margin golden files");
        cases
    }

    /// The files of the adaptive margin `head` (e.g. "adaface").
    pub fn of_head(head: &str) -> Vec<Golden> {
        let cases: Vec<Golden> = Golden::read_all().into_iter().filter(|g| g.head() == Some(head)).collect();
        assert!(!cases.is_empty(), "no golden files of head {head}");
        cases
    }

    /// The adaptive margin whose authors' head made the file; None for the reference's files.
    pub fn head(&self) -> Option<&str> {
        self.config.get("head").and_then(|h| h.as_str())
    }

    fn read_all() -> Vec<Golden> {
        let mut files: Vec<_> = std::fs::read_dir(shared_dir().join("golden"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        let cases: Vec<Golden> = files
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
                let cfg = meta.metadata().as_ref().unwrap()["config"].clone();
                Golden {
                    name: p.file_name().unwrap().to_string_lossy().into(),
                    config: serde_json::from_str(&cfg).unwrap(),
                    bytes,
                }
            })
            .collect();
        for g in &cases {
            if let Some(head) = g.head() {
                assert!(ADAPTIVE_MARGIN_HEADS.contains(&head), "golden file {}: unknown head {head:?}", g.name);
            }
        }
        cases
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        let t = SafeTensors::deserialize(&self.bytes).unwrap();
        let v = t.tensor(name).unwrap();
        v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let t = SafeTensors::deserialize(&self.bytes).unwrap();
        let v = t.tensor(name).unwrap();
        v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    pub fn usize(&self, key: &str) -> usize {
        self.config[key].as_u64().unwrap() as usize
    }
    pub fn f32_of(&self, key: &str) -> f32 {
        self.config[key].as_f64().unwrap() as f32
    }

    /// The configuration of this file for a head with `shards` local shards.
    pub fn pfc_config(&self, shards: u32) -> pfc_config {
        let mut c = default_config();
        c.num_classes = self.usize("num_classes") as u64;
        c.embedding_dim = self.usize("embedding_dim") as u32;
        match self.head() {
            Some("adaface") => {
                c.margin_kind = PFC_MARGIN_ADAFACE;
                c.scale = self.f32_of("s");
                c.margin_m = self.f32_of("m");
                c.adaface_h = self.f32_of("h");
                c.adaface_t_alpha = self.f32_of("t_alpha");
            }
            Some("curricular") => {
                c.margin_kind = PFC_MARGIN_CURRICULAR;
                c.scale = self.f32_of("s");
                c.margin_m = self.f32_of("m");
            }
            _ => {
                c.scale = self.f32_of("scale");
                c.m1 = self.f32_of("m1");
                c.m2 = self.f32_of("m2");
                c.m3 = self.f32_of("m3");
                c.interclass_filter = self.f32_of("interclass_filtering_threshold");
            }
        }
        c.lr = self.f32_of("lr");
        c.weight_decay = self.f32_of("weight_decay");
        if self.config["optimizer"] == "adamw" {
            c.optimizer = PFC_OPTIMIZER_ADAMW;
            c.beta1 = self.config["adamw_betas"][0].as_f64().unwrap() as f32;
            c.beta2 = self.config["adamw_betas"][1].as_f64().unwrap() as f32;
            c.eps = self.f32_of("adamw_eps");
        } else {
            c.momentum = self.f32_of("momentum");
        }
        c.sample_rate = self.f32_of("sample_rate");
        c.local_shards = shards;
        c
    }
}

pub fn default_config() -> pfc_config {
    let mut c = std::mem::MaybeUninit::<pfc_config>::zeroed();
    pfc_config_init(c.as_mut_ptr());
    unsafe { c.assume_init() }
}

pub fn last_error() -> String {
    let n = pfc_last_error(std::ptr::null_mut(), 0);
    let mut buf = vec![0u8; n + 1];
    pfc_last_error(buf.as_mut_ptr().cast(), buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[track_caller]
pub fn ok(status: pfc_status) {
    assert_eq!(status, PFC_OK, "status {status}: {}", last_error());
}

/// An owned head, destroyed on drop.
pub struct TestHead(pub *mut pfc_head);

impl TestHead {
    pub fn new(cfg: &pfc_config) -> TestHead {
        let mut h = std::ptr::null_mut();
        ok(pfc_create(cfg, &mut h));
        TestHead(h)
    }

    pub fn local_classes(&self) -> (u64, u64) {
        let (mut f, mut c) = (0, 0);
        ok(pfc_local_classes(self.0, &mut f, &mut c));
        (f, c)
    }

    pub fn centers(&self, d: usize) -> Vec<f32> {
        let (f, c) = self.local_classes();
        let mut out = vec![0f32; c as usize * d];
        ok(pfc_get_centers(self.0, f, c, 0, out.as_mut_ptr()));
        out
    }

    /// The margin's running statistics (`pfc_margin_state`).
    pub fn margin_state(&self) -> Vec<f32> {
        let mut out = [0f32; 8];
        let mut len = 0u32;
        ok(pfc_margin_state(self.0, out.as_mut_ptr(), out.len() as u32, &mut len));
        out[..len as usize].to_vec()
    }

    pub fn set_centers(&self, values: &[f32]) {
        let (f, c) = self.local_classes();
        ok(pfc_set_centers(self.0, f, c, values.as_ptr()));
    }

    /// One f32 step with the global batch split into `shards` local batches by `rows_per_shard`.
    pub fn step(&self, emb: &[f32], labels: &[i64], d: usize, rows_per_shard: &[usize]) -> (pfc_step_stats, Vec<f32>) {
        self.run(pfc_train_step, emb, labels, d, rows_per_shard)
    }

    /// `pfc_evaluate` on the same kind of split batch: the head does not change.
    pub fn evaluate(&self, emb: &[f32], labels: &[i64], d: usize, rows_per_shard: &[usize]) -> pfc_step_stats {
        self.run(pfc_evaluate, emb, labels, d, rows_per_shard).0
    }

    fn run(
        &self,
        call: extern "C" fn(*mut pfc_head, *const pfc_batch, u32, *mut pfc_step_stats) -> pfc_status,
        emb: &[f32],
        labels: &[i64],
        d: usize,
        rows_per_shard: &[usize],
    ) -> (pfc_step_stats, Vec<f32>) {
        let mut grad = vec![0f32; emb.len()];
        let batches = host_batches(emb, labels, &mut grad, d, rows_per_shard);
        let mut stats = pfc_step_stats::default();
        ok(call(self.0, batches.as_ptr(), batches.len() as u32, &mut stats));
        (stats, grad)
    }
}

/// f32 host batches over `emb`, `labels` and `grad`, `rows_per_shard` consecutive rows each (all of
/// them).
pub fn host_batches(emb: &[f32], labels: &[i64], grad: &mut [f32], d: usize, rows_per_shard: &[usize]) -> Vec<pfc_batch> {
    assert_eq!(rows_per_shard.iter().sum::<usize>(), labels.len());
    let mut at = 0;
    rows_per_shard
        .iter()
        .map(|&rows| {
            let b = pfc_batch {
                embeddings: emb[at * d..].as_ptr().cast(),
                labels: labels[at..].as_ptr(),
                grad_embeddings: grad[at * d..].as_mut_ptr().cast(),
                batch_size: rows as u64,
                dtype: PFC_DTYPE_F32,
                memory: PFC_MEMORY_HOST,
                stream: std::ptr::null_mut(),
            };
            at += rows;
            b
        })
        .collect()
}

impl Drop for TestHead {
    fn drop(&mut self) {
        pfc_destroy(self.0);
    }
}

/// ‖a − b‖₂ / ‖b‖₂: the golden files' measure. Element-wise ratios are ill-conditioned there —
/// AdamW's first step maps gradients near `eps` to updates that the reference's own f32 rounding
/// moves by several percent — while the norm-wise error of a float64 model stays below 3e-5.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let norm = b.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
    let diff = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt();
    diff / norm
}

/// Splits `n` rows into `shards` nearly equal parts.
pub fn even_split(n: usize, shards: usize) -> Vec<usize> {
    (0..shards).map(|r| n / shards + usize::from(r < n % shards)).collect()
}

/// SplitMix64 for test data: small, deterministic, independent of the crate's counter-based draws.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        partialfc::rng::mix64(self.0)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// The name libtest knows test `name` of module `module` by (pass `module_path!()`): its path below
/// the crate root, e.g. `oom::step_buffers_report_out_of_memory_under_an_address_space_limit`.
pub fn test_path(module: &str, name: &str) -> String {
    match module.split_once("::") {
        Some((_crate, below)) => format!("{below}::{name}"),
        None => name.to_string(),
    }
}

/// This test binary re-executed to run test `path` (see [`test_path`]) alone: `--exact`, output not
/// captured, one thread. Callers add `--ignored` for an ignored child test, its environment, stdio.
///
/// All tests share this process, so a test that sets process-global state (an address-space limit,
/// the library's write-failure injection, environment variables the library reads once) does it in
/// such a child, where no other test runs.
pub fn child_test(path: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", path, "--nocapture", "--test-threads=1"]);
    cmd
}

/// For a test whose body changes process-global state: in the parent, runs test `name` of `module`
/// (`module_path!()`) alone in a child process ([`child_test`]), asserts that it ran and passed,
/// passes its output on and returns false; in that child, returns true, and the caller runs the body.
pub fn alone_in_child(module: &str, name: &str) -> bool {
    const CHILD: &str = "PFC_TEST_ALONE";
    let path = test_path(module, name);
    if std::env::var_os(CHILD).is_some_and(|v| v == path.as_str()) {
        return true;
    }
    let out = child_test(&path).env(CHILD, &path).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprint!("{stderr}");
    assert!(out.status.success(), "{path} failed in its own process ({}):\n{stdout}\n{stderr}", out.status);
    // An --exact filter that matches nothing runs nothing and passes.
    assert!(stdout.contains("test result: ok. 1 passed"), "{path} did not run in its own process:\n{stdout}");
    false
}

/// The folder scripts/cuda-emulator.sh builds the emulated CUDA driver, cuBLAS and NCCL into.
pub fn emulator_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/cuda-emulator")
}

/// For a test that needs a GPU. Where this process can use CUDA (a GPU machine, PFC_REQUIRE_GPU=1,
/// or the emulation's child below) returns true and the caller runs the body. Otherwise runs test
/// `name` of `module` in a child process whose loader finds the host emulation
/// (tests/cuda-emulator/) and the NVRTC of setup, asserts that it ran and passed, and returns false.
/// A missing emulation fails the test: nothing here skips.
pub fn on_cuda(module: &str, name: &str) -> bool {
    on_cuda_with(module, name, &[])
}

/// [`on_cuda`] with settings of the emulation for the child (e.g. `PFC_EMU_DEVICE_MEMORY`, or
/// `PFC_EMU_DELAY`, which delays every stream operation at random so that a missing wait shows).
pub fn on_cuda_with(module: &str, name: &str, emulation: &[(&str, &str)]) -> bool {
    const CHILD: &str = "PFC_EMU_CHILD";
    if std::env::var_os("PFC_REQUIRE_GPU").is_some() {
        return true;
    }
    let path = test_path(module, name);
    let lib = emulator_dir();
    assert!(lib.join("libcuda.so.1").exists(), "the CUDA emulation is not built: run bash scripts/cuda-emulator.sh ({} is missing)", lib.display());
    let nvrtc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/nvrtc/nvidia/cu13/lib");
    let loader_path = format!("{}:{}", lib.display(), nvrtc.display());
    let mut cmd = child_test(&path);
    cmd.env(CHILD, &path).env("PFC_REQUIRE_GPU", "1").env("LD_LIBRARY_PATH", loader_path);
    for (k, v) in emulation {
        cmd.env(k, v);
    }
    eprint!("{}", child_passed(&cmd.output().unwrap(), &format!("{path} on the CUDA emulation")));
    false
}

/// Asserts that a child run of this test binary (one test, see [`child_test`]) ran that test and
/// passed; returns its stderr. `what` names it in the failure.
pub fn child_passed(out: &std::process::Output, what: &str) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("test result: ok. 1 passed"), "{what} failed ({}):\n{stdout}\n{stderr}", out.status);
    stderr.into_owned()
}

/// A CUDA stream held by a host function until [`StreamGate::open`] (or 30 s): work queued behind
/// it waits, which shows whether a call queued its work or ran it at once.
pub struct StreamGate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    timed_out: std::sync::atomic::AtomicBool,
}

impl StreamGate {
    /// Holds `stream` from now. Leaked, so that it outlives the host function even when an
    /// assertion fails while the stream is held.
    pub fn hold(stream: cudarc::driver::sys::CUstream) -> &'static StreamGate {
        let gate: &'static StreamGate = Box::leak(Box::new(StreamGate { open: Default::default(), opened: Default::default(), timed_out: Default::default() }));
        // SAFETY: `gate` lives for the rest of the process.
        unsafe { cudarc::driver::result::stream::launch_host_function(stream, Self::wait, gate as *const StreamGate as *mut std::ffi::c_void) }.unwrap();
        gate
    }

    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    /// Whether the host function gave up waiting (the stream was held 30 s).
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(std::sync::atomic::Ordering::SeqCst)
    }

    unsafe extern "C" fn wait(gate: *mut std::ffi::c_void) {
        // SAFETY: `hold` leaks its gate.
        let gate = unsafe { &*(gate as *const StreamGate) };
        let open = gate.open.lock().unwrap();
        let (_open, wait) = gate.opened.wait_timeout_while(open, std::time::Duration::from_secs(30), |open| !*open).unwrap();
        gate.timed_out.store(wait.timed_out(), std::sync::atomic::Ordering::SeqCst);
    }
}

/// Where tests write their files: cargo's temporary folder for this target, or `PFC_TEST_TMPDIR`
/// where the test binary runs on another machine (scripts/gpu-check.sh), on which the build
/// machine's folder does not exist.
pub fn test_tmpdir() -> std::path::PathBuf {
    std::env::var_os("PFC_TEST_TMPDIR").map_or_else(|| std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")), std::path::PathBuf::from)
}

/// Whether this process runs on the CUDA emulation (a child of [`on_cuda`]), not a GPU.
pub fn emulated() -> bool {
    std::env::var_os("PFC_EMU_CHILD").is_some()
}

/// The emulated driver's counters of GPU `device` (its `pfc_emu_counters`, tests/cuda-emulator/README.md),
/// None for a GPU it lacks. Only where the emulation is the loaded driver.
pub fn emu_counters(device: i32) -> Option<serde_json::Value> {
    use std::ffi::{c_char, c_int, CStr};
    // SAFETY: the emulated driver is already loaded (cudarc's); pfc_emu_counters writes at most
    // `capacity` bytes.
    unsafe {
        let lib = libloading::Library::new("libcuda.so.1").unwrap();
        let counters: libloading::Symbol<unsafe extern "C" fn(c_int, *mut c_char, usize) -> usize> = lib.get(b"pfc_emu_counters\0").unwrap();
        let n = counters(device, std::ptr::null_mut(), 0);
        if n == 0 {
            return None;
        }
        let mut buf = vec![0u8; n];
        assert_eq!(counters(device, buf.as_mut_ptr().cast(), n), n);
        Some(serde_json::from_str(CStr::from_bytes_until_nul(&buf).unwrap().to_str().unwrap()).unwrap())
    }
}

/// Counter `key` of `after` less that of `before`; `key` may be `launches.<kernel>`.
pub fn counter_delta(before: &serde_json::Value, after: &serde_json::Value, key: &str) -> u64 {
    let get = |v: &serde_json::Value| match key.split_once('.') {
        Some((map, name)) => v[map][name].as_u64().unwrap_or(0),
        None => v[key].as_u64().unwrap(),
    };
    get(after) - get(before)
}

/// Batch `b` of a synthetic job: `rows` rows of unit-Gaussian embeddings of dimension `d` split
/// evenly over `shards` (per shard: embeddings, labels uniform in [0, classes)); `salt` keeps one
/// test's data apart from another's.
pub fn split_batch(b: u64, rows: usize, shards: usize, d: usize, classes: u64, salt: u64) -> Vec<(Vec<f32>, Vec<i64>)> {
    use partialfc::rng;
    let mut first = 0u64;
    even_split(rows, shards)
        .iter()
        .map(|&n| {
            let mut e = vec![0f32; n * d];
            for r in 0..n {
                rng::init_center(salt + b, first + r as u64, 1.0, &mut e[r * d..(r + 1) * d]);
            }
            let labels = (0..n).map(|r| (rng::at(rng::stream(b, salt, 0), first + r as u64) % classes) as i64).collect();
            first += n as u64;
            (e, labels)
        })
        .collect()
}
