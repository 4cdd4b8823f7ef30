// Launch planning of the mixed-attention CUDA passes (csrc/cuda/mixed_attention.cu):
// host-only C++, shared with the CPU-side launch-plan op that the kernel report calls
// (csrc/cpu/cuda_launch_plan.cpp), so both compute grids with the same code.
#pragma once

#include <algorithm>
#include <cstdint>

#include "plan_common.h"

namespace manet_kernels {
namespace ma_plan {

using plan_util::ceil_div;

enum OpKind : int { kChannelPool, kSpatialPool, kApply, kBwdReduce, kBwdChannel, kBwdDx };

// 8 warps: enough warps per block to hide latency with few blocks per tile row, and
// a cross-warp reduction small enough for one shared-memory step (not measured yet).
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// The k x k conv kernels on the [mean, max] map.
constexpr int kConvThreads = 256;

template <int OP, bool CL>
struct OpTraits {
  static constexpr bool kOverP = OP == kChannelPool || OP == kBwdReduce || OP == kBwdChannel;
  static constexpr bool kOverC = OP == kSpatialPool || OP == kBwdReduce;
  static constexpr bool kRowRed = CL ? kOverC : kOverP;
  static constexpr bool kColRed = CL ? kOverP : kOverC;
  static constexpr bool kMax = OP == kChannelPool || OP == kSpatialPool;
  static constexpr bool kTwoInputs = OP == kBwdReduce;
  static constexpr bool kWrites = OP == kApply || OP == kBwdDx;
  // small tensors indexed by c (mc, d_avg, d_mx, im) and by p (ms, da_s, dm_s, ic)
  static constexpr bool kCData =
      OP == kSpatialPool || OP == kApply || OP == kBwdReduce || OP == kBwdDx;
  static constexpr bool kPData =
      OP == kApply || OP == kBwdReduce || OP == kBwdChannel || OP == kBwdDx;
  static constexpr bool kRowData = CL ? kPData : kCData;
  static constexpr bool kColData = CL ? kCData : kPData;
  // Column data and column accumulators are held in registers for the whole tile, so
  // only an op with neither may sweep several chunks of a row in one tile.
  static constexpr bool kMultiChunk = !kColRed && !kColData && !kWrites;
};

struct Plan {
  int vec = 1;
  int log2tl = 5;
  int kl = 1;
  int64_t RT = 1, nRT = 1, nLT = 1;
};

// Tile shape for one pass. The aim is one read of the activation at full bandwidth:
// teams wide enough that a row segment is >= 64 B (coalesced), few idle lanes at a
// row's end, >= 4 blocks per SM, and partial buffers at most a few % of the activation.
// None of these constants has been measured yet.
inline Plan make_plan(bool multi_chunk, bool row_red, bool col_red, int64_t N, int64_t R, int64_t L,
                      int vec, int elem_bytes, int sms) {
  Plan pl;
  pl.vec = vec;
  const int64_t chunks = ceil_div(L, vec);
  int hi = 0;
  while (hi < 5 && (int64_t{1} << hi) < chunks) ++hi;
  int lo = 0;
  while (lo < 5 && (vec * elem_bytes << lo) < 64) ++lo;
  lo = std::min(lo, hi);
  auto waste = [&](int t) {
    return ceil_div(chunks, int64_t{1} << t) * (int64_t{1} << t) - chunks;
  };
  int log2tl = hi;
  // Row results split over column tiles need partials: keep those tiles wide.
  if (multi_chunk || !row_red) {
    for (int t = hi - 1; t >= lo; --t) {
      if (waste(t) < waste(log2tl)) log2tl = t;
    }
  }
  pl.log2tl = log2tl;
  const int64_t tl = int64_t{1} << log2tl;
  const int64_t rows_per_pass = kWarps * (32 / tl);
  const int64_t u = vec * elem_bytes >= 8 ? 4 : 8;  // the kernel's U
  const int64_t target = 4 * static_cast<int64_t>(sms);
  if (multi_chunk) {
    pl.RT = rows_per_pass * u;
    pl.nRT = ceil_div(R, pl.RT);
    const int64_t steps = ceil_div(chunks, tl);
    const int64_t want = std::clamp<int64_t>(ceil_div(target, N * pl.nRT), 1, steps);
    pl.kl = static_cast<int>(ceil_div(steps, want));
    pl.nLT = ceil_div(steps, pl.kl);
  } else {
    pl.kl = 1;
    pl.nLT = ceil_div(chunks, tl);
    // Column partials cost 4-12 B per column per tile: keep >= 256 rows per tile.
    const int64_t max_split = col_red ? ceil_div(R, 256) : ceil_div(R, rows_per_pass * u);
    const int64_t want =
        std::clamp<int64_t>(ceil_div(target, N * pl.nLT), 1, std::max<int64_t>(1, max_split));
    pl.RT = ceil_div(ceil_div(R, want), rows_per_pass) * rows_per_pass;
    pl.nRT = ceil_div(R, pl.RT);
  }
  return pl;
}

// One pass over an (N, C, P) activation viewed as (N, R, L): its tiles, and the
// finalize launches that combine partials when a reduction crosses tiles (`*_fin` is
// the finalize's result count N*K, 0 when it does not run).
struct PassPlan {
  int64_t R = 0, L = 0;
  Plan tile;
  int64_t blocks = 0;
  int64_t row_fin = 0, col_fin = 0;
};

template <int OP, bool CL>
PassPlan plan_pass(int64_t N, int64_t C, int64_t P, int elem_bytes, uintptr_t addr_bits, int sms) {
  using T = OpTraits<OP, CL>;
  PassPlan pp;
  pp.R = CL ? P : C;
  pp.L = CL ? C : P;
  const int vec = plan_util::pick_vec_bits(pp.L, elem_bytes, addr_bits);
  pp.tile = make_plan(T::kMultiChunk, T::kRowRed, T::kColRed, N, pp.R, pp.L, vec, elem_bytes, sms);
  pp.blocks = N * pp.tile.nRT * pp.tile.nLT;
  if (T::kRowRed && pp.tile.nLT > 1) pp.row_fin = N * pp.R;
  if (T::kColRed && pp.tile.nRT > 1) pp.col_fin = N * pp.L;
  return pp;
}

// Blocks of a finalize launch over `total` results (grid-stride beyond 2^16 blocks).
inline int finalize_blocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), 1 << 16));
}

inline int conv_blocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>(ceil_div(total, kConvThreads), int64_t{1} << 20));
}

// dweight/dbias of the k x k conv: `taps` block columns, each split into S chunks of
// >= 2048 positions, about 4 blocks per SM in all; then one ordered sum of the S
// partials per tap.
inline int64_t conv_dw_splits(int64_t P, int64_t taps, int sms) {
  return std::clamp<int64_t>(ceil_div(4 * static_cast<int64_t>(sms), taps), 1,
                             std::max<int64_t>(1, ceil_div(P, 2048)));
}

}  // namespace ma_plan
}  // namespace manet_kernels
