#!/usr/bin/env bash
# Shows that the CUDA tests on the emulation catch the bugs they are there for: each mutant below
# breaks the CUDA backend one way (an off-by-one index in a kernel, a missing __syncthreads, swapped
# GEMM transposes, a missing wait for the caller's stream, a failure not agreed across processes),
# the named test runs on the emulation, and it must fail. Run by hand (each mutant rebuilds the
# library: about 15 minutes on 2 cores), in a scratch worktree of HEAD under target/, so the
# checkout is never touched:
#   bash scripts/emulation-mutants.sh
#   MUTANTS="swapped-transposes missing-stream-wait" bash scripts/emulation-mutants.sh   # only these
# Prints one line per mutant (logs in target/mutants-logs/) and exits 1 if a mutant survived.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$root/target/mutants
rm -rf "$work"
git worktree prune
git worktree add --detach "$work" HEAD >/dev/null
trap 'git -C "$root" worktree remove --force "$work"' EXIT
ln -sfn "$root/.tools" "$work/.tools"
# The golden files beside the checkout, not beside the worktree.
export PFC_SHARED_DIR=${PFC_SHARED_DIR:-$root/../shared}
[ -d "$PFC_SHARED_DIR/golden" ] || { echo "$PFC_SHARED_DIR/golden is missing" >&2; exit 1; }
export CARGO_TARGET_DIR=$work/target
logs=$root/target/mutants-logs
mkdir -p "$logs"

# What the failing test said: the emulation's report, or the child test's own assertion.
reason() {
    grep -m1 '\[pfc-emu\]' "$1" || grep -A1 'panicked at' "$1" | grep -v -e 'common.rs' -e '^--$' | head -2 | tr '\n' ' '
}

# mutant NAME FILE SED_EXPRESSION TEST_FILTER
survivors=0
mutant() {
    local name=$1 file=$2 expr=$3 filter=$4
    if [ -n "${MUTANTS:-}" ] && [[ " $MUTANTS " != *" $name "* ]]; then
        return
    fi
    (cd "$work" && git checkout -q -- . && sed -i "$expr" "$file")
    if (cd "$work" && git diff --quiet -- "$file"); then
        echo "$name: the mutation did not apply to $file (update this script)"
        survivors=$((survivors + 1))
        return
    fi
    local log=$logs/$name.log
    (cd "$work" && bash scripts/cuda-emulator.sh && cargo build --release --locked --lib --bins) >"$log" 2>&1
    if (cd "$work" && cargo test --release --locked --test all "$filter") >>"$log" 2>&1; then
        echo "$name: SURVIVED ($filter passed; $log)"
        survivors=$((survivors + 1))
    else
        echo "$name: caught by $filter: $(reason "$log" | cut -c1-220)"
    fi
}

mutant off-by-one kernels/normalize.cu \
    '0,/for (int c = threadIdx.x; c < dim; c += blockDim.x) sq += row\[c\] \* row\[c\];/s//for (int c = threadIdx.x; c <= dim; c += blockDim.x) sq += row[c] * row[c];/' \
    gpu::cuda_matches_the_golden_files
mutant missing-barrier kernels/common.cuh \
    '/if (lane == 0) scratch\[warp\] = v;/{n;/__syncthreads();/d}' \
    gpu::cuda_matches_the_golden_files
mutant swapped-transposes src/backend/cuda/step.rs \
    's/shard.gemm(true, false, n, count, d, unit_gemm.ptr(), d, w_ptr, d, c_ptr, n, dtype)/shard.gemm(false, true, n, count, d, unit_gemm.ptr(), d, w_ptr, d, c_ptr, n, dtype)/' \
    gpu::cuda_matches_the_golden_files
mutant missing-stream-wait src/backend/cuda/step.rs \
    's/            after_caller(caller_stream(b.stream), shard.stream.cu_stream())?;/            let _ = caller_stream(b.stream);/' \
    gpu::device_pointers_ordered_on_a_callers_stream
mutant unagreed-backward-failure src/head/driver.rs \
    's/let (mut mine, partial) = agreed(&\*self.coll, local)/let (mut mine, partial) = local/' \
    gpu_jobs::a_process_out_of_device_memory_fails_the_step_everywhere
exit $((survivors > 0))
