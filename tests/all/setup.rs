//! `scripts/setup.sh --check`: each requirement of the tests, checked by what the tests do with it,
//! listed as present or missing, nothing installed.

use crate::native::root;
use std::process::{Command, Output};

fn check(path: &std::ffi::OsStr) -> Output {
    Command::new("bash").arg("scripts/setup.sh").arg("--check").current_dir(root()).env("PATH", path).output().expect("run bash")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn every_requirement_is_present_after_setup() {
    // The test command ran setup first, so on its machine every check passes.
    let out = check(&std::env::var_os("PATH").unwrap_or_default());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "setup --check failed:\n{stdout}\n{stderr}");
    let present = stdout.lines().filter(|l| l.trim_start().starts_with("present")).count();
    assert_eq!(present, stdout.lines().count(), "{stdout}");
    for requirement in ["OpenMPI (an mpicc program runs on 2 processes under mpirun)", "oneDNN (dnnl.h, libdnnl)", "Boost.Context (a fiber switches and returns)", "Go with cgo", "cargo-c (cargo cinstall"] {
        assert!(stdout.contains(requirement), "{requirement} is not checked:\n{stdout}");
    }
}

#[test]
fn a_machine_without_the_tools_gets_each_one_named_and_nothing_installed() {
    // A PATH with cargo and the shell's few utilities only: no compiler, no mpicc, no python3 and
    // no apt-get, so an attempt to install would show in stderr.
    let bin = crate::common::test_tmpdir().join(format!("setup-bare-path-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).unwrap();
    let cargo = std::env::var_os("CARGO").map(std::path::PathBuf::from).expect("cargo runs the tests");
    std::os::unix::fs::symlink(&cargo, bin.join("cargo")).unwrap();
    for tool in ["bash", "mktemp", "rm", "sed", "dirname", "mkdir"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{tool} is not on PATH"));
        std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
    }
    let out = check(bin.as_os_str());
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    for requirement in ["C compiler (cc, C11)", "OpenMPI (an mpicc program runs on 2 processes under mpirun)", "oneDNN (dnnl.h, libdnnl)", "Boost.Context (a fiber switches and returns)", "python3: faiss", "jq"] {
        assert!(stdout.lines().any(|l| l.trim_start() == format!("missing  {requirement}")), "{requirement} not named missing:\n{stdout}");
    }
    assert!(stderr.contains("missing (bash scripts/setup.sh installs them)"), "{stderr}");
    assert!(!stderr.contains("installing") && !stderr.contains("apt-get"), "--check tried to install:\n{stderr}");
}
