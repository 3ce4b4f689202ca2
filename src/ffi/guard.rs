//! The boundary discipline: every exported function runs its body through `guard`, which turns
//! errors and panics into a status and the thread's last-error message. Nothing unwinds into C and
//! nothing is printed.

use crate::error::{Error, Status};
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
    /// Guarded calls in progress on this thread (more than one when a host callback calls back in).
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    /// `PANIC_MESSAGE`'s guard, held by the forking thread across a fork (see `prepare_fork`).
    static HELD_FOR_FORK: RefCell<Option<MutexGuard<'static, Option<String>>>> = const { RefCell::new(None) };
}

/// Guarded calls in progress, process-wide: a panic on a pool thread belongs to one of them.
static ACTIVE_GUARDS: AtomicUsize = AtomicUsize::new(0);
/// A std mutex, for the same reason as the head list's (src/ffi/head.rs).
static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

fn panic_message() -> MutexGuard<'static, Option<String>> {
    PANIC_MESSAGE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Fork handlers (registered in src/ffi/head.rs): the message slot is taken before the fork so that
/// no thread holds it mid-update in the child; there, only the forking thread's calls are in progress.
pub(super) fn prepare_fork() {
    let held = panic_message();
    HELD_FOR_FORK.with(|h| *h.borrow_mut() = Some(held));
}

pub(super) fn after_fork(in_child: bool) {
    if in_child {
        ACTIVE_GUARDS.store(DEPTH.with(Cell::get), Ordering::SeqCst);
    }
    HELD_FOR_FORK.with(|h| h.borrow_mut().take());
}

pub fn set_last_error(message: &str) {
    LAST_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        e.clear();
        e.push_str(message);
    });
}

pub fn with_last_error<R>(f: impl FnOnce(&str) -> R) -> R {
    LAST_ERROR.with(|e| f(&e.borrow()))
}

/// Replaces the default hook (which prints to stderr) for panics raised inside guarded calls, keeping
/// the message for `pfc_last_error`: on a thread inside one, or on a pool worker while one is in
/// progress (its panic is re-raised on the guarded caller's thread). Panics elsewhere — another
/// thread of the host, with no call of ours on it — still reach the previous hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_call = DEPTH.try_with(Cell::get).unwrap_or(0) > 0;
            if in_call || (ACTIVE_GUARDS.load(Ordering::SeqCst) > 0 && crate::pool::on_worker_thread()) {
                let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                *panic_message() = Some(format!("{payload}{location}"));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `body`, mapping `Err` and panics to a status. Worker-thread panics are re-raised on the
/// calling thread by the pool, so they land here too.
pub fn guard(body: impl FnOnce() -> Result<(), Error>) -> i32 {
    install_panic_hook();
    DEPTH.with(|d| d.set(d.get() + 1));
    ACTIVE_GUARDS.fetch_add(1, Ordering::SeqCst);
    let outcome = catch_unwind(AssertUnwindSafe(body));
    ACTIVE_GUARDS.fetch_sub(1, Ordering::SeqCst);
    DEPTH.with(|d| d.set(d.get() - 1));
    match outcome {
        Ok(Ok(())) => super::types::PFC_OK,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status.code()
        }
        Err(_) => {
            let detail = panic_message().take().unwrap_or_else(|| "a worker thread panicked".into());
            set_last_error(&format!("internal error (please report): {detail}"));
            Status::Panic.code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    /// These tests read the process's one message slot: one at a time.
    static SLOT: Mutex<()> = Mutex::new(());

    fn last_error() -> String {
        with_last_error(str::to_string)
    }

    #[test]
    fn a_panic_in_a_call_or_on_its_pool_workers_is_the_calls_internal_error() {
        let _one = SLOT.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(guard(|| panic!("on the caller")), Status::Panic.code());
        assert!(last_error().contains("on the caller"), "{}", last_error());
        let on_worker = guard(|| {
            use rayon::prelude::*;
            crate::pool::install(|| (0..64).into_par_iter().for_each(|i| assert!(i != 37, "on a worker")))
        });
        assert_eq!(on_worker, Status::Panic.code());
        assert!(last_error().contains("on a worker"), "{}", last_error());
    }

    #[test]
    fn a_panic_on_another_thread_during_a_call_is_not_taken_for_the_calls() {
        let _one = SLOT.lock().unwrap_or_else(PoisonError::into_inner);
        let (inside, done) = (Barrier::new(2), Barrier::new(2));
        std::thread::scope(|scope| {
            let call = scope.spawn(|| {
                guard(|| {
                    inside.wait();
                    done.wait();
                    Ok(())
                })
            });
            inside.wait();
            // A thread of the host with no call of ours on it, while the call above is in progress.
            let other = std::thread::spawn(|| panic!("the host's own")).join();
            assert!(other.is_err());
            done.wait();
            assert_eq!(call.join().unwrap(), super::super::types::PFC_OK);
        });
        assert_eq!(*panic_message(), None, "the host thread's panic was kept as a call's");
    }
}
