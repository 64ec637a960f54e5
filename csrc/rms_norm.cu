// Fused RMSNorm forward (optional residual add) and backward with the weight gradient.
//
// A row is held in registers between the statistics pass and the output pass, so x (and residual) are
// read from memory once in the forward, and dy and h once in the backward. Loads are 128-bit vectors when
// the row length and the pointers allow it, scalar otherwise (odd row lengths). The weight gradient is
// accumulated per block in registers over a strided set of rows, written as one fp32 partial row per
// block, and summed over blocks by a second kernel: deterministic, no atomics.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "mmk_device.cuh"
#include "mmkernels_kernels.h"

namespace mmk {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMaxIters = 8;

// Sum over the block; every thread gets the result. Safe to call repeatedly (it syncs before returning).
__device__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  __shared__ float total;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) total = v;
  }
  __syncthreads();
  const float result = total;
  __syncthreads();
  return result;
}

template <typename T, typename W, int VEC, int ITERS>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual, const W* __restrict__ w,
                        T* __restrict__ y, T* __restrict__ h, float* __restrict__ rstd, int n, float eps) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  float vals[ITERS][VEC];
  float sumsq = 0.f;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
    if (col < n) {
      Pack<T, VEC> xp = load_pack<T, VEC>(x + base + col);
      if (residual != nullptr) {
        // Round the sum to T first: the statistics must see exactly the h that is returned.
        Pack<T, VEC> rp = load_pack<T, VEC>(residual + base + col);
#pragma unroll
        for (int k = 0; k < VEC; ++k) xp.v[k] = from_float<T>(to_float(xp.v[k]) + to_float(rp.v[k]));
        store_pack<T, VEC>(h + base + col, xp);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        vals[it][k] = to_float(xp.v[k]);
        sumsq += vals[it][k] * vals[it][k];
      }
    }
  }
  const float r = rsqrtf(block_sum(sumsq) / static_cast<float>(n) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
    if (col < n) {
      Pack<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = from_float<T>(vals[it][k] * r * to_float(w[col + k]));
      store_pack<T, VEC>(y + base + col, out);
    }
  }
}

template <typename T, typename W, int VEC, int ITERS>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ h, const W* __restrict__ w,
                        const float* __restrict__ rstd, const T* __restrict__ dh_extra, T* __restrict__ dh,
                        float* __restrict__ dw_partial, int64_t m, int n) {
  float dw_acc[ITERS][VEC];
  float g[ITERS][VEC];
  float xhat[ITERS][VEC];
#pragma unroll
  for (int it = 0; it < ITERS; ++it)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw_acc[it][k] = 0.f;

  for (int64_t row = blockIdx.x; row < m; row += gridDim.x) {
    const int64_t base = row * n;
    const float r = rstd[row];
    float dot = 0.f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
      if (col < n) {
        const Pack<T, VEC> dyp = load_pack<T, VEC>(dy + base + col);
        const Pack<T, VEC> hp = load_pack<T, VEC>(h + base + col);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = to_float(dyp.v[k]);
          xhat[it][k] = to_float(hp.v[k]) * r;
          g[it][k] = d * to_float(w[col + k]);
          dw_acc[it][k] += d * xhat[it][k];
          dot += g[it][k] * xhat[it][k];
        }
      }
    }
    const float c = block_sum(dot) / static_cast<float>(n);
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
      if (col < n) {
        Pack<T, VEC> extra;
        if (dh_extra != nullptr) extra = load_pack<T, VEC>(dh_extra + base + col);
        Pack<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float v = r * (g[it][k] - xhat[it][k] * c);
          if (dh_extra != nullptr) v += to_float(extra.v[k]);
          out.v[k] = from_float<T>(v);
        }
        store_pack<T, VEC>(dh + base + col, out);
      }
    }
  }
  float* partial = dw_partial + static_cast<int64_t>(blockIdx.x) * n;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
    if (col < n) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) partial[col + k] = dw_acc[it][k];
    }
  }
}

template <typename W>
__global__ void dw_reduce_kernel(const float* __restrict__ partial, W* __restrict__ dw, int blocks, int n) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float s = 0.f;
  for (int b = 0; b < blocks; ++b) s += partial[static_cast<int64_t>(b) * n + col];
  dw[col] = from_float<W>(s);
}

// Threads per row and iterations per thread for a row of n elements read VEC at a time.
struct Shape {
  int threads;
  int iters;
};

Shape row_shape(int n, int vec) {
  const int packs = (n + vec - 1) / vec;
  const int threads = std::min(kMaxThreads, ((packs + 31) / 32) * 32);
  int iters = (packs + threads - 1) / threads;
  int pow2 = 1;
  while (pow2 < iters) pow2 <<= 1;
  return {threads, pow2};
}

template <typename F>
bool with_iters(int iters, F&& f) {
  switch (iters) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

// Calls f(T{}, W{}) with the element types of (dtype, wdtype).
template <typename F>
cudaError_t with_types(Dtype dtype, Dtype wdtype, F&& f) {
  if (wdtype != dtype && wdtype != kFloat32) return cudaErrorInvalidValue;
  switch (dtype) {
    case kFloat32: return f(float{}, float{});
    case kFloat16: return wdtype == kFloat32 ? f(__half{}, float{}) : f(__half{}, __half{});
    case kBFloat16:
      return wdtype == kFloat32 ? f(__nv_bfloat16{}, float{}) : f(__nv_bfloat16{}, __nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool rms_norm_supports(Dtype dtype, int n) {
  const int elem = dtype == kFloat32 ? 4 : 2;
  const int vec = n % (16 / elem) == 0 ? 16 / elem : 1;
  return n > 0 && row_shape(n, vec).iters <= kMaxIters;
}

bool rms_norm_needs_vectors(int n) { return row_shape(n, 1).iters > kMaxIters; }

cudaError_t rms_norm_fwd(Dtype dtype, Dtype wdtype, const void* x, const void* residual, const void* w, void* y,
                         void* h, float* rstd, int64_t m, int n, float eps, cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  return with_types(dtype, wdtype, [&](auto t, auto wt) -> cudaError_t {
    using T = decltype(t);
    using W = decltype(wt);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = n % kVec == 0 && aligned16(x) && aligned16(residual) && aligned16(y) && aligned16(h);
    auto launch = [&](auto vec_c) -> cudaError_t {
      constexpr int V = decltype(vec_c)::value;
      const Shape s = row_shape(n, V);
      const bool ok = with_iters(s.iters, [&](auto iters_c) {
        constexpr int I = decltype(iters_c)::value;
        rms_norm_fwd_kernel<T, W, V, I><<<static_cast<unsigned>(m), s.threads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const W*>(w),
            static_cast<T*>(y), static_cast<T*>(h), rstd, n, eps);
      });
      return ok ? cudaGetLastError() : cudaErrorInvalidValue;
    };
    return vec ? launch(std::integral_constant<int, kVec>{}) : launch(std::integral_constant<int, 1>{});
  });
}

int rms_norm_bwd_blocks(int64_t m, int n, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
  const int threads = row_shape(n, 8).threads;
  const int per_sm = std::max(1, 2048 / threads);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(m, static_cast<int64_t>(sms) * per_sm)));
}

cudaError_t rms_norm_bwd(Dtype dtype, Dtype wdtype, const void* dy, const void* h, const void* w,
                         const float* rstd, const void* dh_extra, void* dh, float* dw_partial, void* dw,
                         int64_t m, int n, int blocks, cudaStream_t stream) {
  return with_types(dtype, wdtype, [&](auto t, auto wt) -> cudaError_t {
    using T = decltype(t);
    using W = decltype(wt);
    constexpr int kVec = 16 / sizeof(T);
    if (m > 0) {
      const bool vec = n % kVec == 0 && aligned16(dy) && aligned16(h) && aligned16(dh_extra) && aligned16(dh);
      auto launch = [&](auto vec_c) -> bool {
        constexpr int V = decltype(vec_c)::value;
        const Shape s = row_shape(n, V);
        return with_iters(s.iters, [&](auto iters_c) {
          constexpr int I = decltype(iters_c)::value;
          rms_norm_bwd_kernel<T, W, V, I><<<blocks, s.threads, 0, stream>>>(
              static_cast<const T*>(dy), static_cast<const T*>(h), static_cast<const W*>(w), rstd,
              static_cast<const T*>(dh_extra), static_cast<T*>(dh), dw_partial, m, n);
        });
      };
      const bool ok = vec ? launch(std::integral_constant<int, kVec>{}) : launch(std::integral_constant<int, 1>{});
      if (!ok) return cudaErrorInvalidValue;
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    } else {
      blocks = 0;  // no rows: dw is a sum over nothing
    }
    const int threads = 256;
    dw_reduce_kernel<W><<<(n + threads - 1) / threads, threads, 0, stream>>>(dw_partial, static_cast<W*>(dw),
                                                                               blocks, n);
    return cudaGetLastError();
  });
}

}  // namespace mmk
