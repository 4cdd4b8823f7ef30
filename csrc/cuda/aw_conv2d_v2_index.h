// Index math of the second-generation AW-conv CUDA weight-gradient kernel
// (_aw_conv2d_wgrad_v2_kernel in csrc/cuda/aw_conv2d.cu): which block does what, which
// 16-byte chunk of g and x each thread copies into which tile slot, how a thread's
// position cursor steps along GEMM-K without division, and where the fold writes its
// partials. Plain C++ that compiles as host code too, so the CPU-side emulator
// (csrc/cpu/aw_conv2d_v2_check.cpp, op _aw_conv2d_wgrad_v2_emulate) runs the very same
// functions against autograd on odd shapes (tests/test_aw_conv2d_v2_index.py).
#pragma once

#include <cstdint>

#include "aw_conv2d_plan.h"

#if defined(__CUDACC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif

namespace manet_kernels {
namespace aw_v2 {

using aw_plan::Geo;

// blockIdx.x -> (N tile, M tile, tap, group, sample split), the N tile fastest.
struct WgradBlock {
  int nt, mt, t, gi, sn;
};

MK_HD WgradBlock wgrad_block(int64_t b, int n_nt, int n_mt, int taps, int groups) {
  WgradBlock k;
  k.nt = static_cast<int>(b % n_nt);
  b /= n_nt;
  k.mt = static_cast<int>(b % n_mt);
  b /= n_mt;
  k.t = static_cast<int>(b % taps);
  b /= taps;
  k.gi = static_cast<int>(b % groups);
  k.sn = static_cast<int>(b / groups);
  return k;
}

// Samples [split_begin, split_end) of sample split sn.
MK_HD int split_begin(int sn, int n_chunk) {
  return sn * n_chunk;
}
MK_HD int split_end(int sn, int n_chunk, int n) {
  return n - sn * n_chunk < n_chunk ? n : (sn + 1) * n_chunk;
}

// An output position q = oh * Wo + ow of one sample (GEMM-K row of the tiles).
struct Cursor {
  int q, oh, ow;
};

// The one division of a thread's cursor, at the start of the block.
MK_HD Cursor cursor_at(int q, int wo) {
  return {q, q / wo, q % wo};
}

// q += BK with d_oh = BK / Wo and d_ow = BK % Wo precomputed on the host.
MK_HD void cursor_step(Cursor& c, int bk, int d_oh, int d_ow, int wo) {
  c.q += bk;
  c.oh += d_oh;
  c.ow += d_ow;
  if (c.ow >= wo) {
    c.ow -= wo;
    ++c.oh;
  }
}

// Chunk e (0 <= e < BK * ROW / VEC) of a [BK][ROW] tile of VEC-element chunks: its GEMM-K
// row and its first column. ROW / VEC is a power of two at compile time (shifts).
template <int ROW, int VEC>
MK_HD int chunk_row(int e) {
  return e / (ROW / VEC);
}
template <int ROW, int VEC>
MK_HD int chunk_col(int e) {
  return (e % (ROW / VEC)) * VEC;
}

// Element offset inside sample n of g (channels_last, (Ho, Wo, C2)) of the chunk of
// output channels [m0 + m, m0 + m + VEC) of group gi at position c.q, or -1 (zero-fill):
// past the last position or past the group's channels (C2/g is a multiple of VEC).
MK_HD int g_chunk(const Geo& g, const Cursor& c, int m0, int m, int gi) {
  if (c.q >= g.ho * g.wo || m0 + m >= g.c2g) return -1;
  return c.q * g.c2 + gi * g.c2g + m0 + m;
}

// Element offset inside sample n of x (channels_last, (H, W, C1)) of the chunk of input
// channels [j0 + j, j0 + j + VEC) of group gi that tap (r, s) reads for output position
// c, or -1 (zero-fill): past the last position, in the padding, or past the channels.
MK_HD int x_chunk(const Geo& g, const Cursor& c, int r, int s, int j0, int j, int gi) {
  if (c.q >= g.ho * g.wo || j0 + j >= g.c1g) return -1;
  const int ih = c.oh * g.sh - g.ph + r * g.dh;
  const int iw = c.ow * g.sw - g.pw + s * g.dw;
  if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) return -1;
  return (ih * g.w + iw) * g.c1 + gi * g.c1g + j0 + j;
}

// The fold: ROW_PARTS = threads / BM consecutive lanes share one row of the finished
// G_n tile; a thread owns row fold_row and columns fold_col(jj), jj < BN / ROW_PARTS.
MK_HD int fold_row(int tid, int row_parts) {
  return tid / row_parts;
}
MK_HD int fold_col(int tid, int jj, int row_parts) {
  return tid % row_parts + row_parts * jj;
}

// dweight partial of sample split sn: (S_n, C2, C1/g, kh, kw); o global, c in the group.
MK_HD int64_t dw_part_at(const Geo& g, int sn, int o, int c, int t) {
  return ((static_cast<int64_t>(sn) * g.c2 + o) * g.c1g + c) * g.taps + t;
}

// dscale partial of N tile nt: (n_nt, N, C2, kh, kw); o global.
MK_HD int64_t ds_part_at(const Geo& g, int nt, int n, int o, int t) {
  return ((static_cast<int64_t>(nt) * g.n + n) * g.c2 + o) * g.taps + t;
}

}  // namespace aw_v2
}  // namespace manet_kernels
