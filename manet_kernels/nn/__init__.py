"""Drop-in ``nn.Module``s built on the fused ops."""

from manet_kernels.nn.aw_conv2d import AWConv2d
from manet_kernels.nn.brnpa import BRNPA, BRNPAHead
from manet_kernels.nn.mixed_attention import MixedAttention

__all__ = ["MixedAttention", "AWConv2d", "BRNPA", "BRNPAHead"]
