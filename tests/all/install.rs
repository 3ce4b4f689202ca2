//! The library installed as a system C library, used the way consumers outside the repository use
//! it. `cargo cinstall` (cargo-c, installed by scripts/setup.sh) puts it into a temporary prefix once
//! per test process; then
//! - the soname: `readelf -d` shows libpartialfc.so.0; libpartialfc.so and .so.0 link to .so.0.x.y;
//! - C: tests/c/abi_test.c (the whole header, training steps included) built with nothing but
//!   `pkg-config --cflags --libs partialfc`, and linked against the soname;
//! - C++: examples/cpp built by CMake with `find_package(partialfc CONFIG)` (shared and static
//!   imported targets), training, exporting and writing queries;
//! - Go: the binding published as a module (a file-system module proxy, so `go` fetches it into its
//!   module cache as from any repository), its own tests run from the module cache, and
//!   examples/go/identify copied outside the tree, built against the installed library through
//!   pkg-config (shared and static) and answering the C++ example's queries.

use crate::native::{describe, go, root, run, scratch, stdout};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const GO_MODULE: &str = "github.com/partialfc/partialfc/bindings/go/partialfc";

struct Prefix {
    root: PathBuf,
    libdir: PathBuf,
}

impl Prefix {
    fn pkg_config_path(&self) -> PathBuf {
        self.libdir.join("pkgconfig")
    }
}

/// `cargo cinstall` into a fresh prefix, once per test process.
fn prefix() -> &'static Prefix {
    static PREFIX: OnceLock<Prefix> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let probe = Command::new(&cargo).args(["cinstall", "--version"]).output();
        assert!(
            probe.is_ok_and(|o| o.status.success()),
            "cargo-c is missing (`cargo cinstall`): run `bash scripts/setup.sh`, which installs cargo-c 0.10.24"
        );
        let root = scratch("install").join("prefix");
        run(Command::new(&cargo).current_dir(crate::native::root()).args(["cinstall", "--release", "--locked", "--prefix"]).arg(&root));
        // The libdir is cargo-c's default for this system (lib, lib64 or Debian's lib/<multiarch>).
        let pc = find(&root, "partialfc.pc").unwrap_or_else(|| panic!("cargo cinstall wrote no partialfc.pc under {}", root.display()));
        let libdir = pc.parent().unwrap().parent().unwrap().to_path_buf();
        Prefix { root, libdir }
    })
}

fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir() && !path.is_symlink() {
            if let Some(found) = find(&path, name) {
                return Some(found);
            }
        }
    }
    None
}

fn pkg_config(args: &[&str]) -> String {
    let out = run(Command::new("pkg-config").args(args).arg("partialfc").env("PKG_CONFIG_PATH", prefix().pkg_config_path()));
    stdout(&out).trim().to_string()
}

/// The NEEDED and SONAME entries of an ELF file.
fn dynamic_entries(file: &Path) -> String {
    stdout(&run(Command::new("readelf").arg("-d").arg(file)))
}

#[test]
fn installs_a_versioned_shared_library_headers_and_package_files() {
    let p = prefix();
    let (major, minor, patch) = (env!("CARGO_PKG_VERSION_MAJOR"), env!("CARGO_PKG_VERSION_MINOR"), env!("CARGO_PKG_VERSION_PATCH"));
    let real = format!("libpartialfc.so.{major}.{minor}.{patch}");
    let soname = format!("libpartialfc.so.{major}");
    for link in ["libpartialfc.so", soname.as_str()] {
        assert_eq!(std::fs::read_link(p.libdir.join(link)).ok().as_deref(), Some(Path::new(&real)), "{link} is not a link to {real}");
    }
    assert!(p.libdir.join(&real).is_file() && p.libdir.join("libpartialfc.a").is_file());
    let dynamic = dynamic_entries(&p.libdir.join(&real));
    assert!(dynamic.contains(&format!("Library soname: [{soname}]")), "readelf -d {real}:\n{dynamic}");

    let include = p.root.join("include/partialfc");
    for header in ["partialfc.h", "partialfc.hpp"] {
        let installed = std::fs::read(include.join(header)).unwrap_or_else(|e| panic!("{header} is not installed: {e}"));
        let source = if header == "partialfc.h" { "include/partialfc.h" } else { "bindings/cpp/partialfc.hpp" };
        assert!(installed == std::fs::read(root().join(source)).unwrap(), "the installed {header} differs from {source}");
    }
    for f in ["partialfcConfig.cmake", "partialfcConfigVersion.cmake"] {
        assert!(p.root.join("share/cmake/partialfc").join(f).is_file(), "share/cmake/partialfc/{f} is not installed");
    }
    assert_eq!(pkg_config(&["--modversion"]), VERSION);
    assert_eq!(pkg_config(&["--cflags"]), format!("-I{}", include.display()));
}

#[test]
fn a_c_program_builds_with_pkg_config_alone() {
    let p = prefix();
    let dir = scratch("install-c");
    let exe = dir.join("abi_test");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let flags = pkg_config(&["--cflags", "--libs"]);
    run(Command::new(&cc)
        .args(["-std=c11", "-pedantic", "-Wall", "-Wextra", "-Werror"])
        .arg(root().join("tests/c/abi_test.c"))
        .args(flags.split_whitespace())
        // The program's own use of libm (sqrt, fabs), not the library's.
        .arg("-lm")
        .arg("-o")
        .arg(&exe));
    let dynamic = dynamic_entries(&exe);
    assert!(dynamic.contains("Shared library: [libpartialfc.so.0]"), "the program is not linked against the soname:\n{dynamic}");
    let out = run(Command::new(&exe).env("LD_LIBRARY_PATH", &p.libdir));
    let text = stdout(&out);
    let last = text.lines().last().unwrap_or_default();
    assert!(last.starts_with("c abi (C11)") && last.contains("checks passed"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// examples/cpp configured and built by CMake against the prefix; `static_lib` picks the
/// partialfc::partialfc_static target. Returns the executable.
fn cmake_example(dir: &Path, static_lib: bool) -> PathBuf {
    let build = dir.join(if static_lib { "build-static" } else { "build" });
    run(Command::new("cmake")
        .arg("-S")
        .arg(root().join("examples/cpp"))
        .arg("-B")
        .arg(&build)
        .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix().root.display()))
        .arg(format!("-DPFC_STATIC={}", if static_lib { "ON" } else { "OFF" }))
        .arg("-DCMAKE_BUILD_TYPE=Release"));
    run(Command::new("cmake").arg("--build").arg(&build));
    build.join("pfc_train_cpp")
}

/// The C++ example's outputs (checkpoint, exported centers, queries), built and run once.
fn cpp_outputs() -> &'static Path {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    OUT.get_or_init(|| {
        let dir = scratch("install-cpp");
        let shared = cmake_example(&dir, false);
        let dynamic = dynamic_entries(&shared);
        assert!(dynamic.contains("Shared library: [libpartialfc.so.0]"), "{dynamic}");
        let out_dir = dir.join("out");
        // CMake gives the build tree an rpath to the imported library: no LD_LIBRARY_PATH needed.
        let text = stdout(&run(Command::new(&shared).arg(&out_dir).arg("150")));
        assert!(text.contains("identification top-1"), "unexpected output:\n{text}");
        for f in ["checkpoint/manifest.json", "centers.npy", "centers.safetensors", "queries.txt"] {
            assert!(out_dir.join(f).is_file(), "the C++ example did not write {f}");
        }
        out_dir
    })
}

#[test]
fn the_cpp_example_builds_with_cmake_find_package() {
    let out = cpp_outputs();
    assert!(out.join("centers.npy").is_file());
    let dir = scratch("install-cpp-static");
    let stat = cmake_example(&dir, true);
    let dynamic = dynamic_entries(&stat);
    assert!(!dynamic.contains("libpartialfc"), "the static build still needs the shared library:\n{dynamic}");
    let text = stdout(&run(Command::new(&stat).arg(dir.join("out")).arg("20")));
    assert!(text.contains("identification top-1"), "unexpected output:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file-system module proxy serving the binding as `GO_MODULE@v<crate version>`, the layout the
/// go command fetches from (list, .info, .mod, .zip with `module@version/` paths).
fn go_proxy(dir: &Path) -> PathBuf {
    let proxy = dir.join("proxy");
    let at = proxy.join(GO_MODULE).join("@v");
    std::fs::create_dir_all(&at).unwrap();
    let version = format!("v{VERSION}");
    std::fs::write(at.join("list"), format!("{version}\n")).unwrap();
    std::fs::write(at.join(format!("{version}.info")), format!("{{\"Version\":\"{version}\",\"Time\":\"2026-01-01T00:00:00Z\"}}\n")).unwrap();
    let src = root().join("bindings/go/partialfc");
    std::fs::copy(src.join("go.mod"), at.join(format!("{version}.mod"))).unwrap();
    let script = r#"
import os, sys, zipfile
src, prefix, out = sys.argv[1:]
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path):
            z.write(path, prefix + "/" + name)
"#;
    run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&src)
        .arg(format!("{GO_MODULE}@{version}"))
        .arg(at.join(format!("{version}.zip"))));
    proxy
}

/// A `go` command outside the repository: modules only from `proxy`, caches in `dir`, cgo finding
/// the installed library through pkg-config.
fn go_cmd(dir: &Path, cwd: &Path, args: &[&str], proxy: &Path) -> Command {
    let p = prefix();
    let mut cmd = Command::new(go());
    cmd.current_dir(cwd)
        .args(args)
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        .env("GOMODCACHE", dir.join("gopath/pkg/mod"))
        .env("GOPROXY", format!("file://{}", proxy.display()))
        .env("GOSUMDB", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .env("GO111MODULE", "on")
        .env("CGO_ENABLED", "1")
        .env("PKG_CONFIG_PATH", p.pkg_config_path())
        .env("LD_LIBRARY_PATH", &p.libdir)
        .env_remove("CGO_LDFLAGS")
        .env_remove("CGO_CFLAGS")
        .env_remove("GOEXPERIMENT");
    cmd
}

#[test]
fn the_go_example_builds_from_the_module_cache_against_the_installed_library() {
    let dir = scratch("install-go");
    let proxy = go_proxy(&dir);

    // The example, copied outside the tree, without the repository's `replace`.
    let app = dir.join("identify");
    std::fs::create_dir_all(&app).unwrap();
    for f in ["main.go", "go.mod"] {
        std::fs::copy(root().join("examples/go/identify").join(f), app.join(f)).unwrap();
    }
    run(&mut go_cmd(&dir, &app, &["mod", "edit", &format!("-dropreplace={GO_MODULE}"), &format!("-require={GO_MODULE}@v{VERSION}")], &proxy));
    run(&mut go_cmd(&dir, &app, &["mod", "tidy"], &proxy));
    let cached = dir.join("gopath/pkg/mod").join(format!("{GO_MODULE}@v{VERSION}"));
    assert!(cached.join("partialfc.go").is_file(), "the module is not in the module cache at {}", cached.display());

    // The binding's own tests (training steps, checkpoints, search), run from the module cache.
    let out = run(&mut go_cmd(&dir, &app, &["test", "-count=1", GO_MODULE], &proxy));
    eprint!("{}", stdout(&out));

    let shared = dir.join("identify-shared");
    let stat = dir.join("identify-static");
    run(go_cmd(&dir, &app, &["build", "-o"], &proxy).arg(&shared));
    run(go_cmd(&dir, &app, &["build", "-tags=partialfc_static", "-o"], &proxy).arg(&stat));
    assert!(dynamic_entries(&shared).contains("Shared library: [libpartialfc.so.0]"));
    let static_needs = dynamic_entries(&stat);
    assert!(!static_needs.contains("libpartialfc"), "the static build still needs the shared library:\n{static_needs}");

    let out_dir = cpp_outputs();
    let queries = out_dir.join("queries.txt");
    for (exe, source, env_libdir) in [(&shared, "centers.npy", true), (&stat, "checkpoint", false)] {
        let mut cmd = Command::new(exe);
        cmd.arg("-quiet").arg("-queries").arg(&queries).arg(out_dir.join(source));
        if env_libdir {
            cmd.env("LD_LIBRARY_PATH", &prefix().libdir);
        } else {
            cmd.env_remove("LD_LIBRARY_PATH");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", describe(&format!("identify {source}"), &out));
        let text = stdout(&out);
        assert!(text.contains("top-1"), "identify {source}:\n{text}");
        eprint!("{source}: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
