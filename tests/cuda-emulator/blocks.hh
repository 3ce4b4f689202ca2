// The execution model the host-compiled kernels run in (blocks.cc): a grid's blocks spread over a
// pool of host threads, each block's CUDA threads as cooperative fibers (Boost.Context) that meet
// at every __syncthreads and warp intrinsic, and run in a varying order in between.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace pfc_emu {

struct uint3 {
    unsigned x, y, z;
};
using dim3 = uint3;

// One CUDA thread's run of a kernel whose arguments are bound already.
using ThreadBody = std::function<void()>;
// Binds a launch's `kernelParams` (copied now, as cuLaunchKernel does) into a ThreadBody.
using Binder = ThreadBody (*)(void** params);

struct HostKernel {
    const char* name;
    Binder bind;
};

// The host build of every kernels/*.cu entry point, filled by PFC_EMU_REGISTER at load time.
void register_kernel(const char* name, Binder bind);
const HostKernel* find_kernel(const std::string& name);

struct GridOutcome {
    // What stopped a block (a barrier some threads never reach, lanes missing at a warp
    // intrinsic), naming the block and threads; "" when none did.
    std::string error;
    // What `after_block` reported (an access outside the buffers); "" when nothing.
    std::string fault;
};

// Runs every block of the grid to completion. `after_block` runs on the host thread that ran a
// block, right after it, and returns "" or a fault found there; blocks after a failure are skipped.
GridOutcome run_grid(const HostKernel& kernel, const ThreadBody& body, dim3 grid, dim3 block, std::string (*after_block)());

// The running CUDA thread's coordinates, for threadIdx etc. in kernel.hh.
const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();

// __syncthreads: every thread of the block meets here.
void sync_threads();

enum class WarpOp { Shfl, ShflUp, ShflDown, ShflXor, Ballot };
// A warp intrinsic: the lanes of `mask` meet, then each gets its result (the source lane's value
// bits for shuffles, the lanes' votes for ballot).
uint64_t warp_meet(WarpOp op, unsigned mask, uint64_t value, int arg, int width);

// The kernel the calling host thread runs (NULL outside one), for fault reports.
const char* running_kernel();

}  // namespace pfc_emu
