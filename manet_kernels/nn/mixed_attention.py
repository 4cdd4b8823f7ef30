"""Fused mixed-attention module: same constructor and state_dict as the reference."""

from __future__ import annotations

from torch import Tensor

from manet_kernels.ops.mixed_attention import check_args, fused, spatial_norm_of
from manet_kernels.reference import mixed_attention as _reference


class MixedAttention(_reference.MixedAttention):
    """Channel then spatial attention on the fused kernels.

    Same constructor and ``state_dict`` keys as
    ``manet_kernels.reference.MixedAttention``: weights load either way. The spatial
    BatchNorm (``spatial_norm=True``) runs between the fused passes on the tiny
    ``(N, 1, H, W)`` map, in train mode (batch statistics; the running statistics are
    updated inside the fused op, on the device, without a host sync) and eval mode alike.
    """

    def forward(self, x: Tensor, return_maps: bool = False):
        if isinstance(x, Tensor) and (x.dim() != 4 or x.shape[1] != self.channels):
            raise ValueError(f"x must be (N, {self.channels}, H, W), got {tuple(x.shape)}")
        modules = self._modules  # (nn.Module.__getattr__ costs host time per lookup)
        conv, fc1, fc2, bn = modules["conv"], modules["fc1"], modules["fc2"], self.bn
        conv_w, conv_b = conv.weight, conv.bias
        if self.pool_order == "max_avg":
            conv_w = conv_w.flip(1)  # the kernels always produce [mean, max]
        w1, b1, w2, b2 = fc1.weight, fc1.bias, fc2.weight, fc2.bias
        backend = check_args(x, w1, b1, w2, b2, conv_w, conv_b, self.backend)
        if backend == "reference":
            return super().forward(x, return_maps)
        norm = None if bn is None else spatial_norm_of(bn, self.training)
        y, mc, ms, _ = fused(x, w1, b1, w2, b2, conv_w, conv_b, norm, backend, return_maps)
        return (y, mc, ms) if return_maps else y

