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
extern "C" __global__ void gather_centers(const float* centers, const u32* sampled, int k, int dim, void* out,
                                          int dtype, float* inv_norm) {
    __shared__ float scratch[32];
    const int j = blockIdx.x;
    if (j >= k) return;
    const float* row = centers + (u64)sampled[j] * dim;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) sq += row[c] * row[c];
    const float inv = 1.0f / fmaxf(sqrtf(block_sum(sq, scratch)), 1e-12f);
    if (threadIdx.x == 0) inv_norm[j] = inv;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) store_from_f32(out, (u64)j * dim + c, row[c] * inv, dtype);
}

// dst[i] = src[i] in `dtype` (the caller's gradient buffers).
extern "C" __global__ void convert_f32(const float* src, u64 len, void* dst, int dtype) {
    for (u64 at = blockIdx.x * (u64)blockDim.x + threadIdx.x; at < len; at += (u64)gridDim.x * blockDim.x)
        store_from_f32(dst, at, src[at], dtype);
}
