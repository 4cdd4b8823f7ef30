// The BR-NPA pass ops on the CPU: argument checks, allocation and dispatch. The
// kernels, and how they read x, are in brnpa_kernels.h; the contract is the brnpa_*
// functions of manet_kernels/reference/passes.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "brnpa_kernels.h"

namespace {

using at::Tensor;
using namespace manet_kernels::brnpa_cpu;

// ---------------------------------------------------------------------------
// Op entry points: check, allocate, dispatch.

Tensor brnpa_norms(const Tensor& x) {
  const Layout layout = check_x(x);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  Tensor out = at::empty({B, H, W}, x.options().dtype(acc_type_of(x.scalar_type())));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "brnpa_norms",
                                  [&] { norms_impl<scalar_t>(x, layout, out); });
  return out;
}

std::tuple<Tensor, Tensor> brnpa_step(const Tensor& x, const Tensor& inv_nrm, const Tensor& idx) {
  const Layout layout = check_x(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto st = x.scalar_type(), acc = acc_type_of(st);
  check_small(inv_nrm, "inv_nrm", "(B, H, W)", {B, H, W}, acc, st);
  const Tensor idx_c = check_idx(idx, B, H * W);
  Tensor s = at::empty({B, H, W}, x.options().dtype(acc));
  Tensor sv = at::empty({B, C}, x.options().dtype(acc));
  if (B == 0) return {s, sv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "brnpa_step",
                                  [&] { step_impl<scalar_t>(x, layout, inv_nrm, idx_c, s, sv); });
  return {s, sv};
}

std::tuple<Tensor, Tensor, Tensor> brnpa_bwd_reduce(const Tensor& x, const Tensor& inv_nrm,
                                                    const Tensor& dv, const Tensor& dmap) {
  const Layout layout = check_x(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto st = x.scalar_type(), acc = acc_type_of(st);
  check_small(inv_nrm, "inv_nrm", "(B, H, W)", {B, H, W}, acc, st);
  const int64_t K = check_rank_get_dim1(dv, "dv", "(B, K, C)", 3);
  check_small(dv, "dv", "(B, K, C)", {B, K, C}, acc, st);
  check_small(dmap, "dmap", "(B, K, H, W) with K = dv.size(1)", {B, K, H, W}, acc, st);
  Tensor dw = at::empty({B, K, H, W}, x.options().dtype(acc));
  Tensor u = at::empty({B, K, C}, x.options().dtype(acc));
  Tensor t = at::empty({B, C}, x.options().dtype(acc));
  if (B == 0) return {dw, u, t};
  if (H * W == 0) {  // sums over no positions
    u.zero_();
    t.zero_();
    return {dw, u, t};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "brnpa_bwd_reduce", [&] {
    bwd_reduce_impl<scalar_t>(x, layout, inv_nrm, dv, dmap, dw, u, t);
  });
  return {dw, u, t};
}

Tensor brnpa_bwd_dx(const Tensor& x, const Tensor& a, const Tensor& m, const Tensor& c) {
  const Layout layout = check_x(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto st = x.scalar_type(), acc = acc_type_of(st);
  const int64_t J = check_rank_get_dim1(a, "a", "(B, J, H, W)", 4);
  check_small(a, "a", "(B, J, H, W)", {B, J, H, W}, acc, st);
  check_small(m, "m", "(B, J, C) with J = a.size(1)", {B, J, C}, acc, st);
  check_small(c, "c", "(B, H, W)", {B, H, W}, acc, st);
  Tensor df = at::empty(x.sizes(), x.options().memory_format(memory_format_of(layout)));
  if (df.numel() == 0) return df;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "brnpa_bwd_dx",
                                  [&] { bwd_dx_impl<scalar_t>(x, layout, a, m, c, df); });
  return df;
}

}  // namespace

TORCH_LIBRARY_IMPL(manet_kernels, CPU, m) {
  m.impl("_brnpa_norms", &brnpa_norms);
  m.impl("_brnpa_step", &brnpa_step);
  m.impl("_brnpa_bwd_reduce", &brnpa_bwd_reduce);
  m.impl("_brnpa_bwd_dx", &brnpa_bwd_dx);
}
