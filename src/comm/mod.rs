//! Collectives between shards. A communicator spans the shards of one process ("local") and, for
//! distributed backends, the other processes' shards; buffers are given per local shard, in rank order.

pub mod group;
pub mod local;
pub mod nccl;
pub mod process;

use crate::memory::Memory;
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// The collectives of a step, over one kind of memory: the shards of this process
/// (`local::LocalCollectives`), other processes through the host's all-gather
/// (`process::ProcessCollectives`), or NCCL between GPUs (`nccl::NcclCollectives`). Buffers are
/// given per local shard, in rank order; outputs come preallocated at their final size. Every
/// reduction combines the shards in global rank order, so where the shards live never changes the
/// result.
pub trait Collectives<M: Memory>: Send + Sync {
    /// Shards over all processes.
    fn world_size(&self) -> usize;
    /// Every shard's value (one per local shard given), in global rank order, on the host.
    fn gather_counts(&self, local: &[u64]) -> Result<Vec<u64>>;
    /// Every shard's `rows[rank] × width` values, concatenated in rank order, into each local
    /// shard's `out`.
    fn all_gather_f32(&self, local: &[M::F32], rows: &[u64], width: usize, out: &mut [M::F32]) -> Result<()>;
    fn all_gather_i64(&self, local: &[M::I64], rows: &[u64], out: &mut [M::I64]) -> Result<()>;
    /// Element-wise reduction across all shards; every buffer holds the result afterwards.
    fn all_reduce(&self, op: ReduceOp, bufs: &mut [M::F32]) -> Result<()>;
    /// Sums `bufs` (one full-size buffer per local shard) across all shards and gives local shard i
    /// the segment `segments[global rank of i]` (in elements) of the sum.
    fn reduce_scatter_sum(&self, bufs: &[M::F32], segments: &[std::ops::Range<usize>], out: &mut [M::F32]) -> Result<()>;
    /// The job's verdict on this process's outcome: Ok when Ok everywhere, else the first failing
    /// process's status and message on every process (SPEC §2a consensus).
    fn agree(&self, local: Result<()>) -> Result<()>;
}
