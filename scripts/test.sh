#!/usr/bin/env bash
# Every test of the project: unit tests, golden parity, the float64 reference and finite differences,
# sampling statistics, bad input at the C boundary, header freshness, the C program as C11 and C++17,
# and the `pfc` command line. Installs what it needs when missing (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
if ! command -v cc >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq gcc g++ >/dev/null
fi
if [ ! -d ../shared/golden ]; then
    echo "../shared/golden (the reference vectors) must sit beside the repository" >&2
    exit 1
fi

# The C tests link the cdylib, which `cargo test` does not build by itself.
cargo build --release --locked --lib --bins
cargo test --release --locked
