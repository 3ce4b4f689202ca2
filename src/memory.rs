//! Kinds of memory and their buffers: what the collectives move and the compute primitives work
//! on. Both seams name buffers through these types and nothing else, so neither needs the other.

/// The buffer types of one kind of memory.
pub trait Memory {
    type F32: Send;
    type I64: Send;
}

/// A buffer of f32 (or i64) values in memory `M`.
pub type F32Buf<M> = <M as Memory>::F32;
pub type I64Buf<M> = <M as Memory>::I64;
/// One shard's rows: embeddings (f32) and labels.
pub type Rows<M> = (F32Buf<M>, I64Buf<M>);
/// One shard's statistics before the all-reduces: max-type and sum-type.
pub type Stats<M> = (F32Buf<M>, F32Buf<M>);

/// Host memory: plain vectors.
pub struct Host;
impl Memory for Host {
    type F32 = Vec<f32>;
    type I64 = Vec<i64>;
}

/// GPU memory: what the CUDA primitives compute on and NCCL moves.
pub struct Device;
impl Memory for Device {
    type F32 = cudarc::driver::CudaSlice<f32>;
    type I64 = cudarc::driver::CudaSlice<i64>;
}
