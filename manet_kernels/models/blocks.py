"""Residual blocks with optional SE / CBAM attention and AW-convolutions.

Where the attention sits (both as in the papers' official code):
- SE: on the residual branch after its last conv + BN, before the addition
  (Hu et al., SE-ResNet).
- CBAM: mixed attention (channel then spatial) at the same place (Woo et al.).
AW variants replace every 3x3 conv inside a residual block by ``AWConv2d`` with the
same stride and padding: both convs of a BasicBlock, ``conv2`` of a Bottleneck. The
stem and the 1x1 convs (Bottleneck's conv1/conv3, the downsample projection) stay
plain: the AW paper re-weights the 3x3 kernels, whose taps the attention indexes.
"""

from __future__ import annotations

from torch import Tensor, nn

from manet_kernels import nn as fused_nn
from manet_kernels import reference as reference_nn
from manet_kernels.ops._common import BACKENDS

KERNELS = ("fused", "reference")
ATTENTIONS = (None, "se", "cbam")

# CBAM's official flavour of mixed attention.
CBAM_OPTIONS = dict(reduction=16, kernel_size=7, pool_order="max_avg", spatial_norm=True)


def check_kernels(kernels: str, backend: str) -> None:
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def modules_for(kernels: str):
    """``manet_kernels.nn`` (fused) or ``manet_kernels.reference``: the same classes."""
    return fused_nn if kernels == "fused" else reference_nn


class SqueezeExcitation(nn.Module):
    """SE gate: ``x * sigmoid(fc2(relu(fc1(avgpool(x)))))``, 1x1 convs as the FCs."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avgpool(x)))))


def make_attention(kind: str | None, channels: int, kernels: str, backend: str):
    if kind is None:
        return None
    if kind == "se":
        return SqueezeExcitation(channels)
    if kind == "cbam":
        return modules_for(kernels).MixedAttention(channels, backend=backend, **CBAM_OPTIONS)
    raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, *, aw: bool = False,
            kernels: str = "fused", backend: str = "auto") -> nn.Module:
    if aw:
        return modules_for(kernels).AWConv2d(in_planes, out_planes, 3, stride=stride,
                                             padding=1, bias=False, backend=backend)
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class _ResidualBlock(nn.Module):
    """``relu(attention(branch(x)) + shortcut(x))``: a subclass builds its residual
    branch (``_build``, which also makes ``relu``) and runs it (``_branch``); the
    attention, the shortcut and the addition are here."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, *, attention: str | None = None,
                 aw: bool = False, kernels: str = "fused", backend: str = "auto"):
        super().__init__()
        self._build(inplanes, planes, stride, aw=aw, kernels=kernels, backend=backend)
        # After the branch's modules: parameters and state_dict keep their order.
        self.attention = make_attention(attention, planes * self.expansion, kernels, backend)
        self.downsample = downsample
        self.stride = stride

    def _build(self, inplanes: int, planes: int, stride: int, *, aw: bool, kernels: str,
               backend: str) -> None:
        raise NotImplementedError

    def _branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self._branch(x)
        if self.attention is not None:
            out = self.attention(out)
        return self.relu(out + identity)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (torchvision's layout), attention on the branch before the add."""

    expansion = 1

    def _build(self, inplanes, planes, stride, *, aw, kernels, backend):
        self.conv1 = conv3x3(inplanes, planes, stride, aw=aw, kernels=kernels, backend=backend)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, aw=aw, kernels=kernels, backend=backend)
        self.bn2 = nn.BatchNorm2d(planes)

    def _branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 (stride here, "ResNet v1.5" as torchvision) -> 1x1 with 4x expansion."""

    expansion = 4

    def _build(self, inplanes, planes, stride, *, aw, kernels, backend):
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, aw=aw, kernels=kernels, backend=backend)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    def _branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


def last_bn(block: nn.Module) -> nn.BatchNorm2d:
    """The BN closing a block's residual branch (zero-initialised on request)."""
    return block.bn3 if isinstance(block, Bottleneck) else block.bn2
