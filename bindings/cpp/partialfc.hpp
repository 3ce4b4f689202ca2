// partialfc.hpp — header-only C++17 wrapper over include/partialfc.h.
//
//   #include "partialfc.hpp"            // needs include/ and bindings/cpp/ on the include path
//
//   pfc::Config cfg;                    // the library's defaults (read from pfc_config_init)
//   cfg.num_classes = 100000;
//   cfg.embedding_dim = 512;
//   cfg.sample_rate = 0.1f;
//   pfc::Head head(cfg);                // RAII, move-only; throws pfc::Error on failure
//   pfc::StepStats st = head.train_step(pfc::Batch(embeddings, labels, grad));
//
// - Every failing call throws pfc::Error, carrying the pfc_status (status()), the library's message
//   for the calling thread (message()) and the C function that failed (function()). On failure the
//   head is unchanged, exactly as the C ABI promises.
// - Buffers are passed as pfc::span<T> (a small std::span-like view: pointer + size), built
//   implicitly from std::vector, std::array, C arrays or {pointer, size}. Sizes are checked against
//   the head's embedding dimension before any C call; an empty span is passed as NULL, so the C
//   library's own NULL checks answer for it (PFC_ERR_NULL_ARGUMENT).
// - The wrapper keeps no pointer to caller memory after a call returns (neither does the library).
// - A moved-from or reset() head holds no C head; calls on it throw PFC_ERR_NULL_ARGUMENT.
// - Threading is the library's: a head is used by one thread at a time (calls are serialized).
//
// Link with -lpartialfc (shared) or libpartialfc.a plus the system libraries (static); see README.md.
#ifndef PARTIALFC_HPP
#define PARTIALFC_HPP

#include "partialfc.h"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace pfc {

// ------------------------------------------------------------------------------------------------
// span: a non-owning view of contiguous elements (the subset of C++20 std::span used here).

template <class T>
class span {
   public:
    using element_type = T;
    using value_type = std::remove_cv_t<T>;
    using size_type = std::size_t;
    using pointer = T*;
    using reference = T&;
    using iterator = T*;

    constexpr span() noexcept = default;
    constexpr span(T* data, std::size_t size) noexcept : data_(data), size_(size) {}
    template <std::size_t N>
    constexpr span(T (&array)[N]) noexcept : data_(array), size_(N) {}
    // Any contiguous container with data() and size() holding value_type (std::vector, std::array,
    // another span); a temporary only for a view of const elements, as std::span allows.
    template <class Container, class C = std::remove_reference_t<Container>,
              class = std::enable_if_t<
                  !std::is_array<C>::value && (std::is_lvalue_reference<Container>::value || std::is_const<T>::value) &&
                  std::is_convertible<decltype(std::declval<C&>().data()), T*>::value &&
                  std::is_same<std::remove_cv_t<std::remove_pointer_t<decltype(std::declval<C&>().data())>>,
                               value_type>::value>,
              class = decltype(std::declval<C&>().size())>
    constexpr span(Container&& c) noexcept : data_(c.data()), size_(c.size()) {}
    template <class U, class = std::enable_if_t<!std::is_same<U, T>::value && std::is_convertible<U (*)[], T (*)[]>::value>>
    constexpr span(const span<U>& other) noexcept : data_(other.data()), size_(other.size()) {}

    constexpr T* data() const noexcept { return data_; }
    constexpr std::size_t size() const noexcept { return size_; }
    constexpr std::size_t size_bytes() const noexcept { return size_ * sizeof(T); }
    constexpr bool empty() const noexcept { return size_ == 0; }
    constexpr T& operator[](std::size_t i) const noexcept { return data_[i]; }
    constexpr T* begin() const noexcept { return data_; }
    constexpr T* end() const noexcept { return data_ + size_; }
    // Elements [offset, offset + count); count defaults to the rest. The caller keeps it in range.
    constexpr span subspan(std::size_t offset, std::size_t count = std::numeric_limits<std::size_t>::max()) const noexcept {
        return span(data_ + offset, count == std::numeric_limits<std::size_t>::max() ? size_ - offset : count);
    }

   private:
    T* data_ = nullptr;
    std::size_t size_ = 0;
};

// ------------------------------------------------------------------------------------------------
// Enumerations (the C values).

enum class Status : std::int32_t {
    Ok = PFC_OK,
    NullArgument = PFC_ERR_NULL_ARGUMENT,
    InvalidArgument = PFC_ERR_INVALID_ARGUMENT,
    OutOfMemory = PFC_ERR_OUT_OF_MEMORY,
    Unavailable = PFC_ERR_UNAVAILABLE,
    Device = PFC_ERR_DEVICE,
    Communication = PFC_ERR_COMMUNICATION,
    Io = PFC_ERR_IO,
    Corrupt = PFC_ERR_CORRUPT,
    Incompatible = PFC_ERR_INCOMPATIBLE,
    Panic = PFC_ERR_PANIC,
    NonFinite = PFC_ERR_NON_FINITE,
};

enum class Backend : std::int32_t { Cpu = PFC_BACKEND_CPU, Cuda = PFC_BACKEND_CUDA };
enum class DType : std::int32_t { F32 = PFC_DTYPE_F32, F16 = PFC_DTYPE_F16, BF16 = PFC_DTYPE_BF16 };
enum class Memory : std::int32_t { Host = PFC_MEMORY_HOST, Device = PFC_MEMORY_DEVICE };
enum class Optimizer : std::int32_t { Sgd = PFC_OPTIMIZER_SGD, AdamW = PFC_OPTIMIZER_ADAMW };
enum class MarginGrad : std::int32_t {
    StraightThrough = PFC_MARGIN_GRAD_STRAIGHT_THROUGH,
    Exact = PFC_MARGIN_GRAD_EXACT,
};
enum class MarginKind : std::int32_t {
    Combined = PFC_MARGIN_COMBINED,
    AdaFace = PFC_MARGIN_ADAFACE,
    Curricular = PFC_MARGIN_CURRICULAR,
};
enum class Format : std::int32_t {
    Safetensors = PFC_FORMAT_SAFETENSORS,
    Npy = PFC_FORMAT_NPY,
    Fvecs = PFC_FORMAT_FVECS,
    Faiss = PFC_FORMAT_FAISS,
};

// Storage types of half-precision embeddings and gradients (raw IEEE binary16 / bfloat16 bits).
struct f16 {
    std::uint16_t bits;
};
struct bf16 {
    std::uint16_t bits;
};
static_assert(sizeof(f16) == 2 && sizeof(bf16) == 2, "half types must be 2 bytes");

inline const char* status_name(Status s) noexcept {
    switch (s) {
        case Status::Ok: return "PFC_OK";
        case Status::NullArgument: return "PFC_ERR_NULL_ARGUMENT";
        case Status::InvalidArgument: return "PFC_ERR_INVALID_ARGUMENT";
        case Status::OutOfMemory: return "PFC_ERR_OUT_OF_MEMORY";
        case Status::Unavailable: return "PFC_ERR_UNAVAILABLE";
        case Status::Device: return "PFC_ERR_DEVICE";
        case Status::Communication: return "PFC_ERR_COMMUNICATION";
        case Status::Io: return "PFC_ERR_IO";
        case Status::Corrupt: return "PFC_ERR_CORRUPT";
        case Status::Incompatible: return "PFC_ERR_INCOMPATIBLE";
        case Status::Panic: return "PFC_ERR_PANIC";
        case Status::NonFinite: return "PFC_ERR_NON_FINITE";
    }
    return "PFC_ERR_UNKNOWN";
}

// ------------------------------------------------------------------------------------------------
// Errors.

// What every failing call throws: the status, the library's message and the failing function.
class Error : public std::runtime_error {
   public:
    Error(Status status, std::string message, std::string function)
        : std::runtime_error(function + ": " + status_name(status) + ": " + message),
          status_(status),
          message_(std::move(message)),
          function_(std::move(function)) {}

    Status status() const noexcept { return status_; }
    pfc_status code() const noexcept { return static_cast<pfc_status>(status_); }
    // The library's message (pfc_last_error), or the wrapper's for a size it rejected itself.
    const std::string& message() const noexcept { return message_; }
    // The C function that failed, e.g. "pfc_train_step".
    const std::string& function() const noexcept { return function_; }

   private:
    Status status_;
    std::string message_;
    std::string function_;
};

// The calling thread's last error message from the library.
inline std::string last_error() {
    std::size_t len = pfc_last_error(nullptr, 0);
    std::vector<char> buf(len + 1, '\0');
    pfc_last_error(buf.data(), buf.size());
    return std::string(buf.data(), len);
}

namespace detail {

// Throws pfc::Error for a failed status, reading the message on this (the calling) thread.
inline void check(pfc_status status, const char* function) {
    if (status != PFC_OK) {
        throw Error(static_cast<Status>(status), last_error(), function);
    }
}

[[noreturn]] inline void invalid(const char* function, const std::string& message) {
    throw Error(Status::InvalidArgument, message, function);
}

template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
    static constexpr DType value = DType::F32;
};
template <>
struct dtype_of<f16> {
    static constexpr DType value = DType::F16;
};
template <>
struct dtype_of<bf16> {
    static constexpr DType value = DType::BF16;
};

// a * b, or an exception when it does not fit in size_t.
inline std::size_t mul(std::size_t a, std::size_t b, const char* function) {
    if (a != 0 && b > std::numeric_limits<std::size_t>::max() / a) {
        invalid(function, "size overflows size_t");
    }
    return a * b;
}

inline std::string cstring_arg(const std::string& s, const char* what, const char* function) {
    if (s.find('\0') != std::string::npos) {
        invalid(function, std::string(what) + " contains a NUL byte");
    }
    return s;
}

}  // namespace detail

inline std::string version() { return pfc_version(); }

// A new NCCL unique id (PFC_NCCL_ID_BYTES bytes) for a multi-process run: create it in one process,
// share it, set it as Config::nccl_id everywhere. Throws PFC_ERR_UNAVAILABLE without NCCL.
inline std::vector<std::uint8_t> nccl_unique_id() {
    std::vector<std::uint8_t> id(PFC_NCCL_ID_BYTES);
    detail::check(pfc_nccl_unique_id(id.data()), "pfc_nccl_unique_id");
    return id;
}

// ------------------------------------------------------------------------------------------------
// Configuration.

// A head's configuration. A default-constructed Config holds the library's defaults (read from
// pfc_config_init: s = 64, ArcFace m2 = 0.5, sample_rate 1, SGD lr 0.1 momentum 0.9 weight decay
// 5e-4, AdamW betas 0.9/0.999 eps 1e-8, centers N(0, 0.01²), f32, CPU, one shard); set num_classes
// and embedding_dim, then whatever else differs.
struct Config {
    std::uint64_t num_classes = 0;
    std::uint32_t embedding_dim = 0;
    float sample_rate{};
    float scale{};
    float m1{};
    float m2{};
    float m3{};
    float interclass_filter{};
    MarginGrad margin_grad{};
    bool arcface_fallback{};
    // The adaptive margins (SPEC §1.6a): the kind, its m (0 = the kind's default), AdaFace's h and
    // running-statistics weight.
    MarginKind margin_kind{};
    float margin_m{};
    float adaface_h{};
    float adaface_t_alpha{};
    Optimizer optimizer{};
    float lr{};
    float momentum{};
    float weight_decay{};
    float beta1{};
    float beta2{};
    float eps{};
    DType compute_dtype{};
    // How centers and optimizer state are stored: F32, or BF16 with stochastic rounding (half the
    // memory per class).
    DType storage_dtype{};
    std::uint64_t seed{};
    float init_std{};
    Backend backend{};
    std::uint32_t local_shards{};
    std::vector<std::int32_t> devices{};  // CUDA ordinals (local_shards entries) or empty
    std::uint32_t world_size{};           // 0 = local_shards
    std::uint32_t first_rank{};
    std::vector<std::uint8_t> nccl_id{};  // PFC_NCCL_ID_BYTES bytes when world_size > local_shards
    // A job over several processes (SPEC §2a): this process's place, and the job's all-gather —
    // any callable `int(const void* send, std::size_t bytes, void* recv)` that fills recv with
    // process_count × bytes in process order and returns 0 (e.g. a lambda around MPI_Allgather or
    // a torch.distributed store). An exception it throws counts as a failure. The Head keeps its
    // own copy alive for as long as it lives.
    std::uint32_t process_count = 1;
    std::uint32_t process_index = 0;
    std::function<int(const void* send, std::size_t bytes, void* recv)> allgather{};

    Config() { assign(defaults_c()); }

    static pfc_config defaults_c() noexcept {
        pfc_config c;
        pfc_config_init(&c);
        return c;
    }

    // From a C configuration (its devices and nccl_id are copied).
    static Config from_c(const pfc_config& c) {
        Config out;
        out.assign(c);
        return out;
    }

    // The C view. Its devices and nccl_id point into this Config: keep it alive and unchanged while
    // the pfc_config is used. Throws for a devices or nccl_id of the wrong length.
    pfc_config to_c() const {
        if (!devices.empty() && devices.size() != local_shards) {
            detail::invalid("pfc_create", "devices has " + std::to_string(devices.size()) + " entries for " +
                                              std::to_string(local_shards) + " local shards");
        }
        if (!nccl_id.empty() && nccl_id.size() != PFC_NCCL_ID_BYTES) {
            detail::invalid("pfc_create", "nccl_id has " + std::to_string(nccl_id.size()) + " bytes; expected " +
                                              std::to_string(PFC_NCCL_ID_BYTES));
        }
        pfc_config c = defaults_c();
        c.num_classes = num_classes;
        c.embedding_dim = embedding_dim;
        c.sample_rate = sample_rate;
        c.scale = scale;
        c.m1 = m1;
        c.m2 = m2;
        c.m3 = m3;
        c.interclass_filter = interclass_filter;
        c.margin_grad = static_cast<std::int32_t>(margin_grad);
        c.arcface_fallback = arcface_fallback ? 1 : 0;
        c.margin_kind = static_cast<std::int32_t>(margin_kind);
        c.margin_m = margin_m;
        c.adaface_h = adaface_h;
        c.adaface_t_alpha = adaface_t_alpha;
        c.optimizer = static_cast<std::int32_t>(optimizer);
        c.lr = lr;
        c.momentum = momentum;
        c.weight_decay = weight_decay;
        c.beta1 = beta1;
        c.beta2 = beta2;
        c.eps = eps;
        c.compute_dtype = static_cast<std::int32_t>(compute_dtype);
        c.storage_dtype = static_cast<std::int32_t>(storage_dtype);
        c.seed = seed;
        c.init_std = init_std;
        c.backend = static_cast<std::int32_t>(backend);
        c.local_shards = local_shards;
        c.devices = devices.empty() ? nullptr : devices.data();
        c.world_size = world_size;
        c.first_rank = first_rank;
        c.nccl_id = nccl_id.empty() ? nullptr : nccl_id.data();
        c.process_count = process_count;
        c.process_index = process_index;
        return c;
    }

   private:
    void assign(const pfc_config& c) {
        num_classes = c.num_classes;
        embedding_dim = c.embedding_dim;
        sample_rate = c.sample_rate;
        scale = c.scale;
        m1 = c.m1;
        m2 = c.m2;
        m3 = c.m3;
        interclass_filter = c.interclass_filter;
        margin_grad = static_cast<MarginGrad>(c.margin_grad);
        arcface_fallback = c.arcface_fallback != 0;
        margin_kind = static_cast<MarginKind>(c.margin_kind);
        margin_m = c.margin_m;
        adaface_h = c.adaface_h;
        adaface_t_alpha = c.adaface_t_alpha;
        optimizer = static_cast<Optimizer>(c.optimizer);
        lr = c.lr;
        momentum = c.momentum;
        weight_decay = c.weight_decay;
        beta1 = c.beta1;
        beta2 = c.beta2;
        eps = c.eps;
        compute_dtype = static_cast<DType>(c.compute_dtype);
        storage_dtype = static_cast<DType>(c.storage_dtype);
        seed = c.seed;
        init_std = c.init_std;
        backend = static_cast<Backend>(c.backend);
        local_shards = c.local_shards;
        devices.clear();
        if (c.devices != nullptr) {
            devices.assign(c.devices, c.devices + c.local_shards);
        }
        world_size = c.world_size;
        first_rank = c.first_rank;
        process_count = c.process_count;
        process_index = c.process_index;
        nccl_id.clear();
        if (c.nccl_id != nullptr) {
            nccl_id.assign(c.nccl_id, c.nccl_id + PFC_NCCL_ID_BYTES);
        }
    }
};

// ------------------------------------------------------------------------------------------------
// Batches and results.

// One local shard's batch: rows = labels.size(), embeddings rows × embedding_dim values, grad the
// same size (written by train_step; may be empty for evaluate). Element type float, pfc::f16 or
// pfc::bf16 sets the dtype. The batch only views the caller's memory.
class Batch {
   public:
    Batch() = default;
    Batch(span<const float> embeddings, span<const std::int64_t> labels, span<float> grad = {}) noexcept
        : Batch(embeddings.data(), embeddings.size(), labels, grad.data(), grad.size(), DType::F32) {}
    Batch(span<const f16> embeddings, span<const std::int64_t> labels, span<f16> grad = {}) noexcept
        : Batch(embeddings.data(), embeddings.size(), labels, grad.data(), grad.size(), DType::F16) {}
    Batch(span<const bf16> embeddings, span<const std::int64_t> labels, span<bf16> grad = {}) noexcept
        : Batch(embeddings.data(), embeddings.size(), labels, grad.data(), grad.size(), DType::BF16) {}

    std::size_t rows() const noexcept { return labels_.size(); }
    DType dtype() const noexcept { return dtype_; }

    // The C batch after checking the sizes against `dim` (throws pfc::Error from `function`).
    pfc_batch to_c(std::size_t dim, bool want_grad, std::size_t index, const char* function) const {
        const std::size_t values = detail::mul(rows(), dim, function);
        const std::string which = "batch " + std::to_string(index) + ": ";
        if (embedding_values_ != 0 && embedding_values_ != values) {
            detail::invalid(function, which + "embeddings hold " + std::to_string(embedding_values_) + " values; " +
                                          std::to_string(rows()) + " labels × dimension " + std::to_string(dim) +
                                          " need " + std::to_string(values));
        }
        if (want_grad && grad_values_ != 0 && grad_values_ != values) {
            detail::invalid(function, which + "grad holds " + std::to_string(grad_values_) + " values; " +
                                          std::to_string(values) + " needed");
        }
        pfc_batch b{};
        b.embeddings = embedding_values_ == 0 ? nullptr : embeddings_;  // empty: NULL, for the library to judge
        b.labels = labels_.empty() ? nullptr : labels_.data();
        b.grad_embeddings = (want_grad && grad_values_ != 0) ? grad_ : nullptr;
        b.batch_size = rows();
        b.dtype = static_cast<std::int32_t>(dtype_);
        b.memory = PFC_MEMORY_HOST;
        b.stream = nullptr;
        return b;
    }

   private:
    Batch(const void* e, std::size_t ne, span<const std::int64_t> labels, void* g, std::size_t ng, DType dtype) noexcept
        : embeddings_(e), embedding_values_(ne), labels_(labels), grad_(g), grad_values_(ng), dtype_(dtype) {}

    const void* embeddings_ = nullptr;
    std::size_t embedding_values_ = 0;
    span<const std::int64_t> labels_;
    void* grad_ = nullptr;
    std::size_t grad_values_ = 0;
    DType dtype_ = DType::F32;
};

struct StepStats {
    double loss = 0.0;      // mean softmax cross-entropy over the global batch
    double accuracy = 0.0;  // top-1 accuracy over the sampled columns (evaluate: all classes)
    std::uint64_t step = 0;  // training steps taken by the head, this one included
    std::uint64_t global_batch = 0;
    std::uint64_t sampled_classes = 0;

    static StepStats from_c(const pfc_step_stats& s) noexcept {
        StepStats out;
        out.loss = s.loss;
        out.accuracy = s.accuracy;
        out.step = s.step;
        out.global_batch = s.global_batch;
        out.sampled_classes = s.sampled_classes;
        return out;
    }
};

struct ClassRange {
    std::uint64_t first = 0;
    std::uint64_t count = 0;
};

// Top-k of each query, row-major: hit j of query q is ids[q * k + j], scores[q * k + j].
struct SearchResult {
    std::size_t queries = 0;
    std::uint32_t k = 0;
    std::vector<std::int64_t> ids{};
    std::vector<float> scores{};

    std::int64_t id(std::size_t query, std::size_t rank) const { return ids.at(query * k + rank); }
    float score(std::size_t query, std::size_t rank) const { return scores.at(query * k + rank); }
};

// ------------------------------------------------------------------------------------------------
// The head.

// Owns a pfc_head (pfc_create … pfc_destroy). Move-only; a moved-from head is empty.
class Head {
   public:
    // A collective call when config.process_count > 1: every process constructs its Head together.
    explicit Head(const Config& config) : config_(config) {
        pfc_config c = config_.to_c();
        if (config_.allgather) {
            // On the heap, so that moving the Head keeps the address the library holds.
            allgather_ = std::make_unique<AllGather>(config_.allgather);
            c.allgather = &Head::call_allgather;
            c.allgather_ctx = allgather_.get();
        }
        pfc_head* h = nullptr;
        detail::check(pfc_create(&c, &h), "pfc_create");
        head_ = h;
    }
    ~Head() { reset(); }

    Head(const Head&) = delete;
    Head& operator=(const Head&) = delete;
    Head(Head&& other) noexcept
        : head_(std::exchange(other.head_, nullptr)), config_(std::move(other.config_)), allgather_(std::move(other.allgather_)) {}
    Head& operator=(Head&& other) noexcept {
        if (this != &other) {
            reset();
            head_ = std::exchange(other.head_, nullptr);
            config_ = std::move(other.config_);
            allgather_ = std::move(other.allgather_);
        }
        return *this;
    }

    // Destroys the C head now (idempotent); later calls throw PFC_ERR_NULL_ARGUMENT.
    void reset() noexcept {
        pfc_destroy(std::exchange(head_, nullptr));
    }
    // Gives up ownership: the caller must pfc_destroy the result.
    pfc_head* release() noexcept { return std::exchange(head_, nullptr); }
    pfc_head* get() const noexcept { return head_; }
    explicit operator bool() const noexcept { return head_ != nullptr; }
    const Config& config() const noexcept { return config_; }
    std::size_t embedding_dim() const noexcept { return config_.embedding_dim; }

    // One training step, one batch per local shard. Gradients land in each batch's grad.
    StepStats train_step(span<const Batch> batches) { return run(batches, true); }
    StepStats train_step(const Batch& batch) { return run(span<const Batch>(&batch, 1), true); }
    StepStats train_step(std::initializer_list<Batch> batches) {
        return run(span<const Batch>(batches.begin(), batches.size()), true);
    }
    // The raw C call, for device memory and streams (CUDA backend); sizes are the caller's duty.
    StepStats train_step(const pfc_batch* batches, std::uint32_t n) {
        pfc_step_stats s{};
        detail::check(pfc_train_step(head_, batches, n, &s), "pfc_train_step");
        return StepStats::from_c(s);
    }

    // Forward and backward without an update: gradients land in each batch's grad, the sampled
    // centers' gradients accumulate in the head until train_apply (pfc_train_compute).
    StepStats train_compute(span<const Batch> batches) { return run(batches, true, false); }
    StepStats train_compute(const Batch& batch) { return run(span<const Batch>(&batch, 1), true, false); }
    // One optimizer step over the accumulated gradients (pfc_train_apply); the step count advances.
    void train_apply() { detail::check(pfc_train_apply(head_), "pfc_train_apply"); }
    // Drops the accumulated gradients (pfc_train_discard).
    void train_discard() { detail::check(pfc_train_discard(head_), "pfc_train_discard"); }

    // Loss and accuracy over all classes; nothing changes. grad is ignored.
    StepStats evaluate(span<const Batch> batches) { return run(batches, false); }
    StepStats evaluate(const Batch& batch) { return run(span<const Batch>(&batch, 1), false); }
    StepStats evaluate(std::initializer_list<Batch> batches) {
        return run(span<const Batch>(batches.begin(), batches.size()), false);
    }
    StepStats evaluate(const pfc_batch* batches, std::uint32_t n) {
        pfc_step_stats s{};
        detail::check(pfc_evaluate(head_, batches, n, &s), "pfc_evaluate");
        return StepStats::from_c(s);
    }

    void set_learning_rate(float lr) { detail::check(pfc_set_learning_rate(head_, lr), "pfc_set_learning_rate"); }

    // The margin's running statistics (AdaFace: running norm mean and standard deviation;
    // CurricularFace: t; none for the combined margin).
    std::vector<float> margin_state() const {
        std::vector<float> out(8);
        std::uint32_t len = 0;
        detail::check(pfc_margin_state(head_, out.data(), static_cast<std::uint32_t>(out.size()), &len), "pfc_margin_state");
        out.resize(len);
        return out;
    }
    // Restores them as margin_state() listed them (e.g. before recomputing a step); the same values
    // on every process.
    void set_margin_state(span<const float> values) {
        const char* fn = "pfc_set_margin_state";
        if (values.size() > std::numeric_limits<std::uint32_t>::max()) {
            detail::invalid(fn, "too many values");
        }
        detail::check(pfc_set_margin_state(head_, values.empty() ? nullptr : values.data(), static_cast<std::uint32_t>(values.size())), fn);
    }

    ClassRange local_classes() const {
        ClassRange r;
        detail::check(pfc_local_classes(head_, &r.first, &r.count), "pfc_local_classes");
        return r;
    }

    // Centers of classes [first, first + out.size() / embedding_dim) into `out`.
    void get_centers(std::uint64_t first, span<float> out, bool normalized = false) const {
        const char* fn = "pfc_get_centers";
        const std::size_t count = rows_of(out.size(), "out", fn);
        detail::check(pfc_get_centers(head_, first, count, normalized ? 1 : 0, out.empty() ? nullptr : out.data()), fn);
    }
    // Centers of classes [first, first + count), count × embedding_dim floats.
    std::vector<float> centers(std::uint64_t first, std::uint64_t count, bool normalized = false) const {
        const char* fn = "pfc_get_centers";
        if (head_ == nullptr || count == 0 || count > local_classes().count) {
            // The library rejects this before writing anything: let it say why.
            float dummy = 0.0f;
            detail::check(pfc_get_centers(head_, first, count, normalized ? 1 : 0, &dummy), fn);
        }
        std::vector<float> out(detail::mul(static_cast<std::size_t>(count), embedding_dim(), fn));
        detail::check(pfc_get_centers(head_, first, count, normalized ? 1 : 0, out.data()), fn);
        return out;
    }

    // Overwrites the centers of classes [first, first + values.size() / embedding_dim) (warm start).
    void set_centers(std::uint64_t first, span<const float> values) {
        const char* fn = "pfc_set_centers";
        const std::size_t count = rows_of(values.size(), "values", fn);
        detail::check(pfc_set_centers(head_, first, count, values.empty() ? nullptr : values.data()), fn);
    }

    void save_checkpoint(const std::string& dir) const {
        const std::string d = detail::cstring_arg(dir, "dir", "pfc_save_checkpoint");
        detail::check(pfc_save_checkpoint(head_, d.c_str()), "pfc_save_checkpoint");
    }
    void load_checkpoint(const std::string& dir) {
        const std::string d = detail::cstring_arg(dir, "dir", "pfc_load_checkpoint");
        detail::check(pfc_load_checkpoint(head_, d.c_str()), "pfc_load_checkpoint");
    }
    void export_centers(const std::string& path, Format format, DType dtype = DType::F32, bool normalized = true) const {
        const std::string p = detail::cstring_arg(path, "path", "pfc_export_centers");
        detail::check(pfc_export_centers(head_, p.c_str(), static_cast<std::int32_t>(format),
                                         static_cast<std::int32_t>(dtype), normalized ? 1 : 0),
                      "pfc_export_centers");
    }

    // The k best classes by cosine for each query (queries.size() / embedding_dim rows).
    SearchResult search(span<const float> queries, std::uint32_t k) const {
        const char* fn = "pfc_search";
        SearchResult r;
        r.queries = rows_of(queries.size(), "queries", fn);
        r.k = k;
        const std::uint64_t local = head_ == nullptr ? 0 : local_classes().count;
        if (head_ != nullptr && r.queries != 0 && k > local) {
            detail::invalid(fn, "k = " + std::to_string(k) + " is outside [1, " + std::to_string(local) +
                                    "] (this process's classes)");
        }
        // Without a head, queries or k the library refuses before writing; give it valid pointers.
        const bool refused = head_ == nullptr || r.queries == 0 || k == 0;
        const std::size_t hits = refused ? 0 : detail::mul(r.queries, k, fn);
        r.ids.resize(refused ? 1 : hits);
        r.scores.resize(refused ? 1 : hits);
        detail::check(pfc_search(head_, queries.empty() ? nullptr : queries.data(), r.queries, k, r.ids.data(),
                                 r.scores.data()),
                      fn);
        r.ids.resize(hits);
        r.scores.resize(hits);
        return r;
    }
    // Into caller buffers of queries × k entries each.
    void search(span<const float> queries, std::uint32_t k, span<std::int64_t> ids, span<float> scores) const {
        const char* fn = "pfc_search";
        const std::size_t n = rows_of(queries.size(), "queries", fn);
        const std::size_t hits = detail::mul(n, k, fn);
        if (ids.size() != hits || scores.size() != hits) {
            detail::invalid(fn, "ids and scores need " + std::to_string(hits) + " entries each (queries × k); got " +
                                    std::to_string(ids.size()) + " and " + std::to_string(scores.size()));
        }
        detail::check(pfc_search(head_, queries.empty() ? nullptr : queries.data(), n, k,
                                 ids.empty() ? nullptr : ids.data(), scores.empty() ? nullptr : scores.data()),
                      fn);
    }

   private:
    std::size_t rows_of(std::size_t values, const char* what, const char* fn) const {
        const std::size_t d = embedding_dim();
        if (d == 0 || values % d != 0) {
            detail::invalid(fn, std::string(what) + " holds " + std::to_string(values) +
                                    " values, not a whole number of rows of dimension " + std::to_string(d));
        }
        return values / d;
    }

    using AllGather = std::function<int(const void*, std::size_t, void*)>;

    static std::int32_t call_allgather(void* ctx, const void* send, std::size_t bytes, void* recv) noexcept {
        try {
            return static_cast<std::int32_t>((*static_cast<AllGather*>(ctx))(send, bytes, recv));
        } catch (...) {
            return -1;  // the library reports PFC_ERR_COMMUNICATION
        }
    }

    StepStats run(span<const Batch> batches, bool train, bool apply = true) {
        const char* fn = !train ? "pfc_evaluate" : apply ? "pfc_train_step" : "pfc_train_compute";
        if (batches.size() > std::numeric_limits<std::uint32_t>::max()) {
            detail::invalid(fn, "too many batches");
        }
        std::vector<pfc_batch> raw;
        raw.reserve(batches.size());
        for (std::size_t i = 0; i < batches.size(); i++) {
            raw.push_back(batches[i].to_c(embedding_dim(), train, i, fn));
        }
        pfc_step_stats s{};
        const auto n = static_cast<std::uint32_t>(raw.size());
        const pfc_batch* p = raw.empty() ? nullptr : raw.data();
        const pfc_status st = !train ? pfc_evaluate(head_, p, n, &s) : apply ? pfc_train_step(head_, p, n, &s) : pfc_train_compute(head_, p, n, &s);
        detail::check(st, fn);
        return StepStats::from_c(s);
    }

    pfc_head* head_ = nullptr;
    Config config_;
    std::unique_ptr<AllGather> allgather_;
};

}  // namespace pfc

#endif  // PARTIALFC_HPP
