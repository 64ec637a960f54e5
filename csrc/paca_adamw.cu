// Fused AdamW step of a PaCA delta and the rewrite of its weight columns, in one pass.
//
// For each element (o, j) of the (d_out, r) delta: decoupled weight decay, the two moment updates, the
// bias-corrected step (torch.optim.AdamW's order of operations), then W[o, idx[j]] = orig + s * delta
// rounded once to W's dtype. delta, grad and the states are read and written once, coalesced along the
// flattened (d_out * r) index, 4 elements per thread when the sizes and pointers allow 128-bit accesses.
//
// Every multiply, add, divide and square root is an explicit round-to-nearest intrinsic, so nvcc cannot
// contract them into fmas; the fmas that remain are the ones torch's own kernels evaluate (lerp, addcmul).
// The scalar coefficients are formed on the host in double and rounded once to fp32, as torch does.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mmk_device.cuh"
#include "mmkernels_kernels.h"

namespace mmk {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;

struct AdamWCoeffs {
  float decay;            // 1 - lr * weight_decay
  float lerp_coeff;       // w = 1 - beta1 when w < 0.5 (lerp from exp_avg), else w - 1 (lerp from grad)
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;         // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;    // -lr / (1 - beta1^step)
  float scaling;
  bool lerp_small;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    paca_adamw_sync_kernel(T* __restrict__ weight, int64_t w_stride_row, int64_t w_stride_col,
                           const T* __restrict__ orig, const int64_t* __restrict__ idx, float* __restrict__ delta,
                           const float* __restrict__ grad, float* __restrict__ exp_avg,
                           float* __restrict__ exp_avg_sq, int64_t numel, int64_t r, AdamWCoeffs c) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; base < numel;
       base += stride) {
    Pack<float, VEC> p = load_pack<float, VEC>(delta + base);
    const Pack<float, VEC> g = load_pack<float, VEC>(grad + base);
    Pack<float, VEC> m = load_pack<float, VEC>(exp_avg + base);
    Pack<float, VEC> v = load_pack<float, VEC>(exp_avg_sq + base);
    const Pack<T, VEC> o = load_pack<T, VEC>(orig + base);
    int64_t row = base / r;  // one division per pack; a pack may run over the end of a row
    int64_t col = base - row * r;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float d = __fmul_rn(p.v[k], c.decay);
      const float diff = __fsub_rn(g.v[k], m.v[k]);
      m.v[k] = __fmaf_rn(c.lerp_coeff, diff, c.lerp_small ? m.v[k] : g.v[k]);
      v.v[k] = __fmaf_rn(__fmul_rn(c.one_minus_beta2, g.v[k]), g.v[k], __fmul_rn(v.v[k], c.beta2));
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v.v[k]), c.bc2_sqrt), c.eps);
      d = __fadd_rn(d, __fdiv_rn(__fmul_rn(c.neg_step_size, m.v[k]), denom));
      p.v[k] = d;
      weight[row * w_stride_row + idx[col] * w_stride_col] =
          from_float<T>(__fadd_rn(to_float(o.v[k]), __fmul_rn(c.scaling, d)));
      if (++col == r) {
        col = 0;
        ++row;
      }
    }
    store_pack<float, VEC>(delta + base, p);
    store_pack<float, VEC>(exp_avg + base, m);
    store_pack<float, VEC>(exp_avg_sq + base, v);
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

float f32(double x) { return static_cast<float>(x); }

AdamWCoeffs coefficients(const PacaAdamWArgs& a) {
  // torch.optim.adam._single_tensor_adam: Python (double) scalars, each rounded to fp32 when applied;
  // the same libm calls as Python's float `**`, so the Triton launcher forms bit-identical coefficients.
  const double bias_correction1 = 1.0 - std::pow(a.beta1, a.step);
  const double bias_correction2 = 1.0 - std::pow(a.beta2, a.step);
  AdamWCoeffs c{};
  c.decay = f32(1.0 - a.lr * a.weight_decay);
  const float lerp_weight = f32(1.0 - a.beta1);
  c.lerp_small = std::fabs(lerp_weight) < 0.5f;
  c.lerp_coeff = c.lerp_small ? lerp_weight : lerp_weight - 1.0f;
  c.beta2 = f32(a.beta2);
  c.one_minus_beta2 = f32(1.0 - a.beta2);
  c.bc2_sqrt = f32(std::pow(bias_correction2, 0.5));  // Python's `bc2 ** 0.5` is C's pow, not sqrt
  c.eps = f32(a.eps);
  c.neg_step_size = f32(-(a.lr / bias_correction1));
  c.scaling = f32(a.scaling);
  return c;
}

template <typename T>
cudaError_t launch(const PacaAdamWArgs& a, const AdamWCoeffs& c, cudaStream_t stream) {
  const int64_t numel = a.d_out * a.r;
  const bool vec = numel % kVec == 0 && aligned(a.delta, 16) && aligned(a.grad, 16) && aligned(a.exp_avg, 16) &&
                   aligned(a.exp_avg_sq, 16) && aligned(a.orig_cols, sizeof(T) * kVec);
  auto run = [&](auto vec_c) -> cudaError_t {
    constexpr int V = decltype(vec_c)::value;
    const int64_t threads_needed = (numel + V - 1) / V;
    const int64_t blocks = std::min<int64_t>((threads_needed + kThreads - 1) / kThreads, int64_t{1} << 20);
    paca_adamw_sync_kernel<T, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<T*>(a.weight), a.w_stride_row, a.w_stride_col, static_cast<const T*>(a.orig_cols), a.idx,
        a.delta, a.grad, a.exp_avg, a.exp_avg_sq, numel, a.r, c);
    return cudaGetLastError();
  };
  return vec ? run(std::integral_constant<int, kVec>{}) : run(std::integral_constant<int, 1>{});
}

}  // namespace

cudaError_t paca_adamw_sync(Dtype wdtype, const PacaAdamWArgs& args, cudaStream_t stream) {
  if (args.d_out <= 0 || args.r <= 0) return cudaSuccess;
  const AdamWCoeffs c = coefficients(args);
  switch (wdtype) {
    case kFloat32: return launch<float>(args, c, stream);
    case kFloat16: return launch<__half>(args, c, stream);
    case kBFloat16: return launch<__nv_bfloat16>(args, c, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mmk
