#!/usr/bin/env bash
# Every test of the project: unit tests, golden parity, the float64 reference and finite differences,
# sampling statistics, bad input at the C boundary, header freshness, the C program as C11 and C++17,
# the `pfc` command line, every CUDA kernel compiled by NVRTC, the CUDA backend on the host emulation
# of the driver, cuBLAS and NCCL, and the PyTorch binding (tests/python).
# scripts/setup.sh first installs what they need when missing (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

if [ ! -d ../shared/golden ]; then
    echo "../shared/golden (the reference vectors) must sit beside the repository" >&2
    exit 1
fi

# tests/all/kernels.rs compiles every CUDA kernel with the NVRTC that setup put in .tools/.
nvrtc_lib=.tools/nvrtc/nvidia/cu13/lib
export LD_LIBRARY_PATH="$PWD/$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The CUDA tests run on the host emulation of the driver, cuBLAS and NCCL (tests/cuda-emulator/),
# in child processes whose loader path names it; everything else keeps seeing no driver.
bash scripts/cuda-emulator.sh

# The C tests link the cdylib, which `cargo test` does not build by itself.
cargo build --release --locked --lib --bins
cargo test --release --locked

# The PyTorch binding: installed into the project venv (scripts/python-env.sh, run by setup) the way
# users install it, then its tests (pytest fails on no tests collected, exit 5, like any failure here).
.venv/bin/python -m pip install --quiet --disable-pip-version-check ./bindings/python
.venv/bin/python -m pytest -q tests/python
