// The emulated cuBLAS (libcublas.so.13): the handles and the one GEMM the backend calls through
// cudarc (cublasCreate_v2 and cublasSetStream_v2 from CudaBlas::new, cublasDestroy_v2 from its
// Drop, cublasGemmEx from result::gemm_ex). cudarc resolves each symbol on first use, so nothing
// else is exported: a call to anything more fails loudly in cudarc ("Missing symbol").
//
// cublasGemmEx is emulated for real operands only: A and B both f32, f16 or bf16, C f32 or of A's
// 16-bit type, f32 compute, host pointer mode (the handles never leave it: cudarc's path never
// sets it). The GEMM runs on the handle's stream through the driver's queue; its pointers are
// checked there, as a GPU faults when the kernel runs, not when it is launched.
#include "emulator.hh"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

// cublas_api.h's types and the values of the enums used here, as cudarc 0.19's bindings for CUDA
// 13 spell them (no CUDA toolkit is installed here).
extern "C" {
typedef struct cublasContext* cublasHandle_t;
typedef int cublasStatus_t;
typedef int cublasOperation_t;
typedef int cudaDataType;
typedef int cublasComputeType_t;
typedef int cublasGemmAlgo_t;
}

namespace {

enum : cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum : cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum : cudaDataType { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
enum : cublasComputeType_t {
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
};
enum : cublasGemmAlgo_t {
    CUBLAS_GEMM_DFALT = -1,
    CUBLAS_GEMM_ALGO23 = 23,
    CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99,
    CUBLAS_GEMM_ALGO15_TENSOR_OP = 115,
};

// ---- Handles ----------------------------------------------------------------------------------

struct Handle {
    CUstream stream = nullptr;
};

// Handle values are numbers never handed out twice, so a destroyed handle stays recognisably dead
// (NOT_INITIALIZED) even after another is created; no caller dereferences a cublasHandle_t.
std::mutex handles_mutex;
std::unordered_map<uintptr_t, Handle> handles;
uintptr_t last_handle = 0;

// ---- 16-bit floating point --------------------------------------------------------------------

float bits_to_float(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

uint32_t float_to_bits(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
}

float widen(float v) { return v; }

struct F16 {
    uint16_t bits;
};
struct BF16 {
    uint16_t bits;
};

float widen(F16 h) {
    uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
    if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | mantissa << 13);
    if (exponent != 0) return bits_to_float(sign | (exponent + 112) << 23 | mantissa << 13);
    // Zero or subnormal: mantissa · 2⁻²⁴, exact in f32.
    float magnitude = float(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
}

float widen(BF16 h) { return bits_to_float(uint32_t(h.bits) << 16); }

// Rounds `value` (an integer) right by `shift` bits, to nearest with ties to even.
uint32_t shift_round_even(uint32_t value, int shift) {
    uint32_t kept = value >> shift, rest = value & ((1u << shift) - 1), half = 1u << (shift - 1);
    return kept + (rest > half || (rest == half && (kept & 1)));
}

F16 to_f16(float f) {
    uint32_t x = float_to_bits(f), sign = (x >> 16) & 0x8000u, magnitude = x & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return {uint16_t(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu))};
    // From 65520 (halfway between 65504, the largest f16, and 2¹⁶) up, the even neighbour is ∞.
    if (magnitude >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};
    if (magnitude >= 0x38800000u) {
        // Normal in f16: rebias the exponent (127 → 15); a carry out of the mantissa moves it up.
        return {uint16_t(sign | shift_round_even(magnitude - 0x38000000u, 13))};
    }
    // Subnormal in f16 (or zero): the value in units of 2⁻²⁴. Below 2⁻²⁵ it rounds to zero.
    int exponent = int(magnitude >> 23);
    int shift = 126 - exponent;
    if (exponent == 0 || shift > 24) return {uint16_t(sign)};
    return {uint16_t(sign | shift_round_even((magnitude & 0x7fffffu) | 0x800000u, shift))};
}

BF16 to_bf16(float f) {
    uint32_t x = float_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return {uint16_t((x >> 16) | 0x40u)};
    return {uint16_t(shift_round_even(x, 16))};
}

void narrow(float v, float* out) { *out = v; }
void narrow(float v, F16* out) { *out = to_f16(v); }
void narrow(float v, BF16* out) { *out = to_bf16(v); }

// ---- The GEMM ---------------------------------------------------------------------------------

struct Gemm {
    bool trans_a, trans_b;
    size_t m, n, k;
    float alpha, beta;
    const void* a;
    size_t lda;
    const void* b;
    size_t ldb;
    void* c;
    size_t ldc;
};

// Register blocks: MR rows × NR columns of C accumulate in 2 × 4 vectors of 4 floats (8 of x86-64's
// 16 SSE registers; -O2 gives no wider ISA). K is walked in slices of KC so that a slice of packed
// op(A) stays in cache while the columns pass by.
constexpr size_t MR = 8, NR = 4, KC = 256;
typedef float f32x4 __attribute__((vector_size(16), aligned(4)));

// acc[j][h] += op(A)[rows h·4 .. h·4+3][p] · op(B)[p][j] for p in the slice: per term a rounded
// f32 product and a rounded f32 sum, in order of p, so each result is the same on every host (a
// GPU fuses the two; the difference is within f32 accumulation's error).
inline void micro_kernel(size_t kc, const float* a, const float* b, f32x4 acc[NR][2]) {
    f32x4 c00 = acc[0][0], c01 = acc[0][1], c10 = acc[1][0], c11 = acc[1][1];
    f32x4 c20 = acc[2][0], c21 = acc[2][1], c30 = acc[3][0], c31 = acc[3][1];
    for (size_t p = 0; p < kc; ++p, a += MR, b += NR) {
        f32x4 a0 = *reinterpret_cast<const f32x4*>(a), a1 = *reinterpret_cast<const f32x4*>(a + 4);
        c00 += a0 * b[0];
        c01 += a1 * b[0];
        c10 += a0 * b[1];
        c11 += a1 * b[1];
        c20 += a0 * b[2];
        c21 += a1 * b[2];
        c30 += a0 * b[3];
        c31 += a1 * b[3];
    }
    acc[0][0] = c00, acc[0][1] = c01, acc[1][0] = c10, acc[1][1] = c11;
    acc[2][0] = c20, acc[2][1] = c21, acc[3][0] = c30, acc[3][1] = c31;
}

template <class TA, class TB, class TC>
class Runner {
  public:
    explicit Runner(const Gemm& g)
        : g_(g), a_(static_cast<const TA*>(g.a)), b_(static_cast<const TB*>(g.b)), c_(static_cast<TC*>(g.c)),
          row_blocks_((g.m + MR - 1) / MR), col_blocks_((g.n + NR - 1) / NR) {}

    void run() {
        if (g_.k == 0 || g_.alpha == 0.0f) {
            scale_c();
            return;
        }
        pack_a();
        if (g_.k > KC) partial_.assign(row_blocks_ * MR * col_blocks_ * NR, 0.0f);
        size_t threads = 1;
        // Threads pay off from a few million products (a thread costs tens of microseconds).
        if (g_.m * g_.n * g_.k >= (size_t(1) << 21)) {
            threads = std::min<size_t>({std::max(1u, std::thread::hardware_concurrency()), 8, col_blocks_});
        }
        // Allocated here, where running out of memory is caught, not on the threads.
        std::vector<std::vector<float>> panels(threads, std::vector<float>(std::min(KC, g_.k) * NR));
        std::vector<std::thread> workers;
        workers.reserve(threads);
        size_t per_thread = (col_blocks_ + threads - 1) / threads;
        for (size_t t = 1; t < threads; ++t) {
            size_t first = std::min(col_blocks_, t * per_thread), last = std::min(col_blocks_, first + per_thread);
            float* panel = panels[t].data();
            try {
                workers.emplace_back([this, first, last, panel] { columns(first, last, panel); });
            } catch (const std::system_error&) {
                columns(first, last, panel);
            }
        }
        columns(0, std::min(col_blocks_, per_thread), panels[0].data());
        for (auto& w : workers) w.join();
    }

  private:
    // C = β·C over m × n; when β is 0 C is not read, so NaN there does not survive.
    void scale_c() {
        for (size_t j = 0; j < g_.n; ++j) {
            for (size_t i = 0; i < g_.m; ++i) {
                TC* out = c_ + i + j * g_.ldc;
                narrow(g_.beta == 0.0f ? 0.0f : g_.beta * widen(*out), out);
            }
        }
    }

    float op_a(size_t i, size_t p) const { return widen(g_.trans_a ? a_[p + i * g_.lda] : a_[i + p * g_.lda]); }
    float op_b(size_t p, size_t j) const { return widen(g_.trans_b ? b_[j + p * g_.ldb] : b_[p + j * g_.ldb]); }

    // op(A) as row blocks of MR rows, each k × MR with rows contiguous; rows past m are zero.
    void pack_a() {
        packed_a_.assign(row_blocks_ * MR * g_.k, 0.0f);
        for (size_t rb = 0; rb < row_blocks_; ++rb) {
            float* panel = &packed_a_[rb * MR * g_.k];
            size_t rows = std::min(MR, g_.m - rb * MR);
            if (g_.trans_a) {
                for (size_t r = 0; r < rows; ++r) {
                    for (size_t p = 0; p < g_.k; ++p) panel[p * MR + r] = op_a(rb * MR + r, p);
                }
            } else {
                for (size_t p = 0; p < g_.k; ++p) {
                    for (size_t r = 0; r < rows; ++r) panel[p * MR + r] = op_a(rb * MR + r, p);
                }
            }
        }
    }

    // Column block `cb` of op(B), rows [p0, p0 + kc), as kc × NR with columns contiguous; columns
    // past n are zero.
    void pack_b(size_t cb, size_t p0, size_t kc, float* panel) const {
        size_t cols = std::min(NR, g_.n - cb * NR);
        std::fill(panel, panel + kc * NR, 0.0f);
        if (g_.trans_b) {
            for (size_t p = 0; p < kc; ++p) {
                for (size_t c = 0; c < cols; ++c) panel[p * NR + c] = op_b(p0 + p, cb * NR + c);
            }
        } else {
            for (size_t c = 0; c < cols; ++c) {
                for (size_t p = 0; p < kc; ++p) panel[p * NR + c] = op_b(p0 + p, cb * NR + c);
            }
        }
    }

    // Column blocks [first, last) of C, all of K, packing op(B) into `panel` (KC × NR). Sums of an
    // earlier K slice wait in `partial_`.
    void columns(size_t first, size_t last, float* panel) {
        for (size_t p0 = 0; p0 < g_.k; p0 += KC) {
            size_t kc = std::min(KC, g_.k - p0);
            bool first_slice = p0 == 0, last_slice = p0 + kc == g_.k;
            for (size_t cb = first; cb < last; ++cb) {
                pack_b(cb, p0, kc, panel);
                for (size_t rb = 0; rb < row_blocks_; ++rb) {
                    f32x4 acc[NR][2] = {};
                    float* saved = partial_.empty() ? nullptr : &partial_[(cb * row_blocks_ + rb) * MR * NR];
                    if (!first_slice) std::memcpy(acc, saved, sizeof acc);
                    micro_kernel(kc, &packed_a_[(rb * g_.k + p0) * MR], panel, acc);
                    if (last_slice) {
                        store(rb, cb, acc);
                    } else {
                        std::memcpy(saved, acc, sizeof acc);
                    }
                }
            }
        }
    }

    // C = α·acc + β·C for the block's entries inside m × n, rounded once to C's type.
    void store(size_t rb, size_t cb, const f32x4 acc[NR][2]) {
        size_t rows = std::min(MR, g_.m - rb * MR), cols = std::min(NR, g_.n - cb * NR);
        for (size_t c = 0; c < cols; ++c) {
            for (size_t r = 0; r < rows; ++r) {
                TC* out = c_ + (rb * MR + r) + (cb * NR + c) * g_.ldc;
                float v = g_.alpha * acc[c][r / 4][r % 4];
                if (g_.beta != 0.0f) v += g_.beta * widen(*out);
                narrow(v, out);
            }
        }
    }

    const Gemm g_;
    const TA* a_;
    const TB* b_;
    TC* c_;
    size_t row_blocks_, col_blocks_;
    std::vector<float> packed_a_, partial_;
};

size_t type_size(cudaDataType t) { return t == CUDA_R_32F ? 4 : 2; }

const char* type_name(cudaDataType t) {
    switch (t) {
        case CUDA_R_32F:
            return "f32";
        case CUDA_R_16F:
            return "f16";
        default:
            return "bf16";
    }
}

void run_typed(cudaDataType ab, cudaDataType c, const Gemm& g) {
    switch (ab) {
        case CUDA_R_32F:
            Runner<float, float, float>(g).run();
            break;
        case CUDA_R_16F:
            if (c == CUDA_R_32F) {
                Runner<F16, F16, float>(g).run();
            } else {
                Runner<F16, F16, F16>(g).run();
            }
            break;
        default:
            if (c == CUDA_R_32F) {
                Runner<BF16, BF16, float>(g).run();
            } else {
                Runner<BF16, BF16, BF16>(g).run();
            }
    }
}

bool is_op(cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }

// cublasGemmEx's table of type combinations for f32 compute, real types only. The FAST variants
// only allow tensor-core down-conversion, and only for f32 operands; full f32 is one of the
// results they permit.
bool supported(cudaDataType a, cudaDataType b, cudaDataType c, cublasComputeType_t compute) {
    if (a != b) return false;
    switch (compute) {
        case CUBLAS_COMPUTE_32F:
        case CUBLAS_COMPUTE_32F_PEDANTIC:
            return (a == CUDA_R_32F && c == CUDA_R_32F) || ((a == CUDA_R_16F || a == CUDA_R_16BF) && (c == a || c == CUDA_R_32F));
        case CUBLAS_COMPUTE_32F_FAST_16F:
        case CUBLAS_COMPUTE_32F_FAST_16BF:
        case CUBLAS_COMPUTE_32F_FAST_TF32:
            return a == CUDA_R_32F && c == CUDA_R_32F;
        default:
            return false;
    }
}

// The algorithms cublasGemmEx knows; from sm_80 on each of them means the default one.
bool is_algo(cublasGemmAlgo_t algo) {
    return (algo >= CUBLAS_GEMM_DFALT && algo <= CUBLAS_GEMM_ALGO23) ||
           (algo >= CUBLAS_GEMM_DEFAULT_TENSOR_OP && algo <= CUBLAS_GEMM_ALGO15_TENSOR_OP);
}

// Elements a column-major rows × cols matrix with leading dimension ld spans.
size_t footprint(size_t rows, size_t cols, size_t ld) { return rows == 0 || cols == 0 ? 0 : (cols - 1) * ld + rows; }

}  // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
    if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(handles_mutex);
    last_handle += 16;
    handles.emplace(last_handle, Handle{});
    *handle = reinterpret_cast<cublasHandle_t>(last_handle);
    return CUBLAS_STATUS_SUCCESS;
}

// Queued GEMMs hold copies of what they need, not the handle, so destroying it waits for nothing.
cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
    std::lock_guard<std::mutex> lock(handles_mutex);
    return handles.erase(reinterpret_cast<uintptr_t>(handle)) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, CUstream stream) {
    std::lock_guard<std::mutex> lock(handles_mutex);
    auto it = handles.find(reinterpret_cast<uintptr_t>(handle));
    if (it == handles.end()) return CUBLAS_STATUS_NOT_INITIALIZED;
    it->second.stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
    CUstream stream;
    {
        std::lock_guard<std::mutex> lock(handles_mutex);
        auto it = handles.find(reinterpret_cast<uintptr_t>(handle));
        if (it == handles.end()) return CUBLAS_STATUS_NOT_INITIALIZED;
        stream = it->second.stream;
    }
    if (!is_op(transa) || !is_op(transb) || m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
    if (lda < std::max(1, ta ? k : m) || ldb < std::max(1, tb ? n : k) || ldc < std::max(1, m)) {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    if (!supported(Atype, Btype, Ctype, computeType) || !is_algo(algo)) return CUBLAS_STATUS_NOT_SUPPORTED;

    // Host pointer mode: the scalars are read now, the matrices when the GEMM runs.
    Gemm g{ta, tb, size_t(m), size_t(n), size_t(k), *static_cast<const float*>(alpha), *static_cast<const float*>(beta),
           A, size_t(lda), B, size_t(ldb), C, size_t(ldc)};
    if (m == 0 || n == 0 || ((k == 0 || g.alpha == 0.0f) && g.beta == 1.0f)) return CUBLAS_STATUS_SUCCESS;

    int device = pfc_emu::stream_device(stream);
    auto work = [g, Atype, Btype, Ctype, device] {
        auto in_bounds = [&](const char* operand, const void* p, size_t rows, size_t cols, size_t ld, cudaDataType t) {
            std::string why;
            size_t bytes = footprint(rows, cols, ld) * type_size(t);
            if (pfc_emu::check_device_range(reinterpret_cast<CUdeviceptr>(p), bytes, device, &why)) return true;
            pfc_emu::fail(device, CUDA_ERROR_ILLEGAL_ADDRESS,
                          "cublasGemmEx: operand " + std::string(operand) + " (" + std::to_string(rows) + " x " +
                              std::to_string(cols) + " " + type_name(t) + ", leading dimension " +
                              std::to_string(ld) + "): " + why);
            return false;
        };
        // A and B are read only when there are products to add.
        bool reads_ab = g.k > 0 && g.alpha != 0.0f;
        if (reads_ab && !in_bounds("A", g.a, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda, Atype)) return;
        if (reads_ab && !in_bounds("B", g.b, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb, Btype)) return;
        if (!in_bounds("C", g.c, g.m, g.n, g.ldc, Ctype)) return;
        try {
            run_typed(Atype, Ctype, g);
        } catch (const std::bad_alloc&) {
            pfc_emu::fail(device, CUDA_ERROR_LAUNCH_FAILED, "cublasGemmEx: out of host memory for the packed operands");
        }
    };
    if (pfc_emu::enqueue(stream, "cublasGemmEx", work) != CUDA_SUCCESS) return CUBLAS_STATUS_EXECUTION_FAILED;
    pfc_emu::count_launch(device, "cublasGemmEx");
    return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
