//! NCCL, loaded at run time by its own small binding: cudarc looks for `libnccl.so` only, while the
//! NCCL that NVIDIA ships on PyPI (and many installs) provides `libnccl.so.2`. Failures carry NCCL's
//! own message and map to PFC_ERR_COMMUNICATION; a missing library to PFC_ERR_UNAVAILABLE.

use crate::error::{Error, Result, Status};
use libloading::Library;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [u8; UNIQUE_ID_BYTES],
}

/// An opaque `ncclComm_t`.
pub type Comm = *mut c_void;

/// `ncclDataType_t` and `ncclRedOp_t` values used here.
pub const NCCL_FLOAT32: c_int = 7;
pub const NCCL_INT64: c_int = 4;
pub const NCCL_SUM: c_int = 0;
pub const NCCL_MAX: c_int = 2;

type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int;
type CommDestroy = unsafe extern "C" fn(Comm) -> c_int;
type AllGather = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, *mut c_void) -> c_int;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int;
type ReduceScatter = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int;
type Group = unsafe extern "C" fn() -> c_int;

/// The NCCL entry points this crate uses.
pub struct Nccl {
    _lib: Library,
    pub path: String,
    get_unique_id: GetUniqueId,
    get_error_string: GetErrorString,
    get_version: GetVersion,
    pub comm_init_rank: CommInitRank,
    pub comm_destroy: CommDestroy,
    pub all_gather: AllGather,
    pub all_reduce: AllReduce,
    pub reduce_scatter: ReduceScatter,
    pub group_start: Group,
    pub group_end: Group,
}

/// Names tried in order; `PFC_NCCL_LIBRARY` (a path) comes first when set.
const CANDIDATES: [&str; 2] = ["libnccl.so", "libnccl.so.2"];

fn open() -> std::result::Result<Nccl, String> {
    let mut tried = Vec::new();
    let explicit = std::env::var("PFC_NCCL_LIBRARY").ok();
    for name in explicit.iter().map(String::as_str).chain(CANDIDATES) {
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        match unsafe { Library::new(name) } {
            Ok(lib) => return bind(lib, name),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(format!("NCCL is not installed or not on the loader path (tried {})", tried.join("; ")))
}

fn bind(lib: Library, name: &str) -> std::result::Result<Nccl, String> {
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol's type is NCCL's documented signature.
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| format!("{name} lacks {}: {e}", $name))?
        };
    }
    Ok(Nccl {
        get_unique_id: sym!("ncclGetUniqueId"),
        get_error_string: sym!("ncclGetErrorString"),
        get_version: sym!("ncclGetVersion"),
        comm_init_rank: sym!("ncclCommInitRank"),
        comm_destroy: sym!("ncclCommDestroy"),
        all_gather: sym!("ncclAllGather"),
        all_reduce: sym!("ncclAllReduce"),
        reduce_scatter: sym!("ncclReduceScatter"),
        group_start: sym!("ncclGroupStart"),
        group_end: sym!("ncclGroupEnd"),
        path: name.to_string(),
        _lib: lib,
    })
}

/// The process's NCCL, loaded on first use.
pub fn nccl() -> Result<&'static Nccl> {
    static NCCL: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
    NCCL.get_or_init(open).as_ref().map_err(|e| Error::new(Status::Unavailable, e.clone()))
}

impl Nccl {
    /// Maps an `ncclResult_t` to a result carrying NCCL's message.
    pub fn check(&self, what: &str, code: c_int) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for any result code.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(code)) }.to_string_lossy().into_owned();
        Err(Error::new(Status::Communication, format!("NCCL {what} failed ({code}): {text}")))
    }

    pub fn version(&self) -> Result<i32> {
        let mut v = 0;
        // SAFETY: writes one int.
        self.check("ncclGetVersion", unsafe { (self.get_version)(&mut v) })?;
        Ok(v)
    }

    /// A fresh id for `ncclCommInitRank`, to be distributed by the host to every process.
    pub fn unique_id(&self) -> Result<UniqueId> {
        let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
        // SAFETY: writes the 128-byte struct.
        self.check("ncclGetUniqueId", unsafe { (self.get_unique_id)(&mut id) })?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absence_is_reported_not_fatal() {
        match nccl() {
            Ok(n) => assert!(n.version().unwrap() > 0),
            Err(e) => {
                assert_eq!(e.status, Status::Unavailable);
                assert!(e.message.contains("libnccl.so.2"), "{}", e.message);
            }
        }
    }
}
