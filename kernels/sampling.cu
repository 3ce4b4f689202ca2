// PartialFC sampling on the GPU: the same set as src/sharding.rs `sample` — positives plus the
// negatives with the largest keys mix64(stream + (class + 1)·γ), ties to the smaller class id —
// found by a radix select over the 64-bit keys and a stable compaction in class order. Everything
// stays on the device: the select's state (`SELECT_*` words) is read and written by the kernels, and
// the host reads back at most the sampled count, which it needs to size the GEMMs.

#define POSITIVE_KEY 0xFFFFFFFFFFFFFFFFull

// One thread: a new select (no prefix, no positives yet) and a zero histogram for its first pass.
extern "C" __global__ void select_reset(u64* select, u32* hist) {
    for (int w = 0; w < SELECT_WORDS; w++) select[w] = 0;
    for (int b = 0; b < 256; b++) hist[b] = 0;
}

// keys[j]: the counter-based key of local class j (src/rng.rs `at`).
extern "C" __global__ void sample_keys(u64 stream, u64 start, u64 len, u64* keys) {
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < len; j += (u64)gridDim.x * blockDim.x)
        keys[j] = rng_at(stream, start + j);
}

// The shard's classes among the labels get the largest key, each counted once however many rows
// carry it (a draw of exactly POSITIVE_KEY, probability 2^-64 a class, would count as a positive).
extern "C" __global__ void mark_positives(const long long* labels, int n, u64 start, u64 len, u64* keys, u64* select) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const u64 c = (u64)labels[i];
    if (c >= start && c < start + len && atomicExch(&keys[c - start], POSITIVE_KEY) != POSITIVE_KEY)
        atomicAdd(&select[SELECT_POSITIVES], 1ull);
}

// One thread: the sampled count k = max(negatives budget, positives), the keys still wanted.
extern "C" __global__ void select_count(u64* select, u64 budget) {
    const u64 k = select[SELECT_POSITIVES] > budget ? select[SELECT_POSITIVES] : budget;
    select[SELECT_COUNT] = k;
    select[SELECT_REMAINING] = k;
}

// One radix-select pass: among keys whose bits above `shift + 8` equal the select's prefix (under
// its mask), counts each value of the byte at `shift`.
extern "C" __global__ void radix_histogram(const u64* keys, u64 len, const u64* select, int shift, u32* hist) {
    __shared__ u32 local[256];
    const u64 prefix = select[SELECT_PREFIX], mask = select[SELECT_MASK];
    for (int b = threadIdx.x; b < 256; b += blockDim.x) local[b] = 0;
    __syncthreads();
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < len; j += (u64)gridDim.x * blockDim.x) {
        const u64 key = keys[j];
        if ((key & mask) == prefix) atomicAdd(&local[(key >> shift) & 0xFF], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x)
        if (local[b]) atomicAdd(&hist[b], local[b]);
}

// One thread, after each pass: from the top byte value down, whole bins are skipped while they
// hold fewer keys than still wanted; the bin reached extends the prefix. The histogram is zeroed
// for the next pass. After the eighth pass the prefix is the k-th largest key and `remaining` how
// many keys equal to it are taken (the smallest class ids among them).
extern "C" __global__ void radix_pick(u64* select, int shift, u32* hist) {
    u64 remaining = select[SELECT_REMAINING];
    int bin = 255;
    while (bin > 0 && (u64)hist[bin] < remaining) {
        remaining -= hist[bin];
        bin--;
    }
    select[SELECT_PREFIX] |= (u64)bin << shift;
    select[SELECT_MASK] |= 0xFFull << shift;
    select[SELECT_REMAINING] = remaining;
    for (int b = 0; b < 256; b++) hist[b] = 0;
}

// Per block of 1024 classes: how many keys are above the threshold and how many equal it.
extern "C" __global__ void count_selected(const u64* keys, u64 len, const u64* select, u32* above, u32* equal) {
    __shared__ float scratch[32];
    const u64 threshold = select[SELECT_PREFIX];
    const u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    const u64 key = j < len ? keys[j] : 0;
    const float a = block_sum(j < len && key > threshold ? 1.0f : 0.0f, scratch);
    const float e = block_sum(j < len && key == threshold ? 1.0f : 0.0f, scratch);
    if (threadIdx.x == 0) {
        above[blockIdx.x] = (u32)a;
        equal[blockIdx.x] = (u32)e;
    }
}

// One thread: exclusive prefix sums over the blocks of the selected keys and of the keys equal to
// the threshold, in place of the counts. A total other than k (a count gone wrong) is a sampling
// failure in the step's verdict; the compaction then writes nothing past its buffer either, and the
// ids it would leave unwritten are set to class 0 first, so that the step's kernels read only
// classes of the shard until the verdict stops it.
extern "C" __global__ void compaction_offsets(u32* above, u32* equal, u32 blocks, const u64* select, u32* out, u64 capacity,
                                              u64* verdict) {
    const u64 take_equal = select[SELECT_REMAINING];
    u64 selected = 0, equals = 0;
    for (u32 b = 0; b < blocks; b++) {
        const u64 a = above[b], e = equal[b];
        above[b] = (u32)selected;
        equal[b] = (u32)equals;
        const u64 taken_before = equals < take_equal ? equals : take_equal;
        const u64 taken_after = equals + e < take_equal ? equals + e : take_equal;
        selected += a + taken_after - taken_before;
        equals += e;
    }
    if (selected != select[SELECT_COUNT]) {
        atomicOr(&verdict[VERDICT_FLAGS], (u64)VERDICT_SAMPLING);
        for (u64 j = 0; j < capacity; j++) out[j] = 0;
    }
}

// Writes the selected local class ids in class order from the block offsets `selected_before` and
// `equal_before`; ids that would land at or past `capacity` are not written (and flagged).
extern "C" __global__ void compact_selected(const u64* keys, u64 len, const u64* select, const u32* selected_before,
                                            const u32* equal_before, u32* out, u64 capacity, u64* verdict) {
    __shared__ u32 warp_sel[32], warp_eq[32];
    const u64 threshold = select[SELECT_PREFIX], take_equal = select[SELECT_REMAINING];
    const u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    const u64 key = j < len ? keys[j] : 0;
    const bool eq = j < len && key == threshold;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Rank of this key among the block's equal keys, to decide whether it is taken.
    const u32 eq_mask = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) warp_eq[warp] = __popc(eq_mask);
    __syncthreads();
    u64 eq_rank = equal_before[blockIdx.x] + __popc(eq_mask & ((1u << lane) - 1u));
    for (int w = 0; w < warp; w++) eq_rank += warp_eq[w];
    const bool sel = j < len && (key > threshold || (eq && eq_rank < take_equal));
    const u32 sel_mask = __ballot_sync(0xffffffffu, sel);
    if (lane == 0) warp_sel[warp] = __popc(sel_mask);
    __syncthreads();
    if (!sel) return;
    u64 pos = selected_before[blockIdx.x] + __popc(sel_mask & ((1u << lane) - 1u));
    for (int w = 0; w < warp; w++) pos += warp_sel[w];
    if (pos < capacity) out[pos] = (u32)j;
    else atomicOr(&verdict[VERDICT_FLAGS], (u64)VERDICT_SAMPLING);
}

// out[j] = j: every class of the shard (sampling rate 1, or a budget covering the shard).
extern "C" __global__ void all_classes(u64 len, u32* out) {
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < len; j += (u64)gridDim.x * blockDim.x) out[j] = (u32)j;
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
