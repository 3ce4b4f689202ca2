#!/usr/bin/env bash
# The GPU check (../shared/GPU.md), run on the GPU machine from the repository root after
# scripts/gpu-stage.sh staged .gpu/ here: finds the CUDA libraries, runs the GPU tests, benchmarks
# ours against the reference on the same GPU, and writes the log and a JSON of results to $OUT
# (or gpu-results/), printing a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
failures=0
step() { echo; echo "=== $*"; }

step "libraries"
site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
libdirs=()
for s in $site; do
    for d in "$s"/nvidia/*/lib "$s"/nvidia/cu13/lib; do [ -d "$d" ] && libdirs+=("$d"); done
done
[ -d /usr/local/cuda/lib64 ] && libdirs+=(/usr/local/cuda/lib64)
shim=$(mktemp -d)
for d in "${libdirs[@]}"; do
    # cudarc-style loaders want libnccl.so; the wheels ship libnccl.so.2.
    if [ -e "$d/libnccl.so.2" ] && [ ! -e "$d/libnccl.so" ]; then ln -sf "$d/libnccl.so.2" "$shim/libnccl.so"; fi
done
LD_LIBRARY_PATH="$shim:$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi -L || failures=$((failures + 1))

step "GPU tests"
export PFC_REQUIRE_GPU=1 PFC_SHARED_DIR="$PWD/.gpu/shared"
for t in .gpu/tests/*; do
    echo "--- $t"
    "$t" --test-threads=1 || failures=$((failures + 1))
done

step "PyTorch binding on CUDA (tests/python/gpu_check.py)"
PARTIALFC_LIBRARY="$PWD/.gpu/libpartialfc.so" PYTHONPATH="$PWD/bindings/python:$PWD/tests/python" \
    python3 tests/python/gpu_check.py || failures=$((failures + 1))

step "benchmark (ours, CUDA)"
results="$OUT/results.jsonl"
: > "$results"
for classes in 1000000 10000000; do
    for dtype in f32 bf16; do
        if out=$(.gpu/pfc bench --backend cuda --compute-dtype "$dtype" --classes "$classes" --sample-rate 0.1 \
            --dim 512 --batch 1024 --steps 10 --reference-dir /nonexistent --json 2>&1); then
            echo "$out"
            tail -1 <<<"$out" >> "$results"
        else
            echo "$out"
            failures=$((failures + 1))
        fi
    done
done

step "benchmark (reference PartialFC_V2 on the same GPU)"
if [ -f .gpu/reference/partial_fc_v2.py ]; then
    for classes in 1000000 10000000; do
        for fp16 in "" "--fp16"; do
            if line=$(PFC_REFERENCE_DIR=.gpu/reference python3 .gpu/reference_step.py --device cuda --classes "$classes" \
                --dim 512 --batch 1024 --sample-rate 0.1 --steps 10 $fp16 2>>"$OUT/reference-stderr.log"); then
                echo "$line"
                tail -1 <<<"$line" >> "$results"
            else
                echo "reference failed at C = $classes $fp16 (see reference-stderr.log)"
            fi
        done
    done
else
    echo "reference files not staged"
fi

step "summary"
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
print("| impl | classes | precision | median step (s) | images/s | peak GPU memory |")
print("|---|---|---|---|---|---|")
for r in rows:
    prec = r.get("compute_dtype") or ("fp16" if r.get("fp16") else "f32")
    mem = r.get("peak_gpu_bytes")
    print("| %s | %s | %s | %.4f | %.0f | %s |" % (r.get("impl", "partialfc"), r.get("classes"), prec, r["median_step_s"], r["images_per_s"],
          "%.2f GiB" % (mem / 2**30) if mem else "—"))
PY
echo "failures: $failures"
exit $failures
