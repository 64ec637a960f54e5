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

// Whether rows of n elements need the vector path (more than 8192 elements): every operand row must then be
// 16-byte aligned, or the launchers return cudaErrorInvalidValue.
bool rms_norm_needs_vectors(int n);

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

// Decode attention (flash-decoding): q (B, T, H, D) against k, v (B, S, H_kv, D), causal bottom-right
// aligned (query t sees keys kv_start[b] <= j <= S - T + t; a row seeing none gets 0), plus, when pk != null,
// g_h * softmax(q pk^T scale) pv over a prompt (BP, L_p, H_kv, D) with g = tanh(gate) | gate.
// Strides in elements for dims (batch, seq/time, head); the last dim is contiguous. A prompt shared by the
// batch (BP = 1) has batch stride 0. Output: (B, T, H, D) contiguous of `dtype`.
struct DecodeAttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* pk;           // null: no prompt segment (pv and gate are then ignored)
  const void* pv;
  const float* gate;        // (gate_size,) fp32, gate_size 1 (all heads) or H
  const int32_t* kv_start;  // (B,) or null
  void* out;
  float* o_workspace;       // (num_splits + has_prompt) * B * T * H * D floats
  float* lse_workspace;     // (num_splits + has_prompt) * B * T * H floats
  int64_t q_strides[3];
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t pk_strides[3];
  int64_t pv_strides[3];
  int B, T, H, H_kv, S, L_p, D, gate_size;
  int num_splits;  // from decode_attention_splits
  float scale;
  bool gate_tanh;
};

// Head dims the decode kernel is compiled for (64, 128).
bool decode_attention_supports_head_dim(int D);

// Number of main key splits for this shape on `device` (sizes the workspaces): about 4 CTAs per SM,
// chunks of at least 128 keys, at most 64 splits.
int decode_attention_splits(int B, int T, int H, int H_kv, int S, int device);

cudaError_t decode_attention(Dtype dtype, const DecodeAttentionArgs& args, cudaStream_t stream);

// PaCA's fused optimizer step: for each (o, j) of the (d_out, r) delta, torch.optim.AdamW's update
// (decoupled weight decay, foreach=False order of operations; step = the count including this step) of
// delta, exp_avg and exp_avg_sq, then weight[o, idx[j]] = orig_cols[o, j] + scaling * delta[o, j] in fp32,
// rounded once to the weight's dtype. delta, grad, exp_avg, exp_avg_sq: (d_out, r) contiguous fp32;
// orig_cols: (d_out, r) contiguous of the weight's dtype; idx: (r,) int64, distinct; weight: any strides.
struct PacaAdamWArgs {
  void* weight;
  int64_t w_stride_row;
  int64_t w_stride_col;
  const void* orig_cols;
  const int64_t* idx;
  float* delta;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t d_out;
  int64_t r;
  double scaling;
  double step;
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
};

cudaError_t paca_adamw_sync(Dtype wdtype, const PacaAdamWArgs& args, cudaStream_t stream);

}  // namespace mmk
