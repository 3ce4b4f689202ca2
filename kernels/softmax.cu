// The margin and the softmax statistics of one shard's cosines, stored [k][N]: column j (a sampled
// class) is contiguous over the N rows of the global batch. Mirrors src/margin.rs and
// src/backend/cpu/kernels.rs.

#define PI_D 3.14159265358979323846

// Target logit of rows whose label is on this shard, its slope ∂z/∂cos and the target cosine
// clamped to [−1, 1]; other rows get 0, 0 and −∞. The combined margin (CurricularFace's target
// too): s·(cos(m1·θ + m2) − m3), its slope exact or straight-through (s). AdaFace (`kind`, with
// the row's scaler g): the cosine clamped to [−bound, bound], s·(cos(clip(θ − m·g, eps, π − eps))
// − (m + m·g)), its slope exact and 0 where the clip holds. `cosines` holds the sampled columns
// [first, first + count) (one class chunk): rows whose target lies in another chunk are left to
// that chunk's launch, rows without one are written by the first. `targets`, where not null, are
// the rows' reduced target cosines (CurricularFace's), taken instead of the GEMM's.
extern "C" __global__ void target_logits(const float* cosines, int n, const int* col, int first, int count, float s, float m1,
                                         float m2, float m3, int fallback, int exact, int kind, float margin,
                                         const float* scaler, float bound, double eps, const float* targets, float* logit,
                                         float* slope, float* target_cos) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int c_col = col[i];
    if (c_col < 0) {
        if (first == 0) {
            logit[i] = 0.0f;
            slope[i] = 0.0f;
            target_cos[i] = -INFINITY;
        }
        return;
    }
    if (c_col < first || c_col - first >= count) return;
    const float raw = targets ? targets[i] : cosines[(u64)(c_col - first) * n + i];
    const double c = fmin(fmax((double)raw, -1.0), 1.0);
    target_cos[i] = (float)c;
    if (kind == MARGIN_ADAFACE) {
        const double ca = fmin(fmax((double)raw, -(double)bound), (double)bound);
        const double m = (double)margin, g = (double)scaler[i];
        const double theta = acos(ca), moved = theta - m * g;
        const double angle = fmin(fmax(moved, eps), PI_D - eps);
        logit[i] = (float)((double)s * (cos(angle) - (m + m * g)));
        slope[i] = angle == moved ? (float)((double)s * sin(angle) / sin(theta)) : 0.0f;
        return;
    }
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
}

// A column's logit: the target's, or the non-target logit of the cosine clamped to [−bound, bound]
// (1, or AdaFace's 1 − eps), 0 where the filter removes it.
__device__ __forceinline__ float column_logit(float raw, bool is_target, float target, float s, float filter, float bound,
                                              HardNegatives hard) {
    const float c = fminf(fmaxf(raw, -bound), bound);
    if (is_target) return target;
    return (filter > 0.0f && c > filter) ? 0.0f : s * non_target_value(c, hard);
}

// Online (max, Σexp, Σexp over the non-target columns) per row over columns [y·cols, (y+1)·cols),
// and the largest non-target cosine. The non-target sum is accumulated on its own, not taken as
// Σexp − exp(z_y − max): the loss and the target's gradient come from it, and that difference
// keeps no digits when p_y → 1 (SPEC §1.7). `cos` holds the k sampled columns from `first` on (one
// class chunk). Grid: x over rows, y over groups of `cols` columns; results at [y][i].
extern "C" __global__ void row_stats(const float* cos, int k, int n, const int* col, int first, const float* target_logit,
                                     float s, float filter, float bound, const float* hard_above, const float* hard_t, int cols,
                                     float* part_max, float* part_sum, float* part_rest, float* part_other) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int j0 = blockIdx.y * cols, j1 = min(k, j0 + cols);
    const int target_col = col[i] < 0 ? -1 : col[i] - first;
    const float target = target_logit[i];
    const HardNegatives hard = hard_negatives(hard_above, hard_t, i);
    float m = -INFINITY, sum = 0.0f, rest = 0.0f, other = -INFINITY;
    for (int j = j0; j < j1; j++) {
        const float raw = cos[(u64)j * n + i];
        const bool is_target = j == target_col;
        const float z = column_logit(raw, is_target, target, s, filter, bound, hard);
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

// (max, Σexp, Σexp over the non-target columns) of `b` folded into `a`, both relative to their max.
__device__ __forceinline__ void fold_stats(float& m, float& sum, float& rest, float pm, float ps, float pr) {
    if (pm == -INFINITY) return;
    if (pm > m) {
        const float f = __expf(m - pm);
        sum = sum * f + ps;
        rest = rest * f + pr;
        m = pm;
    } else {
        const float f = __expf(pm - m);
        sum += ps * f;
        rest += pr * f;
    }
}

// Folds the column groups: max[i], both sums relative to it, and the largest non-target cosine.
// One warp per row, its lanes striding over the parts and meeting by shuffles. With `merge`, the
// outputs' current values (the earlier class chunks) are folded in as one more part; each row's
// outputs are written by its lane 0 after every lane has read.
extern "C" __global__ void combine_row_stats(const float* part_max, const float* part_sum, const float* part_rest,
                                             const float* part_other, int parts, int n, int merge, float* max_out,
                                             float* sum_out, float* rest_out, float* other_out) {
    const int lane = threadIdx.x & 31;
    const u64 i = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (i >= (u64)n) return;
    float m = -INFINITY, sum = 0.0f, rest = 0.0f, other = -INFINITY;
    if (merge && lane == 0) {
        fold_stats(m, sum, rest, max_out[i], sum_out[i], rest_out[i]);
        other = other_out[i];
    }
    for (int p = lane; p < parts; p += 32) {
        const u64 at = (u64)p * n + i;
        fold_stats(m, sum, rest, part_max[at], part_sum[at], part_rest[at]);
        other = fmaxf(other, part_other[at]);
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float pm = __shfl_down_sync(0xffffffffu, m, o), ps = __shfl_down_sync(0xffffffffu, sum, o);
        const float pr = __shfl_down_sync(0xffffffffu, rest, o), po = __shfl_down_sync(0xffffffffu, other, o);
        fold_stats(m, sum, rest, pm, ps, pr);
        other = fmaxf(other, po);
    }
    if (lane == 0) {
        max_out[i] = m;
        sum_out[i] = sum;
        rest_out[i] = rest;
        other_out[i] = other;
    }
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

// The loss's finiteness where the host does not read the statistics (no statistics asked for):
// a row's exact log-softmax loss (src/head/driver.rs `sample_loss`) is finite exactly when its max,
// non-target Σexp and target logit are, so the verdict's VERDICT_NON_FINITE_LOSS is set when one
// is not. `maxes` and `sums` are the reduced statistics as `Primitives::forward` lays them out.
extern "C" __global__ void check_loss(const float* maxes, const float* sums, int n, u64* verdict) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = maxes[i] + sums[n + i] + sums[2 * n + i];
    if ((v - v) != 0.0f) atomicOr(&verdict[VERDICT_FLAGS], (u64)VERDICT_NON_FINITE_LOSS);
}
