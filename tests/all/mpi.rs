//! One job over several processes (SPEC §2a), through OpenMPI: tests/mpi/parity.c runs under
//! `mpirun -n 2, 3, 4` with 1–2 shards per process (uneven layouts too) and checks, on every
//! process, the loss, its shards' gradients and its centers after every step against one process
//! with the same total shard count (≤ 1e-6 relative, and bit for bit), and against the reference's
//! golden vectors;
//! a bad input on one process only, a failing callback and mismatched configurations must give the
//! same status and message everywhere. OpenMPI comes from the project's setup (Debian's
//! openmpi-bin and libopenmpi-dev).

use crate::common::Golden;
use crate::native::{compile, describe, lib_dir, mpirun, root, scratch};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub(crate) fn parity_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| build_example("mpicc", "tests/mpi/parity.c", "parity", &["-std=c11", "-O1"]))
}

pub(crate) fn run_parity(dir: &Path, procs: usize, extra: &[&str]) -> String {
    let mut cmd = mpirun(procs);
    cmd.arg(parity_exe()).arg(dir).args(extra);
    let out = cmd.output().expect("cannot run mpirun (OpenMPI is installed by scripts/test.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", describe(&format!("{cmd:?}"), &out));
    for r in 0..procs {
        assert!(text.contains(&format!("rank {r}: ")) && text.contains("checks passed"), "rank {r} did not finish:\n{text}");
    }
    text
}

pub(crate) struct Case {
    pub dir: PathBuf,
}

fn write_f32(path: &Path, v: &[f32]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

fn write_i64(path: &Path, v: &[i64]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

/// A synthetic job: `classes` classes of dimension `dim`, uneven per-shard batch sizes (a shard
/// may have none), every process layout of `total` shards reads the same global batches.
pub(crate) fn synthetic(name: &str, total: usize, layout: &[usize], sample_rate: f32, adamw: bool) -> Case {
    let dir = scratch(&format!("mpi-{name}"));
    let (classes, dim, steps) = (1009u64, 24usize, 4usize);
    let mut cfg = format!(
        "num_classes {classes}\nembedding_dim {dim}\nsteps {steps}\nsample_rate {sample_rate}\nscale 64\nm1 1\nm2 0.5\nm3 0\n\
         interclass_filter 0\nlr 0.5\nmomentum 0.9\nweight_decay 0.0005\noptimizer {}\nseed 11\nexpect 0\nexpect_tol 0\n",
        u8::from(adamw)
    );
    cfg.push_str(&format!("shards {}\n", layout.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")));
    std::fs::write(dir.join("config.txt"), cfg).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for t in 0..steps {
        let rows: Vec<usize> = (0..total).map(|s| if (s + t) % 4 == 3 { 0 } else { 3 + (s * 5 + t * 3) % 7 }).collect();
        let n: usize = rows.iter().sum();
        let emb: Vec<f32> = (0..n * dim).map(|_| (next() % 20_000) as f32 / 10_000.0 - 1.0).collect();
        // Labels cluster on few classes so that positives repeat across shards and processes.
        let labels: Vec<i64> = (0..n).map(|_| (next() % 97 * 10 % classes) as i64).collect();
        write_f32(&dir.join(format!("emb.{t}.bin")), &emb);
        write_i64(&dir.join(format!("labels.{t}.bin")), &labels);
        let text: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
        std::fs::write(dir.join(format!("rows.{t}.txt")), text.join(" ")).unwrap();
    }
    Case { dir }
}

#[test]
fn layouts_over_processes_match_one_process() {
    let layouts: [&[usize]; 6] = [&[1, 1], &[2, 2], &[1, 2, 1], &[2, 1, 1], &[1, 1, 1, 1], &[2, 1, 2, 1]];
    for layout in layouts {
        let total: usize = layout.iter().sum();
        for (rate, adamw) in [(1.0, false), (0.3, true)] {
            let name = format!("{}-{rate}-{adamw}", layout.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("_"));
            let case = synthetic(&name, total, layout, rate, adamw);
            // One thread per process and in the one-process head beside it: the same blocks, the
            // same rank-ordered reductions, so the results must agree bit for bit.
            let out = run_parity(&case.dir, layout.len(), &["--bitwise"]);
            eprintln!("{layout:?} r={rate} adamw={adamw}: {}", out.lines().next().unwrap_or_default());
        }
    }
}

/// AdaFace and CurricularFace over processes at r = 0.3: loss, gradients, centers and running
/// statistics bit for bit those of one process (CurricularFace's target cosines cross processes
/// in the pre-pass exchange).
#[test]
fn adaptive_margins_over_processes_match_one_process() {
    let layouts: [&[usize]; 2] = [&[2, 1], &[1, 2, 1]];
    for layout in layouts {
        for kind in [partialfc::ffi::PFC_MARGIN_ADAFACE, partialfc::ffi::PFC_MARGIN_CURRICULAR] {
            let name = format!("margin{kind}-{}", layout.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("_"));
            let case = synthetic(&name, layout.iter().sum(), layout, 0.3, false);
            let config = case.dir.join("config.txt");
            let text = std::fs::read_to_string(&config).unwrap();
            std::fs::write(&config, format!("{text}margin_kind {kind}\n")).unwrap();
            run_parity(&case.dir, layout.len(), &["--bitwise"]);
        }
    }
}

/// bf16 storage over processes, SGD and AdamW: the stochastic rounding's draws follow the global
/// class, so every process layout stores what one process stores, bit for bit.
#[test]
fn bf16_storage_over_processes_matches_one_process() {
    for layout in [&[2usize, 1][..], &[1, 1, 2]] {
        for (rate, adamw) in [(1.0, false), (0.3, true)] {
            let name = format!("bf16-{}-{rate}-{adamw}", layout.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("_"));
            let case = synthetic(&name, layout.iter().sum(), layout, rate, adamw);
            let config = case.dir.join("config.txt");
            let text = std::fs::read_to_string(&config).unwrap();
            std::fs::write(&config, format!("{text}storage_dtype {}\n", partialfc::ffi::PFC_DTYPE_BF16)).unwrap();
            run_parity(&case.dir, layout.len(), &["--bitwise"]);
        }
    }
}

#[test]
fn golden_vectors_through_processes() {
    let adaptive = Golden::of_head("adaface").into_iter().chain(Golden::of_head("curricular"));
    for g in Golden::all().into_iter().chain(adaptive) {
        let (c, d) = (g.usize("num_classes"), g.usize("embedding_dim"));
        let world = g.usize("world_size");
        let steps = g.usize("steps");
        // Two processes sharing the file's shards (or one each when it has a single shard).
        let layout: Vec<usize> = if world >= 2 { vec![world - world / 2, world / 2] } else { vec![1, 1] };
        let total: usize = layout.iter().sum();
        let dir = scratch(&format!("mpi-golden-{}", g.name));
        let cfg = g.pfc_config(1);
        let optimizer = if cfg.optimizer == partialfc::ffi::PFC_OPTIMIZER_ADAMW { 1 } else { 0 };
        std::fs::write(
            dir.join("config.txt"),
            format!(
                "num_classes {c}\nembedding_dim {d}\nsteps {steps}\nsample_rate {}\nscale {}\nm1 {}\nm2 {}\nm3 {}\ninterclass_filter {}\n\
                 margin_kind {}\nmargin_m {}\nadaface_h {}\nadaface_t_alpha {}\n\
                 lr {}\nmomentum {}\nweight_decay {}\noptimizer {optimizer}\nseed 0\nexpect 1\nexpect_tol 1e-4\nshards {}\n",
                cfg.sample_rate,
                cfg.scale,
                cfg.m1,
                cfg.m2,
                cfg.m3,
                cfg.interclass_filter,
                cfg.margin_kind,
                cfg.margin_m,
                cfg.adaface_h,
                cfg.adaface_t_alpha,
                cfg.lr,
                cfg.momentum,
                cfg.weight_decay,
                layout.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
            ),
        )
        .unwrap();
        assert!(optimizer == 0 || (cfg.beta1 == 0.9 && cfg.beta2 == 0.999 && cfg.eps == 1e-8), "{}: AdamW betas beyond the defaults", g.name);
        write_f32(&dir.join("weight_init.bin"), &g.f32("weight_init"));
        for t in 0..steps {
            let labels = g.i64(&format!("labels.{t}"));
            let n = labels.len();
            let rows: Vec<String> = (0..total).map(|s| (n / total + usize::from(s < n % total)).to_string()).collect();
            std::fs::write(dir.join(format!("rows.{t}.txt")), rows.join(" ")).unwrap();
            write_f32(&dir.join(format!("emb.{t}.bin")), &g.f32(&format!("emb.{t}")));
            write_i64(&dir.join(format!("labels.{t}.bin")), &labels);
            write_f32(&dir.join(format!("loss.{t}.bin")), &g.f32(&format!("loss.{t}")));
            // The reference returns its world size times the local gradient; we return the job's.
            let grad: Vec<f32> = g.f32(&format!("grad_emb.{t}")).iter().map(|v| v / world as f32 * total as f32).collect();
            write_f32(&dir.join(format!("grad_emb.{t}.bin")), &grad);
            write_f32(&dir.join(format!("weight.{t}.bin")), &g.f32(&format!("weight.{t}")));
            if g.head().is_some() {
                write_f32(&dir.join(format!("state.{t}.bin")), &g.f32(&format!("state.{t}")));
            }
        }
        run_parity(&dir, layout.len(), &[]);
    }
}

#[test]
fn bad_input_on_one_process_fails_everywhere_and_changes_nothing() {
    let case = synthetic("bad", 4, &[2, 1, 1], 0.3, false);
    run_parity(&case.dir, 3, &["--bad-label", "1", "2", "--nan-row", "2", "0"]);
}

/// One process alone cannot prove its update safe before the backward pass (a center near the
/// norm limit on its shard): the job agrees, every process takes the checked path, and the steps
/// still match one process. Without the agreement the processes' exchanges would fall out of step.
#[test]
fn an_update_one_process_cannot_prove_takes_the_checked_path_everywhere() {
    let case = synthetic("unprovable", 3, &[1, 2], 1.0, false);
    run_parity(&case.dir, 2, &["--unprovable"]);
}

#[test]
fn a_failing_callback_poisons_every_process() {
    let case = synthetic("fail", 3, &[2, 1], 1.0, false);
    // Call 0 creates the head's consensus; a later call lands inside a step.
    for call in ["9", "14"] {
        run_parity(&case.dir, 2, &["--fail-callback", call]);
    }
}

#[test]
fn mismatched_configurations_fail_everywhere_naming_the_field() {
    let case = synthetic("mismatch", 3, &[2, 1], 1.0, false);
    for field in ["lr", "num_classes", "world_size", "embedding_dim", "margin_kind", "storage_dtype"] {
        run_parity(&case.dir, 2, &["--mismatch", field]);
    }
}

/// Compiles one MPI program against the library (OpenMPI's wrappers are installed by setup).
fn build_example(compiler: &str, source: &str, name: &str, flags: &[&str]) -> PathBuf {
    let exe = scratch(&format!("mpi-example-{name}")).join(name);
    let cpp = root().join("bindings/cpp");
    let mut flags = flags.to_vec();
    flags.extend(["-I", cpp.to_str().unwrap()]);
    compile(compiler, &flags, source, lib_dir(), &exe);
    exe
}

/// examples/mpi/train.c, the README's multi-process recipe, learns over 2 and 3 processes; the
/// benchmark recipe runs; the C++ binding's callable all-gather (examples/mpi/train.cpp) works over
/// 3 processes with uneven shards.
#[test]
fn mpi_examples_train_over_processes() {
    let c = build_example("mpicc", "examples/mpi/train.c", "train", &["-std=c11"]);
    for (procs, shards) in [(2, "1"), (3, "2")] {
        let mut cmd = mpirun(procs);
        cmd.arg(&c).args(["2000", shards, "30"]);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{}", describe(&format!("{cmd:?}"), &out));
        assert!(text.contains("learning") && !text.contains("NOT learning"), "{text}");
        eprintln!("{procs} processes × {shards}: {}", text.lines().last().unwrap_or_default());
    }
    // The benchmark recipe of docs/benchmarks.md, on a small job.
    let bench = build_example("mpicc", "examples/mpi/bench.c", "bench", &["-std=c11"]);
    let mut cmd = mpirun(2);
    cmd.arg(&bench).args(["5000", "0.2", "64", "1", "3", "32"]);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", describe(&format!("{cmd:?}"), &out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("median step"), "{}", String::from_utf8_lossy(&out.stdout));
    let cpp = build_example("mpicxx", "examples/mpi/train.cpp", "train_cpp", &["-std=c++17"]);
    let mut cmd = mpirun(3);
    cmd.arg(&cpp);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", describe(&format!("{cmd:?}"), &out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("on every process"));
}
