// Centers and optimizer state as stored (`storage_dtype`), prepended to every source after
// common.cuh: f32, or bf16 held as its 16 bits (`u16`), which the kernels widen to f32 to compute
// and round back when they write. src/storage.rs defines the rounding; what is computed here is
// that, bit for bit (tests/all/gpu_storage.rs holds the two together).
//
// A kernel over stored rows is a template on the stored type S (float or u16) behind one entry
// point per type: the f32 entry is the kernel as it was, the `_bf16` one the same arithmetic on
// widened values, each result rounded as it will be stored.

// src/storage.rs `tensor_slot`: a tensor's place among a class's draws.
#define SLOT_CENTERS 0
#define SLOT_MOMENTUM 1
#define SLOT_EXP_AVG 1
#define SLOT_EXP_AVG_SQ 2

// How a step rounds what it stores: from `stream` (src/storage.rs `step_stream(seed, step)`), or
// to nearest where `nearest` is set (the experiments' `Rounding::Nearest`).
struct Rounding {
    u64 stream;
    int nearest;
};

// src/storage.rs `draw_index` of element 0 of `slot`'s row of global class `cls`: element e's 16
// random bits are lane e % 4 of the draw e / 4 after it.
__device__ __forceinline__ u64 first_draw(u64 cls, int slot, int dim) { return (cls * 4 + (u64)slot) * (u64)((dim + 3) / 4); }

// To nearest, ties to even, as bf16 bits; a NaN stays a quiet NaN (src/storage.rs `nearest_bits`).
__device__ __forceinline__ u32 bf16_nearest_bits(u32 b) {
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (b >> 16) | 0x0040u;
    return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}

// x rounded to what bf16 stores, as f32 (its low 16 bits zero): element e of the row whose draws
// start at `first` (src/storage.rs `round_row`). Stochastic rounding is (bits + r) & ~0xFFFF with
// r the element's 16 random bits. That is defined for finite x (the checks refuse anything else
// before a store); here a NaN is kept a NaN, where the sum could carry it into a zero.
__device__ __forceinline__ float round_bf16(float x, Rounding r, u64 first, int e) {
    const u32 b = __float_as_uint(x);
    if (r.nearest || (b & 0x7FFFFFFFu) > 0x7F800000u) return __uint_as_float(bf16_nearest_bits(b) << 16);
    const u32 bits = (u32)(rng_at(r.stream, first + (u64)(e / 4)) >> (16 * (e % 4))) & 0xFFFFu;
    return __uint_as_float((b + bits) & 0xFFFF0000u);
}

// A stored value as f32 (exactly).
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(u16 v) { return __uint_as_float((u32)v << 16); }

// An updated value x as a tensor of the pointer's type will hold it: itself in f32, rounded in
// bf16 (`round_bf16`).
__device__ __forceinline__ float as_stored(const float*, float x, Rounding, u64, int) { return x; }
__device__ __forceinline__ float as_stored(const u16*, float x, Rounding r, u64 first, int e) { return round_bf16(x, r, first, e); }

// Writes a value `as_stored` gave (exactly representable).
__device__ __forceinline__ void put(float* p, float x) { *p = x; }
__device__ __forceinline__ void put(u16* p, float x) { *p = (u16)(__float_as_uint(x) >> 16); }

// Writes any f32 value rounded to nearest (initial centers).
__device__ __forceinline__ void put_nearest(float* p, float x) { *p = x; }
__device__ __forceinline__ void put_nearest(u16* p, float x) { *p = (u16)bf16_nearest_bits(__float_as_uint(x)); }
