//! `pfc bench`: median step time of the CPU engine, with a per-phase breakdown, GEMM GFLOP/s and the
//! process's peak resident memory, side by side with the reference PartialFC_V2 (timed by
//! scripts/reference_step.py) in the same run; each compute dtype and storage dtype given is timed
//! in the same run.
//! `pfc bench --search`: queries per second of top-k search over all centers (default C = 1M, d = 512).
//! `pfc bench --init`: values per second of the class centers' initialisation, against filling the
//! same memory.

use clap::Parser;
use partialfc::backend::step::PhaseTimes;
use partialfc::batch::{Embeddings, GradOut, HostBatch};
use partialfc::config::{BackendKind, Config, DType, Rounding};
use partialfc::rng;
use partialfc::Head;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(Parser, Debug)]
pub struct BenchArgs {
    /// Classes C of the head (10000000, 10_000_000 or 10M alike). Without it, the two standard
    /// configurations are timed: C = 1,000,000 at sample rate 0.1 and C = 100,000 at sample rate 1.0.
    #[arg(long, value_parser = crate::plan::parse_count)]
    pub classes: Option<u64>,
    /// With --classes: fraction of each shard's classes sampled per step (positives always), in (0, 1].
    #[arg(long, default_value_t = 0.1)]
    pub sample_rate: f32,
    /// Embedding dimension d.
    #[arg(long, default_value_t = 512)]
    pub dim: usize,
    /// Rows of the global batch N per step (split over --shards).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Timed steps (after two warm-up steps); the median is reported.
    #[arg(long, default_value_t = 7)]
    pub steps: usize,
    /// Shards of the head in this process (threads of work on the CPU, GPUs with CUDA).
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    /// Folder holding the reference implementation's partial_fc_v2.py and losses.py (insightface's
    /// recognition/arcface_torch; not part of this repository, .reference/ is ignored by git). When
    /// they are absent, only this library is timed.
    #[arg(long, default_value = ".reference")]
    pub reference_dir: PathBuf,
    /// Python script that times the reference step with PyTorch on the same configuration and
    /// prints one JSON line (needs python3 with torch).
    #[arg(long, default_value = "scripts/reference_step.py")]
    pub reference_script: PathBuf,
    /// Steps the reference times (it is slow).
    #[arg(long, default_value_t = 5)]
    pub reference_steps: usize,
    /// Benchmark top-k search (pfc_search) instead of the training step: queries/s over all
    /// classes (default C = 1,000,000 random centers from the head's initialisation, d = --dim).
    #[arg(long)]
    pub search: bool,
    /// With --search: queries per call; each count is timed separately.
    #[arg(long, value_delimiter = ',', default_value = "1024,1")]
    pub queries: Vec<usize>,
    /// With --search: results per query.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// With --search: timed calls per query count (after one warm-up call); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Time the class centers' initialisation alone (the values the CPU backend's head starts
    /// from; default C = 1,000,000, d = --dim) on the library's threads, against filling the same
    /// memory with a constant: --runs passes of each, interleaved, after one fill that faults the
    /// pages in.
    #[arg(long, conflicts_with = "search")]
    pub init: bool,
    /// Backend running the head: cpu, or cuda (needs a GPU; scripts/gpu-check.sh runs it there).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// GEMM input precision: f32, f16 or bf16 (accumulation is f32); a comma-separated list times
    /// each in the same run, and reports each against the first.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub compute_dtype: Vec<String>,
    /// How the head stores centers and optimizer state: f32, bf16 (stochastic rounding) or
    /// bf16-nearest; a comma-separated list times each, with each compute dtype, in the same run.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub storage: Vec<String>,
    /// Times each configuration's variants (compute dtype × storage) this many times, interleaved
    /// (f32, bf16, f32, bf16, …), and reports the run with the median step time: on a shared
    /// machine, neighbours' load then falls on every variant alike.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Also print each configuration's result as one JSON line.
    #[arg(long)]
    pub json: bool,
}

fn dtype(name: &str) -> Result<DType, String> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("--compute-dtype {other}: expected f32, f16 or bf16")),
    }
}

fn head_config(classes: u64, rate: f32, a: &BenchArgs, compute_dtype: DType, storage: (DType, Rounding)) -> Result<Config, String> {
    let mut cfg = Config { num_classes: classes, embedding_dim: a.dim, sample_rate: rate, ..Config::default() };
    cfg.local_shards = a.shards as usize;
    cfg.world_size = cfg.local_shards;
    cfg.backend = match a.backend.as_str() {
        "cpu" => BackendKind::Cpu,
        "cuda" => BackendKind::Cuda,
        other => return Err(format!("--backend {other}: expected cpu or cuda")),
    };
    cfg.compute_dtype = compute_dtype;
    (cfg.storage_dtype, cfg.storage_rounding) = storage;
    Ok(cfg)
}

/// Resets the kernel's record of this process's peak resident memory (VmHWM) to what it holds now
/// (Linux ≥ 4.0), so that a later [`peak_rss`] measures from here; false where it cannot.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// This process's peak resident memory since the last reset (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    Some(kb * 1024)
}

/// Bytes in GiB, two decimals.
fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Which engine runs the head's GEMMs, with oneDNN's kernel and library or why it is not used.
fn gemm_path(a: &BenchArgs, dtype: DType) -> Result<String, String> {
    use partialfc::backend::cpu::{dnnl, gemm};
    if a.backend == "cuda" {
        return Ok("cublas".into());
    }
    let p = gemm::path(dtype);
    if let Some(why) = gemm::onednn_failure() {
        return Ok(format!("{} (oneDNN failed: {why})", p.name()));
    }
    Ok(match (p, dnnl::loaded()) {
        (gemm::GemmPath::Crate | gemm::GemmPath::Avx512F32, Err(why)) => format!("{} ({why})", p.name()),
        (gemm::GemmPath::Crate | gemm::GemmPath::Avx512F32, Ok(lib)) => format!("{} (oneDNN at {lib} runs bf16 steps only, on bf16 hardware)", p.name()),
        (gemm::GemmPath::OneDnnBf16, lib) => format!("{} ({}, {})", p.name(), gemm::onednn_kernel(dnnl::DataType::Bf16).unwrap_or_default(), lib.unwrap_or_default()),
    })
}

struct Measured {
    median: f64,
    phases: PhaseTimes,
    sampled: u64,
    /// The GEMM engines the timed steps reported, in order ("a then b" if one failed mid-run).
    gemms: String,
    /// Per timed step, what the emulated CUDA driver counted on GPU 0, where it is the driver.
    device_work: Option<DeviceWork>,
    /// The process's peak resident memory from just before the head was created to the end of
    /// its timed steps (None where the kernel's record cannot be reset).
    peak_rss: Option<u64>,
}

/// What a step did on a GPU, from the host emulation's counters (tests/cuda-emulator/README.md):
/// a GPU's driver counts none of it.
struct DeviceWork {
    per_step: Vec<(&'static str, f64)>,
}

const DEVICE_WORK: [&str; 8] = ["allocations", "frees", "memsets", "memset_bytes", "htod", "dtoh", "dtoh_bytes", "synchronizations"];

/// The emulated driver's counters of GPU 0, if the CUDA driver this process loaded is the
/// emulation (it exports `pfc_emu_counters`).
fn emulated_counters() -> Option<serde_json::Value> {
    type Counters = unsafe extern "C" fn(libc::c_int, *mut libc::c_char, usize) -> usize;
    // SAFETY: looks up a symbol of a library already loaded (RTLD_NOLOAD), which stays loaded; the
    // emulation's `pfc_emu_counters` writes at most `capacity` bytes.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if lib.is_null() {
            return None;
        }
        let sym = libc::dlsym(lib, c"pfc_emu_counters".as_ptr());
        libc::dlclose(lib);
        if sym.is_null() {
            return None;
        }
        let counters: Counters = std::mem::transmute(sym);
        let n = counters(0, std::ptr::null_mut(), 0);
        let mut buf = vec![0u8; n.max(1)];
        counters(0, buf.as_mut_ptr().cast(), n);
        serde_json::from_slice(&buf[..n.saturating_sub(1)]).ok()
    }
}

impl DeviceWork {
    fn between(before: &serde_json::Value, after: &serde_json::Value, steps: usize) -> DeviceWork {
        let per_step = DEVICE_WORK.iter().map(|&k| (k, (after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0)) as f64 / steps as f64)).collect();
        DeviceWork { per_step }
    }

    fn line(&self) -> String {
        self.per_step.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ours(classes: u64, rate: f32, a: &BenchArgs, dtype: DType, storage: (DType, Rounding)) -> Result<Measured, String> {
    let cfg = head_config(classes, rate, a, dtype, storage)?;
    // The previous variant's head is gone; what this one holds is measured from here.
    let measured_from_here = reset_peak_rss();
    let mut head = Head::new(cfg).map_err(|e| e.message)?;
    let shards = a.shards as usize;
    let rows = |s: usize| a.batch / shards + usize::from(s < a.batch % shards);
    // Four distinct batches, as the reference script rotates; never time on zeros.
    // Per batch: each shard's (embeddings, labels).
    type Batch = (Vec<Vec<f32>>, Vec<Vec<i64>>);
    let batches: Vec<Batch> = (0..4u64)
        .map(|b| {
            let e = (0..shards)
                .map(|s| {
                    let mut v = vec![0f32; rows(s) * a.dim];
                    rng::init_center(b, s as u64, 1.0, &mut v);
                    v
                })
                .collect();
            let l = (0..shards)
                .map(|s| (0..rows(s)).map(|r| (rng::at(rng::stream(b, 7, s as u64), r as u64) % classes) as i64).collect())
                .collect();
            (e, l)
        })
        .collect();
    let mut grads: Vec<Vec<f32>> = (0..shards).map(|s| vec![0f32; rows(s) * a.dim]).collect();
    let mut times = Vec::new();
    let mut phases = Vec::new();
    let mut sampled = 0;
    // The steps' own work, not the phase timing's event waits after each.
    let mut device_work: Option<Vec<(&'static str, f64)>> = None;
    for i in 0..a.steps + 2 {
        let before = emulated_counters();
        let (e, l) = &batches[i % batches.len()];
        let inputs: Vec<HostBatch> = (0..shards).map(|s| HostBatch { embeddings: Embeddings::F32(&e[s]), labels: &l[s] }).collect();
        let mut outs: Vec<GradOut> = grads.iter_mut().map(|g| GradOut::F32(g)).collect();
        let t = Instant::now();
        let stats = head.train_step(&inputs, &mut outs).map_err(|e| e.message)?;
        let dt = t.elapsed().as_secs_f64();
        if let (true, Some(before), Some(after)) = (i >= 2, before, emulated_counters()) {
            let step = DeviceWork::between(&before, &after, a.steps).per_step;
            let sum = device_work.get_or_insert_with(|| step.iter().map(|&(k, _)| (k, 0.0)).collect());
            sum.iter_mut().zip(step).for_each(|((_, total), (_, v))| *total += v);
        }
        if i >= 2 {
            times.push(dt);
            phases.push(head.phase_times());
            sampled = stats.sampled_classes;
        }
    }
    let peak_rss = if measured_from_here { peak_rss() } else { None };
    let device_work = device_work.map(|per_step| DeviceWork { per_step });
    let pick = |f: fn(&PhaseTimes) -> f64| median(phases.iter().map(f).collect());
    Ok(Measured {
        median: median(times),
        phases: PhaseTimes {
            gather: pick(|p| p.gather),
            sample: pick(|p| p.sample),
            forward: pick(|p| p.forward),
            reduce: pick(|p| p.reduce),
            backward: pick(|p| p.backward),
            scatter: pick(|p| p.scatter),
            update: pick(|p| p.update),
            update_in_backward: phases.iter().all(|p| p.update_in_backward),
            gemm_path: "",
            gemm: phases.iter().map(|p| p.gemm).collect::<Option<Vec<f64>>>().map(median),
            peak_device_bytes: phases.iter().filter_map(|p| p.peak_device_bytes).max(),
        },
        sampled,
        gemms: phases.iter().map(|p| p.gemm_path).fold(Vec::new(), |mut seen: Vec<&str>, g| {
            if seen.last() != Some(&g) {
                seen.push(g);
            }
            seen
        }).join(" then "),
        device_work,
        peak_rss,
    })
}

fn reference(classes: u64, rate: f32, a: &BenchArgs) -> Result<f64, String> {
    let out = Command::new("python3")
        .arg(&a.reference_script)
        .args(["--device", "cpu", "--classes", &classes.to_string(), "--dim", &a.dim.to_string()])
        .args(["--batch", &a.batch.to_string(), "--sample-rate", &rate.to_string(), "--steps", &a.reference_steps.to_string()])
        .env("PFC_REFERENCE_DIR", &a.reference_dir)
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !out.status.success() {
        return Err(format!("reference failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")));
    }
    let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_string();
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("reference printed no JSON ({e}): {line}"))?;
    v["median_step_s"].as_f64().ok_or_else(|| "reference JSON lacks median_step_s".into())
}

/// `--search`: times `Head::search` (what pfc_search runs) on random centers and random queries.
fn search(a: &BenchArgs) -> Result<(), String> {
    let classes = a.classes.unwrap_or(1_000_000);
    let t = Instant::now();
    let head = Head::new(head_config(classes, 1.0, a, DType::F32, (DType::F32, Rounding::Stochastic))?).map_err(|e| e.message)?;
    let init = t.elapsed().as_secs_f64();
    println!(
        "search: C = {classes}, d = {}, k = {}, shards = {}, threads = {}, f32 centers ({:.1} GiB, initialised in {init:.1} s); medians of {} calls after one warm-up",
        a.dim,
        a.k,
        a.shards,
        partialfc::pool::threads().map_err(|e| e.message)?,
        classes as f64 * a.dim as f64 * 4.0 / (1u64 << 30) as f64,
        a.runs
    );
    println!("| queries per call | median call | queries/s | GFLOP/s (2·n·C·d) | fastest call |");
    println!("|---|---|---|---|---|");
    for &n in &a.queries {
        if n == 0 {
            return Err("--queries: counts must be at least 1".into());
        }
        let mut queries = vec![0f32; n * a.dim];
        for (q, row) in queries.chunks_exact_mut(a.dim).enumerate() {
            rng::init_center(0xBE_9C4, q as u64, 1.0, row);
        }
        let mut times = Vec::new();
        for i in 0..=a.runs {
            let t = Instant::now();
            let (ids, scores) = head.search(&queries, a.k).map_err(|e| e.message)?;
            let dt = t.elapsed().as_secs_f64();
            if ids.len() != n * a.k || scores.iter().any(|s| !s.is_finite()) {
                return Err("search returned malformed results".into());
            }
            if i > 0 {
                times.push(dt);
            }
        }
        let fastest = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let m = median(times);
        println!(
            "| {n} | {m:.3} s | {:.0} | {:.0} | {fastest:.3} s |",
            n as f64 / m,
            2.0 * n as f64 * classes as f64 * a.dim as f64 / m / 1e9
        );
    }
    Ok(())
}

/// `--init`: `rng::init_center` row by row on the pool, as `CpuBackend::new` runs it.
fn init(a: &BenchArgs) -> Result<(), String> {
    use rayon::prelude::*;
    let classes = a.classes.unwrap_or(1_000_000);
    let d = a.dim;
    if d == 0 {
        return Err("--dim 0: a center needs at least one value".into());
    }
    let values = usize::try_from(classes).ok().and_then(|c| c.checked_mul(d)).ok_or("--classes × --dim overflows")?;
    let std = Config::default().init_std;
    let mut centers = vec![0f32; values];
    let mut pass = |initialise: bool| -> Result<f64, String> {
        let t = Instant::now();
        partialfc::pool::install(|| {
            centers.par_chunks_mut(d).enumerate().for_each(|(class, row)| match initialise {
                true => rng::init_center(1, class as u64, std, row),
                false => row.fill(std),
            })
        })
        .map_err(|e| e.message)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let first_touch = pass(false)?;
    let (mut fills, mut inits) = (Vec::new(), Vec::new());
    for _ in 0..a.runs {
        fills.push(pass(false)?);
        inits.push(pass(true)?);
    }
    let bytes = values as f64 * 4.0;
    println!(
        "init: C = {classes}, d = {d}, threads = {}, f32 centers ({:.1} GiB; the first fill, faulting the pages in, took {first_touch:.3} s); medians of {} passes each, interleaved",
        partialfc::pool::threads().map_err(|e| e.message)?,
        bytes / (1u64 << 30) as f64,
        a.runs
    );
    println!("| pass | median | values/s | GB/s written |");
    println!("|---|---|---|---|");
    for (name, times) in [("fill with a constant", fills), ("rng::init_center", inits)] {
        let m = median(times);
        println!("| {name} | {m:.3} s | {:.0} M | {:.1} |", values as f64 / m / 1e6, bytes / m / 1e9);
    }
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<(), String> {
    // Medians need at least one timing.
    if a.steps == 0 {
        return Err("--steps 0: time at least one step".into());
    }
    if a.runs == 0 {
        return Err("--runs 0: time at least one call".into());
    }
    if a.search {
        return search(&a);
    }
    if a.init {
        return init(&a);
    }
    let configs: Vec<(u64, f32)> = match a.classes {
        Some(c) => vec![(c, a.sample_rate)],
        None => vec![(1_000_000, 0.1), (100_000, 1.0)],
    };
    let have_reference = a.reference_dir.join("partial_fc_v2.py").is_file() && a.reference_script.is_file();
    if !have_reference {
        println!(
            "(reference not found: put partial_fc_v2.py and losses.py in {} and check {}; timing ours only)",
            a.reference_dir.display(),
            a.reference_script.display()
        );
    }
    if a.rounds == 0 {
        return Err("--rounds 0: time at least one round".into());
    }
    let dtypes = a.compute_dtype.iter().map(|name| Ok((name.as_str(), dtype(name)?))).collect::<Result<Vec<_>, String>>()?;
    let storages = a.storage.iter().map(|name| Ok((name.as_str(), crate::train::storage(name)?))).collect::<Result<Vec<_>, String>>()?;
    // Every (compute dtype, storage) pair, timed side by side.
    type Variant<'a> = ((&'a str, DType), (&'a str, (DType, Rounding)));
    let variants: Vec<Variant> = dtypes.iter().flat_map(|&d| storages.iter().map(move |&s| (d, s))).collect();
    let paths = dtypes.iter().map(|&(name, d)| Ok(format!("{name}: {}", gemm_path(&a, d)?))).collect::<Result<Vec<_>, String>>()?;
    println!(
        "threads: {}, d = {}, N = {}, shards = {}, GEMMs {}, SGD; medians of {} steps{}; peak RSS: the process's peak resident memory from creating the head to its last timed step",
        partialfc::pool::threads().map_err(|e| e.message)?,
        a.dim,
        a.batch,
        a.shards,
        paths.join("; "),
        a.steps,
        if a.rounds > 1 { format!(", the median of {} interleaved rounds", a.rounds) } else { String::new() }
    );
    let ((first_dtype, _), (first_storage, _)) = variants[0];
    println!("| C | r | dtype | storage | GEMMs | ours step | images/s | GEMM GFLOP/s | gather | sample | forward | reduce | backward | scatter | update | peak RSS | vs {first_dtype}/{first_storage} | reference step | speed-up |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (classes, rate) in configs {
        let mut runs: Vec<Vec<Measured>> = variants.iter().map(|_| Vec::new()).collect();
        for _ in 0..a.rounds {
            for (runs, &((_, d), (_, storage))) in runs.iter_mut().zip(&variants) {
                runs.push(ours(classes, rate, &a, d, storage)?);
            }
        }
        let measured: Vec<Measured> = runs
            .into_iter()
            .map(|mut r| {
                r.sort_by(|x, y| x.median.total_cmp(&y.median));
                r.swap_remove(r.len() / 2)
            })
            .collect();
        let reference = have_reference.then(|| reference(classes, rate, &a));
        for (m, &((name, _), (storage, _))) in measured.iter().zip(&variants) {
            let (reference_cell, speedup) = match &reference {
                Some(Ok(r)) => (format!("{r:.3} s"), format!("{:.2}×", r / m.median)),
                Some(Err(e)) => (format!("failed: {e}"), "—".into()),
                None => ("—".into(), "—".into()),
            };
            let flops = 3.0 * 2.0 * a.batch as f64 * m.sampled as f64 * a.dim as f64;
            let p = m.phases;
            // The GEMMs' own time where the backend measures it (CUDA events), else the two phases
            // that hold them: GFLOP/s of the GEMMs, not of the whole step.
            let gemm_s = p.gemm.unwrap_or(p.forward + p.backward);
            let vs_first = measured[0].median / m.median;
            println!(
                "| {classes} | {rate} | {name} | {storage} | {} | {:.3} s | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {vs_first:.2}× | {reference_cell} | {speedup} |",
                m.gemms,
                m.median,
                a.batch as f64 / m.median,
                flops / gemm_s / 1e9,
                p.gather,
                p.sample,
                p.forward,
                p.reduce,
                p.backward,
                p.scatter,
                if p.update_in_backward { "in backward".to_string() } else { format!("{:.3}", p.update) },
                m.peak_rss.map_or("—".to_string(), gib)
            );
            if let Some(w) = &m.device_work {
                println!("|  | emulated CUDA driver, GPU 0, per step: {} |", w.line());
            }
            if a.json {
                let line = serde_json::json!({
                    "impl": "partialfc", "backend": a.backend, "compute_dtype": name, "storage": storage, "gemm": gemm_path(&a, dtype(name)?)?, "classes": classes,
                    "sample_rate": rate, "dim": a.dim, "batch": a.batch, "shards": a.shards, "steps": a.steps, "rounds": a.rounds,
                    "median_step_s": m.median, "images_per_s": a.batch as f64 / m.median, "gemm_gflops": flops / gemm_s / 1e9,
                    "gemm_s": gemm_s, "gemm_timed_apart": p.gemm.is_some(), "peak_gpu_bytes": p.peak_device_bytes, "peak_rss_bytes": m.peak_rss,
                    "sampled_classes": m.sampled, "speedup_vs_first_variant": vs_first, "gemms_used": m.gemms,
                    "reference_step_s": reference.as_ref().and_then(|r| r.as_ref().ok()),
                    "phases_s": {"gather": p.gather, "sample": p.sample, "forward": p.forward, "reduce": p.reduce, "backward": p.backward, "scatter": p.scatter, "update": p.update},
                    "update_in_backward": p.update_in_backward,
                    "emulated_gpu0_per_step": m.device_work.as_ref().map(|w| w.per_step.iter().map(|&(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>()),
                });
                println!("{line}");
            }
        }
    }
    Ok(())
}
