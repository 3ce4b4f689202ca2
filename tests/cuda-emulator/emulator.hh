// What the emulated driver (libcuda.so.1, driver.cc) offers the emulated cuBLAS and NCCL, which
// link against it: work on a stream's timeline, the current device, device-pointer checks,
// counters and error reports. Everything here is C++ inside one toolchain's build.
#pragma once
#include "abi.hh"
#include <functional>
#include <string>

namespace pfc_emu {

// Queues `work` on stream `s` (NULL and CU_STREAM_LEGACY name the current context's legacy
// stream): it runs after everything queued on `s` before, on the stream's worker thread, while the
// caller goes on. `what` names the operation in error reports. CUDA_ERROR_INVALID_HANDLE for a
// stream that does not exist, CUDA_ERROR_INVALID_CONTEXT without a current context, or the
// context's sticky error.
CUresult enqueue(CUstream s, const char* what, std::function<void()> work);

// The device ordinal of stream `s` (as in `enqueue`), or -1 when it is not a live stream.
int stream_device(CUstream s);

// The device of the calling thread's current context, or -1 when there is none.
int current_device();

// Whether [p, p + bytes) lies inside one live device allocation (of device `device`, or of any
// device when it is -1). When not, `why` says what is wrong (freed, out of bounds, not a device
// pointer) in words a test can print.
bool check_device_range(CUdeviceptr p, size_t bytes, int device, std::string* why);

// Counts one launch of `name` on `device` (kernels are counted by the driver; cuBLAS counts its
// GEMMs and NCCL its collectives here).
void count_launch(int device, const char* name);

// Reports a failure found while running queued work on `device` (an out-of-bounds access, a bad
// collective): printed to stderr with the operation's name, and made the context's sticky error,
// as a GPU fault is: every later call on that context returns `code`.
void fail(int device, CUresult code, const std::string& message);

}  // namespace pfc_emu
