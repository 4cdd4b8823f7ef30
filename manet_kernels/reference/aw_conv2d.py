"""AW-convolution in plain PyTorch: the oracle, the grouped-conv baseline, the module.

``aw_conv2d``/``per_sample_conv2d`` here loop a plain ``F.conv2d`` over the samples:
slow and obviously right. ``grouped_conv_trick`` is how CondConv/ODConv-style code
does it (one grouped conv with ``groups = N * groups``): the benchmark baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def per_sample_conv2d(x: Tensor, weights: Tensor, bias: Tensor | None = None, stride=1,
                      padding=0, dilation=1, groups: int = 1) -> Tensor:
    outs = []
    for n in range(x.shape[0]):
        b = None if bias is None else (bias if bias.dim() == 1 else bias[n])
        outs.append(F.conv2d(x[n:n + 1], weights[n], b, stride, padding, dilation, groups))
    if not outs:
        return F.conv2d(x, weights.new_zeros(weights.shape[1:]), None, stride, padding,
                        dilation, groups)
    return torch.cat(outs)


def aw_conv2d(x: Tensor, weight: Tensor, attn: Tensor, bias: Tensor | None = None, stride=1,
              padding=0, dilation=1, groups: int = 1) -> Tensor:
    """``y[n] = conv2d(x[n], weight * (1 + attn[n]), bias, ...)``."""
    return per_sample_conv2d(x, weight[None] * (1 + attn), bias, stride, padding, dilation,
                             groups)


def grouped_conv_trick(x: Tensor, weights: Tensor, bias: Tensor | None = None, stride=1,
                       padding=0, dilation=1, groups: int = 1) -> Tensor:
    """The batch folded into channels and one grouped conv (CondConv / ODConv style)."""
    n, c1, h, w = x.shape
    c2 = weights.shape[1]
    y = F.conv2d(x.reshape(1, n * c1, h, w), weights.reshape(n * c2, *weights.shape[2:]),
                 None, stride, padding, dilation, groups * n)
    y = y.reshape(n, c2, *y.shape[2:])
    if bias is not None:
        y = y + (bias if bias.dim() == 2 else bias[None])[:, :, None, None]
    return y


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class AWConv2d(nn.Module):
    """AW-convolution layer: ``conv2d(x[n], weight * (1 + A[n]))`` with ``A`` from the
    paper's attention branch (eq. 7-8): average-pool the input to ``kh x kw``, pointwise
    conv ``C1 -> C1/r`` with BN and ReLU, pointwise conv to ``C2`` with BN and sigmoid,
    shared over the input channels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, reduction: int = 16,
                 backend: str = "auto"):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        kh, kw = _pair(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.backend = groups, backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        hidden = max(1, in_channels // reduction)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d((kh, kw)),
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.Sigmoid())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                         groups=self.groups, bias=self.bias is not None)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if self.bias is not None:
                self.bias.copy_(conv.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, reduction: int = 16, backend: str = "auto"):
        """An AW layer computing (almost) what ``conv`` computes: its weights copied, the
        attention's last BN set so that ``A ~ sigmoid(-8) ~ 3e-4`` at the start."""
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or \
                isinstance(conv.padding, str):
            raise TypeError("from_conv needs an nn.Conv2d with numeric zero padding")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None, reduction,
                    backend)
        layer = layer.to(conv.weight.device, conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
            last_bn = layer.attention[5]
            last_bn.weight.zero_()
            last_bn.bias.fill_(-8.0)
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")

    def attn(self, x: Tensor) -> Tensor:
        """``A`` of shape ``(N, C2, 1, kh, kw)``."""
        return self.attention(x).unsqueeze(2)

    def forward(self, x: Tensor) -> Tensor:
        return aw_conv2d(x, self.weight, self.attn(x), self.bias, self.stride, self.padding,
                         self.dilation, self.groups)
