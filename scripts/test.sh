#!/usr/bin/env bash
# Every test of the project: unit tests, golden parity, the float64 reference and finite differences,
# sampling statistics, bad input at the C boundary, header freshness, the C program as C11 and C++17,
# the `pfc` command line, every CUDA kernel compiled by NVRTC, and the PyTorch binding (tests/python).
# Installs what it needs when missing (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
if ! command -v cc >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq gcc g++ >/dev/null
fi
# The Go binding's tests (tests/bindings.rs) need Go: Debian's golang-go when none is found.
if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ]; then
    apt-get update -qq && apt-get install -y -qq golang-go >/dev/null
fi
# tests/export_search.rs reads the exports back with numpy and the safetensors package.
if ! python3 -c 'import numpy, safetensors' >/dev/null 2>&1; then
    python3 -m pip install --quiet numpy safetensors \
        || python3 -m pip install --quiet --break-system-packages numpy safetensors
fi
if [ ! -d ../shared/golden ]; then
    echo "../shared/golden (the reference vectors) must sit beside the repository" >&2
    exit 1
fi

# NVRTC 13.0 (matching the lent GPUs' driver) compiles every CUDA kernel in tests/kernels.rs; no
# GPU is needed. Installed once into .tools/ (ignored by git).
nvrtc_lib=.tools/nvrtc/nvidia/cu13/lib
if [ ! -e "$nvrtc_lib/libnvrtc.so.13" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target .tools/nvrtc "nvidia-cuda-nvrtc==13.0.88"
fi
export LD_LIBRARY_PATH="$PWD/$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The C tests link the cdylib, which `cargo test` does not build by itself.
cargo build --release --locked --lib --bins
cargo test --release --locked

# The PyTorch binding: installed into the project venv the way users install it, then its tests
# (pytest fails on no tests collected, exit 5, like any other failure here).
bash scripts/python-env.sh
.venv/bin/python -m pip install --quiet --disable-pip-version-check ./bindings/python
.venv/bin/python -m pytest -q tests/python
