"""manet_kernels: fused kernels for mixed attention (MANet/CBAM), AW-convolution and BR-NPA."""

from manet_kernels import _ext  # noqa: F401  (registers the C++/CUDA kernels)

__version__ = "0.1.0"
