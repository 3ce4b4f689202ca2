// The host build of kernels/*.cu (scripts/cuda-emulator.sh prepends this to each source, then
// common.cuh as the registry does): CUDA's qualifiers, built-in variables and device intrinsics
// over blocks.cc's execution model. Exactly the sources NVRTC compiles for the GPU; only what they
// use is provided (and CUDA's shuffle family), so a kernel needing more fails to build here rather
// than behave differently.
#pragma once
#include "blocks.hh"
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// cmath's INFINITY would clash with common.cuh's own definition (NVRTC has no cmath).
#undef INFINITY

#define __global__
#define __device__ static
#define __forceinline__ inline
// A block's threads are fibers of one host thread and one block runs on a host thread at a time,
// so per-host-thread storage is per-block storage.
#define __shared__ static thread_local

#define threadIdx (::pfc_emu::thread_index())
#define blockIdx (::pfc_emu::block_index())
#define blockDim (::pfc_emu::block_dim())
#define gridDim (::pfc_emu::grid_dim())

using std::fmax;
using std::fmin;
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

static inline void __syncthreads() { ::pfc_emu::sync_threads(); }

// The GPU's __expf is a fast approximation (2 + 1.16·|x| ulp); the host's expf is exact to 1 ulp.
// Results agree to that difference, which the tests' tolerances cover.
// (glibc declares its own __expf, hence the macro.)
static inline float pfc_emu_expf(float x) { return expf(x); }
#define __expf pfc_emu_expf

template <class To, class From>
static inline To pfc_emu_bits(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit casts keep the size");
    To out;
    std::memcpy(&out, &v, sizeof out);
    return out;
}
static inline float __int_as_float(int v) { return pfc_emu_bits<float>(v); }
static inline float __uint_as_float(unsigned v) { return pfc_emu_bits<float>(v); }
static inline int __float_as_int(float v) { return pfc_emu_bits<int>(v); }
static inline unsigned __float_as_uint(float v) { return pfc_emu_bits<unsigned>(v); }
static inline long long __double_as_longlong(double v) { return pfc_emu_bits<long long>(v); }
static inline int __popc(unsigned v) { return __builtin_popcount(v); }

// CUDA's `_rn` arithmetic: IEEE operations rounded to nearest even, which the GPU's compiler never
// fuses into a multiply-add. The host's compiler may fuse a product into the sum it feeds where the
// target has FMA (GCC's -ffp-contract=fast); passing each operand and result through memory it
// cannot see into keeps every operation rounded on its own.
template <class T>
static inline T pfc_emu_rounded(T v) {
    __asm__("" : "+m"(v));
    return v;
}
static inline float __fadd_rn(float a, float b) { return pfc_emu_rounded(pfc_emu_rounded(a) + pfc_emu_rounded(b)); }
static inline float __fmul_rn(float a, float b) { return pfc_emu_rounded(pfc_emu_rounded(a) * pfc_emu_rounded(b)); }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
static inline double __dadd_rn(double a, double b) { return pfc_emu_rounded(pfc_emu_rounded(a) + pfc_emu_rounded(b)); }
static inline double __dmul_rn(double a, double b) { return pfc_emu_rounded(pfc_emu_rounded(a) * pfc_emu_rounded(b)); }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return std::sqrt(a); }

// f32 to IEEE binary16, round to nearest even (the GPU's cvt.rn.f16.f32).
static inline unsigned short pfc_emu_f32_to_f16(float v) {
    _Float16 h = (_Float16)v;
    return pfc_emu_bits<unsigned short>(h);
}

static inline float pfc_emu_f16_to_f32(unsigned short h) { return (float)pfc_emu_bits<_Float16>(h); }

// Real atomics: a grid's blocks run on several host threads at once. Each returns the old value.
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
static inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
static inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

template <class T>
static inline T pfc_emu_shuffle(::pfc_emu::WarpOp op, unsigned mask, T var, int arg, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &var, sizeof var);
    bits = ::pfc_emu::warp_meet(op, mask, bits, arg, width);
    std::memcpy(&var, &bits, sizeof var);
    return var;
}
template <class T>
static inline T __shfl_sync(unsigned mask, T var, int src, int width = 32) {
    return pfc_emu_shuffle(::pfc_emu::WarpOp::Shfl, mask, var, src, width);
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return pfc_emu_shuffle(::pfc_emu::WarpOp::ShflUp, mask, var, (int)delta, width);
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return pfc_emu_shuffle(::pfc_emu::WarpOp::ShflDown, mask, var, (int)delta, width);
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    return pfc_emu_shuffle(::pfc_emu::WarpOp::ShflXor, mask, var, lane_mask, width);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)::pfc_emu::warp_meet(::pfc_emu::WarpOp::Ballot, mask, pred != 0, 0, 32);
}

namespace pfc_emu {
// Copies a launch's arguments out of `kernelParams` by the kernel's own parameter types.
template <class... A, size_t... I>
ThreadBody bind_params(void (*kernel)(A...), void** params, std::index_sequence<I...>) {
    std::tuple<std::decay_t<A>...> args{*static_cast<std::decay_t<A>*>(params[I])...};
    return [kernel, args] { std::apply(kernel, args); };
}
template <auto Kernel>
struct Registration;
template <class... A, void (*Kernel)(A...)>
struct Registration<Kernel> {
    static ThreadBody bind(void** params) { return bind_params(Kernel, params, std::index_sequence_for<A...>{}); }
    explicit Registration(const char* name) { register_kernel(name, &bind); }
};
}  // namespace pfc_emu

#define PFC_EMU_REGISTER(name) static const ::pfc_emu::Registration<&name> pfc_emu_registration_##name{#name};
