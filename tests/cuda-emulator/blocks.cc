// Blocks as fibers. A grid's blocks are shared out to a pool of host threads (several, so that
// atomics and races between blocks are real). Each host thread keeps one Boost.Context fiber per
// CUDA thread of the largest block it has run, reused from block to block. A block runs in
// rounds: every runnable fiber runs until it reaches a meeting point (__syncthreads, a warp
// intrinsic) or exits; then the meetings that are complete are resolved and the next round starts.
// The order of the fibers within a round is shuffled (PFC_EMU_ORDER: shuffle, the default, seeded
// by PFC_EMU_SEED; reverse; forward), so code between two barriers that depends on another thread's
// progress sees it unfinished in some order, as on a GPU.
//
// Boost.Context rather than a hand-written context switch: it is the maintained implementation of
// stack switching (per-ABI assembly, unwinding of abandoned stacks), packaged by Debian.

#include "blocks.hh"

#include <boost/context/fiber.hpp>
#include <boost/context/protected_fixedsize_stack.hpp>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <vector>

namespace ctx = boost::context;

namespace pfc_emu {

namespace {

std::unordered_map<std::string, HostKernel>& registry() {
    static auto* kernels = new std::unordered_map<std::string, HostKernel>();
    return *kernels;
}

const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::Shfl: return "__shfl_sync";
        case WarpOp::ShflUp: return "__shfl_up_sync";
        case WarpOp::ShflDown: return "__shfl_down_sync";
        case WarpOp::ShflXor: return "__shfl_xor_sync";
        case WarpOp::Ballot: return "__ballot_sync";
    }
    return "?";
}

enum class Order { Shuffle, Reverse, Forward };

struct Settings {
    Order order = Order::Shuffle;
    uint64_t seed = 0;
    unsigned threads = 2;
};

const Settings& settings() {
    static const Settings s = [] {
        Settings s;
        if (const char* o = std::getenv("PFC_EMU_ORDER")) {
            std::string v = o;
            s.order = v == "reverse" ? Order::Reverse : v == "forward" ? Order::Forward : Order::Shuffle;
        }
        if (const char* seed = std::getenv("PFC_EMU_SEED")) s.seed = std::strtoull(seed, nullptr, 10);
        s.threads = std::max(2u, std::thread::hardware_concurrency());
        if (const char* t = std::getenv("PFC_EMU_BLOCK_THREADS")) s.threads = std::max(1, std::atoi(t));
        return s;
    }();
    return s;
}

uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

enum class State { Ready, AtBarrier, AtWarp, Done };

struct Lane {
    ctx::fiber fiber;
    // The scheduler, while this lane runs.
    ctx::fiber scheduler;
    uint3 index{};
    State state = State::Ready;
    WarpOp op{};
    unsigned mask = 0;
    uint64_t value = 0, result = 0;
    int arg = 0, width = 32;
};

// One host thread's fibers and the block it is running.
struct Worker {
    std::vector<std::unique_ptr<Lane>> lanes;
    Lane* current = nullptr;
    const HostKernel* kernel = nullptr;
    const ThreadBody* body = nullptr;
    std::vector<size_t> order;
    uint3 block{};
    dim3 block_dim{}, grid_dim{};
    ctx::protected_fixedsize_stack stacks{64 * 1024};
};

thread_local Worker* this_worker = nullptr;

Worker& worker() {
    if (!this_worker) this_worker = new Worker();
    return *this_worker;
}

Lane& current_lane() { return *worker().current; }

// Back to the scheduler; returns when the scheduler resumes this lane.
void suspend(Lane& lane) { lane.scheduler = std::move(lane.scheduler).resume(); }

void make_fiber(Worker& w, size_t i) {
    Lane* lane = w.lanes[i].get();
    lane->fiber = ctx::fiber(std::allocator_arg, w.stacks, [&w, lane](ctx::fiber&& scheduler) {
        lane->scheduler = std::move(scheduler);
        for (;;) {
            (*w.body)();
            lane->state = State::Done;
            suspend(*lane);
        }
        return std::move(lane->scheduler);
    });
}

std::string describe_lanes(const std::vector<size_t>& ids, size_t limit = 8) {
    std::ostringstream s;
    for (size_t i = 0; i < ids.size() && i < limit; i++) s << (i ? ", " : "") << ids[i];
    if (ids.size() > limit) s << ", … (" << ids.size() << " in all)";
    return s.str();
}

// Resolves the meeting of warp `warp` (its lanes [first, end)) that lane `l` waits at, if every
// lane of its mask waits there with the same mask: each lane gets its result and becomes ready.
// Returns whether it did; "" in `error` unless a lane of the mask has exited.
bool resolve_warp(Worker& w, const Lane& l, size_t first, size_t end, std::string* error) {
    for (size_t j = first; j < end; j++) {
        if (!((l.mask >> (j - first)) & 1u)) continue;
        const Lane& o = *w.lanes[j];
        if (o.state == State::Done) {
            std::ostringstream m;
            m << "a thread of warp " << first / 32 << " waits at " << op_name(l.op) << " with mask 0x" << std::hex << l.mask << std::dec
              << " but lane " << j - first << " of that mask has exited";
            *error = m.str();
            return false;
        }
        if (o.state != State::AtWarp || o.mask != l.mask || o.op != l.op) return false;
    }
    uint64_t vote = 0;
    for (size_t j = first; j < end; j++) {
        if (((l.mask >> (j - first)) & 1u) && w.lanes[j]->value) vote |= 1ull << (j - first);
    }
    for (size_t j = first; j < end; j++) {
        if (!((l.mask >> (j - first)) & 1u)) continue;
        Lane& o = *w.lanes[j];
        const int lane = (int)(j - first), width = o.width, base = lane & ~(width - 1);
        int src = lane;
        switch (o.op) {
            case WarpOp::Shfl: src = base + (o.arg & (width - 1)); break;
            case WarpOp::ShflUp: src = (lane - base) >= o.arg ? lane - o.arg : lane; break;
            case WarpOp::ShflDown: src = (lane - base) + o.arg < width ? lane + o.arg : lane; break;
            case WarpOp::ShflXor: src = (lane ^ o.arg) < base + width ? lane ^ o.arg : lane; break;
            case WarpOp::Ballot: break;
        }
        if (o.op == WarpOp::Ballot) {
            o.result = vote;
        } else {
            const size_t from = first + (size_t)src;
            // A source outside the block or the mask is undefined on a GPU; the own value is one
            // of the values it may give.
            o.result = from < end && ((l.mask >> src) & 1u) ? w.lanes[from]->value : o.value;
        }
    }
    for (size_t j = first; j < end; j++)
        if ((l.mask >> (j - first)) & 1u) w.lanes[j]->state = State::Ready;
    return true;
}

// Runs one block to completion on this host thread's fibers; "" or the reason it cannot finish.
std::string run_block(Worker& w, uint64_t launch, uint3 block) {
    const dim3 bd = w.block_dim;
    const size_t count = (size_t)bd.x * bd.y * bd.z;
    while (w.lanes.size() < count) {
        w.lanes.push_back(std::make_unique<Lane>());
        make_fiber(w, w.lanes.size() - 1);
    }
    w.block = block;
    std::vector<size_t>& order = w.order;
    order.resize(count);
    for (size_t i = 0; i < count; i++) {
        Lane& l = *w.lanes[i];
        l.state = State::Ready;
        l.index = {(unsigned)(i % bd.x), (unsigned)((i / bd.x) % bd.y), (unsigned)(i / ((size_t)bd.x * bd.y))};
        order[i] = i;
    }
    const Settings& s = settings();
    uint64_t rng = mix64(s.seed ^ mix64(launch * 0x9E3779B97F4A7C15ull + block.x + ((uint64_t)block.y << 21) + ((uint64_t)block.z << 42)));
    for (;;) {
        if (s.order == Order::Reverse) {
            std::reverse(order.begin(), order.end());
        } else if (s.order == Order::Shuffle) {
            for (size_t i = count; i > 1; i--) {
                rng = rng * 6364136223846793005ull + 1442695040888963407ull;
                std::swap(order[i - 1], order[((rng >> 32) * i) >> 32]);
            }
        }
        for (size_t i : order) {
            Lane& l = *w.lanes[i];
            if (l.state != State::Ready) continue;
            w.current = &l;
            l.fiber = std::move(l.fiber).resume();
        }
        w.current = nullptr;
        size_t done = 0, at_barrier = 0, at_warp = 0;
        bool released = false;
        for (size_t first = 0; first < count; first += 32) {
            const size_t end = std::min(count, first + 32);
            for (size_t i = first; i < end; i++) {
                Lane& l = *w.lanes[i];
                switch (l.state) {
                    case State::Done: done++; break;
                    case State::AtBarrier: at_barrier++; break;
                    case State::Ready: break;
                    case State::AtWarp: {
                        std::string error;
                        if (resolve_warp(w, l, first, end, &error)) {
                            released = true;
                        } else if (!error.empty()) {
                            std::ostringstream m;
                            m << "block (" << block.x << "," << block.y << "," << block.z << "): " << error;
                            return m.str();
                        } else {
                            at_warp++;
                        }
                        break;
                    }
                }
            }
        }
        if (released) continue;
        if (done == count) return "";
        if (at_barrier == count) {
            for (size_t i = 0; i < count; i++) w.lanes[i]->state = State::Ready;
            continue;
        }
        std::vector<size_t> exited, waiting;
        for (size_t i = 0; i < count; i++) {
            if (w.lanes[i]->state == State::Done) exited.push_back(i);
            if (w.lanes[i]->state == State::AtBarrier) waiting.push_back(i);
        }
        std::ostringstream m;
        m << "block (" << block.x << "," << block.y << "," << block.z << ") cannot go on: ";
        if (!waiting.empty()) m << "threads " << describe_lanes(waiting) << " wait at __syncthreads";
        if (!exited.empty()) m << (waiting.empty() ? "" : ", ") << "threads " << describe_lanes(exited) << " have exited";
        if (at_warp) m << ", " << at_warp << " threads wait at a warp intrinsic their warp never completes";
        m << " (a barrier not every thread reaches)";
        return m.str();
    }
}

// Fibers left suspended mid-kernel by a failed block are unwound and made afresh.
void reset_lanes(Worker& w) {
    for (size_t i = 0; i < w.lanes.size(); i++) {
        Lane& l = *w.lanes[i];
        if (l.state != State::Done) {
            l.fiber = ctx::fiber();
            make_fiber(w, i);
        }
        l.state = State::Ready;
    }
}

struct Grid {
    const HostKernel* kernel;
    const ThreadBody* body;
    dim3 grid, block;
    std::string (*after_block)();
    uint64_t launch;
    uint64_t total;
    std::atomic<uint64_t> next{0};
    std::mutex m;
    std::condition_variable done_cv;
    uint64_t done = 0;
    GridOutcome outcome;
};

// The host threads that run blocks, shared by every stream.
class Pool {
   public:
    Pool() {
        for (unsigned i = 0; i < settings().threads; i++) std::thread([this] { serve(); }).detach();
    }

    GridOutcome run(const std::shared_ptr<Grid>& g) {
        {
            std::lock_guard<std::mutex> lock(m_);
            grids_.push_back(g);
        }
        cv_.notify_all();
        std::unique_lock<std::mutex> lock(g->m);
        g->done_cv.wait(lock, [&] { return g->done == g->total; });
        return g->outcome;
    }

   private:
    void serve() {
        for (;;) {
            // Shared: a worker may still be looking at a grid whose last block another one finished.
            std::shared_ptr<Grid> g;
            {
                std::unique_lock<std::mutex> lock(m_);
                cv_.wait(lock, [&] { return !grids_.empty(); });
                g = grids_.front();
            }
            run_blocks(*g);
        }
    }

    void run_blocks(Grid& g) {
        Worker& w = worker();
        w.kernel = g.kernel;
        w.body = g.body;
        w.block_dim = g.block;
        w.grid_dim = g.grid;
        for (;;) {
            const uint64_t b = g.next.fetch_add(1);
            if (b >= g.total) {
                std::lock_guard<std::mutex> lock(m_);
                if (!grids_.empty() && grids_.front().get() == &g) grids_.pop_front();
                return;
            }
            bool failed;
            {
                std::lock_guard<std::mutex> lock(g.m);
                failed = !g.outcome.error.empty() || !g.outcome.fault.empty();
            }
            std::string error, fault;
            if (!failed) {
                const uint3 block{(unsigned)(b % g.grid.x), (unsigned)((b / g.grid.x) % g.grid.y), (unsigned)(b / ((uint64_t)g.grid.x * g.grid.y))};
                error = run_block(w, g.launch, block);
                if (!error.empty()) reset_lanes(w);
                fault = g.after_block();
            }
            std::lock_guard<std::mutex> lock(g.m);
            if (!error.empty() && g.outcome.error.empty()) g.outcome.error = error;
            if (!fault.empty() && g.outcome.fault.empty()) g.outcome.fault = fault;
            if (++g.done == g.total) g.done_cv.notify_all();
        }
    }

    std::mutex m_;
    std::condition_variable cv_;
    std::deque<std::shared_ptr<Grid>> grids_;
};

std::atomic<uint64_t> launches{0};

}  // namespace

void register_kernel(const char* name, Binder bind) { registry()[name] = HostKernel{name, bind}; }

const HostKernel* find_kernel(const std::string& name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

GridOutcome run_grid(const HostKernel& kernel, const ThreadBody& body, dim3 grid, dim3 block, std::string (*after_block)()) {
    static Pool* pool = new Pool();
    auto g = std::make_shared<Grid>();
    g->kernel = &kernel;
    g->body = &body;
    g->grid = grid;
    g->block = block;
    g->after_block = after_block;
    g->launch = launches.fetch_add(1);
    g->total = (uint64_t)grid.x * grid.y * grid.z;
    return pool->run(g);
}

const uint3& thread_index() { return current_lane().index; }
const uint3& block_index() { return worker().block; }
const dim3& block_dim() { return worker().block_dim; }
const dim3& grid_dim() { return worker().grid_dim; }

void sync_threads() {
    Lane& l = current_lane();
    l.state = State::AtBarrier;
    suspend(l);
}

uint64_t warp_meet(WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
    Lane& l = current_lane();
    l.state = State::AtWarp;
    l.op = op;
    l.mask = mask;
    l.value = value;
    l.arg = arg;
    l.width = width;
    suspend(l);
    return l.result;
}

const char* running_kernel() {
    Worker* w = this_worker;
    return w && w->current ? w->kernel->name : nullptr;
}

}  // namespace pfc_emu
