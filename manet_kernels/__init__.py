"""manet_kernels: fused kernels for mixed attention (MANet/CBAM), AW-convolution and BR-NPA."""

from manet_kernels import _ext  # noqa: F401  (registers the C++/CUDA kernels)
from manet_kernels import explain, nn, reference
from manet_kernels.ops import BRNPAFunction, MixedAttentionFunction, brnpa, mixed_attention
from manet_kernels.ops._common import BACKENDS

__version__ = "0.1.0"

__all__ = ["mixed_attention", "MixedAttentionFunction", "brnpa", "BRNPAFunction", "nn",
           "reference", "explain", "BACKENDS"]
