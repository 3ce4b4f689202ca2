//! The in-process communicator: every shard lives in this process, so collectives are memory
//! operations over the local buffers.

use super::{HostCommunicator, ReduceOp};
use crate::error::Result;
use rayon::prelude::*;

pub struct LocalCommunicator {
    shards: usize,
}

impl LocalCommunicator {
    pub fn new(shards: usize) -> Self {
        LocalCommunicator { shards }
    }

    fn gather<T: Copy>(&self, local: &[&[T]], out: &mut Vec<T>) -> Result<()> {
        debug_assert_eq!(local.len(), self.shards);
        out.clear();
        out.reserve(local.iter().map(|l| l.len()).sum());
        for part in local {
            out.extend_from_slice(part);
        }
        Ok(())
    }
}

/// Rows per parallel task when combining large buffers.
const CHUNK: usize = 1 << 14;

impl HostCommunicator for LocalCommunicator {
    fn world_size(&self) -> usize {
        self.shards
    }

    fn all_gather_f32(&self, local: &[&[f32]], out: &mut Vec<f32>) -> Result<()> {
        self.gather(local, out)
    }

    fn all_gather_i64(&self, local: &[&[i64]], out: &mut Vec<i64>) -> Result<()> {
        self.gather(local, out)
    }

    fn all_gather_counts(&self, local: &[u64]) -> Result<Vec<u64>> {
        Ok(local.to_vec())
    }

    fn all_reduce(&self, op: ReduceOp, bufs: &mut [Vec<f32>]) -> Result<()> {
        let Some((first, rest)) = bufs.split_first_mut() else { return Ok(()) };
        for other in rest.iter() {
            match op {
                ReduceOp::Sum => first.iter_mut().zip(other).for_each(|(a, &b)| *a += b),
                ReduceOp::Max => first.iter_mut().zip(other).for_each(|(a, &b)| *a = a.max(b)),
            }
        }
        for other in rest.iter_mut() {
            other.copy_from_slice(first);
        }
        Ok(())
    }

    fn reduce_scatter_sum(&self, bufs: &[Vec<f32>], segments: &[std::ops::Range<usize>], out: &mut [Vec<f32>]) -> Result<()> {
        for (rank, dst) in out.iter_mut().enumerate() {
            let seg = segments[rank].clone();
            dst.clear();
            dst.extend_from_slice(&bufs[0][seg.clone()]);
            for other in &bufs[1..] {
                crate::pool::install(|| {
                    dst.par_chunks_mut(CHUNK).zip(other[seg.clone()].par_chunks(CHUNK)).for_each(|(a, b)| {
                        a.iter_mut().zip(b).for_each(|(x, &y)| *x += y);
                    })
                })?;
            }
        }
        Ok(())
    }
}
