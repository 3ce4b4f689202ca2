// The adaptive margins' per-row inputs and running statistics (SPEC §1.6a), from what every shard
// holds alike — the gathered global batch, the reduced target cosines — so that every GPU of the
// job computes the same statistics. Mirrors src/margin.rs `MarginState` in the same f64 arithmetic.

// Each row's raw embedding norm in f64 (src/backend/cpu/kernels.rs `dot_f64`). One block per row.
extern "C" __global__ void embedding_norms(const float* x, int rows, int dim, double* norms) {
    __shared__ double scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = x + (u64)r * dim;
    double sq = 0.0;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) sq += (double)row[c] * (double)row[c];
    sq = block_sum(sq, scratch);
    if (threadIdx.x == 0) norms[r] = sqrt(sq);
}

// AdaFace's running statistics [mean, std] of the clipped norms, and each row's margin scaler
// g = clip((n − mean)/(std + eps)·h, −1, 1). In training (`train`) the batch's mean and unbiased std
// of the norms clipped to [lo, hi] are folded into `state` with weight t_alpha, written to `next`
// and used (updated before use); a batch of one row leaves std as it is. Otherwise `state` is used
// as it is and nothing is written but the scalers. One block.
extern "C" __global__ void adaface_scalers(const double* norms, int n, const float* state, float* next, int train,
                                           float t_alpha, float h, double eps, double lo, double hi, float* scaler) {
    __shared__ double scratch[32];
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += fmin(fmax(norms[i], lo), hi);
    const double batch_mean = block_sum(sum, scratch) / (double)n;
    double dev = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double x = fmin(fmax(norms[i], lo), hi) - batch_mean;
        dev += x * x;
    }
    const double var = block_sum(dev, scratch) / (double)(n - 1);
    float mean = state[0], sd = state[1];
    if (train) {
        const double a = (double)t_alpha;
        if (n > 1) sd = (float)(a * sqrt(var) + (1.0 - a) * (double)sd);
        mean = (float)(a * batch_mean + (1.0 - a) * (double)mean);
        if (threadIdx.x == 0) {
            next[0] = mean;
            next[1] = sd;
        }
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double x = fmin(fmax(norms[i], lo), hi);
        scaler[i] = (float)fmin(fmax((x - (double)mean) / ((double)sd + eps) * (double)h, -1.0), 1.0);
    }
}

// CurricularFace's pre-pass: each row's cosine with its label's center where this shard owns it
// (classes [start, start + len)), −∞ elsewhere, for the max all-reduce that gives every shard every
// row's. In f64 from the raw rows, each norm at least 1e-12 (PyTorch's `normalize`), as the CPU
// backend's `target_cosines`. One block per row.
template <class S>
__device__ __forceinline__ void label_cosines(const float* emb, const long long* labels, int n, int dim, const S* centers, u64 start,
                                              u64 len, float* out) {
    __shared__ double scratch[32];
    const int i = blockIdx.x;
    if (i >= n) return;
    const u64 local = (u64)labels[i] - start;
    if (local >= len) {
        if (threadIdx.x == 0) out[i] = -INFINITY;
        return;
    }
    const float* e = emb + (u64)i * dim;
    const S* w = centers + local * dim;
    double ee = 0.0, ww = 0.0, we = 0.0;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        ee += (double)e[c] * (double)e[c];
        ww += (double)widen(w[c]) * (double)widen(w[c]);
        we += (double)widen(w[c]) * (double)e[c];
    }
    ee = block_sum(ee, scratch);
    ww = block_sum(ww, scratch);
    we = block_sum(we, scratch);
    if (threadIdx.x == 0) out[i] = (float)(we / (fmax(sqrt(ww), 1e-12) * fmax(sqrt(ee), 1e-12)));
}

extern "C" __global__ void target_cosines(const float* emb, const long long* labels, int n, int dim, const float* centers,
                                          u64 start, u64 len, float* out) {
    label_cosines(emb, labels, n, dim, centers, start, len, out);
}

extern "C" __global__ void target_cosines_bf16(const float* emb, const long long* labels, int n, int dim, const u16* centers,
                                               u64 start, u64 len, float* out) {
    label_cosines(emb, labels, n, dim, centers, start, len, out);
}

// CurricularFace's t and each row's hard-negative threshold cos(θ_y + m) from the reduced target
// cosines: in training (`train`) the mean of the cosines clamped to [−1, 1] folded into `state`
// with weight t_alpha, written to `next` and used; otherwise `state` as it is. One block.
extern "C" __global__ void curricular_margins(const float* targets, int n, const float* state, float* next, int train,
                                              double t_alpha, float m, float* hard_above) {
    __shared__ double scratch[32];
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += fmin(fmax((double)targets[i], -1.0), 1.0);
    sum = block_sum(sum, scratch);
    if (train && threadIdx.x == 0) next[0] = (float)(t_alpha * (sum / (double)n) + (1.0 - t_alpha) * (double)state[0]);
    const double sin_m = sin((double)m), cos_m = cos((double)m);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double c = fmin(fmax((double)targets[i], -1.0), 1.0);
        hard_above[i] = (float)(c * cos_m - sqrt(1.0 - c * c) * sin_m);
    }
}
