//! The host's process group (SPEC §2a): the processes of one job, reached through the single
//! all-gather the host gives the library (MPI_Allgather, torch.distributed, a store). Every
//! cross-process exchange of the CPU backend, and the bootstrap of NCCL, goes through here.
//!
//! The group also carries the job's health: a failed exchange leaves the processes in an unknown
//! relation to each other (some may have received data, some not), so the group is poisoned and
//! every later collective call fails with `PFC_ERR_COMMUNICATION` until a checkpoint is loaded.

use crate::error::{try_zeroed, Error, Result, Status};
use parking_lot::Mutex;
use std::ffi::c_void;

/// The C callback: every process calls it with the same `bytes`; `recv` receives
/// `process_count × bytes` in process order. 0 means success.
pub type AllGatherFn = unsafe extern "C" fn(ctx: *mut c_void, send: *const c_void, bytes: usize, recv: *mut c_void) -> i32;

/// A transport for the group's one collective. Implemented for the host's C callback; Rust hosts
/// may implement it over their own process group.
pub trait AllGather: Send + Sync {
    /// `recv.len()` is `process_count × send.len()`. `Err(code)` reports the transport's failure.
    fn allgather(&self, send: &[u8], recv: &mut [u8]) -> std::result::Result<(), i32>;
}

/// The host's C callback and its context, as passed in `pfc_config`.
pub struct CallbackAllGather {
    f: AllGatherFn,
    ctx: *mut c_void,
}

// SAFETY: the library calls the callback from one thread at a time (the head's lock); the host
// promises that its context may be used from the thread that calls into the library (SPEC §2a).
unsafe impl Send for CallbackAllGather {}
// SAFETY: shared only behind the head, whose lock keeps calls to one at a time.
unsafe impl Sync for CallbackAllGather {}

impl CallbackAllGather {
    /// # Safety
    /// `f` must behave as `pfc_allgather_fn` documents for as long as the group lives, with `ctx`.
    pub unsafe fn new(f: AllGatherFn, ctx: *mut c_void) -> Self {
        CallbackAllGather { f, ctx }
    }
}

impl AllGather for CallbackAllGather {
    fn allgather(&self, send: &[u8], recv: &mut [u8]) -> std::result::Result<(), i32> {
        // SAFETY: `send` and `recv` are live buffers of the sizes the callback's contract names.
        let code = unsafe { (self.f)(self.ctx, send.as_ptr().cast(), send.len(), recv.as_mut_ptr().cast()) };
        if code == 0 {
            Ok(())
        } else {
            Err(code)
        }
    }
}

/// Element types sent as their bytes: every bit pattern is a valid value, no padding. The processes
/// of one job share one architecture (the host's MPI would not mix byte orders either).
pub trait Plain: Copy + Default {}
impl Plain for u8 {}
impl Plain for u32 {}
impl Plain for u64 {}
impl Plain for i64 {}
impl Plain for f32 {}

pub fn bytes_of<T: Plain>(values: &[T]) -> &[u8] {
    // SAFETY: `Plain` types have no padding; the view covers exactly the slice.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

pub fn bytes_of_mut<T: Plain>(values: &mut [T]) -> &mut [u8] {
    // SAFETY: as above, and any bytes written are a valid `T`.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast(), std::mem::size_of_val(values)) }
}

/// This process's place in its job and the way to the other processes.
pub struct ProcessGroup {
    count: usize,
    index: usize,
    transport: Option<Box<dyn AllGather>>,
    /// Why the group is poisoned, when it is.
    poisoned: Mutex<Option<String>>,
}

/// Processes one job may have; keeps `count × bytes` products far from overflow.
pub const MAX_PROCESSES: usize = 1 << 16;

impl ProcessGroup {
    /// A job of this process alone: every collective is local.
    pub fn solo() -> Self {
        ProcessGroup { count: 1, index: 0, transport: None, poisoned: Mutex::new(None) }
    }

    /// Process `index` of `count`, reaching the others through `transport` (needed when count > 1).
    pub fn new(count: usize, index: usize, transport: Option<Box<dyn AllGather>>) -> Result<Self> {
        if count == 0 || count > MAX_PROCESSES {
            return Err(Error::invalid(format!("process_count = {count} is outside [1, {MAX_PROCESSES}]")));
        }
        if index >= count {
            return Err(Error::invalid(format!("process_index = {index} is outside [0, process_count = {count})")));
        }
        if count > 1 && transport.is_none() {
            return Err(Error::null("allgather (needed when process_count > 1)"));
        }
        Ok(ProcessGroup { count, index, transport: if count > 1 { transport } else { None }, poisoned: Mutex::new(None) })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn is_solo(&self) -> bool {
        self.count == 1
    }

    /// Fails with `PFC_ERR_COMMUNICATION` when an earlier exchange failed.
    pub fn check(&self) -> Result<()> {
        match &*self.poisoned.lock() {
            None => Ok(()),
            Some(why) => Err(Error::new(
                Status::Communication,
                format!("the head is unusable after a failed exchange between processes ({why}); load a checkpoint into it or destroy it"),
            )),
        }
    }

    /// Marks the group unusable (a failed exchange, here or in a collective of a backend's own).
    pub fn poison(&self, why: &str) {
        self.poisoned.lock().get_or_insert_with(|| why.to_string());
    }

    /// Clears the poison: a checkpoint load gives every process the same state again.
    pub fn heal(&self) {
        *self.poisoned.lock() = None;
    }

    /// Every process's `send` (all of the same length), concatenated in process order.
    pub fn allgather(&self, send: &[u8]) -> Result<Vec<u8>> {
        let total = send.len().checked_mul(self.count).ok_or_else(|| Error::invalid("all-gather size overflows"))?;
        let mut recv = try_zeroed::<u8>(total, "all-gather receive buffer")?;
        self.allgather_into(send, &mut recv)?;
        Ok(recv)
    }

    /// `allgather` into the caller's buffer of `process_count × send.len()` bytes.
    pub fn allgather_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.check()?;
        if Some(recv.len()) != send.len().checked_mul(self.count) {
            return Err(Error::new(Status::Panic, "internal error: all-gather buffers of mismatched sizes"));
        }
        let Some(transport) = &self.transport else {
            recv.copy_from_slice(send);
            return Ok(());
        };
        if let Err(code) = transport.allgather(send, recv) {
            let why = format!("the host's allgather returned {code}");
            self.poison(&why);
            return Err(Error::new(Status::Communication, why));
        }
        Ok(())
    }

    /// Every process's `send`, lengths free: one exchange of the lengths, one of the padded data.
    pub fn allgather_varied(&self, send: &[u8]) -> Result<Vec<Vec<u8>>> {
        if self.is_solo() {
            self.check()?;
            return Ok(vec![send.to_vec()]);
        }
        let lengths = self.allgather_u64(&[send.len() as u64])?;
        let widest = lengths.iter().copied().max().unwrap_or(0) as usize;
        let mut padded = try_zeroed::<u8>(widest, "all-gather send buffer")?;
        padded[..send.len()].copy_from_slice(send);
        let all = self.allgather(&padded)?;
        Ok(lengths.iter().enumerate().map(|(p, &len)| all[p * widest..p * widest + len as usize].to_vec()).collect())
    }

    /// Every shard's `len`-long buffer, in global rank order, where process `p` drives `shards[p]`
    /// shards and passes its own as `local`. Each process sends its shards padded to the widest
    /// process, so that the exchange has one size everywhere.
    pub fn allgather_per_shard<T: Plain>(&self, shards: &[usize], local: &[&[T]], len: usize) -> Result<Vec<T>> {
        let widest = shards.iter().copied().max().unwrap_or(1);
        let slot = widest.checked_mul(len).ok_or_else(|| Error::invalid("all-gather size overflows"))?;
        let mut send = try_zeroed::<T>(slot, "all-gather send buffer")?;
        for (i, part) in local.iter().enumerate() {
            send[i * len..(i + 1) * len].copy_from_slice(part);
        }
        let mut all = try_zeroed::<T>(slot * self.count(), "all-gather receive buffer (the global batch)")?;
        self.allgather_into(bytes_of(&send), bytes_of_mut(&mut all))?;
        let mut out = try_zeroed::<T>(shards.iter().sum::<usize>() * len, "gathered buffers")?;
        let mut rank = 0;
        for (p, &count) in shards.iter().enumerate() {
            out[rank * len..(rank + count) * len].copy_from_slice(&all[p * slot..p * slot + count * len]);
            rank += count;
        }
        Ok(out)
    }

    /// Every process's values (the same count on each), in process order.
    pub fn allgather_u64(&self, values: &[u64]) -> Result<Vec<u64>> {
        self.allgather_values(values)
    }

    /// Every process's values (the same count on each), in process order, bit for bit.
    pub fn allgather_values<T: Plain>(&self, values: &[T]) -> Result<Vec<T>> {
        let total = values.len().checked_mul(self.count).ok_or_else(|| Error::invalid("all-gather size overflows"))?;
        let mut out = try_zeroed::<T>(total, "all-gather receive buffer")?;
        self.allgather_into(bytes_of(values), bytes_of_mut(&mut out))?;
        Ok(out)
    }

    /// Turns a local outcome into the job's: Ok everywhere when it is Ok everywhere, otherwise the
    /// first failing process's status and message on every process (SPEC §2a consensus). A failure
    /// of the exchange itself is `PFC_ERR_COMMUNICATION` and poisons the group.
    pub fn agree<T>(&self, local: Result<T>) -> Result<T> {
        if self.is_solo() {
            self.check()?;
            return local;
        }
        let (code, message) = match &local {
            Ok(_) => (0i32, &[][..]),
            Err(e) => (e.status.code(), e.message.as_bytes()),
        };
        let mut header = [0u8; 12];
        header[..4].copy_from_slice(&code.to_le_bytes());
        header[4..].copy_from_slice(&(message.len() as u64).to_le_bytes());
        let all = self.allgather(&header)?;
        let parsed: Vec<(i32, usize)> = all
            .chunks_exact(12)
            .map(|h| (i32::from_le_bytes(h[..4].try_into().expect("4")), u64::from_le_bytes(h[4..].try_into().expect("8")) as usize))
            .collect();
        let Some(first) = parsed.iter().position(|&(code, _)| code != 0) else { return local };
        // Only the first failing process's message is needed; every process sends a buffer as wide
        // as that message so that the exchange has one size everywhere.
        let width = parsed[first].1;
        let mut mine = try_zeroed::<u8>(width, "error message")?;
        if self.index == first {
            mine.copy_from_slice(message);
        }
        let messages = self.allgather(&mine)?;
        let text = String::from_utf8_lossy(&messages[first * width..(first + 1) * width]).into_owned();
        let status = Status::from_code(parsed[first].0).unwrap_or(Status::Communication);
        // The same words everywhere, the failing process included.
        Err(Error::new(status, format!("process {first}: {text}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    /// Threads standing in for processes: each deposits its bytes, all read everything.
    struct Threads {
        index: usize,
        slots: Arc<Mutex<Vec<Vec<u8>>>>,
        barrier: Arc<Barrier>,
        fail_at: Option<usize>,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl AllGather for Threads {
        fn allgather(&self, send: &[u8], recv: &mut [u8]) -> std::result::Result<(), i32> {
            let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.fail_at == Some(call) {
                return Err(-3);
            }
            self.slots.lock()[self.index] = send.to_vec();
            self.barrier.wait();
            let all: Vec<u8> = self.slots.lock().concat();
            recv.copy_from_slice(&all);
            self.barrier.wait();
            Ok(())
        }
    }

    fn run<T: Send + 'static>(count: usize, fail_at: Option<usize>, body: fn(ProcessGroup) -> T) -> Vec<T> {
        let slots = Arc::new(Mutex::new(vec![Vec::new(); count]));
        let barrier = Arc::new(Barrier::new(count));
        let handles: Vec<_> = (0..count)
            .map(|index| {
                let t = Threads { index, slots: slots.clone(), barrier: barrier.clone(), fail_at, calls: 0.into() };
                std::thread::spawn(move || body(ProcessGroup::new(count, index, Some(Box::new(t))).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn agree_spreads_the_first_failure_everywhere() {
        let out = run(3, None, |g| {
            let local: Result<()> = if g.index() >= 1 { Err(Error::invalid(format!("bad on {}", g.index()))) } else { Ok(()) };
            g.agree(local).unwrap_err()
        });
        for e in out {
            assert_eq!(e.status, Status::InvalidArgument);
            assert_eq!(e.message, "process 1: bad on 1");
        }
        let ok = run(2, None, |g| g.agree(Ok(g.index())).unwrap());
        assert_eq!(ok, vec![0, 1]);
    }

    #[test]
    fn varied_lengths_arrive_whole() {
        let out = run(3, None, |g| g.allgather_varied(&vec![g.index() as u8; g.index() * 3]).unwrap());
        for all in out {
            assert_eq!(all, vec![vec![], vec![1; 3], vec![2; 6]]);
        }
    }

    #[test]
    fn a_failed_exchange_poisons_until_healed() {
        let out = run(2, Some(0), |g| {
            let first = g.allgather(&[1, 2]).unwrap_err();
            let later = g.agree(Ok(())).unwrap_err();
            g.heal();
            (first.status, later.status, later.message, g.check().is_ok())
        });
        for (first, later, message, healed) in out {
            assert_eq!(first, Status::Communication);
            assert_eq!(later, Status::Communication);
            assert!(message.contains("returned -3"), "{message}");
            assert!(healed);
        }
    }
}
