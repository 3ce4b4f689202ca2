//! The opaque head handle: its lock, and what a fork does to it.
//!
//! fork() copies only the calling thread. A head that another thread was using at that instant is,
//! in the child, locked forever (its holder does not exist there) and possibly half-updated; every
//! other head is an ordinary copy. So the library keeps a list of live heads, and a fork handler
//! marks in the child those that were locked: calls on them fail clearly instead of waiting forever.

use super::guard;
use crate::head::Head;
use crate::error::{Error, Result};
use parking_lot::{Mutex, MutexGuard};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, PoisonError};

/// An opaque training head. Calls on one head are serialized by its lock.
#[allow(non_camel_case_types)]
pub struct pfc_head {
    inner: Mutex<Head>,
    /// Set in a forked child when a call on this head was in progress in another thread at the fork.
    busy_at_fork: AtomicBool,
}

/// Addresses of the heads alive in this process. A std mutex: unlocking it in a forked child wakes
/// waiters with a plain futex call, with no bookkeeping about threads the child does not have.
static LIVE: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

thread_local! {
    /// `LIVE`'s guard, held by the forking thread from the fork's prepare handler until the parent
    /// and child handlers: the list is complete and consistent in the child.
    static HELD_FOR_FORK: RefCell<Option<std::sync::MutexGuard<'static, Vec<usize>>>> = const { RefCell::new(None) };
}

fn live() -> std::sync::MutexGuard<'static, Vec<usize>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

extern "C" fn prepare_fork() {
    let held = live();
    guard::prepare_fork();
    HELD_FOR_FORK.with(|h| *h.borrow_mut() = Some(held));
}

extern "C" fn after_fork_in_parent() {
    guard::after_fork(false);
    HELD_FOR_FORK.with(|h| h.borrow_mut().take());
}

extern "C" fn after_fork_in_child() {
    guard::after_fork(true);
    HELD_FOR_FORK.with(|h| {
        if let Some(list) = h.borrow_mut().take() {
            for &address in list.iter() {
                // SAFETY: listed heads are alive: destroy removes them (under this lock) before freeing.
                let head = unsafe { &*(address as *const pfc_head) };
                if head.inner.is_locked() {
                    head.busy_at_fork.store(true, Ordering::Relaxed);
                }
            }
        }
    });
}

fn watch_forks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handlers are plain functions of this library, which is never unloaded while
        // it has heads (glibc also drops them if the library is unloaded).
        unsafe { libc::pthread_atfork(Some(prepare_fork), Some(after_fork_in_parent), Some(after_fork_in_child)) };
    });
}

impl pfc_head {
    /// Moves `head` behind a handle for C.
    pub(super) fn into_raw(head: Head) -> *mut pfc_head {
        watch_forks();
        let ptr = Box::into_raw(Box::new(pfc_head { inner: Mutex::new(head), busy_at_fork: AtomicBool::new(false) }));
        live().push(ptr as usize);
        ptr
    }

    /// # Safety
    /// `ptr` came from `into_raw` and is destroyed once.
    pub(super) unsafe fn destroy(ptr: *mut pfc_head) {
        {
            let mut list = live();
            if let Some(at) = list.iter().position(|&a| a == ptr as usize) {
                list.swap_remove(at);
            }
        }
        let boxed = Box::from_raw(ptr);
        if boxed.busy_at_fork.load(Ordering::Relaxed) {
            // Its state may be half-updated (a vector between two buffers): freeing it could free
            // twice. The child keeps the memory instead.
            std::mem::forget(boxed);
        }
    }
}

/// Locks the head behind a C pointer for one call.
pub(super) fn lock<'a>(h: *const pfc_head) -> Result<MutexGuard<'a, Head>> {
    // SAFETY: a non-NULL head pointer comes from pfc_create and is alive until pfc_destroy.
    let head = unsafe { h.as_ref() }.ok_or_else(|| Error::null("head"))?;
    if head.busy_at_fork.load(Ordering::Relaxed) {
        return Err(Error::invalid(
            "this head was in use by another thread when the process forked; that thread does not exist in this \
             child, so the head may be half-updated and stays locked: destroy it here, and create heads in the child \
             (or fork while no call is in progress)",
        ));
    }
    Ok(head.inner.lock())
}
