// Argument checks of the mixed-attention stage ops (issue 16), shared by the CPU
// (csrc/cpu/mixed_attention_stages.cpp) and CUDA (csrc/cuda/mixed_attention_stages.cu)
// implementations, so that both raise the same errors: each message starts with the
// argument's name ("w1: expected ..."), a wrong dtype raises TypeError, a wrong shape,
// stride or value ValueError (an undefined tensor or a wrong device stays a RuntimeError).
//
// One function per stage, check_<stage>, taking the stage's arguments and returning the
// sizes the implementations need. `arg(t, name)` checks what depends on the backend: a
// defined dense tensor (check_dense) on the backend's device (on CUDA also on the device
// of x or z); it is called on every tensor before anything else about it is checked.
//
// The stages that start with a pass over x (channel_attn, spatial_attn, channel_attn_bwd)
// also check the pass's arguments here, with the messages of the CPU pass ops
// (csrc/cpu/mixed_attention.cpp, check_activation and check_small): on the CPU the pass
// then finds them valid, and the CUDA stage raises the same errors as the CPU before it
// calls its CUDA pass op.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "check.h"

namespace manet_kernels {
namespace ma_stage {

using OptTensor = std::optional<at::Tensor>;

inline at::ScalarType acc_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// The part of every backend's `arg` that does not depend on the device.
inline void check_dense(const at::Tensor& t, const char* name) {
  MK_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  MK_CHECK_VALUE(t.layout() == at::kStrided, name,
                 ": expected a strided (dense) tensor, got layout ", t.layout());
}

// "the accumulation dtype for x of dtype bfloat16"
inline std::string acc_of(const char* name, at::ScalarType st) {
  return msg::cat("the accumulation dtype for ", name, " of dtype ", dtype_name(st));
}

// A contiguous tensor of shape `sizes` (named `dims`) in the acc dtype `acc`, which is
// that of `by` (e.g. "the accumulation dtype for x of dtype bfloat16").
template <class Arg>
void check_acc(const at::Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes,
               at::ScalarType acc, const std::string& by, const Arg& arg) {
  arg(t, name);
  MK_CHECK_VALUE(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ",
                 t.sizes());
  MK_CHECK_TYPE(t.scalar_type() == acc, name, ": expected dtype ", dtype_name(acc), " (", by,
                "), got ", dtype_name(t.scalar_type()));
  MK_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
                 t.strides());
}

template <class Arg>
void check_acc(const OptTensor& t, const char* name, const char* dims, at::IntArrayRef sizes,
               at::ScalarType acc, const std::string& by, const Arg& arg) {
  if (t.has_value()) check_acc(*t, name, dims, sizes, acc, by, arg);
}

// An int32 index map of shape `sizes` (ic).
template <class Arg>
void check_index(const at::Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes,
                 const Arg& arg) {
  arg(t, name);
  MK_CHECK_VALUE(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ",
                 t.sizes());
  MK_CHECK_TYPE(t.scalar_type() == at::kInt, name, ": expected dtype int32, got ",
                dtype_name(t.scalar_type()));
  MK_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
                 t.strides());
}

// x (N, C, H, W), floating, NCHW- or channels_last-contiguous (the pass ops' check).
template <class Arg>
void check_x(const at::Tensor& x, const Arg& arg) {
  arg(x, "x");
  MK_CHECK_VALUE(x.dim() == 4, "x: expected a rank-4 (N, C, H, W) tensor, got rank ", x.dim(),
                 " with shape ", x.sizes());
  const auto st = x.scalar_type();
  MK_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                "x: expected dtype float32, float64, bfloat16 or float16, got ", dtype_name(st));
  // Index tensors are int32.
  MK_CHECK_VALUE(x.size(1) <= std::numeric_limits<int32_t>::max() &&
                     x.size(2) * x.size(3) <= std::numeric_limits<int32_t>::max(),
                 "x: C and H*W must fit in int32, got shape ", x.sizes());
  MK_CHECK_VALUE(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
                 "x: expected NCHW-contiguous or channels_last-contiguous strides, got shape ",
                 x.sizes(), " with strides ", x.strides(), " (make it contiguous before calling)");
}

// The shared MLP's parameters for C channels; returns C_r.
template <class Arg>
int64_t check_mlp(const at::Tensor& w1, const OptTensor& b1, const at::Tensor& w2,
                  const OptTensor& b2, int64_t C, at::ScalarType acc, const std::string& by,
                  const Arg& arg) {
  arg(w1, "w1");
  MK_CHECK_VALUE(w1.dim() == 2, "w1: expected a rank-2 (C_r, C) tensor, got shape ", w1.sizes());
  const int64_t Cr = w1.size(0);
  check_acc(w1, "w1", "(C_r, C)", {Cr, C}, acc, by, arg);
  check_acc(b1, "b1", "(C_r,)", {Cr}, acc, by, arg);
  check_acc(w2, "w2", "(C, C_r)", {C, Cr}, acc, by, arg);
  check_acc(b2, "b2", "(C,)", {C}, acc, by, arg);
  return Cr;
}

// z (N, H, W), contiguous, float32 or float64: the dtype of a spatial stage.
template <class Arg>
void check_map(const at::Tensor& z, const char* name, const Arg& arg) {
  arg(z, name);
  MK_CHECK_VALUE(z.dim() == 3, name, ": expected a rank-3 (N, H, W) tensor, got shape ", z.sizes());
  const auto st = z.scalar_type();
  MK_CHECK_TYPE(st == at::kFloat || st == at::kDouble, name,
                ": expected dtype float32 or float64 (an accumulation dtype), got ",
                dtype_name(st));
  MK_CHECK_VALUE(z.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
                 z.strides());
}

// A map like z (its shape and dtype).
template <class Arg>
void check_like(const OptTensor& t, const char* name, const at::Tensor& z, const char* z_name,
                const Arg& arg) {
  if (!t.has_value()) return;
  check_acc(*t, name, "(N, H, W)", z.sizes(), z.scalar_type(), msg::cat("the dtype of ", z_name),
            arg);
}

// One BatchNorm value: (1,) in the acc dtype.
template <class Arg>
void check_bn(const OptTensor& t, const char* name, at::ScalarType acc, const std::string& by,
              const Arg& arg) {
  check_acc(t, name, "(1,)", {1}, acc, by, arg);
}

// conv_w (1, 2, k, k) with k odd, conv_b (1,); returns k.
template <class Arg>
int64_t check_conv_w(const at::Tensor& w, const OptTensor& b, at::ScalarType acc,
                     const std::string& by, const Arg& arg) {
  arg(w, "conv_w");
  MK_CHECK_VALUE(w.dim() == 4 && w.size(0) == 1 && w.size(1) == 2 && w.size(2) == w.size(3) &&
                     w.size(2) % 2 == 1,
                 "conv_w: expected shape (1, 2, k, k) with k odd, got ", w.sizes());
  MK_CHECK_TYPE(w.scalar_type() == acc, "conv_w: expected dtype ", dtype_name(acc), " (", by,
                "), got ", dtype_name(w.scalar_type()));
  check_bn(b, "conv_b", acc, by, arg);
  return w.size(2);
}

// The BatchNorm with given statistics (used when bn_mean is given).
template <class Arg>
void check_bn_eval(const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
                   const OptTensor& var, at::ScalarType acc, const std::string& by,
                   const Arg& arg) {
  if (!mean.has_value()) return;
  MK_CHECK_VALUE(var.has_value(), "bn_var: expected a tensor when bn_mean is given, got None");
  check_bn(weight, "bn_weight", acc, by, arg);
  check_bn(bias, "bn_bias", acc, by, arg);
  check_bn(mean, "bn_mean", acc, by, arg);
  check_bn(var, "bn_var", acc, by, arg);
}

// A running statistic of BatchNorm2d(1): one value of any floating dtype.
template <class Arg>
void check_running(const OptTensor& t, const char* name, const Arg& arg) {
  if (!t.has_value()) return;
  arg(*t, name);
  MK_CHECK_VALUE(t->numel() == 1, name, ": expected one value (BatchNorm2d(1)), got shape ",
                 t->sizes());
  const auto st = t->scalar_type();
  MK_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                name, ": expected dtype float32, float64, bfloat16 or float16, got ",
                dtype_name(st));
}

// ---------------------------------------------------------------------------------------
// The stages.

// channel_attn(x, w1, b1, w2, b2): x as the channel_pool pass takes it (H*W >= 1);
// returns C_r.
template <class Arg>
int64_t check_channel_attn(const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1,
                           const at::Tensor& w2, const OptTensor& b2, const Arg& arg) {
  check_x(x, arg);
  MK_CHECK_VALUE(x.size(2) * x.size(3) >= 1,
                 "x: expected H*W >= 1 to take a max over positions, got shape ", x.sizes());
  const auto st = x.scalar_type();
  return check_mlp(w1, b1, w2, b2, x.size(1), acc_dtype(st), acc_of("x", st), arg);
}

// spatial_attn(x, mc, conv_w, conv_b, bn_*, batch_norm): x and mc as the spatial_pool pass
// takes them (C >= 1); the BatchNorm with given statistics unless batch_norm; returns k.
template <class Arg>
int64_t check_spatial_attn(const at::Tensor& x, const at::Tensor& mc, const at::Tensor& conv_w,
                           const OptTensor& conv_b, const OptTensor& bn_weight,
                           const OptTensor& bn_bias, const OptTensor& bn_mean,
                           const OptTensor& bn_var, bool batch_norm, const Arg& arg) {
  check_x(x, arg);
  MK_CHECK_VALUE(x.size(1) >= 1, "x: expected C >= 1 to take a max over channels, got shape ",
                 x.sizes());
  const auto st = x.scalar_type(), acc = acc_dtype(st);
  const std::string by = acc_of("x", st);
  check_acc(mc, "mc", "(N, C)", {x.size(0), x.size(1)}, acc, by, arg);
  const int64_t k = check_conv_w(conv_w, conv_b, acc, by, arg);
  if (!batch_norm) check_bn_eval(bn_weight, bn_bias, bn_mean, bn_var, acc, by, arg);
  return k;
}

// spatial_norm(z, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
// momentum): z with more than one value (a batch variance).
template <class Arg>
void check_spatial_norm(const at::Tensor& z, const OptTensor& bn_weight, const OptTensor& bn_bias,
                        const OptTensor& running_mean, const OptTensor& running_var,
                        const OptTensor& nbt, std::optional<double> momentum, const Arg& arg) {
  check_map(z, "z", arg);
  MK_CHECK_VALUE(z.numel() > 1, "z: expected more than one value (N*H*W > 1) for batch ",
                 "statistics, got shape ", z.sizes());
  const std::string by = "the dtype of z";
  check_bn(bn_weight, "bn_weight", z.scalar_type(), by, arg);
  check_bn(bn_bias, "bn_bias", z.scalar_type(), by, arg);
  check_running(running_mean, "running_mean", arg);
  check_running(running_var, "running_var", arg);
  MK_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                 running_mean.has_value() ? "running_var" : "running_mean",
                 ": expected a tensor when ",
                 running_mean.has_value() ? "running_mean" : "running_var", " is given, got None");
  if (nbt.has_value()) {
    arg(*nbt, "num_batches_tracked");
    MK_CHECK_VALUE(nbt->numel() == 1, "num_batches_tracked: expected one value, got shape ",
                   nbt->sizes());
    MK_CHECK_TYPE(nbt->scalar_type() == at::kLong, "num_batches_tracked: expected dtype int64, ",
                  "got ", dtype_name(nbt->scalar_type()));
  }
  MK_CHECK_VALUE(momentum.has_value() || nbt.has_value() || !running_mean.has_value(),
                 "num_batches_tracked: expected a tensor when momentum is None (a cumulative ",
                 "average), got None");
}

// spatial_norm_bwd(dms, gms, ms, z, stats, bn_weight).
template <class Arg>
void check_spatial_norm_bwd(const at::Tensor& dms, const OptTensor& gms, const at::Tensor& ms,
                            const at::Tensor& z, const at::Tensor& stats,
                            const OptTensor& bn_weight, const Arg& arg) {
  check_map(z, "z", arg);
  check_like(dms, "dms", z, "z", arg);
  check_like(gms, "gms", z, "z", arg);
  check_like(ms, "ms", z, "z", arg);
  const std::string by = "the dtype of z";
  check_acc(stats, "stats", "(2,)", {2}, z.scalar_type(), by, arg);
  check_bn(bn_weight, "bn_weight", z.scalar_type(), by, arg);
}

// spatial_attn_bwd(d, gms, ms, z, sa, sm, conv_w, bn_weight, bn_mean, bn_var): the
// BatchNorm with given statistics only behind the sigmoid (ms given); returns k.
template <class Arg>
int64_t check_spatial_attn_bwd(const at::Tensor& d, const OptTensor& gms, const OptTensor& ms,
                               const at::Tensor& z, const at::Tensor& sa, const at::Tensor& sm,
                               const at::Tensor& conv_w, const OptTensor& bn_weight,
                               const OptTensor& bn_mean, const OptTensor& bn_var, const Arg& arg) {
  check_map(z, "z", arg);
  check_like(d, "d", z, "z", arg);
  check_like(sa, "sa", z, "z", arg);
  check_like(sm, "sm", z, "z", arg);
  check_like(gms, "gms", z, "z", arg);
  check_like(ms, "ms", z, "z", arg);
  const auto acc = z.scalar_type();
  const std::string by = "the dtype of z";
  const int64_t k = check_conv_w(conv_w, std::nullopt, acc, by, arg);
  if (ms.has_value()) check_bn_eval(bn_weight, std::nullopt, bn_mean, bn_var, acc, by, arg);
  return k;
}

// channel_attn_bwd(x, da_s, dm_s, ic, dmc, gmc, mc, avg, mx, w1, b1, w2): x, da_s, dm_s and
// ic as the bwd_channel pass takes them; returns C_r.
template <class Arg>
int64_t check_channel_attn_bwd(const at::Tensor& x, const at::Tensor& da_s, const at::Tensor& dm_s,
                               const at::Tensor& ic, const at::Tensor& dmc, const OptTensor& gmc,
                               const at::Tensor& mc, const at::Tensor& avg, const at::Tensor& mx,
                               const at::Tensor& w1, const OptTensor& b1, const at::Tensor& w2,
                               const Arg& arg) {
  check_x(x, arg);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto st = x.scalar_type(), acc = acc_dtype(st);
  const std::string by = acc_of("x", st);
  check_acc(da_s, "da_s", "(N, H, W)", {N, H, W}, acc, by, arg);
  check_acc(dm_s, "dm_s", "(N, H, W)", {N, H, W}, acc, by, arg);
  check_index(ic, "ic", "(N, H, W)", {N, H, W}, arg);
  check_acc(dmc, "dmc", "(N, C)", {N, C}, acc, by, arg);
  check_acc(gmc, "gmc", "(N, C)", {N, C}, acc, by, arg);
  check_acc(mc, "mc", "(N, C)", {N, C}, acc, by, arg);
  check_acc(avg, "avg", "(N, C)", {N, C}, acc, by, arg);
  check_acc(mx, "mx", "(N, C)", {N, C}, acc, by, arg);
  return check_mlp(w1, b1, w2, std::nullopt, C, acc, by, arg);
}

}  // namespace ma_stage
}  // namespace manet_kernels
