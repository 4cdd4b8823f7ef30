"""Fused mixed-attention module: same constructor and state_dict as the reference."""

from __future__ import annotations

import torch
from torch import Tensor

from manet_kernels.ops.mixed_attention import SpatialNorm, check_args, fused
from manet_kernels.reference import mixed_attention as _reference


class MixedAttention(_reference.MixedAttention):
    """Channel then spatial attention on the fused kernels.

    Same constructor and ``state_dict`` keys as
    ``manet_kernels.reference.MixedAttention``: weights load either way. The spatial
    BatchNorm (``spatial_norm=True``) runs between the fused passes on the tiny
    ``(N, 1, H, W)`` map, in train mode (batch statistics, running-stat update) and
    eval mode alike.
    """

    def forward(self, x: Tensor, return_maps: bool = False):
        if isinstance(x, Tensor) and (x.dim() != 4 or x.shape[1] != self.channels):
            raise ValueError(f"x must be (N, {self.channels}, H, W), got {tuple(x.shape)}")
        conv_w = self.conv.weight
        if self.pool_order == "max_avg":
            conv_w = conv_w.flip(1)  # the kernels always produce [mean, max]
        fc1, fc2 = self.fc1, self.fc2
        backend = check_args(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, conv_w,
                             self.conv.bias, self.backend)
        if backend == "reference":
            return super().forward(x, return_maps)
        norm = None
        bn = self.bn
        if bn is not None:
            batch_stats = self.training or bn.running_mean is None
            norm = SpatialNorm(bn.weight, bn.bias, bn.running_mean, bn.running_var,
                               batch_stats, bn.eps)
        y, mc, ms, stats = fused(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, conv_w,
                                 self.conv.bias, norm, backend)
        if bn is not None and self.training and bn.track_running_stats:
            self._update_running_stats(stats, x.shape[0] * x.shape[2] * x.shape[3])
        return (y, mc, ms) if return_maps else y

    @torch.no_grad()
    def _update_running_stats(self, stats: Tensor, count: int) -> None:
        bn = self.bn
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        mean, var = stats[0], stats[1] * (count / (count - 1))  # running var is unbiased
        bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
        bn.running_var.mul_(1 - m).add_(var.to(bn.running_var.dtype), alpha=m)
