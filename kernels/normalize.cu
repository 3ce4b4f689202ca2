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

// Host embeddings of any dtype to f32 (inputs may arrive as f16/bf16).
extern "C" __global__ void to_f32(const void* src, int dtype, u64 n, float* dst) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        dst[i] = load_as_f32(src, i, dtype);
}

// Flags non-finite values: *bad becomes 1 if any of x is NaN or Inf.
extern "C" __global__ void find_non_finite(const void* x, int dtype, u64 n, int* bad) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = load_as_f32(x, i, dtype);
        if (!isfinite(v)) *bad = 1;
    }
}
