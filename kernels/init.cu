// Initial class centers on the device, the values of src/rng.rs `init_center`: class c's row is
// N(0, std²) from the counter-based stream (seed, PURPOSE_INIT, c), values 2p and 2p + 1 being the
// Box–Muller pair of the stream's draws 2p and 2p + 1. The device's double log, cos and sin are
// within 2 ulp of the host's; rounding to f32 hides that but for about one value in 10^8, which
// then differs by one f32 ulp. bf16 storage holds each f32 value rounded to nearest.

#define TAU_D 6.283185307179586476925286766559

__device__ __forceinline__ double unit_open(u64 bits) {
    return ((double)(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

// `purpose_base` is src/rng.rs `purpose_base(seed, PURPOSE_INIT)`; rows [0, rows) are classes
// [start, start + rows).
template <class S>
__device__ __forceinline__ void init_rows(u64 purpose_base, u64 start, u64 rows, int dim, float std, S* out) {
    const u64 pairs = (u64)(dim + 1) / 2, total = rows * pairs;
    for (u64 at = blockIdx.x * (u64)blockDim.x + threadIdx.x; at < total; at += (u64)gridDim.x * blockDim.x) {
        const u64 j = at / pairs, p = at % pairs;
        const u64 base = mix64(purpose_base ^ (start + j));
        const double r = sqrt(-2.0 * log(unit_open(rng_at(base, 2 * p))));
        const double t = TAU_D * unit_open(rng_at(base, 2 * p + 1));
        S* row = out + j * (u64)dim;
        put_nearest(&row[2 * p], (float)(r * cos(t) * (double)std));
        if (2 * p + 1 < (u64)dim) put_nearest(&row[2 * p + 1], (float)(r * sin(t) * (double)std));
    }
}

extern "C" __global__ void init_centers(u64 purpose_base, u64 start, u64 rows, int dim, float std, float* out) {
    init_rows(purpose_base, start, rows, dim, std, out);
}

extern "C" __global__ void init_centers_bf16(u64 purpose_base, u64 start, u64 rows, int dim, float std, u16* out) {
    init_rows(purpose_base, start, rows, dim, std, out);
}
