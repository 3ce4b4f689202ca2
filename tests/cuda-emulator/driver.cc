// The emulated CUDA driver (libcuda.so.1): the entry points cudarc and the backend call, with the
// driver's documented behaviour and error codes. Device memory is host memory carved from one
// reserved address range, each allocation ending at a page the process may not touch, so a kernel
// reading or writing past the end faults; the fault is caught, named and made the context's
// sticky CUDA_ERROR_ILLEGAL_ADDRESS, as a GPU reports it. Streams are asynchronous: each runs its
// work in order on its own host thread.
//
// Settings (environment): PFC_EMU_DEVICES (default 4), PFC_EMU_DEVICE_MEMORY (bytes, K/M/G
// suffixes, default 8G), PFC_EMU_DELAY=<seed> (every stream operation waits a random 0–2 ms before
// it runs, so a missing wait shows), PFC_EMU_COUNTERS=<file> (counters written as JSON at exit),
// PFC_EMU_TRACE (each stream operation named on stderr as it runs),
// and blocks.cc's PFC_EMU_ORDER, PFC_EMU_SEED, PFC_EMU_BLOCK_THREADS.

#include "abi.hh"
#include "blocks.hh"
#include "emulator.hh"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace pfc_emu {
struct Context;
namespace {

using Clock = std::chrono::steady_clock;

void report(const std::string& message) { std::fprintf(stderr, "[pfc-emu] %s\n", message.c_str()); }

uint64_t parse_bytes(const char* text, uint64_t fallback) {
    if (!text || !*text) return fallback;
    char* end = nullptr;
    double v = std::strtod(text, &end);
    switch (end && *end ? *end : ' ') {
        case 'K': case 'k': v *= 1024.0; break;
        case 'M': case 'm': v *= 1024.0 * 1024; break;
        case 'G': case 'g': v *= 1024.0 * 1024 * 1024; break;
        default: break;
    }
    return (uint64_t)v;
}

// ---- Counters -----------------------------------------------------------------------------------

struct Counters {
    std::atomic<uint64_t> allocations{0}, frees{0}, memsets{0}, memset_bytes{0}, htod{0}, htod_bytes{0}, dtoh{0},
        dtoh_bytes{0}, dtod{0}, synchronizations{0};
    std::mutex m;
    std::map<std::string, uint64_t> launches;
};

// ---- Devices, memory ----------------------------------------------------------------------------

struct Pool {
    uint64_t release_threshold = 0;
    // Bytes in live stream-ordered allocations, and bytes the pool holds (those plus what was freed
    // and kept).
    uint64_t used = 0, used_high = 0, reserved = 0, reserved_high = 0;
};

struct Device {
    int ordinal;
    uint64_t memory;
    // Live allocations made with cuMemAlloc, and the pool's reserve.
    uint64_t sync_bytes = 0;
    Pool pool;
    Counters counters;
    Context* primary = nullptr;
    uint64_t committed() const { return sync_bytes + pool.reserved; }
};

struct Allocation {
    CUdeviceptr start;
    size_t size;
    int device;
    bool from_pool;
    // A stream-ordered free of it is queued: freeing it again is an error.
    bool freeing = false;
    // The pages mapped for it (guard page excluded).
    uintptr_t map_start;
    size_t map_size;
};

constexpr uint8_t CANARY = 0xFD;
constexpr size_t ALIGN = 8;

struct Global {
    std::vector<std::unique_ptr<Device>> devices;
    std::mutex m;  // guards memory state: allocations, pools, device byte counts
    std::map<CUdeviceptr, Allocation> live;
    // Freed ranges stay PROT_NONE and are never handed out again, so a use after free faults.
    std::map<CUdeviceptr, Allocation> freed;
    uintptr_t arena = 0, arena_size = 0, arena_next = 0;
    size_t page = 4096;
    uint64_t delay_seed = 0;
    bool delay = false;
    bool trace = false;
    std::string counters_file;
};

Global* global = nullptr;
std::once_flag init_once;
struct sigaction previous_segv;

bool in_arena(uintptr_t a) { return global && a >= global->arena && a < global->arena + global->arena_size; }

// Pages of the arena a kernel touched where it may not, made accessible so that it can finish;
// protected again and reported after its block (`take_faults`).
thread_local std::array<uintptr_t, 64> fault_pages;
thread_local size_t fault_count = 0;
thread_local uintptr_t first_fault = 0;

void on_segv(int sig, siginfo_t* info, void* uc) {
    const uintptr_t a = (uintptr_t)info->si_addr;
    if (running_kernel() && in_arena(a)) {
        const uintptr_t page = a & ~(uintptr_t)(global->page - 1);
        if (fault_count == 0) first_fault = a;
        if (fault_count < fault_pages.size() && mprotect((void*)page, global->page, PROT_READ | PROT_WRITE) == 0) {
            fault_pages[fault_count++] = page;
            return;
        }
    }
    if (previous_segv.sa_flags & SA_SIGINFO) {
        previous_segv.sa_sigaction(sig, info, uc);
    } else if (previous_segv.sa_handler != SIG_IGN && previous_segv.sa_handler != SIG_DFL) {
        previous_segv.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);  // the fault repeats and the default action ends the process
    }
}

std::string counters_json(Device& d) {
    Counters& c = d.counters;
    std::ostringstream s;
    s << "{\"allocations\": " << c.allocations << ", \"frees\": " << c.frees << ", \"memsets\": " << c.memsets
      << ", \"memset_bytes\": " << c.memset_bytes << ", \"htod\": " << c.htod << ", \"htod_bytes\": " << c.htod_bytes
      << ", \"dtoh\": " << c.dtoh << ", \"dtoh_bytes\": " << c.dtoh_bytes << ", \"dtod\": " << c.dtod
      << ", \"synchronizations\": " << c.synchronizations << ", \"launches\": {";
    std::lock_guard<std::mutex> lock(c.m);
    bool first = true;
    for (auto& [name, n] : c.launches) {
        s << (first ? "" : ", ") << "\"" << name << "\": " << n;
        first = false;
    }
    s << "}}";
    return s.str();
}

void initialise() {
    global = new Global();
    global->page = (size_t)sysconf(_SC_PAGESIZE);
    int count = 4;
    if (const char* d = std::getenv("PFC_EMU_DEVICES")) count = std::max(0, std::atoi(d));
    const uint64_t memory = parse_bytes(std::getenv("PFC_EMU_DEVICE_MEMORY"), 8ull << 30);
    for (int i = 0; i < count; i++) {
        auto d = std::make_unique<Device>();
        d->ordinal = i;
        d->memory = memory;
        global->devices.push_back(std::move(d));
    }
    if (const char* s = std::getenv("PFC_EMU_DELAY")) {
        global->delay = true;
        global->delay_seed = std::strtoull(s, nullptr, 10);
    }
    if (const char* f = std::getenv("PFC_EMU_COUNTERS")) global->counters_file = f;
    global->trace = std::getenv("PFC_EMU_TRACE") != nullptr;
    // Address space for every allocation the process will make: reserved, not committed.
    global->arena_size = 1ull << 40;
    void* arena = mmap(nullptr, global->arena_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (arena == MAP_FAILED) {
        global->arena_size = 0;
        report("cannot reserve the device address space");
    } else {
        global->arena = global->arena_next = (uintptr_t)arena;
    }
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv);
    std::atexit([] {
        if (global->counters_file.empty()) return;
        std::string json = "{\"devices\": [";
        for (size_t i = 0; i < global->devices.size(); i++) json += (i ? ", " : "") + counters_json(*global->devices[i]);
        json += "]}\n";
        const std::string tmp = global->counters_file + ".tmp";
        if (FILE* f = std::fopen(tmp.c_str(), "w")) {
            std::fputs(json.c_str(), f);
            std::fclose(f);
            std::rename(tmp.c_str(), global->counters_file.c_str());
        }
    });
}

Device* device_at(int ordinal) {
    if (!global || ordinal < 0 || (size_t)ordinal >= global->devices.size()) return nullptr;
    return global->devices[(size_t)ordinal].get();
}

// An allocation of `size` bytes ending 8-byte aligned right before a PROT_NONE page. The bytes
// between the end and that page, and before the start within its page, hold a canary that is
// checked after every launch (writes there are the overflows the guard page cannot see).
CUresult map_allocation(Device& d, size_t size, bool from_pool, CUdeviceptr* out) {
    const size_t page = global->page;
    const size_t body = (size + ALIGN - 1) / ALIGN * ALIGN;
    const size_t pages = std::max<size_t>(1, (body + page - 1) / page);
    const size_t span = (pages + 1) * page;
    if (!global->arena || global->arena_next + span > global->arena + global->arena_size) {
        report("the emulated device address space is exhausted");
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    const uintptr_t map_start = global->arena_next;
    global->arena_next += span;
    if (mprotect((void*)map_start, pages * page, PROT_READ | PROT_WRITE) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    const uintptr_t start = map_start + pages * page - body;
    std::memset((void*)map_start, CANARY, start - map_start);
    std::memset((void*)(start + size), CANARY, body - size);
    global->live[start] = Allocation{start, size, d.ordinal, from_pool, false, map_start, pages * page};
    *out = start;
    return CUDA_SUCCESS;
}

void unmap_allocation(const Allocation& a) {
    madvise((void*)a.map_start, a.map_size, MADV_DONTNEED);
    mprotect((void*)a.map_start, a.map_size, PROT_NONE);
    global->freed[a.start] = a;
    global->live.erase(a.start);
}

// The live allocation holding `p`, if any (caller holds global->m).
const Allocation* allocation_of(CUdeviceptr p) {
    auto it = global->live.upper_bound(p);
    if (it == global->live.begin()) return nullptr;
    --it;
    return p < it->second.start + std::max<size_t>(it->second.size, 1) ? &it->second : nullptr;
}

std::string where(uintptr_t a) {
    std::ostringstream s;
    s << "0x" << std::hex << a << std::dec;
    auto after = [&](std::map<CUdeviceptr, Allocation>& m) -> const Allocation* {
        auto it = m.upper_bound(a);
        if (it == m.begin()) return nullptr;
        --it;
        return a < it->second.map_start + it->second.map_size + global->page ? &it->second : nullptr;
    };
    if (const Allocation* al = after(global->live)) {
        if (a >= al->start + al->size)
            s << ", " << a - (al->start + al->size) << " bytes past the end of a " << al->size << "-byte allocation at 0x" << std::hex << al->start;
        else if (a < al->start)
            s << ", " << al->start - a << " bytes before a " << al->size << "-byte allocation at 0x" << std::hex << al->start;
    } else if (const Allocation* fr = after(global->freed)) {
        s << ", in a freed " << fr->size << "-byte allocation at 0x" << std::hex << fr->start;
    }
    return s.str();
}

// Overwritten canaries of the live allocations of `device`: writes just outside them.
std::string check_canaries(int device) {
    std::lock_guard<std::mutex> lock(global->m);
    for (auto& [start, a] : global->live) {
        if (a.device != device) continue;
        const uint8_t* before = (const uint8_t*)a.map_start;
        for (uintptr_t p = a.map_start; p < a.start; p++)
            if (before[p - a.map_start] != CANARY) return "at " + where(p);
        const size_t body = (a.size + ALIGN - 1) / ALIGN * ALIGN;
        for (size_t i = a.size; i < body; i++)
            if (((const uint8_t*)a.start)[i] != CANARY) return "at " + where(a.start + i);
    }
    return "";
}

// ---- Streams, events ----------------------------------------------------------------------------

// How far a stream has got; outlives the stream for the events recorded on it.
struct Progress {
    std::mutex m;
    std::condition_variable cv;
    uint64_t completed = 0;

    void wait_for(uint64_t seq) {
        std::unique_lock<std::mutex> lock(m);
        cv.wait(lock, [&] { return completed >= seq; });
    }
    bool reached(uint64_t seq) {
        std::lock_guard<std::mutex> lock(m);
        return completed >= seq;
    }
};

struct Op {
    std::function<void()> run;
    const char* what;
    // Work this operation waits for first (the legacy stream's implicit ordering).
    std::vector<std::pair<std::shared_ptr<Progress>, uint64_t>> after;
};

}  // namespace
}  // namespace pfc_emu

struct CUstream_st {
    pfc_emu::Context* ctx;
    unsigned flags;
    bool legacy;
    std::shared_ptr<pfc_emu::Progress> progress = std::make_shared<pfc_emu::Progress>();
    std::mutex m;
    std::condition_variable cv;
    std::deque<pfc_emu::Op> queue;
    uint64_t enqueued = 0;
    bool stopping = false;
    std::thread worker;
    uint64_t delay_state = 0;
};

struct CUevent_st {
    unsigned flags;
    // The context current at creation: the driver records an event only on a stream of its own
    // context.
    pfc_emu::Context* ctx = nullptr;
    // The handle's and each queued marker's: destroying an event whose marker is still queued
    // returns at once (as the driver does), and the marker frees it.
    std::atomic<int> refs{1};
    std::mutex m;
    std::shared_ptr<pfc_emu::Progress> progress;  // of the stream it was last recorded on
    uint64_t seq = 0;
    uint64_t generation = 0, stamped_generation = 0;
    pfc_emu::Clock::time_point time;
};

struct CUmod_st {
    std::vector<std::string> entries;
    std::vector<std::unique_ptr<CUfunc_st>> functions;
};

struct CUfunc_st {
    std::string name;
    const pfc_emu::HostKernel* kernel;
    CUmod_st* module;
};

struct CUmemPoolHandle_st {
    pfc_emu::Device* device;
};

namespace pfc_emu {

struct Context {
    Device* device;
    int refs = 0;
    std::mutex m;
    std::set<CUstream_st*> streams;
    CUstream_st* legacy = nullptr;
    std::atomic<CUresult> sticky{CUDA_SUCCESS};
    CUmemPoolHandle_st pool_handle;
};

namespace {

thread_local Context* current = nullptr;

void stream_loop(CUstream_st* s) {
    for (;;) {
        Op op;
        {
            std::unique_lock<std::mutex> lock(s->m);
            s->cv.wait(lock, [&] { return s->stopping || !s->queue.empty(); });
            if (s->queue.empty()) return;
            op = std::move(s->queue.front());
            s->queue.pop_front();
        }
        for (auto& [progress, seq] : op.after) progress->wait_for(seq);
        if (global->delay) {
            s->delay_state = s->delay_state * 6364136223846793005ull + 1442695040888963407ull;
            std::this_thread::sleep_for(std::chrono::microseconds((s->delay_state >> 33) % 2000));
        }
        if (global->trace) std::fprintf(stderr, "[pfc-emu] GPU %d stream %p: %s\n", s->ctx->device->ordinal, (void*)s, op.what);
        // After a fault the context is unusable: queued work is dropped, as on a GPU.
        if (s->ctx->sticky.load() == CUDA_SUCCESS) op.run();
        {
            std::lock_guard<std::mutex> lock(s->progress->m);
            s->progress->completed++;
        }
        s->progress->cv.notify_all();
    }
}

CUstream_st* new_stream(Context* c, unsigned flags, bool legacy) {
    auto* s = new CUstream_st();
    s->ctx = c;
    s->flags = flags;
    s->legacy = legacy;
    s->delay_state = global->delay_seed ^ (uintptr_t)s;
    s->worker = std::thread(stream_loop, s);
    std::lock_guard<std::mutex> lock(c->m);
    c->streams.insert(s);
    return s;
}

// The stream a handle names: NULL and CU_STREAM_LEGACY are the current context's legacy stream.
CUresult resolve(CUstream handle, CUstream_st** out) {
    if (handle == nullptr || handle == PFC_EMU_STREAM_LEGACY) {
        if (!current) return CUDA_ERROR_INVALID_CONTEXT;
        *out = current->legacy;
        return CUDA_SUCCESS;
    }
    if (handle == PFC_EMU_STREAM_PER_THREAD) {
        report("the per-thread default stream is not emulated");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    for (auto& d : global->devices) {
        Context* c = d->primary;
        if (!c) continue;
        std::lock_guard<std::mutex> lock(c->m);
        if (c->streams.count(handle)) {
            *out = handle;
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_INVALID_HANDLE;
}

uint64_t push(CUstream_st* s, Op op) {
    // The legacy stream waits for the blocking streams' work queued before, and they for its.
    Context* c = s->ctx;
    if (s->legacy) {
        std::lock_guard<std::mutex> lock(c->m);
        for (CUstream_st* o : c->streams) {
            if (o == s || (o->flags & 1u /* CU_STREAM_NON_BLOCKING */)) continue;
            std::lock_guard<std::mutex> l2(o->m);
            op.after.emplace_back(o->progress, o->enqueued);
        }
    } else if (!(s->flags & 1u)) {
        std::lock_guard<std::mutex> l2(c->legacy->m);
        op.after.emplace_back(c->legacy->progress, c->legacy->enqueued);
    }
    std::lock_guard<std::mutex> lock(s->m);
    s->queue.push_back(std::move(op));
    const uint64_t seq = ++s->enqueued;
    s->cv.notify_one();
    return seq;
}

void drain(CUstream_st* s) {
    uint64_t seq;
    {
        std::lock_guard<std::mutex> lock(s->m);
        seq = s->enqueued;
    }
    s->progress->wait_for(seq);
}

// A synchronisation point: the pools give back what they hold above their release threshold.
void trim_pool(Device& d) {
    std::lock_guard<std::mutex> lock(global->m);
    Pool& p = d.pool;
    if (p.reserved > p.release_threshold) p.reserved = std::max(p.used, p.release_threshold);
}

Context* context_of(Device& d) {
    if (!d.primary) {
        auto* c = new Context();
        c->device = &d;
        c->pool_handle.device = &d;
        c->legacy = new_stream(c, 0, true);
        d.primary = c;
    }
    return d.primary;
}

CUresult ready() {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    return current->sticky.load();
}

CUresult alloc(size_t bytes, bool from_pool, CUdeviceptr* out) {
    if (CUresult r = ready()) return r;
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    Device& d = *current->device;
    std::lock_guard<std::mutex> lock(global->m);
    const uint64_t rounded = (bytes + 255) / 256 * 256;
    uint64_t grow = rounded;
    if (from_pool) {
        const uint64_t spare = d.pool.reserved - d.pool.used;
        grow = rounded > spare ? rounded - spare : 0;
    }
    if (d.committed() + grow > d.memory) return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult r = map_allocation(d, bytes, from_pool, out);
    if (r) return r;
    d.counters.allocations++;
    if (from_pool) {
        d.pool.reserved += grow;
        d.pool.used += rounded;
        d.pool.used_high = std::max(d.pool.used_high, d.pool.used);
        d.pool.reserved_high = std::max(d.pool.reserved_high, d.pool.reserved);
    } else {
        d.sync_bytes += rounded;
    }
    return CUDA_SUCCESS;
}

void release(const Allocation& a) {
    Device& d = *global->devices[(size_t)a.device];
    const uint64_t rounded = (a.size + 255) / 256 * 256;
    if (a.from_pool) d.pool.used -= rounded;
    else d.sync_bytes -= rounded;
    d.counters.frees++;
    unmap_allocation(a);
}

CUresult check_range_locked(CUdeviceptr p, size_t bytes) {
    const Allocation* a = allocation_of(p);
    if (!a || p + bytes > a->start + a->size) {
        report("invalid device pointer range: " + where(p) + " (" + std::to_string(bytes) + " bytes)");
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

CUresult check_range(CUdeviceptr p, size_t bytes) {
    std::lock_guard<std::mutex> lock(global->m);
    return check_range_locked(p, bytes);
}

CUresult enqueue_on(CUstream handle, const char* what, std::function<void()> work) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    CUstream_st* s = nullptr;
    if (CUresult r = resolve(handle, &s)) return r;
    if (CUresult r = s->ctx->sticky.load()) return r;
    push(s, Op{std::move(work), what, {}});
    return CUDA_SUCCESS;
}

// After each block, on the host thread that ran it: the pages its faults opened are closed again
// and the first fault is described.
std::string take_faults() {
    if (fault_count == 0) return "";
    for (size_t i = 0; i < fault_count; i++) mprotect((void*)fault_pages[i], global->page, PROT_NONE);
    fault_count = 0;
    std::lock_guard<std::mutex> lock(global->m);
    return "at " + where(first_fault);
}

CUresult synchronize_stream(CUstream_st* s) {
    drain(s);
    s->ctx->device->counters.synchronizations++;
    trim_pool(*s->ctx->device);
    return s->ctx->sticky.load();
}


// Elements of a parsed CUBIN (ELF) or PTX: the kernels' names.
bool entries_of(const void* image, std::vector<std::string>* out) {
    const auto* bytes = (const unsigned char*)image;
    if (std::memcmp(bytes, "\x7f" "ELF", 4) == 0) {
        if (bytes[4] != 2) return false;  // 64-bit only, as every CUBIN
        uint64_t shoff;
        uint16_t shentsize, shnum, shstrndx;
        std::memcpy(&shoff, bytes + 0x28, 8);
        std::memcpy(&shentsize, bytes + 0x3A, 2);
        std::memcpy(&shnum, bytes + 0x3C, 2);
        std::memcpy(&shstrndx, bytes + 0x3E, 2);
        if (shentsize < 64 || shstrndx >= shnum) return false;
        auto section = [&](uint16_t i, uint32_t* name, uint64_t* offset) {
            const unsigned char* h = bytes + shoff + (uint64_t)i * shentsize;
            std::memcpy(name, h, 4);
            std::memcpy(offset, h + 0x18, 8);
        };
        uint32_t strname;
        uint64_t stroff;
        section(shstrndx, &strname, &stroff);
        for (uint16_t i = 0; i < shnum; i++) {
            uint32_t name;
            uint64_t offset;
            section(i, &name, &offset);
            const std::string n = (const char*)bytes + stroff + name;
            if (n.rfind(".text.", 0) == 0) out->push_back(n.substr(6));
        }
        return true;
    }
    const std::string ptx((const char*)image);
    for (size_t at = ptx.find(".entry "); at != std::string::npos; at = ptx.find(".entry ", at + 1)) {
        size_t b = at + 7, e = b;
        while (e < ptx.size() && (std::isalnum((unsigned char)ptx[e]) || ptx[e] == '_')) e++;
        out->push_back(ptx.substr(b, e - b));
    }
    return !out->empty();
}

}  // namespace

// ---- The API other emulated libraries use ---------------------------------------------------------

CUresult enqueue(CUstream s, const char* what, std::function<void()> work) { return enqueue_on(s, what, std::move(work)); }

int stream_device(CUstream handle) {
    CUstream_st* s = nullptr;
    if (!global || resolve(handle, &s)) return -1;
    return s->ctx->device->ordinal;
}

int current_device() { return current ? current->device->ordinal : -1; }

bool check_device_range(CUdeviceptr p, size_t bytes, int device, std::string* why) {
    if (!global) return false;
    std::lock_guard<std::mutex> lock(global->m);
    const Allocation* a = allocation_of(p);
    if (a && p + bytes <= a->start + a->size && (device < 0 || a->device == device)) return true;
    if (why) {
        if (a && device >= 0 && a->device != device)
            *why = where(p) + " is memory of GPU " + std::to_string(a->device) + ", not of GPU " + std::to_string(device);
        else
            *why = where(p) + " (" + std::to_string(bytes) + " bytes) is not inside one live device allocation";
    }
    return false;
}

void count_launch(int device, const char* name) {
    Device* d = device_at(device);
    if (!d) return;
    std::lock_guard<std::mutex> lock(d->counters.m);
    d->counters.launches[name]++;
}

void fail(int device, CUresult code, const std::string& message) {
    report("GPU " + std::to_string(device) + ": " + message);
    if (Device* d = device_at(device)) {
        CUresult none = CUDA_SUCCESS;
        context_of(*d)->sticky.compare_exchange_strong(none, code);
    }
}

}  // namespace pfc_emu

using namespace pfc_emu;

// ---- Initialisation, devices ---------------------------------------------------------------------

EXPORT CUresult cuInit(unsigned flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    std::call_once(init_once, initialise);
    return CUDA_SUCCESS;
}

// The driver's private tables, which NVRTC asks for when it finds libcuda.so.1 loaded: there are
// none here, and NVRTC then compiles as on a machine without a driver.
EXPORT CUresult cuGetExportTable(const void** table, const void*) {
    if (table) *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;
}

EXPORT CUresult cuDriverGetVersion(int* version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = 13000;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetCount(int* count) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    *count = (int)global->devices.size();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    if (!device_at(ordinal)) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice dev) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!device_at(dev)) return CUDA_ERROR_INVALID_DEVICE;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    std::snprintf(name, (size_t)len, "partialfc host emulation of GPU %d", dev);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    Device* d = device_at(dev);
    if (!d) return CUDA_ERROR_INVALID_DEVICE;
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    *bytes = d->memory;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid_v2(CUuuid* uuid, CUdevice dev) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!device_at(dev)) return CUDA_ERROR_INVALID_DEVICE;
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    std::memset(uuid->bytes, 0, sizeof uuid->bytes);
    std::memcpy(uuid->bytes, "pfc-emu-gpu", 11);
    uuid->bytes[15] = (char)dev;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid(CUuuid* uuid, CUdevice dev) { return cuDeviceGetUuid_v2(uuid, dev); }

EXPORT CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice dev) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!device_at(dev)) return CUDA_ERROR_INVALID_DEVICE;
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    // An H100-like device of compute capability 9.0.
    switch (attribute) {
        case 1: *value = 1024; break;         // MAX_THREADS_PER_BLOCK
        case 2: case 3: *value = 1024; break;  // MAX_BLOCK_DIM_X, _Y
        case 4: *value = 64; break;            // MAX_BLOCK_DIM_Z
        case 5: *value = 2147483647; break;    // MAX_GRID_DIM_X
        case 6: case 7: *value = 65535; break; // MAX_GRID_DIM_Y, _Z
        case 8: *value = 49152; break;         // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *value = 32; break;           // WARP_SIZE
        case 16: *value = 132; break;          // MULTIPROCESSOR_COUNT
        case 33: *value = dev + 1; break;      // PCI_BUS_ID
        case 41: *value = 1; break;            // UNIFIED_ADDRESSING
        case 75: *value = 9; break;            // COMPUTE_CAPABILITY_MAJOR
        case 76: *value = 0; break;            // COMPUTE_CAPABILITY_MINOR
        case 89: *value = 0; break;            // CONCURRENT_MANAGED_ACCESS
        case 115: *value = 1; break;           // MEMORY_POOLS_SUPPORTED
        default:
            report("cuDeviceGetAttribute: attribute " + std::to_string(attribute) + " is not emulated");
            return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

// ---- Contexts -------------------------------------------------------------------------------------

EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* out, CUdevice dev) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    Device* d = device_at(dev);
    if (!d) return CUDA_ERROR_INVALID_DEVICE;
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(global->m);
    Context* c = context_of(*d);
    c->refs++;
    *out = reinterpret_cast<CUcontext>(c);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    Device* d = device_at(dev);
    if (!d) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::mutex> lock(global->m);
    if (!d->primary || d->primary->refs == 0) return CUDA_ERROR_INVALID_CONTEXT;
    // The context and its memory live on (a GPU's primary context is reset at refcount 0, but
    // nothing here relies on that and keeping it avoids freeing under running streams).
    d->primary->refs--;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSetCurrent(CUcontext c) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    current = reinterpret_cast<Context*>(c);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(CUcontext* c) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    *c = reinterpret_cast<CUcontext>(current);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetDevice(CUdevice* dev) {
    if (CUresult r = ready()) return r;
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    *dev = current->device->ordinal;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSynchronize() {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    Context* c = current;
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    std::vector<CUstream_st*> streams;
    {
        std::lock_guard<std::mutex> lock(c->m);
        streams.assign(c->streams.begin(), c->streams.end());
    }
    for (CUstream_st* s : streams) drain(s);
    c->device->counters.synchronizations++;
    trim_pool(*c->device);
    return c->sticky.load();
}

// ---- Streams --------------------------------------------------------------------------------------

EXPORT CUresult cuStreamCreate(CUstream* out, unsigned flags) {
    if (CUresult r = ready()) return r;
    if (!out || flags > 1) return CUDA_ERROR_INVALID_VALUE;
    *out = new_stream(current, flags, false);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamCreateWithPriority(CUstream* out, unsigned flags, int) { return cuStreamCreate(out, flags); }

EXPORT CUresult cuStreamDestroy_v2(CUstream handle) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!handle || handle == PFC_EMU_STREAM_LEGACY || handle == PFC_EMU_STREAM_PER_THREAD) return CUDA_ERROR_INVALID_HANDLE;
    CUstream_st* s = nullptr;
    if (CUresult r = resolve(handle, &s)) return r;
    // Work already queued completes (the driver's documented behaviour), then the worker ends.
    {
        std::lock_guard<std::mutex> lock(s->ctx->m);
        s->ctx->streams.erase(s);
    }
    {
        std::lock_guard<std::mutex> lock(s->m);
        s->stopping = true;
    }
    s->cv.notify_one();
    s->worker.join();
    delete s;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamSynchronize(CUstream handle) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    CUstream_st* s = nullptr;
    if (CUresult r = resolve(handle, &s)) return r;
    return synchronize_stream(s);
}

EXPORT CUresult cuStreamQuery(CUstream handle) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    CUstream_st* s = nullptr;
    if (CUresult r = resolve(handle, &s)) return r;
    uint64_t seq;
    {
        std::lock_guard<std::mutex> lock(s->m);
        seq = s->enqueued;
    }
    if (CUresult r = s->ctx->sticky.load()) return r;
    return s->progress->reached(seq) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

EXPORT CUresult cuStreamWaitEvent(CUstream handle, CUevent ev, unsigned flags) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!ev || flags != 0) return ev ? CUDA_ERROR_INVALID_VALUE : CUDA_ERROR_INVALID_HANDLE;
    std::shared_ptr<Progress> progress;
    uint64_t seq;
    {
        std::lock_guard<std::mutex> lock(ev->m);
        progress = ev->progress;
        seq = ev->seq;
    }
    if (!progress) return CUDA_SUCCESS;  // never recorded: nothing to wait for
    return enqueue_on(handle, "cuStreamWaitEvent", [progress, seq] { progress->wait_for(seq); });
}

EXPORT CUresult cuLaunchHostFunc(CUstream handle, CUhostFn fn, void* data) {
    if (!fn) return CUDA_ERROR_INVALID_VALUE;
    return enqueue_on(handle, "cuLaunchHostFunc", [fn, data] { fn(data); });
}

// ---- Events ---------------------------------------------------------------------------------------

namespace {
void release_event(CUevent e) {
    if (e->refs.fetch_sub(1) == 1) delete e;
}
}  // namespace

EXPORT CUresult cuEventCreate(CUevent* out, unsigned flags) {
    if (CUresult r = ready()) return r;
    if (!out || (flags & ~7u)) return CUDA_ERROR_INVALID_VALUE;
    auto* e = new CUevent_st();
    e->flags = flags;
    e->ctx = current;
    *out = e;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventDestroy_v2(CUevent e) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    release_event(e);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventRecord(CUevent e, CUstream handle) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    CUstream_st* s = nullptr;
    if (CUresult r = resolve(handle, &s)) return r;
    if (CUresult r = s->ctx->sticky.load()) return r;
    if (e->ctx != s->ctx) {
        report("cuEventRecord of an event of GPU " + std::to_string(e->ctx->device->ordinal) + " on a stream of GPU " +
               std::to_string(s->ctx->device->ordinal) + ": an event is recorded on a stream of its own context");
        return CUDA_ERROR_INVALID_HANDLE;
    }
    std::lock_guard<std::mutex> lock(e->m);
    const uint64_t generation = ++e->generation;
    e->progress = s->progress;
    e->refs++;
    e->seq = push(s, Op{[e, generation] {
                            {
                                std::lock_guard<std::mutex> l(e->m);
                                if (generation > e->stamped_generation) {
                                    e->stamped_generation = generation;
                                    e->time = Clock::now();
                                }
                            }
                            release_event(e);
                        },
                        "cuEventRecord",
                        {}});
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventQuery(CUevent e) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    std::lock_guard<std::mutex> lock(e->m);
    return !e->progress || e->progress->reached(e->seq) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

EXPORT CUresult cuEventSynchronize(CUevent e) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    std::shared_ptr<Progress> progress;
    uint64_t seq;
    {
        std::lock_guard<std::mutex> lock(e->m);
        progress = e->progress;
        seq = e->seq;
    }
    if (progress) progress->wait_for(seq);
    if (current) {
        current->device->counters.synchronizations++;
        trim_pool(*current->device);
        return current->sticky.load();
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!ms) return CUDA_ERROR_INVALID_VALUE;
    if (!start || !end) return CUDA_ERROR_INVALID_HANDLE;
    if ((start->flags | end->flags) & 2u /* CU_EVENT_DISABLE_TIMING */) return CUDA_ERROR_INVALID_HANDLE;
    std::scoped_lock lock(start->m, end->m);
    if (!start->progress || !end->progress) return CUDA_ERROR_INVALID_HANDLE;
    if (!start->progress->reached(start->seq) || !end->progress->reached(end->seq)) return CUDA_ERROR_NOT_READY;
    *ms = std::chrono::duration<float, std::milli>(end->time - start->time).count();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) { return cuEventElapsedTime(ms, start, end); }

// ---- Memory ---------------------------------------------------------------------------------------

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* out, size_t bytes) { return alloc(bytes, false, out); }

EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
    if (CUresult r = ready()) return r;
    // cuMemFree synchronizes: work using the memory finishes first.
    cuCtxSynchronize();
    std::lock_guard<std::mutex> lock(global->m);
    auto it = global->live.find(p);
    if (it == global->live.end() || it->second.from_pool || it->second.freeing) {
        report("cuMemFree of " + where(p) + ", which is not the start of a live cuMemAlloc allocation");
        return CUDA_ERROR_INVALID_VALUE;
    }
    release(it->second);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemAllocAsync(CUdeviceptr* out, size_t bytes, CUstream handle) {
    if (CUresult r = ready()) return r;
    CUstream_st* s = nullptr;
    if (CUresult r = resolve(handle, &s)) return r;
    return alloc(bytes, true, out);
}

EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream handle) {
    if (CUresult r = ready()) return r;
    {
        std::lock_guard<std::mutex> lock(global->m);
        auto it = global->live.find(p);
        if (it == global->live.end() || it->second.freeing) {
            report("cuMemFreeAsync of " + where(p) + ", which is not the start of a live allocation" +
                   (it != global->live.end() ? " (its free is queued already)" : ""));
            return CUDA_ERROR_INVALID_VALUE;
        }
        it->second.freeing = true;
    }
    // Freed when the stream reaches the free: work queued before still sees the memory.
    CUresult queued = enqueue_on(handle, "cuMemFreeAsync", [p] {
        std::lock_guard<std::mutex> lock(global->m);
        auto it = global->live.find(p);
        if (it != global->live.end()) release(it->second);
    });
    if (queued) {
        std::lock_guard<std::mutex> lock(global->m);
        global->live[p].freeing = false;
    }
    return queued;
}

EXPORT CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    if (CUresult r = ready()) return r;
    if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(global->m);
    Device& d = *current->device;
    *total = d.memory;
    *free_bytes = d.memory - std::min(d.memory, d.committed());
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice dev) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    Device* d = device_at(dev);
    if (!d) return CUDA_ERROR_INVALID_DEVICE;
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(global->m);
    *pool = &context_of(*d)->pool_handle;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice dev) { return cuDeviceGetDefaultMemPool(pool, dev); }

EXPORT CUresult cuMemPoolSetAttribute(CUmemoryPool pool, int attribute, void* value) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pool || !value) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(global->m);
    Pool& p = pool->device->pool;
    const uint64_t v = *(const uint64_t*)value;
    switch (attribute) {
        case 4: p.release_threshold = v; return CUDA_SUCCESS;  // RELEASE_THRESHOLD
        case 6:                                                  // RESERVED_MEM_HIGH: only reset to 0
            if (v) return CUDA_ERROR_INVALID_VALUE;
            p.reserved_high = p.reserved;
            return CUDA_SUCCESS;
        case 8:  // USED_MEM_HIGH: only reset to 0
            if (v) return CUDA_ERROR_INVALID_VALUE;
            p.used_high = p.used;
            return CUDA_SUCCESS;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
}

EXPORT CUresult cuMemPoolGetAttribute(CUmemoryPool pool, int attribute, void* value) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pool || !value) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(global->m);
    const Pool& p = pool->device->pool;
    uint64_t* out = (uint64_t*)value;
    switch (attribute) {
        case 4: *out = p.release_threshold; return CUDA_SUCCESS;
        case 5: *out = p.reserved; return CUDA_SUCCESS;
        case 6: *out = p.reserved_high; return CUDA_SUCCESS;
        case 7: *out = p.used; return CUDA_SUCCESS;
        case 8: *out = p.used_high; return CUDA_SUCCESS;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
}

EXPORT CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t keep) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(global->m);
    Pool& p = pool->device->pool;
    p.reserved = std::max<uint64_t>(p.used, std::min<uint64_t>(p.reserved, keep));
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream handle) {
    if (CUresult r = ready()) return r;
    if (n == 0) return CUDA_SUCCESS;
    if (CUresult r = check_range(dst, n)) return r;
    if (CUresult r = enqueue_on(handle, "cuMemsetD8Async", [dst, value, n] { std::memset((void*)dst, value, n); })) return r;
    // Counted once queued: a call refused (a stream that does not exist) did nothing.
    Device& d = *current->device;
    d.counters.memsets++;
    d.counters.memset_bytes += n;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) {
    if (CUresult r = cuMemsetD8Async(dst, value, n, nullptr)) return r;
    CUstream_st* s = nullptr;
    resolve(nullptr, &s);
    return synchronize_stream(s);
}

EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned value, size_t n, CUstream handle) {
    if (CUresult r = ready()) return r;
    if (n == 0) return CUDA_SUCCESS;
    if (dst % 4) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_range(dst, n * 4)) return r;
    if (CUresult r = enqueue_on(handle, "cuMemsetD32Async", [dst, value, n] { std::fill_n((unsigned*)dst, n, value); })) return r;
    Device& d = *current->device;
    d.counters.memsets++;
    d.counters.memset_bytes += n * 4;
    return CUDA_SUCCESS;
}

// Host memory here is pageable (no cuMemHostAlloc), and the driver documents what the async
// copies do with pageable memory: host to device waits for the stream's earlier work, stages the
// source and returns (the caller may reuse its buffer at once); device to host returns only once
// the copy is done.
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream handle) {
    if (CUresult r = ready()) return r;
    if (bytes == 0) return CUDA_SUCCESS;
    if (!src || check_range(dst, bytes)) return CUDA_ERROR_INVALID_VALUE;
    CUstream_st* s = nullptr;
    if (CUresult r = resolve(handle, &s)) return r;
    if (CUresult r = s->ctx->sticky.load()) return r;
    drain(s);
    auto staged = std::make_shared<std::vector<uint8_t>>((const uint8_t*)src, (const uint8_t*)src + bytes);
    current->device->counters.htod++;
    current->device->counters.htod_bytes += bytes;
    push(s, Op{[dst, staged] { std::memcpy((void*)dst, staged->data(), staged->size()); }, "cuMemcpyHtoDAsync", {}});
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream handle) {
    if (CUresult r = ready()) return r;
    if (bytes == 0) return CUDA_SUCCESS;
    if (!dst || check_range(src, bytes)) return CUDA_ERROR_INVALID_VALUE;
    CUstream_st* s = nullptr;
    if (CUresult r = resolve(handle, &s)) return r;
    if (CUresult r = s->ctx->sticky.load()) return r;
    current->device->counters.dtoh++;
    current->device->counters.dtoh_bytes += bytes;
    s->progress->wait_for(push(s, Op{[dst, src, bytes] { std::memcpy(dst, (const void*)src, bytes); }, "cuMemcpyDtoHAsync", {}}));
    return s->ctx->sticky.load();
}

EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream handle) {
    if (CUresult r = ready()) return r;
    if (bytes && (check_range(dst, bytes) || check_range(src, bytes))) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = enqueue_on(handle, "cuMemcpyDtoDAsync", [dst, src, bytes] { std::memcpy((void*)dst, (const void*)src, bytes); })) return r;
    current->device->counters.dtod++;
    return CUDA_SUCCESS;
}

// The synchronous copies run on the legacy stream and return once done (host memory here is
// pageable, for which the driver's copies are synchronous).
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    if (CUresult r = cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr)) return r;
    return cuStreamSynchronize(nullptr);
}

EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    if (CUresult r = cuMemcpyDtoHAsync_v2(dst, src, bytes, nullptr)) return r;
    return cuStreamSynchronize(nullptr);
}

EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    if (CUresult r = cuMemcpyDtoDAsync_v2(dst, src, bytes, nullptr)) return r;
    return cuStreamSynchronize(nullptr);
}

// ---- Modules, launches ----------------------------------------------------------------------------

EXPORT CUresult cuModuleLoadData(CUmodule* out, const void* image) {
    if (CUresult r = ready()) return r;
    if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
    std::vector<std::string> entries;
    if (!entries_of(image, &entries)) {
        report("cuModuleLoadData: neither a 64-bit CUBIN nor PTX with an entry point");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    // Every kernel of the GPU build needs its host build: kernels/*.cu and this build must agree.
    for (const std::string& e : entries) {
        if (!find_kernel(e)) {
            report("cuModuleLoadData: kernel " + e + " of the module has no host build (rebuild with scripts/cuda-emulator.sh)");
            return CUDA_ERROR_NO_BINARY_FOR_GPU;
        }
    }
    auto* m = new CUmod_st();
    m->entries = std::move(entries);
    *out = m;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleUnload(CUmodule m) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!m) return CUDA_ERROR_INVALID_HANDLE;
    delete m;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleGetFunction(CUfunction* out, CUmodule m, const char* name) {
    if (!global) return CUDA_ERROR_NOT_INITIALIZED;
    if (!out || !name) return CUDA_ERROR_INVALID_VALUE;
    if (!m) return CUDA_ERROR_INVALID_HANDLE;
    if (std::find(m->entries.begin(), m->entries.end(), name) == m->entries.end()) return CUDA_ERROR_NOT_FOUND;
    auto f = std::make_unique<CUfunc_st>();
    f->name = name;
    f->kernel = find_kernel(name);
    f->module = m;
    *out = f.get();
    m->functions.push_back(std::move(f));
    return CUDA_SUCCESS;
}

EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                               unsigned shared_bytes, CUstream handle, void** params, void** extra) {
    if (CUresult r = ready()) return r;
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    // The device's limits (cuDeviceGetAttribute above); the driver refuses a launch over them.
    if (!gx || !gy || !gz || !bx || !by || !bz || bx > 1024 || by > 1024 || bz > 64 || (uint64_t)bx * by * bz > 1024 ||
        gy > 65535 || gz > 65535 || gx > 2147483647u) {
        report("cuLaunchKernel " + f->name + ": grid (" + std::to_string(gx) + "," + std::to_string(gy) + "," + std::to_string(gz) +
               ") block (" + std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) + ") is outside the device's limits");
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (shared_bytes) {
        report("cuLaunchKernel " + f->name + ": dynamic shared memory is not emulated (no kernel declares extern __shared__)");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (extra || !params) {
        report("cuLaunchKernel " + f->name + ": arguments must come as kernelParams");
        return CUDA_ERROR_INVALID_VALUE;
    }
    const int device = current->device->ordinal;
    auto body = std::make_shared<ThreadBody>(f->kernel->bind(params));
    const HostKernel* kernel = f->kernel;
    const dim3 grid{gx, gy, gz}, block{bx, by, bz};
    CUresult queued = enqueue_on(handle, kernel->name, [kernel, body, grid, block, device] {
        GridOutcome outcome = run_grid(*kernel, *body, grid, block, take_faults);
        std::string fault = outcome.fault.empty() ? check_canaries(device) : outcome.fault;
        if (!fault.empty()) {
            fail(device, CUDA_ERROR_ILLEGAL_ADDRESS, std::string("kernel ") + kernel->name + ": out-of-bounds access " + fault);
        } else if (!outcome.error.empty()) {
            fail(device, CUDA_ERROR_LAUNCH_FAILED, std::string("kernel ") + kernel->name + ": " + outcome.error);
        }
    });
    // Counted once queued, as the memsets and copies are.
    if (queued == CUDA_SUCCESS) count_launch(device, kernel->name);
    return queued;
}

// ---- Errors ---------------------------------------------------------------------------------------

namespace {
const char* error_name(CUresult r) {
    switch (r) {
        case CUDA_SUCCESS: return "CUDA_SUCCESS";
        case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
        case CUDA_ERROR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
        case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case CUDA_ERROR_NO_BINARY_FOR_GPU: return "CUDA_ERROR_NO_BINARY_FOR_GPU";
        case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case CUDA_ERROR_NOT_READY: return "CUDA_ERROR_NOT_READY";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
        case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        default: return nullptr;
    }
}

const char* error_text(CUresult r) {
    switch (r) {
        case CUDA_SUCCESS: return "no error";
        case CUDA_ERROR_INVALID_VALUE: return "invalid argument";
        case CUDA_ERROR_OUT_OF_MEMORY: return "out of memory";
        case CUDA_ERROR_NOT_INITIALIZED: return "initialization error";
        case CUDA_ERROR_NO_DEVICE: return "no CUDA-capable device is detected";
        case CUDA_ERROR_INVALID_DEVICE: return "invalid device ordinal";
        case CUDA_ERROR_INVALID_IMAGE: return "device kernel image is invalid";
        case CUDA_ERROR_INVALID_CONTEXT: return "invalid device context";
        case CUDA_ERROR_NO_BINARY_FOR_GPU: return "no kernel image is available for execution on the device";
        case CUDA_ERROR_INVALID_HANDLE: return "invalid resource handle";
        case CUDA_ERROR_NOT_FOUND: return "named symbol not found";
        case CUDA_ERROR_NOT_READY: return "device not ready";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "an illegal memory access was encountered";
        case CUDA_ERROR_LAUNCH_FAILED: return "unspecified launch failure";
        case CUDA_ERROR_NOT_SUPPORTED: return "operation not supported";
        default: return nullptr;
    }
}
}  // namespace

EXPORT CUresult cuGetErrorName(CUresult r, const char** out) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    *out = error_name(r);
    return *out ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuGetErrorString(CUresult r, const char** out) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    *out = error_text(r);
    return *out ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

// The counters of device `ordinal` as the JSON object PFC_EMU_COUNTERS holds, for tests that read
// them in-process (dlsym). Returns the bytes needed; writes when `capacity` is enough.
EXPORT size_t pfc_emu_counters(int ordinal, char* out, size_t capacity) {
    Device* d = device_at(ordinal);
    if (!d) return 0;
    const std::string json = counters_json(*d);
    if (out && capacity > json.size()) std::memcpy(out, json.c_str(), json.size() + 1);
    return json.size() + 1;
}
