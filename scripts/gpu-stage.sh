#!/usr/bin/env bash
# Builds everything the GPU check needs into .gpu/ (ignored by git), on this machine: the GPU machine
# has no Rust toolchain and no network. Then run there, through the device tool with carry [".gpu"]:
#     bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --lib --bins
rm -rf .gpu && mkdir -p .gpu/tests .gpu/shared .gpu/reference
# Test binaries, named by cargo's own build report.
cargo test --release --locked --no-run --message-format=json --test gpu --test golden --test nccl 2>/dev/null |
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], ".gpu/tests/" + m["target"]["name"])
'
cp target/release/pfc target/release/libpartialfc.so .gpu/
strip .gpu/pfc .gpu/tests/* 2>/dev/null || true
cp -r ../shared/golden .gpu/shared/
cp ../shared/bench/reference_step.py .gpu/
if [ -f .reference/partial_fc_v2.py ]; then
    cp .reference/partial_fc_v2.py .reference/losses.py .gpu/reference/
else
    echo "warning: .reference/ lacks the reference's two files; the GPU benchmark will time ours only" >&2
fi
ls .gpu/tests
du -sh .gpu
