// PartialFC sampling on the GPU: the same set as src/sharding.rs `sample` — positives plus the
// negatives with the largest keys mix64(stream + (class + 1)·γ), ties to the smaller class id —
// found by a radix select over the 64-bit keys and a stable compaction in class order.

#define GOLDEN_GAMMA 0x9E3779B97F4A7C15ull
#define POSITIVE_KEY 0xFFFFFFFFFFFFFFFFull

// positive[j] = 1 for the shard's classes present among the labels.
extern "C" __global__ void mark_positives(const long long* labels, int n, u64 start, u64 len, unsigned char* positive) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const u64 c = (u64)labels[i];
    if (c >= start && c < start + len) positive[c - start] = 1;
}

// keys[j]: positives forced to the top, others their counter-based key (src/rng.rs `at`).
extern "C" __global__ void sample_keys(u64 stream, u64 start, u64 len, const unsigned char* positive, u64* keys) {
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < len; j += (u64)gridDim.x * blockDim.x) {
        keys[j] = positive[j] ? POSITIVE_KEY : mix64(stream + (start + j + 1) * GOLDEN_GAMMA);
    }
}

// One radix-select pass: among keys whose bits above `shift + 8` equal `prefix` (under
// `prefix_mask`), counts each value of the byte at `shift`.
extern "C" __global__ void radix_histogram(const u64* keys, u64 len, u64 prefix, u64 prefix_mask, int shift, u32* hist) {
    __shared__ u32 local[256];
    for (int b = threadIdx.x; b < 256; b += blockDim.x) local[b] = 0;
    __syncthreads();
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < len; j += (u64)gridDim.x * blockDim.x) {
        const u64 key = keys[j];
        if ((key & prefix_mask) == prefix) atomicAdd(&local[(key >> shift) & 0xFF], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x)
        if (local[b]) atomicAdd(&hist[b], local[b]);
}

// How many flags are set, added to *count (zeroed by the caller): the positives, read back as one
// number rather than as the shard's flags.
extern "C" __global__ void count_flags(const unsigned char* flags, u64 len, u32* count) {
    __shared__ float scratch[32];
    u32 mine = 0;
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < len; j += (u64)gridDim.x * blockDim.x) mine += flags[j] != 0;
    const float total = block_sum((float)mine, scratch);
    if (threadIdx.x == 0 && total > 0.0f) atomicAdd(count, (u32)total);
}

// Per block of 1024 classes: how many keys are above the threshold and how many equal it.
extern "C" __global__ void count_selected(const u64* keys, u64 len, u64 threshold, u32* above, u32* equal) {
    __shared__ float scratch[32];
    const u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    const u64 key = j < len ? keys[j] : 0;
    const float a = block_sum(j < len && key > threshold ? 1.0f : 0.0f, scratch);
    const float e = block_sum(j < len && key == threshold ? 1.0f : 0.0f, scratch);
    if (threadIdx.x == 0) {
        above[blockIdx.x] = (u32)a;
        equal[blockIdx.x] = (u32)e;
    }
}

// Writes the selected local class ids in class order. `selected_before[b]` and `equal_before[b]`
// are exclusive prefix sums (over blocks) of the selected and of the equal-to-threshold keys;
// `take_equal` of the keys equal to the threshold are taken, the smallest class ids first.
extern "C" __global__ void compact_selected(const u64* keys, u64 len, u64 threshold, u32 take_equal,
                                            const u32* selected_before, const u32* equal_before, u32* out) {
    __shared__ u32 warp_sel[32], warp_eq[32];
    const u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    const u64 key = j < len ? keys[j] : 0;
    const bool eq = j < len && key == threshold;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Rank of this key among the block's equal keys, to decide whether it is taken.
    const u32 eq_mask = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) warp_eq[warp] = __popc(eq_mask);
    __syncthreads();
    u32 eq_rank = equal_before[blockIdx.x] + __popc(eq_mask & ((1u << lane) - 1u));
    for (int w = 0; w < warp; w++) eq_rank += warp_eq[w];
    const bool sel = j < len && (key > threshold || (eq && eq_rank < take_equal));
    const u32 sel_mask = __ballot_sync(0xffffffffu, sel);
    if (lane == 0) warp_sel[warp] = __popc(sel_mask);
    __syncthreads();
    if (!sel) return;
    u32 pos = selected_before[blockIdx.x] + __popc(sel_mask & ((1u << lane) - 1u));
    for (int w = 0; w < warp; w++) pos += warp_sel[w];
    out[pos] = (u32)j;
}

// col[i]: the position of row i's label among the sorted sampled ids, or -1 when not on this shard.
extern "C" __global__ void label_columns(const long long* labels, int n, u64 start, u64 len, const u32* sampled, int k, int* col) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const u64 c = (u64)labels[i];
    int found = -1;
    if (c >= start && c < start + len) {
        const u32 local = (u32)(c - start);
        int lo = 0, hi = k;
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (sampled[mid] < local) lo = mid + 1; else hi = mid;
        }
        if (lo < k && sampled[lo] == local) found = lo;
    }
    col[i] = found;
}
