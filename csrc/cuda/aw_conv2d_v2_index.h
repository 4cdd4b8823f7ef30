// Index math of the second-generation AW-conv CUDA weight-gradient kernel
// (_aw_conv2d_wgrad_v2_kernel in csrc/cuda/aw_conv2d_v2.cuh): which block does what, which
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

// ---------------------------------------------------------------------------------------
// Forward (_aw_conv2d_fwd_v2_kernel): M = output positions of one sample, N = output
// channels of a group, K = (tap, input channel), taps outer, in steps of BK channels.

// blockIdx.x -> (N tile, M tile, group, sample), the N tile fastest (as conv_tile).
struct FwdBlock {
  int nt, mt, gi, n;
};

MK_HD FwdBlock fwd_block(int64_t b, int n_nt, int n_mt, int groups) {
  FwdBlock k;
  k.nt = static_cast<int>(b % n_nt);
  b /= n_nt;
  k.mt = static_cast<int>(b % n_mt);
  b /= n_mt;
  k.gi = static_cast<int>(b % groups);
  k.n = static_cast<int>(b / groups);
  return k;
}

// The K cursor: tap (r, s) and the first channel c0 of the step; steps by BK channels,
// then to the next tap, without division. K steps per tap: ceil(C1/g / BK).
struct KCursor {
  int r, s, c0;
};

MK_HD void kcursor_step(KCursor& k, int bk, int c1g, int kw) {
  k.c0 += bk;
  if (k.c0 >= c1g) {
    k.c0 = 0;
    if (++k.s == kw) {
      k.s = 0;
      ++k.r;
    }
  }
}

// Element offset inside sample n of x (channels_last) of the chunk of input channels
// [c0 + kc, c0 + kc + VEC) of group gi that tap (r, s) reads for output position
// (oh, ow), or -1 (zero-fill): past the last position (q_ok false), in the padding, or
// past the group's channels (C1/g is a multiple of VEC).
MK_HD int x_fwd_chunk(const Geo& g, bool q_ok, int oh, int ow, const KCursor& k, int kc, int gi) {
  if (!q_ok || k.c0 + kc >= g.c1g) return -1;
  const int ih = oh * g.sh - g.ph + k.r * g.dh;
  const int iw = ow * g.sw - g.pw + k.s * g.dw;
  if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) return -1;
  return (ih * g.w + iw) * g.c1 + gi * g.c1g + k.c0 + kc;
}

// The weight element of B(k, j) = w[o, c, t] (scaled on load), or -1 (zero): output
// channel o = gi * C2/g + j0 + j past the group, or channel c = c0 + kk past C1/g.
MK_HD int64_t w_fwd_at(const Geo& g, const KCursor& k, int kk, int j0, int j, int gi) {
  if (j0 + j >= g.c2g || k.c0 + kk >= g.c1g) return -1;
  const int o = gi * g.c2g + j0 + j;
  return (static_cast<int64_t>(o) * g.c1g + k.c0 + kk) * g.taps + k.r * g.kw + k.s;
}

// Offset in y (channels_last (N, Ho, Wo, C2)) of the chunk of output channels
// [j0 + jc, j0 + jc + VEC) of group gi at position q of sample n, or -1 (not written).
MK_HD int64_t y_fwd_chunk(const Geo& g, int n, int q, int j0, int jc, int gi) {
  if (q >= g.ho * g.wo || j0 + jc >= g.c2g) return -1;
  return (static_cast<int64_t>(n) * g.ho * g.wo + q) * g.c2 + gi * g.c2g + j0 + jc;
}

// ---------------------------------------------------------------------------------------
// dx (_aw_conv2d_dx_v2_kernel, stride 1): M = input positions p = ih * W + iw of one
// sample, N = input channels of a group, K = (tap, output channel), taps outer. Blocks
// and the K cursor as the forward's (the cursor's channels are output channels).

// Element offset inside sample n of g (channels_last) of the chunk of output channels
// [c0 + kc, c0 + kc + VEC) of group gi at the output position that tap (r, s) takes input
// position (ih, iw) to, or -1 (zero-fill): past the last position (p_ok false), no output
// position, or past the group's channels.
MK_HD int g_dx_chunk(const Geo& g, bool p_ok, int ih, int iw, const KCursor& k, int kc, int gi) {
  if (!p_ok || k.c0 + kc >= g.c2g) return -1;
  const int oh = ih + g.ph - k.r * g.dh;
  const int ow = iw + g.pw - k.s * g.dw;
  if (oh < 0 || oh >= g.ho || ow < 0 || ow >= g.wo) return -1;
  return (oh * g.wo + ow) * g.c2 + gi * g.c2g + k.c0 + kc;
}

// B(k, j) = w[o, c, t] * scale[n, o, t] with o = gi * C2/g + c0 + kk, c = j0 + j: the
// weight's offset, or -1 (zero) past the group's output or input channels.
MK_HD int64_t w_dx_at(const Geo& g, const KCursor& k, int kk, int j0, int j, int gi) {
  if (k.c0 + kk >= g.c2g || j0 + j >= g.c1g) return -1;
  const int o = gi * g.c2g + k.c0 + kk;
  return (static_cast<int64_t>(o) * g.c1g + j0 + j) * g.taps + k.r * g.kw + k.s;
}

// ... and its scale's offset in (N, C2, kh, kw) (valid where w_dx_at is).
MK_HD int64_t s_dx_at(const Geo& g, int n, const KCursor& k, int kk, int gi) {
  return (static_cast<int64_t>(n) * g.c2 + gi * g.c2g + k.c0 + kk) * g.taps + k.r * g.kw + k.s;
}

// Offset in dx (channels_last (N, H, W, C1)) of the chunk of input channels
// [j0 + jc, j0 + jc + VEC) of group gi at position p of sample n, or -1.
MK_HD int64_t dx_chunk(const Geo& g, int n, int p, int j0, int jc, int gi) {
  if (p >= g.h * g.w || j0 + jc >= g.c1g) return -1;
  return (static_cast<int64_t>(n) * g.h * g.w + p) * g.c1 + gi * g.c1g + j0 + jc;
}

}  // namespace aw_v2
}  // namespace manet_kernels
