// The CUDA runtime of tools/cuda_emu: csrc's kernels run on the CPU, each CUDA thread a fiber.
//
// One block runs at a time. Its threads are fibers (ucontext) on the calling thread: a fiber runs until it
// reaches __syncthreads, a warp shuffle or its end, then the next fiber runs. So `__shared__` is a static
// (one block's shared memory, filled with 0xff bytes before each block), a barrier waits for every thread
// of the block that has not exited, and a shuffle waits for the 32 lanes of its warp. What the emulator refuses with an error (the launch fails
// with cudaErrorLaunchFailure and says why): a barrier reached from two different places in one phase, a
// shuffle with a lane that exited or does not exist, a partial shuffle mask, a deadlock, a launch
// configuration a GPU rejects. MMK_EMU_SCHEDULE=reverse runs the fibers in the opposite order, so a
// missing barrier shows as a different result. Everything here is for tests; nothing is fast.
#pragma once

#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

// The linker's bounds of the section holding every `__shared__` variable (mmk_cuda_emu_device.h); null where
// no kernel declares one.
extern "C" char __start_mmk_cuda_emu_shared[] __attribute__((weak));
extern "C" char __stop_mmk_cuda_emu_shared[] __attribute__((weak));

namespace mmk_emu {

// The multiprocessor count the launchers size their grids from: an H100 / H200 SXM's 132, or
// MMK_EMU_SM_COUNT (a small count makes grid-stride loops and few key splits cheap to reach).
inline int sm_count() {
  const char* v = std::getenv("MMK_EMU_SM_COUNT");
  const int n = v != nullptr ? std::atoi(v) : 0;
  return n > 0 ? n : 132;
}
constexpr size_t kStackBytes = 256 * 1024;

enum class Wait { none, block, warp };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 idx;
  int linear = 0;
  bool done = false;
  Wait wait = Wait::none;
};

struct Warp {
  uint64_t slots[2][32];
  int arrived = 0;
  unsigned gen = 0;
  const char* site = nullptr;
};

struct State {
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t sched;
  Fiber* cur = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  int live = 0;
  int arrived = 0;
  unsigned gen = 0;
  const char* site = nullptr;
  int site_line = 0;
  uint64_t progress = 0;  // barriers and shuffles passed, fibers started: a round without any is a deadlock
  std::string error;
  bool running = false;
};

inline State& state() {
  static State s;
  return s;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline std::string& last_message() {
  static std::string m;
  return m;
}

// Ends the current fiber's part in the launch: the scheduler stops the launch and reports `what`.
inline void fail(const std::string& what) {
  State& s = state();
  if (s.error.empty()) {
    s.error = what + " (block (" + std::to_string(s.block_idx.x) + "," + std::to_string(s.block_idx.y) + "," +
              std::to_string(s.block_idx.z) + "), thread " + std::to_string(s.cur ? s.cur->linear : -1) + ")";
  }
  if (s.cur != nullptr) swapcontext(&s.cur->ctx, &s.sched);
  std::abort();  // never resumed
}

inline void yield() { swapcontext(&state().cur->ctx, &state().sched); }

inline void release_block_if_complete() {
  State& s = state();
  if (s.arrived > 0 && s.arrived == s.live) {
    s.arrived = 0;
    s.site = nullptr;
    ++s.gen;
  }
}

inline void sync_block(const char* file, int line) {
  State& s = state();
  if (s.arrived > 0 && (s.site_line != line || std::strcmp(s.site, file) != 0)) {
    fail(std::string("__syncthreads reached at ") + file + ":" + std::to_string(line) + " while others wait at " +
         s.site + ":" + std::to_string(s.site_line));
  }
  s.site = file;
  s.site_line = line;
  const unsigned g = s.gen;
  ++s.arrived;
  s.cur->wait = Wait::block;
  release_block_if_complete();
  while (s.gen == g) yield();
  s.cur->wait = Wait::none;
  ++s.progress;
}

// All 32 lanes of the caller's warp exchange `bits`; returns lane `src`'s.
inline uint64_t exchange(unsigned mask, uint64_t bits, int src, const char* what) {
  State& s = state();
  if (mask != 0xffffffffu) fail(std::string(what) + ": only the full mask is emulated");
  const int threads = static_cast<int>(s.block.x * s.block.y * s.block.z);
  const int lane = s.cur->linear & 31, w = s.cur->linear >> 5;
  if ((w + 1) * 32 > threads) fail(std::string(what) + " with a full mask in a warp of fewer than 32 threads");
  for (int l = 0; l < 32; ++l) {
    if (s.fibers[w * 32 + l].done) fail(std::string(what) + " with a full mask after lane " + std::to_string(l) + " exited");
  }
  Warp& warp = s.warps[w];
  if (warp.arrived > 0 && std::strcmp(warp.site, what) != 0) fail(std::string(what) + " met another shuffle kind in the same warp");
  warp.site = what;
  const unsigned g = warp.gen;
  warp.slots[g & 1][lane] = bits;
  ++warp.arrived;
  s.cur->wait = Wait::warp;
  if (warp.arrived == 32) {
    warp.arrived = 0;
    ++warp.gen;
  }
  while (warp.gen == g) yield();
  s.cur->wait = Wait::none;
  ++s.progress;
  return warp.slots[g & 1][src & 31];
}

template <typename T>
inline T shuffle(unsigned mask, T v, int src, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = exchange(mask, bits, src, what);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline void fiber_entry() {
  State& s = state();
  ++s.progress;
  s.body(s.body_arg);
  s.cur->done = true;
  --s.live;
  // A lane that exits while its warp waits at a shuffle leaves it hanging: the deadlock check reports it.
  release_block_if_complete();
  swapcontext(&s.cur->ctx, &s.sched);
  std::abort();
}

inline bool schedule_reversed() {
  const char* v = std::getenv("MMK_EMU_SCHEDULE");
  return v != nullptr && std::strcmp(v, "reverse") == 0;
}

inline std::string describe_deadlock() {
  State& s = state();
  int at_block = 0, at_warp = 0;
  for (const Fiber& f : s.fibers) {
    if (f.done) continue;
    at_block += f.wait == Wait::block;
    at_warp += f.wait == Wait::warp;
  }
  return "deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads, " + std::to_string(at_warp) +
         " at a warp shuffle, " + std::to_string(s.live) + " not exited";
}

inline bool run_block() {
  State& s = state();
  const int n = static_cast<int>(s.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.done = false;
    f.wait = Wait::none;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (Warp& w : s.warps) w = Warp{};
  if (__start_mmk_cuda_emu_shared != nullptr) {  // shared memory starts undefined: poisoned, not left over
    std::memset(__start_mmk_cuda_emu_shared, 0xff, __stop_mmk_cuda_emu_shared - __start_mmk_cuda_emu_shared);
  }
  s.live = n;
  s.arrived = 0;
  s.site = nullptr;
  const bool reversed = schedule_reversed();
  while (s.live > 0) {
    const uint64_t progress_before = s.progress;
    const int live_before = s.live;
    for (int k = 0; k < n; ++k) {
      Fiber& f = s.fibers[reversed ? n - 1 - k : k];
      if (f.done) continue;
      s.cur = &f;
      swapcontext(&s.sched, &f.ctx);
      s.cur = nullptr;
      if (!s.error.empty()) return false;
    }
    if (s.progress == progress_before && s.live == live_before) {
      s.error = describe_deadlock();
      return false;
    }
  }
  return true;
}

inline void set_error(cudaError_t e, const std::string& message) {
  last_error() = e;
  last_message() = message;
}

// kernel<<<grid, block, smem, stream>>>(args) becomes launch([&] { kernel(args); }, grid, block, smem, stream).
template <typename F>
void launch(F&& body, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
  (void)stream;
  State& s = state();
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 || smem > 48 * 1024) {
    set_error(cudaErrorInvalidConfiguration,
              "invalid configuration argument: grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                  std::to_string(grid.z) + "), block (" + std::to_string(block.x) + "," + std::to_string(block.y) +
                  "," + std::to_string(block.z) + "), " + std::to_string(smem) + " bytes of dynamic shared memory");
    return;
  }
  if (s.running) {
    set_error(cudaErrorLaunchFailure, "a launch from inside a kernel");
    return;
  }
  s.running = true;
  s.grid = grid;
  s.block = block;
  s.error.clear();
  s.fibers.resize(threads);
  s.warps.resize((threads + 31) / 32);
  int i = 0;
  for (unsigned z = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x, ++i) {
        Fiber& f = s.fibers[i];
        if (f.stack.size() != kStackBytes) f.stack.assign(kStackBytes, 0);
        f.idx = dim3(x, y, z);
        f.linear = i;
      }
  auto* fn = &body;
  s.body = [](void* arg) { (*static_cast<std::remove_reference_t<F>*>(arg))(); };
  s.body_arg = static_cast<void*>(fn);
  bool ok = true;
  for (unsigned z = 0; z < grid.z && ok; ++z)
    for (unsigned y = 0; y < grid.y && ok; ++y)
      for (unsigned x = 0; x < grid.x && ok; ++x) {
        s.block_idx = dim3(x, y, z);
        ok = run_block();
      }
  s.running = false;
  if (!ok) set_error(cudaErrorLaunchFailure, "unspecified launch failure: " + s.error);
}

}  // namespace mmk_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = mmk_emu::last_error();
  mmk_emu::last_error() = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  if (e == cudaErrorInvalidValue) return "invalid argument";
  return mmk_emu::last_message().c_str();
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  (void)device;
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = mmk_emu::sm_count();
  return cudaSuccess;
}
