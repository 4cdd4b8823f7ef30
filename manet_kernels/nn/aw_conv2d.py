"""Fused AW-convolution layer: same constructor and state_dict as the reference."""

from __future__ import annotations

from torch import Tensor

from manet_kernels.ops.aw_conv2d import aw_conv2d
from manet_kernels.reference import aw_conv2d as _reference


class AWConv2d(_reference.AWConv2d):
    """AW-convolution on the fused kernels: the weight is scaled by ``1 + A[n]`` as it
    is loaded, never materialised per sample. The attention branch (tiny) is PyTorch."""

    def forward(self, x: Tensor) -> Tensor:
        return aw_conv2d(x, self.weight, self.attn(x), self.bias, self.stride, self.padding,
                         self.dilation, self.groups, backend=self.backend)
