"""Fused BR-NPA modules: same constructors and state_dict keys as the reference."""

from __future__ import annotations

from torch import Tensor

from manet_kernels.ops.brnpa import brnpa
from manet_kernels.reference import brnpa as _reference


class BRNPA(_reference.BRNPA):
    """Representative vectors ``(B, n_parts, C)`` and part maps ``(B, n_parts, H, W)``
    of a feature map, on the fused kernels."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return brnpa(x, self.n_parts, variant=self.variant, backend=self.backend)


class BRNPAHead(_reference.BRNPAHead):
    """BR-NPA classification head on the fused kernels."""

    def __init__(self, in_channels: int, num_classes: int, n_parts: int = 3,
                 variant: str = "official", backend: str = "auto"):
        super().__init__(in_channels, num_classes, n_parts, variant, backend)
        self.brnpa = BRNPA(n_parts, variant, backend)
