//! The boundary discipline: every exported function runs its body through `guard`, which turns
//! errors and panics into a status and the thread's last-error message. Nothing unwinds into C and
//! nothing is printed.

use crate::error::{Error, Status};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Guarded calls in progress, process-wide: a panic on a pool thread belongs to one of them.
static ACTIVE_GUARDS: AtomicUsize = AtomicUsize::new(0);
static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

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
/// the message for `pfc_last_error`; panics elsewhere still reach the previous hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if ACTIVE_GUARDS.load(Ordering::SeqCst) > 0 {
                let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                *PANIC_MESSAGE.lock() = Some(format!("{payload}{location}"));
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
    ACTIVE_GUARDS.fetch_add(1, Ordering::SeqCst);
    let outcome = catch_unwind(AssertUnwindSafe(body));
    ACTIVE_GUARDS.fetch_sub(1, Ordering::SeqCst);
    match outcome {
        Ok(Ok(())) => super::types::PFC_OK,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status.code()
        }
        Err(_) => {
            let detail = PANIC_MESSAGE.lock().take().unwrap_or_else(|| "a worker thread panicked".into());
            set_last_error(&format!("internal error (please report): {detail}"));
            Status::Panic.code()
        }
    }
}
