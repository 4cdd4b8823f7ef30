"""BR-NPA visualisation and sparsity (the BR-NPA paper's figures and metric)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _batched(maps: Tensor, norms: Tensor) -> tuple[Tensor, Tensor, bool]:
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4):
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be (K, H, W) or (B, K, H, W), got {got}")
    single = maps.dim() == 3
    if single:
        maps = maps[None]
        norms = norms[None] if isinstance(norms, Tensor) and norms.dim() == 2 else norms
    b, _, h, w = maps.shape
    if not isinstance(norms, Tensor) or tuple(norms.shape) not in ((b, h, w), (b, 1, h, w)):
        raise ValueError(f"norms must be ({'' if single else 'B, '}H, W) = "
                         f"{(h, w) if single else (b, h, w)} to match maps, got "
                         f"{tuple(norms.shape) if isinstance(norms, Tensor) else norms}")
    return maps.detach().float().cpu(), norms.detach().float().cpu().reshape(b, h, w), single


def brnpa_rgb(maps: Tensor, norms: Tensor) -> np.ndarray:
    """Parts 1, 2, 3 in red, green, blue, brightness by feature norm.

    ``maps``: ``(B, K, H, W)`` or ``(K, H, W)`` part maps; ``norms``: the feature norms
    ``||f||`` at each position, ``(B, H, W)`` or ``(H, W)``. Each part map is scaled to
    its own maximum, then every colour by the norm over its maximum. Returns ``uint8``
    ``(B, H, W, 3)`` (or ``(H, W, 3)``). Parts past the third are not drawn.
    """
    maps, norms, single = _batched(maps, norms)
    b, k, h, w = maps.shape
    rgb = torch.zeros(b, 3, h, w)
    parts = maps[:, :3].clamp_min(0)
    rgb[:, : parts.shape[1]] = parts / parts.amax((2, 3), keepdim=True).clamp_min(1e-12)
    bright = norms / norms.amax((1, 2), keepdim=True).clamp_min(1e-12)
    img = (rgb * bright[:, None] * 255).round().clamp(0, 255).to(torch.uint8)
    img = img.permute(0, 2, 3, 1).numpy()
    return img[0] if single else img


def sparsity(maps: Tensor, norms: Tensor) -> Tensor:
    """max / mean of the norm-weighted average map, per image: ``(B,)`` (or a scalar).
    Higher is sparser (attention on fewer positions)."""
    maps, norms, single = _batched(maps, norms)
    avg = maps.mean(1) * norms
    out = avg.amax((1, 2)) / avg.mean((1, 2))
    return out[0] if single else out


def model_sparsity(model, images: Tensor, *, batch_size: int = 64) -> Tensor:
    """Per-image :func:`sparsity` ``(N,)`` of a BR-NPA-head model's part maps on
    ``images`` (normalised ``(N, C, H, W)``), the model run in eval mode."""
    from manet_kernels.explain.cam import check_images, explain_forward, is_part_output

    check_images(images)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    p = next(model.parameters(), None)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        fwd = explain_forward(model, x if p is None else x.to(p.device), need_features=False)
        if not is_part_output(fwd.output):
            raise ValueError(f"{type(model).__name__} is not a BR-NPA-head model (its output "
                             "has no part maps), so sparsity is not defined for it")
        out.append(sparsity(fwd.output.part_maps, fwd.output.features.norm(dim=1)))
    if not out:
        raise ValueError("images must hold at least one image")
    return torch.cat(out)
