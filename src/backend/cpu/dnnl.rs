//! oneDNN's matmul primitive, loaded at run time (as NCCL is), so the library builds and runs
//! without it. Debian's `libdnnl` 2.6 is threaded by OpenMP; here every product is one block of the
//! CPU backend's step, run on a thread of the work-stealing pool, so each such thread limits its own
//! OpenMP team to itself before creating primitives: oneDNN then never starts threads of its own and
//! the pool stays the only source of parallelism (no oversubscription). Primitives are created once
//! per shape on each thread and kept there (Debian builds oneDNN without concurrent execution, so a
//! primitive must run on the thread that created it).

use libloading::Library;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

type Status = c_int;
type Handle = *mut c_void;

/// `dnnl_data_type_t` values.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(i32)]
pub enum DataType {
    F16 = 1,
    Bf16 = 2,
    F32 = 3,
}

const ENGINE_CPU: c_int = 1;
const STREAM_DEFAULT: u32 = 1;
const QUERY_IMPL_INFO_STR: c_int = 8;
const ARG_SRC: c_int = 1;
const ARG_DST: c_int = 17;
const ARG_WEIGHTS: c_int = 33;
/// `sizeof(dnnl_memory_desc_t)` and `sizeof(dnnl_matmul_desc_t)` are 696 and 2800 bytes in 2.x;
/// the descriptors live in larger, aligned buffers that only oneDNN reads or writes.
const DESC_BYTES: usize = 4096;

#[repr(C, align(64))]
struct Desc([u8; DESC_BYTES]);

impl Desc {
    fn new() -> Box<Self> {
        Box::new(Desc([0; DESC_BYTES]))
    }
    fn ptr(&mut self) -> *mut c_void {
        self.0.as_mut_ptr().cast()
    }
}

#[repr(C)]
struct ExecArg {
    arg: c_int,
    memory: Handle,
}

/// The entry points used here.
struct Api {
    _lib: Library,
    path: String,
    engine_create: unsafe extern "C" fn(*mut Handle, c_int, usize) -> Status,
    stream_create: unsafe extern "C" fn(*mut Handle, Handle, u32) -> Status,
    md_init_by_strides: unsafe extern "C" fn(*mut c_void, c_int, *const i64, c_int, *const i64) -> Status,
    matmul_desc_init: unsafe extern "C" fn(*mut c_void, *const c_void, *const c_void, *const c_void, *const c_void) -> Status,
    attr_create: unsafe extern "C" fn(*mut Handle) -> Status,
    attr_destroy: unsafe extern "C" fn(Handle) -> Status,
    attr_set_post_ops: unsafe extern "C" fn(Handle, Handle) -> Status,
    post_ops_create: unsafe extern "C" fn(*mut Handle) -> Status,
    post_ops_destroy: unsafe extern "C" fn(Handle) -> Status,
    post_ops_append_sum: unsafe extern "C" fn(Handle, f32) -> Status,
    pd_create: unsafe extern "C" fn(*mut Handle, *const c_void, Handle, Handle, Handle) -> Status,
    pd_query: unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> Status,
    pd_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> Status,
    primitive_execute: unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> Status,
    memory_create: unsafe extern "C" fn(*mut Handle, *const c_void, Handle, *mut c_void) -> Status,
    memory_set_data_handle: unsafe extern "C" fn(Handle, *mut c_void) -> Status,
    stream_wait: unsafe extern "C" fn(Handle) -> Status,
    primitive_destroy: unsafe extern "C" fn(Handle) -> Status,
    memory_destroy: unsafe extern "C" fn(Handle) -> Status,
    stream_destroy: unsafe extern "C" fn(Handle) -> Status,
    engine_destroy: unsafe extern "C" fn(Handle) -> Status,
    /// OpenMP's, from the runtime oneDNN links (libgomp for Debian's build).
    omp_set_num_threads: unsafe extern "C" fn(c_int),
}

/// `PFC_ONEDNN_LIBRARY`, when set, is the only library tried; set it empty to run without oneDNN.
const CANDIDATES: [&str; 2] = ["libdnnl.so.2", "libdnnl.so"];

fn open() -> Result<Api, String> {
    let explicit = std::env::var("PFC_ONEDNN_LIBRARY").ok();
    let names: Vec<&str> = match &explicit {
        Some(p) if p.is_empty() => return Err("oneDNN is disabled (PFC_ONEDNN_LIBRARY is empty)".into()),
        Some(p) => vec![p.as_str()],
        None => CANDIDATES.to_vec(),
    };
    let mut tried = Vec::new();
    for name in names {
        // SAFETY: loading oneDNN runs its initialisers, which have no preconditions.
        match unsafe { Library::new(name) } {
            Ok(lib) => return bind(lib, name),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(format!("oneDNN is not installed or not on the loader path (tried {})", tried.join("; ")))
}

fn bind(lib: Library, name: &str) -> Result<Api, String> {
    macro_rules! sym {
        ($lib:expr, $name:literal) => {
            // SAFETY: the symbol's type is oneDNN's (or OpenMP's) documented C signature.
            *unsafe { $lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| format!("{name} lacks {}: {e}", $name))?
        };
    }
    // oneDNN's OpenMP runtime is loaded with it; its symbols resolve through oneDNN's handle.
    let omp_set_num_threads = sym!(lib, "omp_set_num_threads");
    Ok(Api {
        engine_create: sym!(lib, "dnnl_engine_create"),
        stream_create: sym!(lib, "dnnl_stream_create"),
        md_init_by_strides: sym!(lib, "dnnl_memory_desc_init_by_strides"),
        matmul_desc_init: sym!(lib, "dnnl_matmul_desc_init"),
        attr_create: sym!(lib, "dnnl_primitive_attr_create"),
        attr_destroy: sym!(lib, "dnnl_primitive_attr_destroy"),
        attr_set_post_ops: sym!(lib, "dnnl_primitive_attr_set_post_ops"),
        post_ops_create: sym!(lib, "dnnl_post_ops_create"),
        post_ops_destroy: sym!(lib, "dnnl_post_ops_destroy"),
        post_ops_append_sum: sym!(lib, "dnnl_post_ops_append_sum"),
        pd_create: sym!(lib, "dnnl_primitive_desc_create"),
        pd_query: sym!(lib, "dnnl_primitive_desc_query"),
        pd_destroy: sym!(lib, "dnnl_primitive_desc_destroy"),
        primitive_create: sym!(lib, "dnnl_primitive_create"),
        primitive_execute: sym!(lib, "dnnl_primitive_execute"),
        memory_create: sym!(lib, "dnnl_memory_create"),
        memory_set_data_handle: sym!(lib, "dnnl_memory_set_data_handle"),
        stream_wait: sym!(lib, "dnnl_stream_wait"),
        primitive_destroy: sym!(lib, "dnnl_primitive_destroy"),
        memory_destroy: sym!(lib, "dnnl_memory_destroy"),
        stream_destroy: sym!(lib, "dnnl_stream_destroy"),
        engine_destroy: sym!(lib, "dnnl_engine_destroy"),
        omp_set_num_threads,
        path: name.to_string(),
        _lib: lib,
    })
}

fn api() -> Result<&'static Api, &'static str> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(open).as_ref().map_err(String::as_str)
}

/// The file oneDNN was loaded from, or why it was not.
pub fn loaded() -> Result<&'static str, &'static str> {
    api().map(|a| a.path.as_str())
}

fn check(what: &str, status: Status) -> Result<(), String> {
    if status == 0 {
        Ok(())
    } else {
        Err(format!("oneDNN {what} failed (status {status})"))
    }
}

/// One GEMM shape: `dst[m×n] (row-major, f32) = a[m×k]·b[k×n]` (`+=` when `accumulate`), the
/// operands of type `dtype` at the given (row, column) strides in elements.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Shape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_strides: (usize, usize),
    pub b_strides: (usize, usize),
    pub dtype: DataType,
    pub accumulate: bool,
}

/// A primitive for one shape, with memory objects whose data pointers are set at each call.
struct Primitive {
    primitive: Handle,
    src: Handle,
    weights: Handle,
    dst: Handle,
    implementation: String,
}

/// What a thread keeps: its engine, stream and primitives.
struct ThreadState {
    engine: Handle,
    stream: Handle,
    primitives: HashMap<Shape, Primitive>,
}

thread_local! {
    static STATE: RefCell<Option<ThreadState>> = const { RefCell::new(None) };
}

fn dims(a: usize, b: usize) -> [i64; 2] {
    [a as i64, b as i64]
}

impl ThreadState {
    fn new(api: &Api) -> Result<Self, String> {
        // This thread is one of the pool's workers: oneDNN must compute on it alone. The OpenMP
        // thread count is this thread's own setting, read by oneDNN when it creates a primitive.
        // SAFETY: plain OpenMP call.
        unsafe { (api.omp_set_num_threads)(1) };
        let mut engine = std::ptr::null_mut();
        let mut stream = std::ptr::null_mut();
        // SAFETY: out-pointers to handles.
        unsafe {
            check("engine creation", (api.engine_create)(&mut engine, ENGINE_CPU, 0))?;
            check("stream creation", (api.stream_create)(&mut stream, engine, STREAM_DEFAULT))?;
        }
        Ok(ThreadState { engine, stream, primitives: HashMap::new() })
    }

    fn create(&self, api: &Api, s: &Shape) -> Result<Primitive, String> {
        let (mut a, mut b, mut c, mut op) = (Desc::new(), Desc::new(), Desc::new(), Desc::new());
        let dt = s.dtype as c_int;
        let a_strides = dims(s.a_strides.0, s.a_strides.1);
        let b_strides = dims(s.b_strides.0, s.b_strides.1);
        let c_strides = dims(s.n, 1);
        let mut attr = std::ptr::null_mut();
        let mut post_ops = std::ptr::null_mut();
        let mut pd = std::ptr::null_mut();
        // SAFETY: every descriptor buffer outlives the calls that read it, handles are out-pointers,
        // and the attribute objects are destroyed once the primitive descriptor holds a copy.
        unsafe {
            check("memory descriptor", (api.md_init_by_strides)(a.ptr(), 2, dims(s.m, s.k).as_ptr(), dt, a_strides.as_ptr()))?;
            check("memory descriptor", (api.md_init_by_strides)(b.ptr(), 2, dims(s.k, s.n).as_ptr(), dt, b_strides.as_ptr()))?;
            check("memory descriptor", (api.md_init_by_strides)(c.ptr(), 2, dims(s.m, s.n).as_ptr(), DataType::F32 as c_int, c_strides.as_ptr()))?;
            check("matmul descriptor", (api.matmul_desc_init)(op.ptr(), a.ptr(), b.ptr(), std::ptr::null(), c.ptr()))?;
            check("attributes", (api.attr_create)(&mut attr))?;
            let built = (|| {
                if s.accumulate {
                    check("post-ops", (api.post_ops_create)(&mut post_ops))?;
                    check("sum post-op", (api.post_ops_append_sum)(post_ops, 1.0))?;
                    check("post-ops", (api.attr_set_post_ops)(attr, post_ops))?;
                }
                check(&format!("matmul for {s:?}"), (api.pd_create)(&mut pd, op.ptr(), attr, self.engine, std::ptr::null_mut()))
            })();
            if !post_ops.is_null() {
                (api.post_ops_destroy)(post_ops);
            }
            (api.attr_destroy)(attr);
            built?;
            let mut info: *const c_char = std::ptr::null();
            let mut primitive = std::ptr::null_mut();
            let queried = check("implementation query", (api.pd_query)(pd, QUERY_IMPL_INFO_STR, 0, (&mut info as *mut *const c_char).cast()));
            let created = check("primitive creation", (api.primitive_create)(&mut primitive, pd));
            let implementation = if queried.is_ok() && !info.is_null() { CStr::from_ptr(info).to_string_lossy().into_owned() } else { String::new() };
            (api.pd_destroy)(pd);
            created?;
            let (mut src, mut weights, mut dst) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
            check("memory", (api.memory_create)(&mut src, a.ptr(), self.engine, std::ptr::null_mut()))?;
            check("memory", (api.memory_create)(&mut weights, b.ptr(), self.engine, std::ptr::null_mut()))?;
            check("memory", (api.memory_create)(&mut dst, c.ptr(), self.engine, std::ptr::null_mut()))?;
            Ok(Primitive { primitive, src, weights, dst, implementation })
        }
    }
}

/// Calls `f` with this thread's primitive for `shape`, creating the thread's state and the
/// primitive on first use.
fn with_primitive<R>(shape: &Shape, f: impl FnOnce(&Api, &ThreadState, &Primitive) -> Result<R, String>) -> Result<R, String> {
    let api = api().map_err(str::to_string)?;
    STATE.with(|cell| {
        let mut state = cell.borrow_mut();
        if state.is_none() {
            *state = Some(ThreadState::new(api)?);
        }
        let state = state.as_mut().expect("initialised above");
        if !state.primitives.contains_key(shape) {
            let p = state.create(api, shape)?;
            state.primitives.insert(*shape, p);
        }
        f(api, state, &state.primitives[shape])
    })
}

/// Runs `shape` on this thread with oneDNN.
///
/// # Safety
/// `a`, `b` and `dst` must address every element the shape and its strides reach, and `dst` must
/// not overlap the operands.
pub unsafe fn matmul(shape: &Shape, a: *const c_void, b: *const c_void, dst: *mut f32) -> Result<(), String> {
    with_primitive(shape, |api, state, p| {
        check("set data", (api.memory_set_data_handle)(p.src, a.cast_mut()))?;
        check("set data", (api.memory_set_data_handle)(p.weights, b.cast_mut()))?;
        check("set data", (api.memory_set_data_handle)(p.dst, dst.cast()))?;
        let args = [ExecArg { arg: ARG_SRC, memory: p.src }, ExecArg { arg: ARG_WEIGHTS, memory: p.weights }, ExecArg { arg: ARG_DST, memory: p.dst }];
        check("matmul", (api.primitive_execute)(p.primitive, state.stream, args.len() as c_int, args.as_ptr()))?;
        check("stream wait", (api.stream_wait)(state.stream))
    })
}

/// The implementation oneDNN picks for `shape` (e.g. `brg:avx512_core_bf16`), or why it cannot.
pub fn implementation(shape: &Shape) -> Result<String, String> {
    with_primitive(shape, |_, _, p| Ok(p.implementation.clone()))
}

impl Drop for ThreadState {
    fn drop(&mut self) {
        let Ok(api) = api() else { return };
        // SAFETY: the handles were created by this state and are used by nothing else.
        unsafe {
            for p in self.primitives.values() {
                (api.primitive_destroy)(p.primitive);
                for m in [p.src, p.weights, p.dst] {
                    (api.memory_destroy)(m);
                }
            }
            (api.stream_destroy)(self.stream);
            (api.engine_destroy)(self.engine);
        }
    }
}
