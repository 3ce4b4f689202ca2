//! Stored tables of the CPU backend: allocation, and rows read as f32 whatever they are stored as.

use crate::error::{try_reserve, try_zeroed, Result};
use crate::storage::Stored;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `row` with every value set to its default.
pub(crate) fn written<T: Default>(row: &mut [MaybeUninit<T>]) -> &mut [T] {
    for x in row.iter_mut() {
        x.write(T::default());
    }
    // SAFETY: every value was just written, and MaybeUninit<T> has T's layout.
    unsafe { &mut *(row as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// `len` default values, written by the pool's threads: a table of gigabytes is zeroed in one
/// parallel pass, and its memory is committed when the head is made rather than at a later step.
pub(crate) fn zeroed_table<T: Default + Send>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    try_reserve(&mut v, len, what)?;
    crate::pool::install(|| v.spare_capacity_mut().par_chunks_mut(1 << 16).for_each(|chunk| {
        written(chunk);
    }))?;
    // SAFETY: every value of the capacity was written above.
    unsafe { v.set_len(len) };
    Ok(v)
}

/// A stored row as f32: the row itself where the table is f32, else widened into `into`.
pub(crate) fn row_f32<'a, T: Stored>(row: &'a [T], into: &'a mut [f32]) -> &'a [f32] {
    match T::as_f32(row) {
        Some(row) => row,
        None => {
            let into = &mut into[..row.len()];
            T::widen(row, into);
            into
        }
    }
}

/// Tasks a pass over `rows` rows splits into at most: enough for the pool to balance, few enough
/// that their scratch, allocated up front, stays small.
const MAX_TASKS: usize = 64;

/// Rows per task of a pass over `rows` rows, at least `min`.
pub(crate) fn rows_per_task(rows: usize, min: usize) -> usize {
    rows.div_ceil(MAX_TASKS).max(min).max(1)
}

/// Scratch for each task of a pass over `rows` rows taken `per` at a time, `per_task` values each
/// where `needed`, and the width to chunk it by (1 where not: the tasks still zip with it).
/// Allocated before a pass that may not fail once it has begun.
pub(crate) fn per_task_scratch(rows: usize, per: usize, per_task: usize, needed: bool) -> Result<(Vec<f32>, usize)> {
    let width = if needed { per_task.max(1) } else { 1 };
    Ok((try_zeroed(rows.div_ceil(per) * width, "update scratch")?, width))
}
