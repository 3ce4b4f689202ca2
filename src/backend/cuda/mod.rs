//! The CUDA backend: the probe for the driver, the GPUs and the CUDA libraries (`device`), the
//! kernel registry (`kernels`), and the per-shard primitives on each local GPU (`step`).

mod device;
pub mod kernels;
mod plan;
mod step;
mod verdict;

pub(crate) use device::probe;
pub use step::CudaBackend;
