// The emulated NCCL (libnccl.so.2): communicators over the emulated GPUs of this process and of other
// processes on this host, with NCCL's entry points, result codes and group semantics.
//
// A unique id names a POSIX shared-memory region, the communicator's rendezvous: the first rank to
// arrive creates it, every rank maps it, and the last to join unlinks the name (the mappings live
// on, and nothing is left behind in /dev/shm when a process dies later). Device memory is host
// memory of each process, so ranks of different processes cannot read each other's buffers: a
// collective runs on each rank's stream thread as phases of at most one slot per rank, each phase
// "write my part into the region, barrier, read everyone's part". Two sets of slots alternate, so
// a rank writing phase p + 2 has passed the barrier of phase p + 1, which every rank reaches only
// after it has read phase p. Each phase also carries every rank's description of the call, so
// ranks that disagree (NCCL's rule: the same collectives in the same order) fail together instead
// of hanging. Barriers sleep on futexes in the region; a wait that outlasts PFC_EMU_NCCL_TIMEOUT_S
// (default 120) seconds, or finds a peer process gone, fails the collective with a message.

#include "emulator.hh"

#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define EXPORT extern "C" __attribute__((visibility("default")))

// NCCL's ABI (nccl.h): the id is passed by value; the enums are ints.
extern "C" {
typedef struct {
    char internal[128];
} ncclUniqueId;
typedef struct ncclComm* ncclComm_t;
enum ncclResult_t : int {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
};
enum ncclDataType_t : int {
    ncclInt8 = 0,
    ncclUint8 = 1,
    ncclInt32 = 2,
    ncclUint32 = 3,
    ncclInt64 = 4,
    ncclUint64 = 5,
    ncclFloat16 = 6,
    ncclFloat32 = 7,
    ncclFloat64 = 8,
    ncclBfloat16 = 9,
    ncclNumTypes = 10,
};
enum ncclRedOp_t : int { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4, ncclNumOps = 5 };
}

namespace {

using Clock = std::chrono::steady_clock;

// NCCL 2.28.3.
constexpr int kVersion = 22803;
// Ids start with this tag, so an id that did not come from ncclGetUniqueId (never distributed,
// zeroed) is refused instead of naming a rendezvous nobody else uses.
constexpr char kIdTag[8] = {'p', 'f', 'c', '-', 'n', 'c', 'c', 'l'};
// Bytes of id (after the tag) that name the region.
constexpr size_t kIdNameBytes = 32;
constexpr size_t kSlotBytes = 512 << 10;
// Two slots a rank: 4 GiB of shared memory at this many ranks; and a reduce-scatter phase needs
// room for one element of every rank in a slot.
constexpr int kMaxRanks = 4096;

const char* const kTypeNames[ncclNumTypes] = {"int8",   "uint8",   "int32",   "uint32", "int64",
                                              "uint64", "float16", "float32", "float64", "bfloat16"};
const size_t kTypeBytes[ncclNumTypes] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2};
const char* const kOpNames[ncclNumOps] = {"sum", "prod", "max", "min", "avg"};

std::chrono::seconds timeout() {
    static const long seconds = [] {
        const char* v = std::getenv("PFC_EMU_NCCL_TIMEOUT_S");
        const long s = v ? std::strtol(v, nullptr, 10) : 0;
        return s > 0 ? s : 120L;
    }();
    return std::chrono::seconds(seconds);
}

// ---- The rendezvous region ------------------------------------------------------------------------

struct Header {
    uint32_t ready;       // futex word: 1 once the creator has filled in the fields below
    uint32_t joined;      // futex word: ranks that have joined
    uint32_t arrived;     // ranks inside the current barrier
    uint32_t generation;  // futex word: barriers completed
    uint32_t nranks;
};

enum : uint32_t { kFree = 0, kClaimed = 1, kPresent = 2 };

struct Member {
    uint32_t state;  // kFree, kClaimed (pid and device being written), kPresent
    int32_t pid;
    int32_t device;
};

enum Kind : uint32_t { kAllGather, kAllReduce, kReduceScatter };
const char* const kKindNames[] = {"ncclAllGather", "ncclAllReduce", "ncclReduceScatter"};

// One rank's description of the collective a phase belongs to.
struct Ticket {
    uint64_t seq;
    uint64_t count;
    uint32_t kind;
    uint32_t dtype;
    uint32_t op;  // 0 for all-gather
    uint32_t bad;  // this rank's buffers failed the range check
};

size_t align64(size_t x) { return (x + 63) / 64 * 64; }

struct Layout {
    size_t members, tickets, data, size;
    explicit Layout(uint32_t n) {
        members = align64(sizeof(Header));
        tickets = align64(members + n * sizeof(Member));
        data = align64(tickets + 2 * n * sizeof(Ticket));
        size = data + 2 * size_t(n) * kSlotBytes;
    }
};

std::string region_name(const ncclUniqueId& id) {
    static const char hex[] = "0123456789abcdef";
    std::string name = "/pfc-emu-nccl-";
    for (size_t i = 0; i < kIdNameBytes; i++) {
        const auto b = (unsigned char)id.internal[sizeof kIdTag + i];
        name += hex[b >> 4];
        name += hex[b & 15];
    }
    return name;
}

uint32_t load(const uint32_t* word) { return __atomic_load_n(word, __ATOMIC_ACQUIRE); }

void wake_all(uint32_t* word) { syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0); }

// Whether process `pid` still runs: a zombie (a peer that exited before its parent reaped it) does
// not.
bool alive(pid_t pid) {
    if (kill(pid, 0) != 0 && errno == ESRCH) return false;
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE* f = std::fopen(path, "r");
    if (!f) return true;
    char buf[512];
    const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = 0;
    const char* p = std::strrchr(buf, ')');
    return !(p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'));
}

struct Call {
    Kind kind;
    const void* send;
    void* recv;
    size_t count;
    int dtype;
    int op;
    uint64_t seq;
};

std::string describe(const Call& c) {
    std::string s = std::string(kKindNames[c.kind]) + "(count " + std::to_string(c.count) + ", " + kTypeNames[c.dtype];
    if (c.kind != kAllGather) s += std::string(", ") + kOpNames[c.op];
    return s + ")";
}

std::string describe(const Ticket& t) {
    return describe(Call{(Kind)t.kind, nullptr, nullptr, t.count, (int)t.dtype, (int)t.op, t.seq});
}

using ReduceFn = void (*)(const unsigned char* const* src, int n, size_t len, unsigned char* dst);
ReduceFn reduction(int dtype, int op);

class Rank;

// Waits while `*word == seen`; false, with `why`, at the deadline or once a process of `peers`'s
// ranks (when given) is gone.
bool wait_while(uint32_t* word, uint32_t seen, Clock::time_point deadline, const Rank* peers, const std::string& what,
                std::string* why);

// One rank's mapping of the region and its place in it; queued collectives hold it, so a
// communicator destroyed with work still queued keeps its mapping until that work has run.
class Rank {
  public:
    Rank(unsigned char* base, size_t size, int n, int r, int d)
        : nranks(n), rank(r), device(d), base_(base), size_(size), layout_(uint32_t(n)) {}
    ~Rank() { munmap(base_, size_); }
    Rank(const Rank&) = delete;
    Rank& operator=(const Rank&) = delete;

    Header* header() const { return reinterpret_cast<Header*>(base_); }
    Member* member(int j) const { return reinterpret_cast<Member*>(base_ + layout_.members) + j; }

    // Every rank's stream thread meets here; false, with `why`, when not all do in time.
    bool barrier(const std::string& what, std::string* why) const {
        Header* h = header();
        const uint32_t gen = load(&h->generation);
        if (__atomic_add_fetch(&h->arrived, 1, __ATOMIC_ACQ_REL) == uint32_t(nranks)) {
            __atomic_store_n(&h->arrived, 0, __ATOMIC_RELAXED);
            __atomic_add_fetch(&h->generation, 1, __ATOMIC_RELEASE);
            wake_all(&h->generation);
            return true;
        }
        return wait_while(&h->generation, gen, Clock::now() + timeout(), this, what, why);
    }

    // Runs collective `c` on the stream thread: its failures become the context's sticky error.
    void run(const Call& c) {
        std::lock_guard<std::mutex> lock(exec_);
        const std::string who = describe(c) + ", collective #" + std::to_string(c.seq) + " of rank " +
                                std::to_string(rank) + " of " + std::to_string(nranks);
        if (broken_) {
            pfc_emu::fail(device, CUDA_ERROR_LAUNCH_FAILED, who + ": the communicator is broken by an earlier failure");
            return;
        }
        const size_t esize = kTypeBytes[c.dtype], n = size_t(nranks);
        const size_t send_elems = c.kind == kReduceScatter ? c.count * n : c.count;
        const size_t recv_elems = c.kind == kAllGather ? c.count * n : c.count;
        std::string why;
        const bool bad = !in_range(c.send, send_elems * esize, "sendbuff", &why) ||
                         !in_range(c.recv, recv_elems * esize, "recvbuff", &why);
        // A reduce-scatter phase carries a piece of every rank's block.
        const size_t per_phase = kSlotBytes / esize / (c.kind == kReduceScatter ? n : 1);
        const size_t phases = c.count == 0 ? 1 : (c.count + per_phase - 1) / per_phase;
        const ReduceFn reduce = c.kind == kAllGather ? nullptr : reduction(c.dtype, c.op);
        std::vector<const unsigned char*> parts(n);
        const std::string waiting = "the other ranks (did every rank call " + describe(c) + "?)";
        const auto* send = static_cast<const unsigned char*>(c.send);
        auto* recv = static_cast<unsigned char*>(c.recv);
        for (size_t p = 0; p < phases; p++) {
            const size_t off = p * per_phase, len = std::min(per_phase, c.count - off), bytes = len * esize;
            const int set = int(phase_++ & 1);
            *ticket(set, rank) = Ticket{c.seq, c.count, c.kind, uint32_t(c.dtype), uint32_t(c.op), bad};
            unsigned char* mine = slot(set, rank);
            if (!bad && bytes > 0) {
                if (c.kind == kReduceScatter) {
                    for (size_t b = 0; b < n; b++) std::memcpy(mine + b * bytes, send + (b * c.count + off) * esize, bytes);
                } else {
                    std::memcpy(mine, send + off * esize, bytes);
                }
            }
            if (!barrier(waiting, &why)) {
                broken_ = true;
                pfc_emu::fail(device, CUDA_ERROR_LAUNCH_FAILED, who + ": " + why);
                return;
            }
            const std::string disagreement = disagree(set, c);
            if (bad || !disagreement.empty()) {
                broken_ = true;
                pfc_emu::fail(device, bad ? CUDA_ERROR_ILLEGAL_ADDRESS : CUDA_ERROR_LAUNCH_FAILED,
                              who + ": " + (bad ? why : disagreement));
                return;
            }
            if (bytes == 0) continue;
            switch (c.kind) {
                case kAllGather:
                    for (size_t j = 0; j < n; j++) std::memcpy(recv + (j * c.count + off) * esize, slot(set, int(j)), bytes);
                    break;
                case kAllReduce:
                    for (size_t j = 0; j < n; j++) parts[j] = slot(set, int(j));
                    reduce(parts.data(), nranks, len, recv + off * esize);
                    break;
                case kReduceScatter:
                    for (size_t j = 0; j < n; j++) parts[j] = slot(set, int(j)) + size_t(rank) * bytes;
                    reduce(parts.data(), nranks, len, recv + off * esize);
                    break;
            }
        }
    }

    // The first rank (of any process) that no longer runs, described, or "".
    std::string dead_peer() const {
        for (int j = 0; j < nranks; j++) {
            const Member* m = member(j);
            if (load(&m->state) != kPresent || m->pid == getpid()) continue;
            if (!alive(m->pid)) return "rank " + std::to_string(j) + " (process " + std::to_string(m->pid) + ") exited";
        }
        return "";
    }

    const int nranks, rank, device;

  private:
    Ticket* ticket(int set, int j) const {
        return reinterpret_cast<Ticket*>(base_ + layout_.tickets) + size_t(set) * size_t(nranks) + size_t(j);
    }
    unsigned char* slot(int set, int j) const {
        return base_ + layout_.data + (size_t(set) * size_t(nranks) + size_t(j)) * kSlotBytes;
    }

    bool in_range(const void* p, size_t bytes, const char* what, std::string* why) const {
        std::string detail;
        if (bytes == 0 || pfc_emu::check_device_range(CUdeviceptr(p), bytes, device, &detail)) return true;
        *why = std::string(what) + ": " + detail;
        return false;
    }

    // What makes the ranks' tickets of this phase differ from this rank's, or "".
    std::string disagree(int set, const Call& c) const {
        const Ticket& mine = *ticket(set, rank);
        for (int j = 0; j < nranks; j++) {
            const Ticket& t = *ticket(set, j);
            if (t.bad) return "rank " + std::to_string(j) + " was given a buffer outside its GPU's memory";
            if (t.seq != mine.seq || t.count != mine.count || t.kind != mine.kind || t.dtype != mine.dtype ||
                t.op != mine.op)
                return "ncclInvalidUsage: rank " + std::to_string(j) + " called " + describe(t) + " as its collective #" +
                       std::to_string(t.seq) + " where rank " + std::to_string(rank) + " called " + describe(c) +
                       " as #" + std::to_string(c.seq) + ": every rank must call the same collectives in the same order";
        }
        return "";
    }

    unsigned char* const base_;
    const size_t size_;
    const Layout layout_;
    // Serialises collectives of this rank queued on different streams.
    std::mutex exec_;
    uint64_t phase_ = 0;
    bool broken_ = false;
};

bool wait_while(uint32_t* word, uint32_t seen, Clock::time_point deadline, const Rank* peers, const std::string& what,
                std::string* why) {
    bool slept = false;
    while (load(word) == seen) {
        // Peers are looked at only after a wait that found nothing, keeping /proc off the path of
        // barriers that complete at once.
        if (slept && peers) {
            const std::string gone = peers->dead_peer();
            if (!gone.empty()) {
                *why = gone + " while waiting for " + what;
                return false;
            }
        }
        const auto now = Clock::now();
        if (now >= deadline) {
            *why = "timed out after " + std::to_string(timeout().count()) + " s waiting for " + what +
                   " (PFC_EMU_NCCL_TIMEOUT_S)";
            return false;
        }
        const auto slice = std::chrono::duration_cast<std::chrono::nanoseconds>(
            std::min<Clock::duration>(deadline - now, std::chrono::seconds(1)));
        timespec ts;
        ts.tv_sec = time_t(slice.count() / 1000000000);
        ts.tv_nsec = long(slice.count() % 1000000000);
        syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, nullptr, 0);
        slept = true;
    }
    return true;
}

// ---- Reductions -----------------------------------------------------------------------------------

struct F16 {
    uint16_t bits;
};
struct BF16 {
    uint16_t bits;
};

float bits_to_float(uint32_t x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

uint32_t float_to_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    return x;
}

// m >> s rounded to nearest, ties to even (1 <= s <= 31).
uint32_t shift_rne(uint32_t m, int s) {
    const uint32_t q = m >> s, rest = m & ((1u << s) - 1), half = 1u << (s - 1);
    return q + (rest > half || (rest == half && (q & 1)));
}

float f16_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f) return bits_to_float(sign | 0x7f800000 | (m << 13));
    if (e == 0) return std::copysign(std::ldexp(float(m), -24), bits_to_float(sign | 0x3f800000));
    return bits_to_float(sign | ((e + 112) << 23) | (m << 13));
}

uint16_t float_to_f16(float f) {
    const uint32_t x = float_to_bits(f), sign = (x >> 16) & 0x8000, a = x & 0x7fffffff;
    if (a >= 0x7f800000) return uint16_t(sign | (a > 0x7f800000 ? 0x7e00 : 0x7c00));
    const int e = int(a >> 23) - 112;  // the exponent in half's bias
    if (e >= 31) return uint16_t(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10) return uint16_t(sign);
        // Subnormal: the 24-bit significand in units of 2^-24; rounding up may give the smallest normal.
        return uint16_t(sign | shift_rne((a & 0x7fffff) | 0x800000, 14 - e));
    }
    // A carry out of the mantissa moves into the exponent, up to infinity.
    return uint16_t(sign | shift_rne((uint32_t(e) << 23) | (a & 0x7fffff), 13));
}

float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

uint16_t float_to_bf16(float f) {
    const uint32_t x = float_to_bits(f);
    if ((x & 0x7fffffff) > 0x7f800000) return uint16_t((x >> 16) | 0x40);
    return uint16_t((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

// How an element is combined: the half types in float, every other type in itself.
template <class T>
struct Arith {
    using A = T;
    static A in(T v) { return v; }
    static T out(A v) { return v; }
};
template <>
struct Arith<F16> {
    using A = float;
    static A in(F16 v) { return f16_to_float(v.bits); }
    static F16 out(A v) { return F16{float_to_f16(v)}; }
};
template <>
struct Arith<BF16> {
    using A = float;
    static A in(BF16 v) { return bf16_to_float(v.bits); }
    static BF16 out(A v) { return BF16{float_to_bf16(v)}; }
};

template <int Op, class A>
A combine(A a, A b) {
    if constexpr (std::is_floating_point_v<A>) {
        if constexpr (Op == ncclProd) return a * b;
        if constexpr (Op == ncclMax) return std::fmax(a, b);
        if constexpr (Op == ncclMin) return std::fmin(a, b);
        return a + b;
    } else {
        // Integers wrap, as on the GPU (signed overflow is undefined in C++, so in unsigned).
        using U = std::make_unsigned_t<A>;
        if constexpr (Op == ncclProd) return A(U(a) * U(b));
        if constexpr (Op == ncclMax) return std::max(a, b);
        if constexpr (Op == ncclMin) return std::min(a, b);
        return A(U(a) + U(b));
    }
}

// Element-wise over the ranks in rank order, so every rank computes the same bits.
template <class T, int Op>
void reduce(const unsigned char* const* src, int n, size_t len, unsigned char* dst) {
    using R = Arith<T>;
    for (size_t i = 0; i < len; i++) {
        T v;
        std::memcpy(&v, src[0] + i * sizeof(T), sizeof(T));
        typename R::A acc = R::in(v);
        for (int j = 1; j < n; j++) {
            std::memcpy(&v, src[j] + i * sizeof(T), sizeof(T));
            acc = combine<Op>(acc, R::in(v));
        }
        if constexpr (Op == ncclAvg) acc = acc / typename R::A(n);
        const T out = R::out(acc);
        std::memcpy(dst + i * sizeof(T), &out, sizeof(T));
    }
}

template <class T>
ReduceFn reduction_of(int op) {
    switch (op) {
        case ncclSum: return reduce<T, ncclSum>;
        case ncclProd: return reduce<T, ncclProd>;
        case ncclMax: return reduce<T, ncclMax>;
        case ncclMin: return reduce<T, ncclMin>;
        default: return reduce<T, ncclAvg>;
    }
}

ReduceFn reduction(int dtype, int op) {
    switch (dtype) {
        case ncclInt8: return reduction_of<int8_t>(op);
        case ncclUint8: return reduction_of<uint8_t>(op);
        case ncclInt32: return reduction_of<int32_t>(op);
        case ncclUint32: return reduction_of<uint32_t>(op);
        case ncclInt64: return reduction_of<int64_t>(op);
        case ncclUint64: return reduction_of<uint64_t>(op);
        case ncclFloat16: return reduction_of<F16>(op);
        case ncclFloat32: return reduction_of<float>(op);
        case ncclFloat64: return reduction_of<double>(op);
        default: return reduction_of<BF16>(op);
    }
}

}  // namespace

// ---- Communicators --------------------------------------------------------------------------------

enum class State { kPending, kReady, kFailed };

struct ncclComm {
    int nranks, rank, device;
    ncclUniqueId id;
    std::atomic<State> state{State::kPending};
    // Why the initialisation failed; written by the thread that ran it before `state`.
    std::string failure;
    std::shared_ptr<Rank> link;
    // Collectives queued so far: the number every rank's next one must carry.
    uint64_t launched = 0;
};

namespace {

std::mutex live_mutex;
std::set<ncclComm*> live;

bool is_live(ncclComm* c) {
    std::lock_guard<std::mutex> lock(live_mutex);
    return live.count(c) > 0;
}

struct Pending {
    ncclComm* comm;
    CUstream stream;
    Call call;
};

// This thread's group: NCCL defers what is called between ncclGroupStart and the outermost
// ncclGroupEnd to that end.
struct Group {
    int depth = 0;
    ncclResult_t error = ncclSuccess;
    std::vector<ncclComm*> inits;
    std::vector<Pending> calls;
};

Group& group() {
    thread_local Group g;
    return g;
}

// ncclGetLastError's text: per thread, since the calls that fail are the calling thread's.
thread_local std::string last_error;

// A call's failure: NCCL's WARN line (printed, as NCCL does, only with NCCL_DEBUG set),
// ncclGetLastError's text, and the error of the group the call is in.
ncclResult_t refuse(ncclResult_t code, const std::string& message) {
    last_error = message;
    if (std::getenv("NCCL_DEBUG")) std::fprintf(stderr, "NCCL WARN %s\n", message.c_str());
    Group& g = group();
    if (g.depth > 0 && g.error == ncclSuccess) g.error = code;
    return code;
}

std::string errno_text() { return std::strerror(errno); }

// Joins `c` to its communicator: returns when every rank has joined, or fails with `c->failure`.
// Touches no thread-local state, so several run at once on threads of ncclGroupEnd.
ncclResult_t join(ncclComm* c) {
    auto failed = [c](ncclResult_t code, const std::string& why) {
        c->failure = "ncclCommInitRank (rank " + std::to_string(c->rank) + " of " + std::to_string(c->nranks) + "): " + why;
        c->state = State::kFailed;
        return code;
    };
    const std::string name = region_name(c->id);
    const Layout layout(uint32_t(c->nranks));
    const auto deadline = Clock::now() + timeout();
    int fd;
    bool creator = false;
    for (;;) {
        fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd >= 0) {
            creator = true;
            break;
        }
        if (errno != EEXIST) return failed(ncclSystemError, "shm_open(" + name + "): " + errno_text());
        fd = shm_open(name.c_str(), O_RDWR, 0);
        if (fd >= 0) break;
        // ENOENT: the creator gave up and unlinked it between the two opens; try creating again.
        if (errno != ENOENT) return failed(ncclSystemError, "shm_open(" + name + "): " + errno_text());
        if (Clock::now() >= deadline) return failed(ncclRemoteError, "the rendezvous " + name + " keeps vanishing");
    }
    size_t size = layout.size;
    if (creator) {
        // Reserved now, so a full /dev/shm is this error rather than a SIGBUS in a collective.
        if (int e = posix_fallocate(fd, 0, off_t(size))) {
            close(fd);
            shm_unlink(name.c_str());
            return failed(ncclSystemError, "cannot reserve " + std::to_string(size) + " bytes of shared memory for " +
                                               name + ": " + std::strerror(e));
        }
    } else {
        // The creator sizes the region right after creating it.
        struct stat st;
        for (;;) {
            if (fstat(fd, &st) != 0) {
                close(fd);
                return failed(ncclSystemError, "fstat(" + name + "): " + errno_text());
            }
            if (st.st_size > 0) break;
            if (Clock::now() >= deadline) {
                close(fd);
                return failed(ncclRemoteError, "the rank that created " + name + " never sized it");
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        size = size_t(st.st_size);
    }
    void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) return failed(ncclSystemError, "mmap(" + name + "): " + errno_text());
    auto* header = static_cast<Header*>(base);
    std::string why;
    if (creator) {
        header->nranks = uint32_t(c->nranks);
        __atomic_store_n(&header->ready, 1, __ATOMIC_RELEASE);
        wake_all(&header->ready);
    } else {
        if (!wait_while(&header->ready, 0, deadline, nullptr, "the rank that created " + name + " to initialise it", &why)) {
            munmap(base, size);
            return failed(ncclRemoteError, why);
        }
        if (header->nranks != uint32_t(c->nranks) || size != layout.size) {
            const uint32_t theirs = header->nranks;
            munmap(base, size);
            return failed(ncclInvalidUsage, "nranks " + std::to_string(c->nranks) + " where the ranks before it gave " +
                                                std::to_string(theirs));
        }
    }
    auto link = std::make_shared<Rank>(static_cast<unsigned char*>(base), size, c->nranks, c->rank, c->device);
    Member* me = link->member(c->rank);
    uint32_t free_state = kFree;
    if (!__atomic_compare_exchange_n(&me->state, &free_state, kClaimed, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return failed(ncclInvalidUsage, "rank " + std::to_string(c->rank) + " joined this communicator twice");
    me->pid = getpid();
    me->device = c->device;
    __atomic_store_n(&me->state, kPresent, __ATOMIC_RELEASE);
    uint32_t joined = __atomic_add_fetch(&header->joined, 1, __ATOMIC_ACQ_REL);
    wake_all(&header->joined);
    // Everyone has mapped the region: nobody needs its name any more.
    if (joined == uint32_t(c->nranks)) shm_unlink(name.c_str());
    while (joined != uint32_t(c->nranks)) {
        if (!wait_while(&header->joined, joined, deadline, link.get(), "all " + std::to_string(c->nranks) + " ranks to join", &why)) {
            // The rendezvous is dead: ranks arriving later start a new one rather than wait on it.
            shm_unlink(name.c_str());
            return failed(ncclRemoteError, why + " (" + std::to_string(load(&header->joined)) + " joined)");
        }
        joined = load(&header->joined);
    }
    for (int j = 0; j < c->nranks; j++) {
        const Member* o = link->member(j);
        if (j != c->rank && o->pid == me->pid && o->device == c->device)
            return failed(ncclInvalidUsage, "Duplicate GPU detected: rank " + std::to_string(c->rank) + " and rank " +
                                                std::to_string(j) + " both on CUDA device " + std::to_string(c->device));
    }
    c->link = std::move(link);
    c->state = State::kReady;
    return ncclSuccess;
}

// Joins every communicator of `comms` at once (one thread may init several ranks of one
// communicator in a group, and each waits for the others).
ncclResult_t join_all(const std::vector<ncclComm*>& comms) {
    std::vector<ncclResult_t> results(comms.size(), ncclSuccess);
    if (comms.size() == 1) {
        results[0] = join(comms[0]);
    } else {
        std::vector<std::thread> threads;
        for (size_t i = 0; i < comms.size(); i++) threads.emplace_back([&results, &comms, i] { results[i] = join(comms[i]); });
        for (auto& t : threads) t.join();
    }
    for (size_t i = 0; i < comms.size(); i++)
        if (results[i] != ncclSuccess) return refuse(results[i], comms[i]->failure);
    return ncclSuccess;
}

ncclResult_t launch(ncclComm* comm, CUstream stream, Call call) {
    call.seq = comm->launched;
    std::shared_ptr<Rank> link = comm->link;
    const char* name = kKindNames[call.kind];
    if (CUresult r = pfc_emu::enqueue(stream, name, [link, call] { link->run(call); }))
        return refuse(ncclUnhandledCudaError, std::string(name) + ": cannot queue on the stream (CUresult " + std::to_string(r) + ")");
    comm->launched++;
    pfc_emu::count_launch(comm->device, name);
    return ncclSuccess;
}

ncclResult_t collective(Kind kind, const void* send, void* recv, size_t count, int dtype, int op, ncclComm* comm,
                        CUstream stream) {
    const std::string name = kKindNames[kind];
    if (!comm) return refuse(ncclInvalidArgument, name + ": comm is NULL");
    if (!is_live(comm)) return refuse(ncclInvalidArgument, name + ": comm is not a live communicator");
    if (dtype < 0 || dtype >= ncclNumTypes)
        return refuse(ncclInvalidArgument, name + ": unknown datatype " + std::to_string(dtype));
    if (kind != kAllGather && (op < 0 || op >= ncclNumOps))
        return refuse(ncclInvalidArgument, name + ": unknown reduction " + std::to_string(op));
    if (count > 0 && (!send || !recv))
        return refuse(ncclInvalidArgument, name + ": " + (send ? "recvbuff" : "sendbuff") + " is NULL");
    if (count > SIZE_MAX / kTypeBytes[dtype] / size_t(comm->nranks))
        return refuse(ncclInvalidArgument, name + ": count " + std::to_string(count) + " overflows");
    const State state = comm->state;
    if (state == State::kFailed) return refuse(ncclInvalidUsage, name + ": the communicator failed to initialise: " + comm->failure);
    Group& g = group();
    if (state == State::kPending && g.depth == 0)
        return refuse(ncclInvalidUsage, name + ": the communicator's ncclCommInitRank has not completed (its ncclGroupEnd)");
    const int device = pfc_emu::stream_device(stream);
    if (device < 0) return refuse(ncclUnhandledCudaError, name + ": the stream is not a live stream (or no context is current)");
    if (device != comm->device)
        return refuse(ncclInvalidUsage, name + ": a stream of GPU " + std::to_string(device) + " for the communicator of GPU " +
                                            std::to_string(comm->device));
    const Call call{kind, send, recv, count, dtype, kind == kAllGather ? 0 : op, 0};
    if (g.depth > 0) {
        g.calls.push_back(Pending{comm, stream, call});
        return ncclSuccess;
    }
    return launch(comm, stream, call);
}

}  // namespace

// ---- Entry points ---------------------------------------------------------------------------------

EXPORT const char* ncclGetErrorString(ncclResult_t code) {
    switch (code) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
        case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
        case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
        case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        default: return "unknown result code";
    }
}

EXPORT const char* ncclGetLastError(ncclComm_t) { return last_error.c_str(); }

EXPORT ncclResult_t ncclGetVersion(int* version) {
    if (!version) return refuse(ncclInvalidArgument, "ncclGetVersion: version is NULL");
    *version = kVersion;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return refuse(ncclInvalidArgument, "ncclGetUniqueId: uniqueId is NULL");
    std::memcpy(id->internal, kIdTag, sizeof kIdTag);
    size_t at = sizeof kIdTag;
    while (at < sizeof id->internal) {
        const ssize_t n = getrandom(id->internal + at, sizeof id->internal - at, 0);
        if (n < 0 && errno != EINTR) return refuse(ncclSystemError, "ncclGetUniqueId: getrandom: " + errno_text());
        if (n > 0) at += size_t(n);
    }
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    if (!comm) return refuse(ncclInvalidArgument, "ncclCommInitRank: comm is NULL");
    *comm = nullptr;
    if (nranks < 1) return refuse(ncclInvalidArgument, "ncclCommInitRank: nranks " + std::to_string(nranks) + " is below 1");
    if (nranks > kMaxRanks)
        return refuse(ncclInvalidArgument, "ncclCommInitRank: nranks " + std::to_string(nranks) + " is above the emulation's " +
                                               std::to_string(kMaxRanks));
    if (rank < 0 || rank >= nranks)
        return refuse(ncclInvalidArgument,
                      "ncclCommInitRank: rank " + std::to_string(rank) + " is outside [0, " + std::to_string(nranks) + ")");
    if (std::memcmp(id.internal, kIdTag, sizeof kIdTag) != 0)
        return refuse(ncclInvalidArgument, "ncclCommInitRank: the unique id did not come from ncclGetUniqueId");
    auto* c = new ncclComm();
    c->nranks = nranks;
    c->rank = rank;
    // NCCL takes cudaGetDevice's device, which is device 0 where no context is current.
    c->device = std::max(0, pfc_emu::current_device());
    c->id = id;
    {
        std::lock_guard<std::mutex> lock(live_mutex);
        live.insert(c);
    }
    Group& g = group();
    if (g.depth > 0) {
        g.inits.push_back(c);
        *comm = c;
        return ncclSuccess;
    }
    if (ncclResult_t r = join(c)) {
        const std::string why = c->failure;
        {
            std::lock_guard<std::mutex> lock(live_mutex);
            live.erase(c);
        }
        delete c;
        return refuse(r, why);
    }
    *comm = c;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return ncclSuccess;
    std::lock_guard<std::mutex> lock(live_mutex);
    if (!live.count(comm)) return refuse(ncclInvalidArgument, "ncclCommDestroy: comm is not a live communicator");
    if (comm->state == State::kPending)
        return refuse(ncclInvalidUsage, "ncclCommDestroy: the communicator's ncclCommInitRank has not completed (its ncclGroupEnd)");
    live.erase(comm);
    delete comm;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount, ncclDataType_t datatype,
                                  ncclComm_t comm, CUstream stream) {
    return collective(kAllGather, sendbuff, recvbuff, sendcount, datatype, ncclSum, comm, stream);
}

EXPORT ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                                  ncclRedOp_t op, ncclComm_t comm, CUstream stream) {
    return collective(kAllReduce, sendbuff, recvbuff, count, datatype, op, comm, stream);
}

EXPORT ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount, ncclDataType_t datatype,
                                      ncclRedOp_t op, ncclComm_t comm, CUstream stream) {
    return collective(kReduceScatter, sendbuff, recvbuff, recvcount, datatype, op, comm, stream);
}

EXPORT ncclResult_t ncclGroupStart() {
    group().depth++;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclGroupEnd() {
    Group& g = group();
    if (g.depth == 0) return refuse(ncclInvalidUsage, "ncclGroupEnd without a matching ncclGroupStart");
    if (--g.depth > 0) return ncclSuccess;
    Group work = std::move(g);
    g = Group{};
    if (work.error != ncclSuccess) {
        // NCCL launches nothing of a group in which a call failed.
        for (ncclComm* c : work.inits) {
            c->failure = "its group failed: " + last_error;
            c->state = State::kFailed;
        }
        return work.error;
    }
    if (ncclResult_t r = join_all(work.inits)) return r;
    ncclResult_t result = ncclSuccess;
    for (const Pending& p : work.calls) {
        ncclResult_t r;
        // A communicator may have been destroyed, or have failed to initialise, since the call.
        if (!is_live(p.comm) || p.comm->state != State::kReady)
            r = refuse(ncclInvalidUsage, std::string(kKindNames[p.call.kind]) + ": the communicator is not initialised");
        else
            r = launch(p.comm, p.stream, p.call);
        if (result == ncclSuccess) result = r;
    }
    return result;
}
