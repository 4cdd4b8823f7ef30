"""Mixed attention (channel, then spatial) in plain PyTorch: the oracle.

Written the way the CBAM / MANet papers describe it, one step per line, so it
can be checked by eye. The fused module in ``manet_kernels.nn`` has the same
constructor and the same ``state_dict`` keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOL_ORDERS = ("avg_max", "max_avg")


def _mlp(v: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    return F.linear(F.relu(F.linear(v, w1, b1)), w2, b2)


def channel_gate(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    """``mc = sigmoid(mlp(avg_hw x) + mlp(max_hw x))``, shape ``(N, C)``."""
    flat = x.flatten(2)
    avg = flat.mean(2)
    mx = flat.max(2).values  # torch.max(dim): the gradient goes to one element on ties
    return torch.sigmoid(_mlp(avg, w1, b1, w2, b2) + _mlp(mx, w1, b1, w2, b2))


def spatial_features(x1: Tensor, pool_order: str = "avg_max") -> Tensor:
    """``cat[mean_c x1, max_c x1]`` (or max first), shape ``(N, 2, H, W)``."""
    sa = x1.mean(1, keepdim=True)
    sm = x1.max(1, keepdim=True).values
    return torch.cat([sa, sm] if pool_order == "avg_max" else [sm, sa], 1)


def mixed_attention(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                    conv_w: Tensor, conv_b: Tensor | None = None, *,
                    return_maps: bool = False):
    """Functional reference of ``manet_kernels.mixed_attention``."""
    mc = channel_gate(x, w1, b1, w2, b2)
    x1 = x * mc[:, :, None, None]
    ms = torch.sigmoid(F.conv2d(spatial_features(x1), conv_w, conv_b,
                                padding=conv_w.shape[-1] // 2))
    y = x1 * ms
    return (y, mc, ms) if return_maps else y


class MixedAttention(nn.Module):
    """Channel attention then spatial attention (CBAM / MANet).

    ``mlp_bias``: biases in the shared MLP. ``pool_order``: order of the two
    channel-pooled maps fed to the spatial conv (CBAM's official code uses
    ``"max_avg"``). ``spatial_norm``: BatchNorm2d(1) after the spatial conv, which
    then has no bias (CBAM's official flavour). ``backend`` is accepted for
    signature compatibility with the fused module and ignored.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7,
                 mlp_bias: bool = True, pool_order: str = "avg_max",
                 spatial_norm: bool = False, backend: str = "auto"):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if pool_order not in POOL_ORDERS:
            raise ValueError(f"pool_order must be one of {POOL_ORDERS}, got {pool_order!r}")
        self.channels = channels
        self.reduction = reduction
        self.kernel_size = kernel_size
        self.pool_order = pool_order
        self.spatial_norm = spatial_norm
        self.backend = backend
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden, bias=mlp_bias)
        self.fc2 = nn.Linear(hidden, channels, bias=mlp_bias)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not spatial_norm)
        # CBAM's official spatial gate: BN with momentum 0.01 and no conv bias.
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01) if spatial_norm else None

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, reduction={self.reduction}, "
                f"kernel_size={self.kernel_size}, pool_order={self.pool_order!r}, "
                f"spatial_norm={self.spatial_norm}")

    def forward(self, x: Tensor, return_maps: bool = False):
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (N, {self.channels}, H, W), got {tuple(x.shape)}")
        mc = channel_gate(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        x1 = x * mc[:, :, None, None]
        z = self.conv(spatial_features(x1, self.pool_order))
        if self.bn is not None:
            z = self.bn(z)
        ms = torch.sigmoid(z)
        y = x1 * ms
        return (y, mc, ms) if return_maps else y
