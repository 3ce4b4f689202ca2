// Row normalization (PyTorch's `normalize`, eps 1e-12) of embeddings and of sampled centers, and
// the conversion of GEMM operands to the compute dtype. One block per row.

// unit[r] = x[r] / max(|x[r]|, 1e-12) in f32 and, for the GEMM, in `dtype`; inv_norm[r] = 1/that.
extern "C" __global__ void normalize_rows(const float* x, int rows, int dim, float* unit, void* unit_gemm,
                                          int dtype, float* inv_norm) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = x + (u64)r * dim;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) sq += row[c] * row[c];
    const float inv = 1.0f / fmaxf(sqrtf(block_sum(sq, scratch)), 1e-12f);
    if (threadIdx.x == 0) inv_norm[r] = inv;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float u = row[c] * inv;
        unit[(u64)r * dim + c] = u;
        store_from_f32(unit_gemm, (u64)r * dim + c, u, dtype);
    }
}

// Sampled centers, gathered: out[j] = centers[sampled[j]] normalized, in `dtype`; inv_norm[j].
template <class S>
__device__ __forceinline__ void gather_rows(const S* centers, const u32* sampled, int k, int dim, void* out, int dtype,
                                            float* inv_norm) {
    __shared__ float scratch[32];
    const int j = blockIdx.x;
    if (j >= k) return;
    const S* row = centers + (u64)sampled[j] * dim;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) sq += widen(row[c]) * widen(row[c]);
    const float inv = 1.0f / fmaxf(sqrtf(block_sum(sq, scratch)), 1e-12f);
    if (threadIdx.x == 0) inv_norm[j] = inv;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) store_from_f32(out, (u64)j * dim + c, widen(row[c]) * inv, dtype);
}

extern "C" __global__ void gather_centers(const float* centers, const u32* sampled, int k, int dim, void* out,
                                          int dtype, float* inv_norm) {
    gather_rows(centers, sampled, k, dim, out, dtype, inv_norm);
}

extern "C" __global__ void gather_centers_bf16(const u16* centers, const u32* sampled, int k, int dim, void* out,
                                               int dtype, float* inv_norm) {
    gather_rows(centers, sampled, k, dim, out, dtype, inv_norm);
}

// dst[i] = src[i] widened to f32 (stored bf16 centers, for search's f32 arithmetic).
extern "C" __global__ void widen_bf16(const u16* src, u64 len, float* dst) {
    for (u64 at = blockIdx.x * (u64)blockDim.x + threadIdx.x; at < len; at += (u64)gridDim.x * blockDim.x)
        dst[at] = widen(src[at]);
}

// dst[i] = src[i] in `dtype` (the caller's gradient buffers).
extern "C" __global__ void convert_f32(const float* src, u64 len, void* dst, int dtype) {
    for (u64 at = blockIdx.x * (u64)blockDim.x + threadIdx.x; at < len; at += (u64)gridDim.x * blockDim.x)
        store_from_f32(dst, at, src[at], dtype);
}

// One thread, when a step begins: its verdict record cleared (no row found, no flag).
extern "C" __global__ void verdict_reset(u64* verdict) {
    for (int w = 0; w < VERDICT_WORDS; w++) verdict[w] = 0;
    verdict[VERDICT_LABEL_ROW] = verdict[VERDICT_NON_FINITE_ROW] = verdict[VERDICT_OVERSIZED_ROW] = ~0ull;
}

// A caller's device batch checked where it lies, as src/batch.rs `validate` checks a host one, and
// converted to f32 for the step. One block per row: the first row (atomicMin) with a label outside
// [0, classes), with a NaN or Inf, or with a float64 norm above `max_norm` goes to the verdict.
extern "C" __global__ void check_batch(const void* emb, int dtype, const long long* labels, int rows, int dim, u64 classes,
                                       double max_norm, float* out, u64* verdict) {
    __shared__ float scratch[32];
    __shared__ double partial[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    float bad = 0.0f;
    double sq = 0.0;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float v = load_as_f32(emb, (u64)r * dim + c, dtype);
        out[(u64)r * dim + c] = v;
        bad += (v - v) == 0.0f ? 0.0f : 1.0f;
        sq += (double)v * (double)v;
    }
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sq;
    bad = block_sum(bad, scratch);
    if (threadIdx.x != 0) return;
    sq = 0.0;
    for (int w = 0; w < (int)((blockDim.x + 31) >> 5); w++) sq += partial[w];
    if ((u64)labels[r] >= classes) {
        atomicMin(&verdict[VERDICT_LABEL_ROW], (u64)r);
        atomicOr(&verdict[VERDICT_FLAGS], (u64)VERDICT_BAD_BATCH);
    }
    if (bad > 0.0f) {
        atomicMin(&verdict[VERDICT_NON_FINITE_ROW], (u64)r);
        atomicOr(&verdict[VERDICT_FLAGS], (u64)VERDICT_BAD_BATCH);
    } else if (sqrt(sq) > max_norm) {
        atomicMin(&verdict[VERDICT_OVERSIZED_ROW], (u64)r);
        atomicOr(&verdict[VERDICT_FLAGS], (u64)VERDICT_BAD_BATCH);
    }
}

// One thread, after `check_batch`: the first bad row's label and the first oversized row's norm,
// for the message.
extern "C" __global__ void describe_batch(const long long* labels, const float* rows, int dim, u64* verdict) {
    if (verdict[VERDICT_LABEL_ROW] != ~0ull) verdict[VERDICT_LABEL] = (u64)labels[verdict[VERDICT_LABEL_ROW]];
    const u64 r = verdict[VERDICT_OVERSIZED_ROW];
    if (r == ~0ull) return;
    double sq = 0.0;
    for (int c = 0; c < dim; c++) sq += (double)rows[r * dim + c] * (double)rows[r * dim + c];
    const double norm = sqrt(sq);
    verdict[VERDICT_OVERSIZED_NORM] = (u64)__double_as_longlong(norm);
}
