//! The validated configuration of a head. The C ABI converts `pfc_config` into this; everything past
//! this module may assume the invariants checked here.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// How a value computed in f32 becomes a stored bf16 one (`storage_dtype` bf16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Up with probability equal to the discarded fraction (`crate::storage`): unbiased, so an
    /// update below bf16's spacing still moves a center on average. What the C ABI gives.
    Stochastic,
    /// To nearest, ties to even: the bias stochastic rounding removes, kept for experiments
    /// (`pfc train --storage bf16-nearest`).
    Nearest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    AdamW,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarginGrad {
    /// `∂z/∂c = s` for every column, the target included (the reference's behaviour).
    StraightThrough,
    /// The true derivative of the margin function.
    Exact,
}

/// The combined margin `s·(cos(m1·θ + m2) − m3)` on the target, `s·c` elsewhere.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MarginConfig {
    /// Which margin the target logit takes (SPEC §1.6, §1.6a); `m1`..`arcface_fallback` are the
    /// combined margin's.
    pub kind: MarginKind,
    pub scale: f32,
    pub m1: f32,
    pub m2: f32,
    pub m3: f32,
    /// Non-target cosines above this are zeroed and get no gradient; 0 disables the filter.
    pub interclass_filter: f32,
    pub grad: MarginGrad,
    pub arcface_fallback: bool,
}

impl MarginConfig {
    /// An adaptive kind's parameters in range, and the combined margin's options at their defaults
    /// beside it (they mean nothing there).
    fn check_kind(&self) -> Result<()> {
        let kind = match self.kind {
            MarginKind::Combined => return Ok(()),
            MarginKind::AdaFace { m, h, t_alpha } => {
                finite_in("margin_m", m, 0.0, 1.5)?;
                check(h.is_finite() && h > 0.0 && h <= 10.0, || format!("adaface_h = {h} is outside (0, 10]"))?;
                check(t_alpha.is_finite() && t_alpha > 0.0 && t_alpha <= 1.0, || format!("adaface_t_alpha = {t_alpha} is outside (0, 1]"))?;
                "PFC_MARGIN_ADAFACE"
            }
            MarginKind::Curricular { m } => {
                finite_in("margin_m", m, 0.0, 1.5)?;
                "PFC_MARGIN_CURRICULAR"
            }
        };
        let d = Config::default().margin;
        let combined = [
            ("m1", self.m1 == d.m1, self.m1.to_string(), d.m1.to_string()),
            ("m2", self.m2 == d.m2, self.m2.to_string(), d.m2.to_string()),
            ("m3", self.m3 == d.m3, self.m3.to_string(), d.m3.to_string()),
            ("interclass_filter", self.interclass_filter == d.interclass_filter, self.interclass_filter.to_string(), d.interclass_filter.to_string()),
            ("margin_grad", self.grad == d.grad, format!("{:?}", self.grad), format!("{:?}", d.grad)),
            ("arcface_fallback", self.arcface_fallback == d.arcface_fallback, u8::from(self.arcface_fallback).to_string(), u8::from(d.arcface_fallback).to_string()),
        ];
        match combined.iter().find(|(_, default, _, _)| !default) {
            Some((field, _, value, default)) => Err(Error::invalid(format!(
                "{field} = {value} applies to the combined margin only, not to margin_kind {kind}: leave it at its default {default}"
            ))),
            None => Ok(()),
        }
    }
}

/// The margin kinds of SPEC §1.6 and §1.6a.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MarginKind {
    /// `s·(cos(m1·θ + m2) − m3)` on the target (ArcFace, CosFace, SphereFace).
    Combined,
    /// AdaFace: the margin adapts to each sample's embedding norm (m, h, and the weight t_alpha of
    /// the newest batch in the running norm statistics).
    AdaFace { m: f32, h: f32, t_alpha: f32 },
    /// CurricularFace: hard negatives reweighted by a running curriculum parameter (m).
    Curricular { m: f32 },
}

impl MarginKind {
    /// AdaFace with its authors' m and h, and a running-statistics weight of 0.01.
    pub const ADAFACE: MarginKind = MarginKind::AdaFace { m: 0.4, h: 0.333, t_alpha: 0.01 };
    /// CurricularFace's authors' m.
    pub const CURRICULAR_M: f32 = 0.5;

    /// The adaptive kinds' m (0 for the combined margin).
    pub fn m(self) -> f32 {
        match self {
            MarginKind::Combined => 0.0,
            MarginKind::AdaFace { m, .. } | MarginKind::Curricular { m } => m,
        }
    }

    /// Whether each row's target cosine must reach every shard before any shard's statistics
    /// (CurricularFace: its hard negatives are those above cos(θ_y + m)).
    pub fn needs_target_cosines(self) -> bool {
        matches!(self, MarginKind::Curricular { .. })
    }

    /// AdaFace's (h, t_alpha).
    pub fn adaface(self) -> Option<(f32, f32)> {
        match self {
            MarginKind::AdaFace { h, t_alpha, .. } => Some((h, t_alpha)),
            _ => None,
        }
    }

    /// `PFC_MARGIN_*`.
    pub fn code(self) -> u64 {
        match self {
            MarginKind::Combined => 0,
            MarginKind::AdaFace { .. } => 1,
            MarginKind::Curricular { .. } => 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub num_classes: u64,
    pub embedding_dim: usize,
    pub sample_rate: f32,
    pub margin: MarginConfig,
    pub optimizer: OptimizerConfig,
    pub compute_dtype: DType,
    /// Centers and optimizer state: F32 or BF16 (SPEC §2), and how updates are rounded into bf16.
    pub storage_dtype: DType,
    pub storage_rounding: Rounding,
    pub seed: u64,
    pub init_std: f32,
    pub backend: BackendKind,
    pub local_shards: usize,
    pub devices: Vec<i32>,
    /// Shards over all processes, and the global rank of this process's first shard: derived from
    /// every process's `local_shards` when the head is created (SPEC §2a).
    pub world_size: usize,
    pub first_rank: usize,
    /// An NCCL unique id the host distributed (the CUDA backend's job without a process group).
    pub nccl_id: Option<Vec<u8>>,
    /// Processes in the job and this one's place among them.
    pub process_count: usize,
    pub process_index: usize,
}

/// Largest embedding dimension accepted; far above any face model, small enough that `N·d` and
/// `C·d` products are checked rather than trusted.
pub(crate) const MAX_EMBEDDING_DIM: usize = 1 << 16;
/// Largest number of classes accepted (labels are `int64`).
pub(crate) const MAX_CLASSES: u64 = 1 << 40;
/// Upper bound on scale, learning rate, weight decay and init_std: far above any useful value, low
/// enough that squares and products of centers stay finite in f32.
pub(crate) const MAX_HYPERPARAMETER: f32 = 1e4;
/// Shards one process may drive.
pub(crate) const MAX_LOCAL_SHARDS: usize = 64;

impl Default for Config {
    /// The reference's defaults (SPEC §1): s = 64, ArcFace m2 = 0.5, full softmax, SGD 0.1/0.9/5e-4.
    fn default() -> Self {
        Config {
            num_classes: 0,
            embedding_dim: 0,
            sample_rate: 1.0,
            margin: MarginConfig {
                kind: MarginKind::Combined,
                scale: 64.0,
                m1: 1.0,
                m2: 0.5,
                m3: 0.0,
                interclass_filter: 0.0,
                grad: MarginGrad::StraightThrough,
                arcface_fallback: false,
            },
            optimizer: OptimizerConfig {
                kind: OptimizerKind::Sgd,
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 5e-4,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            compute_dtype: DType::F32,
            storage_dtype: DType::F32,
            storage_rounding: Rounding::Stochastic,
            seed: 0,
            init_std: 0.01,
            backend: BackendKind::Cpu,
            local_shards: 1,
            devices: Vec::new(),
            world_size: 1,
            first_rank: 0,
            nccl_id: None,
            process_count: 1,
            process_index: 0,
        }
    }
}

fn check(ok: bool, message: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(message()))
    }
}

pub(crate) fn finite_in(name: &str, v: f32, lo: f32, hi: f32) -> Result<()> {
    check(v.is_finite() && v >= lo && v <= hi, || format!("{name} = {v} is outside [{lo}, {hi}]"))
}

/// Most training steps a head takes: AdamW raises its betas to a row's step count as an `i32`
/// exponent, and a row's count never exceeds the head's.
pub(crate) const MAX_STEPS: u64 = i32::MAX as u64;

/// The learning rates a head accepts, wherever one enters: `pfc_create`, `pfc_set_learning_rate`,
/// a checkpoint.
pub(crate) fn check_learning_rate(lr: f32) -> Result<()> {
    finite_in("lr (learning rate)", lr, 0.0, MAX_HYPERPARAMETER)
}

/// A training position a head can be in: `step` steps taken (at most `MAX_STEPS`), and AdamW rows
/// updated `row_steps` times each, never more often than the head stepped.
pub(crate) fn check_steps(step: u64, row_steps: &[u32]) -> Result<()> {
    check(step <= MAX_STEPS, || format!("step count {step} exceeds {MAX_STEPS}"))?;
    match row_steps.iter().position(|&t| t as u64 > step) {
        Some(i) => Err(Error::invalid(format!("row {i} was updated {} times in {step} steps", row_steps[i]))),
        None => Ok(()),
    }
}

impl Config {
    /// Checks every field; a config that passes can build a head (memory permitting).
    pub fn validate(&self) -> Result<()> {
        check(self.num_classes >= 1 && self.num_classes <= MAX_CLASSES, || {
            format!("num_classes = {} is outside [1, {MAX_CLASSES}]", self.num_classes)
        })?;
        check(self.embedding_dim >= 1 && self.embedding_dim <= MAX_EMBEDDING_DIM, || {
            format!("embedding_dim = {} is outside [1, {MAX_EMBEDDING_DIM}]", self.embedding_dim)
        })?;
        check(self.sample_rate > 0.0 && self.sample_rate <= 1.0, || {
            format!("sample_rate = {} is outside (0, 1]", self.sample_rate)
        })?;
        let m = &self.margin;
        check(m.scale.is_finite() && m.scale > 0.0 && m.scale <= MAX_HYPERPARAMETER, || {
            format!("scale = {} is outside (0, {MAX_HYPERPARAMETER}]", m.scale)
        })?;
        finite_in("m1", m.m1, 0.0, 100.0)?;
        finite_in("m2", m.m2, -std::f32::consts::PI, std::f32::consts::PI)?;
        finite_in("m3", m.m3, -2.0, 2.0)?;
        check(m.interclass_filter.is_finite() && m.interclass_filter >= 0.0 && m.interclass_filter < 1.0, || {
            format!("interclass_filter = {} is outside [0, 1) (0 disables it)", m.interclass_filter)
        })?;
        m.check_kind()?;
        let o = &self.optimizer;
        check_learning_rate(o.lr)?;
        finite_in("weight_decay", o.weight_decay, 0.0, MAX_HYPERPARAMETER)?;
        match o.kind {
            OptimizerKind::Sgd => finite_in("momentum", o.momentum, 0.0, 1.0)?,
            OptimizerKind::AdamW => {
                check(o.beta1.is_finite() && (0.0..1.0).contains(&o.beta1), || {
                    format!("beta1 = {} is outside [0, 1)", o.beta1)
                })?;
                check(o.beta2.is_finite() && (0.0..1.0).contains(&o.beta2), || {
                    format!("beta2 = {} is outside [0, 1)", o.beta2)
                })?;
                check(o.eps.is_finite() && o.eps > 0.0, || format!("eps = {} must be finite and > 0", o.eps))?;
            }
        }
        finite_in("init_std", self.init_std, 0.0, MAX_HYPERPARAMETER)?;
        check(self.storage_dtype != DType::F16, || {
            "storage_dtype = PFC_DTYPE_F16 is not offered: f16's range (6e-8 to 65504) does not hold a momentum or second moment; use PFC_DTYPE_BF16".into()
        })?;
        check(self.local_shards >= 1 && self.local_shards <= MAX_LOCAL_SHARDS, || {
            format!("local_shards = {} is outside [1, {MAX_LOCAL_SHARDS}]", self.local_shards)
        })?;
        check(self.world_size >= self.local_shards, || {
            format!("world_size = {} is smaller than local_shards = {}", self.world_size, self.local_shards)
        })?;
        check(self.first_rank + self.local_shards <= self.world_size, || {
            format!(
                "first_rank = {} with local_shards = {} exceeds world_size = {}",
                self.first_rank, self.local_shards, self.world_size
            )
        })?;
        check(self.num_classes >= self.world_size as u64, || {
            format!("num_classes = {} is smaller than world_size = {}: every shard needs a class", self.num_classes, self.world_size)
        })?;
        check(self.process_count >= 1 && self.process_index < self.process_count, || {
            format!("process_index = {} is outside [0, process_count = {})", self.process_index, self.process_count)
        })?;
        check(self.devices.is_empty() || self.devices.len() == self.local_shards, || {
            format!("devices lists {} ordinals for {} local shards", self.devices.len(), self.local_shards)
        })?;
        Ok(())
    }
}

impl Config {
    /// The fields every process of a job must agree on (SPEC §2a: all but `local_shards`,
    /// `devices`, `process_index` and the callback), each as 8 bytes, for the check at creation.
    pub(crate) fn consensus_fields(&self) -> Vec<(&'static str, u64)> {
        let (m, o) = (&self.margin, &self.optimizer);
        let f = |v: f32| u64::from(v.to_bits());
        vec![
            ("num_classes", self.num_classes),
            ("embedding_dim", self.embedding_dim as u64),
            ("sample_rate", f(self.sample_rate)),
            ("scale", f(m.scale)),
            ("m1", f(m.m1)),
            ("m2", f(m.m2)),
            ("m3", f(m.m3)),
            ("interclass_filter", f(m.interclass_filter)),
            ("margin_grad", m.grad as u64),
            ("arcface_fallback", u64::from(m.arcface_fallback)),
            ("margin_kind", m.kind.code()),
            ("margin_m", f(m.kind.m())),
            ("adaface_h", f(m.kind.adaface().map_or(0.0, |a| a.0))),
            ("adaface_t_alpha", f(m.kind.adaface().map_or(0.0, |a| a.1))),
            ("optimizer", o.kind as u64),
            ("lr", f(o.lr)),
            ("momentum", f(o.momentum)),
            ("weight_decay", f(o.weight_decay)),
            ("beta1", f(o.beta1)),
            ("beta2", f(o.beta2)),
            ("eps", f(o.eps)),
            ("compute_dtype", self.compute_dtype as u64),
            ("storage_dtype", self.storage_dtype as u64),
            ("storage_rounding", self.storage_rounding as u64),
            ("seed", self.seed),
            ("init_std", f(self.init_std)),
            ("backend", self.backend as u64),
            ("process_count", self.process_count as u64),
        ]
    }

    /// The checks that need no other process: everything but the job's shard layout.
    pub(crate) fn validate_local(&self) -> Result<()> {
        let layout = Config { world_size: self.local_shards, first_rank: 0, ..self.clone() };
        layout.validate()
    }
}
