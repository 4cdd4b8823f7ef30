"""Attention Branch Network (Fukui et al., CVPR 2019) and MANet on the ResNets.

- Feature extractor: the stem and every stage but the last, giving ``F``.
- Attention branch: a copy of the last stage with stride 1 (so ``M`` has ``F``'s
  resolution) -> [MANet: mixed attention] -> BN -> 1x1 conv to K classes -> BN -> ReLU,
  then the map head (1x1 conv K->1 -> BN -> sigmoid = ``M``) and the logit head
  (1x1 conv K->K -> global average pool). Every conv in the branch is bias-free, as in
  the authors' code.
- Perception branch: the last stage applied to ``(1 + M) * F``, then GAP + fc.

MANet refines the attention branch's features with the mixed attention module (channel
then spatial attention) before the K-channel conv; its flavour here is CBAM's official
one, ``MixedAttention(C, reduction=16, kernel_size=7, pool_order="max_avg",
spatial_norm=True)``. Training minimises CE(attention logits) + CE(logits)
(``classification_loss``).
"""

from __future__ import annotations

from torch import Tensor, nn

from manet_kernels.models.blocks import CBAM_OPTIONS, modules_for
from manet_kernels.models.outputs import ABNOutput
from manet_kernels.models.resnet import ResNet, init_weights


class AttentionBranch(nn.Module):
    """``F -> (attention_logits (N, K), M (N, 1, h, w))``."""

    def __init__(self, layer: nn.Module, channels: int, num_classes: int,
                 mixed_attention: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        self.mixed_attention = mixed_attention
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, num_classes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(num_classes)
        self.relu = nn.ReLU(inplace=True)
        self.map_conv = nn.Conv2d(num_classes, 1, 1, bias=False)
        self.map_bn = nn.BatchNorm2d(1)
        self.sigmoid = nn.Sigmoid()
        self.logit_conv = nn.Conv2d(num_classes, num_classes, 1, bias=False)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        a = self.layer(f)
        if self.mixed_attention is not None:
            a = self.mixed_attention(a)
        a = self.relu(self.bn2(self.conv(self.bn(a))))
        m = self.sigmoid(self.map_bn(self.map_conv(a)))
        logits = self.logit_conv(a).mean((2, 3))
        return logits, m


class ABNResNet(ResNet):
    """ABN (``mixed_attention=False``) or MANet (``True``) on a ResNet of ``depth``;
    returns ``ABNOutput``. ``cam_layer`` and ``fc`` are the perception branch's."""

    def __init__(self, depth: int, num_classes: int = 1000, *, in_channels: int = 3,
                 mixed_attention: bool = False, zero_init_residual: bool = False,
                 kernels: str = "fused", backend: str = "auto"):
        super().__init__(depth, num_classes, in_channels=in_channels,
                         zero_init_residual=zero_init_residual, kernels=kernels,
                         backend=backend)
        self.inplanes = self.widths[-2] * self.block.expansion
        layer = self._make_layer(self.widths[-1], self.stage_blocks[-1], stride=1)
        mixed = None
        if mixed_attention:
            mixed = modules_for(kernels).MixedAttention(self.num_features, backend=backend,
                                                        **CBAM_OPTIONS)
        self.attention_branch = AttentionBranch(layer, self.num_features, num_classes, mixed)
        init_weights(self.attention_branch, zero_init_residual)

    def forward(self, x: Tensor) -> ABNOutput:
        f = self.stem(x)
        for stage in self.stages[:-1]:
            f = stage(f)
        attention_logits, m = self.attention_branch(f)
        p = self.stages[-1](f * (1 + m))
        logits = self.fc(self.avgpool(p).flatten(1))
        return ABNOutput(logits, attention_logits, m)
