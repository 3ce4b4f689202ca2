#!/usr/bin/env bash
# Builds everything the GPU check needs into .gpu/ (ignored by git), on this machine: the GPU machine
# has no Rust toolchain and no network. Usage:
#     bash scripts/gpu-stage.sh [INSIGHTFACE]
# INSIGHTFACE is an insightface checkout or git directory (a fetched snapshot) holding the
# reference's recognition/arcface_torch/{partial_fc_v2.py,losses.py}; without it, .reference/ must
# hold the two files. The files are staged, never committed. Then run there, through the device
# tool with carry [".gpu"]:  bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
limit=$((64 * 1024 * 1024))
fail() { echo "gpu-stage: error: $*" >&2; exit 1; }

# The reference first: a stage without it cannot be decisive, so nothing is built.
reference=$(mktemp -d)
trap 'rm -rf "$reference"' EXIT
src=${1:-}
for f in partial_fc_v2.py losses.py; do
    if [ -n "$src" ] && [ -f "$src/recognition/arcface_torch/$f" ]; then
        cp "$src/recognition/arcface_torch/$f" "$reference/$f"
    elif [ -n "$src" ] && git --git-dir="$src" cat-file -e "HEAD:recognition/arcface_torch/$f" 2>/dev/null; then
        git --git-dir="$src" show "HEAD:recognition/arcface_torch/$f" > "$reference/$f"
    elif [ -z "$src" ] && [ -f ".reference/$f" ]; then
        cp ".reference/$f" "$reference/$f"
    else
        fail "the reference's $f is missing: pass an insightface checkout or fetched snapshot (git directory) as the first argument, or put partial_fc_v2.py and losses.py in .reference/"
    fi
done
grep -q "class PartialFC_V2" "$reference/partial_fc_v2.py" || fail "partial_fc_v2.py defines no PartialFC_V2: not the reference"

cargo build --release --locked --lib --bins
rm -rf .gpu && mkdir -p .gpu/tests .gpu/shared .gpu/reference
# The integration tests' one binary (tests/all; gpu-check.sh runs its GPU modules), found in cargo's
# own build report.
tests=(all)
cargo test --release --locked --no-run --message-format=json "${tests[@]/#/--test=}" 2>/dev/null |
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], ".gpu/tests/" + m["target"]["name"])
'
cp target/release/pfc target/release/libpartialfc.so .gpu/
strip .gpu/pfc .gpu/libpartialfc.so .gpu/tests/*
cp -r ../shared/golden .gpu/shared/
cp scripts/reference_step.py .gpu/
cp "$reference"/*.py .gpu/reference/

# A missing piece is a failure here, not a surprise on the GPU machine.
for f in pfc libpartialfc.so reference_step.py reference/partial_fc_v2.py reference/losses.py "${tests[@]/#/tests/}"; do
    [ -s ".gpu/$f" ] || fail ".gpu/$f was not staged"
done
[ -n "$(ls .gpu/shared/golden)" ] || fail "no golden files staged"
size=$(du -sb .gpu | cut -f1)
[ "$size" -le "$limit" ] || fail ".gpu/ is $size bytes, above the device tool's 64 MiB"
ls -l .gpu .gpu/tests .gpu/reference
echo "gpu-stage: .gpu/ complete, $size bytes (limit $limit)"
