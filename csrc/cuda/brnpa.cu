// CUDA kernels for the four BR-NPA passes (docs/design.md §3). The contract, dtypes
// and shapes included, is manet_kernels/reference/passes.py.
//
// A pass views x as (B, R, L) with L its contiguous axis: (B, C, P) for NCHW and
// (B, P, C) for channels_last. Lanes always run along L so global loads are coalesced.
//
// norms / step / bwd_reduce share one kernel. A block owns one sample and a run of
// position tiles (TP positions x all C channels). Per tile:
//   phase 1: per position, dot products over C against G "probe" C-vectors (norms: f
//            itself; step: the representative r; bwd_reduce: dv[k]), finished into the
//            per-position outputs (nrm, s or dw) and phase-2 weights held in shared memory;
//   phase 2: re-reads the tile (which the tile size keeps in L1/L2) and accumulates
//            sum_i weight[w][i] * f_i into per-block C-vectors in shared memory.
// Every accumulator slot has one owner thread for the whole block, so no atomics are
// needed; the per-block vectors then go to a partials buffer that a small kernel sums
// in block order. Results are deterministic for a given device and shape.
//
// bwd_dx is a rank-J update: df = a^T m - c * f. A block owns a tile of rows x columns;
// the J coefficients of its rows and columns are staged in shared memory, each thread
// holds a 4 x VEC output tile in registers, and x is read once and df written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../check.h"
#include "brnpa_plan.h"

namespace manet_kernels {
namespace {

// kThreads, kWarps, the tile constants, Mode and the launch plans: brnpa_plan.h.
using namespace brnpa_plan;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// N consecutive values from p, converted to acc_t. p must be aligned to sizeof(T)*N,
// or to 16 bytes when N elements span more (loads are split into 16-byte pieces).
template <int N, typename T, typename acc_t>
__device__ __forceinline__ void load_n(const T* p, acc_t (&out)[N]) {
  constexpr int kPiece = (sizeof(T) * N <= 16) ? N : static_cast<int>(16 / sizeof(T));
  static_assert(N % kPiece == 0, "piece must divide N");
#pragma unroll
  for (int q = 0; q < N / kPiece; ++q) {
    const Pack<T, kPiece> pk = *reinterpret_cast<const Pack<T, kPiece>*>(p + q * kPiece);
#pragma unroll
    for (int v = 0; v < kPiece; ++v) out[q * kPiece + v] = static_cast<acc_t>(pk.v[v]);
  }
}

__host__ __device__ constexpr int ilog2(int v) {
  return v <= 1 ? 0 : 1 + ilog2(v / 2);
}
static_assert((1 << ilog2(kThreads)) == kThreads && (1 << ilog2(kDxRows)) == kDxRows,
              "bwd_dx tiles index with shifts");

__device__ __forceinline__ int64_t clamp_pos(int64_t p, int64_t P) {
  return p < 0 ? 0 : (p >= P ? P - 1 : p);
}

__device__ __forceinline__ float sqrt_rn(float v) {
  return __fsqrt_rn(v);
}
__device__ __forceinline__ double sqrt_rn(double v) {
  return __dsqrt_rn(v);
}

template <typename acc_t>
struct ReduceArgs {
  const acc_t* inv = nullptr;    // inv_nrm (B, P)
  const int64_t* idx = nullptr;  // step: (B,)
  const acc_t* probe = nullptr;  // step: r (B, C); bwd: dv (B, Ktot, C)
  const acc_t* dmap = nullptr;   // bwd: (B, Ktot, P)
  acc_t* out_pos = nullptr;      // nrm, s: (B, P); dw: (B, Ktot, P)
  acc_t* out_main = nullptr;     // sv: (B, C); u: (B, Ktot, C)
  acc_t* out_extra = nullptr;    // t: (B, C)
  acc_t* partial = nullptr;      // (B, nblk, nw, C) when nblk > 1
  int64_t C = 0, P = 0;
  int64_t Ktot = 1;    // rows of probe / dmap / out_pos / out_main per sample
  int64_t k0 = 0;      // first probe of this launch
  int nk = 1;          // probes in this launch
  int nw = 0;          // phase-2 weights: nk probes' weights, then t's when with_t
  int log2l = 0;       // lanes per channel row (NCHW) or per position team (CL), log2
  int TP = 1;          // positions per tile
  int nsub = 1;        // CL phase 2: position subsets per channel chunk
  int nblk = 1;        // blocks per sample
  int64_t ntiles = 1;  // tiles per sample
};

// Where the final value of weight w, channel c of sample b goes.
template <typename acc_t>
__device__ __forceinline__ acc_t* result_slot(const ReduceArgs<acc_t>& a, int64_t b, int w,
                                              int64_t c) {
  if (w < a.nk) return a.out_main + (b * a.Ktot + a.k0 + w) * a.C + c;
  return a.out_extra + b * a.C + c;
}

// Phase-1 result d of probe k at tile position i (position pos): the per-position output
// and the phase-2 weights. Positions past the map get weight 0.
template <int MODE, typename acc_t>
__device__ __forceinline__ void finish_position(const ReduceArgs<acc_t>& a, acc_t* swt, int64_t b,
                                                int64_t pos, int i, int k, acc_t d, acc_t inv_r) {
  if (pos >= a.P) {
    if constexpr (MODE != kNorms) swt[k * a.TP + i] = acc_t(0);
    return;
  }
  if constexpr (MODE == kNorms) {
    a.out_pos[b * a.P + pos] = sqrt_rn(d);
  } else if constexpr (MODE == kStep) {
    // (dot * inv_i) * inv_r: the reference's order of the two products
    const acc_t s = d * a.inv[b * a.P + pos] * inv_r;
    a.out_pos[b * a.P + pos] = s;
    swt[i] = s;
  } else {
    const int64_t row = (b * a.Ktot + a.k0 + k) * a.P + pos;
    const acc_t dw = d + a.dmap[row];
    a.out_pos[row] = dw;
    swt[k * a.TP + i] = dw * a.inv[b * a.P + pos];
  }
}

// Shared memory (acc_t): sacc [nsub][nw][C], swt [nw][TP], then NCHW only sred
// [kWarps][G][TP]. Blocks: blockIdx.x = b * nblk + blk, block blk of sample b owns tiles
// [blk*ntiles/nblk, (blk+1)*ntiles/nblk).
template <typename scalar_t, int VEC, int MODE, bool CL>
__global__ void __launch_bounds__(kThreads, 2)
    _brnpa_reduce_kernel(const scalar_t* __restrict__ x,
                         const ReduceArgs<at::opmath_type<scalar_t>> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int G = MODE == kBwd ? kBwdGroup : 1;
  constexpr bool kPhase2 = MODE != kNorms;
  // Independent loads in flight per thread and sweep step: 4 x 16 B, or 8 scalars
  // (not measured yet).
  constexpr int U = VEC == 1 ? 8 : 4;
  extern __shared__ __align__(16) unsigned char brnpa_smem[];
  acc_t* const sacc = reinterpret_cast<acc_t*>(brnpa_smem);
  acc_t* const swt = sacc + static_cast<int64_t>(a.nsub) * a.nw * a.C;
  acc_t* const sred = swt + static_cast<int64_t>(a.nw) * a.TP;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t C = a.C;
  const int64_t P = a.P;
  const int TP = a.TP;
  const int64_t b = blockIdx.x / a.nblk;
  const int blk = static_cast<int>(blockIdx.x - b * a.nblk);
  const int64_t t_begin = blk * a.ntiles / a.nblk;
  const int64_t t_end = (blk + 1) * a.ntiles / a.nblk;
  const int nk = a.nk;
  const int nw = a.nw;

  acc_t inv_r = acc_t(0);
  if constexpr (MODE == kStep) {
    // idx is not range-checked on the host (that would sync): clamp so a bad value
    // reads a valid position instead of faulting. The gather of r clamps the same way.
    inv_r = a.inv[b * P + clamp_pos(a.idx[b], P)];
  }
  if constexpr (kPhase2) {
    const int64_t nacc = static_cast<int64_t>(a.nsub) * nw * C;
    for (int64_t e = tid; e < nacc; e += kThreads) sacc[e] = acc_t(0);
  }

  // Thread roles. NCHW: PL lanes per channel row, VEC positions per lane, channel group
  // cg of CG. CL: teams of TL lanes per position, VEC channels per lane.
  const int nl = 1 << a.log2l;
  const int li = tid & (nl - 1);
  const int grp = tid >> a.log2l;
  const int ngrp = kThreads >> a.log2l;

  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    const int64_t p0 = tile * TP;
    __syncthreads();  // the previous tile's readers of swt / sred are done
    if constexpr (MODE == kBwd) {
      if (nw > nk) {  // t's weight: inv_i
        for (int i = tid; i < TP; i += kThreads) {
          const int64_t pos = p0 + i;
          swt[nk * TP + i] = pos < P ? a.inv[b * P + pos] : acc_t(0);
        }
      }
    }

    // ---------------------------------------------------------------- phase 1
    if constexpr (!CL) {
      const int64_t pos0 = p0 + static_cast<int64_t>(li) * VEC;
      // P % VEC == 0 when VEC > 1, so a vector is wholly inside the map or wholly past it
      const bool pok = pos0 < P;
      for (int g0 = 0; g0 < nk; g0 += G) {
        acc_t d[G][VEC];
#pragma unroll
        for (int k = 0; k < G; ++k)
#pragma unroll
          for (int v = 0; v < VEC; ++v) d[k][v] = acc_t(0);
        // trip count uniform over the block: every lane reaches the shuffles below
        for (int64_t cb = 0; cb < C; cb += static_cast<int64_t>(ngrp) * U) {
          acc_t f[U][VEC];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int64_t c = cb + u * ngrp + grp;
            if (pok && c < C) {
              load_n<VEC>(x + (b * C + c) * P + pos0, f[u]);
            } else {
#pragma unroll
              for (int v = 0; v < VEC; ++v) f[u][v] = acc_t(0);
            }
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int64_t c = cb + u * ngrp + grp;
            if constexpr (MODE == kNorms) {
#pragma unroll
              for (int v = 0; v < VEC; ++v) d[0][v] += f[u][v] * f[u][v];
            } else {
#pragma unroll
              for (int k = 0; k < G; ++k) {
                const acc_t pr = (c < C && g0 + k < nk)
                                     ? a.probe[(b * a.Ktot + a.k0 + g0 + k) * C + c]
                                     : acc_t(0);
#pragma unroll
                for (int v = 0; v < VEC; ++v) d[k][v] += f[u][v] * pr;
              }
            }
          }
        }
        // lanes PL, 2PL, ... apart hold the same positions: fold the warp's groups
        for (int off = nl; off < 32; off <<= 1) {
#pragma unroll
          for (int k = 0; k < G; ++k)
#pragma unroll
            for (int v = 0; v < VEC; ++v) d[k][v] += __shfl_xor_sync(kFullMask, d[k][v], off);
        }
        if (g0 > 0) __syncthreads();  // the previous group's readers of sred are done
        if (lane < nl) {
#pragma unroll
          for (int k = 0; k < G; ++k)
#pragma unroll
            for (int v = 0; v < VEC; ++v) sred[(warp * G + k) * TP + li * VEC + v] = d[k][v];
        }
        __syncthreads();
        for (int e = tid; e < G * TP; e += kThreads) {
          const int k = e / TP;
          const int i = e - k * TP;
          if (g0 + k >= nk) continue;
          acc_t s = sred[k * TP + i];
#pragma unroll
          for (int w = 1; w < kWarps; ++w) s += sred[(w * G + k) * TP + i];
          finish_position<MODE>(a, swt, b, p0 + i, i, g0 + k, s, inv_r);
        }
      }
    } else {
      for (int i0 = 0; i0 < TP; i0 += ngrp) {  // TP is a multiple of ngrp
        const int i = i0 + grp;
        const int64_t pos = p0 + i;
        const bool pok = pos < P;
        const scalar_t* const xrow = x + (b * P + pos) * C;
        for (int g0 = 0; g0 < nk; g0 += G) {
          acc_t d[G];
#pragma unroll
          for (int k = 0; k < G; ++k) d[k] = acc_t(0);
          for (int64_t cb = 0; cb < C; cb += static_cast<int64_t>(nl) * VEC * U) {
            acc_t f[U][VEC];
#pragma unroll
            for (int u = 0; u < U; ++u) {
              const int64_t c = cb + static_cast<int64_t>(u * nl + li) * VEC;
              if (pok && c < C) {  // C % VEC == 0 when VEC > 1
                load_n<VEC>(xrow + c, f[u]);
              } else {
#pragma unroll
                for (int v = 0; v < VEC; ++v) f[u][v] = acc_t(0);
              }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
              const int64_t c = cb + static_cast<int64_t>(u * nl + li) * VEC;
              if constexpr (MODE == kNorms) {
#pragma unroll
                for (int v = 0; v < VEC; ++v) d[0] += f[u][v] * f[u][v];
              } else {
                if (!(pok && c < C)) continue;
#pragma unroll
                for (int k = 0; k < G; ++k) {
                  if (g0 + k >= nk) continue;
                  acc_t pr[VEC];
                  load_n<VEC>(a.probe + (b * a.Ktot + a.k0 + g0 + k) * C + c, pr);
#pragma unroll
                  for (int v = 0; v < VEC; ++v) d[k] += f[u][v] * pr[v];
                }
              }
            }
          }
          for (int off = 1; off < nl; off <<= 1) {
#pragma unroll
            for (int k = 0; k < G; ++k) d[k] += __shfl_xor_sync(kFullMask, d[k], off);
          }
          if (li == 0) {
#pragma unroll
            for (int k = 0; k < G; ++k) {
              if (g0 + k < nk) finish_position<MODE>(a, swt, b, pos, i, g0 + k, d[k], inv_r);
            }
          }
        }
      }
    }

    // ---------------------------------------------------------------- phase 2
    if constexpr (kPhase2) {
      __syncthreads();  // swt complete
      if constexpr (!CL) {
        const int64_t pos0 = p0 + static_cast<int64_t>(li) * VEC;
        const bool pok = pos0 < P;
        for (int w0 = 0; w0 < nw; w0 += G) {
          acc_t wt[G][VEC];
#pragma unroll
          for (int k = 0; k < G; ++k)
#pragma unroll
            for (int v = 0; v < VEC; ++v)
              wt[k][v] = (pok && w0 + k < nw) ? swt[(w0 + k) * TP + li * VEC + v] : acc_t(0);
          for (int64_t cb = 0; cb < C; cb += static_cast<int64_t>(ngrp) * U) {
            acc_t f[U][VEC];
#pragma unroll
            for (int u = 0; u < U; ++u) {
              const int64_t c = cb + u * ngrp + grp;
              if (pok && c < C) {
                load_n<VEC>(x + (b * C + c) * P + pos0, f[u]);
              } else {
#pragma unroll
                for (int v = 0; v < VEC; ++v) f[u][v] = acc_t(0);
              }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
              const int64_t c = cb + u * ngrp + grp;
              acc_t val[G];
#pragma unroll
              for (int k = 0; k < G; ++k) {
                val[k] = acc_t(0);
#pragma unroll
                for (int v = 0; v < VEC; ++v) val[k] += wt[k][v] * f[u][v];
              }
              // the PL lanes of a row hold consecutive positions of one channel
              for (int off = 1; off < nl; off <<= 1) {
#pragma unroll
                for (int k = 0; k < G; ++k) val[k] += __shfl_xor_sync(kFullMask, val[k], off);
              }
              // lane 0 of (row group grp) owns channel c's slots for the whole block
              if (li == 0 && c < C) {
#pragma unroll
                for (int k = 0; k < G; ++k) {
                  if (w0 + k < nw) sacc[(w0 + k) * C + c] += val[k];
                }
              }
            }
          }
        }
      } else {
        const int nsub = a.nsub;
        const int64_t nch = (C + VEC - 1) / VEC;
        // item -> (chunk, subset) depends on tid only: each sacc slot has one owner
        for (int64_t it = tid; it < nch * nsub; it += kThreads) {
          const int sub = static_cast<int>(it / nch);
          const int64_t c = (it - sub * nch) * VEC;
          for (int w0 = 0; w0 < nw; w0 += G) {
            acc_t s[G][VEC];
#pragma unroll
            for (int k = 0; k < G; ++k)
#pragma unroll
              for (int v = 0; v < VEC; ++v) s[k][v] = acc_t(0);
            for (int ib = sub; ib < TP; ib += nsub * U) {
              acc_t f[U][VEC];
              bool ok[U];
#pragma unroll
              for (int u = 0; u < U; ++u) {
                const int ii = ib + u * nsub;
                const int64_t pos = p0 + ii;
                ok[u] = ii < TP && pos < P;
                if (ok[u]) {
                  load_n<VEC>(x + (b * P + pos) * C + c, f[u]);
                } else {
#pragma unroll
                  for (int v = 0; v < VEC; ++v) f[u][v] = acc_t(0);
                }
              }
#pragma unroll
              for (int u = 0; u < U; ++u) {
                if (!ok[u]) continue;
                const int ii = ib + u * nsub;
#pragma unroll
                for (int k = 0; k < G; ++k) {
                  const acc_t wv = w0 + k < nw ? swt[(w0 + k) * TP + ii] : acc_t(0);
#pragma unroll
                  for (int v = 0; v < VEC; ++v) s[k][v] += wv * f[u][v];
                }
              }
            }
#pragma unroll
            for (int k = 0; k < G; ++k) {
              if (w0 + k >= nw) continue;
              acc_t* const dst = sacc + (static_cast<int64_t>(sub) * nw + w0 + k) * C + c;
#pragma unroll
              for (int v = 0; v < VEC; ++v) {
                if (VEC == 1 || c + v < C) dst[v] += s[k][v];
              }
            }
          }
        }
      }
    }
  }

  if constexpr (kPhase2) {
    __syncthreads();  // sacc written by its owners
    const int64_t tot = static_cast<int64_t>(nw) * C;
    for (int64_t e = tid; e < tot; e += kThreads) {
      const int w = static_cast<int>(e / C);
      const int64_t c = e - w * C;
      acc_t s = sacc[w * C + c];
      for (int sub = 1; sub < a.nsub; ++sub) {
        s += sacc[(static_cast<int64_t>(sub) * nw + w) * C + c];
      }
      if (a.nblk == 1) {
        *result_slot(a, b, w, c) = s;
      } else {
        a.partial[((b * a.nblk + blk) * nw + w) * C + c] = s;
      }
    }
  }
}

// Sums the (B, nblk, nw, C) partials over blocks, in block order. Block = one (b, w) row;
// 32-bit index math (the host checks B * nw < 2^31) keeps 64-bit division calls out.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) _brnpa_finalize_kernel(const ReduceArgs<acc_t> a) {
  const unsigned nw = static_cast<unsigned>(a.nw);
  const int64_t b = blockIdx.x / nw;
  const int w = static_cast<int>(blockIdx.x - b * nw);
  const int64_t per_b = static_cast<int64_t>(a.nw) * a.C;
  const acc_t* const base = a.partial + b * a.nblk * per_b + w * a.C;
  for (int64_t c = threadIdx.x; c < a.C; c += kThreads) {
    const acc_t* p = base + c;
    acc_t s = p[0];
    for (int j = 1; j < a.nblk; ++j) s += p[j * per_b];
    *result_slot(a, b, w, c) = s;
  }
}

// r[b, c] = x[b, c, idx[b]] in acc dtype, idx clamped into [0, P).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    _brnpa_gather_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ idx,
                         at::opmath_type<scalar_t>* __restrict__ r, int64_t B, int64_t C, int64_t P,
                         bool cl) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = B * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += stride) {
    const int64_t b = o / C;
    const int64_t c = o - b * C;
    const int64_t p = clamp_pos(idx[b], P);
    r[o] = static_cast<acc_t>(x[cl ? (b * P + p) * C + c : (b * C + c) * P + p]);
  }
}

// ---------------------------------------------------------------------------------------
// bwd_dx

template <typename acc_t>
struct DxArgs {
  const acc_t* col = nullptr;  // coefficients along L: a (B, J, P) NCHW, m (B, J, C) CL
  const acc_t* row = nullptr;  // coefficients along R: m NCHW, a CL
  const acc_t* cc = nullptr;   // c (B, P)
  int64_t C = 0, P = 0, J = 0;
  int log2l = 0;         // lanes along L per row group, log2
  int jc = 1;            // coefficients per shared-memory stage
  int nrt = 1, nlt = 1;  // row / column tiles per sample
};

// Block (b, rt, lt) owns rows [rt*TROW, +TROW) x columns [lt*TCOL, +TCOL) of sample b;
// thread (rg, ls) rows rt*TROW + rg*kDxRows + [0, kDxRows), columns lt*TCOL + ls*VEC +
// [0, VEC). Shared memory (acc_t): s_col [jc][TCOL], s_row [jc][TROW], s_cc [positions],
// each start rounded to 16 bytes.
template <typename scalar_t, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads)
    _brnpa_bwd_dx_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                         const DxArgs<at::opmath_type<scalar_t>> d) {
  using acc_t = at::opmath_type<scalar_t>;
  using XPack = Pack<scalar_t, VEC>;
  constexpr int RPT = kDxRows;
  constexpr int kPad = 16 / sizeof(acc_t);
  extern __shared__ __align__(16) unsigned char brnpa_smem[];

  const int tid = threadIdx.x;
  const int nl = 1 << d.log2l;
  const int ls = tid & (nl - 1);
  const int rg = tid >> d.log2l;
  // Tile sides are powers of two: shifts instead of divisions keep the staging loops
  // light on registers.
  const int lg_col = d.log2l + ilog2(VEC);
  const int lg_row = ilog2(kThreads) - d.log2l + ilog2(RPT);
  const int TCOL = 1 << lg_col;
  const int TROW = 1 << lg_row;
  const int64_t R = CL ? d.P : d.C;
  const int64_t L = CL ? d.C : d.P;
  const int npos = CL ? TROW : TCOL;
  const int col_pad = (d.jc * TCOL + kPad - 1) / kPad * kPad;
  const int row_pad = (d.jc * TROW + kPad - 1) / kPad * kPad;
  acc_t* const s_col = reinterpret_cast<acc_t*>(brnpa_smem);
  acc_t* const s_row = s_col + col_pad;
  acc_t* const s_cc = s_row + row_pad;

  // 32-bit index math: the host keeps the grid below 2^31 blocks
  unsigned bid = blockIdx.x;
  const unsigned nlt = static_cast<unsigned>(d.nlt);
  const unsigned nrt = static_cast<unsigned>(d.nrt);
  const int64_t lt = bid % nlt;
  bid /= nlt;
  const int64_t rt = bid % nrt;
  const int64_t b = bid / nrt;
  const int64_t r0 = rt * TROW;
  const int64_t l0 = lt * TCOL;

  const int64_t pbase = CL ? r0 : l0;
  for (int i = tid; i < npos; i += kThreads) {
    const int64_t pos = pbase + i;
    s_cc[i] = pos < d.P ? d.cc[b * d.P + pos] : acc_t(0);
  }

  acc_t acc[RPT][VEC];
#pragma unroll
  for (int q = 0; q < RPT; ++q)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[q][v] = acc_t(0);

  for (int64_t j0 = 0; j0 < d.J; j0 += d.jc) {
    const int jn = d.J - j0 < d.jc ? static_cast<int>(d.J - j0) : d.jc;
    if (j0 > 0) __syncthreads();  // the previous stage's readers are done
    for (int e = tid; e < jn * TCOL; e += kThreads) {
      const int jj = e >> lg_col;
      const int l = e & (TCOL - 1);
      const int64_t gl = l0 + l;
      s_col[jj * TCOL + l] = gl < L ? d.col[(b * d.J + j0 + jj) * L + gl] : acc_t(0);
    }
    for (int e = tid; e < jn * TROW; e += kThreads) {
      const int jj = e >> lg_row;
      const int r = e & (TROW - 1);
      const int64_t gr = r0 + r;
      s_row[jj * TROW + r] = gr < R ? d.row[(b * d.J + j0 + jj) * R + gr] : acc_t(0);
    }
    __syncthreads();
#pragma unroll 2
    for (int jj = 0; jj < jn; ++jj) {
      acc_t cv[VEC];
      acc_t rv[RPT];
      load_n<VEC>(s_col + jj * TCOL + ls * VEC, cv);
      load_n<RPT>(s_row + jj * TROW + rg * RPT, rv);
#pragma unroll
      for (int q = 0; q < RPT; ++q)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[q][v] += rv[q] * cv[v];
    }
  }
  __syncthreads();  // s_cc (also when J == 0)

  // x is read here rather than before the staging: held across it, its registers spill
  const int64_t lc = l0 + static_cast<int64_t>(ls) * VEC;
  const bool lok = lc < L;  // L % VEC == 0 when VEC > 1
  acc_t xv[RPT][VEC];
#pragma unroll
  for (int q = 0; q < RPT; ++q) {
    const int64_t r = r0 + rg * RPT + q;
    if (lok && r < R) {
      load_n<VEC>(x + (b * R + r) * L + lc, xv[q]);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) xv[q][v] = acc_t(0);
    }
  }
#pragma unroll
  for (int q = 0; q < RPT; ++q) {
    const int64_t r = r0 + rg * RPT + q;
    if (!(lok && r < R)) continue;
    XPack o;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const acc_t cpos = CL ? s_cc[rg * RPT + q] : s_cc[ls * VEC + v];
      o.v[v] = static_cast<scalar_t>(acc[q][v] - cpos * xv[q][v]);
    }
    *reinterpret_cast<XPack*>(out + (b * R + r) * L + lc) = o;
  }
}

// ---------------------------------------------------------------------------------------
// Host side

// Calls f(std::integral_constant<int, VEC>) for the vec pick_vec chose.
template <typename scalar_t, typename F>
void with_vec(int vec, F&& f) {
  constexpr int V16 = 16 / sizeof(scalar_t);
  constexpr int V8 = 8 / sizeof(scalar_t);
  if (vec == V16) {
    f(std::integral_constant<int, V16>{});
    return;
  }
  if constexpr (V8 > 1) {
    if (vec == V8) {
      f(std::integral_constant<int, V8>{});
      return;
    }
  }
  f(std::integral_constant<int, 1>{});
}

size_t smem_limit() {
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

// Plans, launches the reduce kernel for `a` (pointers set) and combines partials.
template <typename scalar_t, int MODE>
void run_reduce(const char* op, const at::Tensor& x, bool cl,
                ReduceArgs<at::opmath_type<scalar_t>> a, int64_t B, const ReducePlan& pl) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  a.log2l = pl.log2l;
  a.TP = pl.TP;
  a.nsub = pl.nsub;
  a.ntiles = pl.ntiles;
  at::Tensor partial;
  with_vec<scalar_t>(pl.vec, [&](auto vc) {
    constexpr int VEC = decltype(vc)::value;
    auto launch = [&](auto kernel) {
      const int smem = static_cast<int>(pl.smem);
      if (pl.smem > 48 * 1024) {
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      }
      int per_sm = 0;
      C10_CUDA_CHECK(
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, pl.smem));
      const int64_t nblk = reduce_blocks_per_sample(
          per_sm, at::cuda::getCurrentDeviceProperties()->multiProcessorCount, B, pl.ntiles);
      MK_CHECK(B * nblk <= std::numeric_limits<int32_t>::max(), op,
               ": expected x to have fewer than 2^31 samples, got ", B);
      a.nblk = static_cast<int>(nblk);
      if (MODE != kNorms && nblk > 1) {
        partial = at::empty({B, nblk, static_cast<int64_t>(a.nw), a.C},
                            x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        a.partial = partial.data_ptr<acc_t>();
      }
      kernel<<<static_cast<unsigned>(B * nblk), kThreads, pl.smem, stream>>>(
          x.const_data_ptr<scalar_t>(), a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (cl) {
      launch(_brnpa_reduce_kernel<scalar_t, VEC, MODE, true>);
    } else {
      launch(_brnpa_reduce_kernel<scalar_t, VEC, MODE, false>);
    }
  });
  if (reduce_finalizes(MODE, a.nblk, a.nw)) {
    const int64_t rows = B * a.nw;
    MK_CHECK(rows <= std::numeric_limits<int32_t>::max(), op,
             ": expected x to have fewer samples, got B = ", B);
    _brnpa_finalize_kernel<acc_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---------------------------------------------------------------------------------------
// Argument checks

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_x(const char* op, const at::Tensor& x) {
  MK_CHECK(x.is_cuda(), op, ": expected x to be a CUDA tensor, got device ", x.device());
  MK_CHECK(x.dim() == 4, op, ": expected x to have rank 4 (B, C, H, W), got rank ", x.dim());
  const auto st = x.scalar_type();
  MK_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
           ": expected x to be float32, float16, bfloat16 or float64, got ", st);
}

// true for channels_last; a tensor that is both (C == 1 or H*W == 1) counts as NCHW,
// as passes._like_x decides.
bool is_channels_last(const char* op, const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  MK_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
           ": expected x to be NCHW-contiguous or channels_last-contiguous, got sizes ", x.sizes(),
           " and strides ", x.strides());
  return true;
}

void check_small(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                 at::ScalarType dtype, at::IntArrayRef shape) {
  MK_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(),
           " (the device of x), got ", t.device());
  MK_CHECK(t.scalar_type() == dtype, op, ": expected ", name, " to have dtype ", dtype,
           dtype == at::kLong ? " (flat position indices)" : " (the accumulation dtype)", ", got ",
           t.scalar_type());
  MK_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
  MK_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous, got strides ",
           t.strides());
}

void check_map(const char* op, const at::Tensor& x) {
  MK_CHECK(x.size(1) >= 1 && x.size(2) * x.size(3) >= 1, op,
           ": expected x to have C >= 1 and H*W >= 1, got sizes ", x.sizes());
}

struct Dims {
  int64_t B, C, H, W, P;
};

Dims dims_of(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) * x.size(3)};
}

// ---------------------------------------------------------------------------------------
// Ops

at::Tensor brnpa_norms_cuda(const at::Tensor& x) {
  constexpr const char* op = "brnpa_norms";
  check_x(op, x);
  const bool cl = is_channels_last(op, x);
  const Dims d = dims_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  if (d.B == 0 || d.P == 0) return at::empty({d.B, d.H, d.W}, opts);
  if (d.C == 0) return at::zeros({d.B, d.H, d.W}, opts);  // the norm of an empty vector
  at::Tensor nrm = at::empty({d.B, d.H, d.W}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ReduceArgs<acc_t> a;
    a.out_pos = nrm.data_ptr<acc_t>();
    a.C = d.C;
    a.P = d.P;
    a.nk = 1;
    a.nw = 0;
    const int vec = pick_vec<scalar_t>(cl ? d.C : d.P, {x.const_data_ptr()});
    const ReducePlan pl = plan_reduce(cl, d.C, d.P, vec, sizeof(scalar_t), sizeof(acc_t), 0, 1);
    MK_CHECK(pl.smem <= smem_limit(), op, ": internal error, shared memory plan too large");
    run_reduce<scalar_t, kNorms>(op, x, cl, a, d.B, pl);
  });
  return nrm;
}

std::tuple<at::Tensor, at::Tensor> brnpa_step_cuda(const at::Tensor& x, const at::Tensor& inv_nrm,
                                                   const at::Tensor& idx) {
  constexpr const char* op = "brnpa_step";
  check_x(op, x);
  const bool cl = is_channels_last(op, x);
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x.scalar_type());
  check_small(op, "inv_nrm", inv_nrm, x, acc, {d.B, d.H, d.W});
  check_small(op, "idx", idx, x, at::kLong, {d.B});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc);
  at::Tensor s = at::empty({d.B, d.H, d.W}, opts);
  at::Tensor sv = at::empty({d.B, d.C}, opts);
  if (d.B == 0) return {s, sv};
  check_map(op, x);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // r in acc dtype, contiguous: the probe every position is dotted with
    at::Tensor r = at::empty({d.B, d.C}, opts);
    const int64_t total = d.B * d.C;
    const int gblocks = gather_blocks(total);
    _brnpa_gather_kernel<scalar_t><<<gblocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), r.data_ptr<acc_t>(), d.B, d.C,
        d.P, cl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ReduceArgs<acc_t> a;
    a.inv = inv_nrm.const_data_ptr<acc_t>();
    a.idx = idx.const_data_ptr<int64_t>();
    a.probe = r.const_data_ptr<acc_t>();
    a.out_pos = s.data_ptr<acc_t>();
    a.out_main = sv.data_ptr<acc_t>();
    a.C = d.C;
    a.P = d.P;
    a.Ktot = 1;
    a.k0 = 0;
    a.nk = 1;
    a.nw = 1;
    const int vec = pick_vec<scalar_t>(cl ? d.C : d.P, {x.const_data_ptr()});
    const ReducePlan pl = plan_reduce(cl, d.C, d.P, vec, sizeof(scalar_t), sizeof(acc_t), 1, 1);
    MK_CHECK(pl.smem <= smem_limit(), op, ": expected x to have at most ",
             smem_limit() / sizeof(acc_t) / std::max(1, pl.nsub),
             " channels (one accumulator per channel in shared memory), got C = ", d.C);
    run_reduce<scalar_t, kStep>(op, x, cl, a, d.B, pl);
  });
  return {s, sv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> brnpa_bwd_reduce_cuda(const at::Tensor& x,
                                                                     const at::Tensor& inv_nrm,
                                                                     const at::Tensor& dv,
                                                                     const at::Tensor& dmap) {
  constexpr const char* op = "brnpa_bwd_reduce";
  check_x(op, x);
  const bool cl = is_channels_last(op, x);
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x.scalar_type());
  check_small(op, "inv_nrm", inv_nrm, x, acc, {d.B, d.H, d.W});
  MK_CHECK(dv.dim() == 3, op, ": expected dv of shape (B, K, C), got ", dv.sizes());
  const int64_t K = dv.size(1);
  check_small(op, "dv", dv, x, acc, {d.B, K, d.C});
  check_small(op, "dmap", dmap, x, acc, {d.B, K, d.H, d.W});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc);
  at::Tensor dw = at::empty({d.B, K, d.H, d.W}, opts);
  at::Tensor u = at::empty({d.B, K, d.C}, opts);
  at::Tensor t = at::empty({d.B, d.C}, opts);
  if (d.B == 0) return {dw, u, t};
  check_map(op, x);
  MK_CHECK(K <= std::numeric_limits<int32_t>::max(), op,
           ": expected dv to have fewer than 2^31 parts, got K = ", K);
  // probe rows are read in 16-byte pieces in channels_last; a copy fixes an odd view
  const at::Tensor dvc =
      reinterpret_cast<uintptr_t>(dv.const_data_ptr()) % 16 == 0 ? dv : dv.clone();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int vec = pick_vec<scalar_t>(cl ? d.C : d.P, {x.const_data_ptr()});
    for (const BwdChunk& ch :
         plan_bwd_chunks(cl, d.C, d.P, vec, sizeof(scalar_t), sizeof(acc_t), K, smem_limit())) {
      const ReducePlan& pl = ch.pl;
      MK_CHECK(pl.smem <= smem_limit(), op, ": expected x to have fewer channels (C = ", d.C,
               "): two accumulators per channel must fit in shared memory (", smem_limit(),
               " bytes)");
      ReduceArgs<acc_t> a;
      a.inv = inv_nrm.const_data_ptr<acc_t>();
      a.probe = dvc.const_data_ptr<acc_t>();
      a.dmap = dmap.const_data_ptr<acc_t>();
      a.out_pos = dw.data_ptr<acc_t>();
      a.out_main = u.data_ptr<acc_t>();
      a.out_extra = t.data_ptr<acc_t>();
      a.C = d.C;
      a.P = d.P;
      a.Ktot = K;
      a.k0 = ch.k0;
      a.nk = static_cast<int>(ch.nk);
      a.nw = static_cast<int>(ch.nk + ch.with_t);
      run_reduce<scalar_t, kBwd>(op, x, cl, a, d.B, pl);
    }
  });
  return {dw, u, t};
}

at::Tensor brnpa_bwd_dx_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& m,
                             const at::Tensor& c) {
  constexpr const char* op = "brnpa_bwd_dx";
  check_x(op, x);
  const bool cl = is_channels_last(op, x);
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x.scalar_type());
  MK_CHECK(a.dim() == 4, op, ": expected a of shape (B, J, H, W), got ", a.sizes());
  const int64_t J = a.size(1);
  check_small(op, "a", a, x, acc, {d.B, J, d.H, d.W});
  check_small(op, "m", m, x, acc, {d.B, J, d.C});
  check_small(op, "c", c, x, acc, {d.B, d.H, d.W});
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor df =
      at::empty(x.sizes(), x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                        : at::MemoryFormat::Contiguous));
  if (df.numel() == 0) return df;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t L = cl ? d.C : d.P;
    const int vec = pick_vec<scalar_t>(L, {x.const_data_ptr(), df.const_data_ptr()});
    const DxPlan pl = plan_dx(cl, d.B, d.C, d.P, vec, sizeof(acc_t));
    const int lanes = pl.lanes;
    const int jc = pl.jc;
    const size_t smem = pl.smem;
    DxArgs<acc_t> args;
    args.col = (cl ? m : a).const_data_ptr<acc_t>();
    args.row = (cl ? a : m).const_data_ptr<acc_t>();
    args.cc = c.const_data_ptr<acc_t>();
    args.C = d.C;
    args.P = d.P;
    args.J = J;
    args.log2l = log2_of(lanes);
    args.jc = jc;
    const int64_t nrt = pl.nrt;
    const int64_t nlt = pl.nlt;
    const int64_t blocks = pl.blocks;
    MK_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op,
             ": expected x small enough for one launch (", blocks, " tiles)");
    args.nrt = static_cast<int>(nrt);
    args.nlt = static_cast<int>(nlt);
    with_vec<scalar_t>(vec, [&](auto vc) {
      constexpr int VEC = decltype(vc)::value;
      if (cl) {
        _brnpa_bwd_dx_kernel<scalar_t, VEC, true>
            <<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
                x.const_data_ptr<scalar_t>(), df.data_ptr<scalar_t>(), args);
      } else {
        _brnpa_bwd_dx_kernel<scalar_t, VEC, false>
            <<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
                x.const_data_ptr<scalar_t>(), df.data_ptr<scalar_t>(), args);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return df;
}

}  // namespace
}  // namespace manet_kernels

TORCH_LIBRARY_IMPL(manet_kernels, CUDA, m) {
  m.impl("_brnpa_norms", &manet_kernels::brnpa_norms_cuda);
  m.impl("_brnpa_step", &manet_kernels::brnpa_step_cuda);
  m.impl("_brnpa_bwd_reduce", &manet_kernels::brnpa_bwd_reduce_cuda);
  m.impl("_brnpa_bwd_dx", &manet_kernels::brnpa_bwd_dx_cuda);
}
