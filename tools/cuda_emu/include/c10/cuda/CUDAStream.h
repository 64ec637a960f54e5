// tools/cuda_emu: the current stream of an emulated device (launches are synchronous; there is one).
#pragma once
#include <cuda_runtime.h>

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(signed char device = -1) {
  (void)device;
  return {};
}
}  // namespace c10::cuda
