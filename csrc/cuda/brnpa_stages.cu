// CUDA kernels of the three fused BR-NPA stages (issue 16). The contract, dtypes and
// shapes included, is manet_kernels/reference/stages.py; the schemas are in
// csrc/manet_kernels.cpp.
//
//   brnpa_prepare     _brnpa_prepare_kernel: per position ||f_i||, 1/(||f_i|| + eps) and
//                     the first score, from one read of x (1 launch)
//   brnpa_part        _brnpa_part_step_kernel: every block finds its sample's argmax of
//                     the score itself, gathers r = f_idx, then for its chunk of positions
//                     writes s and a partial sv = sum_i s_i f_i;
//                     _brnpa_part_finish_kernel (one block per sample): S, total, vectors,
//                     maps, the score update (2 launches)
//   brnpa_bwd_finish  _brnpa_bwd_finish_kernel: a, m, c (1 launch)
//
// x is (B, C, H, W), NCHW- or channels_last-contiguous; element (b, c, p) (p = h*W + w)
// sits at b*sB + c*sC + p*sP with (sB, sC, sP) = (C*P, P, 1) for NCHW and (P*C, 1, C)
// for channels_last. Small tensors are contiguous, in the acc dtype (float64 for double
// x, float32 otherwise); idx is int64. Only at::empty allocates; no host syncs; every
// reduction runs in a fixed order (no atomics): results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../brnpa_stage_checks.h"
#include "../check.h"
#include "plan_common.h"

namespace manet_kernels {
namespace {

using plan_util::ceil_div;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Positions per tile: NCHW tiles are 32 positions (one per lane, the warps splitting the
// channels), channels_last tiles are kWarps positions (one per warp, lanes along C).
template <bool CL>
constexpr int kTileP = CL ? kWarps : 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block, returned to every thread (warps added in order 0..kWarps-1).
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* sh) {
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  T s = sh[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) s += sh[w];
  return s;
}

// torch.argmax's order: NaN beats every number, then the larger value, then the lower
// index; an index < 0 is an empty slot and loses to anything.
template <typename T>
__device__ __forceinline__ bool better(T va, int64_t ia, T vb, int64_t ib) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  const bool na = isnan(va), nb = isnan(vb);
  if (na || nb) return na && (!nb || ia < ib);
  return va > vb || (va == vb && ia < ib);
}

// The first maximum of row[0, P) (NaN counts as the maximum), returned to every thread.
template <typename T>
__device__ int64_t block_argmax(const T* __restrict__ row, int64_t P, T* sh_v, int64_t* sh_i) {
  T m = T(0);
  int64_t mi = -1;
  for (int64_t p = threadIdx.x; p < P; p += kThreads) {
    const T v = row[p];
    // increasing p per thread: an equal later value never wins, a NaN sticks
    if (mi < 0 || v > m || (isnan(v) && !isnan(m))) {
      m = v;
      mi = p;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T om = __shfl_xor_sync(0xffffffffu, m, off);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, mi, off);
    if (better(om, oi, m, mi)) {
      m = om;
      mi = oi;
    }
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    sh_v[threadIdx.x >> 5] = m;
    sh_i[threadIdx.x >> 5] = mi;
  }
  __syncthreads();
  m = sh_v[0];
  mi = sh_i[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    if (better(sh_v[w], sh_i[w], m, mi)) {
      m = sh_v[w];
      mi = sh_i[w];
    }
  }
  return mi;
}

// ---------------------------------------------------------------------------------------
// brnpa_prepare. Block = one sample b and kTileP<CL> positions; grid B * ceil(P / tile).
// NCHW: lane = position, warp w sums channels w, w + kWarps, ... (coalesced along p),
// then the warps' partials in order. channels_last: warp = position, lanes along C.
template <typename scalar_t, bool CL>
__global__ void __launch_bounds__(kThreads)
    _brnpa_prepare_kernel(const scalar_t* __restrict__ x,
                          at::opmath_type<scalar_t>* __restrict__ nrm,
                          at::opmath_type<scalar_t>* __restrict__ inv,
                          at::opmath_type<scalar_t>* __restrict__ score, int64_t C, int64_t P,
                          int64_t n_tiles, bool paper, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TP = kTileP<CL>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x / n_tiles;
  const int64_t p0 = (blockIdx.x % n_tiles) * TP;
  acc_t ss = acc_t(0);
  int64_t p;
  if constexpr (CL) {
    p = p0 + warp;
    if (p < P) {
      const scalar_t* f = x + (b * P + p) * C;
      for (int64_t c = lane; c < C; c += 32) {
        const acc_t v = static_cast<acc_t>(f[c]);
        ss += v * v;
      }
    }
    ss = warp_sum(ss);
    if (lane != 0) return;
  } else {
    __shared__ acc_t part[kWarps][32];
    p = p0 + lane;
    if (p < P) {
      for (int64_t c = warp; c < C; c += kWarps) {
        const acc_t v = static_cast<acc_t>(x[(b * C + c) * P + p]);
        ss += v * v;
      }
    }
    part[warp][lane] = ss;
    __syncthreads();
    if (warp != 0) return;
    ss = part[0][lane];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) ss += part[w][lane];
  }
  if (p >= P) return;
  const acc_t n = sqrt(ss);
  const int64_t o = b * P + p;
  nrm[o] = n;
  inv[o] = acc_t(1) / (n + eps);
  score[o] = paper ? n * n : n + eps;
}

// ---------------------------------------------------------------------------------------
// brnpa_part, step. Block (b, blk): sample b, positions [blk*chunk, min(P, (blk+1)*chunk)).
template <typename scalar_t>
struct StepArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = nullptr;
  const acc_t* inv = nullptr;    // (B, P)
  const acc_t* score = nullptr;  // (B, P)
  int64_t* idx = nullptr;        // (B, K)
  acc_t* s = nullptr;            // (B, K, P)
  acc_t* partial = nullptr;      // (B, nblk, C): per-block sv
  int64_t C = 0, P = 0, K = 1, j = 0;
  int64_t nblk = 1, chunk = 1;
};

// Dynamic smem: r[C] (the representative f_idx in acc), sv[C] (this block's sum_i s_i f_i).
template <typename scalar_t, bool CL>
__global__ void __launch_bounds__(kThreads) _brnpa_part_step_kernel(const StepArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TP = kTileP<CL>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* r = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sv = r + a.C;
  __shared__ acc_t sh_v[kWarps];
  __shared__ int64_t sh_i[kWarps];
  __shared__ acc_t s_tile[TP];
  __shared__ acc_t red[CL ? 1 : kWarps][32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x / a.nblk;
  const int64_t blk = blockIdx.x % a.nblk;
  const int64_t C = a.C, P = a.P;
  const scalar_t* xb = a.x + b * C * P;  // sample b (C*P elements in either layout)

  // this part's representative: the same first maximum in every block of the sample
  const int64_t im = block_argmax(a.score + b * P, P, sh_v, sh_i);
  if (blk == 0 && tid == 0) a.idx[b * a.K + a.j] = im;
  const acc_t inv_r = a.inv[b * P + im];
  for (int64_t c = tid; c < C; c += kThreads) {
    r[c] = static_cast<acc_t>(CL ? xb[im * C + c] : xb[c * P + im]);
    sv[c] = acc_t(0);
  }
  __syncthreads();

  const acc_t* inv_b = a.inv + b * P;
  acc_t* s_row = a.s + (b * a.K + a.j) * P;
  const int64_t p_begin = blk * a.chunk;
  const int64_t p_end = p_begin + a.chunk < P ? p_begin + a.chunk : P;
  for (int64_t t0 = p_begin; t0 < p_end; t0 += TP) {
    if constexpr (CL) {
      // phase 1: warp w dots position t0 + w with r, lanes along C (coalesced)
      const int64_t p = t0 + warp;
      acc_t dot = acc_t(0);
      if (p < p_end) {
        const scalar_t* f = xb + p * C;
        for (int64_t c = lane; c < C; c += 32) dot += static_cast<acc_t>(f[c]) * r[c];
      }
      dot = warp_sum(dot);
      if (lane == 0) {
        acc_t s = acc_t(0);
        if (p < p_end) {
          s = dot * inv_b[p] * inv_r;
          s_row[p] = s;
        }
        s_tile[warp] = s;
      }
      __syncthreads();
      // phase 2: thread owns channels tid, tid + kThreads, ...: sv[c] += sum_q s_q f_q[c]
      const int nq = static_cast<int>(p_end - t0 < TP ? p_end - t0 : TP);
      for (int64_t c = tid; c < C; c += kThreads) {
        acc_t acc = acc_t(0);
        for (int q = 0; q < nq; ++q) acc += s_tile[q] * static_cast<acc_t>(xb[(t0 + q) * C + c]);
        sv[c] += acc;
      }
      __syncthreads();  // s_tile is rewritten by the next tile
    } else {
      // phase 1: lane = position t0 + lane, warp w sums channels w, w + kWarps, ...
      const int64_t p = t0 + lane;
      const bool ok = p < p_end;
      acc_t dot = acc_t(0);
      if (ok) {
        for (int64_t c = warp; c < C; c += kWarps) dot += static_cast<acc_t>(xb[c * P + p]) * r[c];
      }
      red[warp][lane] = dot;
      __syncthreads();
      if (warp == 0) {
        dot = red[0][lane];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) dot += red[w][lane];
        acc_t s = acc_t(0);
        if (ok) {
          s = dot * inv_b[p] * inv_r;
          s_row[p] = s;
        }
        s_tile[lane] = s;
      }
      __syncthreads();
      // phase 2: warp w owns channels w, w + kWarps, ...: a warp sum along the 32
      // positions (coalesced), added by lane 0
      const acc_t sq = s_tile[lane];
      for (int64_t c = warp; c < C; c += kWarps) {
        acc_t v = ok ? sq * static_cast<acc_t>(xb[c * P + p]) : acc_t(0);
        v = warp_sum(v);
        if (lane == 0) sv[c] += v;
      }
      // the next tile writes red and s_tile only after its first barrier, which every
      // warp reaches after finishing this phase 2
    }
  }
  __syncthreads();
  acc_t* out = a.partial + (b * a.nblk + blk) * C;
  for (int64_t c = tid; c < C; c += kThreads) out[c] = sv[c];
}

// brnpa_part, finish. Block b: S = sum_p s (+inf where exactly 0), total, vectors = sv / S
// (sv = the step blocks' partials summed in block order), maps = s / S, and the score
// update score *= 1 - (s / S if paper else s).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    _brnpa_part_finish_kernel(const at::opmath_type<scalar_t>* __restrict__ s,
                              const at::opmath_type<scalar_t>* __restrict__ partial,
                              at::opmath_type<scalar_t>* __restrict__ total,
                              scalar_t* __restrict__ vectors, scalar_t* __restrict__ maps,
                              at::opmath_type<scalar_t>* __restrict__ score, int64_t C, int64_t P,
                              int64_t K, int64_t j, int64_t nblk, bool paper) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sh[kWarps];
  const int64_t b = blockIdx.x;
  const acc_t* s_row = s + (b * K + j) * P;
  acc_t t = acc_t(0);
  for (int64_t p = threadIdx.x; p < P; p += kThreads) t += s_row[p];
  t = block_sum(t, sh);
  if (t == acc_t(0)) t = std::numeric_limits<acc_t>::infinity();
  if (threadIdx.x == 0) total[b * K + j] = t;
  const acc_t* part = partial + b * nblk * C;
  scalar_t* vec = vectors + (b * K + j) * C;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    acc_t v = part[c];
    for (int64_t k = 1; k < nblk; ++k) v += part[k * C + c];
    vec[c] = static_cast<scalar_t>(v / t);
  }
  scalar_t* map = maps + (b * K + j) * P;
  acc_t* sc = score + b * P;
  for (int64_t p = threadIdx.x; p < P; p += kThreads) {
    const acc_t sj = s_row[p];
    const acc_t w = sj / t;
    map[p] = static_cast<scalar_t>(w);
    sc[p] = sc[p] * (acc_t(1) - (paper ? w : sj));
  }
}

// ---------------------------------------------------------------------------------------
// brnpa_bwd_finish. Block (b, y) of grid (B, G): every block first computes
// ck[k] = sum_i dw[b,k,i] * s[b,k,i] / S[b,k] for all k (the same fixed-order reduction
// in every block), then writes positions [y*chunk_p, ...) of a and c and channels
// [y*chunk_c, ...) of m:
//   a[b, k]      = s / S                      m[b, k]      = gv[b, k] (or 0)
//   a[b, K + k]  = ds * inv * inv[idx_k]      m[b, K + k]  = f_{idx_k}
//   a[b, 2K + k] = [i == idx_k]               m[b, 2K + k] = (u - ck t) / S * inv[idx_k]
//   c[b, i] = (sum_k ds s) * inv / nrm (0 where nrm == 0), ds = (dw - ck) / S.
template <typename scalar_t>
struct FinishArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = nullptr;
  const acc_t* dw = nullptr;     // (B, K, P)
  const acc_t* u = nullptr;      // (B, K, C)
  const acc_t* t = nullptr;      // (B, C)
  const acc_t* inv = nullptr;    // (B, P)
  const acc_t* nrm = nullptr;    // (B, P)
  const int64_t* idx = nullptr;  // (B, K)
  const acc_t* s = nullptr;      // (B, K, P)
  const acc_t* total = nullptr;  // (B, K)
  const acc_t* gv = nullptr;     // (B, K, C) or null
  acc_t* a = nullptr;            // (B, 3K, P)
  acc_t* m = nullptr;            // (B, 3K, C)
  acc_t* c = nullptr;            // (B, P)
  int64_t C = 0, P = 0, K = 0;
  int64_t sC = 1, sP = 1;  // strides of x along c and p (the sample stride is C*P)
  int64_t chunk_p = 1, chunk_c = 1;
};

// Dynamic smem: idx[K] (int64), then ck[K], inv_r[K] (acc).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _brnpa_bwd_finish_kernel(const FinishArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t K = a.K, P = a.P, C = a.C;
  int64_t* idx_s = reinterpret_cast<int64_t*>(smem_raw);
  acc_t* ck = reinterpret_cast<acc_t*>(idx_s + K);
  acc_t* inv_r = ck + K;
  __shared__ acc_t sh[kWarps];
  const int64_t b = blockIdx.x;
  const int64_t y = blockIdx.y;
  const acc_t* inv_b = a.inv + b * P;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const int64_t i = a.idx[b * K + k];
    idx_s[k] = i;
    inv_r[k] = inv_b[i];
  }
  for (int64_t k = 0; k < K; ++k) {
    const acc_t S = a.total[b * K + k];
    const acc_t* dw_row = a.dw + (b * K + k) * P;
    const acc_t* s_row = a.s + (b * K + k) * P;
    acc_t v = acc_t(0);
    for (int64_t p = threadIdx.x; p < P; p += kThreads) v += dw_row[p] * (s_row[p] / S);
    v = block_sum(v, sh);
    if (threadIdx.x == 0) ck[k] = v;
  }
  __syncthreads();

  // positions: a and c
  const int64_t p_end = (y + 1) * a.chunk_p < P ? (y + 1) * a.chunk_p : P;
  for (int64_t p = y * a.chunk_p + threadIdx.x; p < p_end; p += kThreads) {
    const acc_t ip = inv_b[p];
    acc_t csum = acc_t(0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t row = (b * K + k) * P + p;
      const acc_t S = a.total[b * K + k];
      const acc_t sv = a.s[row];
      const acc_t ds = (a.dw[row] - ck[k]) / S;
      acc_t* ab = a.a + (b * 3 * K + k) * P + p;  // a[b, k, p]; + K*P: a[b, K + k, p]
      ab[0] = sv / S;
      ab[K * P] = ds * ip * inv_r[k];
      ab[2 * K * P] = p == idx_s[k] ? acc_t(1) : acc_t(0);
      csum += ds * sv;
    }
    const acc_t n = a.nrm[b * P + p];
    a.c[b * P + p] = csum * (n > acc_t(0) ? ip / n : acc_t(0));
  }

  // channels: m
  const scalar_t* xb = a.x + b * C * P;
  const int64_t c_end = (y + 1) * a.chunk_c < C ? (y + 1) * a.chunk_c : C;
  for (int64_t c = y * a.chunk_c + threadIdx.x; c < c_end; c += kThreads) {
    const acc_t tc = a.t[b * C + c];
    for (int64_t k = 0; k < K; ++k) {
      const acc_t S = a.total[b * K + k];
      acc_t* mb = a.m + (b * 3 * K + k) * C + c;  // m[b, k, c]; + K*C: m[b, K + k, c]
      mb[0] = a.gv != nullptr ? a.gv[(b * K + k) * C + c] : acc_t(0);
      mb[K * C] = static_cast<acc_t>(xb[c * a.sC + idx_s[k] * a.sP]);
      const acc_t q = (a.u[(b * K + k) * C + c] - ck[k] * tc) / S;
      mb[2 * K * C] = q * inv_r[k];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Argument checks: ../brnpa_stage_checks.h (the CPU ops' errors, word for word), with
// `arg` a dense CUDA tensor on the device of x (checked first). idx's values are not
// checked (that would read them on the host). What only these kernels need (C >= 1,
// shared memory, grid sizes) is checked here.

namespace checks = brnpa_stage;
using checks::acc_dtype;

struct OnDeviceOfX {
  const at::Tensor& x;

  void operator()(const at::Tensor& t, const char* name) const {
    checks::check_dense(t, name);
    MK_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
    MK_CHECK(t.device() == x.device(), name, ": expected a tensor on ", x.device(),
             " (the device of x), got ", t.device());
  }
};

void check_map(const at::Tensor& x) {
  MK_CHECK(x.size(1) >= 1 && x.size(2) * x.size(3) >= 1,
           "x: expected C >= 1 and H*W >= 1 (the CUDA kernels' limit), got shape ", x.sizes());
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

// ---------------------------------------------------------------------------------------
// Ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> brnpa_prepare_cuda(const at::Tensor& x, bool paper,
                                                                  double eps) {
  constexpr const char* op = "brnpa_prepare";
  const bool cl = checks::check_brnpa_prepare(x, OnDeviceOfX{x}).channels_last;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor nrm = at::empty({B, H, W}, opts);
  at::Tensor inv = at::empty({B, H, W}, opts);
  at::Tensor score = at::empty({B, H, W}, opts);
  if (B == 0 || P == 0) return {nrm, inv, score};
  const int tp = cl ? kTileP<true> : kTileP<false>;
  const int64_t n_tiles = ceil_div(P, tp);
  MK_CHECK(B * n_tiles <= std::numeric_limits<int32_t>::max(),
           "x: expected fewer samples or positions (a grid of at most 2^31 - 1 blocks), got "
           "shape ",
           x.sizes());
  const unsigned blocks = static_cast<unsigned>(B * n_tiles);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel =
        cl ? _brnpa_prepare_kernel<scalar_t, true> : _brnpa_prepare_kernel<scalar_t, false>;
    kernel<<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), nrm.data_ptr<acc_t>(),
                                            inv.data_ptr<acc_t>(), score.data_ptr<acc_t>(), C, P,
                                            n_tiles, paper, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {nrm, inv, score};
}

void brnpa_part_cuda(const at::Tensor& x, const at::Tensor& inv, const at::Tensor& score, int64_t j,
                     bool paper, const at::Tensor& idx, const at::Tensor& s,
                     const at::Tensor& total, const at::Tensor& vectors, const at::Tensor& maps) {
  constexpr const char* op = "brnpa_part";
  const auto checked =
      checks::check_brnpa_part(x, inv, score, j, idx, s, total, vectors, maps, OnDeviceOfX{x});
  const bool cl = checked.channels_last;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  const int64_t K = checked.K;
  const auto acc = acc_dtype(x.scalar_type());
  if (B == 0) return;
  check_map(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const size_t esz = acc == at::kDouble ? 8 : 4;
  const size_t smem = 2 * static_cast<size_t>(C) * esz;
  MK_CHECK(smem <= smem_optin(), "x: expected at most ", smem_optin() / (2 * esz),
           " channels (r and sv in shared memory), got C = ", C);
  // Blocks per sample: about 4 per SM in all, each with at least one full tile.
  const int tp = cl ? kTileP<true> : kTileP<false>;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t nblk = std::clamp<int64_t>(ceil_div(4 * sms, B), 1, ceil_div(P, tp));
  const int64_t chunk = ceil_div(ceil_div(P, nblk), tp) * tp;
  nblk = ceil_div(P, chunk);  // no empty block
  MK_CHECK(B * nblk <= std::numeric_limits<int32_t>::max(),
           "x: expected fewer samples (a grid of at most 2^31 - 1 blocks), got B = ", B);
  at::Tensor partial = at::empty({B, nblk, C}, x.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    StepArgs<scalar_t> a;
    a.x = x.const_data_ptr<scalar_t>();
    a.inv = inv.const_data_ptr<acc_t>();
    a.score = score.const_data_ptr<acc_t>();
    a.idx = idx.data_ptr<int64_t>();
    a.s = s.data_ptr<acc_t>();
    a.partial = partial.data_ptr<acc_t>();
    a.C = C;
    a.P = P;
    a.K = K;
    a.j = j;
    a.nblk = nblk;
    a.chunk = chunk;
    auto step =
        cl ? _brnpa_part_step_kernel<scalar_t, true> : _brnpa_part_step_kernel<scalar_t, false>;
    allow_smem(step, smem);
    step<<<static_cast<unsigned>(B * nblk), kThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    _brnpa_part_finish_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        s.const_data_ptr<acc_t>(), partial.const_data_ptr<acc_t>(), total.data_ptr<acc_t>(),
        vectors.data_ptr<scalar_t>(), maps.data_ptr<scalar_t>(), score.data_ptr<acc_t>(), C, P, K,
        j, nblk, paper);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> brnpa_bwd_finish_cuda(
    const at::Tensor& x, const at::Tensor& dw, const at::Tensor& u, const at::Tensor& t,
    const at::Tensor& inv, const at::Tensor& nrm, const at::Tensor& idx, const at::Tensor& s,
    const at::Tensor& total, const std::optional<at::Tensor>& gv) {
  constexpr const char* op = "brnpa_bwd_finish";
  const auto checked = checks::check_brnpa_bwd_finish(x, dw, u, t, inv, nrm, idx, s, total, gv,
                                                      false, OnDeviceOfX{x});
  const bool cl = checked.channels_last;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  const int64_t K = checked.K;
  const auto acc = acc_dtype(x.scalar_type());
  const bool has_gv = gv.has_value() && gv->defined();
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc);
  at::Tensor a = at::empty({B, 3 * K, H, W}, opts);
  at::Tensor m = at::empty({B, 3 * K, C}, opts);
  at::Tensor c = at::empty({B, H, W}, opts);
  if (B == 0) return {a, m, c};
  check_map(x);
  if (K == 0) {  // no parts: c = 0 (not a hot path)
    c.zero_();
    return {a, m, c};
  }
  const size_t esz = acc == at::kDouble ? 8 : 4;
  const size_t smem = static_cast<size_t>(K) * (8 + 2 * esz);
  MK_CHECK(smem <= 48 * 1024, "idx: expected at most ", 48 * 1024 / (8 + 2 * esz),
           " parts (K = idx.size(1), in shared memory), got K = ", K);
  // Blocks per sample: one per kThreads positions or channels, at most 64 (each block
  // repeats the K reductions over P for ck).
  const int64_t G = std::clamp<int64_t>(ceil_div(std::max(P, C), kThreads), 1, 64);
  MK_CHECK(B <= std::numeric_limits<int32_t>::max(),
           "x: expected fewer samples (at most 2^31 - 1), got B = ", B);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FinishArgs<scalar_t> f;
    f.x = x.const_data_ptr<scalar_t>();
    f.dw = dw.const_data_ptr<acc_t>();
    f.u = u.const_data_ptr<acc_t>();
    f.t = t.const_data_ptr<acc_t>();
    f.inv = inv.const_data_ptr<acc_t>();
    f.nrm = nrm.const_data_ptr<acc_t>();
    f.idx = idx.const_data_ptr<int64_t>();
    f.s = s.const_data_ptr<acc_t>();
    f.total = total.const_data_ptr<acc_t>();
    f.gv = has_gv ? gv->const_data_ptr<acc_t>() : nullptr;
    f.a = a.data_ptr<acc_t>();
    f.m = m.data_ptr<acc_t>();
    f.c = c.data_ptr<acc_t>();
    f.C = C;
    f.P = P;
    f.K = K;
    f.sC = cl ? 1 : P;
    f.sP = cl ? C : 1;
    f.chunk_p = ceil_div(P, G);
    f.chunk_c = ceil_div(C, G);
    _brnpa_bwd_finish_kernel<scalar_t>
        <<<dim3(static_cast<unsigned>(B), static_cast<unsigned>(G)), kThreads, smem, stream>>>(f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {a, m, c};
}

}  // namespace
}  // namespace manet_kernels

TORCH_LIBRARY_IMPL(manet_kernels, CUDA, m) {
  m.impl("_brnpa_prepare", &manet_kernels::brnpa_prepare_cuda);
  m.impl("_brnpa_part", &manet_kernels::brnpa_part_cuda);
  m.impl("_brnpa_bwd_finish", &manet_kernels::brnpa_bwd_finish_cuda);
}
