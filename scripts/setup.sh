#!/usr/bin/env bash
# Every install the tests need. Each requirement is checked by what the tests do with it (a C++17
# program compiles, an MPI program compiles and links, a cgo package builds, the venv imports
# torch), never by a command that may come from another package, and installed only when that check
# fails; so a second run changes nothing and takes seconds. scripts/test.sh calls it; run it alone
# to prepare a machine. Needs Rust (cargo) and, for the Debian packages, root (apt-get).
#
#   bash scripts/setup.sh           install what is missing, then fail naming anything still missing
#   bash scripts/setup.sh --check   list each requirement as present or missing; install nothing
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    "") mode=install ;;
    --check) mode=check ;;
    *) echo "usage: bash scripts/setup.sh [--check]" >&2; exit 2 ;;
esac

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install Rust (https://rustup.rs) first" >&2
    exit 1
fi

# Probes are built under target/ (a /tmp mounted noexec would fail them while the tests, which run
# their programs from target/, pass); the cgo probe's build cache stays there from run to run.
gocache=$PWD/target/setup-probe/gocache
probe=$PWD/target/setup-probe/run-$$
mkdir -p "$probe" "$gocache"
trap 'rm -rf "$probe"' EXIT

# One `apt-get update` per run, and only when a package is actually missing.
apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        apt-get update -qq && apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pip_install() {
    python3 -m pip install --quiet --disable-pip-version-check "$@" \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

missing=()
# require NAME CHECK INSTALL...: runs CHECK (a function, quietly); when it fails, INSTALL... (in
# install mode) and CHECK again. With --check, only reports.
require() {
    local name=$1 check=$2
    shift 2
    if "$check" >"$probe/last.log" 2>&1; then
        [ "$mode" = check ] && printf '  present  %s\n' "$name"
        return 0
    fi
    if [ "$mode" = check ]; then
        printf '  missing  %s\n' "$name"
        missing+=("$name")
        return 0
    fi
    echo "setup: installing $name" >&2
    "$@" || true
    if ! "$check" >"$probe/last.log" 2>&1; then
        echo "setup: $name is still missing after installing it; its check said:" >&2
        sed 's/^/    /' "$probe/last.log" >&2
        missing+=("$name")
    fi
}

# The C program as C11 (tests/all/c_program.rs) and the bindings and examples as C++17
# (tests/all/bindings.rs).
# The tests take $CC and $CXX where set, as here.
c_compiles() { printf 'int main(void) { return 0; }\n' | "${CC:-cc}" -std=c11 -x c - -o "$probe/c"; }
cxx_compiles() { printf '#include <vector>\nint main() { std::vector<int> v(1); return v[0]; }\n' | "${CXX:-c++}" -std=c++17 -x c++ - -o "$probe/cxx"; }
require "C compiler (cc, C11)" c_compiles apt_install gcc libc6-dev
require "C++ compiler (c++, C++17)" cxx_compiles apt_install g++

# readelf for the installed soname, pkg-config and CMake as a consumer of the installed library
# uses them (tests/all/install.rs); jq reads the checkpoint manifest
# (tests/all/checkpoint_safety.rs).
has_readelf() { command -v readelf; }
has_pkg_config() { command -v pkg-config; }
has_cmake() { command -v cmake; }
has_jq() { command -v jq; }
require "readelf" has_readelf apt_install binutils
require "pkg-config" has_pkg_config apt_install pkg-config
require "CMake" has_cmake apt_install cmake
require "jq" has_jq apt_install jq

# Jobs over several processes (tests/all/mpi.rs, tests/all/persist_mpi.rs): programs built with
# mpicc against mpi.h and libmpi, started by mpirun. On Debian mpicc comes with openmpi-bin but mpi.h
# and the library to link with with libopenmpi-dev, so only building a program shows both are there.
mpi_builds() {
    printf '#include <mpi.h>\nint main(int c, char **v) { int n; MPI_Init(&c, &v); MPI_Comm_size(MPI_COMM_WORLD, &n); MPI_Finalize(); return n != 2; }\n' >"$probe/mpi.c"
    # Started as tests/all/native.rs's mpirun starts the tests' jobs (OpenMPI's flags and transports).
    mpicc -std=c11 "$probe/mpi.c" -o "$probe/mpi" \
        && env OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_orte_tmpdir_base="$probe" \
            mpirun --allow-run-as-root --oversubscribe --bind-to none -n 2 "$probe/mpi"
}
require "OpenMPI (an mpicc program runs on 2 processes under mpirun)" mpi_builds apt_install openmpi-bin libopenmpi-dev

# oneDNN, the CPU backend's GEMMs where present: loaded at run time as libdnnl.so.2 or libdnnl.so
# (src/backend/cpu/dnnl.rs) for its parity tests and the benchmarks. A program against its header
# that the loader then runs shows both.
dnnl_links() {
    printf '#include <oneapi/dnnl/dnnl.h>\nint main(void) { return dnnl_version() == 0; }\n' | cc -x c - -o "$probe/dnnl" -ldnnl \
        && "$probe/dnnl"
}
require "oneDNN (dnnl.h, libdnnl)" dnnl_links apt_install libdnnl-dev

# The CUDA emulation's blocks are Boost.Context fibers (tests/cuda-emulator/blocks.cc).
boost_context_links() {
    printf '#include <boost/context/fiber.hpp>\nint main() { int n = 0; boost::context::fiber f{[&](boost::context::fiber&& c) { n = 1; return std::move(c); }}; std::move(f).resume(); return n - 1; }\n' |
        "${CXX:-c++}" -std=c++17 -x c++ - -o "$probe/boost_context" -lboost_context && "$probe/boost_context"
}
require "Boost.Context (a fiber switches and returns)" boost_context_links apt_install libboost-context-dev

# The Go binding's tests and examples (tests/all/bindings.rs, tests/all/install.rs) build cgo
# packages with the `go` they find as tests/all/native.rs does: $GO, then PATH, then the usual
# install places.
go_bin() {
    local g
    for g in "${GO:-}" "$(command -v go || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
        if [ -n "$g" ] && [ -x "$g" ]; then
            echo "$g"
            return 0
        fi
    done
    return 1
}
cgo_builds() {
    local go
    go=$(go_bin) || { echo "no go command found"; return 1; }
    mkdir -p "$probe/cgo"
    printf 'module probe\n\ngo 1.19\n' >"$probe/cgo/go.mod"
    printf 'package main\n\n// int one(void) { return 1; }\nimport "C"\n\nfunc main() { _ = C.one() }\n' >"$probe/cgo/main.go"
    (cd "$probe/cgo" && env GOCACHE="$gocache" GOPATH="$probe/gopath" GOTOOLCHAIN=local GOPROXY=off \
        GOFLAGS=-mod=mod CGO_ENABLED=1 "$go" build -o "$probe/cgo/probe" .)
}
require "Go with cgo" cgo_builds apt_install golang-go

# tests/all/export_search.rs reads the exports back with numpy and safetensors; tests/all/index.rs
# opens the FAISS export with FAISS itself.
py_reads_exports() { python3 -c 'import numpy, safetensors'; }
py_has_faiss() { python3 -c 'import faiss'; }
require "python3: numpy, safetensors" py_reads_exports pip_install numpy safetensors
require "python3: faiss" py_has_faiss pip_install faiss-cpu

# The PyTorch binding's tests (tests/python) run in the project venv .venv (scripts/python-env.sh
# holds the pinned versions and checks them the same way).
venv_ready() { bash scripts/python-env.sh --check; }
require "project venv .venv (torch, numpy, safetensors, pytest)" venv_ready bash scripts/python-env.sh

# NVRTC 13.0 (matching the lent GPUs' driver) compiles every CUDA kernel in tests/all/kernels.rs; no
# GPU is needed. Installed into .tools/ (ignored by git); the check loads it as the tests do.
nvrtc_lib=.tools/nvrtc/nvidia/cu13/lib/libnvrtc.so.13
nvrtc_loads() { python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$PWD/$nvrtc_lib"; }
install_nvrtc() {
    rm -rf .tools/nvrtc
    python3 -m pip install --quiet --disable-pip-version-check --target .tools/nvrtc "nvidia-cuda-nvrtc==13.0.88"
}
require "NVRTC 13.0 (.tools/nvrtc)" nvrtc_loads install_nvrtc

# cargo-c (`cargo cinstall`) installs the library as a system C library: tests/all/install.rs.
# 0.10.24 is the newest release that builds with rustc 1.95 (later ones need 1.97). It is compiled
# from source once per machine into cargo's own bin directory, shared by every checkout; that takes
# a while on 2 cores (see README.md), so setups running at the same time wait for one compile
# (flock) instead of each starting its own. Building it needs OpenSSL's headers.
has_cargo_c() { cargo cinstall --version; }
install_cargo_c() {
    if ! pkg-config --exists openssl 2>/dev/null; then
        apt_install libssl-dev
    fi
    local cargo_home=${CARGO_HOME:-$HOME/.cargo}
    mkdir -p "$cargo_home"
    (
        flock 9
        if ! cargo cinstall --version >/dev/null 2>&1; then
            echo "setup: compiling cargo-c 0.10.24 (once per machine; several minutes)" >&2
            cargo install --locked --quiet cargo-c@0.10.24
        fi
    ) 9>"$cargo_home/.partialfc-cargo-c.lock"
}
require "cargo-c (cargo cinstall; 0.10.24 is installed when missing)" has_cargo_c install_cargo_c

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$mode" = check ]; then
        echo "setup --check: ${#missing[@]} missing (bash scripts/setup.sh installs them)" >&2
    else
        echo "setup: could not provide: ${missing[*]}" >&2
    fi
    exit 1
fi
