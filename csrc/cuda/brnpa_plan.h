// Launch planning of the BR-NPA CUDA passes (csrc/cuda/brnpa.cu): host-only C++, shared
// with the CPU-side launch-plan op that the kernel report calls
// (csrc/cpu/cuda_launch_plan.cpp), so both compute grids with the same code.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "plan_common.h"

namespace manet_kernels {
namespace brnpa_plan {

using plan_util::ceil_div;
using plan_util::log2_of;
using plan_util::pick_vec;

// 8 warps: enough warps for latency hiding at 2 blocks per SM, and a cross-warp
// reduction of one shared-memory step (not measured yet).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Probes / weights handled per sweep of a tile in bwd_reduce: 4 keeps the register
// tiles under 128 registers with 16-byte loads (not measured yet).
constexpr int kBwdGroup = 4;
// At most 16 probes per bwd_reduce launch: more are chunked into further launches,
// one read of x each (K <= 16 is the supported single-read range).
constexpr int kMaxProbes = 16;
// A position tile of ~64 KiB: 264 resident blocks (2 per SM) keep ~17 MB live, well
// inside H100's 50 MB L2, so phase 2 re-reads hit cache (not measured yet).
constexpr int64_t kTileBytes = 64 * 1024;
// Tiles of at most 256 positions bound the per-tile weight and reduction buffers
// (not measured yet).
constexpr int kMaxTileP = 256;
// channels_last phase 2 with small C: at most 8192 partial accumulators per block
// (32 KiB in fp32), whatever the number of position subsets (not measured yet).
constexpr int64_t kSubAccElems = 8192;
// bwd_dx: rows per thread, and the shared-memory budget for staged coefficients
// (not measured yet).
constexpr int kDxRows = 4;
constexpr int64_t kDxSmemBudget = 40 * 1024;

enum Mode : int { kNorms, kStep, kBwd };

struct ReducePlan {
  int vec = 1;
  int log2l = 0;
  int TP = 1;
  int nsub = 1;
  int64_t ntiles = 1;
  size_t smem = 0;
};

// Tile shape of one reduce launch; nw weights, G probes per sweep.
inline ReducePlan plan_reduce(bool cl, int64_t C, int64_t P, int vec, int elem, int acc_bytes,
                              int nw, int G) {
  ReducePlan pl;
  pl.vec = vec;
  if (!cl) {
    // Row segments of at least one 32-byte sector, no wider than the map, then widened
    // while the tile stays within kTileBytes (not measured yet).
    int lanes_lo = 1;
    while (lanes_lo < 32 && lanes_lo * vec * elem < 32) lanes_lo <<= 1;
    int lanes_hi = 1;
    while (lanes_hi < 32 && static_cast<int64_t>(lanes_hi) * vec < P) lanes_hi <<= 1;
    int lanes = std::min(lanes_lo, lanes_hi);
    while (lanes * 2 <= lanes_hi &&
           static_cast<int64_t>(lanes) * 2 * vec * C * elem <= kTileBytes) {
      lanes <<= 1;
    }
    pl.log2l = log2_of(lanes);
    pl.TP = lanes * vec;
    pl.nsub = 1;
    pl.smem = static_cast<size_t>(static_cast<int64_t>(nw) * C + static_cast<int64_t>(nw) * pl.TP +
                                  static_cast<int64_t>(kWarps) * G * pl.TP) *
              acc_bytes;
  } else {
    // One team of lanes spans a position's channels (up to a warp); teams stack into
    // tiles of up to kTileBytes and kMaxTileP positions (not measured yet).
    int lanes = 1;
    while (lanes < 32 && static_cast<int64_t>(lanes) * vec < C) lanes <<= 1;
    const int teams = kThreads / lanes;
    int passes = 1;
    while (teams * passes * 2 <= kMaxTileP && static_cast<int64_t>(teams) * passes < P &&
           static_cast<int64_t>(teams) * passes * 2 * C * elem <= kTileBytes) {
      passes <<= 1;
    }
    pl.log2l = log2_of(lanes);
    pl.TP = teams * passes;
    const int64_t nch = ceil_div(C, vec);
    // Small C: several threads per channel chunk, each over a subset of the positions.
    int64_t nsub = nch >= kThreads ? 1 : kThreads / std::max<int64_t>(nch, 1);
    nsub = std::min<int64_t>(nsub, pl.TP);
    if (nw > 0) nsub = std::min<int64_t>(nsub, std::max<int64_t>(1, kSubAccElems / (nw * C)));
    pl.nsub = static_cast<int>(nsub);
    pl.smem = static_cast<size_t>(static_cast<int64_t>(pl.nsub) * nw * C +
                                  static_cast<int64_t>(nw) * pl.TP) *
              acc_bytes;
  }
  pl.ntiles = ceil_div(P, pl.TP);
  return pl;
}

// Blocks per sample of a reduce launch: one resident wave of blocks split evenly over
// the samples (per_sm: the kernel's occupancy), so partials stay ~1% of x's bytes at
// the target shapes (not measured yet).
inline int64_t reduce_blocks_per_sample(int per_sm, int64_t sms, int64_t B, int64_t ntiles) {
  const int64_t capacity = std::max<int64_t>(1, per_sm) * sms;
  return std::clamp<int64_t>(capacity / B, 1, ntiles);
}

// Whether a reduce launch is followed by the finalize kernel over B * nw rows.
inline bool reduce_finalizes(int mode, int64_t nblk, int nw) {
  return mode != kNorms && nblk > 1 && nw > 0;
}

// Blocks of the gather kernel over `total` = B * C values (grid-stride beyond 2^16).
inline int gather_blocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), 1 << 16));
}

// One bwd_reduce launch: probes [k0, k0 + nk), with t's weights in the first.
struct BwdChunk {
  int64_t k0 = 0, nk = 0;
  bool with_t = false;
  ReducePlan pl;
};

// The launches of bwd_reduce for K probes. A plan whose shared memory still exceeds
// smem_limit at one probe is returned as it is: the caller reports it.
inline std::vector<BwdChunk> plan_bwd_chunks(bool cl, int64_t C, int64_t P, int vec, int elem,
                                             int acc_bytes, int64_t K, size_t smem_limit) {
  std::vector<BwdChunk> out;
  int64_t chunk = std::min<int64_t>(K, kMaxProbes);
  int64_t k0 = 0;
  do {
    int64_t nk = std::min(chunk, K - k0);
    const bool with_t = k0 == 0;
    ReducePlan pl =
        plan_reduce(cl, C, P, vec, elem, acc_bytes, static_cast<int>(nk + with_t), kBwdGroup);
    // Wide C: fewer probes per launch, so u's accumulators fit in shared memory.
    while (pl.smem > smem_limit && nk > 1) {
      chunk = nk = std::max<int64_t>(1, nk / 2);
      pl = plan_reduce(cl, C, P, vec, elem, acc_bytes, static_cast<int>(nk + with_t), kBwdGroup);
    }
    out.push_back({k0, nk, with_t, pl});
    if (pl.smem > smem_limit) break;
    k0 += nk;
  } while (k0 < K);
  return out;
}

// bwd_dx tiles: 16 lanes along L: row segments of 16 * 16 B = 256 B, tiles near square
// in bytes for the coefficient staging (not measured yet).
struct DxPlan {
  int lanes = 1, tcol = 1, trow = 1, jc = 1;
  size_t smem = 0;
  int64_t nrt = 1, nlt = 1, blocks = 0;
};

inline DxPlan plan_dx(bool cl, int64_t B, int64_t C, int64_t P, int vec, int acc_bytes) {
  DxPlan pl;
  const int64_t R = cl ? P : C;
  const int64_t L = cl ? C : P;
  int lanes = 1;
  while (lanes < 16 && static_cast<int64_t>(lanes) * vec < L) lanes <<= 1;
  pl.lanes = lanes;
  pl.tcol = lanes * vec;
  pl.trow = (kThreads / lanes) * kDxRows;
  const int64_t pad = 16 / acc_bytes;
  const int64_t per_j = pl.tcol + pl.trow + 2 * pad;
  pl.jc = static_cast<int>(std::clamp<int64_t>(kDxSmemBudget / acc_bytes / per_j, 1, 32));
  const int64_t npos = cl ? pl.trow : pl.tcol;
  pl.smem = static_cast<size_t>(ceil_div(pl.jc * pl.tcol, pad) * pad +
                                ceil_div(pl.jc * pl.trow, pad) * pad + npos) *
            static_cast<size_t>(acc_bytes);
  pl.nrt = ceil_div(R, pl.trow);
  pl.nlt = ceil_div(L, pl.tcol);
  pl.blocks = B * pl.nrt * pl.nlt;
  return pl;
}

}  // namespace brnpa_plan
}  // namespace manet_kernels
