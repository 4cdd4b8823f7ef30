// CUDA kernels for AW-convolution and per-sample convolution (docs/design.md §2).
// The contract, dtypes and output memory formats included, is
// manet_kernels/reference/passes.py.
//
// Three implicit GEMMs, one kernel each, on one tile engine (GEMM-K walked in BK steps
// through shared memory; fp16/bf16 tiles on tensor cores through WMMA with fp32
// accumulation, fp32/fp64 tiles on FMA units):
//   forward  y[n]:  M = output positions, N = output channels of a group,
//                   K = (tap, input channel), taps outer. The aw weight tile is scaled
//                   by scale[n, o, tap] as it is loaded.
//   dx[n]:          M = input positions, N = input channels of a group,
//                   K = (tap, output channel); the weight tile is scaled by
//                   scale[n, o, tap] on load, as in the forward.
//   weight grad:    M = output channels, N = input channels, one tap per block,
//                   K = output positions, samples in an outer loop. After each sample
//                   the tile holds G_n; the aw op folds dscale[n,o,t] = sum_c w*G_n and
//                   dweight += scale[n,o,t] * G_n, the per-sample op writes G_n out.
// The (N, C2, C1/g, kh, kw) per-sample weights of the aw op are never built.
//
// Determinism: no floating-point atomics. The weight-grad work is split over chunks of
// samples and of output positions (both sums are linear in G_n); every block writes its
// own partial and ATen's sum adds the partials afterwards, so results are bitwise
// reproducible run to run on a GPU model (the split depends on its SM count).
//
// Precision: products and sums in the accumulation dtype, as the contract. Tensor-core
// tiles round their operands to the activation dtype, which is exact for x, g and
// weights, and one rounding for a weight scaled on load (as the Triton kernels). dx
// scales the weight, not g, so its operands are round(w * scale) exactly as eager
// PyTorch's conv on the low-precision scaled weight (the tests' yardstick).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../check.h"
#include "aw_conv2d_plan.h"
#include "aw_conv2d_v2_index.h"

namespace manet_kernels {
namespace {

using at::Tensor;
// kThreads, the tile sizes, Geo and the launch plans: aw_conv2d_plan.h.
using namespace aw_plan;

// ---------------------------------------------------------------------------------------
// Tile engines. Both keep the A tile (BM x BK) and B tile (BK x BN) in shared memory in
// the compute dtype and leave the finished BM x BN tile in shared memory in the
// accumulation dtype (C, aliasing A and B), where the kernels' epilogues read it.

// fp32 / fp64 (and fp16/bf16 on GPUs without the needed tensor cores): every thread
// owns a 4x4 sub-tile with rows ty + 16 i and columns tx + 16 j, so a warp reads
// shared memory in broadcast (A) or consecutive (B) words.
template <typename acc_t_>
struct FmaCore {
  using acc_t = acc_t_;
  using comp_t = acc_t_;
  static constexpr int BM = FmaTile::BM, BN = FmaTile::BN, BK = FmaTile::BK;
  static constexpr int kALd = BM;      // A stored k-major: [BK][BM]
  static constexpr int kBLd = BN;      // B stored [BK][BN]
  static constexpr int kCLd = BN + 4;  // +4: the epilogues' row walks hit distinct banks
  static constexpr int kAElems = BK * kALd;
  static constexpr int kBElems = BK * kBLd;
  static constexpr int kSmemBytes = std::max(static_cast<int>((kAElems + kBElems) * sizeof(comp_t)),
                                             static_cast<int>(BM * kCLd * sizeof(acc_t)));

  __device__ static int a_at(int m, int k) { return k * kALd + m; }
  __device__ static int b_at(int k, int n) { return k * kBLd + n; }
  __device__ static comp_t to_comp(acc_t v) { return v; }

  acc_t acc[4][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  }

  __device__ void step(const comp_t* As, const comp_t* Bs) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk * kALd + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk * kBLd + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
  }

  __device__ void store(acc_t* Cs) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(ty + 16 * i) * kCLd + tx + 16 * j] = acc[i][j];
  }
};

template <typename comp_t>
__device__ __forceinline__ comp_t round_to(float v);
template <>
__device__ __forceinline__ __half round_to<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 round_to<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float round_to<float>(float v) {
  return v;
}

// fp16 / bf16 on tensor cores. Warps form a 4 x 2 grid of 16 x 32 warp tiles (two
// 16x16x16 fragments each). Fragments are loaded from shared memory only: every
// fragment pointer is 32-byte aligned and every leading dimension a multiple of 16
// bytes, as load/store_matrix_sync require (checked by the static_asserts).
template <typename comp_t_>
struct WmmaCore {
  using acc_t = float;
  using comp_t = comp_t_;
  static constexpr int BM = WmmaTile::BM, BN = WmmaTile::BN, BK = WmmaTile::BK;
  static constexpr int kALd = BK + 8;  // A stored row-major [BM][BK + 8]; the pad
  static constexpr int kBLd = BN + 8;  // staggers rows across banks
  static constexpr int kCLd = BN + 4;
  static constexpr int kAElems = BM * kALd;
  static constexpr int kBElems = BK * kBLd;
  static constexpr int kSmemBytes = std::max(static_cast<int>((kAElems + kBElems) * sizeof(comp_t)),
                                             static_cast<int>(BM * kCLd * sizeof(acc_t)));
  static_assert(kALd * sizeof(comp_t) % 16 == 0 && kBLd * sizeof(comp_t) % 16 == 0,
                "WMMA leading dimensions must be multiples of 16 bytes");
  static_assert(16 * kALd * sizeof(comp_t) % 32 == 0 && 16 * kBLd * sizeof(comp_t) % 32 == 0 &&
                    kAElems * sizeof(comp_t) % 128 == 0,
                "WMMA fragment pointers must stay 32-byte aligned");
  static_assert(kCLd * sizeof(acc_t) % 16 == 0 && 16 * kCLd * sizeof(acc_t) % 32 == 0,
                "WMMA accumulator stores need 16-byte leading dimensions, 32-byte rows");
  static_assert(kThreads == 8 * 32 && BM == 4 * 16 && BN == 2 * 32, "warp grid is 4 x 2");

  __device__ static int a_at(int m, int k) { return m * kALd + k; }
  __device__ static int b_at(int k, int n) { return k * kBLd + n; }
  __device__ static comp_t to_comp(acc_t v) { return round_to<comp_t>(v); }

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];

  __device__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  }

  __device__ void step(const comp_t* As, const comp_t* Bs) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    // bf16 fragments need sm_80; the host picks the FMA tiles there (use_tensor_cores).
    if constexpr (std::is_same_v<comp_t, __nv_bfloat16>) {
      __trap();
    } else
#endif
    {
      step_mma(As, Bs);
    }
  }

  __device__ void step_mma(const comp_t* As, const comp_t* Bs) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, comp_t, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, As + wm * 16 * kALd + ks, kALd);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, comp_t, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, Bs + ks * kBLd + wn * 32 + j * 16, kBLd);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }

  __device__ void store(acc_t* Cs) const {
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(Cs + wm * 16 * kCLd + wn * 32 + j * 16, acc[j], kCLd,
                                      nvcuda::wmma::mem_row_major);
  }
};

// Shared-memory views of one block's tiles.
template <class Core>
struct Smem {
  typename Core::comp_t* a;
  typename Core::comp_t* b;
  typename Core::acc_t* c;
};

template <class Core>
__device__ __forceinline__ Smem<Core> smem_views(unsigned char* raw) {
  using comp_t = typename Core::comp_t;
  comp_t* a = reinterpret_cast<comp_t*>(raw);
  return {a, a + Core::kAElems, reinterpret_cast<typename Core::acc_t*>(raw)};
}

// Accumulates A[:, k_begin:k_end] @ B[k_begin:k_end, :] into `core`. load_a(m, k) and
// load_b(k, n) return an element in the accumulation dtype, zero outside the problem
// (they own the M and N bounds; k < k_end here). `a_m_fast` / `b_n_fast` choose which
// tile axis consecutive threads walk, to follow the operand's unit-stride axis.
// Ends with a barrier, so the caller may overwrite the tiles (or C) right away.
template <class Core, class LoadA, class LoadB>
__device__ __forceinline__ void gemm_k_loop(Core& core, const Smem<Core>& sm, int k_begin,
                                            int k_end, const LoadA& load_a, const LoadB& load_b,
                                            bool a_m_fast, bool b_n_fast) {
  using acc_t = typename Core::acc_t;
  constexpr int BM = Core::BM, BN = Core::BN, BK = Core::BK;
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    for (int e = threadIdx.x; e < BM * BK; e += kThreads) {
      const int m = a_m_fast ? e % BM : e / BK;
      const int kk = a_m_fast ? e / BM : e % BK;
      const int k = k0 + kk;
      sm.a[Core::a_at(m, kk)] = Core::to_comp(k < k_end ? load_a(m, k) : acc_t(0));
    }
    for (int e = threadIdx.x; e < BK * BN; e += kThreads) {
      const int n = b_n_fast ? e % BN : e / BK;
      const int kk = b_n_fast ? e / BN : e % BK;
      const int k = k0 + kk;
      sm.b[Core::b_at(kk, n)] = Core::to_comp(k < k_end ? load_b(k, n) : acc_t(0));
    }
    __syncthreads();
    core.step(sm.a, sm.b);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------
// Kernel arguments. Sizes fit int32 (checked on the host); element offsets are int64.

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// An activation's unit-stride axis is W (NCHW) unless it is channels_last.
__host__ __device__ inline bool positions_fast(const Strides& s) {
  return s.w == 1;
}

template <typename scalar_t, typename acc_t>
struct ConvArgs {
  Geo geo;
  const scalar_t* in;  // forward: x; dx: g
  Strides in_s;
  const scalar_t* w;   // weight (C2, C1/g, kh, kw) or weights (N, C2, C1/g, kh, kw)
  const acc_t* scale;  // (N, C2, kh, kw); aw only
  const acc_t* bias;   // (N, C2) or null; forward only
  scalar_t* out;       // forward: y; dx: dx
  Strides out_s;
  int n_mt, n_nt;  // tiles along M and N
};

template <typename scalar_t, typename acc_t>
struct WgradArgs {
  Geo geo;
  const scalar_t* g;
  Strides g_s;
  const scalar_t* x;
  Strides x_s;
  const scalar_t* w;   // aw: weight, for dscale
  const acc_t* scale;  // aw: (N, C2, kh, kw)
  acc_t* dw_part;      // aw: (S_n * S_q, C2, C1/g, kh, kw); per-sample: (S_q, N, C2, C1/g, kh, kw)
  acc_t* ds_part;      // aw: (S_q * n_nt, N, C2, kh, kw)
  int n_mt, n_nt;
  int n_chunk, q_chunk;  // samples and output positions per split
  int s_n, s_q;          // number of splits
};

// ---------------------------------------------------------------------------------------
// Kernels

// The tile of a forward / dx block: blockIdx.x enumerates (n, group, M tile, N tile),
// the N tile fastest.
struct ConvTile {
  int nt, mt, gi, n;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ ConvTile conv_tile(const ConvArgs<scalar_t, acc_t>& a) {
  int64_t b = blockIdx.x;
  ConvTile t;
  t.nt = static_cast<int>(b % a.n_nt);
  b /= a.n_nt;
  t.mt = static_cast<int>(b % a.n_mt);
  b /= a.n_mt;
  t.gi = static_cast<int>(b % a.geo.groups);
  t.n = static_cast<int>(b / a.geo.groups);
  return t;
}

// y[n, o, q] = bias[n, o] + sum_{t, c} w'[o, c, t] * x[n, c, q @ t], w' the scaled or
// per-sample weight.
template <typename scalar_t, class Core, bool kScaled>
__global__ void __launch_bounds__(kThreads)
    _aw_conv2d_fwd_kernel(const ConvArgs<scalar_t, typename Core::acc_t> a) {
  using acc_t = typename Core::acc_t;
  constexpr int BM = Core::BM, BN = Core::BN;
  __shared__ __align__(128) unsigned char raw[Core::kSmemBytes];
  const Smem<Core> sm = smem_views<Core>(raw);
  const Geo& g = a.geo;

  const ConvTile tile = conv_tile(a);
  const int nt = tile.nt, mt = tile.mt, gi = tile.gi, n = tile.n;

  const int P = g.ho * g.wo;
  const int q0 = mt * BM;
  const int j0 = nt * BN;
  const int o0 = gi * g.c2g + j0;
  const scalar_t* x = a.in + n * a.in_s.n + static_cast<int64_t>(gi) * g.c1g * a.in_s.c;
  const scalar_t* w = kScaled ? a.w : a.w + static_cast<int64_t>(n) * g.c2 * g.c1g * g.taps;

  auto load_a = [&](int m, int k) -> acc_t {
    const int q = q0 + m;
    if (q >= P) return acc_t(0);
    const int oh = q / g.wo, ow = q - oh * g.wo;
    const int t = k / g.c1g, c = k - t * g.c1g;
    const int r = t / g.kw, s = t - r * g.kw;
    const int ih = oh * g.sh - g.ph + r * g.dh;
    const int iw = ow * g.sw - g.pw + s * g.dw;
    if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) return acc_t(0);
    return static_cast<acc_t>(x[c * a.in_s.c + ih * a.in_s.h + iw * a.in_s.w]);
  };
  auto load_b = [&](int k, int j) -> acc_t {
    if (j0 + j >= g.c2g) return acc_t(0);
    const int o = o0 + j;
    const int t = k / g.c1g, c = k - t * g.c1g;
    const acc_t v = static_cast<acc_t>(w[(static_cast<int64_t>(o) * g.c1g + c) * g.taps + t]);
    if constexpr (kScaled) {
      return v * a.scale[(static_cast<int64_t>(n) * g.c2 + o) * g.taps + t];
    } else {
      return v;
    }
  };

  Core core;
  core.zero();
  // Weights walk along c (stride taps), x along positions in NCHW, along c otherwise.
  gemm_k_loop(core, sm, 0, g.taps * g.c1g, load_a, load_b, positions_fast(a.in_s), false);
  core.store(sm.c);
  __syncthreads();

  const bool m_fast = positions_fast(a.out_s);
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int m = m_fast ? e % BM : e / BN;
    const int j = m_fast ? e / BM : e % BN;
    const int q = q0 + m;
    if (q >= P || j0 + j >= g.c2g) continue;
    const int o = o0 + j;
    acc_t v = sm.c[m * Core::kCLd + j];
    if (a.bias != nullptr) v += a.bias[static_cast<int64_t>(n) * g.c2 + o];
    const int oh = q / g.wo, ow = q - oh * g.wo;
    a.out[n * a.out_s.n + o * a.out_s.c + oh * a.out_s.h + ow * a.out_s.w] =
        static_cast<scalar_t>(v);
  }
}

// dx[n, c, p] = sum_{t, o} g'[n, o, q(p, t)] * w[o, c, t] over the taps t that land p
// on an output position q: the transposed GEMM. For the aw op w' = w * scale[n, o, t].
template <typename scalar_t, class Core, bool kScaled>
__global__ void __launch_bounds__(kThreads)
    _aw_conv2d_dx_kernel(const ConvArgs<scalar_t, typename Core::acc_t> a) {
  using acc_t = typename Core::acc_t;
  constexpr int BM = Core::BM, BN = Core::BN;
  __shared__ __align__(128) unsigned char raw[Core::kSmemBytes];
  const Smem<Core> sm = smem_views<Core>(raw);
  const Geo& g = a.geo;

  const ConvTile tile = conv_tile(a);
  const int nt = tile.nt, mt = tile.mt, gi = tile.gi, n = tile.n;

  const int P = g.h * g.w;
  const int p0 = mt * BM;
  const int c0 = nt * BN;
  const int obase = gi * g.c2g;
  const scalar_t* gp = a.in + n * a.in_s.n + static_cast<int64_t>(obase) * a.in_s.c;
  const scalar_t* w = kScaled ? a.w : a.w + static_cast<int64_t>(n) * g.c2 * g.c1g * g.taps;

  auto load_a = [&](int m, int k) -> acc_t {
    const int p = p0 + m;
    if (p >= P) return acc_t(0);
    const int ih = p / g.w, iw = p - ih * g.w;
    const int t = k / g.c2g, j = k - t * g.c2g;
    const int r = t / g.kw, s = t - r * g.kw;
    const int th = ih + g.ph - r * g.dh;
    const int tw = iw + g.pw - s * g.dw;
    if (th < 0 || tw < 0 || th % g.sh != 0 || tw % g.sw != 0) return acc_t(0);
    const int oh = th / g.sh, ow = tw / g.sw;
    if (oh >= g.ho || ow >= g.wo) return acc_t(0);
    return static_cast<acc_t>(gp[j * a.in_s.c + oh * a.in_s.h + ow * a.in_s.w]);
  };
  auto load_b = [&](int k, int cc) -> acc_t {
    const int c = c0 + cc;
    if (c >= g.c1g) return acc_t(0);
    const int t = k / g.c2g, j = k - t * g.c2g;
    const acc_t v =
        static_cast<acc_t>(w[(static_cast<int64_t>(obase + j) * g.c1g + c) * g.taps + t]);
    if constexpr (kScaled) {
      return v * a.scale[(static_cast<int64_t>(n) * g.c2 + obase + j) * g.taps + t];
    } else {
      return v;
    }
  };

  Core core;
  core.zero();
  gemm_k_loop(core, sm, 0, g.taps * g.c2g, load_a, load_b, positions_fast(a.in_s), true);
  core.store(sm.c);
  __syncthreads();

  const bool m_fast = positions_fast(a.out_s);
  const int cbase = gi * g.c1g + c0;
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int m = m_fast ? e % BM : e / BN;
    const int cc = m_fast ? e / BM : e % BN;
    const int p = p0 + m;
    if (p >= P || c0 + cc >= g.c1g) continue;
    const int ih = p / g.w, iw = p - ih * g.w;
    a.out[n * a.out_s.n + (cbase + cc) * a.out_s.c + ih * a.out_s.h + iw * a.out_s.w] =
        static_cast<scalar_t>(sm.c[m * Core::kCLd + cc]);
  }
}

// One block: tap t, group gi, a tile of output channels (rows) x input channels
// (columns), samples [n_begin, n_end) and output positions [q_begin, q_end).
// G_n[o, c] = sum_q g[n, o, q] * x[n, c, q @ t] is formed one sample at a time.
// aw: the block folds dscale[n, o, t] = sum_c w[o, c, t] G_n[o, c] (reduced over its
// columns; the caller adds the column tiles and position splits) and keeps
// sum_n scale[n, o, t] G_n in registers, written out as this split's dweight partial.
// per-sample: G_n is written out (a partial when positions are split).
template <typename scalar_t, class Core, bool kAw>
__global__ void __launch_bounds__(kThreads)
    _aw_conv2d_wgrad_kernel(const WgradArgs<scalar_t, typename Core::acc_t> a) {
  using acc_t = typename Core::acc_t;
  constexpr int BM = Core::BM, BN = Core::BN;
  constexpr int kPer = BM * BN / kThreads;  // C elements per thread in the fold
  constexpr int kRowParts = kThreads / BM;  // threads sharing one row's dscale sum
  static_assert(BM * BN % kThreads == 0 && kThreads % BM == 0 && BN % kRowParts == 0 &&
                    kRowParts <= 32 && (kRowParts & (kRowParts - 1)) == 0,
                "fold thread layout");
  __shared__ __align__(128) unsigned char raw[Core::kSmemBytes];
  const Smem<Core> sm = smem_views<Core>(raw);
  const Geo& g = a.geo;

  int64_t b = blockIdx.x;
  const int nt = static_cast<int>(b % a.n_nt);
  b /= a.n_nt;
  const int mt = static_cast<int>(b % a.n_mt);
  b /= a.n_mt;
  const int t = static_cast<int>(b % g.taps);
  b /= g.taps;
  const int gi = static_cast<int>(b % g.groups);
  b /= g.groups;
  const int sq = static_cast<int>(b % a.s_q);
  const int sn = static_cast<int>(b / a.s_q);

  const int P = g.ho * g.wo;
  const int n_begin = sn * a.n_chunk;
  const int n_end = g.n - n_begin < a.n_chunk ? g.n : n_begin + a.n_chunk;
  const int q_begin = sq * a.q_chunk;
  const int q_end = P - q_begin < a.q_chunk ? P : q_begin + a.q_chunk;
  const int r = t / g.kw, s = t - r * g.kw;
  const int m0 = mt * BM, j0 = nt * BN;
  const int obase = gi * g.c2g + m0;  // global output channel of row 0
  const int cbase = gi * g.c1g + j0;  // global input channel of column 0

  // Fold layout: thread owns row fr and columns fp + kRowParts * jj for dscale, and the
  // C elements tid + kThreads * i for dweight.
  const int fr = threadIdx.x / kRowParts, fp = threadIdx.x % kRowParts;
  acc_t wreg[kAw ? BN / kRowParts : 1];
  acc_t dw[kAw ? kPer : 1];
  if constexpr (kAw) {
#pragma unroll
    for (int jj = 0; jj < BN / kRowParts; ++jj) {
      const int j = fp + kRowParts * jj;
      wreg[jj] = (m0 + fr < g.c2g && j0 + j < g.c1g)
                     ? static_cast<acc_t>(
                           a.w[(static_cast<int64_t>(obase + fr) * g.c1g + j0 + j) * g.taps + t])
                     : acc_t(0);
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) dw[i] = acc_t(0);
  }

  const bool a_q_fast = positions_fast(a.g_s);
  const bool b_q_fast = positions_fast(a.x_s);
  for (int n = n_begin; n < n_end; ++n) {
    const scalar_t* gp = a.g + n * a.g_s.n + static_cast<int64_t>(obase) * a.g_s.c;
    const scalar_t* xp = a.x + n * a.x_s.n + static_cast<int64_t>(cbase) * a.x_s.c;
    auto load_a = [&](int m, int q) -> acc_t {
      if (m0 + m >= g.c2g) return acc_t(0);
      const int oh = q / g.wo, ow = q - oh * g.wo;
      return static_cast<acc_t>(gp[m * a.g_s.c + oh * a.g_s.h + ow * a.g_s.w]);
    };
    auto load_b = [&](int q, int j) -> acc_t {
      if (j0 + j >= g.c1g) return acc_t(0);
      const int oh = q / g.wo, ow = q - oh * g.wo;
      const int ih = oh * g.sh - g.ph + r * g.dh;
      const int iw = ow * g.sw - g.pw + s * g.dw;
      if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) return acc_t(0);
      return static_cast<acc_t>(xp[j * a.x_s.c + ih * a.x_s.h + iw * a.x_s.w]);
    };
    Core core;
    core.zero();
    gemm_k_loop(core, sm, q_begin, q_end, load_a, load_b, !a_q_fast, !b_q_fast);
    core.store(sm.c);
    __syncthreads();

    if constexpr (kAw) {
      acc_t part = acc_t(0);
#pragma unroll
      for (int jj = 0; jj < BN / kRowParts; ++jj)
        part += wreg[jj] * sm.c[fr * Core::kCLd + fp + kRowParts * jj];
      // The kRowParts threads of a row are consecutive lanes of one warp.
#pragma unroll
      for (int off = 1; off < kRowParts; off *= 2) part += __shfl_xor_sync(0xffffffffu, part, off);
      if (fp == 0 && m0 + fr < g.c2g) {
        const int64_t split = static_cast<int64_t>(sq) * a.n_nt + nt;
        a.ds_part[((split * g.n + n) * g.c2 + obase + fr) * g.taps + t] = part;
      }
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int e = threadIdx.x + kThreads * i;
        const int m = e / BN, j = e % BN;
        if (m0 + m < g.c2g) {
          const acc_t sc = a.scale[(static_cast<int64_t>(n) * g.c2 + obase + m) * g.taps + t];
          dw[i] += sc * sm.c[m * Core::kCLd + j];
        }
      }
    } else {
      for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
        const int m = e / BN, j = e % BN;
        if (m0 + m >= g.c2g || j0 + j >= g.c1g) continue;
        const int64_t row = (static_cast<int64_t>(sq) * g.n + n) * g.c2 + obase + m;
        a.dw_part[(row * g.c1g + j0 + j) * g.taps + t] = sm.c[m * Core::kCLd + j];
      }
    }
    __syncthreads();  // C aliases the next sample's A and B tiles
  }

  if constexpr (kAw) {
    const int64_t split = static_cast<int64_t>(sn) * a.s_q + sq;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = threadIdx.x + kThreads * i;
      const int m = e / BN, j = e % BN;
      if (m0 + m >= g.c2g || j0 + j >= g.c1g) continue;
      a.dw_part[((split * g.c2 + obase + m) * g.c1g + j0 + j) * g.taps + t] = dw[i];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Argument checks. Every message starts with the argument's name; the messages match
// the CPU kernels' (csrc/cpu/aw_conv2d.cpp) where the check is the same.

at::ScalarType acc_dtype_for(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cuda_dense(const Tensor& t, const char* name) {
  MK_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  MK_CHECK(t.layout() == at::kStrided, name, ": expected a strided (dense) tensor, got layout ",
           t.layout());
  MK_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
}

void check_on_device(const Tensor& t, const char* name, const Tensor& x) {
  MK_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  MK_CHECK(t.device() == x.device(), name, ": expected a tensor on x's device ", x.device(),
           ", got device ", t.device());
  MK_CHECK(t.layout() == at::kStrided, name, ": expected a strided (dense) tensor, got layout ",
           t.layout());
}

// The memory format of the outputs derived from `t`: NCHW when `t` is NCHW-contiguous
// (also when it is both, e.g. C == 1 or H == W == 1), else channels_last.
at::MemoryFormat check_activation_layout(const Tensor& t, const char* name) {
  MK_CHECK(t.dim() == 4, name, ": expected a rank-4 (N, C, H, W) tensor, got rank ", t.dim(),
           " with shape ", t.sizes());
  const auto st = t.scalar_type();
  MK_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, name,
           ": expected dtype float32, float64, bfloat16 or float16, got ", st);
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  MK_CHECK(false, name,
           ": expected NCHW-contiguous or channels_last-contiguous strides, got shape ", t.sizes(),
           " with strides ", t.strides(), " (make it contiguous before calling)");
  return at::MemoryFormat::Contiguous;  // unreachable
}

void check_small(const Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes,
                 at::ScalarType dtype, const Tensor& x) {
  check_on_device(t, name, x);
  MK_CHECK(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ", t.sizes());
  MK_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype,
           " (the accumulation dtype for x's dtype), got ", t.scalar_type());
  MK_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

std::array<int64_t, 2> check_pair(at::IntArrayRef v, const char* name, int64_t minimum) {
  MK_CHECK(v.size() == 2, name, ": expected two values (height, width), got ", v);
  MK_CHECK(v[0] >= minimum && v[1] >= minimum, name, ": expected values >= ", minimum, ", got ", v);
  return {v[0], v[1]};
}

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

struct Checked {
  Geo geo;
  at::MemoryFormat format;  // of x, and so of y and dx
  at::ScalarType dtype, acc;
};

// Checks x and the convolution parameters against a weight whose trailing four sizes
// are (C2, C1/groups, kh, kw).
Checked check_conv(const Tensor& x, at::IntArrayRef wsizes, const char* wname,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                   int64_t groups) {
  Checked ck;
  ck.format = check_activation_layout(x, "x");
  ck.dtype = x.scalar_type();
  ck.acc = acc_dtype_for(ck.dtype);
  const auto st = check_pair(stride, "stride", 1);
  const auto pd = check_pair(padding, "padding", 0);
  const auto dl = check_pair(dilation, "dilation", 1);
  MK_CHECK(groups >= 1, "groups: expected a positive value, got ", groups);
  const int64_t n = x.size(0), c1 = x.size(1), h = x.size(2), w = x.size(3);
  const size_t rk = wsizes.size();
  const int64_t c2 = wsizes[rk - 4], kh = wsizes[rk - 2], kw = wsizes[rk - 1];
  MK_CHECK(c1 % groups == 0, "groups: must divide x's channel count C1 = ", c1,
           ", got groups = ", groups);
  MK_CHECK(c2 % groups == 0, "groups: must divide ", wname, "'s output channel count C2 = ", c2,
           ", got groups = ", groups);
  MK_CHECK(wsizes[rk - 3] * groups == c1, wname, ": expected C1/groups = ", c1, "/", groups, " = ",
           c1 / groups, " input channels (dim ", rk - 3, "), got shape ", wsizes);
  MK_CHECK(kh >= 1 && kw >= 1, wname, ": expected a kernel of at least 1x1, got shape ", wsizes);
  const int64_t span_h = h + 2 * pd[0] - dl[0] * (kh - 1) - 1;
  const int64_t span_w = w + 2 * pd[1] - dl[1] * (kw - 1) - 1;
  MK_CHECK(h >= 1 && w >= 1 && span_h >= 0 && span_w >= 0, "x: spatial size (", h, ", ", w,
           ") with padding (", pd[0], ", ", pd[1], ") is smaller than the dilated kernel (",
           dl[0] * (kh - 1) + 1, ", ", dl[1] * (kw - 1) + 1, ")");
  const int64_t ho = span_h / st[0] + 1, wo = span_w / st[1] + 1;
  // The kernels index within one sample in int32.
  const int64_t c1g = c1 / groups, c2g = c2 / groups;
  MK_CHECK(n <= kIntMax && c1 <= kIntMax && c2 <= kIntMax && h * w <= kIntMax &&
               ho * wo <= kIntMax && kh * kw * std::max(c1g, c2g) <= kIntMax &&
               c2 * c1g * kh * kw <= kIntMax && st[0] <= kIntMax && st[1] <= kIntMax &&
               pd[0] <= kIntMax / 4 && pd[1] <= kIntMax / 4 && dl[0] * kh <= kIntMax / 4 &&
               dl[1] * kw <= kIntMax / 4,
           "x: sizes ", x.sizes(), " with ", wname, " ", wsizes,
           " exceed the CUDA kernels' 32-bit per-sample indexing");
  ck.geo = make_geo(n, c1, h, w, c2, kh, kw, st.data(), pd.data(), dl.data(), groups);
  return ck;
}

void check_weight_rank(const Tensor& weight, const Tensor& x) {
  check_on_device(weight, "weight", x);
  MK_CHECK(weight.dim() == 4,
           "weight: expected a rank-4 (C2, C1/groups, kh, kw) tensor, got "
           "rank ",
           weight.dim(), " with shape ", weight.sizes());
}

void check_weights_rank(const Tensor& weights, const Tensor& x) {
  check_on_device(weights, "weights", x);
  MK_CHECK(weights.dim() == 5,
           "weights: expected a rank-5 (N, C2, C1/groups, kh, kw) "
           "tensor, got rank ",
           weights.dim(), " with shape ", weights.sizes());
}

void check_weight_dtype(const Tensor& w, const char* name, const Checked& ck) {
  MK_CHECK(w.scalar_type() == ck.dtype, name, ": expected x's dtype ", ck.dtype, ", got ",
           w.scalar_type());
  MK_CHECK(w.is_contiguous(), name, ": expected a contiguous tensor, got strides ", w.strides());
}

void check_per_sample_weights(const Tensor& weights, const Checked& ck) {
  MK_CHECK(weights.size(0) == ck.geo.n,
           "weights: expected one kernel per sample of x (N = ", ck.geo.n, "), got shape ",
           weights.sizes());
  check_weight_dtype(weights, "weights", ck);
}

void check_scale(const Tensor& scale, const Checked& ck, const Tensor& x) {
  const Geo& g = ck.geo;
  check_small(scale, "scale", "(N, C2, kh, kw)", {g.n, g.c2, g.kh, g.kw}, ck.acc, x);
}

void check_bias(const c10::optional<Tensor>& bias, const Checked& ck, const Tensor& x) {
  if (bias.has_value() && bias->defined())
    check_small(*bias, "bias", "(N, C2)", {ck.geo.n, ck.geo.c2}, ck.acc, x);
}

void check_grad(const Tensor& g, const Checked& ck, const Tensor& x) {
  check_on_device(g, "g", x);
  check_activation_layout(g, "g");
  const Geo& geo = ck.geo;
  const std::array<int64_t, 4> want = {geo.n, geo.c2, geo.ho, geo.wo};
  MK_CHECK(g.sizes() == at::IntArrayRef(want),
           "g: expected the output's shape (N, C2, Ho, Wo) = ", at::IntArrayRef(want), ", got ",
           g.sizes());
  MK_CHECK(g.scalar_type() == ck.dtype, "g: expected x's dtype ", ck.dtype, ", got ",
           g.scalar_type());
}

// ---------------------------------------------------------------------------------------
// Launchers

template <typename T>
constexpr bool is_16bit() {
  return std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
}

template <typename scalar_t>
using wmma_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, __nv_bfloat16, __half>;

// Tensor cores for fp16 from sm_70, for bf16 from sm_80; the FMA tiles otherwise.
template <typename scalar_t>
bool use_tensor_cores() {
  if constexpr (!is_16bit<scalar_t>()) {
    return false;
  } else {
    return tensor_cores_for(true, std::is_same_v<scalar_t, c10::Half>,
                            at::cuda::getCurrentDeviceProperties()->major);
  }
}

int64_t checked_blocks(int64_t blocks, const char* op) {
  MK_CHECK(blocks <= kIntMax, op, ": problem too large for one launch (", blocks,
           " thread blocks)");
  return blocks;
}

// Runs Launch::template run<Core>(args...) with the tile engine for scalar_t on this GPU.
// (Launchers are structs with a member template, not template lambdas: the extension
// also builds as C++17.)
template <typename scalar_t, class Launch, class... Args>
void with_core(Args&&... args) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (is_16bit<scalar_t>()) {
    if (use_tensor_cores<scalar_t>()) {
      Launch::template run<WmmaCore<wmma_t<scalar_t>>>(std::forward<Args>(args)...);
      return;
    }
  }
  Launch::template run<FmaCore<acc_t>>(std::forward<Args>(args)...);
}

// Forward (dx = false) or dx (dx = true): in = x or g, out = y or dx.
template <typename scalar_t, bool kScaled, bool kDx>
struct ConvLaunch {
  template <class Core>
  static void run(const Checked& ck, const Tensor& in, const Tensor& w, const Tensor* scale,
                  const Tensor* bias, Tensor& out) {
    using acc_t = at::opmath_type<scalar_t>;
    const Geo& g = ck.geo;
    ConvArgs<scalar_t, acc_t> a{};
    a.geo = g;
    a.in = in.const_data_ptr<scalar_t>();
    a.in_s = strides_of(in);
    a.w = w.const_data_ptr<scalar_t>();
    a.scale = scale != nullptr ? scale->const_data_ptr<acc_t>() : nullptr;
    a.bias = bias != nullptr ? bias->const_data_ptr<acc_t>() : nullptr;
    a.out = out.mutable_data_ptr<scalar_t>();
    a.out_s = strides_of(out);
    const ConvGrid cg = conv_grid(g, kDx, Core::BM, Core::BN);
    a.n_mt = cg.n_mt;
    a.n_nt = cg.n_nt;
    const int64_t blocks = checked_blocks(cg.blocks, kScaled ? "aw_conv2d" : "per_sample_conv2d");
    if (blocks == 0) return;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if constexpr (kDx) {
      _aw_conv2d_dx_kernel<scalar_t, Core, kScaled>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
    } else {
      _aw_conv2d_fwd_kernel<scalar_t, Core, kScaled>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// aw: (dweight (C2, C1/g, kh, kw), dscale (N, C2, kh, kw)); per-sample:
// (dweights (N, C2, C1/g, kh, kw), undefined). Outputs are in the accumulation dtype.
template <typename scalar_t, bool kAw>
struct WgradLaunch {
  template <class Core>
  static void run(const Checked& ck, const Tensor& gy, const Tensor& x, const Tensor& w,
                  const Tensor* scale, Tensor& dw, Tensor& ds) {
    using acc_t = at::opmath_type<scalar_t>;
    const Geo& g = ck.geo;
    const auto opts = x.options().dtype(ck.acc).memory_format(at::MemoryFormat::Contiguous);
    WgradArgs<scalar_t, acc_t> a{};
    a.geo = g;
    a.g = gy.const_data_ptr<scalar_t>();
    a.g_s = strides_of(gy);
    a.x = x.const_data_ptr<scalar_t>();
    a.x_s = strides_of(x);
    const WgradGrid wg = wgrad_grid(g, Core::BM, Core::BN, Core::BK, kAw, sizeof(acc_t),
                                    at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    a.n_mt = wg.n_mt;
    a.n_nt = wg.n_nt;
    if (wg.base == 0) {  // no output or no input channels: every G_n is empty
      dw = at::zeros(kAw ? at::IntArrayRef({g.c2, g.c1g, g.kh, g.kw})
                         : at::IntArrayRef({g.n, g.c2, g.c1g, g.kh, g.kw}),
                     opts);
      if (kAw) ds = at::zeros({g.n, g.c2, g.kh, g.kw}, opts);
      return;
    }
    const WgradPlan& pl = wg.pl;
    a.n_chunk = pl.n_chunk;
    a.q_chunk = pl.q_chunk;
    a.s_n = pl.s_n;
    a.s_q = pl.s_q;
    const int64_t blocks =
        checked_blocks(wg.blocks, kAw ? "aw_conv2d_bwd" : "per_sample_conv2d_bwd");
    Tensor dw_part, ds_part;
    if constexpr (kAw) {
      a.w = w.const_data_ptr<scalar_t>();
      a.scale = scale->const_data_ptr<acc_t>();
      dw_part = at::empty({int64_t{pl.s_n} * pl.s_q, g.c2, g.c1g, g.kh, g.kw}, opts);
      ds_part = at::empty({int64_t{pl.s_q} * a.n_nt, g.n, g.c2, g.kh, g.kw}, opts);
      a.ds_part = ds_part.mutable_data_ptr<acc_t>();
    } else {
      dw_part = at::empty({pl.s_q, g.n, g.c2, g.c1g, g.kh, g.kw}, opts);
    }
    a.dw_part = dw_part.mutable_data_ptr<acc_t>();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    _aw_conv2d_wgrad_kernel<scalar_t, Core, kAw>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // ATen's reduction adds the partials in a fixed order.
    dw = dw_part.size(0) == 1 ? dw_part.select(0, 0) : dw_part.sum(0);
    if constexpr (kAw) ds = ds_part.size(0) == 1 ? ds_part.select(0, 0) : ds_part.sum(0);
  }
};

}  // namespace
}  // namespace manet_kernels

// The second-generation kernels and their launchers (wgrad_v2, conv_v2).
#include "aw_conv2d_v2.cuh"

namespace manet_kernels {
namespace {

// ---------------------------------------------------------------------------------------
// Ops

Tensor per_sample_conv2d_fwd_cuda(const Tensor& x, const Tensor& weights,
                                  const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  check_cuda_dense(x, "x");
  check_weights_rank(weights, x);
  const Checked ck = check_conv(x, weights.sizes(), "weights", stride, padding, dilation, groups);
  check_per_sample_weights(weights, ck);
  check_bias(bias, ck, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Geo& g = ck.geo;
  Tensor y = at::empty({g.n, g.c2, g.ho, g.wo}, x.options().memory_format(ck.format));
  if (y.numel() == 0) return y;
  const Tensor* bias_ptr = bias.has_value() && bias->defined() ? &*bias : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "per_sample_conv2d_fwd", [&] {
                                    with_core<scalar_t, ConvLaunch<scalar_t, false, false>>(
                                        ck, x, weights, nullptr, bias_ptr, y);
                                  });
  return y;
}

std::tuple<Tensor, Tensor> per_sample_conv2d_bwd_cuda(const Tensor& gy, const Tensor& x,
                                                      const Tensor& weights, at::IntArrayRef stride,
                                                      at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, int64_t groups) {
  check_cuda_dense(x, "x");
  check_weights_rank(weights, x);
  const Checked ck = check_conv(x, weights.sizes(), "weights", stride, padding, dilation, groups);
  check_per_sample_weights(weights, ck);
  check_grad(gy, ck, x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor dx = at::empty(x.sizes(), x.options().memory_format(ck.format));
  if (ck.geo.n == 0) return {dx, at::empty(weights.sizes(), weights.options().dtype(ck.acc))};
  Tensor dws, unused;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "per_sample_conv2d_bwd", [&] {
        with_core<scalar_t, ConvLaunch<scalar_t, false, true>>(ck, gy, weights, nullptr, nullptr,
                                                               dx);
        with_core<scalar_t, WgradLaunch<scalar_t, false>>(ck, gy, x, weights, nullptr, dws, unused);
      });
  return {dx, dws.view(weights.sizes())};
}

// aw_conv2d_fwd (kV2 false) or aw_conv2d_fwd_v2 (kV2 true: the v2 kernel where conv_v2
// takes the call, behind CUDA_AW_V2_VERIFIED in manet_kernels/ops/aw_conv2d.py; the first
// kernel otherwise).
template <bool kV2>
Tensor aw_conv2d_fwd_cuda(const Tensor& x, const Tensor& weight, const Tensor& scale,
                          const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_cuda_dense(x, "x");
  check_weight_rank(weight, x);
  const Checked ck = check_conv(x, weight.sizes(), "weight", stride, padding, dilation, groups);
  check_weight_dtype(weight, "weight", ck);
  check_scale(scale, ck, x);
  check_bias(bias, ck, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Geo& g = ck.geo;
  Tensor y = at::empty({g.n, g.c2, g.ho, g.wo}, x.options().memory_format(ck.format));
  if (y.numel() == 0) return y;
  const Tensor* bias_ptr = bias.has_value() && bias->defined() ? &*bias : nullptr;
  constexpr const char* kName = kV2 ? "aw_conv2d_fwd_v2" : "aw_conv2d_fwd";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kName, [&] {
    if (!kV2 || !conv_v2<scalar_t, false>(ck, x, weight, scale, bias_ptr, y))
      with_core<scalar_t, ConvLaunch<scalar_t, true, false>>(ck, x, weight, &scale, bias_ptr, y);
  });
  return y;
}

// aw_conv2d_bwd (kV2 false) or aw_conv2d_bwd_v2 (kV2 true: the v2 dx and weight-gradient
// kernels where conv_v2 / wgrad_v2 take the call, behind CUDA_AW_V2_VERIFIED; the first
// kernels otherwise).
template <bool kV2>
std::tuple<Tensor, Tensor, Tensor> aw_conv2d_bwd_cuda(const Tensor& gy, const Tensor& x,
                                                      const Tensor& weight, const Tensor& scale,
                                                      at::IntArrayRef stride,
                                                      at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, int64_t groups) {
  check_cuda_dense(x, "x");
  check_weight_rank(weight, x);
  const Checked ck = check_conv(x, weight.sizes(), "weight", stride, padding, dilation, groups);
  check_weight_dtype(weight, "weight", ck);
  check_scale(scale, ck, x);
  check_grad(gy, ck, x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor dx = at::empty(x.sizes(), x.options().memory_format(ck.format));
  if (ck.geo.n == 0) {
    return {dx, at::zeros(weight.sizes(), weight.options().dtype(ck.acc)),
            at::empty(scale.sizes(), scale.options())};
  }
  Tensor dw, ds;
  constexpr const char* kName = kV2 ? "aw_conv2d_bwd_v2" : "aw_conv2d_bwd";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kName, [&] {
    if (!kV2 || !conv_v2<scalar_t, true>(ck, gy, weight, scale, nullptr, dx))
      with_core<scalar_t, ConvLaunch<scalar_t, true, true>>(ck, gy, weight, &scale, nullptr, dx);
    if (!kV2 || !wgrad_v2<scalar_t>(ck, gy, x, weight, scale, dw, ds))
      with_core<scalar_t, WgradLaunch<scalar_t, true>>(ck, gy, x, weight, &scale, dw, ds);
  });
  return {dx, dw.view(weight.sizes()), ds.view(scale.sizes())};
}

}  // namespace
}  // namespace manet_kernels

TORCH_LIBRARY_IMPL(manet_kernels, CUDA, m) {
  m.impl("_per_sample_conv2d_fwd", &manet_kernels::per_sample_conv2d_fwd_cuda);
  m.impl("_per_sample_conv2d_bwd", &manet_kernels::per_sample_conv2d_bwd_cuda);
  m.impl("_aw_conv2d_fwd", &manet_kernels::aw_conv2d_fwd_cuda<false>);
  m.impl("_aw_conv2d_bwd", &manet_kernels::aw_conv2d_bwd_cuda<false>);
  m.impl("_aw_conv2d_fwd_v2", &manet_kernels::aw_conv2d_fwd_cuda<true>);
  m.impl("_aw_conv2d_bwd_v2", &manet_kernels::aw_conv2d_bwd_cuda<true>);
}
