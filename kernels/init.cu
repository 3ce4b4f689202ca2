// Initial class centers on the device, the values of src/rng.rs `init_center`: class c's row is
// N(0, std²) from the counter-based stream (seed, PURPOSE_INIT, c), values 2p and 2p + 1 being the
// Box–Muller pair of the stream's draws 2p and 2p + 1. The device's double log, cos and sin are
// within 2 ulp of the host's; rounding to f32 hides that but for about one value in 10^8, which
// then differs by one f32 ulp.

#define INIT_GAMMA 0x9E3779B97F4A7C15ull
#define TAU_D 6.283185307179586476925286766559

__device__ __forceinline__ double unit_open(u64 bits) {
    return ((double)(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

// `purpose_base` is src/rng.rs `purpose_base(seed, PURPOSE_INIT)`; rows [0, rows) are classes
// [start, start + rows).
extern "C" __global__ void init_centers(u64 purpose_base, u64 start, u64 rows, int dim, float std, float* out) {
    const u64 pairs = (u64)(dim + 1) / 2, total = rows * pairs;
    for (u64 at = blockIdx.x * (u64)blockDim.x + threadIdx.x; at < total; at += (u64)gridDim.x * blockDim.x) {
        const u64 j = at / pairs, p = at % pairs;
        const u64 base = mix64(purpose_base ^ (start + j));
        const double r = sqrt(-2.0 * log(unit_open(mix64(base + (2 * p + 1) * INIT_GAMMA))));
        const double t = TAU_D * unit_open(mix64(base + (2 * p + 2) * INIT_GAMMA));
        float* row = out + j * (u64)dim;
        row[2 * p] = (float)(r * cos(t) * (double)std);
        if (2 * p + 1 < (u64)dim) row[2 * p + 1] = (float)(r * sin(t) * (double)std);
    }
}
