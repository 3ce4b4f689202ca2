//! Helpers for the tests that build and run native programs against the library (C, C++, Go, MPI):
//! one nested `cargo build --release --lib` per run of the test binary (shared by all its modules),
//! commands that fail loudly, scratch directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, panicking with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(out.status.success(), "{}", describe(&what, &out));
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cargo build --release --lib` once per test process, for all its modules; the directory holding
/// libpartialfc.so and libpartialfc.a (taken from cargo's JSON messages, so any target-dir setting
/// is respected).
pub fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = run(Command::new(&cargo).current_dir(root()).args([
            "build",
            "--release",
            "--locked",
            "--lib",
            "--message-format=json-render-diagnostics",
        ]));
        let files: Vec<PathBuf> = stdout(&out)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "partialfc")
            .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
            .filter_map(|f| f.as_str().map(PathBuf::from))
            .collect();
        let so = files
            .iter()
            .find(|f| f.extension().is_some_and(|e| e == "so"))
            .unwrap_or_else(|| panic!("cargo reported no libpartialfc.so: {files:?}"));
        let dir = so.parent().unwrap().to_path_buf();
        assert!(dir.join("libpartialfc.a").is_file(), "no libpartialfc.a beside {}", so.display());
        dir
    })
}

/// A fresh scratch directory under cargo's per-target temporary directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = crate::common::test_tmpdir().join(format!("bindings-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `go` command: $GO, then PATH, then the usual install places. Missing, the test fails.
pub fn go() -> PathBuf {
    if let Some(go) = std::env::var_os("GO").filter(|g| !g.is_empty()) {
        return PathBuf::from(go);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("go")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/local/go/bin/go", "/usr/lib/go/bin/go"].map(PathBuf::from))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the Go toolchain is missing, so the Go binding cannot be tested: run `bash scripts/test.sh` \
                 (it installs Debian's golang-go), or `apt-get install golang-go`, or set GO=/path/to/go"
            )
        })
}

/// Compiles the C or C++ source `src` (under the repository) into `exe` against include/ and the
/// library in `lib_dir` (rpath set), with warnings as errors and the given language flags.
pub fn compile(compiler: &str, lang_flags: &[&str], src: &str, lib_dir: &Path, exe: &Path) {
    let mut cmd = Command::new(compiler);
    cmd.args(lang_flags)
        .args(["-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join(src))
        .arg("-o")
        .arg(exe)
        .arg("-L")
        .arg(lib_dir)
        .arg("-lpartialfc")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-lm");
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run the compiler {compiler:?} (is it installed?): {e}"));
    assert!(out.status.success(), "{}", describe(&format!("{cmd:?}"), &out));
}

/// `mpirun` with what this machine needs: root is allowed, more processes than cores, shared
/// memory without cross-memory attach (containers forbid it), one thread per process's pool, and a
/// session directory of its own (concurrent mpiruns racing to create /tmp/ompi.HOST.UID fail).
pub fn mpirun(n: usize) -> Command {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let session = crate::common::test_tmpdir().join(format!("ompi-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&session).unwrap();
    let mut cmd = Command::new("mpirun");
    cmd.env("OMPI_MCA_orte_tmpdir_base", &session)
        .args(["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", &n.to_string()])
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_btl", "self,vader")
        .env("RAYON_NUM_THREADS", "1");
    cmd
}
