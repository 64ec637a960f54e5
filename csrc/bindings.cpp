// The one binding file: registers the csrc kernels as torch ops in the namespace mmkernels_C.
// mmkernels/ops/*.py call them as the `cuda` backend of their op family.

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "mmkernels_kernels.h"

namespace {

mmk::Dtype to_mmk(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return mmk::kFloat32;
    case at::kHalf: return mmk::kFloat16;
    case at::kBFloat16: return mmk::kBFloat16;
    default: TORCH_CHECK(false, name, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 2, name, ": expected 2 dimensions (rows, cols), got ", t.dim());
  TORCH_CHECK(t.sizes() == like.sizes(), name, ": expected shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_weight(const at::Tensor& w, const at::Tensor& x) {
  TORCH_CHECK(w.is_cuda() && w.device() == x.device(), "weight: expected device ", x.device(), ", got ", w.device());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), "weight: expected shape (", x.size(1), "), got ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "weight: expected a contiguous tensor");
  TORCH_CHECK(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat,
              "weight: expected dtype ", x.scalar_type(), " or float32, got ", w.scalar_type());
}

void check_cols(const at::Tensor& x) {
  TORCH_CHECK(x.size(1) <= INT32_MAX && mmk::rms_norm_supports(to_mmk(x, "x"), static_cast<int>(x.size(1))),
              "x: row length ", x.size(1), " is not supported by the CUDA rms_norm kernel");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x,
                                                            const std::optional<at::Tensor>& residual,
                                                            const at::Tensor& weight, double eps) {
  check_rows(x, "x", x);
  check_weight(weight, x);
  check_cols(x);
  if (residual.has_value()) check_rows(*residual, "residual", x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto h = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  auto rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_launch(mmk::rms_norm_fwd(to_mmk(x, "x"), to_mmk(weight, "weight"), x.data_ptr(),
                                 residual.has_value() ? residual->data_ptr() : nullptr, weight.data_ptr(),
                                 y.data_ptr(), residual.has_value() ? h.data_ptr() : nullptr,
                                 rstd.data_ptr<float>(), x.size(0), static_cast<int>(x.size(1)),
                                 static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
               "rms_norm_fwd");
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& h, const at::Tensor& weight,
                                                const at::Tensor& rstd, const std::optional<at::Tensor>& dh_extra) {
  check_rows(h, "h", h);
  check_rows(dy, "dy", h);
  check_weight(weight, h);
  check_cols(h);
  TORCH_CHECK(rstd.is_cuda() && rstd.scalar_type() == at::kFloat && rstd.dim() == 1 && rstd.size(0) == h.size(0) &&
                  rstd.is_contiguous(),
              "rstd: expected a contiguous float32 CUDA tensor of shape (", h.size(0), "), got ", rstd.sizes(), " ",
              rstd.scalar_type());
  if (dh_extra.has_value()) check_rows(*dh_extra, "dh_extra", h);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t m = h.size(0);
  const int n = static_cast<int>(h.size(1));
  const int blocks = mmk::rms_norm_bwd_blocks(m, n, h.get_device());
  auto dh = at::empty_like(h);
  auto dw = at::empty_like(weight);
  auto partial = at::empty({blocks, n}, h.options().dtype(at::kFloat));
  check_launch(mmk::rms_norm_bwd(to_mmk(h, "h"), to_mmk(weight, "weight"), dy.data_ptr(), h.data_ptr(),
                                 weight.data_ptr(), rstd.data_ptr<float>(),
                                 dh_extra.has_value() ? dh_extra->data_ptr() : nullptr, dh.data_ptr(),
                                 partial.data_ptr<float>(), dw.data_ptr(), m, n, blocks,
                                 c10::cuda::getCurrentCUDAStream()),
               "rms_norm_bwd");
  return {dh, dw};
}

}  // namespace

TORCH_LIBRARY(mmkernels_C, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor h, Tensor weight, Tensor rstd, Tensor? dh_extra) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

// Importing mmkernels._C loads this library and with it the registrations above.
PYBIND11_MODULE(_C, m) { m.attr("kernels") = pybind11::make_tuple("rms_norm_fwd", "rms_norm_bwd"); }
