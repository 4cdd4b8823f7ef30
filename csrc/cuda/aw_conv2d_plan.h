// Launch planning of the AW-conv / per-sample conv CUDA kernels (csrc/cuda/aw_conv2d.cu):
// host-only C++, shared with the CPU-side launch-plan op that the kernel report calls
// (csrc/cpu/cuda_launch_plan.cpp), so both compute grids with the same code.
#pragma once

#include <algorithm>
#include <cstdint>

#include "plan_common.h"

namespace manet_kernels {
namespace aw_plan {

using plan_util::ceil_div;

// 8 warps: the 64x64 tile as 16 4x4 FMA sub-tiles per warp row, or as 8 warp tiles of
// 16x32 for WMMA (not measured yet).
constexpr int kThreads = 256;

// Block tiles (BM x BN, GEMM-K in BK steps) of the two tile engines, FmaCore and WmmaCore.
struct FmaTile {
  static constexpr int BM = 64, BN = 64, BK = 16;
};
struct WmmaTile {
  static constexpr int BM = 64, BN = 64, BK = 32;
};

// Tensor cores for fp16 from sm_70, for bf16 from sm_80; the FMA tiles otherwise.
inline bool tensor_cores_for(bool is_16bit, bool is_half, int cc_major) {
  if (!is_16bit) return false;
  return is_half ? cc_major >= 7 : cc_major >= 8;
}

struct Geo {
  int n, c1, h, w, c2, kh, kw, ho, wo;
  int groups, c1g, c2g, taps;
  int sh, sw, ph, pw, dh, dw;
};

// The geometry of a checked convolution (the caller checks ranges and int32 limits).
inline Geo make_geo(int64_t n, int64_t c1, int64_t h, int64_t w, int64_t c2, int64_t kh, int64_t kw,
                    const int64_t st[2], const int64_t pd[2], const int64_t dl[2], int64_t groups) {
  const int64_t span_h = h + 2 * pd[0] - dl[0] * (kh - 1) - 1;
  const int64_t span_w = w + 2 * pd[1] - dl[1] * (kw - 1) - 1;
  Geo g;
  g.n = static_cast<int>(n);
  g.c1 = static_cast<int>(c1);
  g.h = static_cast<int>(h);
  g.w = static_cast<int>(w);
  g.c2 = static_cast<int>(c2);
  g.kh = static_cast<int>(kh);
  g.kw = static_cast<int>(kw);
  g.ho = static_cast<int>(span_h / st[0] + 1);
  g.wo = static_cast<int>(span_w / st[1] + 1);
  g.groups = static_cast<int>(groups);
  g.c1g = static_cast<int>(c1 / groups);
  g.c2g = static_cast<int>(c2 / groups);
  g.taps = static_cast<int>(kh * kw);
  g.sh = static_cast<int>(st[0]);
  g.sw = static_cast<int>(st[1]);
  g.ph = static_cast<int>(pd[0]);
  g.pw = static_cast<int>(pd[1]);
  g.dh = static_cast<int>(dl[0]);
  g.dw = static_cast<int>(dl[1]);
  return g;
}

// Forward (dx = false) or dx (dx = true) blocks: (n, group, M tile, N tile).
struct ConvGrid {
  int n_mt = 0, n_nt = 0;
  int64_t blocks = 0;
};

inline ConvGrid conv_grid(const Geo& g, bool dx, int bm, int bn) {
  ConvGrid cg;
  const int64_t rows = dx ? int64_t{g.h} * g.w : int64_t{g.ho} * g.wo;
  cg.n_mt = static_cast<int>(ceil_div(rows, bm));
  cg.n_nt = static_cast<int>(ceil_div(dx ? g.c1g : g.c2g, bn));
  cg.blocks = int64_t{cg.n_mt} * cg.n_nt * g.groups * g.n;
  return cg;
}

// Split plan for the weight-grad kernel: enough blocks to fill the GPU a few times
// over (4 per SM, not measured yet), position chunks of at least 4 K steps, and
// partial buffers capped at 256 MiB (or the output's own size if that is larger).
struct WgradPlan {
  int n_chunk, q_chunk, s_n, s_q;
};

inline WgradPlan plan_wgrad(const Geo& g, int64_t base_blocks, int bk, bool aw, int64_t acc_size,
                            int sms) {
  const int64_t target = 4 * static_cast<int64_t>(sms);
  const int64_t P = int64_t{g.ho} * g.wo;
  const int64_t wbytes = int64_t{g.c2} * g.c1g * g.taps * acc_size;
  const int64_t cap_bytes = std::max<int64_t>(int64_t{256} << 20, aw ? wbytes : wbytes * g.n);
  int64_t s_n = 1;
  if (aw) {
    s_n = std::clamp<int64_t>(ceil_div(target, base_blocks), 1, g.n);
    s_n = std::min<int64_t>(s_n, std::max<int64_t>(1, cap_bytes / wbytes));
  } else {
    s_n = g.n;  // one sample per block: G_n is an output
  }
  const int64_t n_chunk = ceil_div(g.n, s_n);
  s_n = ceil_div(g.n, n_chunk);
  const int64_t q_steps = ceil_div(P, bk);
  int64_t s_q = std::clamp<int64_t>(ceil_div(target, base_blocks * s_n), 1,
                                    std::max<int64_t>(1, q_steps / 4));
  const int64_t per_q = aw ? s_n * wbytes : g.n * wbytes;  // partial bytes per position split
  s_q = std::min<int64_t>(s_q, std::max<int64_t>(1, cap_bytes / per_q));
  const int64_t q_chunk = ceil_div(q_steps, s_q) * bk;
  s_q = ceil_div(P, q_chunk);
  return {static_cast<int>(n_chunk), static_cast<int>(q_chunk), static_cast<int>(s_n),
          static_cast<int>(s_q)};
}

// Weight-grad blocks: (M tile, N tile, tap, group) x sample splits x position splits;
// base == 0 (no channels) launches nothing.
struct WgradGrid {
  int n_mt = 0, n_nt = 0;
  int64_t base = 0, blocks = 0;
  WgradPlan pl{};
};

inline WgradGrid wgrad_grid(const Geo& g, int bm, int bn, int bk, bool aw, int64_t acc_size,
                            int sms) {
  WgradGrid wg;
  wg.n_mt = static_cast<int>(ceil_div(g.c2g, bm));
  wg.n_nt = static_cast<int>(ceil_div(g.c1g, bn));
  wg.base = int64_t{wg.n_mt} * wg.n_nt * g.taps * g.groups;
  if (wg.base == 0) return wg;
  wg.pl = plan_wgrad(g, wg.base, bk, aw, acc_size, sms);
  wg.blocks = wg.base * wg.pl.s_n * wg.pl.s_q;
  return wg;
}

}  // namespace aw_plan
}  // namespace manet_kernels
