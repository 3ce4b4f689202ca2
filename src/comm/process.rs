//! Collectives over host memory between processes, through the host's all-gather (SPEC §2a): the
//! CPU backend's cross-process path. Every reduction gathers all shards' buffers and combines them
//! in global rank order, exactly as the in-process communicator does, so the layout of shards over
//! processes never changes a bit of the result.

use super::group::{bytes_of, bytes_of_mut, Plain, ProcessGroup};
use super::local::sum_in_order;
use super::{Collectives, ReduceOp};
use crate::memory::Host;
use crate::error::{try_zeroed, Result};
use std::sync::Arc;

pub struct ProcessCollectives {
    group: Arc<ProcessGroup>,
    /// Shards of each process, in process order.
    shards: Vec<usize>,
    world: usize,
    first_rank: usize,
}

impl ProcessCollectives {
    pub fn new(group: Arc<ProcessGroup>, shards: Vec<usize>) -> Self {
        let world = shards.iter().sum();
        let first_rank = shards[..group.index()].iter().sum();
        ProcessCollectives { group, shards, world, first_rank }
    }

    fn gather_equal<T: Plain>(&self, local: &[&[T]], len: usize) -> Result<Vec<T>> {
        self.group.allgather_per_shard(&self.shards, local, len)
    }

    /// Every shard's rows (`rows[rank] × width` values) concatenated in rank order into each `out`.
    /// The row counts are known everywhere, so one exchange padded to the widest process suffices.
    fn gather_rows<T: Plain + Send + Sync>(&self, local: &[Vec<T>], rows: &[u64], width: usize, out: &mut [Vec<T>]) -> Result<()> {
        let mut per_process = Vec::with_capacity(self.shards.len());
        let mut rank = 0;
        for &count in &self.shards {
            per_process.push(rows[rank..rank + count].iter().sum::<u64>() as usize * width);
            rank += count;
        }
        let widest = per_process.iter().copied().max().unwrap_or(0);
        let mut send = try_zeroed::<T>(widest, "all-gather send buffer")?;
        let mut at = 0;
        for part in local {
            send[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let mut all = try_zeroed::<T>(widest * self.group.count(), "all-gather receive buffer (the global batch)")?;
        self.group.allgather_into(bytes_of(&send), bytes_of_mut(&mut all))?;
        for dst in out.iter_mut() {
            dst.clear();
            for (p, &len) in per_process.iter().enumerate() {
                dst.extend_from_slice(&all[p * widest..p * widest + len]);
            }
        }
        Ok(())
    }
}

impl Collectives<Host> for ProcessCollectives {
    fn world_size(&self) -> usize {
        self.world
    }

    fn gather_counts(&self, local: &[u64]) -> Result<Vec<u64>> {
        let parts: Vec<&[u64]> = local.chunks(1).collect();
        self.gather_equal(&parts, 1)
    }

    fn all_gather_f32(&self, local: &[Vec<f32>], rows: &[u64], width: usize, out: &mut [Vec<f32>]) -> Result<()> {
        self.gather_rows(local, rows, width, out)
    }

    fn all_gather_i64(&self, local: &[Vec<i64>], rows: &[u64], out: &mut [Vec<i64>]) -> Result<()> {
        self.gather_rows(local, rows, 1, out)
    }

    fn all_reduce(&self, op: ReduceOp, bufs: &mut [Vec<f32>]) -> Result<()> {
        let len = bufs.first().map_or(0, |b| b.len());
        let parts: Vec<&[f32]> = bufs.iter().map(|b| b.as_slice()).collect();
        let all = self.gather_equal(&parts, len)?;
        // Rank order, as the in-process collectives combine them.
        let mut acc = all[..len].to_vec();
        for other in all[len..].chunks_exact(len.max(1)) {
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
        // An all-gather is the only collective the host gives; each process keeps its segments.
        let len = bufs.first().map_or(0, |b| b.len());
        let parts: Vec<&[f32]> = bufs.iter().map(|b| b.as_slice()).collect();
        let all = self.gather_equal(&parts, len)?;
        for (i, dst) in out.iter_mut().enumerate() {
            let seg = segments[self.first_rank + i].clone();
            let ranks: Vec<&[f32]> = (0..self.world).map(|r| &all[r * len + seg.start..r * len + seg.end]).collect();
            dst.resize(seg.len(), 0.0);
            sum_in_order(&ranks, dst)?;
        }
        Ok(())
    }

    fn agree(&self, local: Result<()>) -> Result<()> {
        self.group.agree(local)
    }
}
