// CPU kernels for the BR-NPA stages (issue 16; docs/design.md §3, §7). The contract is
// the brnpa_* functions of manet_kernels/reference/stages.py: one op per stage, each
// the pass over x (brnpa_kernels.h) followed by the stage's tiny work, which runs here
// as plain loops on raw pointers (no ATen ops: on small shapes their host time is the
// whole cost of a step).
//
//   * _brnpa_prepare: the norms pass, then inv and the first part's score.
//   * _brnpa_part: one part in place: the argmax of the score, the step pass, then
//     the sum S, the map, the vector and the score update.
//   * _brnpa_bwd_finish: the algebra between the two backward passes, producing the
//     (a, m, c) that _brnpa_bwd_dx takes.
//
// Every sum runs in a fixed order that depends on the shape only; the per-sample
// loops are parallel over samples only where a sample's work is big enough to pay
// for it (grain_for).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../brnpa_stage_checks.h"
#include "brnpa_kernels.h"

namespace {

using at::Tensor;
using namespace manet_kernels::brnpa_cpu;

// ---------------------------------------------------------------------------
// Argument checks: ../brnpa_stage_checks.h, with `arg` a dense CPU tensor.

void check_dense_cpu(const Tensor& t, const char* name) {
  manet_kernels::brnpa_stage::check_dense(t, name);
  MK_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
}

namespace checks = manet_kernels::brnpa_stage;
constexpr auto cpu_arg = &check_dense_cpu;

Layout layout_of(const checks::Checked& c) {
  return c.channels_last ? Layout::kNHWC : Layout::kNCHW;
}

// ---------------------------------------------------------------------------
// Tiny loops.

// sum_i a[i] in a fixed order (64 bytes of lanes, then a fixed tree), as `dot`.
template <typename acc_t>
inline acc_t lane_sum(const acc_t* __restrict__ a, int64_t n) {
  constexpr int L = static_cast<int>(64 / sizeof(acc_t));
  acc_t lane[L];
  for (int j = 0; j < L; ++j) lane[j] = acc_t(0);
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) lane[j] += a[i + j];
  acc_t s = lane_total<acc_t, L>(lane);
  for (; i < n; ++i) s += a[i];
  return s;
}

// The first maximum of v[0, n), n >= 1; the first NaN if there is one (torch.argmax).
template <typename acc_t>
inline int64_t first_max(const acc_t* v, int64_t n) {
  acc_t best = v[0];
  if (std::isnan(best)) return 0;
  int64_t at = 0;
  for (int64_t i = 1; i < n; ++i) {
    const acc_t a = v[i];
    if (std::isnan(a)) return i;
    if (a > best) {
      best = a;
      at = i;
    }
  }
  return at;
}

// ---------------------------------------------------------------------------
// Stage kernels.

template <typename dtype_t>
void prepare_impl(const Tensor& x, Layout layout, bool paper, double eps, Tensor& nrm, Tensor& inv,
                  Tensor& score) {
  using acc_t = at::opmath_type<dtype_t>;
  norms_impl<dtype_t>(x, layout, nrm);
  const acc_t e = static_cast<acc_t>(eps);
  const acc_t* np = nrm.const_data_ptr<acc_t>();
  acc_t* ip = inv.mutable_data_ptr<acc_t>();
  acc_t* sp = score.mutable_data_ptr<acc_t>();
  at::parallel_for(0, nrm.numel(), kMinChunkElems, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t v = np[i];
      ip[i] = acc_t(1) / (v + e);
      sp[i] = paper ? v * v : v + e;
    }
  });
}

template <typename dtype_t>
void part_impl(const Tensor& x, Layout layout, const Tensor& inv, const Tensor& score, int64_t j,
               bool paper, const Tensor& idx, const Tensor& s, const Tensor& total,
               const Tensor& vectors, const Tensor& maps) {
  using acc_t = at::opmath_type<dtype_t>;
  using scalar_t = elem_t<dtype_t>;
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const int64_t K = idx.size(1);
  acc_t* scp = score.mutable_data_ptr<acc_t>();
  int64_t* idxp = idx.mutable_data_ptr<int64_t>();
  acc_t* sp = s.mutable_data_ptr<acc_t>();
  acc_t* totp = total.mutable_data_ptr<acc_t>();
  scalar_t* vp = reinterpret_cast<scalar_t*>(vectors.mutable_data_ptr<dtype_t>());
  scalar_t* mp = reinterpret_cast<scalar_t*>(maps.mutable_data_ptr<dtype_t>());
  std::vector<int64_t> rep(static_cast<size_t>(B));
  std::vector<acc_t> sv(static_cast<size_t>(B * C));

  // The representatives: the first maximum of each sample's score.
  at::parallel_for(0, B, grain_for(P), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      rep[b] = first_max(scp + b * P, P);
      idxp[b * K + j] = rep[b];
    }
  });
  // s_j straight into s[:, j]; sv into scratch.
  step_core<dtype_t>(x, layout, inv.const_data_ptr<acc_t>(), rep.data(), sp + j * P, K * P,
                     sv.data());
  at::parallel_for(0, B, grain_for(2 * P + C), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* __restrict__ sj = sp + (b * K + j) * P;
      acc_t S = lane_sum(sj, P);
      if (S == acc_t(0)) S = std::numeric_limits<acc_t>::infinity();
      totp[b * K + j] = S;
      const acc_t* __restrict__ svb = sv.data() + b * C;
      scalar_t* __restrict__ vb = vp + (b * K + j) * C;
      for (int64_t c = 0; c < C; ++c) vb[c] = from_acc<scalar_t>(svb[c] / S);
      scalar_t* __restrict__ mb = mp + (b * K + j) * P;
      acc_t* __restrict__ sc = scp + b * P;
      for (int64_t i = 0; i < P; ++i) {
        const acc_t w = sj[i] / S;
        mb[i] = from_acc<scalar_t>(w);
        sc[i] = sc[i] * (acc_t(1) - (paper ? w : sj[i]));
      }
    }
  });
}

template <typename dtype_t>
void bwd_finish_impl(const Tensor& x, Layout layout, const Tensor& dw, const Tensor& u,
                     const Tensor& t, const Tensor& inv, const Tensor& nrm, const Tensor& idx,
                     const Tensor& s, const Tensor& total, const Tensor* gv, Tensor& a, Tensor& m,
                     Tensor& cc) {
  using acc_t = at::opmath_type<dtype_t>;
  using scalar_t = elem_t<dtype_t>;
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const int64_t K = idx.size(1);
  const scalar_t* xp = elems<dtype_t>(x);
  const acc_t* dwp = dw.const_data_ptr<acc_t>();
  const acc_t* up = u.const_data_ptr<acc_t>();
  const acc_t* tp = t.const_data_ptr<acc_t>();
  const acc_t* invp = inv.const_data_ptr<acc_t>();
  const acc_t* nrmp = nrm.const_data_ptr<acc_t>();
  const int64_t* idxp = idx.const_data_ptr<int64_t>();
  const acc_t* sp = s.const_data_ptr<acc_t>();
  const acc_t* totp = total.const_data_ptr<acc_t>();
  const acc_t* gvp = gv ? gv->const_data_ptr<acc_t>() : nullptr;
  acc_t* ap = a.mutable_data_ptr<acc_t>();
  acc_t* mp = m.mutable_data_ptr<acc_t>();
  acc_t* cp = cc.mutable_data_ptr<acc_t>();
  // reference: inv / nrm.clamp_min(1e-300), the bound in acc dtype (0 in float32)
  const acc_t nrm_min = static_cast<acc_t>(1e-300);

  at::parallel_for(0, B, grain_for(K * (3 * P + 3 * C) + P), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* __restrict__ invb = invp + b * P;
      acc_t* __restrict__ cb = cp + b * P;  // sum_k ds_k s_k, then times inv / nrm
      std::fill_n(cb, P, acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t bk = b * K + k;
        const acc_t S = totp[bk];
        const int64_t ik = idxp[bk];
        const acc_t inv_r = invb[ik];
        const acc_t* __restrict__ sk = sp + bk * P;
        const acc_t* __restrict__ dwk = dwp + bk * P;
        acc_t* __restrict__ aw = ap + (b * 3 * K + k) * P;
        acc_t* __restrict__ ads = aw + K * P;
        acc_t* __restrict__ aoh = ads + K * P;
        for (int64_t i = 0; i < P; ++i) aw[i] = sk[i] / S;
        const acc_t ck = dot<acc_t>(dwk, aw, P);
        for (int64_t i = 0; i < P; ++i) {
          const acc_t ds = (dwk[i] - ck) / S;
          ads[i] = ds * invb[i] * inv_r;
          cb[i] += ds * sk[i];
          aoh[i] = acc_t(0);
        }
        aoh[ik] = acc_t(1);
        acc_t* __restrict__ mg = mp + (b * 3 * K + k) * C;
        acc_t* __restrict__ mr = mg + K * C;
        acc_t* __restrict__ md = mr + K * C;
        if (gvp)
          std::copy_n(gvp + bk * C, C, mg);
        else
          std::fill_n(mg, C, acc_t(0));
        if (layout == Layout::kNHWC) {
          const scalar_t* xr = xp + (b * P + ik) * C;
          for (int64_t c = 0; c < C; ++c) mr[c] = to_acc<acc_t>(xr[c]);
        } else {
          const scalar_t* xr = xp + b * C * P + ik;
          for (int64_t c = 0; c < C; ++c) mr[c] = to_acc<acc_t>(xr[c * P]);
        }
        const acc_t* __restrict__ uk = up + bk * C;
        const acc_t* __restrict__ tb = tp + b * C;
        for (int64_t c = 0; c < C; ++c) md[c] = (uk[c] - ck * tb[c]) / S * inv_r;
      }
      const acc_t* __restrict__ nb = nrmp + b * P;
      for (int64_t i = 0; i < P; ++i) {
        const acc_t safe = nb[i] > acc_t(0) ? invb[i] / std::max(nb[i], nrm_min) : acc_t(0);
        cb[i] = cb[i] * safe;
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Op entry points: check, allocate, dispatch.

std::tuple<Tensor, Tensor, Tensor> brnpa_prepare(const Tensor& x, bool paper, double eps) {
  const Layout layout = layout_of(checks::check_brnpa_prepare(x, cpu_arg));
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  const auto opts = x.options().dtype(acc_type_of(x.scalar_type()));
  Tensor nrm = at::empty({B, H, W}, opts);
  Tensor inv = at::empty({B, H, W}, opts);
  Tensor score = at::empty({B, H, W}, opts);
  if (nrm.numel() == 0) return {nrm, inv, score};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "brnpa_prepare", [&] {
    prepare_impl<scalar_t>(x, layout, paper, eps, nrm, inv, score);
  });
  return {nrm, inv, score};
}

void brnpa_part(const Tensor& x, const Tensor& inv, const Tensor& score, int64_t j, bool paper,
                const Tensor& idx, const Tensor& s, const Tensor& total, const Tensor& vectors,
                const Tensor& maps) {
  const Layout layout =
      layout_of(checks::check_brnpa_part(x, inv, score, j, idx, s, total, vectors, maps, cpu_arg));
  const auto st = x.scalar_type();
  if (x.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "brnpa_part", [&] {
    part_impl<scalar_t>(x, layout, inv, score, j, paper, idx, s, total, vectors, maps);
  });
}

std::tuple<Tensor, Tensor, Tensor> brnpa_bwd_finish(const Tensor& x, const Tensor& dw,
                                                    const Tensor& u, const Tensor& t,
                                                    const Tensor& inv, const Tensor& nrm,
                                                    const Tensor& idx, const Tensor& s,
                                                    const Tensor& total,
                                                    const std::optional<Tensor>& gv) {
  const auto checked =
      checks::check_brnpa_bwd_finish(x, dw, u, t, inv, nrm, idx, s, total, gv, true, cpu_arg);
  const Layout layout = layout_of(checked);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = checked.K;
  const auto st = x.scalar_type(), acc = acc_type_of(st);
  const Tensor* g = gv.has_value() && gv->defined() ? &*gv : nullptr;
  const auto opts = x.options().dtype(acc);
  Tensor a = at::empty({B, 3 * K, H, W}, opts);
  Tensor m = at::empty({B, 3 * K, C}, opts);
  Tensor c = at::empty({B, H, W}, opts);
  if (B == 0) return {a, m, c};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "brnpa_bwd_finish", [&] {
    bwd_finish_impl<scalar_t>(x, layout, dw, u, t, inv, nrm, idx, s, total, g, a, m, c);
  });
  return {a, m, c};
}

}  // namespace

TORCH_LIBRARY_IMPL(manet_kernels, CPU, m) {
  m.impl("_brnpa_prepare", &brnpa_prepare);
  m.impl("_brnpa_part", &brnpa_part);
  m.impl("_brnpa_bwd_finish", &brnpa_bwd_finish);
}
