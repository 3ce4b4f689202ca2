//! The C ABI (`include/partialfc.h`, generated from this module by cbindgen). Every function checks
//! its pointers and integers before touching the head, runs under `guard`, and writes its outputs
//! only when it succeeds.
// C callers cannot see `unsafe`: the pointer contracts are stated in the header, and every pointer
// is checked for NULL before use.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod guard;
mod head;
pub mod types;

use self::guard::{guard, with_last_error};
pub use self::head::pfc_head;
use self::head::lock;
pub use self::types::*;
use crate::batch::{Batches, DeviceBatch, Embeddings, GradOut, HostBatch, Outputs};
use crate::comm::group::{AllGather, CallbackAllGather, ProcessGroup};
use crate::config::{BackendKind, Config, DType, MarginConfig, MarginGrad, MarginKind, OptimizerConfig, OptimizerKind, Rounding};
use crate::head::{Head, StepStats};
use crate::error::{Error, Result, Status};
use std::ffi::c_char;

/// Rows accepted in one shard's batch; keeps `rows × dim` far from overflow.
const MAX_BATCH_ROWS: u64 = 1 << 24;

fn int_bool(name: &str, v: i32) -> Result<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Error::invalid(format!("{name} = {v}: expected 0 or 1"))),
    }
}

fn dtype_of(name: &str, v: i32) -> Result<DType> {
    match v {
        PFC_DTYPE_F32 => Ok(DType::F32),
        PFC_DTYPE_F16 => Ok(DType::F16),
        PFC_DTYPE_BF16 => Ok(DType::BF16),
        _ => Err(Error::invalid(format!("{name} = {v} is not a PFC_DTYPE_* value"))),
    }
}

fn default_c_config() -> pfc_config {
    let d = Config::default();
    pfc_config {
        struct_size: std::mem::size_of::<pfc_config>() as u32,
        num_classes: d.num_classes,
        embedding_dim: d.embedding_dim as u32,
        sample_rate: d.sample_rate,
        scale: d.margin.scale,
        m1: d.margin.m1,
        m2: d.margin.m2,
        m3: d.margin.m3,
        interclass_filter: d.margin.interclass_filter,
        margin_grad: PFC_MARGIN_GRAD_STRAIGHT_THROUGH,
        arcface_fallback: 0,
        optimizer: PFC_OPTIMIZER_SGD,
        lr: d.optimizer.lr,
        momentum: d.optimizer.momentum,
        weight_decay: d.optimizer.weight_decay,
        beta1: d.optimizer.beta1,
        beta2: d.optimizer.beta2,
        eps: d.optimizer.eps,
        compute_dtype: PFC_DTYPE_F32,
        seed: d.seed,
        init_std: d.init_std,
        backend: PFC_BACKEND_CPU,
        local_shards: 1,
        devices: std::ptr::null(),
        world_size: 0,
        first_rank: 0,
        nccl_id: std::ptr::null(),
        process_count: d.process_count as u32,
        process_index: d.process_index as u32,
        allgather: None,
        allgather_ctx: std::ptr::null_mut(),
        margin_kind: PFC_MARGIN_COMBINED,
        margin_m: 0.0,
        adaface_h: MarginKind::ADAFACE.adaface().map_or(0.0, |a| a.0),
        adaface_t_alpha: MarginKind::ADAFACE.adaface().map_or(0.0, |a| a.1),
        storage_dtype: PFC_DTYPE_F32,
    }
}

/// The smallest `pfc_config` a program may pass: the first released layout, which ended before
/// `world_size`. Fields are only ever appended, and the first field a release adds starts at a
/// multiple of 8 bytes, so every older layout is a prefix of this one whose size is a multiple of 8
/// (its trailing padding is never taken for a newer field).
const OLDEST_CONFIG_SIZE: usize = std::mem::offset_of!(pfc_config, world_size);
const _: () = assert!(OLDEST_CONFIG_SIZE.is_multiple_of(8) && std::mem::size_of::<pfc_config>().is_multiple_of(8));

/// Reads the caller's configuration, which may come from an older header (SPEC §2b): its first
/// `struct_size` bytes, and the defaults for the fields an older struct lacks. A struct larger than
/// this library's (a newer header) is refused: its extra fields would be silently ignored.
///
/// # Safety
/// `cfg` must point to at least `struct_size` readable bytes, `struct_size` being its first field.
unsafe fn read_config(cfg: *const pfc_config) -> Result<pfc_config> {
    let size = std::ptr::read_unaligned(cfg.cast::<u32>()) as usize;
    let full = std::mem::size_of::<pfc_config>();
    if size > full {
        return Err(Error::new(
            Status::Incompatible,
            format!(
                "pfc_config.struct_size is {size} bytes, larger than this library's {full}: the program was built against a newer header than this library (version {}); link the library that header came with",
                env!("CARGO_PKG_VERSION")
            ),
        ));
    }
    if size < OLDEST_CONFIG_SIZE || !size.is_multiple_of(8) {
        return Err(Error::new(
            Status::Incompatible,
            format!(
                "pfc_config.struct_size is {size}, not the size of any pfc_config layout (a multiple of 8 from {OLDEST_CONFIG_SIZE} to {full} bytes): initialise the struct with pfc_config_init"
            ),
        ));
    }
    let mut c = default_c_config();
    std::ptr::copy_nonoverlapping(cfg.cast::<u8>(), std::ptr::addr_of_mut!(c).cast::<u8>(), size);
    c.struct_size = full as u32;
    Ok(c)
}

/// The process group a configuration names. Built before anything else is checked, so that every
/// later error can be agreed on by all processes.
///
/// # Safety
/// `allgather`, when set, must behave as `pfc_allgather_fn` documents, with `allgather_ctx`.
unsafe fn group_from_c(c: &pfc_config) -> Result<ProcessGroup> {
    let transport = c.allgather.map(|f| Box::new(CallbackAllGather::new(f, c.allgather_ctx)) as Box<dyn AllGather>);
    ProcessGroup::new(c.process_count as usize, c.process_index as usize, transport)
}

/// The adaptive kinds' fields beside a kind that does not take them are refused unless they are at
/// `pfc_config_init`'s defaults: a `margin_m` meant for the combined margin would otherwise be
/// ignored without a word.
fn check_unused_margin_fields(c: &pfc_config, kind: MarginKind) -> Result<()> {
    let (h, t_alpha) = MarginKind::ADAFACE.adaface().expect("AdaFace has h and t_alpha");
    let adaface_only = [("adaface_h", c.adaface_h, h), ("adaface_t_alpha", c.adaface_t_alpha, t_alpha)];
    let (unused, name): (&[(&str, f32, f32)], &str) = match kind {
        MarginKind::Combined => (&[("margin_m", c.margin_m, 0.0), adaface_only[0], adaface_only[1]], "PFC_MARGIN_COMBINED (its margins are m1, m2, m3)"),
        MarginKind::Curricular { .. } => (&adaface_only, "PFC_MARGIN_CURRICULAR"),
        MarginKind::AdaFace { .. } => (&[], ""),
    };
    match unused.iter().find(|(_, value, default)| value != default) {
        Some((field, value, default)) => Err(Error::invalid(format!(
            "{field} = {value} does not apply to margin_kind {name}: leave it at its default {default}"
        ))),
        None => Ok(()),
    }
}

/// Converts and validates a C configuration.
///
/// # Safety
/// `devices`, when not NULL, must point to `local_shards` integers.
unsafe fn config_from_c(c: &pfc_config) -> Result<Config> {
    let margin_grad = match c.margin_grad {
        PFC_MARGIN_GRAD_STRAIGHT_THROUGH => MarginGrad::StraightThrough,
        PFC_MARGIN_GRAD_EXACT => MarginGrad::Exact,
        v => return Err(Error::invalid(format!("margin_grad = {v} is not a PFC_MARGIN_GRAD_* value"))),
    };
    let margin_m = |default: f32| if c.margin_m == 0.0 { default } else { c.margin_m };
    let kind = match c.margin_kind {
        PFC_MARGIN_COMBINED => MarginKind::Combined,
        PFC_MARGIN_ADAFACE => MarginKind::AdaFace { m: margin_m(MarginKind::ADAFACE.m()), h: c.adaface_h, t_alpha: c.adaface_t_alpha },
        PFC_MARGIN_CURRICULAR => MarginKind::Curricular { m: margin_m(MarginKind::CURRICULAR_M) },
        v => return Err(Error::invalid(format!("margin_kind = {v} is not a PFC_MARGIN_* value"))),
    };
    check_unused_margin_fields(c, kind)?;
    let optimizer = match c.optimizer {
        PFC_OPTIMIZER_SGD => OptimizerKind::Sgd,
        PFC_OPTIMIZER_ADAMW => OptimizerKind::AdamW,
        v => return Err(Error::invalid(format!("optimizer = {v} is not a PFC_OPTIMIZER_* value"))),
    };
    let backend = match c.backend {
        PFC_BACKEND_CPU => BackendKind::Cpu,
        PFC_BACKEND_CUDA => BackendKind::Cuda,
        v => return Err(Error::invalid(format!("backend = {v} is not a PFC_BACKEND_* value"))),
    };
    let local_shards = c.local_shards as usize;
    if local_shards == 0 || local_shards > crate::config::MAX_LOCAL_SHARDS {
        return Err(Error::invalid(format!("local_shards = {local_shards} is outside [1, {}]", crate::config::MAX_LOCAL_SHARDS)));
    }
    let devices = if c.devices.is_null() { Vec::new() } else { std::slice::from_raw_parts(c.devices, local_shards).to_vec() };
    let with_group = c.process_count > 1;
    // With a process group the layout is derived at creation (0 asks for that).
    let world_size = if c.world_size == 0 && !with_group { local_shards } else { c.world_size as usize };
    if !with_group && world_size > local_shards && c.nccl_id.is_null() {
        return Err(Error::null("nccl_id (needed when world_size > local_shards without allgather)"));
    }
    Ok(Config {
        num_classes: c.num_classes,
        embedding_dim: c.embedding_dim as usize,
        sample_rate: c.sample_rate,
        margin: MarginConfig {
            kind,
            scale: c.scale,
            m1: c.m1,
            m2: c.m2,
            m3: c.m3,
            interclass_filter: c.interclass_filter,
            grad: margin_grad,
            arcface_fallback: int_bool("arcface_fallback", c.arcface_fallback)?,
        },
        optimizer: OptimizerConfig {
            kind: optimizer,
            lr: c.lr,
            momentum: c.momentum,
            weight_decay: c.weight_decay,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
        },
        compute_dtype: dtype_of("compute_dtype", c.compute_dtype)?,
        storage_dtype: dtype_of("storage_dtype", c.storage_dtype)?,
        storage_rounding: Rounding::Stochastic,
        seed: c.seed,
        init_std: c.init_std,
        backend,
        local_shards,
        devices,
        world_size,
        first_rank: c.first_rank as usize,
        nccl_id: if c.nccl_id.is_null() { None } else { Some(std::slice::from_raw_parts(c.nccl_id, PFC_NCCL_ID_BYTES).to_vec()) },
        process_count: c.process_count as usize,
        process_index: c.process_index as usize,
    })
}

/// Rejects a pointer that is not aligned for its element type (Rust slices require it).
fn check_aligned<T>(ptr: *const T, what: &str) -> Result<()> {
    if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Error::invalid(format!(
            "{what} at {ptr:p} is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    Ok(())
}

/// Byte ranges `[start, end)` of caller buffers, to prove outputs alias nothing else.
fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// A call's batches, checked against the head's configuration: host slices, or device pointers.
enum Parsed<'a> {
    Host(BatchSlices<'a>),
    Device(Vec<DeviceBatch>),
}

struct BatchSlices<'a> {
    inputs: Vec<HostBatch<'a>>,
    grads: Vec<GradOut<'a>>,
}

/// # Safety
/// The pointers in `b` must be valid for the sizes they declare.
unsafe fn batch_slices<'a>(head: &Head, b: *const pfc_batch, n: u32, want_grads: bool) -> Result<Parsed<'a>> {
    let shards = head.config().local_shards;
    if n as usize != shards {
        return Err(Error::invalid(format!("got {n} batches for {shards} local shards: pass one per shard")));
    }
    if b.is_null() {
        return Err(Error::null("batches"));
    }
    let d = head.config().embedding_dim;
    let batches = std::slice::from_raw_parts(b, n as usize);
    // Every gradient buffer must be disjoint from every input and every other gradient buffer of
    // the call: they become `&mut` slices beside shared ones.
    let mut inputs: Vec<(usize, usize)> = Vec::new();
    let mut outputs: Vec<(usize, (usize, usize))> = Vec::new();
    for (s, batch) in batches.iter().enumerate() {
        let dtype = dtype_of("batch dtype", batch.dtype)?;
        match batch.memory {
            PFC_MEMORY_HOST | PFC_MEMORY_DEVICE => {}
            v => return Err(Error::invalid(format!("batch {s}: memory = {v} is not a PFC_MEMORY_* value"))),
        }
        if batch.memory != batches[0].memory {
            return Err(Error::invalid(format!("batch {s}: memory differs from batch 0's; pass all batches in host or all in device memory")));
        }
        if batch.memory == PFC_MEMORY_DEVICE && head.config().backend != crate::config::BackendKind::Cuda {
            return Err(Error::invalid(format!("batch {s}: device memory needs the CUDA backend; this head runs on the CPU")));
        }
        if batch.batch_size > MAX_BATCH_ROWS {
            return Err(Error::invalid(format!("batch {s}: batch_size {} exceeds {MAX_BATCH_ROWS}", batch.batch_size)));
        }
        let rows = batch.batch_size as usize;
        let values = rows * d;
        let (emb_ptr, label_ptr, grad_ptr) = (batch.embeddings, batch.labels, batch.grad_embeddings);
        if rows > 0 {
            if emb_ptr.is_null() {
                return Err(Error::null(&format!("batch {s}: embeddings")));
            }
            if label_ptr.is_null() {
                return Err(Error::null(&format!("batch {s}: labels")));
            }
            if want_grads && grad_ptr.is_null() {
                return Err(Error::null(&format!("batch {s}: grad_embeddings")));
            }
            let bytes = values * dtype.size();
            match dtype {
                DType::F32 => check_aligned(emb_ptr.cast::<f32>(), &format!("batch {s}: embeddings"))?,
                DType::F16 | DType::BF16 => check_aligned(emb_ptr.cast::<u16>(), &format!("batch {s}: embeddings"))?,
            }
            check_aligned(label_ptr, &format!("batch {s}: labels"))?;
            inputs.push((emb_ptr as usize, emb_ptr as usize + bytes));
            inputs.push((label_ptr as usize, label_ptr as usize + rows * 8));
            if want_grads {
                match dtype {
                    DType::F32 => check_aligned(grad_ptr.cast::<f32>().cast_const(), &format!("batch {s}: grad_embeddings"))?,
                    DType::F16 | DType::BF16 => {
                        check_aligned(grad_ptr.cast::<u16>().cast_const(), &format!("batch {s}: grad_embeddings"))?
                    }
                }
                outputs.push((s, (grad_ptr as usize, grad_ptr as usize + bytes)));
            }
        }
    }
    for (i, &(s, out)) in outputs.iter().enumerate() {
        if inputs.iter().any(|&r| overlaps(r, out)) {
            return Err(Error::invalid(format!("batch {s}: grad_embeddings overlaps an input buffer (embeddings or labels)")));
        }
        if outputs[..i].iter().any(|&(_, other)| overlaps(other, out)) {
            return Err(Error::invalid(format!("batch {s}: grad_embeddings overlaps another batch's grad_embeddings")));
        }
    }
    if batches[0].memory == PFC_MEMORY_DEVICE {
        let device = batches
            .iter()
            .map(|b| {
                Ok(DeviceBatch {
                    embeddings: b.embeddings as u64,
                    labels: b.labels as u64,
                    grad: if want_grads { b.grad_embeddings as u64 } else { 0 },
                    rows: b.batch_size as usize,
                    dtype: dtype_of("batch dtype", b.dtype)?,
                    stream: b.stream as usize,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(Parsed::Device(device));
    }
    let mut out = BatchSlices { inputs: Vec::with_capacity(shards), grads: Vec::with_capacity(shards) };
    for batch in batches {
        let dtype = dtype_of("batch dtype", batch.dtype)?;
        let rows = batch.batch_size as usize;
        let values = rows * d;
        let (emb_ptr, label_ptr, grad_ptr) = (batch.embeddings, batch.labels, batch.grad_embeddings);
        let labels: &[i64] = if rows == 0 { &[] } else { std::slice::from_raw_parts(label_ptr, rows) };
        let embeddings = match (dtype, rows) {
            (DType::F32, 0) => Embeddings::F32(&[]),
            (DType::F16, 0) => Embeddings::F16(&[]),
            (DType::BF16, 0) => Embeddings::BF16(&[]),
            (DType::F32, _) => Embeddings::F32(std::slice::from_raw_parts(emb_ptr.cast(), values)),
            (DType::F16, _) => Embeddings::F16(std::slice::from_raw_parts(emb_ptr.cast(), values)),
            (DType::BF16, _) => Embeddings::BF16(std::slice::from_raw_parts(emb_ptr.cast(), values)),
        };
        out.inputs.push(HostBatch { embeddings, labels });
        if want_grads {
            out.grads.push(match (dtype, rows) {
                (DType::F32, 0) => GradOut::F32(&mut []),
                (DType::F16, 0) => GradOut::F16(&mut []),
                (DType::BF16, 0) => GradOut::BF16(&mut []),
                (DType::F32, _) => GradOut::F32(std::slice::from_raw_parts_mut(grad_ptr.cast(), values)),
                (DType::F16, _) => GradOut::F16(std::slice::from_raw_parts_mut(grad_ptr.cast(), values)),
                (DType::BF16, _) => GradOut::BF16(std::slice::from_raw_parts_mut(grad_ptr.cast(), values)),
            });
        }
    }
    Ok(Parsed::Host(out))
}

fn write_stats(stats: *mut pfc_step_stats, s: StepStats) {
    // SAFETY: a non-NULL stats pointer is the caller's writable struct.
    if let Some(out) = unsafe { stats.as_mut() } {
        *out = pfc_step_stats {
            loss: s.loss,
            accuracy: s.accuracy,
            step: s.step,
            global_batch: s.global_batch,
            sampled_classes: s.sampled_classes,
        };
    }
}

/// Fills `cfg` with the defaults (the reference's: s = 64, ArcFace m2 = 0.5, sample_rate 1, SGD
/// lr 0.1 momentum 0.9 weight decay 5e-4, AdamW betas 0.9/0.999 eps 1e-8, centers N(0, 0.01²), f32,
/// CPU, one shard) and sets `struct_size`. `num_classes` and `embedding_dim` must then be set.
/// NULL is a no-op.
#[no_mangle]
pub extern "C" fn pfc_config_init(cfg: *mut pfc_config) {
    // This writes the whole struct of this header. A program built against an older header calls
    // it with a shorter struct, so once a layout is released, a release that appends fields must
    // keep this symbol writing the released layout and give the new header a new init function.
    // SAFETY: a non-NULL cfg is the caller's writable struct.
    if let Some(c) = unsafe { cfg.as_mut() } {
        *c = default_c_config();
    }
}

/// Creates a head: validates `cfg`, allocates and initialises the local shards' centers and
/// optimizer state. On success `*out` owns the head (free it with `pfc_destroy`); on failure `*out`
/// is untouched. Only `cfg->struct_size` bytes of `cfg` are read. A CUDA request on a machine
/// without a usable driver gives PFC_ERR_UNAVAILABLE; too little memory, or a process that cannot
/// start the library's worker threads (thread or memory limits), PFC_ERR_OUT_OF_MEMORY.
#[no_mangle]
pub extern "C" fn pfc_create(cfg: *const pfc_config, out: *mut *mut pfc_head) -> pfc_status {
    guard(|| {
        // SAFETY: non-NULL pointers from the caller, per the header's contract.
        if cfg.is_null() {
            return Err(Error::null("cfg"));
        }
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let c = unsafe { read_config(cfg) }?;
        let group = unsafe { group_from_c(&c) }?;
        // A bad field on one process fails every process, with the same message.
        let config = group.agree(unsafe { config_from_c(&c) })?;
        let head = Head::with_group(config, group)?;
        unsafe { *out = pfc_head::into_raw(head) };
        Ok(())
    })
}

/// Frees a head and everything it owns. NULL is a no-op.
#[no_mangle]
pub extern "C" fn pfc_destroy(head: *mut pfc_head) {
    if !head.is_null() {
        // Dropping frees memory only; a panic here would be a bug in a destructor, kept from C.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: the pointer came from pfc_create and is destroyed once.
            unsafe { pfc_head::destroy(head) };
        }));
    }
}

/// One training step over `n` batches, one per local shard (`n` must equal `local_shards`): the
/// gradient of the mean loss times world_size is written to each batch's `grad_embeddings`, and the
/// sampled centers are updated. `pfc_train_compute` followed by `pfc_train_apply`, in one call.
/// `stats` may be NULL. A step whose loss, gradients or updated centers would be NaN or Inf returns
/// PFC_ERR_NON_FINITE and changes nothing (no center, optimizer state, step count or output).
#[no_mangle]
pub extern "C" fn pfc_train_step(head: *mut pfc_head, batches: *const pfc_batch, n: u32, stats: *mut pfc_step_stats) -> pfc_status {
    train(head, batches, n, stats, true)
}

/// Forward and backward over `n` batches (one per local shard) without updating anything: writes
/// the embedding gradients (as `pfc_train_step` does) and adds the sampled centers' gradients to
/// those the head has accumulated since the last `pfc_train_apply`. Several computes before one
/// apply accumulate over the union of their sampled rows (gradients add up, as PyTorch's do).
/// Centers, optimizer state and the step count do not change, so the computes of one step use the
/// same step number: their negatives are the same draw (as one large batch would have), their
/// positives each batch's labels; `stats->step` reports the steps applied so far.
/// PFC_ERR_NON_FINITE when the loss or a gradient is NaN or Inf; nothing is written or accumulated.
#[no_mangle]
pub extern "C" fn pfc_train_compute(head: *mut pfc_head, batches: *const pfc_batch, n: u32, stats: *mut pfc_step_stats) -> pfc_status {
    train(head, batches, n, stats, false)
}

fn train(head: *mut pfc_head, batches: *const pfc_batch, n: u32, stats: *mut pfc_step_stats, apply: bool) -> pfc_status {
    guard(|| {
        let mut h = lock(head)?;
        let s = match unsafe { batch_slices(&h, batches, n, true) }? {
            Parsed::Host(mut slices) => h.compute(Batches::Host(&slices.inputs), Outputs::Host(&mut slices.grads), apply, !stats.is_null())?,
            Parsed::Device(device) => h.compute(Batches::Device(&device), Outputs::Device(&device), apply, !stats.is_null())?,
        };
        write_stats(stats, s);
        Ok(())
    })
}

/// Runs the optimizer once over the gradients accumulated by `pfc_train_compute` calls, with the
/// head's current learning rate, advances the step count and clears them. PFC_ERR_INVALID_ARGUMENT
/// when nothing was accumulated; PFC_ERR_NON_FINITE (nothing changes, the gradients stay
/// accumulated) when a center would become NaN, Inf or impossible to normalize.
#[no_mangle]
pub extern "C" fn pfc_train_apply(head: *mut pfc_head) -> pfc_status {
    guard(|| lock(head)?.apply())
}

/// Drops the gradients accumulated since the last `pfc_train_apply` (a skipped batch). Local: it
/// exchanges nothing, but every process should discard together to stay in step.
#[no_mangle]
pub extern "C" fn pfc_train_discard(head: *mut pfc_head) -> pfc_status {
    guard(|| {
        lock(head)?.discard();
        Ok(())
    })
}

/// Loss and accuracy over all classes (no sampling), nothing updated; `grad_embeddings` is ignored.
#[no_mangle]
pub extern "C" fn pfc_evaluate(head: *mut pfc_head, batches: *const pfc_batch, n: u32, stats: *mut pfc_step_stats) -> pfc_status {
    guard(|| {
        let mut h = lock(head)?;
        let s = match unsafe { batch_slices(&h, batches, n, false) }? {
            Parsed::Host(slices) => h.evaluate(&slices.inputs)?,
            Parsed::Device(device) => h.evaluate_batches(Batches::Device(&device))?,
        };
        write_stats(stats, s);
        Ok(())
    })
}

/// Sets the learning rate used by later steps (finite, >= 0).
#[no_mangle]
pub extern "C" fn pfc_set_learning_rate(head: *mut pfc_head, lr: f32) -> pfc_status {
    guard(|| lock(head)?.set_learning_rate(lr))
}

/// The margin's running statistics (SPEC §1.6a): AdaFace's running norm mean and standard deviation
/// (2 values), CurricularFace's t (1 value); none for the combined margin. Writes the first
/// `min(cap, count)` of them to `out` (which may be NULL when `cap` is 0) and sets `*len` to their
/// count. The same on every shard and process; local, like pfc_get_centers.
#[no_mangle]
pub extern "C" fn pfc_margin_state(head: *const pfc_head, out: *mut f32, cap: u32, len: *mut u32) -> pfc_status {
    guard(|| {
        let h = lock(head)?;
        if len.is_null() {
            return Err(Error::null("len"));
        }
        if out.is_null() && cap > 0 {
            return Err(Error::null("out"));
        }
        let state = h.margin_state()?;
        let written = state.len().min(cap as usize);
        unsafe {
            if written > 0 {
                std::slice::from_raw_parts_mut(out, written).copy_from_slice(&state[..written]);
            }
            *len = state.len() as u32;
        }
        Ok(())
    })
}

/// Replaces the margin's running statistics by `len` values listed as pfc_margin_state lists them
/// (a host that recomputes a step restores those its first forward pass saw). `len` must be the
/// margin's count (0 for the combined margin, when `values` may be NULL) and the values finite;
/// otherwise nothing changes. Local, like pfc_set_centers: give every process the same values.
#[no_mangle]
pub extern "C" fn pfc_set_margin_state(head: *mut pfc_head, values: *const f32, len: u32) -> pfc_status {
    guard(|| {
        let mut h = lock(head)?;
        if values.is_null() && len > 0 {
            return Err(Error::null("values"));
        }
        let values = if len == 0 {
            &[][..]
        } else {
            check_aligned(values, "values")?;
            unsafe { std::slice::from_raw_parts(values, len as usize) }
        };
        h.set_margin_state(values)
    })
}

/// The global classes this process owns: `[*first, *first + *count)`.
#[no_mangle]
pub extern "C" fn pfc_local_classes(head: *const pfc_head, first: *mut u64, count: *mut u64) -> pfc_status {
    guard(|| {
        let h = lock(head)?;
        if first.is_null() {
            return Err(Error::null("first"));
        }
        if count.is_null() {
            return Err(Error::null("count"));
        }
        let (f, c) = h.local_classes();
        unsafe {
            *first = f;
            *count = c;
        }
        Ok(())
    })
}

/// Copies centers of global classes `[first, first + count)` (owned by this process) into `out`
/// (count × embedding_dim floats), L2-normalized when `normalized` is 1. A head storing bf16 gives
/// its stored values exactly (each a bf16 widened to f32: the low 16 bits zero).
#[no_mangle]
pub extern "C" fn pfc_get_centers(head: *const pfc_head, first: u64, count: u64, normalized: i32, out: *mut f32) -> pfc_status {
    guard(|| {
        let h = lock(head)?;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        check_aligned(out.cast_const(), "out")?;
        let normalized = int_bool("normalized", normalized)?;
        let len = center_values(&h, count)?;
        let mut tmp = crate::error::try_zeroed::<f32>(len, "center copy")?;
        h.get_centers(first, count, normalized, &mut tmp)?;
        unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), out, len) };
        Ok(())
    })
}

/// Overwrites centers of global classes `[first, first + count)` from `in` (count × embedding_dim
/// floats, finite) and resets those rows' optimizer state (warm start). A head storing bf16 keeps
/// each value rounded to nearest (ties to even). A row of norm above 2^62 (about 4.6e18; from about
/// 1.8e19 its squared norm overflows f32, so it cannot be normalized), as stored, is refused with
/// PFC_ERR_INVALID_ARGUMENT naming its class. Zero rows are accepted: their cosine with every
/// embedding is 0, as with PyTorch's normalize.
#[no_mangle]
pub extern "C" fn pfc_set_centers(head: *mut pfc_head, first: u64, count: u64, r#in: *const f32) -> pfc_status {
    guard(|| {
        let mut h = lock(head)?;
        if r#in.is_null() {
            return Err(Error::null("in"));
        }
        check_aligned(r#in, "in")?;
        let len = center_values(&h, count)?;
        let values = unsafe { std::slice::from_raw_parts(r#in, len) };
        h.set_centers(first, count, values)
    })
}

fn center_values(h: &Head, count: u64) -> Result<usize> {
    let (_, local) = h.local_classes();
    if count == 0 || count > local {
        return Err(Error::invalid(format!("count = {count} is outside [1, {local}] (this process's classes)")));
    }
    Ok(count as usize * h.config().embedding_dim)
}

/// A C path argument as a filesystem path.
///
/// # Safety
/// `p`, when not NULL, must be a NUL-terminated string.
unsafe fn path_arg<'a>(p: *const c_char, name: &str) -> Result<&'a std::path::Path> {
    use std::os::unix::ffi::OsStrExt;
    if p.is_null() {
        return Err(Error::null(name));
    }
    let bytes = std::ffi::CStr::from_ptr(p).to_bytes();
    if bytes.is_empty() {
        return Err(Error::invalid(format!("{name} is empty")));
    }
    Ok(std::path::Path::new(std::ffi::OsStr::from_bytes(bytes)))
}

/// Writes a checkpoint of the head into directory `dir` (created if missing): a manifest
/// (`manifest.json`, one JSON document with its checksum inside) plus one safetensors file per shard
/// with centers and all optimizer state, in the head's storage dtype (safetensors F32, or BF16 for a
/// head storing bf16; AdamW's step counts U32). The previous checkpoint in `dir` stays loadable until the
/// new one is complete (a crash mid-save loses nothing). One writer per directory: while another head
/// or process saves into `dir` (it holds `dir/.partialfc.lock`), this call fails at once with
/// PFC_ERR_IO and touches nothing. A head whose state a load would refuse is not saved and no file
/// is touched: NaN or Inf values give PFC_ERR_NON_FINITE, a learning rate or step counts out of
/// range PFC_ERR_INVALID_ARGUMENT. A save deletes only files this library wrote there: the replaced checkpoint's and what an
/// interrupted save of this library left. Collective on a multi-process head: every process writes
/// its own shards into `dir` (one directory on a filesystem all processes share); the manifest is
/// published only after every shard file of the job is durable.
#[no_mangle]
pub extern "C" fn pfc_save_checkpoint(head: *const pfc_head, dir: *const c_char) -> pfc_status {
    guard(|| {
        let h = lock(head)?;
        let dir = h.group().agree(unsafe { path_arg(dir, "dir") })?;
        crate::checkpoint::save(&h, dir)
    })
}

/// Restores centers, optimizer state, step, seed and learning rate from the checkpoint in `dir`,
/// whatever shard count wrote it, and whatever storage dtype: a bf16 checkpoint loads into a head
/// storing f32 exactly, an f32 one into a head storing bf16 rounded to nearest (ties to even); values
/// that the rounding takes beyond what the head accepts (an infinity, a center's norm above 2^62)
/// give PFC_ERR_INCOMPATIBLE. Every file is verified first: a truncated, altered or missing file,
/// anything but a regular file (a FIFO, a device), or values the head would refuse give
/// PFC_ERR_CORRUPT; other num_classes, embedding_dim or optimizer, or a checkpoint of another format
/// version (older versions of this library) give PFC_ERR_INCOMPATIBLE; a save in progress in `dir`
/// gives PFC_ERR_IO. Never reads more than the manifest declares. On any failure the head is unchanged.
/// Collective on a multi-process head (each process reads its own classes' rows, whatever layout
/// wrote them); a head refused after a failed exchange between processes is usable again after it.
#[no_mangle]
pub extern "C" fn pfc_load_checkpoint(head: *mut pfc_head, dir: *const c_char) -> pfc_status {
    guard(|| {
        let mut h = lock(head)?;
        crate::checkpoint::load_from(&mut h, unsafe { path_arg(dir, "dir") })
    })
}

/// Writes all C centers to one file at `path`: `format` is a PFC_FORMAT_* value, `dtype`
/// PFC_DTYPE_F32, PFC_DTYPE_F16 or PFC_DTYPE_BF16 (bf16: safetensors only; .fvecs and FAISS: f32
/// only), `normalized` 1 for unit rows. Narrower types hold each value rounded to nearest: a head
/// storing bf16 exports its stored values exactly as PFC_DTYPE_BF16 (unnormalized). Streamed in chunks; the file appears atomically. An f16 export of centers beyond f16's range
/// (±65504) fails with PFC_ERR_INVALID_ARGUMENT and writes nothing: export them normalized or as f32.
/// Collective on a multi-process head: each process writes its classes' rows at their offset into
/// the one file, which appears only once all have written.
#[no_mangle]
pub extern "C" fn pfc_export_centers(head: *const pfc_head, path: *const c_char, format: i32, dtype: i32, normalized: i32) -> pfc_status {
    guard(|| {
        let h = lock(head)?;
        let args = (|| {
            let path = unsafe { path_arg(path, "path") }?;
            let format = match format {
                PFC_FORMAT_SAFETENSORS => crate::export::Format::Safetensors,
                PFC_FORMAT_NPY => crate::export::Format::Npy,
                PFC_FORMAT_FVECS => crate::export::Format::Fvecs,
                PFC_FORMAT_FAISS => crate::export::Format::Faiss,
                v => return Err(Error::invalid(format!("format = {v} is not a PFC_FORMAT_* value"))),
            };
            Ok((path, format, dtype_of("dtype", dtype)?, int_bool("normalized", normalized)?))
        })();
        let (path, format, dtype, normalized) = h.group().agree(args)?;
        crate::export::export_centers(&h, path, format, dtype, normalized)
    })
}

/// The `k` classes with the highest cosine to each of the `n` host queries (n × embedding_dim
/// floats, finite, of any norm: a zero query scores 0 with every class) over all centers of the job:
/// `ids` (n × k int64) and `scores` (n × k floats), each row sorted by score, ties by smaller class id.
/// Collective on a multi-process head: every process passes the same queries (else
/// PFC_ERR_INVALID_ARGUMENT everywhere) and receives the same merged result, equal to a single
/// process's.
#[no_mangle]
pub extern "C" fn pfc_search(head: *const pfc_head, queries: *const f32, n: u64, k: u32, ids: *mut i64, scores: *mut f32) -> pfc_status {
    guard(|| {
        let h = lock(head)?;
        let (d, classes) = (h.config().embedding_dim, h.config().num_classes);
        unsafe { search_into(Some(h.group()), queries, n, k, ids, scores, d, classes, |q, k| h.search(q, k)) }
    })
}

/// The pointer and size checks of `pfc_search` and `pfc_index_search` (agreed by every process of
/// `group`'s job, so that a bad argument on one fails the call on all), then `run` over the queries,
/// its results copied out only when it succeeds.
///
/// # Safety
/// Non-NULL pointers must be valid for `n × dim` queries and `n × k` results.
#[allow(clippy::too_many_arguments)]
unsafe fn search_into(
    group: Option<&ProcessGroup>,
    queries: *const f32,
    n: u64,
    k: u32,
    ids: *mut i64,
    scores: *mut f32,
    dim: usize,
    classes: u64,
    run: impl FnOnce(&[f32], usize) -> Result<(Vec<i64>, Vec<f32>)>,
) -> Result<()> {
    let out = n as usize * k as usize;
    let checked = (|| {
        for (p, name) in [(queries.is_null(), "queries"), (ids.is_null(), "ids"), (scores.is_null(), "scores")] {
            if p {
                return Err(Error::null(name));
            }
        }
        check_aligned(queries, "queries")?;
        check_aligned(ids.cast_const(), "ids")?;
        check_aligned(scores.cast_const(), "scores")?;
        if n == 0 || n > MAX_BATCH_ROWS {
            return Err(Error::invalid(format!("n = {n} is outside [1, {MAX_BATCH_ROWS}]")));
        }
        // k before the overlap check, which trusts n × k: a k beyond the classes is the error to report.
        crate::head::search::check_k(k as u64, classes)?;
        if overlaps((ids as usize, ids as usize + out * 8), (scores as usize, scores as usize + out * 4)) {
            return Err(Error::invalid("ids and scores overlap"));
        }
        Ok(())
    })();
    match group {
        Some(g) => g.agree(checked)?,
        None => checked?,
    }
    let q = std::slice::from_raw_parts(queries, n as usize * dim);
    let (found_ids, found_scores) = run(q, k as usize)?;
    std::ptr::copy_nonoverlapping(found_ids.as_ptr(), ids, out);
    std::ptr::copy_nonoverlapping(found_scores.as_ptr(), scores, out);
    Ok(())
}

/// A search-only index over trained centers: no optimizer state, no configuration. Immutable once
/// open, so any number of threads may search one index at the same time.
#[allow(non_camel_case_types)]
pub struct pfc_index {
    inner: crate::index::Index,
}

fn index_ref<'a>(ix: *const pfc_index) -> Result<&'a pfc_index> {
    // SAFETY: a non-NULL index pointer comes from pfc_index_open and is alive until pfc_index_close.
    unsafe { ix.as_ref() }.ok_or_else(|| Error::null("index"))
}

/// Opens the centers at `path` for search: a file written by `pfc_export_centers` in any
/// PFC_FORMAT_* and dtype (f32, f16, bf16; also such files from numpy or FAISS: a float32/float16
/// [C, d] array, a safetensors tensor `centers`, an `IndexFlatIP`) or a checkpoint directory of
/// either storage dtype (verified as
/// `pfc_load_checkpoint` verifies it). Class ids are row numbers. On success `*out` owns the index
/// (free it with `pfc_index_close`). A damaged or foreign file gives PFC_ERR_CORRUPT, a missing one
/// PFC_ERR_IO, too little memory PFC_ERR_OUT_OF_MEMORY.
#[no_mangle]
pub extern "C" fn pfc_index_open(path: *const c_char, out: *mut *mut pfc_index) -> pfc_status {
    guard(|| {
        let path = unsafe { path_arg(path, "path") }?;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let index = crate::index::Index::open(path)?;
        unsafe { *out = Box::into_raw(Box::new(pfc_index { inner: index })) };
        Ok(())
    })
}

/// The index's class count and embedding dimension.
#[no_mangle]
pub extern "C" fn pfc_index_info(ix: *const pfc_index, num_classes: *mut u64, embedding_dim: *mut u32) -> pfc_status {
    guard(|| {
        let ix = index_ref(ix)?;
        if num_classes.is_null() {
            return Err(Error::null("num_classes"));
        }
        if embedding_dim.is_null() {
            return Err(Error::null("embedding_dim"));
        }
        unsafe {
            *num_classes = ix.inner.classes();
            *embedding_dim = ix.inner.dim() as u32;
        }
        Ok(())
    })
}

/// As `pfc_search`, over the index's centers: the `k` classes with the highest cosine to each of
/// the `n` queries (n × embedding_dim floats), `ids` (n × k int64) and `scores` (n × k floats), each
/// row sorted by score, ties by smaller class id — the same results as `pfc_search` on a head
/// holding these centers.
#[no_mangle]
pub extern "C" fn pfc_index_search(ix: *const pfc_index, queries: *const f32, n: u64, k: u32, ids: *mut i64, scores: *mut f32) -> pfc_status {
    guard(|| {
        let ix = &index_ref(ix)?.inner;
        unsafe { search_into(None, queries, n, k, ids, scores, ix.dim(), ix.classes(), |q, k| ix.search(q, k)) }
    })
}

/// Frees an index. NULL is a no-op.
#[no_mangle]
pub extern "C" fn pfc_index_close(ix: *mut pfc_index) {
    if !ix.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: the pointer came from pfc_index_open and is closed once.
            drop(unsafe { Box::from_raw(ix) });
        }));
    }
}

/// Writes a new NCCL unique id (PFC_NCCL_ID_BYTES bytes) to `out`, for a multi-process run: create
/// it in one process, give it to all (MPI, a file, torchrun's store), pass it as `pfc_config.nccl_id`.
/// PFC_ERR_UNAVAILABLE when NCCL (libnccl.so or libnccl.so.2) cannot be loaded.
#[no_mangle]
pub extern "C" fn pfc_nccl_unique_id(out: *mut u8) -> pfc_status {
    guard(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let id = crate::comm::nccl::nccl()?.unique_id()?;
        // SAFETY: the caller provides PFC_NCCL_ID_BYTES writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(id.internal.as_ptr(), out, PFC_NCCL_ID_BYTES) };
        Ok(())
    })
}

/// Copies the calling thread's last error message into `buf` (at most `cap` bytes, NUL-terminated
/// when `cap` > 0) and returns its full length in bytes, excluding the NUL.
#[no_mangle]
pub extern "C" fn pfc_last_error(buf: *mut c_char, cap: usize) -> usize {
    with_last_error(|msg| {
        if !buf.is_null() && cap > 0 {
            let n = msg.len().min(cap - 1);
            // SAFETY: the caller provides `cap` writable bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(msg.as_ptr().cast::<c_char>(), buf, n);
                *buf.add(n) = 0;
            }
        }
        msg.len()
    })
}

/// The library version, e.g. "0.1.0"; a static string.
#[no_mangle]
pub extern "C" fn pfc_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

