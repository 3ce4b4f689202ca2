//! partialfc: the PartialFC classification head (sharded class centers, sampled softmax with an
//! ArcFace/CosFace margin, sparse center updates) as a library with a stable C ABI.
//!
//! Layout: `config` (validated settings), `sharding` (who owns and samples which classes), `margin`
//! (the target logit), `optimizer` (sparse SGD/AdamW), `comm` (collectives), `backend` (the
//! arithmetic, per device kind), `engine` (the head shared by all backends), `checkpoint`/`export`/`index`/`search` (persistence and
//! search), `ffi` (the C boundary).

pub mod backend;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod engine;
pub mod error;
pub mod export;
pub mod ffi;
pub mod fsutil;
pub mod index;
pub mod margin;
pub mod optimizer;
pub mod pool;
pub mod rng;
pub mod search;
pub mod sharding;

pub use config::Config;
pub use engine::{Head, StepStats};
pub use error::{Error, Result, Status};
