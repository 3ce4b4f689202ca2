#!/usr/bin/env bash
# The GPU check (../shared/GPU.md), run on the GPU machine from the repository root after
# scripts/gpu-stage.sh staged .gpu/ here: finds the CUDA libraries and logs their versions, runs the
# GPU tests, benchmarks ours against the reference on the same GPU, and writes the log and a JSON of
# results to $OUT (or gpu-results/), printing a summary last. Every command runs under `timeout`
# and the whole check within BUDGET seconds (default 480); a step that no longer fits is counted
# as a failure, never skipped silently.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
started=$SECONDS
failures=0
failed=()
step() { echo; echo "=== $*"; }
fail() { failures=$((failures + 1)); failed+=("$1"); echo "FAILED: $1"; }
# run NAME SECONDS CMD...: CMD under a timeout of SECONDS, cut to what is left of the budget.
run() {
    local name=$1 secs=$2
    shift 2
    local left=$((BUDGET - (SECONDS - started)))
    if [ "$left" -lt 10 ]; then fail "$name (no time left in the ${BUDGET} s budget)"; return 1; fi
    [ "$secs" -gt "$left" ] && secs=$left
    timeout --kill-after=5 "$secs" "$@"
    local rc=$?
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && { fail "$name (timed out after $secs s)"; return 1; }
    [ "$rc" -eq 0 ] || { fail "$name (exit $rc)"; return 1; }
}

# Refuse to run anywhere it cannot be decisive.
missing=()
for f in pfc libpartialfc.so reference_step.py reference/partial_fc_v2.py reference/losses.py tests/all; do
    [ -s ".gpu/$f" ] || missing+=(".gpu/$f")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu-check: error: the stage is incomplete (missing: ${missing[*]}): run scripts/gpu-stage.sh on the development machine first"
    exit 2
fi
if ! command -v nvidia-smi >/dev/null || ! timeout 20 nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: error: no usable NVIDIA GPU on this machine (nvidia-smi missing or failing): this check runs on the GPU machine"
    exit 2
fi

step "libraries and versions"
site=$(timeout 20 python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
libdirs=()
for s in $site; do
    for d in "$s"/nvidia/*/lib "$s"/nvidia/cu13/lib; do [ -d "$d" ] && libdirs+=("$d"); done
done
[ -d /usr/local/cuda/lib64 ] && libdirs+=(/usr/local/cuda/lib64)
shim=$(mktemp -d)
for d in "${libdirs[@]}"; do
    # cudarc's loader asks for libnccl.so; the wheels ship libnccl.so.2.
    if [ -e "$d/libnccl.so.2" ] && [ ! -e "$shim/libnccl.so" ]; then ln -sf "$d/libnccl.so.2" "$shim/libnccl.so"; fi
done
LD_LIBRARY_PATH="$shim:$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
run "nvidia-smi" 20 nvidia-smi -L
run "nvidia-smi query" 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
# The versions the loader actually resolves, as the library will load them.
run "library versions" 30 python3 - "$OUT/versions.json" <<'PY'
import ctypes, json, sys
out = {}
def load(name):
    try:
        return ctypes.CDLL(name)
    except OSError as e:
        out[name] = "not loadable: %s" % e
        return None
cuda = load("libcuda.so.1")
if cuda:
    v = ctypes.c_int(); cuda.cuDriverGetVersion(ctypes.byref(v)); out["cuda_driver"] = "%d.%d" % (v.value // 1000, v.value % 1000 // 10)
nvrtc = load("libnvrtc.so.13")
if nvrtc:
    a, b = ctypes.c_int(), ctypes.c_int(); nvrtc.nvrtcVersion(ctypes.byref(a), ctypes.byref(b)); out["nvrtc"] = "%d.%d" % (a.value, b.value)
cublas = load("libcublas.so.13")
if cublas:
    parts = []
    for prop in range(3):
        v = ctypes.c_int(); cublas.cublasGetProperty(prop, ctypes.byref(v)); parts.append(str(v.value))
    out["cublas"] = ".".join(parts)
nccl = load("libnccl.so")
if nccl:
    v = ctypes.c_int(); nccl.ncclGetVersion(ctypes.byref(v)); out["nccl"] = "%d.%d.%d" % (v.value // 10000, v.value // 100 % 100, v.value % 100)
print(json.dumps(out))
json.dump(out, open(sys.argv[1], "w"))
sys.exit(0 if all(k in out for k in ("cuda_driver", "nvrtc", "cublas", "nccl")) else 1)
PY

step "GPU tests (kernels compile to CUBIN for this device, then parity, bf16 storage, golden, NCCL, bad input; the emulation's tests of NCCL against the real one)"
export PFC_REQUIRE_GPU=1 PFC_SHARED_DIR="$PWD/.gpu/shared" PFC_BIN="$PWD/.gpu/pfc" PFC_TEST_TMPDIR="$PWD/.gpu/tmp"
mkdir -p .gpu/tmp
# One module of the tests' binary at a time (`kernels::` matches that module's tests only). A filter
# that matches nothing passes with "0 passed", so each must report tests that ran.
for t in kernels gpu gpu_step gpu_jobs gpu_margins gpu_storage golden nccl; do
    echo "--- $t"
    run "test $t" 150 .gpu/tests/all "$t::" --test-threads=1 >.gpu/test-$t.log 2>&1
    cat .gpu/test-$t.log
    grep -q "^test result: ok\. [1-9]" .gpu/test-$t.log || fail "test $t (no test of module $t:: ran)"
done

step "PyTorch binding on CUDA (tests/python/gpu_check.py)"
PARTIALFC_LIBRARY="$PWD/.gpu/libpartialfc.so" PYTHONPATH="$PWD/bindings/python:$PWD/tests/python" \
    run "PyTorch binding" 90 python3 tests/python/gpu_check.py

step "benchmark (ours, CUDA; CUDA-event phase and GEMM times, peak device memory)"
results="$OUT/results.jsonl"
: > "$results"
# Each run's output goes to a file, not a command substitution, so that its failure counts here.
for spec in "1000000 bf16" "10000000 bf16" "1000000 f32"; do
    set -- $spec
    log="$OUT/bench-ours-$1-$2.txt"
    if run "pfc bench C=$1 $2" 150 .gpu/pfc bench --backend cuda --compute-dtype "$2" --classes "$1" --sample-rate 0.1 \
        --dim 512 --batch 1024 --steps 10 --reference-dir /nonexistent --json > "$log" 2>&1; then
        tail -1 "$log" >> "$results"
    fi
    cat "$log"
done

step "benchmark (reference PartialFC_V2 on the same GPU, its fp16 autocast and f32)"
for spec in "1000000 --fp16" "10000000 --fp16" "1000000"; do
    set -- $spec
    log="$OUT/bench-reference-$1${2:-}.txt"
    if PFC_REFERENCE_DIR=.gpu/reference run "reference C=$1 ${2:-f32}" 120 python3 .gpu/reference_step.py --device cuda \
        --classes "$1" --dim 512 --batch 1024 --sample-rate 0.1 --steps 10 ${2:-} > "$log" 2>&1; then
        tail -1 "$log" >> "$results"
    fi
    cat "$log"
done

step "summary"
timeout 20 python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
print("| impl | classes | precision | median step (s) | images/s | GEMM TFLOP/s | peak GPU memory |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    prec = r.get("compute_dtype") or ("fp16" if r.get("fp16") else "f32")
    mem = r.get("peak_gpu_bytes")
    tflops = "%.1f" % (r["gemm_gflops"] / 1e3) if r.get("gemm_timed_apart") else "—"
    print("| %s | %s | %s | %.4f | %.0f | %s | %s |" % (r.get("impl", "partialfc"), r.get("classes"), prec, r["median_step_s"],
          r["images_per_s"], tflops, "%.2f GiB" % (mem / 2**30) if mem else "—"))
PY
echo "elapsed: $((SECONDS - started)) s of ${BUDGET} s"
echo "failures: $failures${failed:+ (${failed[*]})}"
exit $failures
