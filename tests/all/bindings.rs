//! The host bindings (SPEC §4): builds libpartialfc (shared and static) with a nested
//! `cargo build --release --lib` as tests/all/c_program.rs does, then
//! - compiles tests/cpp/binding_test.cpp against bindings/cpp/partialfc.hpp with
//!   `g++ -std=c++17 -Wall -Wextra -Werror -pedantic` and runs it;
//! - runs `go vet` and `go test` on bindings/go/partialfc, linked with this checkout's build
//!   (`-tags partialfc_repo`; tests/all/install.rs covers the default pkg-config build): on the default build (zero-copy batches
//!   through runtime.Pinner on Go ≥ 1.21), on the copying build (`-tags partialfc_copy`, what Go
//!   1.19 uses), and under the strict cgo pointer checker (GOEXPERIMENT=cgocheck2, or
//!   GODEBUG=cgocheck=2 before Go 1.21), which aborts on any Go pointer C memory keeps;
//! - builds the examples: examples/cpp/train.cpp (linked with libpartialfc.a) trains, saves a
//!   checkpoint, exports centers and writes queries; examples/go/identify (linked both ways)
//!   answers those queries through a search-only index over each exported file and the checkpoint.
//!
//! A missing `go` fails the test with a message: scripts/test.sh installs Debian's golang-go. Go
//! runs offline (GOPROXY=off, GOTOOLCHAIN=local) with its caches under the target directory.

use crate::native::{describe, go, lib_dir, root, run, scratch, stdout};
use std::path::Path;
use std::process::Command;

/// $CXX, else g++ (the compiler), else c++.
fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| {
        let has_gxx = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("g++").is_file()));
        if has_gxx { "g++" } else { "c++" }.into()
    })
}

/// `g++ -std=c++17 -Wall -Wextra -Werror -pedantic` with the header paths; link flags follow.
fn cxx17(src: &str, exe: &Path, optimize: bool) -> Command {
    let mut cmd = Command::new(cxx());
    cmd.args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .args(if optimize { &["-O2"][..] } else { &[][..] })
        .arg("-I")
        .arg(root().join("include"))
        .arg("-I")
        .arg(root().join("bindings/cpp"))
        .arg(root().join(src))
        .arg("-o")
        .arg(exe);
    cmd
}

#[test]
fn cpp_binding_compiles_as_cxx17_and_passes() {
    let lib = lib_dir();
    let dir = scratch("cpp");
    let exe = dir.join("binding_test");
    run(cxx17("tests/cpp/binding_test.cpp", &exe, false)
        .arg("-L")
        .arg(lib)
        .arg("-lpartialfc")
        .arg(format!("-Wl,-rpath,{}", lib.display())));
    let out = run(Command::new(&exe).arg(dir.join("work")));
    let text = stdout(&out);
    let last = text.lines().last().unwrap_or_default();
    assert!(last.starts_with("c++ binding (C++17): ") && last.ends_with("checks passed"), "unexpected output:\n{text}");
    eprintln!("{last}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Inside the repository the binding links this checkout's build (link_repo*.go); the default,
/// pkg-config build against an installed prefix is tests/all/install.rs's.
const REPO_TAGS: &str = "-tags=partialfc_repo";

/// A `go` command in `dir`, offline, with caches under the target directory and the freshly built
/// library first on the linker's path.
fn go_cmd(dir: &str, args: &[&str]) -> Command {
    let lib = lib_dir();
    let state = lib.parent().unwrap_or(lib).join("go");
    let mut cmd = Command::new(go());
    cmd.current_dir(root().join(dir))
        .args(args)
        .env("GOCACHE", state.join("cache"))
        .env("GOPATH", state.join("path"))
        .env("GOMODCACHE", state.join("path/pkg/mod"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOSUMDB", "off")
        .env("GO111MODULE", "on")
        .env("CGO_ENABLED", "1")
        .env("CGO_LDFLAGS", format!("-L{} -Wl,-rpath,{}", lib.display(), lib.display()))
        .env_remove("GOEXPERIMENT")
        .env_remove("GODEBUG");
    cmd
}

/// The Go minor version (`go1.21.3` → 21).
fn go_minor() -> u32 {
    let out = run(&mut go_cmd("bindings/go/partialfc", &["env", "GOVERSION"]));
    let v = stdout(&out);
    v.trim()
        .strip_prefix("go1.")
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the Go version {v:?}"))
}

fn gofmt_clean(dir: &str) {
    let gofmt = go().with_file_name("gofmt");
    if !gofmt.is_file() {
        eprintln!("no gofmt beside {}; formatting not checked", go().display());
        return;
    }
    let out = run(Command::new(gofmt).arg("-l").arg(root().join(dir)));
    assert!(out.stdout.is_empty(), "gofmt -l lists files to format:\n{}", stdout(&out));
}

#[test]
fn go_package_vets_and_passes_its_tests() {
    let pkg = "bindings/go/partialfc";
    let minor = go_minor();
    gofmt_clean(pkg);
    // The default, pkg-config builds need an installed prefix: tests/all/install.rs builds them.
    for tags in ["partialfc_repo", "partialfc_repo,partialfc_copy", "partialfc_repo,partialfc_static"] {
        run(&mut go_cmd(pkg, &["vet", &format!("-tags={tags}"), "./..."]));
    }
    let out = run(&mut go_cmd(pkg, &["test", "-count=1", REPO_TAGS, "./..."]));
    eprint!("{}", stdout(&out));
    run(&mut go_cmd(pkg, &["test", "-count=1", "-tags=partialfc_repo,partialfc_copy", "./..."]));
    // The strict pointer checker: any Go pointer written into C memory (or passed inside Go memory)
    // aborts the program.
    let mut strict = go_cmd(pkg, &["test", "-count=1", REPO_TAGS, "./..."]);
    if minor >= 21 {
        strict.env("GOEXPERIMENT", "cgocheck2");
    } else {
        strict.env("GODEBUG", "cgocheck=2");
    }
    run(&mut strict);
}

#[test]
fn examples_build_train_export_and_identify() {
    let lib = lib_dir();
    let dir = scratch("examples");

    // The C++ training loop, linked statically.
    let train = dir.join("pfc_train_cpp");
    run(cxx17("examples/cpp/train.cpp", &train, true)
        .arg(lib.join("libpartialfc.a"))
        .args(["-lpthread", "-ldl", "-lm"]));
    let out_dir = dir.join("out");
    let out = run(Command::new(&train).arg(&out_dir).arg("200"));
    let text = stdout(&out);
    eprint!("{text}");
    assert!(text.contains("identification top-1"), "unexpected output:\n{text}");
    for f in ["checkpoint/manifest.json", "centers.npy", "centers.fvecs", "centers.faiss", "centers.safetensors", "queries.txt"] {
        assert!(out_dir.join(f).is_file(), "the C++ example did not write {f}");
    }

    // The Go identification example, linked with the shared and with the static library.
    let example = "examples/go/identify";
    gofmt_clean(example);
    run(&mut go_cmd(example, &["vet", REPO_TAGS, "./..."]));
    let shared = dir.join("identify");
    let stat = dir.join("identify_static");
    run(go_cmd(example, &["build", REPO_TAGS, "-o"]).arg(&shared));
    run(go_cmd(example, &["build", "-tags=partialfc_repo,partialfc_static", "-o"]).arg(&stat));
    let binary = std::fs::read(&stat).unwrap();
    assert!(
        !binary.windows(15).any(|w| w == b"libpartialfc.so"),
        "the static build still depends on libpartialfc.so"
    );

    let queries = out_dir.join("queries.txt");
    for (exe, source) in [
        (&shared, "centers.npy"),
        (&shared, "centers.fvecs"),
        (&shared, "centers.faiss"),
        (&shared, "checkpoint"),
        (&stat, "centers.safetensors"),
        (&stat, "checkpoint"),
    ] {
        let out = run(Command::new(exe).arg("-quiet").arg("-queries").arg(&queries).arg(out_dir.join(source)));
        let text = stdout(&out);
        let top1: f64 = text
            .split("top-1 ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no top-1 rate in the output of identify {source}:\n{text}"));
        assert!(top1 >= 0.5, "identify {source}: top-1 {top1} is too low:\n{text}");
        eprint!("{source}: {text}");
    }
    // A corrupt checkpoint is reported with its status, not a crash.
    let shard = std::fs::read_dir(out_dir.join("checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("a shard file in the checkpoint");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() - 6;
    bytes[at] ^= 0x01;
    std::fs::write(&shard, bytes).unwrap();
    let out = Command::new(&shared).arg("-queries").arg(&queries).arg(out_dir.join("checkpoint")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("PFC_ERR_CORRUPT"),
        "identify on a corrupt checkpoint: {}",
        describe("identify", &out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The bindings' tables of statuses and enumerations derive from the header (their constants are
/// the header's macros): every value the header defines has its constant in both bindings, so a
/// status or format added to the C ABI cannot be forgotten there.
#[test]
fn bindings_cover_every_status_and_enumeration_of_the_header() {
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let header = read("include/partialfc.h");
    let go: String = ["partialfc.go", "index.go"].iter().map(|f| read(&format!("bindings/go/partialfc/{f}"))).collect();
    let cpp = read("bindings/cpp/partialfc.hpp");
    let tables = ["PFC_ERR_", "PFC_FORMAT_", "PFC_DTYPE_", "PFC_OPTIMIZER_", "PFC_MARGIN_GRAD_", "PFC_BACKEND_"];
    let names: Vec<&str> = header
        .lines()
        .filter_map(|l| l.strip_prefix("#define "))
        .filter_map(|d| d.split_whitespace().next())
        .filter(|n| tables.iter().any(|t| n.starts_with(t)))
        .collect();
    assert!(names.len() >= 20, "too few table entries found in the header: {names:?}");
    let in_text = |text: &str, token: &str| {
        text.match_indices(token).any(|(i, _)| !text[i + token.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
    };
    for name in names {
        assert!(in_text(&go, &format!("C.{name}")), "the Go binding has no constant for {name}");
        assert!(in_text(&cpp, name), "the C++ binding has no constant for {name}");
    }
}
