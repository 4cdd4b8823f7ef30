// The mixed-attention pass ops of mixed_attention.cpp that the stage ops
// (mixed_attention_stages.cpp) compose: each checks its arguments, allocates its
// outputs and runs the pass, exactly as the op manet_kernels::_mixed_attention_<pass>.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace manet_kernels::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_attention_channel_pool(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_attention_spatial_pool(const at::Tensor& x,
                                                                            const at::Tensor& mc);
at::Tensor mixed_attention_bwd_channel(const at::Tensor& x, const at::Tensor& da_s,
                                       const at::Tensor& dm_s, const at::Tensor& ic);
at::Tensor mixed_attention_spatial_conv(const at::Tensor& sa, const at::Tensor& sm,
                                        const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixed_attention_spatial_conv_bwd(
    const at::Tensor& dz, const at::Tensor& sa, const at::Tensor& sm, const at::Tensor& weight,
    bool has_bias);

}  // namespace manet_kernels::cpu
