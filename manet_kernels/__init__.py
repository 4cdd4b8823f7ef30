"""manet_kernels: fused kernels for mixed attention (MANet/CBAM), AW-convolution and BR-NPA."""

from manet_kernels import (
    _ext,  # noqa: F401  (registers the C++/CUDA kernels)
    explain,
    models,
    nn,
    reference,
)
from manet_kernels.models import convert
from manet_kernels.ops import (
    AWConv2dFunction,
    BRNPAFunction,
    MixedAttentionFunction,
    PerSampleConv2dFunction,
    aw_conv2d,
    brnpa,
    mixed_attention,
    per_sample_conv2d,
)
from manet_kernels.ops._common import BACKENDS

__version__ = "0.1.0"

__all__ = ["mixed_attention", "MixedAttentionFunction", "brnpa", "BRNPAFunction", "aw_conv2d",
           "per_sample_conv2d", "AWConv2dFunction", "PerSampleConv2dFunction", "nn",
           "reference", "explain", "models", "convert", "BACKENDS"]
