"""Pure-PyTorch reference modules: the oracle every kernel is tested against."""

from manet_kernels.reference.aw_conv2d import AWConv2d
from manet_kernels.reference.brnpa import BRNPA, BRNPAHead
from manet_kernels.reference.mixed_attention import MixedAttention

__all__ = ["MixedAttention", "AWConv2d", "BRNPA", "BRNPAHead"]
