// The one binding file: registers the csrc kernels as torch ops in the namespace mmkernels_C.
// mmkernels/ops/*.py call them as the `cuda` backend of their op family.

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
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

// Rows too long for the scalar path (rms_norm_needs_vectors) are read as 16-byte vectors, so an operand at a
// misaligned address (a contiguous view at an odd offset) is first copied to fresh, aligned memory.
at::Tensor aligned_rows(const at::Tensor& t, int64_t n) {
  const bool misaligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0;
  return misaligned && mmk::rms_norm_needs_vectors(static_cast<int>(n)) ? t.clone() : t;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x_in,
                                                            const std::optional<at::Tensor>& residual_in,
                                                            const at::Tensor& weight, double eps) {
  check_rows(x_in, "x", x_in);
  check_weight(weight, x_in);
  check_cols(x_in);
  if (residual_in.has_value()) check_rows(*residual_in, "residual", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned_rows(x_in, x_in.size(1));
  const std::optional<at::Tensor> residual =
      residual_in.has_value() ? std::optional<at::Tensor>(aligned_rows(*residual_in, x.size(1))) : std::nullopt;
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

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy_in, const at::Tensor& h_in,
                                                const at::Tensor& weight, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& dh_extra_in) {
  check_rows(h_in, "h", h_in);
  check_rows(dy_in, "dy", h_in);
  check_weight(weight, h_in);
  check_cols(h_in);
  TORCH_CHECK(rstd.is_cuda() && rstd.scalar_type() == at::kFloat && rstd.dim() == 1 &&
                  rstd.size(0) == h_in.size(0) && rstd.is_contiguous(),
              "rstd: expected a contiguous float32 CUDA tensor of shape (", h_in.size(0), "), got ", rstd.sizes(),
              " ", rstd.scalar_type());
  if (dh_extra_in.has_value()) check_rows(*dh_extra_in, "dh_extra", h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = aligned_rows(h_in, h_in.size(1));
  const at::Tensor dy = aligned_rows(dy_in, h_in.size(1));
  const std::optional<at::Tensor> dh_extra =
      dh_extra_in.has_value() ? std::optional<at::Tensor>(aligned_rows(*dh_extra_in, h_in.size(1))) : std::nullopt;
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

void check_decode_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), name, ": expected device ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, name, ": expected 4 dimensions, got ", t.dim());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), " (that of q), got ",
              t.scalar_type());
  TORCH_CHECK(t.stride(3) == 1, name, ": expected the last dim contiguous (stride 1), got stride ",
              t.stride(3));
}

void copy_strides(const at::Tensor& t, int64_t (&dst)[3], bool shared_batch = false) {
  dst[0] = shared_batch ? 0 : t.stride(0);
  dst[1] = t.stride(1);
  dst[2] = t.stride(2);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& prompt_k, const std::optional<at::Tensor>& prompt_v,
                            const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& kv_start,
                            double scale, bool gate_tanh) {
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == 4, "q: expected 4 dimensions (B, T, H, D), got ", q.dim());
  const mmk::Dtype dtype = to_mmk(q, "q");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(mmk::decode_attention_supports_head_dim(static_cast<int>(D)),
              "q: expected head dim 64 or 128 for the CUDA decode_attention kernel, got ", D);
  TORCH_CHECK(T >= 1 && T <= 16, "q: expected 1 to 16 new queries (dim 1), got T=", T);
  TORCH_CHECK(q.stride(3) == 1, "q: expected the last dim contiguous (stride 1), got stride ", q.stride(3));
  check_decode_operand(k, "k", q);
  const int64_t S = k.size(1), H_kv = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && H_kv >= 1 && H % H_kv == 0, "k: expected shape (", B, ", S, H_kv, ",
              D, ") with H_kv dividing H=", H, ", got ", k.sizes());
  TORCH_CHECK(S < (int64_t{1} << 30), "k: expected fewer than 2^30 keys, got S=", S);
  check_decode_operand(v, "v", q);
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(B * H_kv <= INT32_MAX && B * T * H <= INT32_MAX, "q: batch x heads too large, got shape ", q.sizes());

  const int given = prompt_k.has_value() + prompt_v.has_value() + gate.has_value();
  TORCH_CHECK(given == 0 || given == 3, "prompt_k, prompt_v, gate: expected all three or none, got ", given,
              " of them");
  const bool has_prompt = given == 3;
  int64_t L_p = 0, gate_size = 0;
  at::Tensor gate_f;
  if (has_prompt) {
    check_decode_operand(*prompt_k, "prompt_k", q);
    const int64_t BP = prompt_k->size(0);
    L_p = prompt_k->size(1);
    TORCH_CHECK((BP == 1 || BP == B) && L_p >= 1 && L_p <= 128 && prompt_k->size(2) == H_kv && prompt_k->size(3) == D,
                "prompt_k: expected shape (1 or ", B, ", L_p in 1..128, ", H_kv, ", ", D, "), got ", prompt_k->sizes());
    check_decode_operand(*prompt_v, "prompt_v", q);
    TORCH_CHECK(prompt_v->sizes() == prompt_k->sizes(), "prompt_v: expected the shape of prompt_k ",
                prompt_k->sizes(), ", got ", prompt_v->sizes());
    TORCH_CHECK(gate->is_cuda() && gate->device() == q.device(), "gate: expected device ", q.device(), ", got ",
                gate->device());
    TORCH_CHECK(gate->dim() == 1 && (gate->size(0) == H || gate->size(0) == 1), "gate: expected shape (", H,
                ") or (1), got ", gate->sizes());
    TORCH_CHECK(gate->scalar_type() == at::kFloat, "gate: expected dtype float32, got ", gate->scalar_type());
    gate_f = gate->contiguous();
    gate_size = gate_f.size(0);
  }
  at::Tensor starts;
  if (kv_start.has_value()) {
    TORCH_CHECK(kv_start->is_cuda() && kv_start->device() == q.device(), "kv_start: expected device ", q.device(),
                ", got ", kv_start->device());
    TORCH_CHECK(kv_start->scalar_type() == at::kInt, "kv_start: expected dtype int32, got ", kv_start->scalar_type());
    TORCH_CHECK(kv_start->dim() == 1 && kv_start->size(0) == B, "kv_start: expected shape (", B, "), got ",
                kv_start->sizes());
    starts = kv_start->contiguous();
  }
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale: expected a positive finite float, got ", scale);

  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({B, T, H, D}, q.options());
  if (out.numel() == 0) return out;
  const int splits = mmk::decode_attention_splits(static_cast<int>(B), static_cast<int>(T), static_cast<int>(H),
                                                  static_cast<int>(H_kv), static_cast<int>(S), q.get_device());
  const int64_t parts = splits + (has_prompt ? 1 : 0);
  auto o_ws = at::empty({parts, B * T * H, D}, q.options().dtype(at::kFloat));
  auto lse_ws = at::empty({parts, B * T * H}, q.options().dtype(at::kFloat));

  mmk::DecodeAttentionArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  copy_strides(q, a.q_strides);
  copy_strides(k, a.k_strides);
  copy_strides(v, a.v_strides);
  if (has_prompt) {
    a.pk = prompt_k->data_ptr();
    a.pv = prompt_v->data_ptr();
    a.gate = gate_f.data_ptr<float>();
    copy_strides(*prompt_k, a.pk_strides, prompt_k->size(0) == 1);
    copy_strides(*prompt_v, a.pv_strides, prompt_v->size(0) == 1);
  }
  a.kv_start = kv_start.has_value() ? starts.data_ptr<int32_t>() : nullptr;
  a.out = out.data_ptr();
  a.o_workspace = o_ws.data_ptr<float>();
  a.lse_workspace = lse_ws.data_ptr<float>();
  a.B = static_cast<int>(B);
  a.T = static_cast<int>(T);
  a.H = static_cast<int>(H);
  a.H_kv = static_cast<int>(H_kv);
  a.S = static_cast<int>(S);
  a.L_p = static_cast<int>(L_p);
  a.D = static_cast<int>(D);
  a.gate_size = static_cast<int>(gate_size);
  a.num_splits = splits;
  a.scale = static_cast<float>(scale);
  a.gate_tanh = gate_tanh;
  check_launch(mmk::decode_attention(dtype, a, c10::cuda::getCurrentCUDAStream()), "decode_attention");
  return out;
}

void check_paca_state(const at::Tensor& t, const char* name, const at::Tensor& weight, int64_t d_out, int64_t r) {
  TORCH_CHECK(t.is_cuda() && t.device() == weight.device(), name, ": expected device ", weight.device(),
              " (that of weight), got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == d_out && t.size(1) == r, name, ": expected shape (", d_out, ", ", r,
              "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void paca_adamw_sync(at::Tensor& weight, const at::Tensor& orig_cols, const at::Tensor& idx, double scaling,
                     at::Tensor& delta, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                     double step, double lr, double beta1, double beta2, double eps, double weight_decay) {
  TORCH_CHECK(weight.is_cuda(), "weight: expected a CUDA tensor, got device ", weight.device());
  TORCH_CHECK(weight.dim() == 2, "weight: expected 2 dimensions (d_out, d_in), got ", weight.dim());
  const mmk::Dtype wdtype = to_mmk(weight, "weight");
  const int64_t d_out = weight.size(0);
  TORCH_CHECK(idx.is_cuda() && idx.device() == weight.device(), "idx: expected device ", weight.device(),
              " (that of weight), got ", idx.device());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx: expected dtype int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1, "idx: expected 1 dimension (r), got ", idx.dim());
  TORCH_CHECK(idx.is_contiguous(), "idx: expected a contiguous tensor");
  const int64_t r = idx.size(0);
  TORCH_CHECK(r >= 1 && r <= weight.size(1), "idx: expected between 1 and ", weight.size(1),
              " (d_in) column indices, got ", r);
  TORCH_CHECK(orig_cols.is_cuda() && orig_cols.device() == weight.device(), "orig_cols: expected device ",
              weight.device(), " (that of weight), got ", orig_cols.device());
  TORCH_CHECK(orig_cols.scalar_type() == weight.scalar_type(), "orig_cols: expected dtype ", weight.scalar_type(),
              " (that of weight), got ", orig_cols.scalar_type());
  TORCH_CHECK(orig_cols.dim() == 2 && orig_cols.size(0) == d_out && orig_cols.size(1) == r,
              "orig_cols: expected shape (", d_out, ", ", r, "), got ", orig_cols.sizes());
  TORCH_CHECK(orig_cols.is_contiguous(), "orig_cols: expected a contiguous tensor");
  check_paca_state(delta, "delta", weight, d_out, r);
  check_paca_state(grad, "grad", weight, d_out, r);
  check_paca_state(exp_avg, "exp_avg", weight, d_out, r);
  check_paca_state(exp_avg_sq, "exp_avg_sq", weight, d_out, r);
  TORCH_CHECK(std::isfinite(step) && step >= 1, "step: expected a count >= 1 (this step included), got ", step);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, "beta1: expected a number in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, "beta2: expected a number in [0, 1), got ", beta2);
  TORCH_CHECK(lr >= 0 && eps >= 0 && weight_decay >= 0, "lr, eps, weight_decay: expected numbers >= 0, got ", lr,
              ", ", eps, ", ", weight_decay);
  const c10::cuda::CUDAGuard guard(weight.device());
  mmk::PacaAdamWArgs a{};
  a.weight = weight.data_ptr();
  a.w_stride_row = weight.stride(0);
  a.w_stride_col = weight.stride(1);
  a.orig_cols = orig_cols.data_ptr();
  a.idx = idx.data_ptr<int64_t>();
  a.delta = delta.data_ptr<float>();
  a.grad = grad.data_ptr<float>();
  a.exp_avg = exp_avg.data_ptr<float>();
  a.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  a.d_out = d_out;
  a.r = r;
  a.scaling = scaling;
  a.step = step;
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  check_launch(mmk::paca_adamw_sync(wdtype, a, c10::cuda::getCurrentCUDAStream()), "paca_adamw_sync");
}

}  // namespace

TORCH_LIBRARY(mmkernels_C, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor h, Tensor weight, Tensor rstd, Tensor? dh_extra) -> (Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? prompt_k, Tensor? prompt_v, Tensor? gate, "
        "Tensor? kv_start, float scale, bool gate_tanh) -> Tensor");
  m.def("paca_adamw_sync(Tensor(a!) weight, Tensor orig_cols, Tensor idx, float scaling, Tensor(b!) delta, "
        "Tensor grad, Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, float step, float lr, float beta1, float beta2, "
        "float eps, float weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("decode_attention", &decode_attention);
  m.impl("paca_adamw_sync", &paca_adamw_sync);
}

// Importing mmkernels._C loads this library and with it the registrations above.
PYBIND11_MODULE(_C, m) {
  m.attr("kernels") = pybind11::make_tuple("rms_norm_fwd", "rms_norm_bwd", "decode_attention", "paca_adamw_sync");
}
