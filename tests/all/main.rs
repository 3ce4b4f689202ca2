//! The integration tests: one test binary (`cargo test --release --test all`) with a module per
//! area, and the helpers they share as modules of it (`common`: golden files and a head driven
//! through the C ABI; `native`: building and running C, C++, Go and MPI programs against the
//! library; `persist`: checkpoint directories). One binary links the library once instead of once
//! per area; filter by module, e.g. `cargo test --release --test all header::`.
//!
//! All tests share one process and run on parallel threads. A test that changes process-global
//! state — fault injection into the library's file writes, an address-space limit, environment
//! variables the library reads once — does so in a child process of this binary
//! (`common::child_test`, `common::alone_in_child`), never in this one.

mod common;
mod native;
mod persist;

mod adaptive_margins;
mod bad_input;
mod batches;
mod bindings;
mod c_program;
mod checkpoint;
mod checkpoint_faults;
mod checkpoint_fuzz;
mod checkpoint_safety;
mod cli;
mod config_layout;
mod determinism;
mod dtypes;
mod emu_cublas;
mod emu_driver;
mod emu_nccl;
mod export_search;
mod extreme_values;
mod fork;
mod fused_update;
mod golden;
mod gpu;
mod gpu_jobs;
mod gpu_margins;
mod gpu_step;
mod gpu_storage;
mod gpu_scripts;
mod header;
mod index;
mod install;
mod kernels;
mod layers;
mod mpi;
mod nccl;
mod onednn;
mod oom;
mod persist_mpi;
mod plan;
mod reference_f64;
mod sampling;
mod setup;
mod step_split;
mod storage;
mod storage_files;
