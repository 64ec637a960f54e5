// Flash-decoding: T <= 16 new queries against a KV cache (split over the keys), plus an optional gated,
// separately normalised prompt segment (LLaMA-Adapter).
//
//   out[b,t,h] = softmax_j(q k_j s) V   (keys kv_start[b] <= j <= S - T + t)   +   g_h softmax_p(q pk_p s) PV
//
// Pass 1 (decode_split_kernel): one CTA per (b, kv head, key split, tile of query rows). The rows of a tile
// are the (t, h) pairs whose query head reads that kv head (GQA), so each K/V element is loaded once for all
// of them. The CTA's 4 warps take alternate tiles of 32 keys with an online softmax each (exp2 of scores
// prescaled by scale * log2 e), then merge their states through shared memory and write the split's
// normalised output and log2-sum-exp per row to fp32 workspaces. The prompt is one more split, unmasked.
// Pass 2 (decode_combine_kernel): one warp per (b, t, h) merges the main splits by their lse (a row that
// sees no key gets 0), adds g * the prompt split and writes the output in q's dtype.
//
// Scores: lane = key; the lane reads its K row with 128-bit loads when base pointers and strides allow
// (scalar loads otherwise) and dots it with the rows' queries from shared memory (broadcast reads).
// P @ V: a key row is read by D / DPL lanes with contiguous dims, so a warp reads 32 / (D / DPL) rows at once
// and the lane groups are summed once at the end. Keys outside [kv_start, S) are never loaded.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "mmk_device.cuh"
#include "mmkernels_kernels.h"

namespace mmk {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kKeysPerWarpTile = 32;  // lane = key in the score phase
constexpr int kMinChunk = kWarps * kKeysPerWarpTile;
constexpr int kMaxSplits = 64;
constexpr int kMaxRowsPerCta = 8;
constexpr float kLog2e = 1.4426950408889634f;

// N consecutive elements at p as floats, read as one vector when N > 1 (the caller guarantees alignment).
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = load_pack<T, N>(p);
#pragma unroll
  for (int e = 0; e < N; ++e) out[e] = to_float(pack.v[e]);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One key/value segment as the kernel reads it: element (b, j, kv head, d) of K is at
// k + b * sb + j * ss + head * sh + d (strides in elements; sb = 0 for a prompt shared by the batch).
struct Segment {
  const void* k;
  const void* v;
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
};

struct SplitParams {
  const void* q;
  int64_t q_sb, q_st, q_sh;
  Segment main;
  Segment prompt;
  const int32_t* kv_start;  // may be null
  float* o_ws;              // (splits [+1], B, T, H, D) fp32, normalised within the split
  float* lse_ws;            // (splits [+1], B, T, H) fp32, log2 units of the prescaled scores
  int T, H, H_kv, G, S, L_p;
  int num_splits;  // main splits; the prompt, when present, is split index num_splits
  int chunk;       // keys per main split
  float qk_scale;  // scale * log2(e)
};

// VEC: elements per global load of K/V (16 bytes, or 1 when alignment does not allow vectors).
template <typename T, int D, int RPW, int VEC>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const SplitParams p) {
  // P @ V layout: LPR lanes cover one key row, each with DPL contiguous dims; NG rows are read at once.
  constexpr int LPR = (D / VEC) < 32 ? (D / VEC) : 32;
  constexpr int DPL = D / LPR;
  constexpr int NG = 32 / LPR;
  static_assert(D % 32 == 0 && DPL % VEC == 0 && 32 % LPR == 0, "unsupported head dim / vector width");

  __shared__ float q_s[RPW][D];
  __shared__ float m_s[kWarps][RPW];
  __shared__ float l_s[kWarps][RPW];
  __shared__ float acc_s[kWarps][RPW][D];

  const int b = static_cast<int>(blockIdx.x) / p.H_kv;
  const int hkv = static_cast<int>(blockIdx.x) % p.H_kv;
  const int split = static_cast<int>(blockIdx.y);
  const bool is_prompt = split == p.num_splits;
  const int rows = p.G * p.T;  // row r <-> (t = r / G, h = hkv * G + r % G)
  const int row0 = static_cast<int>(blockIdx.z) * RPW;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;

  const T* q = static_cast<const T*>(p.q);
  for (int i = static_cast<int>(threadIdx.x); i < RPW * D; i += kThreads) {
    const int r = i / D, d = i % D, row = row0 + r;
    float val = 0.f;
    if (row < rows) {
      const int t = row / p.G, h = hkv * p.G + row % p.G;
      val = to_float(q[b * p.q_sb + t * p.q_st + h * p.q_sh + d]) * p.qk_scale;
    }
    q_s[r][d] = val;
  }

  // The last key each row sees (-1: none; padding rows past `rows` see nothing) and the CTA's key range.
  int hi[RPW];
  int max_hi = -1;
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = row0 + r;
    hi[r] = row >= rows ? -1 : is_prompt ? p.L_p - 1 : p.S - p.T + row / p.G;
    max_hi = max(max_hi, hi[r]);
  }
  const Segment& seg = is_prompt ? p.prompt : p.main;
  int k_begin = 0, k_end = p.L_p;
  if (!is_prompt) {
    // int64: split * chunk may pass S (an empty trailing split) and must not wrap.
    const int64_t chunk_begin = static_cast<int64_t>(split) * p.chunk;
    const int64_t chunk_end = chunk_begin + p.chunk < p.S ? chunk_begin + p.chunk : p.S;
    const int lo = p.kv_start != nullptr ? max(p.kv_start[b], 0) : 0;
    k_begin = chunk_begin > lo ? static_cast<int>(chunk_begin < p.S ? chunk_begin : p.S) : lo;
    k_end = static_cast<int>(chunk_end < max_hi + 1 ? chunk_end : max_hi + 1);
  }
  const T* k_base = static_cast<const T*>(seg.k) + b * seg.k_sb + hkv * seg.k_sh;
  const T* v_base = static_cast<const T*>(seg.v) + b * seg.v_sb + hkv * seg.v_sh;
  __syncthreads();  // q_s

  // Per-warp online softmax. m is warp-uniform; l is a per-lane partial sum (alpha is warp-uniform, so the
  // lanes' partials rescale consistently); acc holds this lane's DPL dims for the keys of its lane group.
  float m[RPW], l[RPW], acc[RPW][DPL];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[r][e] = 0.f;
  }
  const int group = lane / LPR;
  const int dim0 = (lane % LPR) * DPL;

  for (int base = k_begin + warp * kKeysPerWarpTile; base < k_end; base += kWarps * kKeysPerWarpTile) {
    const int key = base + lane;
    float s[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) s[r] = 0.f;
    if (key < k_end) {
      const T* kp = k_base + key * seg.k_ss;
#pragma unroll
      for (int c = 0; c < D; c += VEC) {
        float kv[VEC];
        load_floats<T, VEC>(kp + c, kv);
#pragma unroll
        for (int r = 0; r < RPW; ++r)
#pragma unroll
          for (int e = 0; e < VEC; ++e) s[r] = fmaf(q_s[r][c + e], kv[e], s[r]);
      }
    }
    float pr[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const float sr = (key < k_end && key <= hi[r]) ? s[r] : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(sr));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet: no inf - inf
      const float alpha = exp2f(m[r] - m_use);
      pr[r] = exp2f(sr - m_use);
      l[r] = l[r] * alpha + pr[r];
#pragma unroll
      for (int e = 0; e < DPL; ++e) acc[r][e] *= alpha;
      m[r] = m_new;
    }
    for (int j = 0; j < kKeysPerWarpTile; j += NG) {
      if (base + j >= k_end) break;  // warp-uniform
      const int src = j + group;
      float pj[RPW];
#pragma unroll
      for (int r = 0; r < RPW; ++r) pj[r] = __shfl_sync(0xffffffffu, pr[r], src);
      if (base + src < k_end) {
        const T* vp = v_base + (base + src) * seg.v_ss + dim0;
#pragma unroll
        for (int c = 0; c < DPL; c += VEC) {
          float vv[VEC];
          load_floats<T, VEC>(vp + c, vv);
#pragma unroll
          for (int r = 0; r < RPW; ++r)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[r][c + e] = fmaf(pj[r], vv[e], acc[r][c + e]);
        }
      }
    }
  }

  // Sum the lane groups and the lanes' partial l; then merge the warps.
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    l[r] = warp_sum(l[r]);
#pragma unroll
    for (int offset = LPR; offset < 32; offset <<= 1)
#pragma unroll
      for (int e = 0; e < DPL; ++e) acc[r][e] += __shfl_xor_sync(0xffffffffu, acc[r][e], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      m_s[warp][r] = m[r];
      l_s[warp][r] = l[r];
    }
  }
  if (lane < LPR) {
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
      for (int e = 0; e < DPL; ++e) acc_s[warp][r][dim0 + e] = acc[r][e];
  }
  __syncthreads();

  const int64_t bth_per_split = static_cast<int64_t>(gridDim.x / p.H_kv) * p.T * p.H;
  for (int i = static_cast<int>(threadIdx.x); i < RPW * D; i += kThreads) {
    const int r = i / D, d = i % D, row = row0 + r;
    if (row >= rows) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w][r]);
    float o = 0.f, lse = -INFINITY;
    if (mx != -INFINITY) {
      float den = 0.f, num = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float a = exp2f(m_s[w][r] - mx);  // 0 for a warp that saw nothing
        den += a * l_s[w][r];
        num += a * acc_s[w][r][d];
      }
      o = num / den;  // den >= 1: the warp holding the max contributes exp2(0) * l >= 1
      lse = mx + log2f(den);
    }
    const int t = row / p.G, h = hkv * p.G + row % p.G;
    const int64_t out_row = split * bth_per_split + (static_cast<int64_t>(b) * p.T + t) * p.H + h;
    p.o_ws[out_row * D + d] = o;
    if (d == 0) p.lse_ws[out_row] = lse;
  }
}

// One warp per output row (b, t, h).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    decode_combine_kernel(const float* __restrict__ o_ws, const float* __restrict__ lse_ws,
                          const float* __restrict__ gate, T* __restrict__ out, int64_t n_rows, int H,
                          int num_splits, bool has_prompt, int gate_size, bool gate_tanh) {
  constexpr int DPL = D / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n_rows) return;  // warp-uniform
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int dim0 = lane * DPL;

  float mx = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) mx = fmaxf(mx, lse_ws[s * n_rows + row]);
  mx = warp_max(mx);
  float acc[DPL];
#pragma unroll
  for (int e = 0; e < DPL; ++e) acc[e] = 0.f;
  if (mx != -INFINITY) {  // otherwise the row sees no key: the main term is 0
    float den = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float w = exp2f(lse_ws[s * n_rows + row] - mx);  // 0 for an empty split
      den += w;
      float o[DPL];
      load_floats<float, DPL>(o_ws + (s * n_rows + row) * D + dim0, o);
#pragma unroll
      for (int e = 0; e < DPL; ++e) acc[e] = fmaf(w, o[e], acc[e]);
    }
    const float inv = 1.f / den;
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[e] *= inv;
  }
  if (has_prompt) {
    const int h = static_cast<int>(row % H);
    float g = gate[gate_size == 1 ? 0 : h];
    if (gate_tanh) g = tanhf(g);
    float o[DPL];
    load_floats<float, DPL>(o_ws + (num_splits * n_rows + row) * D + dim0, o);
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[e] = fmaf(g, o[e], acc[e]);
  }
  Pack<T, DPL> pack;
#pragma unroll
  for (int e = 0; e < DPL; ++e) pack.v[e] = from_float<T>(acc[e]);
  store_pack<T, DPL>(out + row * D + dim0, pack);
}

int rows_per_cta(int rows) {
  int rpw = 1;
  while (rpw < rows && rpw < kMaxRowsPerCta) rpw <<= 1;
  return rpw;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Keys per main split: a multiple of the warp tile, at least one.
int split_chunk(int S, int num_splits) {
  const int64_t per = std::max<int64_t>(1, ceil_div(S, num_splits));
  return static_cast<int>(ceil_div(per, kKeysPerWarpTile) * kKeysPerWarpTile);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

template <typename F>
cudaError_t with_rows(int rpw, F&& f) {
  switch (rpw) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename F>
cudaError_t with_head_dim(int D, F&& f) {
  switch (D) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename F>
cudaError_t with_type(Dtype dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool decode_attention_supports_head_dim(int D) { return D == 64 || D == 128; }

int decode_attention_splits(int B, int T, int H, int H_kv, int S, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
  const int rows = (H / std::max(H_kv, 1)) * T;
  const int64_t ctas = static_cast<int64_t>(B) * H_kv * ceil_div(rows, rows_per_cta(rows));
  // About 4 CTAs per SM (two waves at the occupancy these kernels reach), with chunks of >= kMinChunk keys.
  const int64_t want = ceil_div(4LL * sms, std::max<int64_t>(ctas, 1));
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, ceil_div(S, kMinChunk)));
  const int splits = static_cast<int>(std::max<int64_t>(1, std::min(want, most)));
  return static_cast<int>(std::max<int64_t>(1, ceil_div(S, split_chunk(S, splits))));
}

cudaError_t decode_attention(Dtype dtype, const DecodeAttentionArgs& a, cudaStream_t stream) {
  const int64_t n_rows = static_cast<int64_t>(a.B) * a.T * a.H;
  if (n_rows == 0) return cudaSuccess;
  if (a.H_kv <= 0 || a.H % a.H_kv != 0 || a.num_splits < 1 || a.num_splits > 65535 - 1) return cudaErrorInvalidValue;
  const bool has_prompt = a.pk != nullptr;
  return with_type(dtype, [&](auto t_tag) -> cudaError_t {
    using T = decltype(t_tag);
    return with_head_dim(a.D, [&](auto d_c) -> cudaError_t {
      constexpr int D = decltype(d_c)::value;
      constexpr int kVec = 16 / sizeof(T);
      SplitParams p;
      p.q = a.q;
      p.q_sb = a.q_strides[0];
      p.q_st = a.q_strides[1];
      p.q_sh = a.q_strides[2];
      p.main = {a.k, a.v, a.k_strides[0], a.k_strides[1], a.k_strides[2],
                a.v_strides[0], a.v_strides[1], a.v_strides[2]};
      p.prompt = {a.pk, a.pv, a.pk_strides[0], a.pk_strides[1], a.pk_strides[2],
                  a.pv_strides[0], a.pv_strides[1], a.pv_strides[2]};
      p.kv_start = a.kv_start;
      p.o_ws = a.o_workspace;
      p.lse_ws = a.lse_workspace;
      p.T = a.T;
      p.H = a.H;
      p.H_kv = a.H_kv;
      p.G = a.H / a.H_kv;
      p.S = a.S;
      p.L_p = has_prompt ? a.L_p : 0;
      p.num_splits = a.num_splits;
      p.chunk = split_chunk(a.S, a.num_splits);
      p.qk_scale = a.scale * kLog2e;

      // 128-bit loads need every K/V row start 16-byte aligned: the base pointers and all strides.
      auto seg_aligned = [&](const Segment& s) {
        const int64_t strides[6] = {s.k_sb, s.k_ss, s.k_sh, s.v_sb, s.v_ss, s.v_sh};
        bool ok = aligned16(s.k) && aligned16(s.v);
        for (int64_t st : strides) ok = ok && (st * static_cast<int64_t>(sizeof(T))) % 16 == 0;
        return ok;
      };
      const bool vec = seg_aligned(p.main) && (!has_prompt || seg_aligned(p.prompt));

      const int rows = p.G * a.T;
      const int rpw = rows_per_cta(rows);
      const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(a.B) * a.H_kv),
                      static_cast<unsigned>(a.num_splits + (has_prompt ? 1 : 0)),
                      static_cast<unsigned>(ceil_div(rows, rpw)));
      const cudaError_t err = with_rows(rpw, [&](auto r_c) -> cudaError_t {
        constexpr int R = decltype(r_c)::value;
        if (vec) {
          decode_split_kernel<T, D, R, kVec><<<grid, kThreads, 0, stream>>>(p);
        } else {
          decode_split_kernel<T, D, R, 1><<<grid, kThreads, 0, stream>>>(p);
        }
        return cudaGetLastError();
      });
      if (err != cudaSuccess) return err;
      decode_combine_kernel<T, D><<<static_cast<unsigned>(ceil_div(n_rows, kWarps)), kThreads, 0, stream>>>(
          a.o_workspace, a.lse_workspace, a.gate, static_cast<T*>(a.out), n_rows, a.H, a.num_splits, has_prompt,
          a.gate_size, a.gate_tanh);
      return cudaGetLastError();
    });
  });
}

}  // namespace mmk
