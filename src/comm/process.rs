//! Collectives over host memory between processes, through the host's all-gather (SPEC §2a): the
//! CPU backend's cross-process path. Every reduction gathers all shards' buffers and combines them
//! in global rank order, exactly as the in-process communicator does, so the layout of shards over
//! processes never changes a bit of the result.

use super::group::{bytes_of, bytes_of_mut, Plain, ProcessGroup};
use super::{HostCommunicator, ReduceOp};
use crate::error::{try_zeroed, Error, Result};
use std::sync::Arc;

pub struct ProcessCommunicator {
    group: Arc<ProcessGroup>,
    /// Shards of each process, in process order.
    shards: Vec<usize>,
    world: usize,
}

impl ProcessCommunicator {
    pub fn new(group: Arc<ProcessGroup>, shards: Vec<usize>) -> Self {
        let world = shards.iter().sum();
        ProcessCommunicator { group, shards, world }
    }

    fn widest(&self) -> usize {
        self.shards.iter().copied().max().unwrap_or(1)
    }

    /// Every shard's `len`-long buffer, in global rank order (`world × len`). Each process sends its
    /// shards padded to the widest process, so that the exchange has one size everywhere.
    fn gather_equal<T: Plain>(&self, local: &[&[T]], len: usize) -> Result<Vec<T>> {
        let slot = self.widest().checked_mul(len).ok_or_else(|| Error::invalid("all-gather size overflows"))?;
        let mut send = try_zeroed::<T>(slot, "all-gather send buffer")?;
        for (i, part) in local.iter().enumerate() {
            send[i * len..(i + 1) * len].copy_from_slice(part);
        }
        let mut all = try_zeroed::<T>(slot * self.group.count(), "all-gather receive buffer")?;
        self.group.allgather_into(bytes_of(&send), bytes_of_mut(&mut all))?;
        let mut out = try_zeroed::<T>(self.world * len, "gathered buffers")?;
        let mut rank = 0;
        for (p, &count) in self.shards.iter().enumerate() {
            out[rank * len..(rank + count) * len].copy_from_slice(&all[p * slot..p * slot + count * len]);
            rank += count;
        }
        Ok(out)
    }

    /// Every shard's rows, lengths free, concatenated in global rank order.
    fn gather_rows<T: Plain>(&self, local: &[&[T]], out: &mut Vec<T>) -> Result<()> {
        let mine: usize = local.iter().map(|l| l.len()).sum();
        let mut send = try_zeroed::<T>(mine, "all-gather send buffer")?;
        let mut at = 0;
        for part in local {
            send[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let lengths = self.group.allgather_u64(&[mine as u64])?;
        let widest = lengths.iter().copied().max().unwrap_or(0) as usize;
        let mut padded = try_zeroed::<T>(widest, "all-gather send buffer")?;
        padded[..mine].copy_from_slice(&send);
        let mut all = try_zeroed::<T>(widest * self.group.count(), "all-gather receive buffer")?;
        self.group.allgather_into(bytes_of(&padded), bytes_of_mut(&mut all))?;
        out.clear();
        let total: usize = lengths.iter().map(|&l| l as usize).sum();
        out.try_reserve_exact(total).map_err(|_| crate::error::Error::new(crate::error::Status::OutOfMemory, "cannot allocate the gathered rows"))?;
        for (p, &len) in lengths.iter().enumerate() {
            out.extend_from_slice(&all[p * widest..p * widest + len as usize]);
        }
        Ok(())
    }

    fn first_rank(&self) -> usize {
        self.shards[..self.group.index()].iter().sum()
    }
}

impl HostCommunicator for ProcessCommunicator {
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather_f32(&self, local: &[&[f32]], out: &mut Vec<f32>) -> Result<()> {
        self.gather_rows(local, out)
    }

    fn all_gather_i64(&self, local: &[&[i64]], out: &mut Vec<i64>) -> Result<()> {
        self.gather_rows(local, out)
    }

    fn all_gather_counts(&self, local: &[u64]) -> Result<Vec<u64>> {
        let parts: Vec<&[u64]> = local.chunks(1).collect();
        self.gather_equal(&parts, 1)
    }

    fn all_reduce(&self, op: ReduceOp, bufs: &mut [Vec<f32>]) -> Result<()> {
        let len = bufs.first().map_or(0, |b| b.len());
        let parts: Vec<&[f32]> = bufs.iter().map(|b| b.as_slice()).collect();
        let all = self.gather_equal(&parts, len)?;
        // Rank order, as the in-process communicator combines them.
        let (first, rest) = all.split_at(len);
        let mut acc = first.to_vec();
        for other in rest.chunks_exact(len.max(1)) {
            match op {
                ReduceOp::Sum => acc.iter_mut().zip(other).for_each(|(a, &b)| *a += b),
                ReduceOp::Max => acc.iter_mut().zip(other).for_each(|(a, &b)| *a = a.max(b)),
            }
        }
        for b in bufs.iter_mut() {
            b.copy_from_slice(&acc);
        }
        Ok(())
    }

    fn reduce_scatter_sum(&self, bufs: &[Vec<f32>], segments: &[std::ops::Range<usize>], out: &mut [Vec<f32>]) -> Result<()> {
        let len = bufs.first().map_or(0, |b| b.len());
        let parts: Vec<&[f32]> = bufs.iter().map(|b| b.as_slice()).collect();
        let all = self.gather_equal(&parts, len)?;
        let first = self.first_rank();
        for (i, dst) in out.iter_mut().enumerate() {
            let seg = segments[first + i].clone();
            dst.clear();
            dst.extend_from_slice(&all[seg.clone()]);
            for rank in 1..self.world {
                let other = &all[rank * len + seg.start..rank * len + seg.end];
                dst.iter_mut().zip(other).for_each(|(x, &y)| *x += y);
            }
        }
        Ok(())
    }
}
