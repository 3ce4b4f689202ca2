#!/usr/bin/env bash
# Every install the tests need, each only when missing, so a second run changes nothing and takes
# seconds. scripts/test.sh calls it; run it alone to prepare a machine. Needs Rust (cargo) and, for
# the Debian packages, root (apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install Rust (https://rustup.rs) first" >&2
    exit 1
fi

# One `apt-get update` per run, and only when a package is actually missing.
apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
# Installs the Debian package $1 when any of the commands after it is missing.
need_cmds() {
    local pkg=$1
    shift
    local c
    for c in "$@"; do
        if ! command -v "$c" >/dev/null 2>&1; then
            apt_install "$pkg"
            return
        fi
    done
}

# C/C++ compilers (tests/c_program.rs, tests/bindings.rs), readelf for the installed soname, and the
# tools a consumer of the installed library uses: pkg-config and CMake (tests/install.rs).
need_cmds gcc cc gcc
need_cmds g++ c++ g++
need_cmds binutils readelf
need_cmds pkg-config pkg-config
need_cmds cmake cmake
# tests/checkpoint_safety.rs reads the checkpoint manifest with jq (and Python's json).
need_cmds jq jq
# tests/mpi.rs and tests/persist_mpi.rs run jobs over several processes with OpenMPI.
need_cmds openmpi-bin mpirun
need_cmds libopenmpi-dev mpicc

# tests/mpi.rs runs jobs over several processes with OpenMPI (mpicc, mpirun).
need_cmds openmpi-bin mpirun
need_cmds libopenmpi-dev mpicc

# oneDNN, the CPU backend's GEMMs when present (loaded at run time; src/backend/cpu/dnnl.rs), for
# its parity tests and the benchmarks.
if [ ! -e /usr/include/oneapi/dnnl/dnnl.h ]; then
    apt_install libdnnl-dev
fi

# The Go binding's tests need Go: Debian's golang-go when none is found.
if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ]; then
    apt_install golang-go
fi

# tests/export_search.rs reads the exports back with numpy and the safetensors package.
if ! python3 -c 'import numpy, safetensors' >/dev/null 2>&1; then
    python3 -m pip install --quiet numpy safetensors \
        || python3 -m pip install --quiet --break-system-packages numpy safetensors
fi

# tests/index.rs opens the PFC_FORMAT_FAISS export with FAISS itself and searches it.
if ! python3 -c 'import faiss' >/dev/null 2>&1; then
    python3 -m pip install --quiet faiss-cpu \
        || python3 -m pip install --quiet --break-system-packages faiss-cpu
fi

# The PyTorch binding's tests (tests/python) run in the project venv .venv with torch from PyPI.
bash scripts/python-env.sh

# NVRTC 13.0 (matching the lent GPUs' driver) compiles every CUDA kernel in tests/kernels.rs; no
# GPU is needed. Installed once into .tools/ (ignored by git).
if [ ! -e .tools/nvrtc/nvidia/cu13/lib/libnvrtc.so.13 ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target .tools/nvrtc "nvidia-cuda-nvrtc==13.0.88"
fi

# cargo-c (`cargo cinstall`) installs the library as a system C library: tests/install.rs.
# 0.10.24 is the newest release that builds with rustc 1.95 (later ones need 1.97). It is compiled
# from source once per machine into cargo's own bin directory, shared by every checkout; that takes
# a while on 2 cores (see README.md), so setups running at the same time wait for one compile
# (flock) instead of each starting its own. Building it needs OpenSSL's headers.
if ! cargo cinstall --version >/dev/null 2>&1; then
    if ! pkg-config --exists openssl 2>/dev/null; then
        apt_install libssl-dev
    fi
    cargo_home=${CARGO_HOME:-$HOME/.cargo}
    mkdir -p "$cargo_home"
    (
        flock 9
        if ! cargo cinstall --version >/dev/null 2>&1; then
            echo "setup: compiling cargo-c 0.10.24 (once per machine; several minutes)" >&2
            cargo install --locked --quiet cargo-c@0.10.24
        fi
    ) 9>"$cargo_home/.partialfc-cargo-c.lock"
fi
