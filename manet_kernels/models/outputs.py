"""What the models return, and helpers that work on any of it.

Plain / SE / CBAM / AW models return a logits tensor; ABN / MANet and BR-NPA-head
models return the NamedTuples below. The training and explanation tools use only
``logits_of``, ``classification_loss`` and ``attention_maps``, so they need not know
which kind of model they hold.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor


class ABNOutput(NamedTuple):
    """Attention Branch Network output.

    ``logits``: the perception branch's ``(N, K)`` (the prediction);
    ``attention_logits``: the attention branch's ``(N, K)``;
    ``attention_map``: ``M`` in ``[0, 1]``, ``(N, 1, h, w)`` at the resolution of the
    feature map it multiplies.
    """
    logits: Tensor
    attention_logits: Tensor
    attention_map: Tensor


class BRNPAOutput(NamedTuple):
    """BR-NPA-head output: ``logits (N, K)``, ``part_maps (N, P, h, w)`` and the final
    feature map ``features (N, C, h, w)`` (its per-position L2 norm is the brightness
    for ``manet_kernels.explain.brnpa_rgb``)."""
    logits: Tensor
    part_maps: Tensor
    features: Tensor


def logits_of(output) -> Tensor:
    """The prediction logits ``(N, K)`` of any model output."""
    if isinstance(output, (ABNOutput, BRNPAOutput)):
        return output.logits
    if isinstance(output, Tensor):
        return output
    raise TypeError("output must be a Tensor, ABNOutput or BRNPAOutput, got "
                    f"{type(output).__name__}")


def classification_loss(output, target: Tensor, **cross_entropy_kwargs) -> Tensor:
    """Cross-entropy of the prediction; for ABN / MANet the sum of the attention
    branch's and the perception branch's cross-entropies (ABN's training loss).
    Extra keyword arguments (``label_smoothing``, ``weight``, ...) go to
    ``F.cross_entropy``."""
    if isinstance(output, ABNOutput):
        return (F.cross_entropy(output.attention_logits, target, **cross_entropy_kwargs)
                + F.cross_entropy(output.logits, target, **cross_entropy_kwargs))
    return F.cross_entropy(logits_of(output), target, **cross_entropy_kwargs)


def attention_maps(output) -> Tensor | None:
    """The maps a model produces itself: ABN / MANet ``(N, 1, h, w)``, BR-NPA part maps
    ``(N, P, h, w)``; ``None`` for models that return plain logits."""
    if isinstance(output, ABNOutput):
        return output.attention_map
    if isinstance(output, BRNPAOutput):
        return output.part_maps
    logits_of(output)  # type check
    return None
