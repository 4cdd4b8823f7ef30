// Argument checks of the BR-NPA stage ops (issue 16), shared by the CPU
// (csrc/cpu/brnpa_stages.cpp) and CUDA (csrc/cuda/brnpa_stages.cu) implementations, so
// that both raise the same errors: each message starts with the argument's name
// ("inv: expected ..."), as a RuntimeError (the BR-NPA CPU kernels' checks,
// csrc/cpu/brnpa_kernels.h, whose messages these repeat).
//
// One function per stage, check_brnpa_<stage>, taking the stage's arguments and returning
// the sizes the implementations need. `arg(t, name)` checks what depends on the backend:
// a defined strided tensor (check_dense) on the backend's device (on CUDA also on the
// device of x); it is called on every tensor before anything else about it is checked.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "check.h"

namespace manet_kernels {
namespace brnpa_stage {

inline at::ScalarType acc_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// The part of every backend's `arg` that does not depend on the device.
inline void check_dense(const at::Tensor& t, const char* name) {
  MK_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  MK_CHECK(t.layout() == at::kStrided, name, ": expected a strided tensor, got layout ",
           t.layout());
}

// x (B, C, H, W), floating, NCHW- or channels_last-contiguous; returns true for
// channels_last. Plain-contiguous wins when both hold (C == 1 or H*W == 1): the outputs
// then come back contiguous, as the reference's _like_x does.
template <class Arg>
bool check_x(const at::Tensor& x, const Arg& arg) {
  arg(x, "x");
  MK_CHECK(x.dim() == 4, "x: expected a 4-D (B, C, H, W) tensor, got shape ", x.sizes());
  const auto st = x.scalar_type();
  MK_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
           "x: expected dtype float32, float64, bfloat16 or float16, got ", st);
  if (x.is_contiguous()) return false;
  MK_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
           "x: expected an NCHW-contiguous or channels_last-contiguous tensor, got shape ",
           x.sizes(), " with strides ", x.strides());
  return true;
}

// A small operand: contiguous, in the accumulation dtype `acc` of x's dtype, of shape
// `sizes` (`dims` spells the symbolic shape for the message).
template <class Arg>
void check_small(const at::Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes,
                 at::ScalarType acc, at::ScalarType x_dtype, const Arg& arg) {
  arg(t, name);
  MK_CHECK(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ", t.sizes());
  MK_CHECK(t.scalar_type() == acc, name, ": expected dtype ", acc,
           " (the accumulation dtype for x of dtype ", x_dtype, "), got ", t.scalar_type());
  MK_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

// An output of x's dtype that a stage writes in place: contiguous, of shape `sizes`.
template <class Arg>
void check_like_x(const at::Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes,
                  at::ScalarType x_dtype, const Arg& arg) {
  arg(t, name);
  MK_CHECK(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ", t.sizes());
  MK_CHECK(t.scalar_type() == x_dtype, name, ": expected dtype ", x_dtype, " (x's dtype), got ",
           t.scalar_type());
  MK_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

// idx (B, K) int64 contiguous; returns K. With `P` >= 0 every value is checked to lie in
// [0, P): that reads idx on the host, so only a CPU caller asks for it (a CUDA op would
// have to synchronise with the device).
template <class Arg>
int64_t check_part_idx(const at::Tensor& idx, int64_t B, int64_t P, const Arg& arg) {
  arg(idx, "idx");
  MK_CHECK(idx.scalar_type() == at::kLong, "idx: expected dtype int64, got ", idx.scalar_type());
  MK_CHECK(idx.dim() == 2 && idx.size(0) == B, "idx: expected shape (B, K) with B = ", B, ", got ",
           idx.sizes());
  MK_CHECK(idx.is_contiguous(), "idx: expected a contiguous tensor, got strides ", idx.strides());
  const int64_t K = idx.size(1);
  if (P >= 0) {
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    for (int64_t e = 0; e < B * K; ++e)
      MK_CHECK(ip[e] >= 0 && ip[e] < P, "idx: expected values in [0, H*W) = [0, ", P, "), got idx[",
               e / K, ", ", e % K, "] = ", ip[e]);
  }
  return K;
}

// What the stages need of their checked arguments: the layout of x and the number of
// parts (idx.size(1); 0 for prepare).
struct Checked {
  bool channels_last;
  int64_t K;
};

// ---------------------------------------------------------------------------------------
// The stages.

// brnpa_prepare(x, paper, eps).
template <class Arg>
Checked check_brnpa_prepare(const at::Tensor& x, const Arg& arg) {
  return {check_x(x, arg), 0};
}

// brnpa_part(x, inv, score, j, paper, idx, s, total, vectors, maps): part j of K =
// idx.size(1), written in place; with B >= 1, x needs a position (H*W >= 1).
template <class Arg>
Checked check_brnpa_part(const at::Tensor& x, const at::Tensor& inv, const at::Tensor& score,
                         int64_t j, const at::Tensor& idx, const at::Tensor& s,
                         const at::Tensor& total, const at::Tensor& vectors, const at::Tensor& maps,
                         const Arg& arg) {
  const bool cl = check_x(x, arg);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto st = x.scalar_type(), acc = acc_dtype(st);
  check_small(inv, "inv", "(B, H, W)", {B, H, W}, acc, st, arg);
  check_small(score, "score", "(B, H, W)", {B, H, W}, acc, st, arg);
  const int64_t K = check_part_idx(idx, B, -1, arg);
  MK_CHECK(j >= 0 && j < K, "j: expected a part in [0, K) = [0, ", K,
           ") with K = idx.size(1), got ", j);
  check_small(s, "s", "(B, K, H, W) with K = idx.size(1)", {B, K, H, W}, acc, st, arg);
  check_small(total, "total", "(B, K) with K = idx.size(1)", {B, K}, acc, st, arg);
  check_like_x(vectors, "vectors", "(B, K, C) with K = idx.size(1)", {B, K, C}, st, arg);
  check_like_x(maps, "maps", "(B, K, H, W) with K = idx.size(1)", {B, K, H, W}, st, arg);
  MK_CHECK(B == 0 || H * W > 0,
           "x: expected H*W >= 1 (a part needs a position to represent it), got shape ", x.sizes());
  return {cl, K};
}

// brnpa_bwd_finish(x, dw, u, t, inv, nrm, idx, s, total, gv): with idx_values, idx's
// values are checked to lie in [0, H*W) (on the host: CPU only, see check_part_idx).
template <class Arg>
Checked check_brnpa_bwd_finish(const at::Tensor& x, const at::Tensor& dw, const at::Tensor& u,
                               const at::Tensor& t, const at::Tensor& inv, const at::Tensor& nrm,
                               const at::Tensor& idx, const at::Tensor& s, const at::Tensor& total,
                               const std::optional<at::Tensor>& gv, bool idx_values,
                               const Arg& arg) {
  const bool cl = check_x(x, arg);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto st = x.scalar_type(), acc = acc_dtype(st);
  const int64_t K = check_part_idx(idx, B, idx_values ? H * W : -1, arg);
  check_small(dw, "dw", "(B, K, H, W) with K = idx.size(1)", {B, K, H, W}, acc, st, arg);
  check_small(u, "u", "(B, K, C) with K = idx.size(1)", {B, K, C}, acc, st, arg);
  check_small(t, "t", "(B, C)", {B, C}, acc, st, arg);
  check_small(inv, "inv", "(B, H, W)", {B, H, W}, acc, st, arg);
  check_small(nrm, "nrm", "(B, H, W)", {B, H, W}, acc, st, arg);
  check_small(s, "s", "(B, K, H, W) with K = idx.size(1)", {B, K, H, W}, acc, st, arg);
  check_small(total, "total", "(B, K) with K = idx.size(1)", {B, K}, acc, st, arg);
  if (gv.has_value() && gv->defined())
    check_small(*gv, "gv", "(B, K, C) with K = idx.size(1)", {B, K, C}, acc, st, arg);
  return {cl, K};
}

}  // namespace brnpa_stage
}  // namespace manet_kernels
