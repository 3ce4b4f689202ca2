//! The CUDA backend: the probe for the driver, the GPUs and the CUDA libraries (`device`), the
//! kernel registry (`kernels`), the per-shard primitives on each local GPU (`step`), the stored
//! centers and optimizer state (`stored`), and search over the centers on the GPUs (`search`).

mod blas;
mod device;
pub mod kernels;
mod plan;
mod search;
mod step;
mod stored;
mod verdict;

pub(crate) use device::probe;
pub use step::CudaBackend;
