//! The views of a call's batches the head, the backends and the C boundary share: one local
//! shard's embeddings and labels (host slices or pointers on its GPU), where its embedding gradient
//! goes, and the checks every host batch passes before any state changes.

use crate::config::DType;
use crate::error::{Error, Result};
use half::{bf16, f16};

/// One local shard's embeddings in host memory, already validated.
#[derive(Clone, Copy)]
pub enum Embeddings<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Embeddings<'_> {
    pub fn len(&self) -> usize {
        match self {
            Embeddings::F32(v) => v.len(),
            Embeddings::F16(v) => v.len(),
            Embeddings::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the values as f32.
    pub fn extend_f32(&self, out: &mut Vec<f32>) {
        match self {
            Embeddings::F32(v) => out.extend_from_slice(v),
            Embeddings::F16(v) => out.extend(v.iter().map(|x| x.to_f32())),
            Embeddings::BF16(v) => out.extend(v.iter().map(|x| x.to_f32())),
        }
    }
}

/// Where one local shard's embedding gradient goes, in the embeddings' dtype.
pub enum GradOut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

impl GradOut<'_> {
    pub fn len(&self) -> usize {
        match self {
            GradOut::F32(d) => d.len(),
            GradOut::F16(d) => d.len(),
            GradOut::BF16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn write(&mut self, src: &[f32]) {
        match self {
            GradOut::F32(d) => d.copy_from_slice(src),
            GradOut::F16(d) => d.iter_mut().zip(src).for_each(|(o, &v)| *o = f16::from_f32(v)),
            GradOut::BF16(d) => d.iter_mut().zip(src).for_each(|(o, &v)| *o = bf16::from_f32(v)),
        }
    }
}

/// One local shard's batch in device memory (CUDA backend): pointers on that shard's GPU, and the
/// caller's stream (0 for none) that the step is ordered after and that then sees the outputs.
#[derive(Clone, Copy, Debug)]
pub struct DeviceBatch {
    pub embeddings: u64,
    pub labels: u64,
    /// 0 when no gradient is wanted (evaluation).
    pub grad: u64,
    pub rows: usize,
    pub dtype: DType,
    pub stream: usize,
}

/// Values of one of the batch dtypes, owned on the host.
pub enum HostValues {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl HostValues {
    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => HostValues::F32(vec![0.0; len]),
            DType::F16 => HostValues::F16(vec![f16::ZERO; len]),
            DType::BF16 => HostValues::BF16(vec![bf16::ZERO; len]),
        }
    }

    pub fn as_embeddings(&self) -> Embeddings<'_> {
        match self {
            HostValues::F32(v) => Embeddings::F32(v),
            HostValues::F16(v) => Embeddings::F16(v),
            HostValues::BF16(v) => Embeddings::BF16(v),
        }
    }

    pub fn as_grad_out(&mut self) -> GradOut<'_> {
        match self {
            HostValues::F32(v) => GradOut::F32(v),
            HostValues::F16(v) => GradOut::F16(v),
            HostValues::BF16(v) => GradOut::BF16(v),
        }
    }
}

/// One local shard's validated input.
#[derive(Clone, Copy)]
pub struct HostBatch<'a> {
    pub embeddings: Embeddings<'a>,
    pub labels: &'a [i64],
}

/// A call's batches as the host passed them, one per local shard: host slices, or pointers on
/// the shards' GPUs. They go to the backend as they are; only it knows how to read them.
#[derive(Clone, Copy)]
pub enum Batches<'a, 'b> {
    Host(&'b [HostBatch<'a>]),
    Device(&'b [DeviceBatch]),
}

impl Batches<'_, '_> {
    pub fn rows(&self) -> Vec<u64> {
        match self {
            Batches::Host(b) => b.iter().map(|b| b.labels.len() as u64).collect(),
            Batches::Device(b) => b.iter().map(|b| b.rows as u64).collect(),
        }
    }
}

/// Where a call's embedding gradients go, one per local shard.
pub enum Outputs<'a, 'b> {
    Host(&'b mut [GradOut<'a>]),
    Device(&'b [DeviceBatch]),
}

/// Labels in `[0, num_classes)` and finite embeddings of a norm that normalizes in f32, batch by
/// batch (the first offence named).
pub(crate) fn validate(batches: &[HostBatch<'_>], num_classes: u64, d: usize) -> Result<()> {
    for (s, b) in batches.iter().enumerate() {
        if let Some((i, &label)) = b.labels.iter().enumerate().find(|(_, &l)| l < 0 || l as u64 >= num_classes) {
            return Err(Error::invalid(format!("batch {s}: label {label} at row {i} is outside [0, {num_classes})")));
        }
        let bad = match b.embeddings {
            Embeddings::F32(v) => v.iter().position(|x| !x.is_finite()),
            Embeddings::F16(v) => v.iter().position(|x| !x.is_finite()),
            Embeddings::BF16(v) => v.iter().position(|x| !x.is_finite()),
        };
        if let Some(at) = bad {
            return Err(Error::invalid(format!("batch {s}: embedding row {} holds NaN or Inf", at / d)));
        }
        if let Some((row, norm)) = first_oversized_embedding(&b.embeddings, d) {
            return Err(Error::invalid(format!(
                "batch {s}: embedding row {row} has norm {norm:.3e}, above {:.3e}: it cannot be normalized in f32",
                crate::limits::MAX_ROW_NORM
            )));
        }
    }
    Ok(())
}

/// The first row of `e` whose norm is above [`crate::limits::MAX_ROW_NORM`], and that norm.
pub(crate) fn first_oversized_embedding(e: &Embeddings<'_>, d: usize) -> Option<(usize, f64)> {
    match e {
        Embeddings::F32(v) => crate::limits::first_oversized_row(v, d),
        Embeddings::BF16(v) => crate::limits::first_oversized(v.chunks_exact(d).map(|row| row.iter().map(|x| x.to_f32()))),
        // f16 rows are at most 65504·√d.
        Embeddings::F16(_) => None,
    }
}
