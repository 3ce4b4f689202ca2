//! partialfc: the PartialFC classification head (sharded class centers, sampled softmax with an
//! ArcFace/CosFace margin, sparse center updates) as a library with a stable C ABI.
//!
//! Layers, each using only those below it:
//! - the C boundary (`ffi`) and what stands on a head: `checkpoint`, `export`, `index`;
//! - the head (`head`): validation, bookkeeping and the collective calls' contracts, the step
//!   driver (`head::driver`) and the factory that joins a backend's primitives with collectives;
//! - two seams side by side, unaware of each other: per-shard compute (`backend`: CPU, CUDA) and
//!   collectives (`comm`: local, process, NCCL);
//! - the vocabulary both share: kinds of memory and their buffers (`memory`), batch and gradient
//!   views (`batch`), numeric limits (`limits`), configuration (`config`), errors (`error`), the
//!   state's tensors (`state`) and how they are stored (`storage`), sharding and sampling (`sharding`), randomness (`rng`), the margin
//!   (`margin`), top-k merging (`topk`), the thread pool (`pool`), vectorized host loops (`simd`)
//!   and files (`fsutil`).
//!
//! `tests/all/layers.rs` checks from the `use` lines that dependencies run this way only.

pub mod backend;
pub mod batch;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod error;
pub mod export;
pub mod ffi;
pub mod fsutil;
pub mod head;
pub mod index;
pub(crate) mod limits;
pub mod margin;
pub mod memory;
pub mod pool;
pub mod rng;
pub mod sharding;
pub(crate) mod simd;
pub mod state;
pub mod storage;
pub mod topk;

pub use config::Config;
pub use error::{Error, Result, Status};
pub use head::{Head, StepStats};
