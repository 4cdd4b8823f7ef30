"""Public functions: argument checks, backend choice, torch.library registration."""

from manet_kernels.ops.aw_conv2d import (
    AWConv2dFunction,
    PerSampleConv2dFunction,
    aw_conv2d,
    per_sample_conv2d,
)
from manet_kernels.ops.brnpa import BRNPAFunction, brnpa
from manet_kernels.ops.mixed_attention import MixedAttentionFunction, mixed_attention

__all__ = ["mixed_attention", "MixedAttentionFunction", "brnpa", "BRNPAFunction", "aw_conv2d",
           "per_sample_conv2d", "AWConv2dFunction", "PerSampleConv2dFunction"]
