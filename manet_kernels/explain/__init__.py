"""Tools to look at the attention maps the models explain with."""

from manet_kernels.explain.brnpa import brnpa_rgb, sparsity

__all__ = ["brnpa_rgb", "sparsity"]
