// CUDA kernels of the six fused mixed-attention stages (issue 16). The contract, dtypes
// and shapes included, is manet_kernels/reference/stages.py; the schemas are in
// csrc/manet_kernels.cpp.
//
// A stage is a pass over the activation (the pass ops of csrc/cuda/mixed_attention.cu,
// called through the dispatcher at the CUDA key: their launchers are private to that
// file) plus ONE small kernel for the tiny work after it:
//   channel_attn      channel_pool pass + _ma_channel_mlp_kernel (MLP + sigmoid per sample)
//   spatial_attn      spatial_pool pass + _ma_spatial_conv_act_kernel (conv, BN eval, sigmoid)
//   spatial_norm      _ma_spatial_norm_kernel (one CTA: batch stats, normalise, sigmoid,
//                     running-stat update)
//   spatial_norm_bwd  _ma_spatial_norm_bwd_kernel (one CTA)
//   spatial_attn_bwd  _ma_spatial_attn_bwd_kernel (tap blocks + map blocks)
//   channel_attn_bwd  bwd_channel pass + _ma_channel_mlp_bwd_kernel (weight-tile blocks +
//                     per-sample blocks)
// Only at::empty allocates on the hot path; no host syncs (CUDA-graph capturable). Every
// reduction runs in a fixed order (no float atomics): results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../check.h"
#include "../mixed_attention_stage_checks.h"
#include "plan_common.h"

namespace manet_kernels {
namespace {

using plan_util::ceil_div;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The single-CTA BatchNorm kernels: one full block of 32 warps.
constexpr int kNormThreads = 1024;
// channel_attn_bwd: hidden units per weight-tile block (3*kTJ partial dots per sample);
// 4 for float64 keeps the block under 128 registers.
template <typename acc_t>
constexpr int kTJ = sizeof(acc_t) == 8 ? 4 : 8;

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// ---------------------------------------------------------------------------------------
// The pass kernels, called at the CUDA key (no autograd or other layers in between).

Tensor3 channel_pool_pass(const at::Tensor& x) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("manet_kernels::_mixed_attention_channel_pool", "")
                             .typed<Tensor3(const at::Tensor&)>();
  return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA), x);
}

Tensor3 spatial_pool_pass(const at::Tensor& x, const at::Tensor& mc) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("manet_kernels::_mixed_attention_spatial_pool", "")
                             .typed<Tensor3(const at::Tensor&, const at::Tensor&)>();
  return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA), x, mc);
}

at::Tensor bwd_channel_pass(const at::Tensor& x, const at::Tensor& da_s, const at::Tensor& dm_s,
                            const at::Tensor& ic) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("manet_kernels::_mixed_attention_bwd_channel", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&)>();
  return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA), x, da_s, dm_s, ic);
}

// ---------------------------------------------------------------------------------------
// Device helpers

template <typename T>
__device__ __forceinline__ T sigmoid(T v) {
  return T(1) / (T(1) + exp(-v));
}

// relu that keeps NaN, as torch.relu does
template <typename T>
__device__ __forceinline__ T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// Butterfly sum over a warp: every lane ends with the same value, in a fixed order.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over a block of NT threads, returned to every thread (warps summed in order 0..).
// `sh` holds NT/32 values; the leading barrier lets the block reuse `sh` right away.
template <int NT, typename T>
__device__ __forceinline__ T block_sum(T v, T* sh) {
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  T s = sh[0];
#pragma unroll
  for (int w = 1; w < NT / 32; ++w) s += sh[w];
  return s;
}

// M sums over a block of kThreads at once, into out[0..M) (shared; valid after return).
// sh holds kWarps*M values.
template <int M, typename T>
__device__ __forceinline__ void block_sum_n(T (&v)[M], T* sh, T* out) {
#pragma unroll
  for (int m = 0; m < M; ++m) v[m] = warp_sum(v[m]);
  __syncthreads();  // earlier readers of sh / out are done
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) sh[warp * M + m] = v[m];
  }
  __syncthreads();
  if (threadIdx.x < M) {
    T s = sh[threadIdx.x];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) s += sh[w * M + threadIdx.x];
    out[threadIdx.x] = s;
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------
// channel_attn: mc[n, c] = sigmoid(o_avg + o_mx), o_v = w2 @ relu(w1 @ v + b1) + b2.
// Block n = one sample. Dynamic smem: r_avg, r_mx (2 * Cr).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _ma_channel_mlp_kernel(const acc_t* __restrict__ avg, const acc_t* __restrict__ mx,
                           const acc_t* __restrict__ w1, const acc_t* __restrict__ b1,
                           const acc_t* __restrict__ w2, const acc_t* __restrict__ b2,
                           acc_t* __restrict__ mc, int64_t C, int64_t Cr) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* r = reinterpret_cast<acc_t*>(smem_raw);  // r[j] = r_avg, r[Cr + j] = r_mx
  const int64_t n = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const acc_t* av = avg + n * C;
  const acc_t* mv = mx + n * C;
  // hidden unit j: one warp, lanes along row j of w1 (w1 is (Cr, C), row-major: coalesced)
  for (int64_t j = warp; j < Cr; j += kWarps) {
    acc_t ha = acc_t(0), hm = acc_t(0);
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t w = w1[j * C + c];
      ha += w * av[c];
      hm += w * mv[c];
    }
    ha = warp_sum(ha);
    hm = warp_sum(hm);
    if (lane == 0) {
      const acc_t b = b1 != nullptr ? b1[j] : acc_t(0);
      r[j] = relu(ha + b);
      r[Cr + j] = relu(hm + b);
    }
  }
  __syncthreads();
  // output channel c: one warp, lanes along row c of w2 (w2 is (C, Cr), row-major)
  for (int64_t c = warp; c < C; c += kWarps) {
    acc_t oa = acc_t(0), om = acc_t(0);
    for (int64_t j = lane; j < Cr; j += 32) {
      const acc_t w = w2[c * Cr + j];
      oa += w * r[j];
      om += w * r[Cr + j];
    }
    oa = warp_sum(oa);
    om = warp_sum(om);
    if (lane == 0) {
      const acc_t b = b2 != nullptr ? b2[c] : acc_t(0);
      mc[n * C + c] = sigmoid((oa + b) + (om + b));
    }
  }
}

// ---------------------------------------------------------------------------------------
// spatial_attn: z = conv(cat[sa, sm]) (k x k, padding k//2, bias first then taps in
// (c, i, j) order, as the conv pass adds them), then, when ms != nullptr,
// ms = sigmoid(BN_eval(z)) (BN_eval the identity when bn_mean == nullptr).
// One thread per output element o = (n*H + y)*W + x, grid-stride.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    _ma_spatial_conv_act_kernel(const T* __restrict__ sa, const T* __restrict__ sm,
                                const T* __restrict__ w, const T* __restrict__ bias,
                                const T* __restrict__ bn_w, const T* __restrict__ bn_b,
                                const T* __restrict__ bn_mean, const T* __restrict__ bn_var, T eps,
                                T* __restrict__ z, T* __restrict__ ms, int64_t total, int64_t H,
                                int64_t W, int k) {
  const int r = k / 2;
  const int64_t HW = H * W;
  const T b = bias != nullptr ? bias[0] : T(0);
  T mean = T(0), rstd = T(1), gw = T(1), gb = T(0);
  if (bn_mean != nullptr) {
    mean = bn_mean[0];
    rstd = T(1) / sqrt(bn_var[0] + eps);
    if (bn_w != nullptr) gw = bn_w[0];
    if (bn_b != nullptr) gb = bn_b[0];
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += stride) {
    const int64_t n = o / HW;
    const int64_t p = o - n * HW;
    const int64_t y = p / W;
    const int64_t x = p - y * W;
    // taps (i, j) read in_c[n, y + i - r, x + j - r]: rows 0 <= y+i-r < H, cols 0 <= x+j-r < W
    const int i0 = static_cast<int>(y >= r ? 0 : r - y);
    const int i1 = static_cast<int>(H - y + r < k ? H - y + r : k);
    const int j0 = static_cast<int>(x >= r ? 0 : r - x);
    const int j1 = static_cast<int>(W - x + r < k ? W - x + r : k);
    T acc = b;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const T* __restrict__ f = (c == 0 ? sa : sm) + n * HW + x - r;
      const T* __restrict__ wc = w + c * k * k;
      for (int i = i0; i < i1; ++i) {
        const T* __restrict__ fr = f + (y + i - r) * W;
        for (int j = j0; j < j1; ++j) acc += __ldg(wc + i * k + j) * __ldg(fr + j);
      }
    }
    z[o] = acc;
    if (ms != nullptr) {
      T a = acc;
      if (bn_mean != nullptr) {
        a = (a - mean) * rstd;
        if (bn_w != nullptr) a = a * gw;
        if (bn_b != nullptr) a = a + gb;
      }
      ms[o] = sigmoid(a);
    }
  }
}

// ---------------------------------------------------------------------------------------
// spatial_norm: BatchNorm2d(1) in training mode + sigmoid over all `count` values of z,
// in ONE block (the maps are small: N*H*W ~ 1e5). Mean, then the biased variance as a
// second pass (no cancellation), then the map; thread 0 writes stats and updates the
// running statistics in their own dtype stat_t.
template <typename acc_t, typename stat_t>
__global__ void __launch_bounds__(kNormThreads)
    _ma_spatial_norm_kernel(const acc_t* __restrict__ z, const acc_t* __restrict__ bn_w,
                            const acc_t* __restrict__ bn_b, stat_t* __restrict__ run_mean,
                            stat_t* __restrict__ run_var, int64_t* __restrict__ nbt,
                            bool has_momentum, acc_t momentum, acc_t one_minus_momentum,
                            acc_t unbias, acc_t eps, acc_t* __restrict__ ms,
                            acc_t* __restrict__ stats, int64_t count) {
  __shared__ acc_t sh[kNormThreads / 32];
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(count);
  acc_t s = acc_t(0);
  for (int64_t o = threadIdx.x; o < count; o += kNormThreads) s += z[o];
  const acc_t mean = block_sum<kNormThreads>(s, sh) * inv_count;
  acc_t q = acc_t(0);
  for (int64_t o = threadIdx.x; o < count; o += kNormThreads) {
    const acc_t d = z[o] - mean;
    q += d * d;
  }
  const acc_t var = block_sum<kNormThreads>(q, sh) * inv_count;
  const acc_t rstd = acc_t(1) / sqrt(var + eps);
  const acc_t gw = bn_w != nullptr ? bn_w[0] : acc_t(1);
  const acc_t gb = bn_b != nullptr ? bn_b[0] : acc_t(0);
  for (int64_t o = threadIdx.x; o < count; o += kNormThreads) {
    acc_t a = (z[o] - mean) * rstd;
    if (bn_w != nullptr) a = a * gw;
    if (bn_b != nullptr) a = a + gb;
    ms[o] = sigmoid(a);
  }
  if (threadIdx.x == 0) {
    stats[0] = mean;
    stats[1] = var;
    // nn.BatchNorm2d: num_batches_tracked += 1 first; momentum None -> 1 / num_batches
    if (nbt != nullptr) nbt[0] += 1;
    if (run_mean != nullptr) {
      acc_t m = momentum, om = one_minus_momentum;
      if (!has_momentum) {
        m = acc_t(1) / static_cast<acc_t>(nbt[0]);
        om = acc_t(1) - m;
      }
      run_mean[0] = static_cast<stat_t>(om * static_cast<acc_t>(run_mean[0]) + m * mean);
      run_var[0] = static_cast<stat_t>(om * static_cast<acc_t>(run_var[0]) + m * (var * unbias));
    }
  }
}

// spatial_norm_bwd, one block: da = (dms + gms) * ms * (1 - ms), zh = (z - mean) * rstd,
// dzh = da * weight; dz = rstd * (dzh - mean(dzh) - zh * mean(dzh * zh)),
// dweight = sum(da * zh), dbias = sum(da).
template <typename acc_t>
__global__ void __launch_bounds__(kNormThreads)
    _ma_spatial_norm_bwd_kernel(const acc_t* __restrict__ dms, const acc_t* __restrict__ gms,
                                const acc_t* __restrict__ ms, const acc_t* __restrict__ z,
                                const acc_t* __restrict__ stats, const acc_t* __restrict__ bn_w,
                                acc_t eps, acc_t* __restrict__ dz, acc_t* __restrict__ dbw,
                                acc_t* __restrict__ dbb, int64_t count) {
  __shared__ acc_t sh[kNormThreads / 32];
  const acc_t mean = stats[0];
  const acc_t rstd = acc_t(1) / sqrt(stats[1] + eps);
  const acc_t gw = bn_w != nullptr ? bn_w[0] : acc_t(1);
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(count);
  acc_t s_da = acc_t(0), s_dazh = acc_t(0), s_dzh = acc_t(0), s_dzhzh = acc_t(0);
  for (int64_t o = threadIdx.x; o < count; o += kNormThreads) {
    const acc_t d = gms != nullptr ? dms[o] + gms[o] : dms[o];
    const acc_t m = ms[o];
    const acc_t da = d * m * (acc_t(1) - m);
    const acc_t zh = (z[o] - mean) * rstd;
    const acc_t dzh = bn_w != nullptr ? da * gw : da;
    s_da += da;
    s_dazh += da * zh;
    s_dzh += dzh;
    s_dzhzh += dzh * zh;
  }
  s_da = block_sum<kNormThreads>(s_da, sh);
  s_dazh = block_sum<kNormThreads>(s_dazh, sh);
  const acc_t mean_dzh = block_sum<kNormThreads>(s_dzh, sh) * inv_count;
  const acc_t mean_dzhzh = block_sum<kNormThreads>(s_dzhzh, sh) * inv_count;
  for (int64_t o = threadIdx.x; o < count; o += kNormThreads) {
    const acc_t d = gms != nullptr ? dms[o] + gms[o] : dms[o];
    const acc_t m = ms[o];
    const acc_t da = d * m * (acc_t(1) - m);
    const acc_t zh = (z[o] - mean) * rstd;
    const acc_t dzh = bn_w != nullptr ? da * gw : da;
    dz[o] = rstd * (dzh - mean_dzh - zh * mean_dzhzh);
  }
  if (threadIdx.x == 0) {
    if (dbw != nullptr) dbw[0] = s_dazh;
    if (dbb != nullptr) dbb[0] = s_da;
  }
}

// ---------------------------------------------------------------------------------------
// spatial_attn_bwd. dz at a position: d itself (ms == nullptr), or
// pre = (d + gms) * ms * (1 - ms) and dz = pre * scale (scale = [weight *] rstd with
// bn_mean, else 1). Blocks [0, taps) each reduce one tap over all P = N*H*W positions:
//   t <  2k^2             dconv_w[t] = sum_p dz[p] * in_c[p shifted by tap (i, j)]
//   t == t_cb             dconv_b    = sum_p dz[p]
//   t == t_bw             dbn_weight = sum_p pre[p] * (z[p] - mean) * rstd
//   t == t_bb             dbn_bias   = sum_p pre[p]
// and blocks [taps, grid) compute the map gradients (one thread per position, grid-stride):
//   d in_c[n, y, x] = sum_{i,j} w[c, i, j] * dz[n, y - i + r, x - j + r].
// Tap blocks come first: they are the long ones and start earliest.
template <typename T>
struct SpatialBwdArgs {
  const T* d = nullptr;
  const T* gms = nullptr;
  const T* ms = nullptr;
  const T* z = nullptr;
  const T* sa = nullptr;
  const T* sm = nullptr;
  const T* w = nullptr;
  const T* bn_w = nullptr;
  const T* bn_mean = nullptr;
  const T* bn_var = nullptr;
  T eps = T(0);
  T* dsa = nullptr;
  T* dsm = nullptr;
  T* dcw = nullptr;
  T* dcb = nullptr;
  T* dbw = nullptr;
  T* dbb = nullptr;
  int64_t P = 0, H = 0, W = 0;
  int k = 1;
  int taps = 0;  // tap blocks: 2k^2 + [conv bias] + [bn weight] + [bn bias]
  int t_cb = -1, t_bw = -1, t_bb = -1;
};

template <typename T>
__device__ __forceinline__ T spatial_dz(const SpatialBwdArgs<T>& a, int64_t p, T scale, T& pre) {
  if (a.ms == nullptr) {
    pre = a.d[p];
    return pre;
  }
  const T dms = a.gms != nullptr ? a.d[p] + a.gms[p] : a.d[p];
  const T m = a.ms[p];
  pre = dms * m * (T(1) - m);
  return a.bn_mean != nullptr ? pre * scale : pre;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) _ma_spatial_attn_bwd_kernel(const SpatialBwdArgs<T> a) {
  __shared__ T sh[kWarps];
  T mean = T(0), rstd = T(1), scale = T(1);
  if (a.ms != nullptr && a.bn_mean != nullptr) {
    mean = a.bn_mean[0];
    rstd = T(1) / sqrt(a.bn_var[0] + a.eps);
    scale = a.bn_w != nullptr ? a.bn_w[0] * rstd : rstd;
  }
  const int k = a.k;
  const int r = k / 2;
  const int64_t HW = a.H * a.W;
  const int kk2 = 2 * k * k;
  if (static_cast<int>(blockIdx.x) < a.taps) {
    const int t = blockIdx.x;
    T acc = T(0);
    T pre;
    if (t < kk2) {
      // tap (c, i, j): dz[n, y, x] * in_c[n, y + di, x + dj] with di = i - r, dj = j - r
      const int c = t / (k * k);
      const int q = t - c * k * k;
      const int64_t di = q / k - r;
      const int64_t dj = q % k - r;
      const T* __restrict__ f = c == 0 ? a.sa : a.sm;
      const int64_t shift = di * a.W + dj;
      for (int64_t p = threadIdx.x; p < a.P; p += kThreads) {
        const int64_t n = p / HW;
        const int64_t rem = p - n * HW;
        const int64_t y = rem / a.W;
        const int64_t x = rem - y * a.W;
        const int64_t iy = y + di;
        const int64_t ix = x + dj;
        if (iy >= 0 && iy < a.H && ix >= 0 && ix < a.W) {
          acc += spatial_dz(a, p, scale, pre) * f[p + shift];
        }
      }
    } else if (t == a.t_cb) {
      for (int64_t p = threadIdx.x; p < a.P; p += kThreads) acc += spatial_dz(a, p, scale, pre);
    } else if (t == a.t_bw) {
      for (int64_t p = threadIdx.x; p < a.P; p += kThreads) {
        spatial_dz(a, p, scale, pre);
        acc += pre * (a.z[p] - mean) * rstd;
      }
    } else {  // t == t_bb
      for (int64_t p = threadIdx.x; p < a.P; p += kThreads) {
        spatial_dz(a, p, scale, pre);
        acc += pre;
      }
    }
    acc = block_sum<kThreads>(acc, sh);
    if (threadIdx.x == 0) {
      if (t < kk2) {
        a.dcw[t] = acc;
      } else if (t == a.t_cb) {
        *a.dcb = acc;
      } else if (t == a.t_bw) {
        *a.dbw = acc;
      } else {
        *a.dbb = acc;
      }
    }
    return;
  }
  const T* __restrict__ wa = a.w;
  const T* __restrict__ wm = a.w + k * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x - a.taps) * kThreads;
  for (int64_t o = static_cast<int64_t>(blockIdx.x - a.taps) * kThreads + threadIdx.x; o < a.P;
       o += stride) {
    const int64_t n = o / HW;
    const int64_t p = o - n * HW;
    const int64_t y = p / a.W;
    const int64_t x = p - y * a.W;
    // taps (i, j) reach dz[n, y - i + r, x - j + r]: rows 0 <= y-i+r < H, cols 0 <= x-j+r < W
    const int i0 = static_cast<int>(y + r - a.H + 1 > 0 ? y + r - a.H + 1 : 0);
    const int i1 = static_cast<int>(y + r + 1 < k ? y + r + 1 : k);
    const int j0 = static_cast<int>(x + r - a.W + 1 > 0 ? x + r - a.W + 1 : 0);
    const int j1 = static_cast<int>(x + r + 1 < k ? x + r + 1 : k);
    const int64_t base = n * HW + x + r;  // + (y - i + r) * W - j: the dz position
    T da = T(0), dm = T(0);
    T pre;
    for (int i = i0; i < i1; ++i) {
      const int64_t row = base + (y - i + r) * a.W;
      for (int j = j0; j < j1; ++j) {
        const T g = spatial_dz(a, row - j, scale, pre);
        da += __ldg(wa + i * k + j) * g;
        dm += __ldg(wm + i * k + j) * g;
      }
    }
    a.dsa[o] = da;
    a.dsm[o] = dm;
  }
}

// ---------------------------------------------------------------------------------------
// channel_attn_bwd, the MLP part. With dl[n, c] = ((dmc + part) [+ gmc]) * mc * (1 - mc),
// h_v = w1 @ v + b1 (v = avg, mx), dr = dl @ w2 (Cr), dh_v = dr * [h_v > 0]:
//   d_avg = dh_avg @ w1, d_mx = dh_mx @ w1                       (per sample)
//   dw1[j, c] = sum_n dh_avg[n, j] avg[n, c] + dh_mx[n, j] mx[n, c]
//   db1[j] = sum_n dh_avg[n, j] + dh_mx[n, j]
//   dw2[c, j] = sum_n dl[n, c] (relu(h_avg) + relu(h_mx))[n, j],  db2[c] = 2 sum_n dl[n, c]
// Blocks [0, nJ*nCt): weight tiles (kTJ hidden units x kThreads channels), looping over
// the samples in order; each recomputes h and dr of its kTJ hidden units per sample
// (3*kTJ dot products of length C, a fixed-order block reduction). Blocks
// [nJ*nCt, +N): one sample each, for d_avg and d_mx.
template <typename acc_t>
struct MlpBwdArgs {
  const acc_t* dmc = nullptr;
  const acc_t* part = nullptr;
  const acc_t* gmc = nullptr;
  const acc_t* mc = nullptr;
  const acc_t* avg = nullptr;
  const acc_t* mx = nullptr;
  const acc_t* w1 = nullptr;
  const acc_t* b1 = nullptr;
  const acc_t* w2 = nullptr;
  acc_t* d_avg = nullptr;
  acc_t* d_mx = nullptr;
  acc_t* dw1 = nullptr;
  acc_t* db1 = nullptr;
  acc_t* dw2 = nullptr;
  acc_t* db2 = nullptr;
  int64_t N = 0, C = 0, Cr = 0;
  int64_t nJ = 1, nCt = 1;
};

template <typename acc_t>
__device__ __forceinline__ acc_t mlp_dl(const MlpBwdArgs<acc_t>& a, int64_t i) {
  acc_t g = a.dmc[i] + a.part[i];
  if (a.gmc != nullptr) g = g + a.gmc[i];
  const acc_t m = a.mc[i];
  return g * m * (acc_t(1) - m);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) _ma_channel_mlp_bwd_kernel(const MlpBwdArgs<acc_t> a) {
  extern __shared__ unsigned char smem_raw[];
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t C = a.C, Cr = a.Cr;
  const int64_t wblocks = a.nJ * a.nCt;

  constexpr int TJ = kTJ<acc_t>;
  if (static_cast<int64_t>(blockIdx.x) < wblocks) {
    // ---- weight tile: hidden units [j0, j0 + TJ) x channel c = ct*kThreads + tid
    __shared__ acc_t red_sh[kWarps * 3 * TJ];
    __shared__ acc_t red_out[3 * TJ];
    const int64_t jt = blockIdx.x % a.nJ;
    const int64_t ct = blockIdx.x / a.nJ;
    const int64_t j0 = jt * TJ;
    const int64_t c = ct * kThreads + tid;
    const bool cok = c < C;
    acc_t aw1[TJ], aw2[TJ];
#pragma unroll
    for (int q = 0; q < TJ; ++q) aw1[q] = aw2[q] = acc_t(0);
    acc_t adb1 = acc_t(0), adb2 = acc_t(0);
    for (int64_t n = 0; n < a.N; ++n) {
      const acc_t* av = a.avg + n * C;
      const acc_t* mv = a.mx + n * C;
      // part[q] = h_avg, part[TJ + q] = h_mx, part[2TJ + q] = dr of unit j0 + q,
      // each thread over channels tid, tid + kThreads, ...
      acc_t part[3 * TJ];
#pragma unroll
      for (int q = 0; q < 3 * TJ; ++q) part[q] = acc_t(0);
      for (int64_t cc = tid; cc < C; cc += kThreads) {
        const acc_t x_a = av[cc], x_m = mv[cc];
        const acc_t dl = mlp_dl(a, n * C + cc);
#pragma unroll
        for (int q = 0; q < TJ; ++q) {
          const int64_t j = j0 + q;
          if (j < Cr) {
            const acc_t w = a.w1[j * C + cc];  // coalesced over cc
            part[q] += w * x_a;
            part[TJ + q] += w * x_m;
            part[2 * TJ + q] += dl * a.w2[cc * Cr + j];  // TJ contiguous values per thread
          }
        }
      }
      block_sum_n<3 * TJ>(part, red_sh, red_out);
      const acc_t dl_c = cok ? mlp_dl(a, n * C + c) : acc_t(0);
      const acc_t xa_c = cok ? av[c] : acc_t(0);
      const acc_t xm_c = cok ? mv[c] : acc_t(0);
#pragma unroll
      for (int q = 0; q < TJ; ++q) {
        const int64_t j = j0 + q;
        if (j >= Cr) continue;
        const acc_t b = a.b1 != nullptr ? a.b1[j] : acc_t(0);
        const acc_t ha = red_out[q] + b;
        const acc_t hm = red_out[TJ + q] + b;
        const acc_t dr = red_out[2 * TJ + q];
        const acc_t dha = dr * acc_t(ha > acc_t(0) ? 1 : 0);
        const acc_t dhm = dr * acc_t(hm > acc_t(0) ? 1 : 0);
        aw1[q] += dha * xa_c + dhm * xm_c;
        aw2[q] += dl_c * (relu(ha) + relu(hm));
        if (ct == 0 && tid == q) adb1 += dha + dhm;
      }
      adb2 += dl_c;
    }
    if (cok) {
#pragma unroll
      for (int q = 0; q < TJ; ++q) {
        const int64_t j = j0 + q;
        if (j < Cr) {
          a.dw1[j * C + c] = aw1[q];
          a.dw2[c * Cr + j] = aw2[q];
        }
      }
      if (jt == 0 && a.db2 != nullptr) a.db2[c] = acc_t(2) * adb2;
    }
    if (ct == 0 && tid < TJ && j0 + tid < Cr && a.db1 != nullptr) a.db1[j0 + tid] = adb1;
    return;
  }

  // ---- one sample n. Dynamic smem: dl[C], dh[2*Cr] (dh_avg, dh_mx), drp[kWarps*Cr]
  acc_t* dl = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* dh = dl + C;
  acc_t* drp = dh + 2 * Cr;
  const int64_t n = blockIdx.x - wblocks;
  for (int64_t c = tid; c < C; c += kThreads) dl[c] = mlp_dl(a, n * C + c);
  for (int64_t i = tid; i < kWarps * Cr; i += kThreads) drp[i] = acc_t(0);
  __syncthreads();
  // dr partials: warp w takes rows c = w, w + kWarps, ... of w2 (C, Cr); lane owns
  // drp[w][j] for j = lane, lane + 32, ... (contiguous along a row: coalesced).
  for (int64_t c = warp; c < C; c += kWarps) {
    const acc_t g = dl[c];
    for (int64_t j = lane; j < Cr; j += 32) drp[warp * Cr + j] += g * a.w2[c * Cr + j];
  }
  __syncthreads();
  // hidden unit j: one warp along row j of w1; dr = the warps' partials in order
  const acc_t* av = a.avg + n * C;
  const acc_t* mv = a.mx + n * C;
  for (int64_t j = warp; j < Cr; j += kWarps) {
    acc_t ha = acc_t(0), hm = acc_t(0);
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t w = a.w1[j * C + c];
      ha += w * av[c];
      hm += w * mv[c];
    }
    ha = warp_sum(ha);
    hm = warp_sum(hm);
    if (lane == 0) {
      const acc_t b = a.b1 != nullptr ? a.b1[j] : acc_t(0);
      acc_t dr = drp[j];
      for (int w = 1; w < kWarps; ++w) dr += drp[w * Cr + j];
      dh[j] = dr * acc_t(ha + b > acc_t(0) ? 1 : 0);
      dh[Cr + j] = dr * acc_t(hm + b > acc_t(0) ? 1 : 0);
    }
  }
  __syncthreads();
  // d_v[c] = sum_j dh_v[j] w1[j, c]: one thread per c, coalesced over c
  for (int64_t c = tid; c < C; c += kThreads) {
    acc_t sa = acc_t(0), sm = acc_t(0);
    for (int64_t j = 0; j < Cr; ++j) {
      const acc_t w = a.w1[j * C + c];
      sa += dh[j] * w;
      sm += dh[Cr + j] * w;
    }
    a.d_avg[n * C + c] = sa;
    a.d_mx[n * C + c] = sm;
  }
}

// ---------------------------------------------------------------------------------------
// Argument checks: ../mixed_attention_stage_checks.h (the CPU ops' errors, word for word),
// with `arg` a dense CUDA tensor on the device of `ref` (x or z, checked first). What
// only these kernels need (shared memory, grid sizes, k) is checked here.

namespace checks = ma_stage;
using checks::acc_dtype;

struct OnDeviceOf {
  const at::Tensor& ref;
  const char* ref_name;

  void operator()(const at::Tensor& t, const char* name) const {
    checks::check_dense(t, name);
    MK_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
    MK_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(),
             " (the device of ", ref_name, "), got ", t.device());
  }
};

// The conv kernels keep a k x k tap table per block.
void check_conv_k(int64_t k) {
  MK_CHECK_VALUE(k <= 181, "conv_w: expected k <= 181 (the CUDA kernels' limit), got k = ", k);
}

size_t smem_optin() {
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

template <typename K>
void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------
// Ops

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attn_cuda(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b2) {
  constexpr const char* op = "mixed_attention_channel_attn";
  const int64_t Cr = checks::check_channel_attn(x, w1, b1, w2, b2, OnDeviceOf{x, "x"});
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc = acc_dtype(x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  auto [avg, mx, im] = channel_pool_pass(x);
  at::Tensor mc = at::empty({N, C}, avg.options());
  if (N == 0 || C == 0) return {mc, avg, mx, im};
  const size_t smem = 2 * static_cast<size_t>(Cr) * (acc == at::kDouble ? 8 : 4);
  MK_CHECK_VALUE(smem <= smem_optin(), "w1: expected at most ",
                 smem_optin() / (acc == at::kDouble ? 16 : 8),
                 " rows (C_r; r_avg and r_mx in shared memory), got C_r = ", Cr);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    auto kernel = _ma_channel_mlp_kernel<scalar_t>;
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>(N), kThreads, smem, stream>>>(
        avg.const_data_ptr<scalar_t>(), mx.const_data_ptr<scalar_t>(),
        w1.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(b1), w2.const_data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(b2), mc.data_ptr<scalar_t>(), C, Cr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mc, avg, mx, im};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> spatial_attn_cuda(
    const at::Tensor& x, const at::Tensor& mc, const at::Tensor& conv_w,
    const std::optional<at::Tensor>& conv_b, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& bn_mean,
    const std::optional<at::Tensor>& bn_var, double eps, bool batch_norm) {
  constexpr const char* op = "mixed_attention_spatial_attn";
  const int64_t k = checks::check_spatial_attn(x, mc, conv_w, conv_b, bn_weight, bn_bias, bn_mean,
                                               bn_var, batch_norm, OnDeviceOf{x, "x"});
  check_conv_k(k);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const auto acc = acc_dtype(x.scalar_type());
  const bool use_bn = !batch_norm && bn_mean.has_value();
  const c10::cuda::CUDAGuard guard(x.device());
  auto [sa, sm, ic] = spatial_pool_pass(x, mc);
  const auto opts = sa.options();
  at::Tensor z = at::empty({N, H, W}, opts);
  at::Tensor ms = batch_norm ? at::empty({0}, opts) : at::empty({N, H, W}, opts);
  const int64_t total = N * H * W;
  if (total == 0) return {ms, z, sa, sm, ic};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), 1 << 20));
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    _ma_spatial_conv_act_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        sa.const_data_ptr<scalar_t>(), sm.const_data_ptr<scalar_t>(),
        conv_w.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(conv_b),
        use_bn ? ptr_or_null<scalar_t>(bn_weight) : nullptr,
        use_bn ? ptr_or_null<scalar_t>(bn_bias) : nullptr,
        use_bn ? ptr_or_null<scalar_t>(bn_mean) : nullptr,
        use_bn ? ptr_or_null<scalar_t>(bn_var) : nullptr, static_cast<scalar_t>(eps),
        z.data_ptr<scalar_t>(), batch_norm ? nullptr : ms.data_ptr<scalar_t>(), total, H, W,
        static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ms, z, sa, sm, ic};
}

std::tuple<at::Tensor, at::Tensor> spatial_norm_cuda(
    const at::Tensor& z, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double eps) {
  constexpr const char* op = "mixed_attention_spatial_norm";
  checks::check_spatial_norm(z, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                             momentum, OnDeviceOf{z, "z"});
  // the kernel updates both running statistics in one dtype
  if (running_mean.has_value()) {
    MK_CHECK_TYPE(running_var->scalar_type() == running_mean->scalar_type(),
                  "running_var: expected dtype ", dtype_name(running_mean->scalar_type()),
                  " (the dtype of running_mean), got ", dtype_name(running_var->scalar_type()));
  }
  const auto acc = z.scalar_type();
  const int64_t count = z.numel();
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor ms = at::empty(z.sizes(), z.options());
  at::Tensor stats = at::empty({2}, z.options());
  const double m = momentum.value_or(0.0);
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    using acc_t = scalar_t;
    auto launch = [&](auto* run_mean, auto* run_var) {
      using stat_t = std::remove_pointer_t<decltype(run_mean)>;
      _ma_spatial_norm_kernel<acc_t, stat_t><<<1, kNormThreads, 0, stream>>>(
          z.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(bn_weight), ptr_or_null<acc_t>(bn_bias),
          run_mean, run_var,
          num_batches_tracked.has_value() ? num_batches_tracked->data_ptr<int64_t>() : nullptr,
          momentum.has_value(), static_cast<acc_t>(m), static_cast<acc_t>(1.0 - m),
          static_cast<acc_t>(unbias), static_cast<acc_t>(eps), ms.data_ptr<acc_t>(),
          stats.data_ptr<acc_t>(), count);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!running_mean.has_value()) {
      launch(static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr));
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, running_mean->scalar_type(), op,
          [&] { launch(running_mean->data_ptr<scalar_t>(), running_var->data_ptr<scalar_t>()); });
    }
  });
  return {ms, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_norm_bwd_cuda(
    const at::Tensor& dms, const std::optional<at::Tensor>& gms, const at::Tensor& ms,
    const at::Tensor& z, const at::Tensor& stats, const std::optional<at::Tensor>& bn_weight,
    bool has_bias, double eps) {
  constexpr const char* op = "mixed_attention_spatial_norm_bwd";
  checks::check_spatial_norm_bwd(dms, gms, ms, z, stats, bn_weight, OnDeviceOf{z, "z"});
  const auto acc = z.scalar_type();
  const int64_t count = z.numel();
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor dz = at::empty(z.sizes(), z.options());
  at::Tensor dbw = at::empty({bn_weight.has_value() ? 1 : 0}, z.options());
  at::Tensor dbb = at::empty({has_bias ? 1 : 0}, z.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    _ma_spatial_norm_bwd_kernel<scalar_t><<<1, kNormThreads, 0, stream>>>(
        dms.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(gms), ms.const_data_ptr<scalar_t>(),
        z.const_data_ptr<scalar_t>(), stats.const_data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(bn_weight), static_cast<scalar_t>(eps), dz.data_ptr<scalar_t>(),
        bn_weight.has_value() ? dbw.data_ptr<scalar_t>() : nullptr,
        has_bias ? dbb.data_ptr<scalar_t>() : nullptr, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dz, dbw, dbb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
spatial_attn_bwd_cuda(const at::Tensor& d, const std::optional<at::Tensor>& gms,
                      const std::optional<at::Tensor>& ms, const at::Tensor& z,
                      const at::Tensor& sa, const at::Tensor& sm, const at::Tensor& conv_w,
                      bool has_conv_bias, const std::optional<at::Tensor>& bn_weight,
                      bool has_bn_bias, const std::optional<at::Tensor>& bn_mean,
                      const std::optional<at::Tensor>& bn_var, double eps) {
  constexpr const char* op = "mixed_attention_spatial_attn_bwd";
  const int64_t k = checks::check_spatial_attn_bwd(d, gms, ms, z, sa, sm, conv_w, bn_weight,
                                                   bn_mean, bn_var, OnDeviceOf{z, "z"});
  check_conv_k(k);
  const auto acc = z.scalar_type();
  // the BatchNorm with given statistics: only behind the sigmoid (ms given)
  const bool use_bn = ms.has_value() && bn_mean.has_value();
  const bool has_bw = use_bn && bn_weight.has_value();
  const bool has_bb = use_bn && has_bn_bias;
  const c10::cuda::CUDAGuard guard(z.device());
  const auto opts = z.options();
  const int64_t N = z.size(0), H = z.size(1), W = z.size(2);
  const int64_t P = N * H * W;
  at::Tensor da_s = at::empty({N, H, W}, opts), dm_s = at::empty({N, H, W}, opts);
  if (P == 0) {  // sums over nothing: zeros (not a hot path)
    return {da_s,
            dm_s,
            at::zeros({1, 2, k, k}, opts),
            has_conv_bias ? at::zeros({1}, opts) : at::empty({0}, opts),
            has_bw ? at::zeros({1}, opts) : at::empty({0}, opts),
            has_bb ? at::zeros({1}, opts) : at::empty({0}, opts)};
  }
  at::Tensor dcw = at::empty({1, 2, k, k}, opts);
  at::Tensor dcb = at::empty({has_conv_bias ? 1 : 0}, opts);
  at::Tensor dbw = at::empty({has_bw ? 1 : 0}, opts);
  at::Tensor dbb = at::empty({has_bb ? 1 : 0}, opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    SpatialBwdArgs<scalar_t> a;
    a.d = d.const_data_ptr<scalar_t>();
    a.gms = ms.has_value() ? ptr_or_null<scalar_t>(gms) : nullptr;
    a.ms = ptr_or_null<scalar_t>(ms);
    a.z = z.const_data_ptr<scalar_t>();
    a.sa = sa.const_data_ptr<scalar_t>();
    a.sm = sm.const_data_ptr<scalar_t>();
    a.w = conv_w.const_data_ptr<scalar_t>();
    a.bn_w = has_bw ? ptr_or_null<scalar_t>(bn_weight) : nullptr;
    a.bn_mean = use_bn ? ptr_or_null<scalar_t>(bn_mean) : nullptr;
    a.bn_var = use_bn ? ptr_or_null<scalar_t>(bn_var) : nullptr;
    a.eps = static_cast<scalar_t>(eps);
    a.dsa = da_s.data_ptr<scalar_t>();
    a.dsm = dm_s.data_ptr<scalar_t>();
    a.dcw = dcw.data_ptr<scalar_t>();
    a.P = P;
    a.H = H;
    a.W = W;
    a.k = static_cast<int>(k);
    int taps = static_cast<int>(2 * k * k);
    if (has_conv_bias) {
      a.dcb = dcb.data_ptr<scalar_t>();
      a.t_cb = taps++;
    }
    if (has_bw) {
      a.dbw = dbw.data_ptr<scalar_t>();
      a.t_bw = taps++;
    }
    if (has_bb) {
      a.dbb = dbb.data_ptr<scalar_t>();
      a.t_bb = taps++;
    }
    a.taps = taps;
    const int64_t map_blocks = std::min<int64_t>(ceil_div(P, kThreads), 1 << 20);
    _ma_spatial_attn_bwd_kernel<scalar_t>
        <<<static_cast<unsigned>(taps + map_blocks), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {da_s, dm_s, dcw, dcb, dbw, dbb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
channel_attn_bwd_cuda(const at::Tensor& x, const at::Tensor& da_s, const at::Tensor& dm_s,
                      const at::Tensor& ic, const at::Tensor& dmc,
                      const std::optional<at::Tensor>& gmc, const at::Tensor& mc,
                      const at::Tensor& avg, const at::Tensor& mx, const at::Tensor& w1,
                      const std::optional<at::Tensor>& b1, const at::Tensor& w2, bool has_b2) {
  constexpr const char* op = "mixed_attention_channel_attn_bwd";
  const int64_t Cr = checks::check_channel_attn_bwd(x, da_s, dm_s, ic, dmc, gmc, mc, avg, mx, w1,
                                                    b1, w2, OnDeviceOf{x, "x"});
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc = acc_dtype(x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  // B2: dmc's part through the spatial pooling
  const at::Tensor part = bwd_channel_pass(x, da_s, dm_s, ic);
  const auto opts = avg.options();
  if (N == 0 || C == 0 || Cr == 0) {  // degenerate shapes: no kernel (not a hot path)
    return {at::zeros({N, C}, opts),  at::zeros({N, C}, opts),
            at::zeros({Cr, C}, opts), b1.has_value() ? at::zeros({Cr}, opts) : at::empty({0}, opts),
            at::zeros({C, Cr}, opts), has_b2 ? at::zeros({C}, opts) : at::empty({0}, opts)};
  }
  at::Tensor d_avg = at::empty({N, C}, opts), d_mx = at::empty({N, C}, opts);
  at::Tensor dw1 = at::empty({Cr, C}, opts), dw2 = at::empty({C, Cr}, opts);
  at::Tensor db1 = at::empty({b1.has_value() ? Cr : 0}, opts);
  at::Tensor db2 = at::empty({has_b2 ? C : 0}, opts);
  const size_t esz = acc == at::kDouble ? 8 : 4;
  const size_t smem = static_cast<size_t>(C + (2 + kWarps) * Cr) * esz;
  MK_CHECK_VALUE(smem <= smem_optin(), "w1: expected C + ", 2 + kWarps,
                 " * C_r <= ", smem_optin() / esz,
                 " (per-sample vectors in shared memory), got C = ", C, ", C_r = ", Cr);
  const int64_t nJ = ceil_div(Cr, acc == at::kDouble ? kTJ<double> : kTJ<float>),
                nCt = ceil_div(C, kThreads);
  MK_CHECK_VALUE(nJ * nCt + N <= std::numeric_limits<int32_t>::max(),
                 "x: expected fewer samples and channels (a grid of at most 2^31 - 1 blocks), ",
                 "got shape ", x.sizes());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    MlpBwdArgs<scalar_t> a;
    a.dmc = dmc.const_data_ptr<scalar_t>();
    a.part = part.const_data_ptr<scalar_t>();
    a.gmc = ptr_or_null<scalar_t>(gmc);
    a.mc = mc.const_data_ptr<scalar_t>();
    a.avg = avg.const_data_ptr<scalar_t>();
    a.mx = mx.const_data_ptr<scalar_t>();
    a.w1 = w1.const_data_ptr<scalar_t>();
    a.b1 = ptr_or_null<scalar_t>(b1);
    a.w2 = w2.const_data_ptr<scalar_t>();
    a.d_avg = d_avg.data_ptr<scalar_t>();
    a.d_mx = d_mx.data_ptr<scalar_t>();
    a.dw1 = dw1.data_ptr<scalar_t>();
    a.db1 = b1.has_value() ? db1.data_ptr<scalar_t>() : nullptr;
    a.dw2 = dw2.data_ptr<scalar_t>();
    a.db2 = has_b2 ? db2.data_ptr<scalar_t>() : nullptr;
    a.N = N;
    a.C = C;
    a.Cr = Cr;
    a.nJ = nJ;
    a.nCt = nCt;
    auto kernel = _ma_channel_mlp_bwd_kernel<scalar_t>;
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>(nJ * nCt + N), kThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {d_avg, d_mx, dw1, db1, dw2, db2};
}

}  // namespace
}  // namespace manet_kernels

TORCH_LIBRARY_IMPL(manet_kernels, CUDA, m) {
  m.impl("_mixed_attention_channel_attn", &manet_kernels::channel_attn_cuda);
  m.impl("_mixed_attention_spatial_attn", &manet_kernels::spatial_attn_cuda);
  m.impl("_mixed_attention_spatial_norm", &manet_kernels::spatial_norm_cuda);
  m.impl("_mixed_attention_spatial_norm_bwd", &manet_kernels::spatial_norm_bwd_cuda);
  m.impl("_mixed_attention_spatial_attn_bwd", &manet_kernels::spatial_attn_bwd_cuda);
  m.impl("_mixed_attention_channel_attn_bwd", &manet_kernels::channel_attn_bwd_cuda);
}
