//! The C-visible types and constants. Enumerations are plain integers so that an unknown value from
//! C is a clear error rather than undefined behaviour.
#![allow(non_camel_case_types)]

/// Result of every fallible call: `PFC_OK` or one of the `PFC_ERR_*` codes.
pub type pfc_status = i32;
pub const PFC_OK: pfc_status = 0;
/// A required pointer argument was NULL.
pub const PFC_ERR_NULL_ARGUMENT: pfc_status = 1;
/// A value is out of range, a size does not match, a label is outside [0, C), an embedding is NaN/Inf.
pub const PFC_ERR_INVALID_ARGUMENT: pfc_status = 2;
pub const PFC_ERR_OUT_OF_MEMORY: pfc_status = 3;
/// The requested backend, driver or library is not available on this machine.
pub const PFC_ERR_UNAVAILABLE: pfc_status = 4;
pub const PFC_ERR_DEVICE: pfc_status = 5;
pub const PFC_ERR_COMMUNICATION: pfc_status = 6;
pub const PFC_ERR_IO: pfc_status = 7;
pub const PFC_ERR_CORRUPT: pfc_status = 8;
pub const PFC_ERR_INCOMPATIBLE: pfc_status = 9;
/// An internal error was caught at the boundary; the head is unchanged.
pub const PFC_ERR_PANIC: pfc_status = 10;
/// The step's loss, embedding or center gradients, or the centers it would write, are NaN or Inf
/// (divergence, overflow): nothing changed — no center, optimizer state, step count or output. The
/// host decides what to do (lower the learning rate, skip the batch, reload a checkpoint).
pub const PFC_ERR_NON_FINITE: pfc_status = 11;

pub const PFC_BACKEND_CPU: i32 = 0;
pub const PFC_BACKEND_CUDA: i32 = 1;

pub const PFC_DTYPE_F32: i32 = 0;
pub const PFC_DTYPE_F16: i32 = 1;
pub const PFC_DTYPE_BF16: i32 = 2;

pub const PFC_MEMORY_HOST: i32 = 0;
pub const PFC_MEMORY_DEVICE: i32 = 1;

pub const PFC_OPTIMIZER_SGD: i32 = 0;
pub const PFC_OPTIMIZER_ADAMW: i32 = 1;

/// ∂z/∂cos = scale for every column, the target included (the reference's gradient).
pub const PFC_MARGIN_GRAD_STRAIGHT_THROUGH: i32 = 0;
/// The true derivative of the margin function.
pub const PFC_MARGIN_GRAD_EXACT: i32 = 1;

/// Margin kinds (SPEC §1.6, §1.6a): the combined margin s·(cos(m1·θ + m2) − m3) (ArcFace,
/// CosFace, SphereFace), AdaFace (the margin adapts to each sample's embedding norm), and
/// CurricularFace (hard negatives reweighted by a running curriculum parameter).
pub const PFC_MARGIN_COMBINED: i32 = 0;
pub const PFC_MARGIN_ADAFACE: i32 = 1;
pub const PFC_MARGIN_CURRICULAR: i32 = 2;

/// Export formats: safetensors (one tensor `centers` [C, d]), NumPy `.npy`, FAISS `.fvecs`, and a
/// FAISS `IndexFlatIP` file (`faiss.read_index` opens it; ids are class ids).
pub const PFC_FORMAT_SAFETENSORS: i32 = 0;
pub const PFC_FORMAT_NPY: i32 = 1;
pub const PFC_FORMAT_FVECS: i32 = 2;
pub const PFC_FORMAT_FAISS: i32 = 3;

/// Bytes of an NCCL unique id.
pub const PFC_NCCL_ID_BYTES: usize = 128;
const _: () = assert!(PFC_NCCL_ID_BYTES == crate::comm::nccl::UNIQUE_ID_BYTES);

/// Configuration of a head. Always start from `pfc_config_init`, then change fields.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct pfc_config {
    /// Set by `pfc_config_init` to `sizeof(pfc_config)`; lets the struct grow compatibly. A struct
    /// from an older header (a smaller size: fields are only ever appended) is accepted, and the
    /// fields it lacks take their defaults; one from a newer header (larger) gives
    /// PFC_ERR_INCOMPATIBLE.
    pub struct_size: u32,
    /// Total classes C over all shards.
    pub num_classes: u64,
    pub embedding_dim: u32,
    /// Fraction of each shard's classes used per step, in (0, 1]; 1 = every class (model parallel).
    pub sample_rate: f32,
    /// Logit scale s.
    pub scale: f32,
    /// Target logit s·(cos(m1·θ + m2) − m3): ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4).
    pub m1: f32,
    pub m2: f32,
    pub m3: f32,
    /// Non-target cosines above this are zeroed and get no gradient; 0 disables it.
    pub interclass_filter: f32,
    /// `PFC_MARGIN_GRAD_*`.
    pub margin_grad: i32,
    /// 1: past m1·θ + m2 > π use the original ArcFace rule cos − m2·sin(m2); 0: no fallback.
    pub arcface_fallback: i32,
    /// `PFC_OPTIMIZER_*`.
    pub optimizer: i32,
    pub lr: f32,
    /// SGD momentum.
    pub momentum: f32,
    pub weight_decay: f32,
    /// AdamW betas and epsilon.
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `PFC_DTYPE_*`: GEMM inputs; accumulation is always f32.
    pub compute_dtype: i32,
    /// Seeds center initialisation and sampling.
    pub seed: u64,
    /// Centers start as N(0, init_std²).
    pub init_std: f32,
    /// `PFC_BACKEND_*`.
    pub backend: i32,
    /// Shards this process drives: GPUs (CUDA) or threads of work (CPU).
    pub local_shards: u32,
    /// CUDA ordinals, `local_shards` entries; NULL = 0..local_shards-1. NULL for the CPU backend.
    pub devices: *const i32,
    /// Shards over all processes. 0 = derived: local_shards alone, or with `allgather` the sum of
    /// every process's local_shards (a nonzero value must then equal that sum).
    pub world_size: u32,
    /// Global rank of this process's first shard; derived (0 or the derived value) with `allgather`.
    pub first_rank: u32,
    /// `PFC_NCCL_ID_BYTES` bytes: the CUDA backend's way to form a job without `allgather`
    /// (world_size > local_shards, first_rank and this id distributed by the host).
    pub nccl_id: *const u8,
    /// Processes in the job; 1 (the default) = this process alone. Global shard ranks follow
    /// process order: process 0's shards first.
    pub process_count: u32,
    /// This process, in [0, process_count): its place in `allgather`'s output.
    pub process_index: u32,
    /// The job's all-gather, needed when process_count > 1 (see `pfc_allgather_fn`).
    pub allgather: pfc_allgather_fn,
    /// Passed to `allgather` unchanged.
    pub allgather_ctx: *mut core::ffi::c_void,
    /// `PFC_MARGIN_*`. With the adaptive kinds the scale is `scale` and the combined margin's
    /// fields (m1, m2, m3, interclass_filter, margin_grad, arcface_fallback) stay at their defaults;
    /// their margin gradient is the exact one.
    pub margin_kind: i32,
    /// The adaptive kinds' m; 0 = the kind's default (AdaFace 0.4, CurricularFace 0.5).
    pub margin_m: f32,
    /// AdaFace's h (0.333): how far a norm's standardized value moves the margin.
    pub adaface_h: f32,
    /// AdaFace's weight of the newest batch in the running norm statistics (0.01).
    pub adaface_t_alpha: f32,
    /// `PFC_DTYPE_F32` (the default) or `PFC_DTYPE_BF16`: how centers and optimizer state are
    /// stored. In bf16 a step computes in f32 as ever and writes each updated value back rounded
    /// stochastically, from a counter-based draw of (seed, step, class, element): half the memory,
    /// updates below bf16's spacing kept on average, and the same bits on every shard layout.
    pub storage_dtype: i32,
}

/// The host's process group, as one collective (the pattern of UCC's out-of-band all-gather):
/// every process calls it with the same `bytes`; `recv` receives process_count × bytes, in process
/// order; it returns 0 on success. With MPI:
/// `MPI_Allgather(send, bytes, MPI_BYTE, recv, bytes, MPI_BYTE, comm)`.
///
/// The library calls it from one thread per process at a time, in the same sequence on every
/// process (MPI collective semantics: a call on a multi-process head that touches more than local
/// state must be made by every process, in the same order), and keeps no pointer past the call. A
/// nonzero return gives PFC_ERR_COMMUNICATION and makes the head refuse every later call with
/// PFC_ERR_COMMUNICATION until a checkpoint is loaded into it; the callback should fail on every
/// process of the job or on none (as MPI's collectives do), or the other processes wait for it.
pub type pfc_allgather_fn =
    Option<unsafe extern "C" fn(ctx: *mut core::ffi::c_void, send: *const core::ffi::c_void, bytes: usize, recv: *mut core::ffi::c_void) -> i32>;

/// One local shard's batch for a step.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct pfc_batch {
    /// batch_size × embedding_dim, row-major, in `dtype`.
    pub embeddings: *const core::ffi::c_void,
    /// batch_size labels, each in [0, num_classes).
    pub labels: *const i64,
    /// Output of `pfc_train_step`: same shape and dtype as `embeddings`, must not overlap them.
    /// Ignored by `pfc_evaluate`.
    pub grad_embeddings: *mut core::ffi::c_void,
    /// Rows of this shard; may differ between shards and between steps, may be 0 on some shards.
    pub batch_size: u64,
    /// `PFC_DTYPE_*` of `embeddings` and `grad_embeddings`.
    pub dtype: i32,
    /// `PFC_MEMORY_*`: where the three pointers live.
    pub memory: i32,
    /// CUstream to order the step on (device memory), or NULL.
    pub stream: *mut core::ffi::c_void,
}

/// What a step reports. Every shard sees the same values.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct pfc_step_stats {
    /// Mean softmax cross-entropy over the global batch (exact log-softmax).
    pub loss: f64,
    /// Top-1 accuracy of the margin-free cosines over the sampled columns.
    pub accuracy: f64,
    /// Training steps taken by the head, this one included.
    pub step: u64,
    /// Rows over all shards.
    pub global_batch: u64,
    /// Columns used over all shards.
    pub sampled_classes: u64,
}
