// CUDA kernels for the six mixed-attention passes (docs/design.md §1).
// The contract, dtypes and index semantics included, is manet_kernels/reference/passes.py.
//
// Every pass views the activation as (N, R, L) with L its contiguous axis:
// (N, C, P) for NCHW and (N, P, C) for channels_last. One templated tile kernel serves
// all six ops in both layouts: a block owns a tile of rows x columns of one sample,
// lanes run along L so global loads are coalesced, and the tile reduces
//   - along L ("row" results, one per (n, r)): shuffles inside a team of lanes;
//   - along R ("column" results, one per (n, l)): per-thread registers, then warp
//     shuffles and shared memory.
// A reduction over p is along L in NCHW and along R in channels_last (the reverse for
// a reduction over c). When a reduction crosses tiles, tiles write partials and a small
// second kernel combines them in a fixed order, so results are deterministic run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

#include "../check.h"
#include "../spatial_conv_checks.h"
#include "mixed_attention_plan.h"

namespace manet_kernels {
namespace {

// OpKind, OpTraits, kWarps, kThreads, the tile plan: csrc/cuda/mixed_attention_plan.h.
using namespace ma_plan;

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// Vector stores in inline PTX: a plain store of a Pack filled element by element
// compiles to 32-bit pieces, and __stwb to strong stores (both seen in SASS).
template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_pack(scalar_t* dst, const Pack<scalar_t, VEC>& p) {
  constexpr int kBytes = sizeof(Pack<scalar_t, VEC>);
  if constexpr (kBytes == 16) {
    uint32_t w[4];
    memcpy(w, &p, sizeof(w));
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3]));
  } else if constexpr (kBytes == 8) {
    uint32_t w[2];
    memcpy(w, &p, sizeof(w));
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(dst), "r"(w[0]), "r"(w[1]));
  } else {
    *reinterpret_cast<Pack<scalar_t, VEC>*>(dst) = p;
  }
}

template <typename acc_t>
struct Side {
  acc_t a = acc_t(0);
  acc_t b = acc_t(0);
  acc_t c = acc_t(0);
  int32_t i = -1;
};

template <typename scalar_t, typename acc_t>
struct TileArgs {
  const scalar_t* in = nullptr;   // x; g for bwd_reduce and bwd_dx
  const scalar_t* in2 = nullptr;  // x for bwd_reduce
  scalar_t* out = nullptr;        // y / dx
  const acc_t* mc = nullptr;
  const acc_t* ms = nullptr;
  const acc_t* das = nullptr;
  const acc_t* dms = nullptr;
  const acc_t* davg = nullptr;
  const acc_t* dmx = nullptr;
  const int32_t* ic = nullptr;
  const int32_t* im = nullptr;
  // Row results: final (N, R) when nLT == 1, partials (N, nLT, R) otherwise; columns
  // likewise with (N, L) and (N, nRT, L).
  acc_t* row_sum = nullptr;
  acc_t* row_max = nullptr;
  int32_t* row_idx = nullptr;
  acc_t* col_sum = nullptr;
  acc_t* col_max = nullptr;
  int32_t* col_idx = nullptr;
  acc_t row_scale = acc_t(1);  // 1/count for a mean, 1 for sums and partials
  acc_t col_scale = acc_t(1);
  acc_t inv_c = acc_t(1);
  acc_t inv_p = acc_t(1);
  int64_t R = 0, L = 0;
  int64_t RT = 0;  // rows per tile, a multiple of the rows one block pass covers
  int64_t nRT = 1, nLT = 1;
  int log2tl = 5;  // lanes per row team, log2
  int kl = 1;      // chunks of TL*VEC columns per tile (>1 only for kMultiChunk ops)
};

// Rounded multiply/add that nvcc may not contract into an FMA: the elementwise passes
// and the max values then round exactly like the PyTorch reference's separate ops.
__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}
__device__ __forceinline__ float add_rn(float a, float b) {
  return __fadd_rn(a, b);
}
__device__ __forceinline__ double add_rn(double a, double b) {
  return __dadd_rn(a, b);
}

// (value, index) order of torch.max(dim): NaN beats every number, then the larger value,
// then the lower index. An index < 0 marks an empty slot, which loses to anything.
template <typename acc_t>
__device__ __forceinline__ bool better(acc_t va, int32_t ia, acc_t vb, int32_t ib) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  const bool na = isnan(va), nb = isnan(vb);
  if (na || nb) return na && (!nb || ia < ib);
  return va > vb || (va == vb && ia < ib);
}

// Cheaper form of `better` for one thread's own elements, which it visits in
// increasing index order: an equal later value never wins and a NaN sticks.
template <typename acc_t>
__device__ __forceinline__ void take_max(acc_t& m, int32_t& mi, acc_t v, int32_t vi) {
  if (mi < 0 || v > m || (isnan(v) && !isnan(m))) {
    m = v;
    mi = vi;
  }
}

template <typename acc_t>
__device__ __forceinline__ void shfl_combine(acc_t& s, acc_t& m, int32_t& mi, int off,
                                             bool with_max) {
  s += __shfl_xor_sync(0xffffffffu, s, off);
  if (with_max) {
    const acc_t om = __shfl_xor_sync(0xffffffffu, m, off);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, mi, off);
    if (better(om, oi, m, mi)) {
      m = om;
      mi = oi;
    }
  }
}

// d_avg/P and da_s/C are taken as a product with the reciprocal, as PyTorch's CUDA
// division by a Python number computes them: bwd_dx can then match the reference bitwise.
template <int OP, typename scalar_t, typename acc_t>
__device__ __forceinline__ Side<acc_t> load_c_side(const TileArgs<scalar_t, acc_t>& a,
                                                   int64_t idx) {
  Side<acc_t> s;
  if constexpr (OP == kSpatialPool || OP == kApply || OP == kBwdReduce || OP == kBwdDx) {
    s.a = a.mc[idx];
  }
  if constexpr (OP == kBwdDx) {
    s.b = mul_rn(a.davg[idx], a.inv_p);
    s.c = a.dmx[idx];
    s.i = a.im[idx];
  }
  return s;
}

template <int OP, typename scalar_t, typename acc_t>
__device__ __forceinline__ Side<acc_t> load_p_side(const TileArgs<scalar_t, acc_t>& a,
                                                   int64_t idx) {
  Side<acc_t> s;
  if constexpr (OP == kApply || OP == kBwdReduce || OP == kBwdDx) {
    s.a = a.ms[idx];
  }
  if constexpr (OP == kBwdChannel || OP == kBwdDx) {
    s.b = mul_rn(a.das[idx], a.inv_c);
    s.c = a.dms[idx];
    s.i = a.ic[idx];
  }
  return s;
}

// Block b owns rows [r0, r0 + RT) x columns [l0, l0 + kl*TL*VEC) of sample n. Inside a
// warp, teams of TL lanes each take one row; lane ls of a team covers columns
// l0 + (k*TL + ls)*VEC + [0, VEC). Rows r0 + j*RB + row_in_pass, RB rows per block pass.
// Two blocks per SM at least (<= 128 registers): 16 warps x 4 vector loads in flight
// per thread cover H100's latency-bandwidth product with room to spare (not measured yet).
template <typename scalar_t, int VEC, int OP, bool CL>
__global__ void __launch_bounds__(kThreads, 2)
    _mixed_attention_tile_kernel(const TileArgs<scalar_t, at::opmath_type<scalar_t>> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using T = OpTraits<OP, CL>;
  using PackT = Pack<scalar_t, VEC>;
  // Rows in flight per thread: 4 vector loads of 8-16 B, or 8 narrower scalar loads.
  constexpr int U = VEC * sizeof(scalar_t) >= 8 ? 4 : 8;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  const int log2tl = a.log2tl;
  const int tl = 1 << log2tl;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int ls = lane & (tl - 1);
  const int rows_per_pass = kWarps << (5 - log2tl);
  const int row_in_pass = (warp << (5 - log2tl)) + (lane >> log2tl);
  const int kl = T::kMultiChunk ? a.kl : 1;
  const int64_t chunk_w = static_cast<int64_t>(tl) * VEC;

  int64_t b = blockIdx.x;
  const int64_t lt = b % a.nLT;
  b /= a.nLT;
  const int64_t rt = b % a.nRT;
  const int64_t n = b / a.nRT;
  const int64_t r0 = rt * a.RT;
  const int64_t r_end = r0 + a.RT < a.R ? r0 + a.RT : a.R;
  const int64_t l_tile = lt * chunk_w * kl;
  const int64_t l_thr = l_tile + static_cast<int64_t>(ls) * VEC;
  // uniform over the block: every lane runs every shuffle below
  const int passes = static_cast<int>((r_end - r0 + rows_per_pass - 1) / rows_per_pass);

  Side<acc_t> cside[VEC];
  if constexpr (T::kColData) {
    if (l_thr < a.L) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int64_t idx = n * a.L + l_thr + v;
        cside[v] = CL ? load_c_side<OP>(a, idx) : load_p_side<OP>(a, idx);
      }
    }
  }

  acc_t csum[VEC];
  acc_t cmax[VEC];
  int32_t cidx[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    csum[v] = acc_t(0);
    cmax[v] = kNegInf;
    cidx[v] = -1;
  }

  for (int pass = 0; pass < passes; pass += U) {
    int64_t r[U];
    bool rok[U];
    Side<acc_t> rside[U];
    acc_t rsum[U];
    acc_t rmax[U];
    int32_t ridx[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      r[u] = r0 + static_cast<int64_t>(pass + u) * rows_per_pass + row_in_pass;
      rok[u] = r[u] < r_end;
      rsum[u] = acc_t(0);
      rmax[u] = kNegInf;
      ridx[u] = -1;
      if constexpr (T::kRowData) {
        if (rok[u]) {
          const int64_t idx = n * a.R + r[u];
          rside[u] = CL ? load_p_side<OP>(a, idx) : load_c_side<OP>(a, idx);
        }
      }
    }

    // 2 x U loads in flight when a tile sweeps several chunks; deeper unrolling spills.
#pragma unroll 2
    for (int k = 0; k < kl; ++k) {
      const int64_t l = l_thr + k * chunk_w;
      const bool lok = l < a.L;
      PackT p0[U];
      PackT p1[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (rok[u] && lok) {
          const int64_t off = (n * a.R + r[u]) * a.L + l;
          p0[u] = *reinterpret_cast<const PackT*>(a.in + off);
          if constexpr (T::kTwoInputs) p1[u] = *reinterpret_cast<const PackT*>(a.in2 + off);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!(rok[u] && lok)) continue;
        PackT po;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const int32_t li = static_cast<int32_t>(l + v);
          const int32_t ri = static_cast<int32_t>(r[u]);
          const int32_t c = CL ? li : ri;
          const int32_t p = CL ? ri : li;
          const Side<acc_t>& cs = CL ? cside[v] : rside[u];
          const Side<acc_t>& ps = CL ? rside[u] : cside[v];
          const acc_t x0 = static_cast<acc_t>(p0[u].v[v]);
          acc_t val = acc_t(0);   // the reduced value (sum, and max where kMax)
          acc_t val2 = acc_t(0);  // bwd_reduce's column value
          if constexpr (OP == kChannelPool) {
            val = x0;
          } else if constexpr (OP == kSpatialPool) {
            val = mul_rn(x0, cs.a);
          } else if constexpr (OP == kBwdChannel) {
            val = x0 * ps.b;
            if (ps.i == c) val += ps.c * x0;
          } else if constexpr (OP == kBwdReduce) {
            const acc_t gx = mul_rn(x0, static_cast<acc_t>(p1[u].v[v]));
            val = gx * cside[v].a;   // row: weight of the column's index
            val2 = gx * rside[u].a;  // column: weight of the row's index
          } else if constexpr (OP == kApply) {
            po.v[v] = static_cast<scalar_t>(mul_rn(mul_rn(x0, cs.a), ps.a));
          } else if constexpr (OP == kBwdDx) {
            // mc*(g*ms + da_s/C + dm_s*[c == ic]) + d_avg/P + d_mx*[p == im], in the
            // reference's order of operations
            const acc_t inner =
                add_rn(add_rn(mul_rn(x0, ps.a), ps.b), mul_rn(ps.c, acc_t(ps.i == c ? 1 : 0)));
            po.v[v] = static_cast<scalar_t>(
                add_rn(add_rn(mul_rn(cs.a, inner), cs.b), mul_rn(cs.c, acc_t(cs.i == p ? 1 : 0))));
          }
          if constexpr (T::kRowRed) {
            rsum[u] += val;
            if constexpr (T::kMax) take_max(rmax[u], ridx[u], val, li);
          }
          if constexpr (T::kColRed) {
            const acc_t cv = OP == kBwdReduce ? val2 : val;
            csum[v] += cv;
            if constexpr (T::kMax) take_max(cmax[v], cidx[v], cv, ri);
          }
        }
        if constexpr (T::kWrites) {
          store_pack(a.out + (n * a.R + r[u]) * a.L + l, po);
        }
      }
    }

    if constexpr (T::kRowRed) {
      for (int off = 1; off < tl; off <<= 1) {
#pragma unroll
        for (int u = 0; u < U; ++u) shfl_combine(rsum[u], rmax[u], ridx[u], off, T::kMax);
      }
      if (ls == 0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (!rok[u]) continue;
          const int64_t o = (n * a.nLT + lt) * a.R + r[u];  // == n*R + r when nLT == 1
          a.row_sum[o] = mul_rn(rsum[u], a.row_scale);
          if constexpr (T::kMax) {
            a.row_max[o] = rmax[u];
            a.row_idx[o] = ridx[u];
          }
        }
      }
    }
  }

  if constexpr (T::kColRed) {
    // Lanes with the same ls hold the same columns: fold the row teams of each warp,
    // then the warps, always in the same order.
    for (int off = tl; off < 32; off <<= 1) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) shfl_combine(csum[v], cmax[v], cidx[v], off, T::kMax);
    }
    __shared__ acc_t s_sum[kWarps][32 * VEC];
    __shared__ acc_t s_max[T::kMax ? kWarps : 1][T::kMax ? 32 * VEC : 1];
    __shared__ int32_t s_idx[T::kMax ? kWarps : 1][T::kMax ? 32 * VEC : 1];
    if (lane < tl) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        s_sum[warp][ls * VEC + v] = csum[v];
        if constexpr (T::kMax) {
          s_max[warp][ls * VEC + v] = cmax[v];
          s_idx[warp][ls * VEC + v] = cidx[v];
        }
      }
    }
    __syncthreads();
    const int t = threadIdx.x;  // column l_tile + t; tl*VEC <= 256 == kThreads
    if (t < tl * VEC && l_tile + t < a.L) {
      acc_t s = s_sum[0][t];
      acc_t m = kNegInf;
      int32_t mi = -1;
      if constexpr (T::kMax) {
        m = s_max[0][t];
        mi = s_idx[0][t];
      }
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        s += s_sum[w][t];
        if constexpr (T::kMax) {
          if (better(s_max[w][t], s_idx[w][t], m, mi)) {
            m = s_max[w][t];
            mi = s_idx[w][t];
          }
        }
      }
      const int64_t o = (n * a.nRT + rt) * a.L + l_tile + t;  // == n*L + l when nRT == 1
      a.col_sum[o] = mul_rn(s, a.col_scale);
      if constexpr (T::kMax) {
        a.col_max[o] = m;
        a.col_idx[o] = mi;
      }
    }
  }
}

// Combines S partials laid out (N, S, K) into (N, K), in order of s.
template <typename acc_t, bool MAX>
__global__ void __launch_bounds__(kThreads)
    _mixed_attention_finalize_kernel(const acc_t* __restrict__ psum, const acc_t* __restrict__ pmax,
                                     const int32_t* __restrict__ pidx, acc_t* __restrict__ osum,
                                     acc_t* __restrict__ omax, int32_t* __restrict__ oidx,
                                     int64_t K, int64_t S, int64_t total, acc_t scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += stride) {
    const int64_t n = o / K;
    const int64_t base = n * S * K + (o - n * K);
    acc_t s = acc_t(0);
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    int32_t mi = -1;
    for (int64_t j = 0; j < S; ++j) {
      s += psum[base + j * K];
      if constexpr (MAX) {
        const acc_t v = pmax[base + j * K];
        const int32_t vi = pidx[base + j * K];
        if (better(v, vi, m, mi)) {
          m = v;
          mi = vi;
        }
      }
    }
    osum[o] = mul_rn(s, scale);
    if constexpr (MAX) {
      omax[o] = m;
      oidx[o] = mi;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side

template <typename acc_t>
struct Result {  // where a reduction's (N, K) results go
  acc_t* sum = nullptr;
  acc_t* max = nullptr;
  int32_t* idx = nullptr;
  acc_t scale = acc_t(1);
};

template <typename acc_t>
void launch_finalize(const at::Tensor& psum, const at::Tensor& pmax, const at::Tensor& pidx,
                     const Result<acc_t>& out, int64_t N, int64_t S, int64_t K, bool with_max,
                     cudaStream_t stream) {
  const int64_t total = N * K;
  const int blocks = finalize_blocks(total);
  if (with_max) {
    _mixed_attention_finalize_kernel<acc_t, true><<<blocks, kThreads, 0, stream>>>(
        psum.data_ptr<acc_t>(), pmax.data_ptr<acc_t>(), pidx.data_ptr<int32_t>(), out.sum, out.max,
        out.idx, K, S, total, out.scale);
  } else {
    _mixed_attention_finalize_kernel<acc_t, false>
        <<<blocks, kThreads, 0, stream>>>(psum.data_ptr<acc_t>(), nullptr, nullptr, out.sum,
                                          nullptr, nullptr, K, S, total, out.scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per-tile partials (N, tiles, K) of one reduction direction, summed by launch_finalize.
struct Partials {
  at::Tensor sum, max, idx;
};

// Where the tile kernel writes one reduction direction's (N, K) results: straight into
// `out` when one tile covers the direction, else into partials allocated in `p` (scale 1,
// max and idx only with `with_max`).
template <typename acc_t>
Result<acc_t> reduction_target(const Result<acc_t>& out, int64_t N, int64_t tiles, int64_t K,
                               bool with_max, const at::TensorOptions& opts, Partials& p) {
  if (tiles == 1) return out;
  Result<acc_t> r;
  p.sum = at::empty({N, tiles, K}, opts);
  r.sum = p.sum.data_ptr<acc_t>();
  if (with_max) {
    p.max = at::empty({N, tiles, K}, opts);
    p.idx = at::empty({N, tiles, K}, opts.dtype(at::kInt));
    r.max = p.max.data_ptr<acc_t>();
    r.idx = p.idx.data_ptr<int32_t>();
  }
  return r;
}

template <typename scalar_t, int OP, bool CL, int VEC>
void launch_tile(const TileArgs<scalar_t, at::opmath_type<scalar_t>>& a, int64_t blocks,
                 cudaStream_t stream) {
  _mixed_attention_tile_kernel<scalar_t, VEC, OP, CL>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int OP, bool CL>
void launch_tile_vec(const TileArgs<scalar_t, at::opmath_type<scalar_t>>& a, int vec,
                     int64_t blocks, cudaStream_t stream) {
  constexpr int V16 = 16 / sizeof(scalar_t);
  constexpr int V8 = 8 / sizeof(scalar_t);
  if (vec == V16) {
    launch_tile<scalar_t, OP, CL, V16>(a, blocks, stream);
    return;
  }
  if constexpr (V8 > 1) {
    if (vec == V8) {
      launch_tile<scalar_t, OP, CL, V8>(a, blocks, stream);
      return;
    }
  }
  launch_tile<scalar_t, OP, CL, 1>(a, blocks, stream);
}

// Runs one pass: plans the tiles, points the kernel at the final outputs or at partial
// buffers, launches, and combines the partials. `over_p` receives the (N, C) results of
// a reduction over p, `over_c` the (N, P) results of a reduction over c.
template <typename scalar_t, int OP, bool CL>
void run_pass(TileArgs<scalar_t, at::opmath_type<scalar_t>> a, const at::Tensor& act, int64_t N,
              int64_t C, int64_t P, std::initializer_list<const void*> act_ptrs,
              Result<at::opmath_type<scalar_t>> over_p, Result<at::opmath_type<scalar_t>> over_c) {
  using acc_t = at::opmath_type<scalar_t>;
  using T = OpTraits<OP, CL>;
  const PassPlan pp =
      plan_pass<OP, CL>(N, C, P, static_cast<int>(sizeof(scalar_t)), plan_util::addr_bits(act_ptrs),
                        at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t R = pp.R;
  const int64_t L = pp.L;
  const Plan& pl = pp.tile;
  a.R = R;
  a.L = L;
  a.RT = pl.RT;
  a.nRT = pl.nRT;
  a.nLT = pl.nLT;
  a.log2tl = pl.log2tl;
  a.kl = pl.kl;
  a.inv_c = acc_t(1) / static_cast<acc_t>(C);
  a.inv_p = acc_t(1) / static_cast<acc_t>(P);
  const int64_t blocks = pp.blocks;
  MK_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
           "mixed_attention: activation too large for one launch (", blocks, " tiles)");

  const auto opts = act.options()
                        .dtype(c10::CppTypeToScalarType<acc_t>::value)
                        .memory_format(at::MemoryFormat::Contiguous);
  const Result<acc_t> row_out = CL ? over_c : over_p;
  const Result<acc_t> col_out = CL ? over_p : over_c;
  Partials rp, cp;
  if constexpr (T::kRowRed) {
    const Result<acc_t> r = reduction_target(row_out, N, pl.nLT, R, T::kMax, opts, rp);
    a.row_sum = r.sum;
    a.row_max = r.max;
    a.row_idx = r.idx;
    a.row_scale = r.scale;
  }
  if constexpr (T::kColRed) {
    const Result<acc_t> c = reduction_target(col_out, N, pl.nRT, L, T::kMax, opts, cp);
    a.col_sum = c.sum;
    a.col_max = c.max;
    a.col_idx = c.idx;
    a.col_scale = c.scale;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_tile_vec<scalar_t, OP, CL>(a, pl.vec, blocks, stream);
  if (pp.row_fin > 0) {
    launch_finalize<acc_t>(rp.sum, rp.max, rp.idx, row_out, N, pl.nLT, R, T::kMax, stream);
  }
  if (pp.col_fin > 0) {
    launch_finalize<acc_t>(cp.sum, cp.max, cp.idx, col_out, N, pl.nRT, L, T::kMax, stream);
  }
}

template <typename scalar_t, int OP>
void run_pass_layout(bool cl, const TileArgs<scalar_t, at::opmath_type<scalar_t>>& a,
                     const at::Tensor& act, int64_t N, int64_t C, int64_t P,
                     std::initializer_list<const void*> act_ptrs,
                     Result<at::opmath_type<scalar_t>> over_p,
                     Result<at::opmath_type<scalar_t>> over_c) {
  if (cl) {
    run_pass<scalar_t, OP, true>(a, act, N, C, P, act_ptrs, over_p, over_c);
  } else {
    run_pass<scalar_t, OP, false>(a, act, N, C, P, act_ptrs, over_p, over_c);
  }
}

// ---------------------------------------------------------------------------------------
// Argument checks

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_activation(const char* op, const char* name, const at::Tensor& t) {
  MK_CHECK(t.is_cuda(), op, ": expected ", name, " to be a CUDA tensor, got device ", t.device());
  MK_CHECK(t.dim() == 4, op, ": expected ", name, " to have rank 4 (N, C, H, W), got rank ",
           t.dim());
  const auto st = t.scalar_type();
  MK_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
           ": expected ", name, " to be float32, float16, bfloat16 or float64, got ", st);
  MK_CHECK(t.size(1) <= std::numeric_limits<int32_t>::max() &&
               t.size(2) * t.size(3) <= std::numeric_limits<int32_t>::max(),
           op, ": expected ", name, " to have C and H*W below 2^31 (int32 indices), got ",
           t.sizes());
}

// true for channels_last; a tensor that is both (C == 1 or H*W == 1) counts as NCHW.
bool is_channels_last(const char* op, const char* name, const at::Tensor& t) {
  if (t.is_contiguous()) return false;
  MK_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": expected ", name,
           " to be NCHW-contiguous or channels_last-contiguous, got sizes ", t.sizes(),
           " and strides ", t.strides());
  return true;
}

void check_small(const char* op, const char* name, const at::Tensor& t, const at::Tensor& act,
                 const char* act_name, at::ScalarType dtype, at::IntArrayRef shape) {
  MK_CHECK(t.device() == act.device(), op, ": expected ", name, " on ", act.device(),
           " (the device of ", act_name, "), got ", t.device());
  MK_CHECK(t.scalar_type() == dtype, op, ": expected ", name, " to have dtype ", dtype,
           dtype == at::kInt ? " (an index tensor)" : " (the accumulation dtype)", ", got ",
           t.scalar_type());
  MK_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
  MK_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

struct Dims {
  int64_t N, C, H, W, P;
};

Dims dims_of(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.size(3), t.size(2) * t.size(3)};
}

template <typename acc_t>
Result<acc_t> result_of(at::Tensor& sum, at::Tensor* max, at::Tensor* idx, acc_t scale) {
  Result<acc_t> r;
  r.sum = sum.data_ptr<acc_t>();
  if (max) r.max = max->data_ptr<acc_t>();
  if (idx) r.idx = idx->data_ptr<int32_t>();
  r.scale = scale;
  return r;
}

// ---------------------------------------------------------------------------------------
// Ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_pool_cuda(const at::Tensor& x) {
  constexpr const char* op = "mixed_attention_channel_pool";
  check_activation(op, "x", x);
  const bool cl = is_channels_last(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Dims d = dims_of(x);
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor avg = at::empty({d.N, d.C}, opts);
  at::Tensor mx = at::empty({d.N, d.C}, opts);
  at::Tensor im = at::empty({d.N, d.C}, opts.dtype(at::kInt));
  if (d.N == 0) return {avg, mx, im};
  MK_CHECK(d.C > 0 && d.P > 0, op, ": expected x to have C >= 1 and H*W >= 1 (max over ",
           "an empty set), got sizes ", x.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TileArgs<scalar_t, acc_t> a;
    a.in = x.data_ptr<scalar_t>();
    run_pass_layout<scalar_t, kChannelPool>(
        cl, a, x, d.N, d.C, d.P, {a.in},
        result_of<acc_t>(avg, &mx, &im, acc_t(1) / static_cast<acc_t>(d.P)), Result<acc_t>{});
  });
  return {avg, mx, im};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_pool_cuda(const at::Tensor& x,
                                                                 const at::Tensor& mc) {
  constexpr const char* op = "mixed_attention_spatial_pool";
  check_activation(op, "x", x);
  const bool cl = is_channels_last(op, "x", x);
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x.scalar_type());
  check_small(op, "mc", mc, x, "x", acc, {d.N, d.C});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc);
  at::Tensor sa = at::empty({d.N, d.H, d.W}, opts);
  at::Tensor sm = at::empty({d.N, d.H, d.W}, opts);
  at::Tensor ic = at::empty({d.N, d.H, d.W}, opts.dtype(at::kInt));
  if (d.N == 0) return {sa, sm, ic};
  MK_CHECK(d.C > 0 && d.P > 0, op, ": expected x to have C >= 1 and H*W >= 1 (max over ",
           "an empty set), got sizes ", x.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TileArgs<scalar_t, acc_t> a;
    a.in = x.data_ptr<scalar_t>();
    a.mc = mc.data_ptr<acc_t>();
    run_pass_layout<scalar_t, kSpatialPool>(
        cl, a, x, d.N, d.C, d.P, {a.in}, Result<acc_t>{},
        result_of<acc_t>(sa, &sm, &ic, acc_t(1) / static_cast<acc_t>(d.C)));
  });
  return {sa, sm, ic};
}

at::Tensor apply_cuda(const at::Tensor& x, const at::Tensor& mc, const at::Tensor& ms) {
  constexpr const char* op = "mixed_attention_apply";
  check_activation(op, "x", x);
  const bool cl = is_channels_last(op, "x", x);
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x.scalar_type());
  check_small(op, "mc", mc, x, "x", acc, {d.N, d.C});
  check_small(op, "ms", ms, x, "x", acc, {d.N, d.H, d.W});
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                                   : at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TileArgs<scalar_t, acc_t> a;
    a.in = x.data_ptr<scalar_t>();
    a.out = y.data_ptr<scalar_t>();
    a.mc = mc.data_ptr<acc_t>();
    a.ms = ms.data_ptr<acc_t>();
    run_pass_layout<scalar_t, kApply>(cl, a, x, d.N, d.C, d.P, {a.in, a.out}, Result<acc_t>{},
                                      Result<acc_t>{});
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bwd_reduce_cuda(const at::Tensor& g, const at::Tensor& x,
                                                   const at::Tensor& mc, const at::Tensor& ms) {
  constexpr const char* op = "mixed_attention_bwd_reduce";
  check_activation(op, "x", x);
  const bool cl = is_channels_last(op, "x", x);
  MK_CHECK(g.device() == x.device(), op, ": expected g on ", x.device(), " (the device of x), got ",
           g.device());
  MK_CHECK(g.scalar_type() == x.scalar_type(), op, ": expected g to have the dtype of x (",
           x.scalar_type(), "), got ", g.scalar_type());
  MK_CHECK(g.sizes() == x.sizes(), op, ": expected g of shape ", x.sizes(),
           " (the shape of x), got ", g.sizes());
  MK_CHECK(g.is_contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous), op,
           ": expected g in the memory format of x (", cl ? "channels_last" : "NCHW-contiguous",
           "), got strides ", g.strides());
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x.scalar_type());
  check_small(op, "mc", mc, x, "x", acc, {d.N, d.C});
  check_small(op, "ms", ms, x, "x", acc, {d.N, d.H, d.W});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc);
  if (x.numel() == 0) return {at::zeros({d.N, d.H, d.W}, opts), at::zeros({d.N, d.C}, opts)};
  at::Tensor dms = at::empty({d.N, d.H, d.W}, opts);
  at::Tensor dmc = at::empty({d.N, d.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TileArgs<scalar_t, acc_t> a;
    a.in = g.data_ptr<scalar_t>();
    a.in2 = x.data_ptr<scalar_t>();
    a.mc = mc.data_ptr<acc_t>();
    a.ms = ms.data_ptr<acc_t>();
    run_pass_layout<scalar_t, kBwdReduce>(cl, a, x, d.N, d.C, d.P, {a.in, a.in2},
                                          result_of<acc_t>(dmc, nullptr, nullptr, acc_t(1)),
                                          result_of<acc_t>(dms, nullptr, nullptr, acc_t(1)));
  });
  return {dms, dmc};
}

at::Tensor bwd_channel_cuda(const at::Tensor& x, const at::Tensor& da_s, const at::Tensor& dm_s,
                            const at::Tensor& ic) {
  constexpr const char* op = "mixed_attention_bwd_channel";
  check_activation(op, "x", x);
  const bool cl = is_channels_last(op, "x", x);
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x.scalar_type());
  check_small(op, "da_s", da_s, x, "x", acc, {d.N, d.H, d.W});
  check_small(op, "dm_s", dm_s, x, "x", acc, {d.N, d.H, d.W});
  check_small(op, "ic", ic, x, "x", at::kInt, {d.N, d.H, d.W});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc);
  if (x.numel() == 0) return at::zeros({d.N, d.C}, opts);
  at::Tensor dmc = at::empty({d.N, d.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TileArgs<scalar_t, acc_t> a;
    a.in = x.data_ptr<scalar_t>();
    a.das = da_s.data_ptr<acc_t>();
    a.dms = dm_s.data_ptr<acc_t>();
    a.ic = ic.data_ptr<int32_t>();
    run_pass_layout<scalar_t, kBwdChannel>(cl, a, x, d.N, d.C, d.P, {a.in},
                                           result_of<acc_t>(dmc, nullptr, nullptr, acc_t(1)),
                                           Result<acc_t>{});
  });
  return dmc;
}

at::Tensor bwd_dx_cuda(const at::Tensor& g, const at::Tensor& mc, const at::Tensor& ms,
                       const at::Tensor& da_s, const at::Tensor& dm_s, const at::Tensor& ic,
                       const at::Tensor& d_avg, const at::Tensor& d_mx, const at::Tensor& im) {
  constexpr const char* op = "mixed_attention_bwd_dx";
  check_activation(op, "g", g);
  const bool cl = is_channels_last(op, "g", g);
  const Dims d = dims_of(g);
  const auto acc = acc_dtype(g.scalar_type());
  check_small(op, "mc", mc, g, "g", acc, {d.N, d.C});
  check_small(op, "ms", ms, g, "g", acc, {d.N, d.H, d.W});
  check_small(op, "da_s", da_s, g, "g", acc, {d.N, d.H, d.W});
  check_small(op, "dm_s", dm_s, g, "g", acc, {d.N, d.H, d.W});
  check_small(op, "ic", ic, g, "g", at::kInt, {d.N, d.H, d.W});
  check_small(op, "d_avg", d_avg, g, "g", acc, {d.N, d.C});
  check_small(op, "d_mx", d_mx, g, "g", acc, {d.N, d.C});
  check_small(op, "im", im, g, "g", at::kInt, {d.N, d.C});
  const c10::cuda::CUDAGuard guard(g.device());
  at::Tensor dx =
      at::empty(g.sizes(), g.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                        : at::MemoryFormat::Contiguous));
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TileArgs<scalar_t, acc_t> a;
    a.in = g.data_ptr<scalar_t>();
    a.out = dx.data_ptr<scalar_t>();
    a.mc = mc.data_ptr<acc_t>();
    a.ms = ms.data_ptr<acc_t>();
    a.das = da_s.data_ptr<acc_t>();
    a.dms = dm_s.data_ptr<acc_t>();
    a.ic = ic.data_ptr<int32_t>();
    a.davg = d_avg.data_ptr<acc_t>();
    a.dmx = d_mx.data_ptr<acc_t>();
    a.im = im.data_ptr<int32_t>();
    run_pass_layout<scalar_t, kBwdDx>(cl, a, g, d.N, d.C, d.P, {a.in, a.out}, Result<acc_t>{},
                                      Result<acc_t>{});
  });
  return dx;
}

// ---------------------------------------------------------------------------------------
// The k x k conv (padding k//2) on the 2-channel [mean, max] map: sa, sm, dz (N, H, W) in
// the acc dtype, weight (1, 2, k, k), bias (1,). The maps are small (N*H*W ~ 1e5), so
// the kernels are plain: one thread per output or input element, and for dweight/dbias
// one block column per tap with fixed-order reductions (no atomics): deterministic.

// z[n,y,x] = bias + sum_{c,i,j} w[c,i,j] * in_c[n, y+i-r, x+j-r]: the bias first, then
// taps in (c, i, j) order, as the CPU kernel adds them. Only taps inside the map.
template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    _mixed_attention_spatial_conv_fwd_kernel(const T* __restrict__ sa, const T* __restrict__ sm,
                                             const T* __restrict__ w, const T* __restrict__ bias,
                                             T* __restrict__ z, int64_t total, int64_t H, int64_t W,
                                             int k) {
  const int r = k / 2;
  const int64_t HW = H * W;
  const T b = bias != nullptr ? __ldg(bias) : T(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += stride) {
    const int64_t n = o / HW;
    const int64_t p = o - n * HW;
    const int64_t y = p / W;
    const int64_t x = p - y * W;
    // rows i with 0 <= y + i - r < H, columns j with 0 <= x + j - r < W
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
  }
}

// d in_c[n,y,x] = sum_{i,j} w[c,i,j] * dz[n, y-i+r, x-j+r] over dz positions in the map,
// both channels in one thread.
template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    _mixed_attention_spatial_conv_dmap_kernel(const T* __restrict__ dz, const T* __restrict__ w,
                                              T* __restrict__ dsa, T* __restrict__ dsm,
                                              int64_t total, int64_t H, int64_t W, int k) {
  const int r = k / 2;
  const int64_t HW = H * W;
  const T* __restrict__ wa = w;
  const T* __restrict__ wm = w + k * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += stride) {
    const int64_t n = o / HW;
    const int64_t p = o - n * HW;
    const int64_t y = p / W;
    const int64_t x = p - y * W;
    // rows i with 0 <= y - i + r < H, columns j with 0 <= x - j + r < W
    const int i0 = static_cast<int>(y + r - H + 1 > 0 ? y + r - H + 1 : 0);
    const int i1 = static_cast<int>(y + r + 1 < k ? y + r + 1 : k);
    const int j0 = static_cast<int>(x + r - W + 1 > 0 ? x + r - W + 1 : 0);
    const int j1 = static_cast<int>(x + r + 1 < k ? x + r + 1 : k);
    const T* __restrict__ g = dz + n * HW + x + r;
    T da = T(0);
    T dm = T(0);
    for (int i = i0; i < i1; ++i) {
      const T* __restrict__ gr = g + (y - i + r) * W;
      for (int j = j0; j < j1; ++j) {
        const T gv = __ldg(gr - j);
        da += __ldg(wa + i * k + j) * gv;
        dm += __ldg(wm + i * k + j) * gv;
      }
    }
    dsa[o] = da;
    dsm[o] = dm;
  }
}

// Block (t, s): the partial of tap t (t < 2*k*k: dweight[t]; t == 2*k*k: dbias) over
// positions [s*chunk, (s+1)*chunk) of the N*H*W map: per-thread strided sums, then a
// fixed tree in shared memory. part is (taps, S).
template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    _mixed_attention_spatial_conv_dw_kernel(const T* __restrict__ dz, const T* __restrict__ sa,
                                            const T* __restrict__ sm, T* __restrict__ part,
                                            int64_t P, int64_t H, int64_t W, int k, int64_t chunk) {
  const int64_t t = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t S = gridDim.y;
  const int64_t kk = 2 * static_cast<int64_t>(k) * k;
  const int64_t p0 = s * chunk;
  const int64_t p1 = p0 + chunk < P ? p0 + chunk : P;
  T acc = T(0);
  if (t == kk) {
    for (int64_t p = p0 + threadIdx.x; p < p1; p += blockDim.x) acc += dz[p];
  } else {
    const int r = k / 2;
    const int64_t HW = H * W;
    const int64_t c = t / (static_cast<int64_t>(k) * k);
    const int64_t q = t - c * k * k;
    const int64_t di = q / k - r;
    const int64_t dj = q % k - r;
    const T* __restrict__ f = c == 0 ? sa : sm;
    const int64_t shift = di * W + dj;
    for (int64_t p = p0 + threadIdx.x; p < p1; p += blockDim.x) {
      const int64_t n = p / HW;
      const int64_t rem = p - n * HW;
      const int64_t y = rem / W;
      const int64_t x = rem - y * W;
      const int64_t iy = y + di;
      const int64_t ix = x + dj;
      if (iy >= 0 && iy < H && ix >= 0 && ix < W) acc += dz[p] * f[p + shift];
    }
  }
  __shared__ T sh[kConvThreads];
  sh[threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int off = kConvThreads / 2; off > 0; off >>= 1) {
    if (static_cast<int>(threadIdx.x) < off) sh[threadIdx.x] += sh[threadIdx.x + off];
    __syncthreads();
  }
  if (threadIdx.x == 0) part[t * S + s] = sh[0];
}

// Sums each tap's S partials in order of s: dweight[t] for t < kk, dbias for t == kk.
template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    _mixed_attention_spatial_conv_dw_finalize_kernel(const T* __restrict__ part, T* __restrict__ dw,
                                                     T* __restrict__ db, int64_t kk, int64_t taps,
                                                     int64_t S) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= taps) return;
  T acc = T(0);
  for (int64_t s = 0; s < S; ++s) acc += part[t * S + s];
  if (t < kk) {
    dw[t] = acc;
  } else {
    *db = acc;
  }
}

// Argument checks, as the CPU kernels word them (with "CUDA tensor").

void check_dense_cuda(const at::Tensor& t, const char* name) {
  MK_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  MK_CHECK_VALUE(t.layout() == at::kStrided, name,
                 ": expected a strided (dense) tensor, got layout ", t.layout());
  MK_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
}

// A CUDA tensor on sa's device.
void check_conv_arg(const at::Tensor& t, const char* name, const at::Tensor& sa) {
  check_dense_cuda(t, name);
  MK_CHECK(t.device() == sa.device(), name, ": expected a tensor on ", sa.device(),
           " (the device of sa), got device ", t.device());
}

int64_t check_spatial_conv(const at::Tensor& sa, const at::Tensor& sm, const at::Tensor& weight) {
  const int64_t k = check_spatial_conv_args(
      sa, sm, weight, [&](const at::Tensor& t, const char* name) { check_conv_arg(t, name, sa); });
  // the kernels index taps (2*k*k + 1 blocks) and k*k with 32-bit ints
  MK_CHECK_VALUE(k <= 32767, "weight: expected k <= 32767, got shape ", weight.sizes());
  return k;
}

at::Tensor spatial_conv_cuda(const at::Tensor& sa_in, const at::Tensor& sm_in,
                             const at::Tensor& weight_in,
                             const std::optional<at::Tensor>& bias_in) {
  const int64_t k = check_spatial_conv(sa_in, sm_in, weight_in);
  check_spatial_bias(bias_in, sa_in, [&](const at::Tensor& t, const char* name) {
    check_conv_arg(t, name, sa_in);
  });
  const c10::cuda::CUDAGuard guard(sa_in.device());
  const at::Tensor sa = sa_in.contiguous(), sm = sm_in.contiguous(),
                   weight = weight_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const int64_t N = sa.size(0), H = sa.size(1), W = sa.size(2);
  at::Tensor z = at::empty({N, H, W}, sa.options());
  const int64_t total = z.numel();
  if (total == 0) return z;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(sa.scalar_type(), "mixed_attention_spatial_conv", [&] {
    _mixed_attention_spatial_conv_fwd_kernel<scalar_t>
        <<<conv_blocks(total), kConvThreads, 0, stream>>>(
            sa.data_ptr<scalar_t>(), sm.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
            bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, z.data_ptr<scalar_t>(), total, H,
            W, static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spatial_conv_bwd_cuda(
    const at::Tensor& dz_in, const at::Tensor& sa_in, const at::Tensor& sm_in,
    const at::Tensor& weight_in, bool has_bias) {
  const int64_t k = check_spatial_conv(sa_in, sm_in, weight_in);
  check_spatial_map(dz_in, "dz", sa_in,
                    [&](const at::Tensor& t, const char* name) { check_conv_arg(t, name, sa_in); });
  const c10::cuda::CUDAGuard guard(sa_in.device());
  const at::Tensor dz = dz_in.contiguous(), sa = sa_in.contiguous(), sm = sm_in.contiguous(),
                   weight = weight_in.contiguous();
  const int64_t N = sa.size(0), H = sa.size(1), W = sa.size(2);
  const auto opts = sa.options();
  at::Tensor dsa = at::empty({N, H, W}, opts), dsm = at::empty({N, H, W}, opts);
  const int64_t kk = 2 * k * k;
  const int64_t P = N * H * W;
  if (P == 0) {
    return {dsa, dsm, at::zeros({1, 2, k, k}, opts),
            has_bias ? at::zeros({1}, opts) : at::empty({0}, opts)};
  }
  at::Tensor dweight = at::empty({1, 2, k, k}, opts);
  at::Tensor dbias = at::empty({has_bias ? 1 : 0}, opts);
  // dweight/dbias: `taps` block columns, each split into S chunks of >= 2048 positions,
  // about 4 blocks per SM in all; then one ordered sum of the S partials per tap.
  const int64_t taps = kk + (has_bias ? 1 : 0);
  const int64_t S =
      conv_dw_splits(P, taps, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t chunk = ceil_div(P, S);
  at::Tensor part = at::empty({taps, S}, opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(sa.scalar_type(), "mixed_attention_spatial_conv_bwd", [&] {
    const scalar_t* g = dz.data_ptr<scalar_t>();
    _mixed_attention_spatial_conv_dmap_kernel<scalar_t>
        <<<conv_blocks(P), kConvThreads, 0, stream>>>(
            g, weight.data_ptr<scalar_t>(), dsa.data_ptr<scalar_t>(), dsm.data_ptr<scalar_t>(), P,
            H, W, static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    _mixed_attention_spatial_conv_dw_kernel<scalar_t>
        <<<dim3(static_cast<unsigned>(taps), static_cast<unsigned>(S)), kConvThreads, 0, stream>>>(
            g, sa.data_ptr<scalar_t>(), sm.data_ptr<scalar_t>(), part.data_ptr<scalar_t>(), P, H, W,
            static_cast<int>(k), chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    _mixed_attention_spatial_conv_dw_finalize_kernel<scalar_t>
        <<<static_cast<unsigned>(ceil_div(taps, kConvThreads)), kConvThreads, 0, stream>>>(
            part.data_ptr<scalar_t>(), dweight.data_ptr<scalar_t>(),
            has_bias ? dbias.data_ptr<scalar_t>() : nullptr, kk, taps, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dsa, dsm, dweight, dbias};
}

}  // namespace
}  // namespace manet_kernels

TORCH_LIBRARY_IMPL(manet_kernels, CUDA, m) {
  m.impl("_mixed_attention_channel_pool", &manet_kernels::channel_pool_cuda);
  m.impl("_mixed_attention_spatial_pool", &manet_kernels::spatial_pool_cuda);
  m.impl("_mixed_attention_apply", &manet_kernels::apply_cuda);
  m.impl("_mixed_attention_bwd_reduce", &manet_kernels::bwd_reduce_cuda);
  m.impl("_mixed_attention_bwd_channel", &manet_kernels::bwd_channel_cuda);
  m.impl("_mixed_attention_bwd_dx", &manet_kernels::bwd_dx_cuda);
  m.impl("_mixed_attention_spatial_conv", &manet_kernels::spatial_conv_cuda);
  m.impl("_mixed_attention_spatial_conv_bwd", &manet_kernels::spatial_conv_bwd_cuda);
}
