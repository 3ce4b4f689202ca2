//! fork() after using the library (SPEC §2b): tests/c/fork_test.c, a C program that forks with the
//! library's worker threads running, and with another thread inside a step, and whose children
//! create and use heads (and get PFC_ERR_OUT_OF_MEMORY where a thread limit forbids the worker threads).

use crate::native::{compile, describe, lib_dir, scratch};
use std::process::Command;

#[test]
fn children_of_a_process_that_used_the_library_create_and_use_heads() {
    let lib = lib_dir();
    let dir = scratch("fork");
    let exe = dir.join("fork_test");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    compile(&cc, &["-std=c11", "-pedantic", "-pthread"], "tests/c/fork_test.c", lib, &exe);

    let work = dir.join("files");
    std::fs::create_dir_all(&work).unwrap();
    let out = Command::new(&exe).arg(&work).output().unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&exe.display().to_string(), &out));
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("fork: ") && last.ends_with("checks passed"), "unexpected output:\n{stdout}");
    eprintln!("{last}");
    let _ = std::fs::remove_dir_all(&dir);
}
