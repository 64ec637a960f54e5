// tools/cuda_emu: an emulated device has nothing to switch to.
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) { (void)device; }
};
}  // namespace c10::cuda
