// Launchers of the CUDA kernels in csrc/*.cu. Plain pointers and a stream: no torch headers, so the .cu
// files compile fast and can be compile-checked without torch.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace mmk {

enum Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Whether rows of n elements fit the RMSNorm kernels (a row lives in registers across its two passes:
// up to 8192 elements, or 8192 vectors of 16 bytes when n is a multiple of the vector width).
bool rms_norm_supports(Dtype dtype, int n);

// y = h * rstd * w with h = x (+ residual, rounded to x's dtype and written to h when residual != null).
// x, residual, y, h: (m, n) contiguous of `dtype`; w: (n,) of `wdtype` (== dtype or kFloat32); rstd: (m,).
cudaError_t rms_norm_fwd(Dtype dtype, Dtype wdtype, const void* x, const void* residual, const void* w, void* y,
                         void* h, float* rstd, int64_t m, int n, float eps, cudaStream_t stream);

// Number of blocks (= rows of the fp32 dw_partial workspace, each n long) the backward uses.
int rms_norm_bwd_blocks(int64_t m, int n, int device);

// dh = rstd * (g - xhat * mean(g * xhat)) (+ dh_extra), g = dy * w, xhat = h * rstd;
// dw = sum over rows of dy * xhat, reduced deterministically through dw_partial (blocks x n, fp32).
cudaError_t rms_norm_bwd(Dtype dtype, Dtype wdtype, const void* dy, const void* h, const void* w,
                         const float* rstd, const void* dh_extra, void* dh, float* dw_partial, void* dw,
                         int64_t m, int n, int blocks, cudaStream_t stream);

}  // namespace mmk
