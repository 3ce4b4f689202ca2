// Search on the GPU: the top k classes of each query over one shard's centers, the CPU backend's
// answer bit for bit (src/backend/cpu/search.rs). cuBLAS's products only select, as the CPU's GEMM
// does: every score kept is recomputed here with the CPU's own arithmetic (`exact_score`), so that
// duplicate centers tie exactly and nothing depends on chunking, batching or the shard layout.
//
// The CPU rounds every product and every sum on its own (Rust never fuses them into an FMA) and
// keeps subnormals; NVRTC fuses `a * b + c` by default, which the `_rn` intrinsics forbid, and
// keeps subnormals without -ftz. Square roots and divisions are IEEE-rounded on both.

// Candidates a `topk_chunk` block gathers before merging them into its query's list; at least
// twice its block size, so that a whole pass over blockDim.x classes always fits.
#define TOPK_CANDIDATES 1024

// src/backend/cpu/kernels.rs `dot`: sixteen running sums, sum l over elements l, l + 16, … of the
// whole groups of sixteen; the products past the last whole group summed on their own; then the
// sixteen sums in order, and that tail. Its order is in the source, not chosen by the compiler, so
// it is the same on every CPU whatever its vector width. Rust's float sums start from −0.0.
__device__ __forceinline__ float cpu_dot(const float* a, const float* b, int dim) {
    float acc[16];
    for (int l = 0; l < 16; l++) acc[l] = 0.0f;
    const int whole = dim - dim % 16;
    for (int i = 0; i < whole; i += 16)
        for (int l = 0; l < 16; l++) acc[l] = __fadd_rn(acc[l], __fmul_rn(a[i + l], b[i + l]));
    float tail = -0.0f;
    for (int i = whole; i < dim; i++) tail = __fadd_rn(tail, __fmul_rn(a[i], b[i]));
    float sum = -0.0f;
    for (int l = 0; l < 16; l++) sum = __fadd_rn(sum, acc[l]);
    return __fadd_rn(sum, tail);
}

// src/backend/cpu/search.rs `exact_score`: the cosine of unit query q and center c whose 1/|c| is
// `inv`; a center whose squared norm overflows f32 (inv 0) in float64, summed in order from −0.0
// as `dot_f64` does. Adding +0 turns −0 into +0, so that ±0 tie.
__device__ __forceinline__ float exact_score(const float* q, const float* c, int dim, float inv) {
    float s;
    if (inv > 0.0f) {
        s = __fmul_rn(cpu_dot(q, c, dim), inv);
    } else {
        double qc = -0.0, cc = -0.0;
        for (int i = 0; i < dim; i++) {
            qc = __dadd_rn(qc, __dmul_rn((double)q[i], (double)c[i]));
            cc = __dadd_rn(cc, __dmul_rn((double)c[i], (double)c[i]));
        }
        s = (float)__ddiv_rn(qc, fmax(__dsqrt_rn(cc), 1e-12));
    }
    return __fadd_rn(s, 0.0f);
}

// A hit as one integer ordered as src/topk.rs orders hits: the score's bits in IEEE total order
// (f32::total_cmp) above the complement of the row, so a larger key is a better hit and equal
// scores go to the smaller row. src/backend/cuda/search.rs `hit_of` reads it back.
__device__ __forceinline__ u64 hit_key(float score, u32 row) {
    const u32 bits = __float_as_uint(score);
    const u32 ordered = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
    return ((u64)ordered << 32) | (u64)(u32)~row;
}

__device__ __forceinline__ float key_score(u64 key) {
    const u32 ordered = (u32)(key >> 32);
    return __uint_as_float((ordered & 0x80000000u) ? ordered & 0x7FFFFFFFu : ~ordered);
}

// How many of the `n` keys of `sorted` (descending) are above `key`.
__device__ __forceinline__ u32 count_above(const u64* sorted, u32 n, u64 key) {
    u32 lo = 0, hi = n;
    while (lo < hi) {
        const u32 mid = (lo + hi) >> 1;
        if (sorted[mid] > key) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Bitonic sort of `n` (a power of two) keys, descending, by the whole block.
__device__ void sort_descending(u64* keys, u32 n) {
    for (u32 size = 2; size <= n; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
                const u32 j = i ^ stride;
                if (j <= i) continue;
                const u64 a = keys[i], b = keys[j];
                // Runs of `size` alternate in direction, the last (the whole array) descending.
                if (((i & size) == 0) == (a < b)) {
                    keys[i] = b;
                    keys[j] = a;
                }
            }
            __syncthreads();
        }
    }
}

// Merges `m` candidates (sorted, descending) into the `len` hits of `list` (sorted), keeping the
// best `k`, in place, by the whole block. No key is in both (each class is offered once), so each
// hit's new place is its index plus the number of keys of the other sequence above it.
__device__ void merge_hits(u64* list, u32 len, u32 k, const u64* cand, u32 m, u32* place) {
    for (u32 i = threadIdx.x; i < m; i += blockDim.x) place[i] = i + count_above(list, len, cand[i]);
    __syncthreads();
    // Hits only move to higher places, so the list moves a pass at a time from its end, each pass
    // read whole before any of it is written. Hits above the best candidate stay where they are.
    const u32 settled = place[0];
    for (u32 end = len; end > settled;) {
        const u32 start = end > settled + blockDim.x ? end - blockDim.x : settled;
        const u32 i = start + threadIdx.x;
        u64 key = 0;
        u32 to = k;
        if (i < end) {
            key = list[i];
            to = i + count_above(cand, m, key);
        }
        __syncthreads();
        if (to < k) list[to] = key;
        __syncthreads();
        end = start;
    }
    for (u32 i = threadIdx.x; i < m; i += blockDim.x)
        if (place[i] < k) list[place[i]] = cand[i];
    __syncthreads();
}

// What a class's approximate cosine must reach to be rescored: the k-th exact score less the
// selection margin once the list is full, anything before.
__device__ __forceinline__ float selection_bar(const u64* list, u32 len, u32 k, float margin) {
    return len < k ? -INFINITY : key_score(list[k - 1]) - margin;
}

// 1/|row| of `rows` rows of `dim` as src/backend/cpu/kernels.rs `row_inv_norms`:
// 1 / max(sqrt(dot(row, row)), 1e-12), 0 where the squared norm overflows. One thread per row.
extern "C" __global__ void center_inv_norms(const float* centers, int rows, int dim, float* inv) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* row = centers + (u64)r * dim;
    inv[r] = __fdiv_rn(1.0f, fmaxf(__fsqrt_rn(cpu_dot(row, row, dim)), 1e-12f));
}

// One block per query: merges one chunk of `width` classes into the query's best hits `best` (k
// keys a query, best first, the first `have` valid), in place. `scores` holds cuBLAS's q·c over the
// chunk, [query][class], `inv` the classes' 1/|c|, `centers` their rows (local rows `first`…).
// As on the CPU a class is rescored exactly unless the list is full and its approximate cosine is
// below the k-th exact score by more than `margin` (src/backend/cpu/search.rs `selection_margin`,
// what cuBLAS's rounding and the exact score's can differ by) — always where inv is 0, as cuBLAS's
// product means nothing there.
extern "C" __global__ void topk_chunk(const float* scores, int width, const float* inv, const float* centers, int dim,
                                      const float* queries, u32 first, int k, int have, float margin, u64* best) {
    __shared__ u64 cand[TOPK_CANDIDATES];
    __shared__ u32 place[TOPK_CANDIDATES];
    __shared__ u32 count, len;
    __shared__ float bar;
    const u64 q = blockIdx.x;
    const float* query = queries + q * dim;
    const float* approx = scores + q * width;
    u64* list = best + q * k;
    if (threadIdx.x == 0) {
        count = 0;
        len = (u32)have;
        bar = selection_bar(list, len, (u32)k, margin);
    }
    __syncthreads();
    for (int pass = 0; pass < width; pass += blockDim.x) {
        const int j = pass + threadIdx.x;
        if (j < width) {
            const float r = inv[j];
            if (r == 0.0f || approx[j] * r >= bar) cand[atomicAdd(&count, 1u)] = (u64)j;
        }
        __syncthreads();
        const u32 m = count;
        // Every thread has read the count before any counts the next pass's candidates.
        __syncthreads();
        if (m == 0 || (m + blockDim.x <= TOPK_CANDIDATES && pass + (int)blockDim.x < width)) continue;
        for (u32 i = threadIdx.x; i < m; i += blockDim.x) {
            const u32 c = (u32)cand[i];
            cand[i] = hit_key(exact_score(query, centers + (u64)c * dim, dim, inv[c]), first + c);
        }
        u32 padded = 1;
        while (padded < m) padded <<= 1;
        // Padding that sorts below every hit: key 0 is the lowest NaN in total order, at the
        // largest row.
        for (u32 i = m + threadIdx.x; i < padded; i += blockDim.x) cand[i] = 0;
        __syncthreads();
        sort_descending(cand, padded);
        merge_hits(list, len, (u32)k, cand, m, place);
        if (threadIdx.x == 0) {
            len = len + m < (u32)k ? len + m : (u32)k;
            count = 0;
            bar = selection_bar(list, len, (u32)k, margin);
        }
        __syncthreads();
    }
}
