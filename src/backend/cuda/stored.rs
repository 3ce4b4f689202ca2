//! Centers and optimizer state on a GPU as stored (`storage_dtype`, SPEC §2): f32, or bf16 held as
//! its 16 bits — half the device memory. The kernels widen stored values to f32 and round what
//! they write back (kernels/storage.cuh, src/storage.rs's rounding bit for bit); the host side
//! converts here, at the trait's f32 boundary, with `crate::storage`'s conversions: widening
//! exactly, narrowing to nearest.

use super::device::device_error;
use crate::config::DType;
use crate::error::{try_zeroed, Result};
use crate::storage::Stored;
use cudarc::driver::{CudaSlice, CudaStream, DriverError, LaunchArgs, PushKernelArg};
use half::bf16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use std::ops::Range;
use std::sync::Arc;

/// One tensor of a shard's rows on its GPU.
pub(super) enum StoredRows {
    F32(CudaSlice<f32>),
    /// bf16 values as their bits (cudarc knows no bf16).
    BF16(CudaSlice<u16>),
}

impl StoredRows {
    /// `len` zeros of `dtype` (F32 or BF16).
    pub fn zeros(stream: &Arc<CudaStream>, dtype: DType, len: usize) -> std::result::Result<StoredRows, DriverError> {
        Ok(match dtype {
            DType::BF16 => StoredRows::BF16(stream.alloc_zeros(len)?),
            _ => StoredRows::F32(stream.alloc_zeros(len)?),
        })
    }

    /// `len` values of `dtype`, not initialised.
    ///
    /// # Safety
    /// A kernel writes every value before anything reads it.
    pub unsafe fn uninit(stream: &Arc<CudaStream>, dtype: DType, len: usize) -> std::result::Result<StoredRows, DriverError> {
        Ok(match dtype {
            DType::BF16 => StoredRows::BF16(unsafe { stream.alloc(len) }?),
            _ => StoredRows::F32(unsafe { stream.alloc(len) }?),
        })
    }

    /// Which of a kernel's two entry points reads this storage: `f32` (the kernel as it is with
    /// f32 storage) or `bf16`.
    pub fn kernel(&self, f32: &'static str, bf16: &'static str) -> &'static str {
        match self {
            StoredRows::F32(_) => f32,
            StoredRows::BF16(_) => bf16,
        }
    }

    pub fn is_bf16(&self) -> bool {
        matches!(self, StoredRows::BF16(_))
    }

    /// Values `range` widened to f32 into `out` (as many).
    pub fn read(&self, stream: &Arc<CudaStream>, range: Range<usize>, out: &mut [f32]) -> Result<()> {
        match self {
            StoredRows::F32(v) => stream.memcpy_dtoh(&v.slice(range), out).map_err(|e| device_error("download", e)),
            StoredRows::BF16(v) => {
                // Through a bounded staging buffer: a caller's request may be a whole shard.
                let mut bits = try_zeroed::<u16>(STAGING.min(range.len()), "bf16 staging buffer")?;
                for (at, out) in (range.start..range.end).step_by(STAGING).zip(out.chunks_mut(STAGING)) {
                    let bits = &mut bits[..out.len()];
                    stream.memcpy_dtoh(&v.slice(at..at + out.len()), bits).map_err(|e| device_error("download", e))?;
                    stream.synchronize().map_err(|e| device_error("download", e))?;
                    <bf16 as Stored>::widen(bits.reinterpret_cast(), out);
                }
                Ok(())
            }
        }
    }

    /// Values `range` set to `values` (as many), rounded to nearest where stored narrower.
    pub fn write(&mut self, stream: &Arc<CudaStream>, range: Range<usize>, values: &[f32]) -> Result<()> {
        match self {
            StoredRows::F32(v) => stream.memcpy_htod(values, &mut v.slice_mut(range)).map_err(|e| device_error("upload", e)),
            StoredRows::BF16(v) => {
                let mut narrow = try_zeroed::<bf16>(STAGING.min(values.len()), "bf16 staging buffer")?;
                for (at, values) in (range.start..range.end).step_by(STAGING).zip(values.chunks(STAGING)) {
                    let narrow = &mut narrow[..values.len()];
                    <bf16 as Stored>::narrow_nearest(values, narrow);
                    // A pageable upload has left the host buffer when the call returns.
                    stream.memcpy_htod(narrow.reinterpret_cast(), &mut v.slice_mut(at..at + values.len())).map_err(|e| device_error("upload", e))?;
                }
                Ok(())
            }
        }
    }
}

/// Values converted at a time between the host's f32 and a GPU's bf16.
const STAGING: usize = 1 << 20;

// SAFETY: the kernel receives the tensor's device address, as for the CudaSlice it holds; the
// entry point chosen by `StoredRows::kernel` takes it as a pointer to its stored type.
unsafe impl<'a, 'b: 'a> PushKernelArg<&'b StoredRows> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b StoredRows) -> &mut Self {
        match arg {
            StoredRows::F32(v) => self.arg(v),
            StoredRows::BF16(v) => self.arg(v),
        }
    }
}
