//! `pfc train`: the main job. Synthetic identities with long-tailed sizes (optionally noisy labels,
//! identities split across two labels, and low-quality "blurred" images whose embeddings have a
//! smaller norm), a small MLP backbone trained with the gradients the head returns, PartialFC
//! sampling; then face-recognition evaluation — verification TAR at FAR 1e-3 and 1e-4 on identities
//! the head never saw, closed-set identification through the head's search — and the centers
//! exported.

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use partialfc::backend::cpu::gemm::{matmul, Operand};
use partialfc::batch::{Embeddings, GradOut, HostBatch};
use partialfc::config::{BackendKind, Config, DType, MarginKind, Rounding};
use partialfc::export::Format;
use partialfc::rng;
use partialfc::{Head, Status};
use crate::records::{decimal, sig6, Records, StepRecord};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug, Clone)]
pub struct TrainArgs {
    /// Training identities, i.e. classes of the head (10000000, 10_000_000 or 10M alike).
    #[arg(long, default_value = "100000", value_parser = crate::plan::parse_count)]
    pub classes: u64,
    /// Embedding dimension the backbone produces and the head's centers have.
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Images per step over all shards (the global batch).
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
    /// Training steps.
    #[arg(long, default_value_t = 1500)]
    pub steps: u64,
    /// PartialFC: fraction of each shard's classes used per step (positives always); 1 = full softmax.
    #[arg(long, default_value_t = 0.1)]
    pub sample_rate: f32,
    /// Margin: arcface (s=64, m2=0.5), cosface (s=64, m3=0.4), adaface (s=64, m=0.4, h=0.333:
    /// the margin follows each embedding's norm) or curricular (s=64, m=0.5: hard negatives weigh
    /// more as training advances).
    #[arg(long, default_value = "arcface")]
    pub margin: String,
    /// Inter-class filter threshold: non-target cosines above it are ignored (0 = off; try 0.4 with noise).
    #[arg(long, default_value_t = 0.0)]
    pub filter: f32,
    /// Fraction of training images given a wrong, random label.
    #[arg(long, default_value_t = 0.0)]
    pub label_noise: f32,
    /// Fraction of identities that also appear under a second label (inter-class conflicts).
    #[arg(long, default_value_t = 0.0)]
    pub conflicts: f32,
    /// Zipf exponent of identity sizes: identity of rank i is drawn ∝ (i+1)^-tail (0 = uniform).
    #[arg(long, default_value_t = 0.8)]
    pub tail: f64,
    /// Within-identity variation of the synthetic images, relative to the identity signal (1.0 keeps
    /// verification well short of saturation).
    #[arg(long, default_value_t = 1.0)]
    pub noise: f32,
    /// Fraction of images (training, verification and identification alike) that are "blurred":
    /// low quality, with a noisier direction and a smaller magnitude, so that the embedding's norm
    /// carries the image's quality, as AdaFace's margin assumes (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub low_quality: f32,
    /// Strongest blur of a low-quality image, in (0, 1): each draws its blur b uniformly in (0, BLUR];
    /// its pixels are scaled by 1 - b and its within-identity noise by 1 / (1 - b). Default 0.6;
    /// needs --low-quality.
    #[arg(long)]
    pub blur: Option<f32>,
    /// Backend running the head: cpu, or cuda (needs the CUDA backend and a GPU).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Shards of the head in this process (threads of work on the CPU, GPUs with CUDA).
    #[arg(long, default_value_t = 2)]
    pub shards: u32,
    /// How the head stores centers and optimizer state: f32; bf16 (half the memory, each update
    /// rounded stochastically, as the C ABI offers it); or bf16-nearest (rounded to nearest: the
    /// bias stochastic rounding removes, for comparison).
    #[arg(long, default_value = "f32")]
    pub storage: String,
    /// Learning rate of the head (SGD, momentum 0.9, weight decay 5e-4).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f32,
    /// Learning rate of the backbone (SGD, momentum 0.9).
    #[arg(long, default_value_t = 0.05)]
    pub backbone_lr: f32,
    /// Held-out identities (never trained on) for the verification benchmark.
    #[arg(long, default_value_t = 2000)]
    pub eval_identities: usize,
    /// Output directory: the step log (train.jsonl), the loss and accuracy curves (curves.png), the
    /// exported centers (centers.safetensors), summary.json and, with --checkpoint-every, checkpoints.
    #[arg(long, default_value = "pfc-out")]
    pub out: PathBuf,
    /// Save a checkpoint (head and backbone) to OUT/checkpoint every N steps and at the end (0 = never).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Continue from OUT/checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Seed of the data, the backbone and the head.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Print a line every N steps instead of drawing a progress bar (0 = bar on a terminal).
    #[arg(long, default_value_t = 0)]
    pub log_every: u64,
}

const INPUT_DIM: usize = 64;
const HIDDEN: usize = 256;
const DEFAULT_BLUR: f32 = 0.6;

/// The synthetic world: identity prototypes, how labels map to identities, how often each appears.
struct World {
    seed: u64,
    noise: f32,
    low_quality: f32,
    blur: f32,
    classes: u64,
    /// Identity behind each training label: conflicts make two labels share one identity.
    identity_of_label: Vec<u64>,
    /// Cumulative draw probabilities of the labels (long tail).
    cumulative: Vec<f64>,
    label_noise: f32,
}

impl World {
    fn new(a: &TrainArgs) -> World {
        let classes = a.classes;
        let conflicting = (a.conflicts as f64 * classes as f64) as u64;
        // The last `conflicting` labels re-use the identities of randomly chosen other labels.
        let identity_of_label = (0..classes)
            .map(|c| if c >= classes - conflicting { rng::at(rng::stream(a.seed, 11, 0), c) % (classes - conflicting) } else { c })
            .collect();
        let mut total = 0.0;
        let cumulative = (0..classes)
            .map(|c| {
                // Labels are shuffled against the tail so that shards see a mix of sizes.
                let rank = (rng::at(rng::stream(a.seed, 12, 0), c) % classes) as f64;
                total += (rank + 1.0).powf(-a.tail);
                total
            })
            .collect::<Vec<f64>>()
            .into_iter()
            .map(|x| x / total)
            .collect();
        let blur = if a.low_quality > 0.0 { a.blur.unwrap_or(DEFAULT_BLUR) } else { 0.0 };
        World { seed: a.seed, noise: a.noise, low_quality: a.low_quality, blur, classes, identity_of_label, cumulative, label_noise: a.label_noise }
    }

    /// The blur of image `instance`: 0 for a clean image, uniform in (0, blur] for the
    /// `low_quality` share. Its own stream, so that with no low-quality images the data are the
    /// same as before the option existed.
    fn blur_of(&self, instance: u64) -> f32 {
        let u = (rng::at(rng::stream(self.seed, 17, 0), instance) >> 40) as f32 / (1u64 << 24) as f32;
        if u < self.low_quality { self.blur * (1.0 - u / self.low_quality) } else { 0.0 }
    }

    /// One image of `identity` (training identities and held-out ones alike), instance `i`; returns
    /// its blur. Blur b moves the image towards noise (its noise grows by 1 / (1 - b) against the
    /// identity signal) and darkens it (pixels × (1 - b)): the backbone is nearly homogeneous, so a
    /// darker image gives a shorter embedding, as a blurred face gives a low-norm feature.
    fn image(&self, identity: u64, instance: u64, out: &mut [f32]) -> f32 {
        let blur = self.blur_of(instance);
        rng::init_center(self.seed, identity, 1.0, out);
        let mut n = [0f32; INPUT_DIM];
        rng::init_center(self.seed ^ 0x5EED, identity.wrapping_mul(0x1_0000_0001) ^ instance, self.noise / (1.0 - blur), &mut n);
        // A fixed non-linearity, so that the backbone has something to learn.
        out.iter_mut().zip(&n).for_each(|(o, v)| *o = (1.0 - blur) * (*o + v).tanh());
        blur
    }

    /// A training image: (pixels, label, blur) for global image number `i`.
    fn sample(&self, i: u64, out: &mut [f32]) -> (i64, f32) {
        let u = (rng::at(rng::stream(self.seed, 13, 0), i) >> 11) as f64 / (1u64 << 53) as f64;
        let label = self.cumulative.partition_point(|&c| c < u).min(self.classes as usize - 1) as u64;
        let blur = self.image(self.identity_of_label[label as usize], i, out);
        let flip = (rng::at(rng::stream(self.seed, 14, 0), i) >> 40) as f32 / (1u64 << 24) as f32;
        let label = if flip < self.label_noise { (rng::at(rng::stream(self.seed, 15, 0), i) % self.classes) as i64 } else { label as i64 };
        (label, blur)
    }
}

/// A two-layer perceptron `e = relu(x·W1 + b1)·W2`, trained by SGD with momentum.
struct Backbone {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    velocity: Vec<Vec<f32>>,
    dim: usize,
}

impl Backbone {
    fn new(seed: u64, dim: usize) -> Backbone {
        let mut w1 = vec![0f32; INPUT_DIM * HIDDEN];
        let mut w2 = vec![0f32; HIDDEN * dim];
        rng::init_center(seed ^ 0xB0B, 1, (2.0 / INPUT_DIM as f32).sqrt(), &mut w1);
        rng::init_center(seed ^ 0xB0B, 2, (1.0 / HIDDEN as f32).sqrt(), &mut w2);
        let velocity = vec![vec![0.0; w1.len()], vec![0.0; HIDDEN], vec![0.0; w2.len()]];
        Backbone { w1, b1: vec![0.0; HIDDEN], w2, velocity, dim }
    }

    /// Embeddings and the hidden activations the backward pass needs.
    fn forward(&self, x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
        let mut h = vec![0f32; rows * HIDDEN];
        matmul(rows, HIDDEN, INPUT_DIM, &mut h, Operand::rows(x, INPUT_DIM), Operand::rows(&self.w1, HIDDEN), false);
        for row in h.chunks_exact_mut(HIDDEN) {
            row.iter_mut().zip(&self.b1).for_each(|(v, b)| *v = (*v + b).max(0.0));
        }
        let mut e = vec![0f32; rows * self.dim];
        matmul(rows, self.dim, HIDDEN, &mut e, Operand::rows(&h, HIDDEN), Operand::rows(&self.w2, self.dim), false);
        (e, h)
    }

    fn step(&mut self, x: &[f32], h: &[f32], grad_e: &[f32], rows: usize, lr: f32) {
        let d = self.dim;
        let mut g_w2 = vec![0f32; HIDDEN * d];
        matmul(HIDDEN, d, rows, &mut g_w2, Operand::transposed(h, HIDDEN), Operand::rows(grad_e, d), false);
        let mut g_h = vec![0f32; rows * HIDDEN];
        matmul(rows, HIDDEN, d, &mut g_h, Operand::rows(grad_e, d), Operand::transposed(&self.w2, d), false);
        g_h.iter_mut().zip(h).for_each(|(g, &a)| if a <= 0.0 { *g = 0.0 });
        let mut g_w1 = vec![0f32; INPUT_DIM * HIDDEN];
        matmul(INPUT_DIM, HIDDEN, rows, &mut g_w1, Operand::transposed(x, INPUT_DIM), Operand::rows(&g_h, HIDDEN), false);
        let mut g_b1 = vec![0f32; HIDDEN];
        for row in g_h.chunks_exact(HIDDEN) {
            g_b1.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        for ((param, grad), vel) in [&mut self.w1, &mut self.b1, &mut self.w2].into_iter().zip([g_w1, g_b1, g_w2]).zip(&mut self.velocity) {
            for ((p, g), v) in param.iter_mut().zip(grad).zip(vel.iter_mut()) {
                *v = 0.9 * *v + g;
                *p -= lr * *v;
            }
        }
    }

    fn save(&self, path: &std::path::Path) -> Result<(), String> {
        let named = [("w1", &self.w1), ("b1", &self.b1), ("w2", &self.w2), ("v_w1", &self.velocity[0]), ("v_b1", &self.velocity[1]), ("v_w2", &self.velocity[2])];
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
            named.iter().map(|(n, d)| (n.to_string(), vec![d.len()], d.iter().flat_map(|v| v.to_le_bytes()).collect())).collect();
        let views = bytes
            .iter()
            .map(|(n, shape, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).map_err(|e| e.to_string())?)))
            .collect::<Result<Vec<_>, String>>()?;
        let data = safetensors::serialize(views, None).map_err(|e| e.to_string())?;
        let mut f = partialfc::fsutil::AtomicFile::create(path).map_err(|e| e.message)?;
        f.write_all(&data).map_err(|e| e.message)?;
        f.commit().map_err(|e| e.message)
    }

    fn load(&mut self, path: &std::path::Path) -> Result<(), String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let dim = self.dim;
        let targets: [(&str, &mut Vec<f32>); 6] = {
            let [v0, v1, v2] = &mut self.velocity[..] else { unreachable!() };
            [("w1", &mut self.w1), ("b1", &mut self.b1), ("w2", &mut self.w2), ("v_w1", v0), ("v_b1", v1), ("v_w2", v2)]
        };
        // Read everything before changing anything: a refused file leaves the backbone as it was.
        let mut read = Vec::with_capacity(targets.len());
        for (name, _) in &targets {
            let t = st.tensor(name).map_err(|e| format!("{}: {e}", path.display()))?;
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(format!("{}: backbone tensor {name} is {:?}, expected F32", path.display(), t.dtype()));
            }
            let values: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            if let Some(at) = values.iter().position(|v| !v.is_finite()) {
                return Err(format!(
                    "{}: backbone tensor {name} holds NaN or Inf (value {at}): the run that saved it had diverged; resume from an earlier checkpoint",
                    path.display()
                ));
            }
            read.push((t.shape().to_vec(), values));
        }
        for ((name, dst), (shape, values)) in targets.into_iter().zip(read) {
            if shape != [dst.len()] {
                return Err(format!("{}: backbone tensor {name} does not fit dimension {dim}", path.display()));
            }
            *dst = values;
        }
        Ok(())
    }
}

fn check(ok: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(message())
    }
}

/// Verification at one false-accept rate.
struct Verification {
    far: f64,
    /// Share of all genuine pairs accepted.
    tar: f64,
    /// Share of the genuine pairs holding a low-quality image accepted at the same threshold (the
    /// one system's operating point, not one tuned to them); NaN where there are none.
    tar_low_quality: f64,
    threshold: f32,
}

/// Verification: true-accept rate at each false-accept rate, over all pairs of `unit` embeddings.
fn tar_at_far(unit: &[f32], identity: &[u64], low_quality: &[bool], d: usize, fars: &[f64]) -> Vec<Verification> {
    let n = identity.len();
    let mut sim = vec![0f32; n * n];
    matmul(n, n, d, &mut sim, Operand::rows(unit, d), Operand::transposed(unit, d), false);
    let (mut genuine, mut impostor) = (Vec::new(), Vec::new());
    for i in 0..n {
        for j in i + 1..n {
            if identity[i] == identity[j] {
                genuine.push((sim[i * n + j], low_quality[i] || low_quality[j]))
            } else {
                impostor.push(sim[i * n + j])
            }
        }
    }
    fars.iter()
        .map(|&far| {
            // The threshold that lets through `far` of the impostor pairs.
            let accepted = ((far * impostor.len() as f64).floor() as usize).min(impostor.len() - 1);
            let at = impostor.len() - 1 - accepted;
            impostor.select_nth_unstable_by(at, |a, b| a.total_cmp(b));
            let threshold = impostor[at];
            let accept_rate = |low_only: bool| {
                let pairs: Vec<f32> = genuine.iter().filter(|g| g.1 || !low_only).map(|g| g.0).collect();
                pairs.iter().filter(|&&g| g > threshold).count() as f64 / pairs.len() as f64
            };
            Verification { far, tar: accept_rate(false), tar_low_quality: accept_rate(true), threshold }
        })
        .collect()
}

fn verification_at(results: &[Verification], far: f64, figure: fn(&Verification) -> f64) -> f64 {
    results.iter().find(|r| r.far == far).map_or(f64::NAN, figure)
}

/// Scales each row of `v` to unit length; returns the rows' norms before.
fn normalize(v: &mut [f32], d: usize) -> Vec<f32> {
    v.chunks_exact_mut(d)
        .map(|row| {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|x| *x /= n);
            n
        })
        .collect()
}

/// Pearson's correlation of two equally long series (NaN where either is constant).
fn correlation(x: &[f64], y: &[f64]) -> f64 {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mx, my) = (mean(x), mean(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx * syy).sqrt()
}

/// Mean of the `values` whose flag is `flag` (NaN where there are none).
fn mean_where(values: &[f32], flags: &[bool], flag: bool) -> f64 {
    let picked: Vec<f64> = values.iter().zip(flags).filter(|p| *p.1 == flag).map(|p| *p.0 as f64).collect();
    picked.iter().sum::<f64>() / picked.len() as f64
}

/// A `--storage` name: the storage dtype and its rounding.
pub(crate) fn storage(name: &str) -> Result<(DType, Rounding), String> {
    match name {
        "f32" => Ok((DType::F32, Rounding::Stochastic)),
        "bf16" => Ok((DType::BF16, Rounding::Stochastic)),
        "bf16-nearest" => Ok((DType::BF16, Rounding::Nearest)),
        other => Err(format!("--storage {other}: expected f32, bf16 or bf16-nearest")),
    }
}

pub fn run(a: TrainArgs) -> Result<(), String> {
    check(a.classes >= 2, || format!("--classes {} must be at least 2", a.classes))?;
    check(a.batch >= a.shards as usize && a.batch > 0, || format!("--batch {} must be at least --shards {}", a.batch, a.shards))?;
    check((0.0..1.0).contains(&a.label_noise), || format!("--label-noise {} is outside [0, 1)", a.label_noise))?;
    check((0.0..=0.5).contains(&a.conflicts), || format!("--conflicts {} is outside [0, 0.5]", a.conflicts))?;
    check(a.tail.is_finite() && a.tail >= 0.0, || format!("--tail {} must be >= 0", a.tail))?;
    check(a.noise.is_finite() && a.noise >= 0.0, || format!("--noise {} must be >= 0", a.noise))?;
    check((0.0..=1.0).contains(&a.low_quality), || format!("--low-quality {} is outside [0, 1]", a.low_quality))?;
    if let Some(blur) = a.blur {
        check(blur > 0.0 && blur < 1.0, || format!("--blur {blur} is outside (0, 1)"))?;
        check(a.low_quality > 0.0, || format!("--blur {blur} has no effect without --low-quality (no image is blurred)"))?;
    }
    check(a.eval_identities >= 2, || format!("--eval-identities {} must be at least 2", a.eval_identities))?;
    check(a.backbone_lr.is_finite() && a.backbone_lr >= 0.0, || format!("--backbone-lr {} must be >= 0", a.backbone_lr))?;
    let mut cfg = Config { num_classes: a.classes, embedding_dim: a.dim, sample_rate: a.sample_rate, seed: a.seed, ..Config::default() };
    cfg.backend = match a.backend.as_str() {
        "cpu" => BackendKind::Cpu,
        "cuda" => BackendKind::Cuda,
        other => return Err(format!("--backend {other}: expected cpu or cuda")),
    };
    (cfg.storage_dtype, cfg.storage_rounding) = storage(&a.storage)?;
    cfg.local_shards = a.shards as usize;
    cfg.world_size = cfg.local_shards;
    cfg.optimizer.lr = a.lr;
    cfg.margin.interclass_filter = a.filter;
    match a.margin.as_str() {
        "arcface" => {}
        "cosface" => {
            cfg.margin.m2 = 0.0;
            cfg.margin.m3 = 0.4;
        }
        "adaface" => cfg.margin.kind = MarginKind::ADAFACE,
        "curricular" => cfg.margin.kind = MarginKind::Curricular { m: MarginKind::CURRICULAR_M },
        other => return Err(format!("--margin {other}: expected arcface, cosface, adaface or curricular")),
    }
    let mut head = Head::new(cfg).map_err(|e| e.message)?;
    let world = World::new(&a);
    let mut backbone = Backbone::new(a.seed, a.dim);
    let checkpoint = a.out.join("checkpoint");
    std::fs::create_dir_all(&a.out).map_err(|e| format!("cannot create {}: {e}", a.out.display()))?;
    if a.resume {
        partialfc::checkpoint::load(&mut head, &checkpoint).map_err(|e| format!("--resume: {}", e.message))?;
        backbone.load(&checkpoint.join("backbone.safetensors"))?;
    }
    let first_step = head.steps_taken();
    check(first_step <= a.steps, || format!("--resume: the checkpoint is at step {first_step}, past --steps {}", a.steps))?;
    let mut records = Records::open(&a.out, first_step)?;
    let quality = if world.low_quality > 0.0 { format!(", low quality {} (blur up to {})", world.low_quality, world.blur) } else { String::new() };
    println!(
        "pfc train: {} identities (long tail {}, label noise {}, conflicts {}{quality}), d = {}, batch {}, {} {} shards, {} storage, sample rate {}, filter {}, steps {}..{}",
        a.classes, a.tail, a.label_noise, a.conflicts, a.dim, a.batch, a.shards, a.backend, a.storage, a.sample_rate, a.filter, first_step, a.steps
    );
    let shards = a.shards as usize;
    let rows_of = |s: usize| a.batch / shards + usize::from(s < a.batch % shards);
    let bar = if a.log_every == 0 && std::io::stdout().is_terminal() {
        let bar = ProgressBar::new(a.steps);
        bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]").unwrap());
        bar.set_position(first_step);
        Some(bar)
    } else {
        None
    };
    let log_every = if a.log_every > 0 { a.log_every } else { (a.steps / 20).max(1) };
    let started = Instant::now();
    let mut x = vec![0f32; a.batch * INPUT_DIM];
    let mut labels = vec![0i64; a.batch];
    let mut grads = vec![0f32; a.batch * a.dim];
    let mut last_loss = f64::NAN;
    let mut blurred_images = 0u64;
    for step in first_step..a.steps {
        let step_started = Instant::now();
        for (r, (img, label)) in x.chunks_exact_mut(INPUT_DIM).zip(labels.iter_mut()).enumerate() {
            let blur;
            (*label, blur) = world.sample(step * a.batch as u64 + r as u64, img);
            blurred_images += u64::from(blur > 0.0);
        }
        let (emb, hidden) = backbone.forward(&x, a.batch);
        check(emb.iter().all(|v| v.is_finite()), || {
            format!("step {}: the backbone diverged (its embeddings are NaN or Inf) with --backbone-lr {}: lower it", step + 1, a.backbone_lr)
        })?;
        let stepped = {
            let mut batches = Vec::with_capacity(shards);
            let mut outs = Vec::with_capacity(shards);
            let (mut e_rest, mut l_rest, mut g_rest) = (&emb[..], &labels[..], &mut grads[..]);
            for s in 0..shards {
                let rows = rows_of(s);
                let (e, er) = e_rest.split_at(rows * a.dim);
                let (l, lr) = l_rest.split_at(rows);
                let (g, gr) = std::mem::take(&mut g_rest).split_at_mut(rows * a.dim);
                batches.push(HostBatch { embeddings: Embeddings::F32(e), labels: l });
                outs.push(GradOut::F32(g));
                (e_rest, l_rest, g_rest) = (er, lr, gr);
            }
            head.train_step(&batches, &mut outs)
        };
        let stats = match stepped {
            Ok(stats) if stats.loss.is_finite() && grads.iter().all(|g| g.is_finite()) => stats,
            Err(e) if e.status != Status::NonFinite => return Err(e.message),
            _ => {
                return Err(format!(
                    "step {}: training diverged: the head's loss or gradients are NaN or Inf with --lr {} (SGD, momentum 0.9): lower --lr",
                    step + 1,
                    a.lr
                ))
            }
        };
        // The head returns shards × the mean-loss gradient; this one backbone sees the whole batch.
        grads.iter_mut().for_each(|g| *g /= shards as f32);
        backbone.step(&x, &hidden, &grads, a.batch, a.backbone_lr);
        last_loss = stats.loss;
        let done = step + 1;
        records.push(StepRecord {
            step: done,
            loss: stats.loss,
            accuracy: stats.accuracy,
            learning_rate: head.learning_rate(),
            images_per_second: a.batch as f64 / step_started.elapsed().as_secs_f64(),
            sampled_classes: stats.sampled_classes,
        })?;
        let rate = (done - first_step) as f64 * a.batch as f64 / started.elapsed().as_secs_f64();
        let msg = format!("loss {:>7.3}  acc {:>5.1}%  {:>6.0} img/s", stats.loss, stats.accuracy * 100.0, rate);
        match &bar {
            Some(b) => {
                b.set_position(done);
                b.set_message(msg);
            }
            None if done % log_every == 0 || done == a.steps => println!("step {done:>6}/{}  {msg}", a.steps),
            None => {}
        }
        if a.checkpoint_every > 0 && (done % a.checkpoint_every == 0 || done == a.steps) {
            partialfc::checkpoint::save(&head, &checkpoint).map_err(|e| e.message)?;
            backbone.save(&checkpoint.join("backbone.safetensors"))?;
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    let train_time = started.elapsed().as_secs_f64();

    // Verification on identities the head never saw: 4 images each, every pair.
    let per_identity = 4;
    let identities: Vec<u64> = (0..a.eval_identities as u64).map(|i| a.classes + 1_000_003 + i).collect();
    let n = identities.len() * per_identity;
    let mut images = vec![0f32; n * INPUT_DIM];
    let mut owner = Vec::with_capacity(n);
    let mut blur = Vec::with_capacity(n);
    for (k, img) in images.chunks_exact_mut(INPUT_DIM).enumerate() {
        let id = identities[k / per_identity];
        blur.push(world.image(id, u64::MAX - k as u64, img));
        owner.push(id);
    }
    let (mut unit, _) = backbone.forward(&images, n);
    let norms = normalize(&mut unit, a.dim);
    let low: Vec<bool> = blur.iter().map(|&b| b > 0.0).collect();
    let verification = tar_at_far(&unit, &owner, &low, a.dim, &[1e-3, 1e-4]);
    // Whether the trained backbone's embedding norm tells the image's quality (1 - blur), as
    // AdaFace's margin assumes.
    let norm_quality = correlation(&norms.iter().map(|&v| v as f64).collect::<Vec<_>>(), &blur.iter().map(|&b| 1.0 - b as f64).collect::<Vec<_>>());

    // Closed-set identification: new images of training identities, searched over the centers.
    let queries = 2048usize;
    let mut q_images = vec![0f32; queries * INPUT_DIM];
    let mut truth = Vec::with_capacity(queries);
    let mut q_low = Vec::with_capacity(queries);
    for (j, img) in q_images.chunks_exact_mut(INPUT_DIM).enumerate() {
        let i = (1u64 << 62) + j as u64;
        let u = (rng::at(rng::stream(a.seed, 16, 0), i) >> 11) as f64 / (1u64 << 53) as f64;
        let label = world.cumulative.partition_point(|&c| c < u).min(a.classes as usize - 1) as u64;
        q_low.push(world.image(world.identity_of_label[label as usize], i, img) > 0.0);
        truth.push(label as i64);
    }
    let (q_emb, _) = backbone.forward(&q_images, queries);
    let k = 5usize.min(a.classes as usize);
    let (ids, _) = head.search(&q_emb, k).map_err(|e| e.message)?;
    let hits: Vec<bool> = truth.iter().enumerate().map(|(j, &t)| ids[j * k] == t).collect();
    let top1 = hits.iter().filter(|&&h| h).count() as f64 / queries as f64;
    let top5 = truth.iter().enumerate().filter(|(j, &t)| ids[j * k..(j + 1) * k].contains(&t)).count() as f64 / queries as f64;
    let top1_low_quality = {
        let low_hits: Vec<bool> = hits.iter().zip(&q_low).filter(|p| *p.1).map(|p| *p.0).collect();
        low_hits.iter().filter(|&&h| h).count() as f64 / low_hits.len() as f64
    };

    let export = a.out.join("centers.safetensors");
    partialfc::export::export_centers(&head, &export, Format::Safetensors, partialfc::config::DType::F32, true).map_err(|e| e.message)?;
    println!("trained {} steps in {:.1}s; last loss {:.3}", a.steps - first_step, train_time, last_loss);
    for v in &verification {
        println!("verification ({} unseen identities): TAR {:.2}% at FAR {:e} (threshold {:.3})", a.eval_identities, v.tar * 100.0, v.far, v.threshold);
    }
    println!("identification ({} queries, {} classes): top-1 {:.2}%, top-5 {:.2}%", queries, a.classes, top1 * 100.0, top5 * 100.0);
    let blurred_eval = low.iter().filter(|&&l| l).count();
    if blurred_eval > 0 {
        println!(
            "low quality: {blurred_eval} of {n} verification images blurred; embedding norm vs quality: correlation {:.3} (mean norm {:.3} clean, {:.3} blurred)",
            norm_quality,
            mean_where(&norms, &low, false),
            mean_where(&norms, &low, true)
        );
        for v in &verification {
            println!("low quality: TAR {:.2}% at FAR {:e} on genuine pairs with a blurred image (same threshold)", v.tar_low_quality * 100.0, v.far);
        }
        println!("low quality: top-1 {:.2}% on the {} blurred queries", top1_low_quality * 100.0, q_low.iter().filter(|&&l| l).count());
    }
    println!("centers exported to {}", export.display());
    let curves = a.out.join("curves.png");
    records.plot(&curves, &format!("pfc train: {} classes, d = {}, batch {}, sample rate {}, {}", a.classes, a.dim, a.batch, a.sample_rate, a.margin))?;
    println!("training records: {} (every step), {}", a.out.join("train.jsonl").display(), curves.display());
    let summary = serde_json::json!({
        "classes": a.classes, "dim": a.dim, "batch": a.batch, "steps": a.steps, "sample_rate": decimal(a.sample_rate),
        "margin": a.margin, "filter": decimal(a.filter), "label_noise": decimal(a.label_noise), "conflicts": decimal(a.conflicts),
        "tail": a.tail, "noise": decimal(a.noise), "low_quality": decimal(a.low_quality),
        "blur": if a.low_quality > 0.0 { Some(decimal(world.blur)) } else { None }, "shards": a.shards, "storage": a.storage, "seed": a.seed,
        "lr": decimal(a.lr), "backbone_lr": decimal(a.backbone_lr),
        "train_seconds": sig6(train_time), "last_loss": sig6(last_loss),
        "tar_far_1e-3": sig6(verification_at(&verification, 1e-3, |v| v.tar)), "tar_far_1e-4": sig6(verification_at(&verification, 1e-4, |v| v.tar)),
        "top1": sig6(top1), "top5": sig6(top5),
        "low_quality_share": sig6(blurred_images as f64 / ((a.steps - first_step) * a.batch as u64) as f64),
        "norm_quality_correlation": sig6(norm_quality),
        "tar_far_1e-3_low_quality": sig6(verification_at(&verification, 1e-3, |v| v.tar_low_quality)),
        "tar_far_1e-4_low_quality": sig6(verification_at(&verification, 1e-4, |v| v.tar_low_quality)),
        "top1_low_quality": sig6(top1_low_quality),
    });
    let mut f = partialfc::fsutil::AtomicFile::create(&a.out.join("summary.json")).map_err(|e| e.message)?;
    f.write_all(format!("{summary:#}\n").as_bytes()).map_err(|e| e.message)?;
    f.commit().map_err(|e| e.message)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(args: &[&str]) -> World {
        let mut all = vec!["train", "--classes", "50"];
        all.extend_from_slice(args);
        World::new(&TrainArgs::parse_from(all))
    }

    fn magnitude(x: &[f32]) -> f64 {
        x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt()
    }

    /// The share of blurred images is --low-quality, their blur uniform in (0, --blur], and a blurred
    /// image is darker (smaller magnitude) than the clean image of the same identity and instance,
    /// and further from its identity's noise-free image in direction.
    #[test]
    fn the_low_quality_share_and_blur_are_what_the_options_say() {
        let w = world(&["--low-quality", "0.3", "--blur", "0.5"]);
        let images = 40_000u64;
        let (mut blurs, mut darker, mut brighter) = (Vec::new(), 0, 0);
        let (mut cos_clean, mut cos_blurred) = (Vec::new(), Vec::new());
        let (mut img, mut clean, mut ideal) = ([0f32; INPUT_DIM], [0f32; INPUT_DIM], [0f32; INPUT_DIM]);
        let reference = world(&[]);
        for i in 0..images {
            let (label, b) = w.sample(i, &mut img);
            rng::init_center(w.seed, w.identity_of_label[label as usize], 1.0, &mut ideal);
            ideal.iter_mut().for_each(|v| *v = v.tanh());
            let cos = img.iter().zip(&ideal).map(|(&p, &q)| (p * q) as f64).sum::<f64>() / (magnitude(&img) * magnitude(&ideal));
            if b > 0.0 {
                assert!(b <= 0.5, "blur {b}");
                blurs.push(b as f64);
                cos_blurred.push(cos);
                // The clean image of the same identity and instance, from a world without blur.
                assert_eq!(reference.sample(i, &mut clean).1, 0.0);
                if magnitude(&img) < magnitude(&clean) { darker += 1 } else { brighter += 1 }
            } else {
                cos_clean.push(cos);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        assert!(mean(&cos_blurred) < mean(&cos_clean) - 0.05, "cosine to the identity {} blurred, {} clean", mean(&cos_blurred), mean(&cos_clean));
        let share = blurs.len() as f64 / images as f64;
        // 5 standard deviations of a binomial share over 40,000 draws is 0.011.
        assert!((share - 0.3).abs() < 0.011, "share {share}");
        assert!((mean(&blurs) - 0.25).abs() < 0.01, "mean blur {}, uniform in (0, 0.5] has 0.25", mean(&blurs));
        assert!(darker > 9 * brighter, "{darker} blurred images darker than their clean version, {brighter} not");
    }

    /// Clean images are the same whatever the low-quality share, and no image is blurred without it:
    /// the data of a run without --low-quality are those of the runs before the option existed.
    #[test]
    fn clean_images_do_not_depend_on_the_low_quality_options() {
        let (plain, mixed) = (world(&[]), world(&["--low-quality", "0.5"]));
        let (mut a, mut b) = ([0f32; INPUT_DIM], [0f32; INPUT_DIM]);
        let mut clean = 0;
        for i in 0..2000 {
            let (label_a, blur_a) = plain.sample(i, &mut a);
            let (label_b, blur_b) = mixed.sample(i, &mut b);
            assert_eq!((label_a, blur_a), (label_b, 0.0));
            if blur_b == 0.0 {
                assert_eq!(a, b);
                clean += 1;
            }
        }
        assert!((900..1100).contains(&clean), "{clean} of 2000 clean at --low-quality 0.5");
        assert_eq!(mixed.blur, DEFAULT_BLUR);
    }

    #[test]
    fn correlation_is_pearsons() {
        assert!((correlation(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]) - 0.997949).abs() < 1e-6);
        assert!((correlation(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert!(correlation(&[1.0, 2.0], &[1.0, 1.0]).is_nan());
    }
}
