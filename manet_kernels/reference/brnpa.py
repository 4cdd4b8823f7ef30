"""BR-NPA iterative grouping in plain PyTorch: the oracle.

A line-by-line port of the authors' ``representativeVectors`` (``variant="official"``)
and of Alg. 1 of the paper (``variant="paper"``). The argmax index of every step is a
constant for autograd, as in the authors' code. One deliberate departure: a part whose
similarities sum to exactly 0 gets weights 0 where the authors' code gives NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

VARIANTS = ("official", "paper")
NORM_EPS = 1e-5


def brnpa(x: Tensor, n_parts: int = 3, *, variant: str = "official") -> tuple[Tensor, Tensor]:
    """``x (B, C, H, W)`` -> ``vectors (B, n_parts, C)``, ``maps (B, n_parts, H, W)``."""
    b, c, h, w = x.shape
    f = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    # The authors write sqrt(sum f^2): same values; vector_norm's derivative is 0 (not
    # NaN) at an all-zero vector.
    norm = torch.linalg.vector_norm(f, dim=-1) + NORM_EPS
    score = norm.clone() if variant == "official" else torch.pow(f, 2).sum(dim=-1)
    rows = torch.arange(b, device=x.device)
    vectors, maps = [], []
    for _ in range(n_parts):
        ind = score.argmax(dim=1)  # first maximum
        r, r_norm = f[rows, ind], norm[rows, ind]
        sim = (f * r[:, None]).sum(dim=-1) / (norm * r_norm[:, None])
        total = sim.sum(dim=1, keepdim=True)
        # Where the similarities sum to exactly 0 (e.g. r is an all-zero vector) the
        # part's weights are 0, and so are its vector and gradient, instead of the
        # authors' 0/0 = NaN; the inner where keeps the unused branch's gradient finite.
        empty = total == 0
        sim_norm = torch.where(empty, 0.0, sim / torch.where(empty, 1.0, total))
        vectors.append((f * sim_norm[..., None]).sum(dim=1))
        score = score * (1 - (sim if variant == "official" else sim_norm))
        maps.append(sim_norm.reshape(b, h, w))
    return torch.stack(vectors, 1), torch.stack(maps, 1)


class BRNPA(nn.Module):
    """Representative vectors and part maps of a feature map (no parameters)."""

    def __init__(self, n_parts: int = 3, variant: str = "official", backend: str = "auto"):
        super().__init__()
        if n_parts < 1:
            raise ValueError(f"n_parts must be >= 1, got {n_parts}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.n_parts, self.variant, self.backend = n_parts, variant, backend

    def extra_repr(self) -> str:
        return f"n_parts={self.n_parts}, variant={self.variant!r}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return brnpa(x, self.n_parts, variant=self.variant)


class BRNPAHead(nn.Module):
    """BR-NPA classification head: the part vectors, concatenated, then a linear layer."""

    def __init__(self, in_channels: int, num_classes: int, n_parts: int = 3,
                 variant: str = "official", backend: str = "auto"):
        super().__init__()
        self.brnpa = BRNPA(n_parts, variant, backend)
        self.fc = nn.Linear(n_parts * in_channels, num_classes)

    def forward(self, x: Tensor, return_maps: bool = False):
        vectors, maps = self.brnpa(x)
        logits = self.fc(vectors.flatten(1))
        return (logits, maps) if return_maps else logits
