//! The worker pool every parallel section of the library runs on.
//!
//! The library owns its pool instead of using rayon's global one for two reasons. A process that
//! forks after using the library gets a child holding a copy of the pool with none of its threads
//! (fork copies only the calling thread), and rayon's global pool can never be rebuilt, so a child
//! waiting on it would hang; this pool is started again in each process that uses it. And starting
//! threads can fail (thread or memory limits), which must come back as a status, not a panic.
//!
//! Parallel sections run through [`install`]; code between them, calls of the host's callbacks
//! among it, stays on the caller's thread (MPI may require its calls from the thread that
//! initialised it).

use crate::error::{Error, Result, Status};
use std::sync::atomic::{AtomicPtr, Ordering};

/// One process's pool. Never freed: like rayon's global pool it lives as long as the process, and a
/// forked child's inherited copy must not be dropped (its threads, whom dropping would signal, do
/// not exist there).
struct Slot {
    pid: u32,
    pool: rayon::ThreadPool,
}

static CURRENT: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());

/// How the pool's threads are named.
const WORKER_PREFIX: &str = "pfc-worker-";

/// Whether the calling thread is one of the pool's workers (any process's pool: a forked child's
/// workers are named alike).
pub(crate) fn on_worker_thread() -> bool {
    std::thread::current().name().is_some_and(|n| n.starts_with(WORKER_PREFIX))
}

/// This process's pool, started on first use (and first use after a fork). A failure to start it
/// is not remembered: a later call tries again.
fn current() -> Result<&'static rayon::ThreadPool> {
    let pid = std::process::id();
    loop {
        let seen = CURRENT.load(Ordering::Acquire);
        // SAFETY: published slots are never freed.
        if let Some(slot) = unsafe { seen.as_ref() } {
            if slot.pid == pid {
                return Ok(&slot.pool);
            }
        }
        let pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("{WORKER_PREFIX}{i}")).build().map_err(|e| {
            Error::new(
                Status::OutOfMemory,
                format!(
                    "cannot start the library's worker threads: {e} (the process is out of threads or memory: \
                     see its limits, e.g. ulimit -u and -v; RAYON_NUM_THREADS sets fewer threads)"
                ),
            )
        })?;
        let fresh = Box::into_raw(Box::new(Slot { pid, pool }));
        if CURRENT.compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // Another thread of this process published its pool first; ours was never shared.
            // SAFETY: `fresh` came from Box::into_raw above and nobody else saw it.
            drop(unsafe { Box::from_raw(fresh) });
        }
        // The slot replaced, if any, was the parent's: left in place, leaked on purpose.
    }
}

/// Runs `op` on the library's pool: rayon's parallel iterators inside it use the pool's threads.
/// Blocks the caller until `op` returns.
pub fn install<R: Send>(op: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(current()?.install(op))
}

/// Threads of the library's pool (starting it if needed).
pub fn threads() -> Result<usize> {
    Ok(current()?.current_num_threads())
}

/// Called inside the pool ([`install`]): enough blocks per task that each thread gets a few tasks,
/// so per-task scratch (an N×d gradient accumulator among it) is allocated and summed a handful of
/// times per step, not per block.
pub(crate) fn min_blocks_per_task(blocks: usize) -> usize {
    blocks.div_ceil(4 * rayon::current_num_threads()).max(1)
}
