//! `pfc plan`: the memory and the communication of one training step of the classification head, per
//! GPU, for data parallel, model parallel (PartialFC with r = 1) and PartialFC (sampled r), exact to
//! the byte, with centers and optimizer state stored in f32 or bf16 (`--storage`). Nothing is run: the figures follow from the configuration. The model (what is counted
//! and why) is written out in docs/plan.md and printed under the table.

use clap::{Parser, ValueEnum};
use partialfc::sharding::sample_count;
use serde_json::{json, Value};

/// Bytes per element of the logits and of the embeddings' all-gather and gradient reduce-scatter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanDType {
    F32,
    F16,
    Bf16,
}

impl PlanDType {
    fn bytes(self) -> u128 {
        match self {
            PlanDType::F32 => 4,
            PlanDType::F16 | PlanDType::Bf16 => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            PlanDType::F32 => "f32",
            PlanDType::F16 => "f16",
            PlanDType::Bf16 => "bf16",
        }
    }
}

/// How centers and optimizer state are stored (`storage_dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanStorage {
    F32,
    /// bf16 with stochastic rounding: 2 bytes per value.
    Bf16,
}

impl PlanStorage {
    fn bytes(self) -> u128 {
        match self {
            PlanStorage::F32 => 4,
            PlanStorage::Bf16 => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            PlanStorage::F32 => "f32",
            PlanStorage::Bf16 => "bf16",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanOptimizer {
    /// Momentum SGD: one buffer per center, stored as the centers are.
    Sgd,
    /// AdamW: two moments per center, stored as the centers are (and step counts).
    Adamw,
}

/// The margin, for what it exchanges beyond the softmax statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanMargin {
    /// ArcFace, CosFace, SphereFace and their combinations.
    Combined,
    /// AdaFace: its norm statistics come from the gathered batch, so nothing more is sent.
    Adaface,
    /// CurricularFace: each row's target cosine reaches every GPU before the statistics, an
    /// all-reduce MAX of one f32 per sample.
    Curricular,
}

/// The engine holding the shard: what it keeps beside the centers and their state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanEngine {
    /// The CUDA backend: a GPU holds the shard.
    Cuda,
    /// The CPU backend: a process holds the shard, and keeps each state row's f32 norm beside it.
    Cpu,
}

#[derive(Parser, Debug)]
pub struct PlanArgs {
    /// World size: GPUs (shards) in the job.
    #[arg(long, default_value_t = 64)]
    pub gpus: u64,
    /// Images per GPU per step (the local batch B); the global batch is N = gpus × B.
    #[arg(long, default_value_t = 64)]
    pub batch_per_gpu: u64,
    /// Embedding dimension d.
    #[arg(long, default_value_t = 512)]
    pub dim: u64,
    /// Classes C (identities). Accepts 10000000, 10_000_000, 10,000,000 or 10M (k = 10^3, M = 10^6, G = 10^9).
    #[arg(long, default_value = "10M", value_parser = parse_count)]
    pub classes: u64,
    /// Fraction r of each shard's classes sampled per step (PartialFC column); in (0, 1].
    #[arg(long, default_value_t = 0.1)]
    pub sample_rate: f32,
    /// Element type of the logits and of the embeddings' all-gather and gradient reduce-scatter.
    #[arg(long, value_enum, default_value_t = PlanDType::F32)]
    pub dtype: PlanDType,
    /// How centers and optimizer state are stored: f32, or bf16 (2 bytes a value).
    #[arg(long, value_enum, default_value_t = PlanStorage::F32)]
    pub storage: PlanStorage,
    /// The engine holding each shard: cuda (a GPU per shard, the table's usual reading) or cpu
    /// (a process, which also keeps an f32 norm of each optimizer state row).
    #[arg(long, value_enum, default_value_t = PlanEngine::Cuda)]
    pub engine: PlanEngine,
    /// Optimizer whose state lives beside the centers.
    #[arg(long, value_enum, default_value_t = PlanOptimizer::Sgd)]
    pub optimizer: PlanOptimizer,
    /// Margin kind (CurricularFace exchanges every sample's target cosine before the statistics).
    #[arg(long, value_enum, default_value_t = PlanMargin::Combined)]
    pub margin: PlanMargin,
    /// Parameters of the host's backbone: its f32 gradient all-reduce is shown separately, not as the head's.
    #[arg(long, value_parser = parse_count)]
    pub backbone_params: Option<u64>,
    /// Print the figures as one JSON object (exact bytes only) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Human-readable figures in decimal units (kB, MB, GB = 10^9 B) instead of binary ones (KiB, MiB, GiB = 2^30 B).
    #[arg(long)]
    pub si: bool,
}

/// A count such as `10000000`, `10_000_000`, `10,000,000`, `10M` or `2.5k`: an exact whole number.
pub(crate) fn parse_count(text: &str) -> Result<u64, String> {
    let cleaned: String = text.chars().filter(|&c| c != '_' && c != ',').collect();
    let (digits, multiplier): (&str, u128) = match cleaned.chars().last() {
        Some('k' | 'K') => (&cleaned[..cleaned.len() - 1], 1_000),
        Some('m' | 'M') => (&cleaned[..cleaned.len() - 1], 1_000_000),
        Some('g' | 'G') => (&cleaned[..cleaned.len() - 1], 1_000_000_000),
        _ => (&cleaned[..], 1),
    };
    let bad = || format!("'{text}' is not a whole number (examples: 10000000, 10_000_000, 10M)");
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty() || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let mut value: u128 = 0;
    for c in int.chars().chain(frac.chars()) {
        value = value.checked_mul(10).and_then(|v| v.checked_add(u128::from(c as u8 - b'0'))).ok_or_else(bad)?;
    }
    let scale = 10u128.checked_pow(frac.len() as u32).ok_or_else(bad)?;
    let scaled = value.checked_mul(multiplier).ok_or_else(bad)?;
    if scaled % scale != 0 {
        return Err(bad());
    }
    u64::try_from(scaled / scale).map_err(|_| bad())
}

/// Bytes one GPU sends in a ring all-reduce of `elems` elements of `size` bytes: a reduce-scatter and
/// an all-gather, in each of which a GPU sends every chunk but one. The buffer is cut into `s` chunks
/// of ⌊L/S⌋ or ⌈L/S⌉ elements; the busiest GPU leaves out a smallest one: 2·(L − ⌊L/S⌋) elements,
/// which is 2(S−1)/S·L when S divides L.
fn ring_all_reduce(elems: u128, size: u128, s: u128) -> u128 {
    2 * (elems - elems / s) * size
}

/// Bytes one GPU sends in a ring all-gather (or reduce-scatter) whose per-GPU chunk is `chunk_bytes`:
/// S − 1 chunks, (S−1)/S of the whole.
fn ring_chunks(chunk_bytes: u128, s: u128) -> u128 {
    (s - 1) * chunk_bytes
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    DataParallel,
    ModelParallel,
    PartialFc,
}

/// One column of the table: per GPU, per step, in bytes.
struct Column {
    strategy: Strategy,
    /// Centers held by the busiest GPU.
    classes: u128,
    /// Logit columns per GPU (all of C for data parallel, n for model parallel, k for PartialFC).
    logit_columns: u128,
    /// Logit rows per GPU (B for data parallel, N otherwise).
    logit_rows: u128,
    centers: u128,
    optimizer: u128,
    /// The engine's f32 norm of each optimizer state row (none in data parallel).
    row_norms: u128,
    center_gradients: u128,
    logits: u128,
    embedding_all_gather: u128,
    label_all_gather: u128,
    softmax_statistics: u128,
    gradient: u128,
}

impl Column {
    fn memory_total(&self) -> u128 {
        self.centers + self.optimizer + self.row_norms + self.center_gradients + self.logits
    }

    fn communication_total(&self) -> u128 {
        self.embedding_all_gather + self.label_all_gather + self.softmax_statistics + self.gradient
    }

    fn key(&self) -> &'static str {
        match self.strategy {
            Strategy::DataParallel => "data_parallel",
            Strategy::ModelParallel => "model_parallel",
            Strategy::PartialFc => "partial_fc",
        }
    }
}

/// Everything `pfc plan` prints, computed from validated arguments.
struct Plan {
    s: u128,
    b: u128,
    n: u128,
    d: u128,
    c: u128,
    e: u128,
    /// Bytes per stored value of the centers and optimizer state.
    st: u128,
    /// Classes of the largest shard, C/S + (C%S ≠ 0), and of the smallest, C/S.
    n_max: u128,
    n_min: u128,
    /// k = floor(r · n_max), as the engine computes it.
    k: u128,
    /// f32 values per step in the margin's exchange before the statistics (CurricularFace: N).
    target_exchange: u128,
    columns: [Column; 3],
    backbone: Option<(u128, u128)>,
}

fn validate(a: &PlanArgs) -> Result<(), String> {
    if a.gpus == 0 {
        return Err("--gpus 0: the world size must be at least 1 GPU".into());
    }
    if a.batch_per_gpu == 0 {
        return Err("--batch-per-gpu 0: every GPU needs at least 1 image per step".into());
    }
    if a.dim == 0 {
        return Err("--dim 0: the embedding dimension must be at least 1".into());
    }
    if a.classes == 0 {
        return Err("--classes 0: there must be at least 1 class".into());
    }
    if a.classes < a.gpus {
        return Err(format!("--classes {} is smaller than --gpus {}: every GPU needs at least one class", a.classes, a.gpus));
    }
    if !(a.sample_rate.is_finite() && a.sample_rate > 0.0 && a.sample_rate <= 1.0) {
        return Err(format!("--sample-rate {}: the sample rate must be in (0, 1]", a.sample_rate));
    }
    Ok(())
}

fn compute(a: &PlanArgs) -> Result<Plan, String> {
    validate(a)?;
    let (s, b, d, c, e, st) = (a.gpus as u128, a.batch_per_gpu as u128, a.dim as u128, a.classes as u128, a.dtype.bytes(), a.storage.bytes());
    let n = s * b;
    let n_min = c / s;
    let n_max = n_min + u128::from(c % s != 0);
    let k = sample_count(a.sample_rate, n_max as u64) as u128;
    let target_exchange = if a.margin == PlanMargin::Curricular { n } else { 0 };
    // Optimizer state of `rows` centers, stored as the centers are. The engine's sparse AdamW keeps a
    // u32 step count per row (bias correction per row); a dense framework optimizer keeps one 4-byte
    // step for the tensor.
    let optimizer = |rows: u128, dense: bool| match a.optimizer {
        PlanOptimizer::Sgd => rows * d * st,
        PlanOptimizer::Adamw => 2 * rows * d * st + if dense { 4 } else { rows * 4 },
    };
    // Beside each state row the CPU engine keeps its f32 norm (src/backend/cpu/optimizer.rs), with
    // which the check before an update proves most updates finite without reading the rows; the
    // CUDA engine checks on the device and keeps none.
    let row_norms = |rows: u128| match (a.engine, a.optimizer) {
        (PlanEngine::Cuda, _) => 0,
        (PlanEngine::Cpu, PlanOptimizer::Sgd) => rows * 4,
        (PlanEngine::Cpu, PlanOptimizer::Adamw) => 2 * rows * 4,
    };
    let data_parallel = Column {
        strategy: Strategy::DataParallel,
        classes: c,
        logit_columns: c,
        logit_rows: b,
        centers: c * d * st,
        optimizer: optimizer(c, true),
        row_norms: 0,
        // A framework's gradients take their parameters' dtype.
        center_gradients: c * d * st,
        logits: b * c * e,
        embedding_all_gather: 0,
        label_all_gather: 0,
        softmax_statistics: 0,
        gradient: ring_all_reduce(c * d, st, s),
    };
    let sharded = |strategy: Strategy, columns: u128| Column {
        strategy,
        classes: n_max,
        logit_columns: columns,
        logit_rows: n,
        centers: n_max * d * st,
        optimizer: optimizer(n_max, false),
        row_norms: row_norms(n_max),
        center_gradients: 0,
        logits: n * columns * e,
        embedding_all_gather: ring_chunks(b * d * e, s),
        // i64 labels, then the u64 batch size of every GPU (batches may differ between GPUs).
        label_all_gather: ring_chunks(b * 8, s) + ring_chunks(8, s),
        // MAX of (row max, best non-target cosine, target cosine), SUM of (Σ exp, non-target Σ exp,
        // target logit), f32; CurricularFace's MAX of target cosines before them.
        softmax_statistics: ring_all_reduce(3 * n, 4, s) + ring_all_reduce(3 * n, 4, s) + ring_all_reduce(target_exchange, 4, s),
        gradient: ring_chunks(b * d * e, s),
    };
    let columns = [data_parallel, sharded(Strategy::ModelParallel, n_max), sharded(Strategy::PartialFc, k)];
    let backbone = a.backbone_params.map(|p| {
        let p = p as u128;
        (p * 4, ring_all_reduce(p, 4, s))
    });
    let largest = columns
        .iter()
        .flat_map(|col| [col.memory_total(), col.communication_total(), col.logit_rows * col.logit_columns])
        .chain(backbone.map(|(payload, sent)| payload.max(sent)))
        .max()
        .unwrap_or(0);
    if largest > u64::MAX as u128 {
        return Err(format!("this configuration's figures exceed 2^64 bytes ({largest} B): not a plan for one job"));
    }
    Ok(Plan { s, b, n, d, c, e, st, n_max, n_min, k, target_exchange, columns, backbone })
}

/// Digits in groups of three: 20,480,000,000.
fn grouped(v: u128) -> String {
    let digits = v.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Bytes in binary (KiB, MiB, GiB: powers of 1024) or decimal (kB, MB, GB: powers of 1000) units.
fn human(bytes: u128, si: bool) -> String {
    let (base, units) = if si {
        (1000f64, ["B", "kB", "MB", "GB", "TB", "PB", "EB"])
    } else {
        (1024f64, ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"])
    };
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= base && unit + 1 < units.len() {
        value /= base;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", units[unit])
    }
}

fn cell(bytes: u128, si: bool) -> String {
    if bytes < 1000 {
        format!("{bytes} B")
    } else {
        format!("{} B ({})", grouped(bytes), human(bytes, si))
    }
}

fn to_json(a: &PlanArgs, p: &Plan) -> Value {
    // Every figure fits in u64: compute() checked the largest.
    let u = |v: u128| v as u64;
    let column = |col: &Column| {
        json!({
            "classes_per_gpu": u(col.classes),
            "logit_rows": u(col.logit_rows),
            "logit_columns": u(col.logit_columns),
            "memory": {
                "centers": u(col.centers),
                "optimizer_state": u(col.optimizer),
                "row_norms": u(col.row_norms),
                "center_gradients": u(col.center_gradients),
                "logits": u(col.logits),
                "total": u(col.memory_total()),
            },
            "communication": {
                "embedding_all_gather": u(col.embedding_all_gather),
                "label_all_gather": u(col.label_all_gather),
                "softmax_statistics": u(col.softmax_statistics),
                "gradient": u(col.gradient),
                "total": u(col.communication_total()),
            },
        })
    };
    let bound = p.k.max(p.n.min(p.n_max));
    let mut out = json!({
        "config": {
            "gpus": a.gpus,
            "batch_per_gpu": a.batch_per_gpu,
            "global_batch": u(p.n),
            "dim": a.dim,
            "classes": a.classes,
            // The decimal the user wrote (0.1), not the f32 widened (0.10000000149011612).
            "sample_rate": a.sample_rate.to_string().parse::<f64>().unwrap_or(a.sample_rate as f64),
            "dtype": a.dtype.name(),
            "dtype_bytes": u(p.e),
            "storage": a.storage.name(),
            "storage_bytes": u(p.st),
            "engine": match a.engine { PlanEngine::Cuda => "cuda", PlanEngine::Cpu => "cpu" },
            "optimizer": match a.optimizer { PlanOptimizer::Sgd => "sgd", PlanOptimizer::Adamw => "adamw" },
            "margin": match a.margin { PlanMargin::Combined => "combined", PlanMargin::Adaface => "adaface", PlanMargin::Curricular => "curricular" },
            "backbone_params": a.backbone_params,
        },
        "sharding": {
            "classes_per_gpu_max": u(p.n_max),
            "classes_per_gpu_min": u(p.n_min),
            "gpus_with_max": u(if p.c.is_multiple_of(p.s) { p.s } else { p.c % p.s }),
            "sampled_per_gpu": u(p.k),
            "sampled_per_gpu_bound": u(bound),
        },
        "payload": {
            "embedding_all_gather": u(p.n * p.d * p.e),
            "label_all_gather": u(p.n * 8 + p.s * 8),
            "softmax_max_all_reduce": u(3 * p.n * 4),
            "softmax_sum_all_reduce": u(3 * p.n * 4),
            "target_cosine_all_reduce": u(p.target_exchange * 4),
            "embedding_gradient_reduce_scatter": u(p.n * p.d * p.e),
            "center_gradient_all_reduce": u(p.c * p.d * p.st),
        },
        "backbone": p.backbone.map(|(payload, sent)| json!({
            "params": a.backbone_params,
            "gradient_bytes": u(payload),
            "all_reduce_sent": u(sent),
        })),
        "units": "bytes; memory per GPU; communication = bytes each GPU sends per step with ring collectives",
    });
    for col in &p.columns {
        out[col.key()] = column(col);
    }
    out
}

fn print_table(a: &PlanArgs, p: &Plan) {
    let si = a.si;
    let g = |v: u128| grouped(v);
    let e = p.e;
    let dt = a.dtype.name();
    let (st, sn) = (p.st, a.storage.name());
    println!("pfc plan: one training step of the classification head, per GPU");
    println!(
        "  S = {} GPUs x B = {} images (N = {} per step), d = {}, C = {}, r = {}, {dt} logits and embeddings ({e} B), {sn} storage of centers and optimizer state ({st} B), {} optimizer",
        g(p.s),
        g(p.b),
        g(p.n),
        g(p.d),
        g(p.c),
        a.sample_rate,
        match a.optimizer {
            PlanOptimizer::Sgd => "SGD (momentum)",
            PlanOptimizer::Adamw => "AdamW",
        }
    );
    let rem = p.c % p.s;
    if rem == 0 {
        println!("  classes per GPU: n = C/S = {} on every GPU", g(p.n_max));
    } else {
        println!(
            "  classes per GPU: uneven, C mod S = {rem}: n = {} on {rem} GPUs, {} on the others; figures are the largest shard's",
            g(p.n_max),
            g(p.n_min)
        );
    }
    println!("  sampled per GPU (PartialFC): k = floor(r x n) = floor({} x {}) = {}", a.sample_rate, g(p.n_max), g(p.k));
    let bound = p.k.max(p.n.min(p.n_max));
    if bound > p.k {
        println!(
            "  (a shard always keeps the batch's positives: with more than k distinct labels on one shard it samples up to min(N, n) = {}, logits up to {})",
            g(bound),
            cell(p.n * bound * e, si).trim_end()
        );
    }
    println!(
        "  units: exact bytes, then {}",
        if si {
            "decimal units: 1 kB = 10^3 B, 1 MB = 10^6 B, 1 GB = 10^9 B (= 0.931 GiB)"
        } else {
            "binary units: 1 KiB = 2^10 B, 1 MiB = 2^20 B, 1 GiB = 2^30 B (= 1.073741824 GB; --si for GB = 10^9 B)"
        }
    );
    println!();

    let [dp, mp, pfc] = &p.columns;
    let header =
        ["data parallel".to_string(), "model parallel (r = 1)".to_string(), format!("PartialFC (r = {})", a.sample_rate)];
    let line = |label: &str, f: &dyn Fn(&Column) -> u128| {
        println!("{label:<30}{:>32}{:>32}{:>32}", cell(f(dp), si), cell(f(mp), si), cell(f(pfc), si));
    };
    println!("{:<30}{:>32}{:>32}{:>32}", "", header[0], header[1], header[2]);
    println!("memory per GPU");
    println!("{:<30}{:>32}{:>32}{:>32}", "  classes held", g(dp.classes), g(mp.classes), g(pfc.classes));
    line(&format!("  centers ({sn})"), &|c| c.centers);
    line(
        match a.optimizer {
            PlanOptimizer::Sgd => "  optimizer (SGD momentum)",
            PlanOptimizer::Adamw => "  optimizer (AdamW)",
        },
        &|c| c.optimizer,
    );
    line("  state row norms (f32)", &|c| c.row_norms);
    line("  center gradients", &|c| c.center_gradients);
    println!(
        "{:<30}{:>32}{:>32}{:>32}",
        "  logits shape",
        format!("{} x {}", g(dp.logit_rows), g(dp.logit_columns)),
        format!("{} x {}", g(mp.logit_rows), g(mp.logit_columns)),
        format!("{} x {}", g(pfc.logit_rows), g(pfc.logit_columns))
    );
    line(&format!("  logits ({dt})"), &|c| c.logits);
    line("  total memory", &|c| c.memory_total());
    println!("communication per GPU per step (bytes sent)");
    line("  embedding all-gather", &|c| c.embedding_all_gather);
    line("  label all-gather", &|c| c.label_all_gather);
    line("  softmax statistics", &|c| c.softmax_statistics);
    line("  gradient", &|c| c.gradient);
    line("  total communication", &|c| c.communication_total());
    if let Some((payload, sent)) = p.backbone {
        println!("host backbone, not the head's (the same in every column)");
        println!("{:<30}{:>32}{:>32}{:>32}", "  gradient (f32)", cell(payload, si), cell(payload, si), cell(payload, si));
        println!("{:<30}{:>32}{:>32}{:>32}", "  gradient all-reduce", cell(sent, si), cell(sent, si), cell(sent, si));
        line("  step total, head + backbone", &|c| c.communication_total() + sent);
    }
    println!();

    let s1 = p.s - 1;
    println!("How each row is counted (n = classes on the largest shard, k = sampled of them; all per GPU):");
    println!(
        "  centers            rows x d x {st} B ({sn} master copies): DP {} x {} x {st}, MP and PFC {} x {} x {st}",
        g(p.c),
        g(p.d),
        g(p.n_max),
        g(p.d)
    );
    match a.optimizer {
        PlanOptimizer::Sgd => println!("  optimizer          SGD momentum: one {sn} per center element, as the centers"),
        PlanOptimizer::Adamw => println!(
            "  optimizer          AdamW: two {sn} moments per center element; MP/PFC add a u32 step count per row (sparse updates), DP one 4-byte step"
        ),
    }
    match a.engine {
        PlanEngine::Cpu => println!(
            "  state row norms    MP/PFC: the CPU engine's f32 norm of each optimizer state row ({} per row), which proves most updates finite without reading the rows; DP: none",
            match a.optimizer {
                PlanOptimizer::Sgd => "one, 4 B",
                PlanOptimizer::Adamw => "two, 8 B",
            }
        ),
        PlanEngine::Cuda => println!("  state row norms    none: the CUDA engine checks each update on the device (--engine cpu counts the CPU engine's)"),
    }
    println!("  center gradients   DP: the dense C x d gradient that DDP all-reduces ({sn}, the parameters' dtype); MP/PFC: none, the engine fuses each sampled row's gradient into its update");
    println!(
        "  logits             DP: B x C (the local batch against every class); MP: N x n; PFC: N x k; {e} B each ({dt}); one matrix, no softmax copy"
    );
    println!(
        "  embedding gather   MP/PFC: N x d x {e} B = {} B gathered; each GPU sends (S-1)/S of it, (S-1) x B x d x {e} = {} B",
        g(p.n * p.d * e),
        g(s1 * p.b * p.d * e)
    );
    println!(
        "  label gather       MP/PFC: N x 8 B (i64 labels) + S x 8 B (u64 batch sizes) = {} B gathered; sent (S-1) x (B + 1) x 8 = {} B",
        g(p.n * 8 + p.s * 8),
        g(s1 * (p.b + 1) * 8)
    );
    println!(
        "  softmax stats      MP/PFC: all-reduce MAX of 3 f32 per sample (row max, best non-target cosine, target cosine) = {} B",
        g(3 * p.n * 4)
    );
    println!(
        "                     + all-reduce SUM of 3 f32 per sample (sum of exp, non-target sum of exp, target logit) = {} B; {} B of statistics, sent 2(S-1)/S",
        g(3 * p.n * 4),
        g(6 * p.n * 4)
    );
    if p.target_exchange > 0 {
        println!(
            "                     + CurricularFace, before them: all-reduce MAX of 1 f32 per sample (its target cosine, which only its class's GPU computes) = {} B, sent 2(S-1)/S",
            g(p.target_exchange * 4)
        );
    }
    println!("  gradient           DP: all-reduce of the C x d {sn} center gradient = {} B, sent 2(S-1)/S;", g(p.c * p.d * st));
    println!("                     MP/PFC: reduce-scatter of the N x d embedding gradient ({dt}) = {} B, sent (S-1)/S; center gradients stay local", g(p.n * p.d * e));
    println!("  DP needs no all-gather and no softmax statistics: every GPU holds every class");
    if let Some((payload, _)) = p.backbone {
        println!(
            "  backbone           {} parameters x 4 B = {} B of f32 gradients, all-reduced by the host (DDP), sent 2(S-1)/S",
            g(a.backbone_params.unwrap_or(0) as u128),
            g(payload)
        );
    }
    println!();
    println!("Communication counts the bytes each GPU sends (and receives) with ring algorithms:");
    println!("  all-gather (S-1)/S x the gathered total; reduce-scatter (S-1)/S x the buffer; all-reduce 2(S-1)/S x the buffer.");
    println!("  When S does not divide a buffer of L elements, the busiest GPU's share: 2 x (L - floor(L/S)) elements for an all-reduce.");
    println!("  NCCL may pick tree or other algorithms; S = 1 sends nothing.");
    println!("Throughput is not computed: it depends on the GPUs, the backbone and the kernels (time steps with `pfc bench`).");
}

pub fn run(a: PlanArgs) -> Result<(), String> {
    let plan = compute(&a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&a, &plan)).map_err(|e| e.to_string())?);
    } else {
        print_table(&a, &plan);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse() {
        assert_eq!(parse_count("10M"), Ok(10_000_000));
        assert_eq!(parse_count("10_000_000"), Ok(10_000_000));
        assert_eq!(parse_count("10,000,000"), Ok(10_000_000));
        assert_eq!(parse_count("2.5k"), Ok(2_500));
        assert_eq!(parse_count("65.2M"), Ok(65_200_000));
        assert!(parse_count("2.5").is_err());
        assert!(parse_count("M").is_err());
        assert!(parse_count("-3").is_err());
        assert!(parse_count("ten").is_err());
    }

    #[test]
    fn ring_figures() {
        assert_eq!(ring_all_reduce(64, 4, 64), 2 * 63 * 4);
        assert_eq!(ring_all_reduce(65, 1, 64), 2 * 64);
        assert_eq!(ring_all_reduce(100, 4, 1), 0);
        assert_eq!(ring_chunks(10, 1), 0);
        assert_eq!(grouped(20_480_000_000), "20,480,000,000");
        assert_eq!(grouped(999), "999");
        assert_eq!(human(20_480_000_000, false), "19.07 GiB");
        assert_eq!(human(20_480_000_000, true), "20.48 GB");
    }
}
