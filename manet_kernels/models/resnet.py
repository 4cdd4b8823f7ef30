"""ResNet backbones: the CIFAR family (He et al. 2016, sec. 4.2) and the ImageNet
family (torchvision's layer layout and parameter names, so its checkpoints load into
the plain models), with SE / CBAM / AW blocks and a GAP+fc or BR-NPA head.

Choices (documented in ``manet_kernels.models``):
- CIFAR shortcuts that change shape are 1x1 conv + BN projections ("option B", as the
  CIFAR code ABN builds on), not the paper's zero-padding "option A": resnet20 has
  272,474 parameters for 10 classes (0.27M in the paper with option A).
- Initialisation as torchvision: kaiming-normal (fan_out, relu) for every conv
  (AW kernels included), BN weight 1 and bias 0, nn.Linear left at PyTorch's default;
  ``zero_init_residual=True`` zeroes the last BN of each residual branch (off by
  default, as torchvision).
"""

from __future__ import annotations

from torch import Tensor, nn

from manet_kernels.models.blocks import (
    BasicBlock,
    Bottleneck,
    check_kernels,
    conv1x1,
    last_bn,
    modules_for,
)
from manet_kernels.models.outputs import BRNPAOutput
from manet_kernels.reference.aw_conv2d import AWConv2d as _AWConv2d
from manet_kernels.reference.brnpa import VARIANTS as BRNPA_VARIANTS

# depth -> (block, blocks per stage)
CIFAR_DEPTHS = {d: (BasicBlock, [(d - 2) // 6] * 3) for d in (20, 32, 44, 56, 110)}
IMAGENET_DEPTHS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}
CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)


def family_of(depth: int) -> str:
    if depth in CIFAR_DEPTHS:
        return "cifar"
    if depth in IMAGENET_DEPTHS:
        return "imagenet"
    raise ValueError(f"depth must be one of {sorted(CIFAR_DEPTHS) + sorted(IMAGENET_DEPTHS)}, "
                     f"got {depth!r}")


class ResNet(nn.Module):
    """ResNet of ``depth`` (20/32/44/56/110: CIFAR family; 18/34/50/101/152: ImageNet).

    ``attention``: ``None``, ``"se"`` or ``"cbam"`` in every block; ``aw``: AW 3x3 convs
    in every block; ``head``: ``"fc"`` (global average pool + linear, returns logits) or
    ``"brnpa"`` (``BRNPAHead``, returns ``BRNPAOutput``); ``reduced_strides``: the last
    stage keeps stride 1 (twice the final map's resolution).

    ``cam_layer`` is the last stage (its output is the map the head reads); ``fc`` the
    classifier when the head is GAP + linear.
    """

    def __init__(self, depth: int, num_classes: int = 1000, *, in_channels: int = 3,
                 attention: str | None = None, aw: bool = False, head: str = "fc",
                 n_parts: int = 3, brnpa_variant: str = "official",
                 reduced_strides: bool = False, zero_init_residual: bool = False,
                 kernels: str = "fused", backend: str = "auto"):
        super().__init__()
        check_kernels(kernels, backend)
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if head not in ("fc", "brnpa"):
            raise ValueError(f"head must be 'fc' or 'brnpa', got {head!r}")
        if head == "brnpa":
            if not isinstance(n_parts, int) or isinstance(n_parts, bool) or n_parts < 1:
                raise ValueError(f"n_parts must be a positive int, got {n_parts!r}")
            if brnpa_variant not in BRNPA_VARIANTS:
                raise ValueError(f"brnpa_variant must be one of {BRNPA_VARIANTS}, "
                                 f"got {brnpa_variant!r}")
        self.depth, self.family = depth, family_of(depth)
        self.kernels, self.backend = kernels, backend
        self.num_classes = num_classes
        self._block_options = dict(attention=attention, aw=aw, kernels=kernels, backend=backend)

        block, counts = (CIFAR_DEPTHS if self.family == "cifar" else IMAGENET_DEPTHS)[depth]
        widths = CIFAR_WIDTHS if self.family == "cifar" else IMAGENET_WIDTHS
        self.block, self.widths, self.stage_blocks = block, tuple(widths), tuple(counts)
        self._make_stem(in_channels, widths[0])
        self.inplanes = widths[0]
        for i, (width, count) in enumerate(zip(widths, counts)):
            stride = 1 if i == 0 or (reduced_strides and i == len(widths) - 1) else 2
            setattr(self, f"layer{i + 1}", self._make_layer(width, count, stride))
        self.num_stages = len(widths)
        self.num_features = widths[-1] * block.expansion

        self.head_kind = head
        if head == "fc":
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(self.num_features, num_classes)
        else:
            self.head = modules_for(kernels).BRNPAHead(self.num_features, num_classes,
                                                       n_parts, brnpa_variant, backend)
        init_weights(self, zero_init_residual)

    def _make_stem(self, in_channels: int, width: int) -> None:
        if self.family == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, **overrides) -> nn.Sequential:
        """A stage, torchvision's way (``self.inplanes`` advances to its output width)."""
        options = {**self._block_options, **overrides}
        block = self.block
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, **options)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **options) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    @property
    def cam_layer(self) -> nn.Module:
        return self.stages[-1]

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: Tensor):
        f = self.features(x)
        if self.head_kind == "fc":
            return self.fc(self.avgpool(f).flatten(1))
        logits, maps = self.head(f, return_maps=True)
        return BRNPAOutput(logits, maps, f)


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _AWConv2d):  # fused AWConv2d subclasses it
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(last_bn(m).weight)
