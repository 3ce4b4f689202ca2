// The margin and the softmax statistics of one shard's cosines, stored [k][N]: column j (a sampled
// class) is contiguous over the N rows of the global batch. Mirrors src/margin.rs and
// src/backend/cpu/kernels.rs.

#define PI_D 3.14159265358979323846

// Target logit s·(cos(m1·θ + m2) − m3) of rows whose label is on this shard, its slope ∂z/∂cos
// (straight-through: s) and the clamped target cosine; other rows get 0, 0 and −∞.
extern "C" __global__ void target_logits(const float* cosines, int n, const int* col, float s, float m1, float m2, float m3,
                                         int fallback, int exact, float* logit, float* slope, float* target_cos) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (col[i] < 0) {
        logit[i] = 0.0f;
        slope[i] = 0.0f;
        target_cos[i] = -INFINITY;
        return;
    }
    const double c = fmin(fmax((double)cosines[(u64)col[i] * n + i], -1.0), 1.0);
    const double theta = acos(c), angle = (double)m1 * theta + (double)m2;
    double value, d;
    if (fallback && angle > PI_D) {
        value = c - (double)m2 * sin((double)m2);
        d = 1.0;
    } else {
        value = cos(angle);
        d = (double)m1 * sin(angle) / fmax(sin(theta), 1e-6);
    }
    logit[i] = (float)((double)s * (value - (double)m3));
    slope[i] = exact ? (float)((double)s * d) : s;
    target_cos[i] = (float)c;
}

__device__ __forceinline__ float column_logit(float raw, bool is_target, float target, float s, float filter) {
    const float c = fminf(fmaxf(raw, -1.0f), 1.0f);
    if (is_target) return target;
    return (filter > 0.0f && c > filter) ? 0.0f : s * c;
}

// Online (max, Σexp, Σexp over the non-target columns) per row over columns [y·cols, (y+1)·cols),
// and the largest non-target cosine. The non-target sum is accumulated on its own, not taken as
// Σexp − exp(z_y − max): the loss and the target's gradient come from it, and that difference
// keeps no digits when p_y → 1 (SPEC §1.7). Grid: x over rows, y over column chunks; results at [y][i].
extern "C" __global__ void row_stats(const float* cos, int k, int n, const int* col, const float* target_logit, float s,
                                     float filter, int cols, float* part_max, float* part_sum, float* part_rest,
                                     float* part_other) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int j0 = blockIdx.y * cols, j1 = min(k, j0 + cols);
    const int target_col = col[i];
    const float target = target_logit[i];
    float m = -INFINITY, sum = 0.0f, rest = 0.0f, other = -INFINITY;
    for (int j = j0; j < j1; j++) {
        const float raw = cos[(u64)j * n + i];
        const bool is_target = j == target_col;
        const float z = column_logit(raw, is_target, target, s, filter);
        if (z > m) {
            const float f = __expf(m - z);
            sum = sum * f + 1.0f;
            rest = rest * f + (is_target ? 0.0f : 1.0f);
            m = z;
        } else {
            const float e = __expf(z - m);
            sum += e;
            if (!is_target) rest += e;
        }
        if (!is_target) other = fmaxf(other, fminf(fmaxf(raw, -1.0f), 1.0f));
    }
    const u64 at = (u64)blockIdx.y * n + i;
    part_max[at] = m;
    part_sum[at] = sum;
    part_rest[at] = rest;
    part_other[at] = other;
}

// Folds the column chunks: max[i], both sums relative to it, and the largest non-target cosine.
extern "C" __global__ void combine_row_stats(const float* part_max, const float* part_sum, const float* part_rest,
                                             const float* part_other, int parts, int n, float* max_out, float* sum_out,
                                             float* rest_out, float* other_out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float m = -INFINITY, other = -INFINITY;
    for (int p = 0; p < parts; p++) {
        m = fmaxf(m, part_max[(u64)p * n + i]);
        other = fmaxf(other, part_other[(u64)p * n + i]);
    }
    float sum = 0.0f, rest = 0.0f;
    if (m > -INFINITY)
        for (int p = 0; p < parts; p++) {
            const float pm = part_max[(u64)p * n + i];
            if (pm > -INFINITY) {
                const float f = __expf(pm - m);
                sum += part_sum[(u64)p * n + i] * f;
                rest += part_rest[(u64)p * n + i] * f;
            }
        }
    max_out[i] = m;
    sum_out[i] = sum;
    rest_out[i] = rest;
    other_out[i] = other;
}

// After the MAX all-reduce: this shard's two sums relative to the global max, ready for the SUM one
// (a shard without columns, sum 0, contributes 0).
extern "C" __global__ void rescale_sums(const float* local_max, const float* global_max, float* sum, float* rest, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float f = sum[i] == 0.0f ? 0.0f : __expf(local_max[i] - global_max[i]);
    sum[i] *= f;
    rest[i] *= f;
}
