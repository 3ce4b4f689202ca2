// Kernels for the emulated driver's self-tests (tests/all/emu_driver.rs), some correct and some
// deliberately faulty, kept out of kernels/ so that the product's kernels stay the product's.
// Compiled by NVRTC for a GPU and, by scripts/cuda-emulator.sh, for the host against kernel.hh into
// target/cuda-emulator/libpfc_emu_selftest.so (not part of libcuda.so.1): the tests load that
// library to register the host builds, then load the PTX as any module. Only what kernel.hh
// provides is used, and common.cuh is not prepended.

typedef unsigned int u32;

// Block b sums in[b * per_block, (b + 1) * per_block) into out[b] (blockDim.x a multiple of 32):
// each warp reduces by shuffles, its lane 0 leaves the warp's sum in shared memory, and warp 0 adds
// those up. Without `barrier` warp 0 reads the shared sums without waiting for the other warps to
// write them: the race the faulty variant has.
__device__ void block_sum(const float* in, u32 per_block, float* out, bool barrier) {
    __shared__ float partial[32];
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float v = 0.0f;
    for (u32 i = threadIdx.x; i < per_block; i += blockDim.x) v += in[blockIdx.x * per_block + i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[warp] = v;
    if (barrier) __syncthreads();
    if (warp == 0) {
        v = lane < blockDim.x / 32 ? partial[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) out[blockIdx.x] = v;
    }
}

extern "C" __global__ void selftest_block_sum(const float* in, u32 per_block, float* out) { block_sum(in, per_block, out, true); }

extern "C" __global__ void selftest_block_sum_unsynced(const float* in, u32 per_block, float* out) {
    block_sum(in, per_block, out, false);
}

// Block b keeps the positive values of in[b * segment, (b + 1) * segment), in order, at the start
// of the same range of out, and their number in counts[b] (blockDim.x a multiple of 32). Chunk by
// chunk: a warp's votes give each kept value its rank in the warp, the warps' counts in shared
// memory their offsets in the chunk.
extern "C" __global__ void selftest_compact(const int* in, u32 segment, int* out, u32* counts) {
    __shared__ u32 warp_offset[32];
    __shared__ u32 chunk_total;
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const u32 first = blockIdx.x * segment;
    u32 kept = 0;
    for (u32 at = 0; at < segment; at += blockDim.x) {
        const u32 i = at + threadIdx.x;
        const int v = i < segment ? in[first + i] : 0;
        const bool keep = i < segment && v > 0;
        const u32 votes = __ballot_sync(0xffffffffu, keep);
        if (lane == 0) warp_offset[warp] = __popc(votes);
        __syncthreads();
        if (threadIdx.x == 0) {
            u32 sum = 0;
            for (u32 w = 0; w < warps; w++) {
                const u32 c = warp_offset[w];
                warp_offset[w] = sum;
                sum += c;
            }
            chunk_total = sum;
        }
        __syncthreads();
        if (keep) out[first + kept + warp_offset[warp] + __popc(votes & ((1u << lane) - 1))] = v;
        kept += chunk_total;
        // The next chunk rewrites warp_offset and chunk_total.
        __syncthreads();
    }
    if (threadIdx.x == 0) counts[blockIdx.x] = kept;
}

// Faulty: threads from `reaching` on return before the barrier the others wait at.
extern "C" __global__ void selftest_partial_barrier(float* out, u32 reaching) {
    if (threadIdx.x >= reaching) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Faulty: copies n + 1 elements (`<=` for `<`), reading one past `in` or writing one past `out`,
// whichever of the two holds only n.
extern "C" __global__ void selftest_copy_inclusive(const float* in, float* out, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = in[i];
}
