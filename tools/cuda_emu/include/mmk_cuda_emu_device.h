// Device-side CUDA of tools/cuda_emu: qualifiers, built-in indices, barriers, shuffles, 16-bit float types
// and the math intrinsics csrc uses, on the CPU (see mmk_cuda_emu.h). Rounding: __float2half_rn and
// __float2bfloat16_rn round to nearest even as on a GPU; the *_rn intrinsics are IEEE float operations.
// The math library (exp2f, rsqrtf, tanhf) is the host's, within a few ulp of the GPU's.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "mmk_cuda_emu.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a static is that block's shared memory. All of them live in one section, which
// the launcher fills with 0xff bytes before each block (NaN as a float, -1 as an integer): a kernel that reads
// shared memory its block did not write sees that, not a value left by an earlier block.
#define __shared__ static __attribute__((section("mmk_cuda_emu_shared")))

#define threadIdx (::mmk_emu::state().cur->idx)
#define blockIdx (::mmk_emu::state().block_idx)
#define blockDim (::mmk_emu::state().block)
#define gridDim (::mmk_emu::state().grid)
#define __syncthreads() ::mmk_emu::sync_block(__FILE__, __LINE__)

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = ::mmk_emu::state().cur->linear & 31;
  const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return ::mmk_emu::shuffle(mask, v, src, "__shfl_sync");
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::mmk_emu::state().cur->linear & 31;
  int src = lane ^ lane_mask;
  if (src >= ((lane & ~(width - 1)) + width)) src = lane;  // outside the segment: the lane's own value
  return ::mmk_emu::shuffle(mask, v, src, "__shfl_xor_sync");
}

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // IEEE conversion: round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if (std::isnan(v)) {
    b.bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // stays a quiet NaN
  } else {
    b.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return b;
}

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
