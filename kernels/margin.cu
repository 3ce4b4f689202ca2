// The adaptive margins' per-row inputs (SPEC §1.6a), from the gathered global batch that every shard
// holds, so that every GPU of the job computes the same running statistics without an exchange.
// Mirrors src/margin.rs `MarginState` in the same f64 arithmetic.

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
