"""Public functions: argument checks, backend choice, torch.library registration."""

from manet_kernels.ops.brnpa import BRNPAFunction, brnpa
from manet_kernels.ops.mixed_attention import MixedAttentionFunction, mixed_attention

__all__ = ["mixed_attention", "MixedAttentionFunction", "brnpa", "BRNPAFunction"]
