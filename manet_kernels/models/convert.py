"""Swap a model's attention modules between the fused and the reference classes."""

from __future__ import annotations

from torch import nn

from manet_kernels import nn as fused_nn
from manet_kernels import reference as reference_nn
from manet_kernels.models.blocks import check_kernels

_CLASSES = ("MixedAttention", "AWConv2d", "BRNPA", "BRNPAHead")
# exact class -> (reference class, fused class); user subclasses are left alone
_PAIRS = {}
for _name in _CLASSES:
    _pair = (getattr(reference_nn, _name), getattr(fused_nn, _name))
    _PAIRS[_pair[0]] = _PAIRS[_pair[1]] = _pair


def convert(model: nn.Module, kernels: str = "fused", backend: str = "auto") -> nn.Module:
    """Turn every MixedAttention / AWConv2d / BRNPA / BRNPAHead in ``model`` (``model``
    itself included) into the ``kernels`` flavour (``"fused"`` or ``"reference"``), in
    place, and set their ``backend``; returns ``model``.

    The fused classes subclass the reference ones and keep the same attributes, so the
    swap changes only each module's class: parameters and buffers stay the very same
    tensors (an optimizer holding them keeps working), hooks stay registered.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_kernels(kernels, backend)
    side = 1 if kernels == "fused" else 0
    for m in model.modules():
        pair = _PAIRS.get(type(m))
        if pair is not None:
            m.__class__ = pair[side]
            if hasattr(m, "backend"):
                m.backend = backend
    for m in model.modules():  # the models record what they were built with
        if hasattr(m, "kernels") and hasattr(m, "backend") and isinstance(m.kernels, str):
            m.kernels, m.backend = kernels, backend
    return model
