// manet_kernels::_aw_conv2d_{wgrad,fwd,dx}_v2_emulate: the CUDA v2 weight-gradient,
// forward and dx kernels (csrc/cuda/aw_conv2d_v2.cuh) replayed on the CPU in float64,
// thread by thread and K step by K step, through the same index functions
// (csrc/cuda/aw_conv2d_v2_index.h) and launch plan (csrc/cuda/aw_conv2d_plan.h): block
// decoding, sample splits, the 16-byte chunk -> tile-slot map, the division-free position
// cursors, zero-fill masks, the fold's thread layout and the partial buffers and their
// fixed-order sums. Tile slots and partials start as NaN, so a slot or partial that no
// thread writes shows in the result. No GPU is needed: tests/test_aw_conv2d_v2.py
// compares them with the pass contract on odd shapes. Not replayed: the MMA's own
// arithmetic, rounding to 16 bits, and the pipeline's timing (its barriers are argued in
// the kernels' comments).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../check.h"
#include "../cuda/aw_conv2d_plan.h"
#include "../cuda/aw_conv2d_v2_index.h"

namespace manet_kernels {
namespace {

using at::Tensor;

// Returns (dweight (C2, C1/g, kh, kw), dscale (N, C2, kh, kw), plan) with plan = [blocks,
// s_n, n_chunk, ks, smem, supported] for a kernel of element size `elem_bytes` (2: the
// fp16/bf16 tiles, 4: fp32, 8: fp64) on a GPU with `sms` SMs. Inputs are float64 on the
// CPU; x and g in any layout (read as channels_last, as the kernel does).
std::tuple<Tensor, Tensor, Tensor> wgrad_v2_emulate(const Tensor& g_in, const Tensor& x_in,
                                                    const Tensor& w_in, const Tensor& scale_in,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, int64_t groups,
                                                    int64_t elem_bytes, int64_t sms) {
  MK_CHECK(elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8,
           "elem_bytes: expected 2, 4 or 8, got ", elem_bytes);
  MK_CHECK(sms >= 1, "sms: expected >= 1, got ", sms);
  for (const Tensor* t : {&g_in, &x_in, &w_in, &scale_in})
    MK_CHECK(t->scalar_type() == at::kDouble && t->device().is_cpu(),
             "_aw_conv2d_wgrad_v2_emulate: expected float64 CPU tensors, got ", t->scalar_type(),
             " on ", t->device());
  MK_CHECK(x_in.dim() == 4 && w_in.dim() == 4 && stride.size() == 2 && padding.size() == 2 &&
               dilation.size() == 2,
           "_aw_conv2d_wgrad_v2_emulate: expected 4-D x and weight and pairs of conv parameters");
  const int64_t st[2] = {stride[0], stride[1]}, pd[2] = {padding[0], padding[1]},
                dl[2] = {dilation[0], dilation[1]};
  const aw_plan::Geo geo =
      aw_plan::make_geo(x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3), w_in.size(0),
                        w_in.size(2), w_in.size(3), st, pd, dl, groups);
  MK_CHECK(g_in.sizes() == at::IntArrayRef({geo.n, geo.c2, geo.ho, geo.wo}),
           "g: expected the output's shape, got ", g_in.sizes());
  MK_CHECK(scale_in.sizes() == at::IntArrayRef({geo.n, geo.c2, geo.kh, geo.kw}),
           "scale: expected (N, C2, kh, kw), got ", scale_in.sizes());

  const int eb = static_cast<int>(elem_bytes);
  const int acc_bytes = eb == 8 ? 8 : 4;
  const bool supported = aw_plan::wgrad_v2_supported(geo, eb, true, 0, 9);
  const aw_plan::WgradV2Grid v = aw_plan::wgrad_v2_grid(geo, eb, acc_bytes, static_cast<int>(sms));
  Tensor plan =
      at::tensor(std::vector<int64_t>{v.blocks, v.s_n, v.n_chunk, v.ks, v.smem, supported ? 1 : 0});
  MK_CHECK(supported, "_aw_conv2d_wgrad_v2_emulate: the v2 kernel does not take this shape");

  const aw_plan::WgradV2Tile T = aw_plan::wgrad_v2_tile(eb);
  const int BM = T.bm, BN = T.bn, BK = T.bk, VEC = T.vec;
  const int threads = aw_plan::kThreads;
  const int ald = BM + T.pad, bld = BN + T.pad;
  const int chunks = BK * BM / VEC / threads;
  const int row_parts = threads / BM, cols = BN / row_parts;
  MK_CHECK(chunks >= 1 && BM == 64 && BN == 64, "tile layout");
  // The kernel's compile-time chunk map for its VEC (BM = 64).
  auto chunk_rc = [VEC](int e, int& row, int& col) {
    switch (VEC) {
      case 8:
        row = aw_v2::chunk_row<64, 8>(e);
        col = aw_v2::chunk_col<64, 8>(e);
        break;
      case 4:
        row = aw_v2::chunk_row<64, 4>(e);
        col = aw_v2::chunk_col<64, 4>(e);
        break;
      default: row = aw_v2::chunk_row<64, 2>(e); col = aw_v2::chunk_col<64, 2>(e);
    }
  };

  // The kernel's operands: channels_last x and g, contiguous weight and scale.
  const Tensor x = x_in.permute({0, 2, 3, 1}).contiguous();
  const Tensor gg = g_in.permute({0, 2, 3, 1}).contiguous();
  const Tensor w = w_in.contiguous();
  const Tensor sc = scale_in.contiguous();
  const double* xd = x.const_data_ptr<double>();
  const double* gd = gg.const_data_ptr<double>();
  const double* wd = w.const_data_ptr<double>();
  const double* sd = sc.const_data_ptr<double>();
  const int64_t g_sample = int64_t{geo.ho} * geo.wo * geo.c2;
  const int64_t x_sample = int64_t{geo.h} * geo.w * geo.c1;

  const double nan = std::numeric_limits<double>::quiet_NaN();
  Tensor dw_part = at::full({v.s_n, geo.c2, geo.c1g, geo.kh, geo.kw}, nan, at::kDouble);
  Tensor ds_part = at::full({v.n_nt, geo.n, geo.c2, geo.kh, geo.kw}, nan, at::kDouble);
  double* dwp = dw_part.mutable_data_ptr<double>();
  double* dsp = ds_part.mutable_data_ptr<double>();
  const int64_t dwp_n = dw_part.numel(), dsp_n = ds_part.numel();

  std::vector<double> As(static_cast<size_t>(BK) * ald), Bs(static_cast<size_t>(BK) * bld);
  std::vector<double> C(static_cast<size_t>(BM) * BN);
  std::vector<double> acc(static_cast<size_t>(threads) * cols);
  std::vector<aw_v2::Cursor> cur0(static_cast<size_t>(threads) * chunks),
      cur(static_cast<size_t>(threads) * chunks);

  for (int64_t b = 0; b < v.blocks; ++b) {
    const aw_v2::WgradBlock blk = aw_v2::wgrad_block(b, v.n_nt, v.n_mt, geo.taps, geo.groups);
    const int n_begin = aw_v2::split_begin(blk.sn, v.n_chunk);
    const int n_end = aw_v2::split_end(blk.sn, v.n_chunk, geo.n);
    MK_CHECK(n_begin < n_end, "block ", b, ": empty sample split ", blk.sn);
    const int r = blk.t / geo.kw, s = blk.t - r * geo.kw;
    const int m0 = blk.mt * BM, j0 = blk.nt * BN;
    for (int tid = 0; tid < threads; ++tid) {
      for (int i = 0; i < chunks; ++i) {
        int row, col;
        chunk_rc(tid + threads * i, row, col);
        cur0[tid * chunks + i] = aw_v2::cursor_at(row, geo.wo);
      }
    }
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int n = n_begin; n < n_end; ++n) {
      cur = cur0;
      std::fill(C.begin(), C.end(), 0.0);
      for (int k = 0; k < v.ks; ++k) {
        std::fill(As.begin(), As.end(), nan);
        std::fill(Bs.begin(), Bs.end(), nan);
        for (int tid = 0; tid < threads; ++tid) {
          for (int i = 0; i < chunks; ++i) {
            int row, col;
            chunk_rc(tid + threads * i, row, col);
            MK_CHECK(row == cur[tid * chunks + i].q - k * BK, "chunk map and cursor disagree");
            const aw_v2::Cursor& c = cur[tid * chunks + i];
            const int og = aw_v2::g_chunk(geo, c, m0, col, blk.gi);
            const int ox = aw_v2::x_chunk(geo, c, r, s, j0, col, blk.gi);
            MK_CHECK(og < 0 || (og % VEC == 0 && og + VEC <= g_sample), "g chunk ", og,
                     " misaligned or out of the sample");
            MK_CHECK(ox < 0 || (ox % VEC == 0 && ox + VEC <= x_sample), "x chunk ", ox,
                     " misaligned or out of the sample");
            for (int u = 0; u < VEC; ++u) {
              As[row * ald + col + u] = og >= 0 ? gd[n * g_sample + og + u] : 0.0;
              Bs[row * bld + col + u] = ox >= 0 ? xd[n * x_sample + ox + u] : 0.0;
            }
          }
        }
        for (int kk = 0; kk < BK; ++kk)
          for (int m = 0; m < BM; ++m)
            for (int j = 0; j < BN; ++j) C[m * BN + j] += As[kk * ald + m] * Bs[kk * bld + j];
        for (int tid = 0; tid < threads; ++tid)
          for (int i = 0; i < chunks; ++i)
            aw_v2::cursor_step(cur[tid * chunks + i], BK, v.d_oh, v.d_ow, geo.wo);
      }
      // The fold: the row's kRowParts lanes add their parts (the kernel's shuffles).
      for (int tid = 0; tid < threads; tid += row_parts) {
        double part = 0.0;
        const int fr = aw_v2::fold_row(tid, row_parts);
        const bool row_ok = m0 + fr < geo.c2g;
        const int o = blk.gi * geo.c2g + m0 + fr;
        for (int lane = tid; lane < tid + row_parts; ++lane) {
          MK_CHECK(aw_v2::fold_row(lane, row_parts) == fr, "fold rows");
          const double scv = row_ok ? sd[(int64_t{n} * geo.c2 + o) * geo.taps + blk.t] : 0.0;
          for (int jj = 0; jj < cols; ++jj) {
            const int cc = aw_v2::fold_col(lane, jj, row_parts);
            const int c = j0 + cc;
            const double wv =
                row_ok && c < geo.c1g ? wd[(int64_t{o} * geo.c1g + c) * geo.taps + blk.t] : 0.0;
            const double val = C[fr * BN + cc];
            part += wv * val;
            acc[lane * cols + jj] += scv * val;
          }
        }
        if (row_ok) {
          const int64_t at = aw_v2::ds_part_at(geo, blk.nt, n, o, blk.t);
          MK_CHECK(at >= 0 && at < dsp_n && std::isnan(dsp[at]), "dscale partial ", at,
                   " out of range or written twice");
          dsp[at] = part;
        }
      }
    }
    for (int tid = 0; tid < threads; ++tid) {
      const int fr = aw_v2::fold_row(tid, row_parts);
      if (m0 + fr >= geo.c2g) continue;
      const int o = blk.gi * geo.c2g + m0 + fr;
      for (int jj = 0; jj < cols; ++jj) {
        const int c = j0 + aw_v2::fold_col(tid, jj, row_parts);
        if (c >= geo.c1g) continue;
        const int64_t at = aw_v2::dw_part_at(geo, blk.sn, o, c, blk.t);
        MK_CHECK(at >= 0 && at < dwp_n && std::isnan(dwp[at]), "dweight partial ", at,
                 " out of range or written twice");
        dwp[at] = acc[tid * cols + jj];
      }
    }
  }
  return {dw_part.sum(0), ds_part.sum(0), plan};
}

// The forward / dx v2 kernels (conv_v2_body in csrc/cuda/aw_conv2d_v2.cuh) replayed the same
// way on the channels_last activation `in` (x, or g for dx): returns the channels_last
// output (N, rows, cols, channels) and plan = [blocks, ks_tap, smem].
std::tuple<Tensor, Tensor> conv_v2_replay(const aw_plan::Geo& geo, bool dx, int elem_bytes,
                                          const Tensor& in_cl, const Tensor& w, const Tensor& sc,
                                          const Tensor& bias) {
  const aw_plan::FwdV2Grid v = aw_plan::fwd_v2_grid(geo, elem_bytes, dx);
  Tensor plan = at::tensor(std::vector<int64_t>{v.blocks, v.ks_tap, v.smem});
  const aw_plan::FwdV2Tile T = aw_plan::fwd_v2_tile(elem_bytes);
  const int BM = T.bm, BN = T.bn, BK = T.bk, VEC = T.vec;
  const int threads = aw_plan::kThreads;
  const int ald = BK + T.pad_a, bld = BN + T.pad_b;
  const int brow_step = threads / BN, bper = BK / brow_step;
  const int out_chunks = BM * BN / VEC / threads;
  MK_CHECK(BM * BK == VEC * threads && BM == 64 && BN == 64 &&
               ((BK == 32 && VEC == 8) || (BK == 16 && VEC == 4)),
           "tile layout");
  // The kernels' compile-time chunk maps: activation tiles [BM][BK], outputs [BM][BN].
  auto a_rc = [VEC](int e, int& row, int& col) {
    row = VEC == 8 ? aw_v2::chunk_row<32, 8>(e) : aw_v2::chunk_row<16, 4>(e);
    col = VEC == 8 ? aw_v2::chunk_col<32, 8>(e) : aw_v2::chunk_col<16, 4>(e);
  };
  auto out_rc = [VEC](int e, int& row, int& col) {
    row = VEC == 8 ? aw_v2::chunk_row<64, 8>(e) : aw_v2::chunk_row<64, 4>(e);
    col = VEC == 8 ? aw_v2::chunk_col<64, 8>(e) : aw_v2::chunk_col<64, 4>(e);
  };
  const double* ind = in_cl.const_data_ptr<double>();
  const double* wd = w.const_data_ptr<double>();
  const double* sd = sc.const_data_ptr<double>();
  const double* bd = bias.defined() ? bias.const_data_ptr<double>() : nullptr;
  const int P = dx ? geo.h * geo.w : geo.ho * geo.wo;
  const int row_w = dx ? geo.w : geo.wo;
  const int kchan = dx ? geo.c2g : geo.c1g, nchan = dx ? geo.c1g : geo.c2g;
  const int64_t in_sample =
      dx ? int64_t{geo.ho} * geo.wo * geo.c2 : int64_t{geo.h} * geo.w * geo.c1;

  const double nan = std::numeric_limits<double>::quiet_NaN();
  Tensor out = dx ? at::full({geo.n, geo.h, geo.w, geo.c1}, nan, at::kDouble)
                  : at::full({geo.n, geo.ho, geo.wo, geo.c2}, nan, at::kDouble);
  double* od = out.mutable_data_ptr<double>();
  const int64_t out_n = out.numel();
  std::vector<double> As(static_cast<size_t>(BM) * ald), Bs(static_cast<size_t>(BK) * bld);
  std::vector<double> C(static_cast<size_t>(BM) * BN);
  const int total = geo.taps * v.ks_tap;

  for (int64_t b = 0; b < v.blocks; ++b) {
    const aw_v2::FwdBlock blk = aw_v2::fwd_block(b, v.n_nt, v.n_mt, geo.groups);
    const int q0 = blk.mt * BM, j0 = blk.nt * BN;
    std::fill(C.begin(), C.end(), 0.0);
    aw_v2::KCursor pk{0, 0, 0};
    for (int it = 0; it < total; ++it) {
      std::fill(As.begin(), As.end(), nan);
      std::fill(Bs.begin(), Bs.end(), nan);
      for (int tid = 0; tid < threads; ++tid) {
        int am, akc;
        a_rc(tid, am, akc);
        const int aq = q0 + am;
        const bool q_ok = aq < P;
        const int ph = q_ok ? aq / row_w : 0;
        const int pw = q_ok ? aq - ph * row_w : 0;
        const int off = dx ? aw_v2::g_dx_chunk(geo, q_ok, ph, pw, pk, akc, blk.gi)
                           : aw_v2::x_fwd_chunk(geo, q_ok, ph, pw, pk, akc, blk.gi);
        MK_CHECK(off < 0 || (off % VEC == 0 && off + VEC <= in_sample), "activation chunk ", off,
                 " misaligned or out of the sample");
        for (int u = 0; u < VEC; ++u)
          As[am * ald + akc + u] = off >= 0 ? ind[blk.n * in_sample + off + u] : 0.0;
        const int bj = tid % BN, bk0 = tid / BN;
        const bool col_ok = j0 + bj < nchan;
        const int64_t srow =
            (int64_t{blk.n} * geo.c2 + blk.gi * geo.c2g + (!dx && col_ok ? j0 + bj : 0)) * geo.taps;
        const double scv = !dx && col_ok ? sd[srow + pk.r * geo.kw + pk.s] : 0.0;
        for (int i = 0; i < bper; ++i) {
          const int kk = bk0 + brow_step * i;
          double val = 0.0;
          if (dx) {
            const int64_t wi = aw_v2::w_dx_at(geo, pk, kk, j0, bj, blk.gi);
            MK_CHECK(wi < w.numel(), "weight index ", wi, " out of range");
            if (wi >= 0) {
              const int64_t si = aw_v2::s_dx_at(geo, blk.n, pk, kk, blk.gi);
              MK_CHECK(si >= 0 && si < sc.numel(), "scale index ", si, " out of range");
              val = wd[wi] * sd[si];
            }
          } else {
            const int64_t wi = aw_v2::w_fwd_at(geo, pk, kk, j0, bj, blk.gi);
            MK_CHECK(wi < w.numel(), "weight index ", wi, " out of range");
            val = wi >= 0 ? wd[wi] * scv : 0.0;
          }
          Bs[kk * bld + bj] = val;
        }
      }
      for (int m = 0; m < BM; ++m)
        for (int kk = 0; kk < BK; ++kk)
          for (int j = 0; j < BN; ++j) C[m * BN + j] += As[m * ald + kk] * Bs[kk * bld + j];
      aw_v2::kcursor_step(pk, BK, kchan, geo.kw);
    }
    MK_CHECK(pk.r == geo.kh && pk.s == 0 && pk.c0 == 0, "the K cursor ends at (", pk.r, ", ", pk.s,
             ", ", pk.c0, ")");
    for (int tid = 0; tid < threads; ++tid) {
      for (int i = 0; i < out_chunks; ++i) {
        const int e = tid + threads * i;
        int m, jc;
        out_rc(e, m, jc);
        const int64_t off = dx ? aw_v2::dx_chunk(geo, blk.n, q0 + m, j0, jc, blk.gi)
                               : aw_v2::y_fwd_chunk(geo, blk.n, q0 + m, j0, jc, blk.gi);
        if (off < 0) continue;
        MK_CHECK(off % VEC == 0 && off + VEC <= out_n, "output chunk ", off,
                 " misaligned or out of range");
        for (int u = 0; u < VEC; ++u) {
          MK_CHECK(std::isnan(od[off + u]), "output element ", off + u, " written twice");
          const double bv = bd != nullptr && !dx
                                ? bd[int64_t{blk.n} * geo.c2 + blk.gi * geo.c2g + j0 + jc + u]
                                : 0.0;
          od[off + u] = C[m * BN + jc + u] + bv;
        }
      }
    }
  }
  return {out, plan};
}

void check_f64(std::initializer_list<const Tensor*> ts, const char* op) {
  for (const Tensor* t : ts)
    MK_CHECK(t->scalar_type() == at::kDouble && t->device().is_cpu(), op,
             ": expected float64 CPU tensors, got ", t->scalar_type(), " on ", t->device());
}

// _aw_conv2d_fwd_v2_emulate: (y (N, C2, Ho, Wo), plan = [blocks, ks_tap, smem]) of the
// kernel for elements of `elem_bytes` (2: fp16/bf16, 4: fp32); _dx_v2_emulate likewise.
std::tuple<Tensor, Tensor> fwd_v2_emulate(const Tensor& x, const Tensor& w, const Tensor& scale,
                                          const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t groups, int64_t elem_bytes) {
  check_f64({&x, &w, &scale}, "_aw_conv2d_fwd_v2_emulate");
  MK_CHECK(x.dim() == 4 && w.dim() == 4 && stride.size() == 2 && padding.size() == 2 &&
               dilation.size() == 2,
           "_aw_conv2d_fwd_v2_emulate: expected 4-D x and weight and pairs of conv parameters");
  const int64_t st[2] = {stride[0], stride[1]}, pd[2] = {padding[0], padding[1]},
                dl[2] = {dilation[0], dilation[1]};
  const aw_plan::Geo geo = aw_plan::make_geo(x.size(0), x.size(1), x.size(2), x.size(3), w.size(0),
                                             w.size(2), w.size(3), st, pd, dl, groups);
  MK_CHECK(aw_plan::fwd_v2_supported(geo, static_cast<int>(elem_bytes), true, 0, 9),
           "_aw_conv2d_fwd_v2_emulate: the v2 kernel does not take this shape");
  Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  auto [y, plan] =
      conv_v2_replay(geo, false, static_cast<int>(elem_bytes), x.permute({0, 2, 3, 1}).contiguous(),
                     w.contiguous(), scale.contiguous(), b);
  return {y.permute({0, 3, 1, 2}), plan};
}

// _aw_conv2d_dx_v2_emulate: (dx (N, C1, H, W), plan) for g and an input of size (H, W).
std::tuple<Tensor, Tensor> dx_v2_emulate(const Tensor& g, const Tensor& w, const Tensor& scale,
                                         at::IntArrayRef input_hw, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups, int64_t elem_bytes) {
  check_f64({&g, &w, &scale}, "_aw_conv2d_dx_v2_emulate");
  MK_CHECK(g.dim() == 4 && w.dim() == 4 && input_hw.size() == 2 && stride.size() == 2 &&
               padding.size() == 2 && dilation.size() == 2,
           "_aw_conv2d_dx_v2_emulate: expected 4-D g and weight and pairs of conv parameters");
  const int64_t st[2] = {stride[0], stride[1]}, pd[2] = {padding[0], padding[1]},
                dl[2] = {dilation[0], dilation[1]};
  const aw_plan::Geo geo =
      aw_plan::make_geo(g.size(0), w.size(1) * groups, input_hw[0], input_hw[1], w.size(0),
                        w.size(2), w.size(3), st, pd, dl, groups);
  MK_CHECK(geo.ho == g.size(2) && geo.wo == g.size(3), "g: expected the output size (", geo.ho,
           ", ", geo.wo, "), got ", g.sizes());
  MK_CHECK(aw_plan::dx_v2_supported(geo, static_cast<int>(elem_bytes), true, 0, 9),
           "_aw_conv2d_dx_v2_emulate: the v2 kernel does not take this shape");
  auto [dx, plan] =
      conv_v2_replay(geo, true, static_cast<int>(elem_bytes), g.permute({0, 2, 3, 1}).contiguous(),
                     w.contiguous(), scale.contiguous(), Tensor());
  return {dx.permute({0, 3, 1, 2}), plan};
}

}  // namespace
}  // namespace manet_kernels

TORCH_LIBRARY_FRAGMENT(manet_kernels, m) {
  // Private: for tests/test_aw_conv2d_v2_index.py (see the top of this file).
  m.def(
      "_aw_conv2d_wgrad_v2_emulate(Tensor g, Tensor x, Tensor weight, Tensor scale, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int elem_bytes, int sms) "
      "-> (Tensor dweight, Tensor dscale, Tensor plan)",
      &manet_kernels::wgrad_v2_emulate);
  m.def(
      "_aw_conv2d_fwd_v2_emulate(Tensor x, Tensor weight, Tensor scale, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int elem_bytes) "
      "-> (Tensor y, Tensor plan)",
      &manet_kernels::fwd_v2_emulate);
  m.def(
      "_aw_conv2d_dx_v2_emulate(Tensor g, Tensor weight, Tensor scale, int[2] input_hw, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int elem_bytes) "
      "-> (Tensor dx, Tensor plan)",
      &manet_kernels::dx_v2_emulate);
}
