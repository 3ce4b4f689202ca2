//! Collectives between shards. A communicator spans the shards of one process ("local") and, for
//! distributed backends, the other processes' shards; buffers are given per local shard, in rank order.

pub mod group;
pub mod local;
pub mod nccl;
pub mod process;

use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// Collectives over host memory.
pub trait HostCommunicator: Send + Sync {
    /// Shards over all processes.
    fn world_size(&self) -> usize;
    /// Concatenates every shard's rows in rank order (`local[i]` is local shard i's rows).
    fn all_gather_f32(&self, local: &[&[f32]], out: &mut Vec<f32>) -> Result<()>;
    fn all_gather_i64(&self, local: &[&[i64]], out: &mut Vec<i64>) -> Result<()>;
    /// Batch sizes of every shard in rank order (needed before gathering rows of uneven batches).
    fn all_gather_counts(&self, local: &[u64]) -> Result<Vec<u64>>;
    /// Element-wise reduction across all shards; every buffer holds the result afterwards.
    fn all_reduce(&self, op: ReduceOp, bufs: &mut [Vec<f32>]) -> Result<()>;
    /// Sums `bufs` (one full-size buffer per local shard) across all shards and gives local shard i
    /// the segment `segments[global rank of i]` (in elements) of the sum.
    fn reduce_scatter_sum(&self, bufs: &[Vec<f32>], segments: &[std::ops::Range<usize>], out: &mut [Vec<f32>]) -> Result<()>;
}
