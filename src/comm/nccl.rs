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

/// `ncclDataType_t` of bytes.
pub const NCCL_UINT8: c_int = 1;

/// Runs `body` (NCCL calls on several communicators) inside one NCCL group, closing the group on
/// every path: an error inside must not leave later NCCL calls of this thread deferred.
pub fn grouped(lib: &Nccl, body: impl FnOnce() -> Result<()>) -> Result<()> {
    // SAFETY: group calls have no arguments; every start is matched by the end below.
    lib.check("ncclGroupStart", unsafe { (lib.group_start)() })?;
    let inside = body();
    let end = lib.check("ncclGroupEnd", unsafe { (lib.group_end)() });
    inside.and(end)
}

pub use collectives::NcclCollectives;

/// The CUDA backend's collectives: NCCL over one communicator per local GPU, spanning every shard
/// of the job (SPEC §2a, §3). Batches of different sizes are padded to the largest for NCCL's
/// equal-count all-gather and reduce-scatter, then compacted on the device.
mod collectives {
    use super::*;
    use crate::memory::{Device, DeviceBuf, Memory, Workspace};
    use crate::comm::group::ProcessGroup;
    use crate::comm::{Collectives, ReduceOp};
    use cudarc::driver::{CudaStream, DeviceRepr};
    use std::sync::Arc;

    pub struct NcclCollectives {
        /// Each local GPU's workspace, whose stream the collectives run on and whose buffers
        /// they stage through.
        work: Vec<Arc<Workspace>>,
        streams: Vec<Arc<CudaStream>>,
        /// One per local GPU; empty when the job is one GPU.
        comms: Vec<Comm>,
        world: usize,
        first_rank: usize,
        group: Arc<ProcessGroup>,
        /// Shards of each process of the host's group, in process order (empty without one).
        process_shards: Vec<usize>,
    }

    // SAFETY: communicators and streams are used by one thread at a time (the head's lock).
    unsafe impl Send for NcclCollectives {}
    unsafe impl Sync for NcclCollectives {}

    impl Drop for NcclCollectives {
        fn drop(&mut self) {
            if let Ok(lib) = nccl() {
                for comm in self.comms.drain(..) {
                    // SAFETY: each communicator is destroyed once; destroy never waits for other
                    // processes' communicators.
                    unsafe { (lib.comm_destroy)(comm) };
                }
            }
        }
    }

    fn device(e: impl std::fmt::Display) -> Error {
        Error::new(Status::Device, format!("CUDA (collectives): {e}"))
    }

    impl NcclCollectives {
        /// Communicators for the local GPUs (`streams`, global ranks `first_rank..`) of a job of
        /// `world` shards. The id comes from `nccl_id` (the host distributed it), from process 0
        /// through the group's all-gather, or is made here when the job is this process alone.
        pub fn new(work: Vec<Arc<Workspace>>, world: usize, first_rank: usize, group: Arc<ProcessGroup>, process_shards: Vec<usize>, nccl_id: Option<&[u8]>) -> Result<Self> {
            let streams = work.iter().map(|w| w.stream().clone()).collect();
            let mut out = NcclCollectives { work, streams, comms: Vec::new(), world, first_rank, group, process_shards };
            // A one-GPU job needs no communicator, unless the host formed it the NCCL way (a
            // one-rank communicator: how the NCCL path is exercised on a one-GPU machine).
            if world == 1 && nccl_id.is_none() {
                return Ok(out);
            }
            let lib = nccl()?;
            let id = match nccl_id {
                Some(bytes) => {
                    let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
                    id.internal.copy_from_slice(&bytes[..UNIQUE_ID_BYTES]);
                    id
                }
                None if out.group.is_solo() => lib.unique_id()?,
                None => {
                    // Process 0 makes the id; every process takes process 0's.
                    let mine = if out.group.index() == 0 { lib.unique_id() } else { Ok(UniqueId { internal: [0; UNIQUE_ID_BYTES] }) };
                    let mine = out.group.agree(mine)?;
                    let all = out.group.allgather(&mine.internal)?;
                    let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
                    id.internal.copy_from_slice(&all[..UNIQUE_ID_BYTES]);
                    id
                }
            };
            let mut comms = Vec::new();
            let made = grouped(lib, || {
                for (i, stream) in out.streams.iter().enumerate() {
                    stream.context().bind_to_thread().map_err(device)?;
                    let mut comm: Comm = std::ptr::null_mut();
                    // SAFETY: one communicator per device of this process, inside one group.
                    lib.check("ncclCommInitRank", unsafe { (lib.comm_init_rank)(&mut comm, world as c_int, id, (first_rank + i) as c_int) })?;
                    comms.push(comm);
                }
                Ok(())
            });
            // Communicators made before a failure are freed with `out` (its Drop).
            out.comms = comms;
            made.map(|()| out)
        }

        /// A failed NCCL call leaves the job's shards in unknown states: the head refuses further
        /// collective calls until a checkpoint is loaded.
        fn poisoned<T>(&self, r: Result<T>) -> Result<T> {
            if let Err(e) = &r {
                if e.status == Status::Communication {
                    self.group.poison(&e.message);
                }
            }
            r
        }

        /// `parts[i]` (rows[rank]·width values each rank) gathered into every `out[i]`.
        fn gather<T: DeviceRepr>(&self, local: &[DeviceBuf<T>], rows: &[u64], width: usize, out: &mut [DeviceBuf<T>], dtype: c_int) -> Result<()> {
            let lens: Vec<usize> = rows.iter().map(|&r| r as usize * width).collect();
            if self.comms.is_empty() {
                if lens[0] > 0 {
                    self.streams[0].memcpy_dtod(&local[0].slice(0..lens[0]), &mut out[0].slice_mut(0..lens[0])).map_err(device)?;
                }
                return Ok(());
            }
            let lib = nccl()?;
            let widest = lens.iter().copied().max().unwrap_or(0).max(1);
            let mut sends = Vec::new();
            let mut recvs = Vec::new();
            // Slots of the widest size: what lies past a shorter rank's rows is sent and never read.
            for (i, (stream, work)) in self.streams.iter().zip(&self.work).enumerate() {
                let mut send = work.take::<T>(widest, "all-gather send buffer")?;
                let mine = lens[self.first_rank + i];
                if mine > 0 {
                    stream.memcpy_dtod(&local[i].slice(0..mine), &mut send.slice_mut(0..mine)).map_err(device)?;
                }
                sends.push(send);
                recvs.push(work.take::<T>(widest * self.world, "all-gather receive buffer (the global batch)")?);
            }
            self.poisoned(grouped(lib, || {
                for (i, stream) in self.streams.iter().enumerate() {
                    let (s, r) = (sends[i].ptr(), recvs[i].ptr());
                    // SAFETY: `widest` elements sent, world × widest received, on the shard's stream.
                    let code = unsafe { (lib.all_gather)(s as *const _, r as *mut _, widest, dtype, self.comms[i], stream.cu_stream() as *mut _) };
                    lib.check("ncclAllGather", code)?;
                }
                Ok(())
            }))?;
            for (i, stream) in self.streams.iter().enumerate() {
                let mut at = 0;
                for (rank, &len) in lens.iter().enumerate() {
                    if len > 0 {
                        stream.memcpy_dtod(&recvs[i].slice(rank * widest..rank * widest + len), &mut out[i].slice_mut(at..at + len)).map_err(device)?;
                    }
                    at += len;
                }
            }
            Ok(())
        }

        /// This process's shards' failure records, all-gathered over NCCL: the job's verdict when
        /// it was formed the NCCL way (no host callback to carry messages).
        fn agree_over_nccl(&self, local: Result<()>) -> Result<()> {
            const RECORD: usize = 512;
            let mut record = vec![0u8; RECORD];
            // Status, this process's shards (first rank, count: its message counts batches from
            // its first shard), the message's length and text.
            const TEXT: usize = 16;
            if let Err(e) = &local {
                record[..4].copy_from_slice(&e.status.code().to_le_bytes());
                record[4..8].copy_from_slice(&(self.first_rank as u32).to_le_bytes());
                record[8..12].copy_from_slice(&(self.streams.len() as u32).to_le_bytes());
                let text = e.message.as_bytes();
                let len = text.len().min(RECORD - TEXT);
                record[12..16].copy_from_slice(&(len as u32).to_le_bytes());
                record[TEXT..TEXT + len].copy_from_slice(&text[..len]);
            }
            let mut local_bufs = Vec::new();
            let mut outs = Vec::new();
            for work in &self.work {
                local_bufs.push(work.upload(&record, "agreement record")?);
                outs.push(work.take::<u8>(RECORD * self.world, "agreement records")?);
            }
            let rows = vec![1u64; self.world];
            self.gather(&local_bufs, &rows, RECORD, &mut outs, NCCL_UINT8)?;
            let all: Vec<u8> = self.streams[0].clone_dtoh(&outs[0].view()).map_err(device)?;
            for r in all.chunks_exact(RECORD) {
                let word = |at: usize| u32::from_le_bytes(r[at..at + 4].try_into().expect("4 bytes"));
                let code = word(0) as i32;
                if code != 0 {
                    let (first, count, len) = (word(4) as usize, word(8) as usize, word(12) as usize);
                    let text = String::from_utf8_lossy(&r[TEXT..TEXT + len.min(RECORD - TEXT)]);
                    let shards = if count == 1 { format!("shard {first}") } else { format!("shards {first}..={}", first + count - 1) };
                    let status = Status::from_code(code).unwrap_or(Status::Communication);
                    return Err(Error::new(status, format!("the process of {shards}: {text}")));
                }
            }
            Ok(())
        }
    }

    impl Collectives<Device> for NcclCollectives {
        fn world_size(&self) -> usize {
            self.world
        }

        fn gather_counts(&self, local: &[u64]) -> Result<Vec<u64>> {
            // Every shard of the job is here: the counts are on the host already.
            if self.world == self.streams.len() {
                return Ok(local.to_vec());
            }
            if !self.group.is_solo() {
                let parts: Vec<&[u64]> = local.chunks(1).collect();
                return self.group.allgather_per_shard(&self.process_shards, &parts, 1);
            }
            let mut mine = Vec::new();
            let mut outs = Vec::new();
            for (i, work) in self.work.iter().enumerate() {
                mine.push(work.upload(&local[i..i + 1], "count")?);
                outs.push(work.take::<u64>(self.world, "gathered counts")?);
            }
            let rows = vec![1u64; self.world];
            self.gather(&mine, &rows, 1, &mut outs, NCCL_INT64)?;
            let all: Vec<u64> = self.streams[0].clone_dtoh(&outs[0].view()).map_err(device)?;
            Ok(all[..self.world].to_vec())
        }

        fn all_gather_f32(&self, local: &[DeviceBuf<f32>], rows: &[u64], width: usize, out: &mut [DeviceBuf<f32>]) -> Result<()> {
            self.gather(local, rows, width, out, NCCL_FLOAT32)
        }

        fn all_gather_i64(&self, local: &[DeviceBuf<i64>], rows: &[u64], out: &mut [DeviceBuf<i64>]) -> Result<()> {
            self.gather(local, rows, 1, out, NCCL_INT64)
        }

        fn all_reduce(&self, op: ReduceOp, bufs: &mut [<Device as Memory>::F32]) -> Result<()> {
            if self.comms.is_empty() {
                return Ok(());
            }
            let lib = nccl()?;
            let op = match op {
                ReduceOp::Sum => NCCL_SUM,
                ReduceOp::Max => NCCL_MAX,
            };
            self.poisoned(grouped(lib, || {
                for (i, stream) in self.streams.iter().enumerate() {
                    let (count, p) = (bufs[i].len(), bufs[i].ptr());
                    // SAFETY: in-place all-reduce of `count` floats of a live buffer on its stream.
                    let code = unsafe { (lib.all_reduce)(p as *const _, p as *mut _, count, NCCL_FLOAT32, op, self.comms[i], stream.cu_stream() as *mut _) };
                    lib.check("ncclAllReduce", code)?;
                }
                Ok(())
            }))
        }

        fn reduce_scatter_sum(&self, bufs: &[DeviceBuf<f32>], segments: &[std::ops::Range<usize>], out: &mut [DeviceBuf<f32>]) -> Result<()> {
            if self.comms.is_empty() {
                let seg = segments[0].clone();
                if !seg.is_empty() {
                    self.streams[0].memcpy_dtod(&bufs[0].slice(seg.clone()), &mut out[0].slice_mut(0..seg.len())).map_err(device)?;
                }
                return Ok(());
            }
            let lib = nccl()?;
            // NCCL scatters equal parts: each rank's segment sits in a slot of the widest size.
            let widest = segments.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
            let mut sends = Vec::new();
            let mut recvs = Vec::new();
            for (i, (stream, work)) in self.streams.iter().zip(&self.work).enumerate() {
                let mut send = work.take::<f32>(widest * self.world, "reduce-scatter send buffer")?;
                for (rank, seg) in segments.iter().enumerate() {
                    if !seg.is_empty() {
                        stream.memcpy_dtod(&bufs[i].slice(seg.clone()), &mut send.slice_mut(rank * widest..rank * widest + seg.len())).map_err(device)?;
                    }
                }
                sends.push(send);
                recvs.push(work.take::<f32>(widest, "reduce-scatter receive buffer")?);
            }
            self.poisoned(grouped(lib, || {
                for (i, stream) in self.streams.iter().enumerate() {
                    let (s, r) = (sends[i].ptr(), recvs[i].ptr());
                    // SAFETY: world × widest floats in, widest out, on the shard's stream.
                    let code = unsafe { (lib.reduce_scatter)(s as *const _, r as *mut _, widest, NCCL_FLOAT32, NCCL_SUM, self.comms[i], stream.cu_stream() as *mut _) };
                    lib.check("ncclReduceScatter", code)?;
                }
                Ok(())
            }))?;
            for (i, stream) in self.streams.iter().enumerate() {
                let len = segments[self.first_rank + i].len();
                if len > 0 {
                    stream.memcpy_dtod(&recvs[i].slice(0..len), &mut out[i].slice_mut(0..len)).map_err(device)?;
                }
            }
            Ok(())
        }

        fn agree(&self, local: Result<()>) -> Result<()> {
            if !self.group.is_solo() {
                self.group.agree(local)
            } else if self.world > self.streams.len() {
                self.agree_over_nccl(local)
            } else {
                local
            }
        }
    }
}
