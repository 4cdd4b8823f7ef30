// Launch planning of the AW-conv / per-sample conv CUDA kernels (csrc/cuda/aw_conv2d.cu,
// second generation csrc/cuda/aw_conv2d_v2.cuh):
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

// ---------------------------------------------------------------------------------------
// Second-generation weight-gradient kernel (_aw_conv2d_wgrad_v2_kernel, aw op only):
// channels_last activations copied with 16-byte cp.async into a kStages-deep ring of
// shared-memory tiles, 64x64 output tiles (output x input channels of one tap), one block
// per (tile, tap, group, sample split), so the batch is the split-K axis. Not measured on
// a GPU yet: the sizes follow the Triton kernels' sm_90 compile (docs/design.md §2b).
struct WgradV2Tile {
  int bm, bn, bk, vec, pad, stages;
  bool sum_in_smem;  // the running sum_n scale * G_n in shared memory, not registers
};

// 16-bit: tensor cores (WMMA), BK = 32; fp32/fp64: the FMA tile, BK = 16. `pad` elements
// after each smem row keep WMMA's rows 32-byte aligned and stagger banks. fp64 keeps its
// running sum in shared memory (in registers it spilled 64 bytes under the 128-register
// cap, ptxas sm_90) and two stages, so two CTAs still fit in an SM's 227 KiB.
constexpr WgradV2Tile wgrad_v2_tile(int elem_bytes) {
  return {64,
          64,
          elem_bytes == 2 ? 32 : 16,
          16 / elem_bytes,
          elem_bytes == 2 ? 8 : 0,
          elem_bytes == 8 ? 2 : 3,
          elem_bytes == 8};
}

// Dynamic shared memory: the ring of A ([BK][BM + pad]) and B ([BK][BN + pad]) tiles,
// then, 128-byte aligned, the accumulation-dtype tile C ([BM][BN + 4]) of the fold and,
// with sum_in_smem, the running sum ([BN / row parts][threads], each thread its column).
constexpr int wgrad_v2_c_offset(int elem_bytes) {
  const WgradV2Tile t = wgrad_v2_tile(elem_bytes);
  const int ring = t.stages * t.bk * (t.bm + t.pad + t.bn + t.pad) * elem_bytes;
  return (ring + 127) / 128 * 128;
}
constexpr int wgrad_v2_sum_offset(int elem_bytes, int acc_bytes) {
  const WgradV2Tile t = wgrad_v2_tile(elem_bytes);
  return wgrad_v2_c_offset(elem_bytes) + t.bm * (t.bn + 4) * acc_bytes;
}
constexpr int wgrad_v2_smem(int elem_bytes, int acc_bytes) {
  const WgradV2Tile t = wgrad_v2_tile(elem_bytes);
  return wgrad_v2_sum_offset(elem_bytes, acc_bytes) + (t.sum_in_smem ? t.bm * t.bn * acc_bytes : 0);
}

// Whether the v2 kernel takes this call: sm_80+ (cp.async, bf16 MMA), channels_last x and
// g, channel counts per group that 16-byte chunks tile exactly, 16-byte aligned tensors
// (`addr_bits`: OR of the pointers) and per-sample sizes in int32. Otherwise the first
// kernel runs.
inline bool wgrad_v2_supported(const Geo& g, int elem_bytes, bool channels_last, uint64_t addr_bits,
                               int cc_major) {
  const int vec = 16 / elem_bytes;
  const int64_t lim = 2147483647;
  return cc_major >= 8 && channels_last && g.c1g > 0 && g.c2g > 0 && g.c1g % vec == 0 &&
         g.c2g % vec == 0 && addr_bits % 16 == 0 && int64_t{g.h} * g.w * g.c1 <= lim &&
         int64_t{g.ho} * g.wo * g.c2 <= lim;
}

// Blocks (N tile, M tile, tap, group) x sample splits. The split makes the grid at least
// two waves at two CTAs per SM (4 * sms blocks) where the batch allows; each split writes
// a (C2, C1/g, kh, kw) partial, capped at 256 MiB in all (or one split's size).
struct WgradV2Grid {
  int n_mt = 0, n_nt = 0, n_chunk = 0, s_n = 0;
  int ks = 0, d_oh = 0, d_ow = 0;  // K steps per sample; BK / Wo and BK % Wo
  int64_t base = 0, blocks = 0;
  int smem = 0;
};

inline WgradV2Grid wgrad_v2_grid(const Geo& g, int elem_bytes, int acc_bytes, int sms) {
  const WgradV2Tile t = wgrad_v2_tile(elem_bytes);
  WgradV2Grid v;
  v.n_mt = static_cast<int>(ceil_div(g.c2g, t.bm));
  v.n_nt = static_cast<int>(ceil_div(g.c1g, t.bn));
  v.base = int64_t{v.n_mt} * v.n_nt * g.taps * g.groups;
  v.smem = wgrad_v2_smem(elem_bytes, acc_bytes);
  if (v.base == 0 || g.n == 0) return v;
  const int64_t target = 4 * static_cast<int64_t>(sms);
  const int64_t wbytes = int64_t{g.c2} * g.c1g * g.taps * acc_bytes;
  const int64_t cap = std::max<int64_t>(1, (int64_t{256} << 20) / wbytes);
  const int64_t want =
      std::clamp<int64_t>(ceil_div(target, v.base), 1, std::min<int64_t>(g.n, cap));
  v.n_chunk = static_cast<int>(std::max<int64_t>(1, g.n / want));
  v.s_n = static_cast<int>(ceil_div(g.n, v.n_chunk));
  if (v.s_n > cap) {  // floor(N / want) can overshoot the cap by the rounding
    v.n_chunk = static_cast<int>(ceil_div(g.n, cap));
    v.s_n = static_cast<int>(ceil_div(g.n, v.n_chunk));
  }
  v.ks = static_cast<int>(ceil_div(int64_t{g.ho} * g.wo, t.bk));
  v.d_oh = t.bk / g.wo;
  v.d_ow = t.bk % g.wo;
  v.blocks = v.base * v.s_n;
  return v;
}

// Forward, second generation (_aw_conv2d_fwd_v2_kernel, aw op, fp16/bf16/fp32 on
// sm_80+): channels_last x copied with 16-byte cp.async into a 3-stage ring of A tiles
// ([BM][BK + pad_a], positions x channels), the weight tile gathered, scaled by
// scale[n, o, t] (and rounded) as it is loaded into a ring of B tiles ([BK][BN + pad_b]);
// the fp32 C tile ([BM][BN + 4]) reuses the ring after the K loop. fp16/bf16: WMMA, BK 32;
// fp32: the FMA tile, BK 16.
struct FwdV2Tile {
  int bm, bn, bk, vec, pad_a, pad_b, stages;
};
constexpr FwdV2Tile fwd_v2_tile(int elem_bytes) {
  return elem_bytes == 2 ? FwdV2Tile{64, 64, 32, 8, 8, 8, 3} : FwdV2Tile{64, 64, 16, 4, 4, 0, 3};
}
constexpr int fwd_v2_ring_a_bytes(int elem_bytes) {
  const FwdV2Tile t = fwd_v2_tile(elem_bytes);
  return t.stages * t.bm * (t.bk + t.pad_a) * elem_bytes;
}
constexpr int fwd_v2_smem(int elem_bytes) {
  const FwdV2Tile t = fwd_v2_tile(elem_bytes);
  const int ring =
      fwd_v2_ring_a_bytes(elem_bytes) + t.stages * t.bk * (t.bn + t.pad_b) * elem_bytes;
  const int c = t.bm * (t.bn + 4) * 4;
  return ring > c ? ring : c;
}

// fp16/bf16/fp32 on sm_80+, channels_last x (and so y), channel counts per group that
// 16-byte chunks tile, 16-byte aligned x and y, per-sample sizes in int32.
inline bool fwd_v2_supported(const Geo& g, int elem_bytes, bool channels_last, uint64_t addr_bits,
                             int cc_major) {
  const int64_t lim = 2147483647;
  const int vec = 16 / elem_bytes;
  return cc_major >= 8 && (elem_bytes == 2 || elem_bytes == 4) && channels_last && g.c1g > 0 &&
         g.c2g > 0 && g.c1g % vec == 0 && g.c2g % vec == 0 && addr_bits % 16 == 0 &&
         int64_t{g.h} * g.w * g.c1 <= lim && int64_t{g.ho} * g.wo * g.c2 <= lim;
}

// dx v2 (_aw_conv2d_dx_v2_kernel): the same tiles and conditions, stride 1 only (a
// strided dx would need a per-tap parity test; those calls keep the first kernel).
inline bool dx_v2_supported(const Geo& g, int elem_bytes, bool channels_last, uint64_t addr_bits,
                            int cc_major) {
  return g.sh == 1 && g.sw == 1 &&
         fwd_v2_supported(g, elem_bytes, channels_last, addr_bits, cc_major);
}

struct FwdV2Grid {
  int n_mt = 0, n_nt = 0, ks_tap = 0;  // tiles along M and N; K steps per tap
  int64_t blocks = 0;
  int smem = 0;
};

// dx = false: the forward's grid (output positions x output channels, K over input
// channels); dx = true: input positions x input channels, K over output channels.
inline FwdV2Grid fwd_v2_grid(const Geo& g, int elem_bytes, bool dx) {
  const FwdV2Tile t = fwd_v2_tile(elem_bytes);
  FwdV2Grid v;
  v.n_mt = static_cast<int>(ceil_div(dx ? int64_t{g.h} * g.w : int64_t{g.ho} * g.wo, t.bm));
  v.n_nt = static_cast<int>(ceil_div(dx ? g.c1g : g.c2g, t.bn));
  v.ks_tap = static_cast<int>(ceil_div(dx ? g.c2g : g.c1g, t.bk));
  v.blocks = int64_t{v.n_mt} * v.n_nt * g.groups * g.n;
  v.smem = fwd_v2_smem(elem_bytes);
  return v;
}

}  // namespace aw_plan
}  // namespace manet_kernels
