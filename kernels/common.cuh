// Shared device helpers, prepended to every kernel source by the registry (NVRTC compiles each
// source alone and has no CUDA headers here, so nothing is #included).

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// PFC_DTYPE_* values.
#define DTYPE_F32 0
#define DTYPE_F16 1
#define DTYPE_BF16 2

#define INFINITY __int_as_float(0x7f800000)

// Words of a GPU's verdict record (src/backend/cuda/verdict.rs reads them; a test checks that the
// two agree): what a step found wrong, read back by the host once, where it decides.
#define VERDICT_FLAGS 0
#define VERDICT_LABEL_ROW 1
#define VERDICT_LABEL 2
#define VERDICT_NON_FINITE_ROW 3
#define VERDICT_OVERSIZED_ROW 4
#define VERDICT_OVERSIZED_NORM 5
#define VERDICT_WORDS 6
// VERDICT_FLAGS bits.
#define VERDICT_BAD_BATCH 1
#define VERDICT_NON_FINITE_GRADIENT 2
#define VERDICT_NON_FINITE_LOSS 4
#define VERDICT_UPDATE 8
#define VERDICT_SAMPLING 16

// Words of the sampling select's state (kernels/sampling.cu).
#define SELECT_PREFIX 0
#define SELECT_MASK 1
#define SELECT_REMAINING 2
#define SELECT_POSITIVES 3
#define SELECT_COUNT 4
#define SELECT_WORDS 5

// The margin kinds the kernels tell apart (PFC_MARGIN_*, src/config.rs `MarginKind::code`; a test
// checks that the two agree).
#define MARGIN_ADAFACE 1

__device__ __forceinline__ u16 f32_to_bf16(float v) {
    // Round to nearest even; inputs are finite (validated on entry).
    u32 bits = __float_as_uint(v);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (u16)(bits >> 16);
}

__device__ __forceinline__ u16 f32_to_f16(float v) {
#ifdef __CUDA_ARCH__
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#else
    // The host emulation (tests/cuda-emulator/kernel.hh), which has no PTX.
    return pfc_emu_f32_to_f16(v);
#endif
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return pfc_emu_f16_to_f32(h);
#endif
}

__device__ __forceinline__ float load_as_f32(const void* base, u64 index, int dtype) {
    if (dtype == DTYPE_F16) return f16_to_f32(((const u16*)base)[index]);
    if (dtype == DTYPE_BF16) return __uint_as_float((u32)((const u16*)base)[index] << 16);
    return ((const float*)base)[index];
}

__device__ __forceinline__ void store_from_f32(void* base, u64 index, float v, int dtype) {
    if (dtype == DTYPE_F16) ((u16*)base)[index] = f32_to_f16(v);
    else if (dtype == DTYPE_BF16) ((u16*)base)[index] = f32_to_bf16(v);
    else ((float*)base)[index] = v;
}

// CurricularFace's hard negatives (SPEC §1.6a): a row's threshold cos(θ_y + m), above which a
// non-target cosine is hard, and t (`hard_t[0]`, the running statistics the step uses); none where
// `hard_above` is null (the other margins).
struct HardNegatives {
    float above, t;
};

__device__ __forceinline__ HardNegatives hard_negatives(const float* hard_above, const float* hard_t, int i) {
    HardNegatives h;
    h.above = hard_above ? hard_above[i] : INFINITY;
    h.t = hard_above ? hard_t[0] : 0.0f;
    return h;
}

// A non-target logit over s of its clamped cosine c: c, or a hard negative's c·(t + c).
__device__ __forceinline__ float non_target_value(float c, HardNegatives h) { return c > h.above ? c * (h.t + c) : c; }

// Its derivative: 1, or t + 2c.
__device__ __forceinline__ float non_target_slope(float c, HardNegatives h) { return c > h.above ? h.t + 2.0f * c : 1.0f; }

// Sum over a block of up to 1024 threads (f32, or f64 where the CPU backend sums in f64); every
// thread gets the result.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* scratch /* 32 values */) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? scratch[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// SplitMix64's finalizer: must equal src/rng.rs `mix64` bit for bit.
__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// src/rng.rs `at`: value `index` of the counter-based stream `stream`.
__device__ __forceinline__ u64 rng_at(u64 stream, u64 index) { return mix64(stream + (index + 1) * 0x9E3779B97F4A7C15ull); }
