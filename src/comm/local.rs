//! The in-process collectives: every shard lives in this process, so they are memory operations
//! over the local buffers, in rank order.

use super::{Collectives, ReduceOp};
use crate::memory::Host;
use crate::error::Result;
use rayon::prelude::*;

pub struct LocalCollectives {
    shards: usize,
}

impl LocalCollectives {
    pub fn new(shards: usize) -> Self {
        LocalCollectives { shards }
    }
}

/// Values per parallel task when combining large buffers.
const CHUNK: usize = 1 << 14;

fn gather<T: Copy + Send + Sync>(local: &[Vec<T>], out: &mut [Vec<T>]) {
    for dst in out.iter_mut() {
        dst.clear();
        for part in local {
            dst.extend_from_slice(part);
        }
    }
}

/// Sums `parts` element-wise in their order into `dst` (overwritten), in parallel chunks: the
/// order per element is the parts' order, whatever the chunking.
pub(crate) fn sum_in_order(parts: &[&[f32]], dst: &mut [f32]) -> Result<()> {
    crate::pool::install(|| dst.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let span = c * CHUNK..c * CHUNK + out.len();
        out.copy_from_slice(&parts[0][span.clone()]);
        for part in &parts[1..] {
            out.iter_mut().zip(&part[span.clone()]).for_each(|(x, &y)| *x += y);
        }
    }))
}

impl Collectives<Host> for LocalCollectives {
    fn world_size(&self) -> usize {
        self.shards
    }

    fn gather_counts(&self, local: &[u64]) -> Result<Vec<u64>> {
        Ok(local.to_vec())
    }

    fn all_gather_f32(&self, local: &[Vec<f32>], _rows: &[u64], _width: usize, out: &mut [Vec<f32>]) -> Result<()> {
        gather(local, out);
        Ok(())
    }

    fn all_gather_i64(&self, local: &[Vec<i64>], _rows: &[u64], out: &mut [Vec<i64>]) -> Result<()> {
        gather(local, out);
        Ok(())
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
            let parts: Vec<&[f32]> = bufs.iter().map(|b| &b[seg.clone()]).collect();
            dst.resize(seg.len(), 0.0);
            sum_in_order(&parts, dst)?;
        }
        Ok(())
    }

    fn agree(&self, local: Result<()>) -> Result<()> {
        local
    }
}
