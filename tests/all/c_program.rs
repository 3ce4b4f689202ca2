//! Builds the cdylib, compiles tests/c/abi_test.c against include/partialfc.h as C11 and as C++17
//! with warnings as errors, and runs both programs (SPEC §4: "a C test program exercising the whole
//! header, compiled with -Wall -Werror as C11 and as C++17").
//!
//! `cargo test` builds the library's rlib for the tests but does not put the cdylib where a C
//! linker looks, so this test runs `cargo build --release --lib` itself (cargo releases its build
//! lock before running tests, so the nested build does not deadlock) and takes the library's path
//! from cargo's own JSON messages, which respects CARGO_TARGET_DIR and any other target-dir setting.

use crate::native::{compile, describe, lib_dir, scratch};
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(exe: &Path, want_banner: &str) {
    let out = Command::new(exe).output().unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    assert!(out.status.success(), "{}", describe(&exe.display().to_string(), &out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(want_banner) && last.contains("checks passed"),
        "{} printed an unexpected last line: {last:?}\n{stdout}",
        exe.display()
    );
    eprintln!("{last}");
}

/// `src` compiled against the library as C11 and as C++17, warnings as errors: the two programs in `dir`.
fn c11_and_cxx17(src: &str, dir: &Path, stem: &str) -> [PathBuf; 2] {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let (c_exe, cxx_exe) = (dir.join(format!("{stem}_c11")), dir.join(format!("{stem}_cxx17")));
    compile(&cc, &["-std=c11", "-pedantic"], src, lib_dir(), &c_exe);
    compile(&cxx, &["-x", "c++", "-std=c++17", "-pedantic"], src, lib_dir(), &cxx_exe);
    [c_exe, cxx_exe]
}

#[test]
fn c_abi_program_compiles_as_c11_and_cxx17_and_passes() {
    let dir = scratch("c_program");
    let [c_exe, cxx_exe] = c11_and_cxx17("tests/c/abi_test.c", &dir, "abi_test");
    run(&c_exe, "c abi (C11)");
    run(&cxx_exe, "c abi (C++17)");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A C program (as C11 and as C++17) training a CUDA head beside a CPU head: on a GPU machine with
/// its driver, else on the host emulation, which the program finds the way any program does — by the
/// loader path (tests/cuda-emulator/README.md).
#[test]
fn c_program_trains_on_the_cuda_backend() {
    if !crate::common::on_cuda(module_path!(), "c_program_trains_on_the_cuda_backend") {
        return;
    }
    let dir = scratch("c_cuda_train");
    let [c_exe, cxx_exe] = c11_and_cxx17("tests/c/cuda_train.c", &dir, "cuda_train");
    // The on_cuda child's environment (the loader path) passes on to the programs.
    let ran = |exe: &Path, banner: &str| {
        let out = Command::new(exe).output().unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
        assert!(out.status.success(), "{}", describe(&exe.display().to_string(), &out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(banner), "{stdout}");
    };
    ran(&c_exe, "cuda train (C11)");
    ran(&cxx_exe, "cuda train (C++17)");
    let _ = std::fs::remove_dir_all(&dir);
}
