// Argument checks of mixed_attention_spatial_conv(_bwd), shared by the CPU and CUDA
// kernels. `arg(t, name)` checks what depends on the backend: a dense tensor on its
// device (and, on CUDA, on sa's device).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "check.h"

namespace manet_kernels {

// A map of sa's shape and dtype.
template <class Arg>
void check_spatial_map(const at::Tensor& t, const char* name, const at::Tensor& sa,
                       const Arg& arg) {
  arg(t, name);
  MK_CHECK_VALUE(t.sizes() == sa.sizes(), name, ": expected shape (N, H, W) = ", sa.sizes(),
                 ", got ", t.sizes());
  MK_CHECK_TYPE(t.scalar_type() == sa.scalar_type(), name, ": expected dtype ",
                dtype_name(sa.scalar_type()), " (the dtype of sa), got ",
                dtype_name(t.scalar_type()));
}

// sa (N, H, W) in an accumulation dtype, sm like it, weight (1, 2, k, k) with k odd;
// returns k.
template <class Arg>
int64_t check_spatial_conv_args(const at::Tensor& sa, const at::Tensor& sm,
                                const at::Tensor& weight, const Arg& arg) {
  arg(sa, "sa");
  MK_CHECK_VALUE(sa.dim() == 3, "sa: expected a rank-3 (N, H, W) tensor, got shape ", sa.sizes());
  const auto st = sa.scalar_type();
  MK_CHECK_TYPE(st == at::kFloat || st == at::kDouble,
                "sa: expected dtype float32 or float64 (an accumulation dtype), got ",
                dtype_name(st));
  check_spatial_map(sm, "sm", sa, arg);
  arg(weight, "weight");
  MK_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == 2 &&
                     weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
                 "weight: expected shape (1, 2, k, k) with k odd, got ", weight.sizes());
  MK_CHECK_TYPE(weight.scalar_type() == st, "weight: expected dtype ", dtype_name(st),
                " (the dtype of sa), got ", dtype_name(weight.scalar_type()));
  return weight.size(2);
}

// bias None or (1,) in sa's dtype.
template <class Arg>
void check_spatial_bias(const std::optional<at::Tensor>& bias, const at::Tensor& sa,
                        const Arg& arg) {
  if (!bias.has_value()) return;
  arg(*bias, "bias");
  MK_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == 1, "bias: expected shape (1,), got ",
                 bias->sizes());
  MK_CHECK_TYPE(bias->scalar_type() == sa.scalar_type(), "bias: expected dtype ",
                dtype_name(sa.scalar_type()), " (the dtype of sa), got ",
                dtype_name(bias->scalar_type()));
}

}  // namespace manet_kernels
