"""Swap a model's attention modules between the fused and the reference classes."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

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


@dataclass
class ConvertSummary:
    """What ``convert(..., summary=True)`` did: ``converted``: ``(name, class)`` of each
    module now in the asked flavour (``""`` names the model itself); ``skipped``:
    ``(name, class, reason)`` of each timm module left as it was."""
    model: nn.Module
    converted: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)


def _timm():
    """manet_kernels.models.from_timm when timm is imported (a model cannot hold timm
    modules otherwise), else None: convert never imports timm itself."""
    if "timm" not in sys.modules:
        return None
    from manet_kernels.models import from_timm
    return from_timm


def convert(model: nn.Module, kernels: str = "fused", backend: str = "auto", *,
            summary: bool = False):
    """Turn every MixedAttention / AWConv2d / BRNPA / BRNPAHead in ``model`` (``model``
    itself included), and every timm ``CbamModule`` / ``CondConv2d``, into the
    ``kernels`` flavour (``"fused"`` or ``"reference"``), in place, and set their
    ``backend``; returns ``model`` (``summary=True``: a :class:`ConvertSummary`).

    The fused classes subclass the reference ones (timm's, for timm modules) and keep the
    same attributes, so the swap changes only each module's class: parameters and buffers
    stay the very same tensors (an optimizer holding them keeps working), ``state_dict``
    keys stay the same (timm checkpoints load before or after), hooks stay registered.
    ``kernels="reference"`` restores timm's own classes.

    A timm module the fused ops cannot compute exactly (another gate or activation,
    ``LightCbamModule``'s merged pooling, a subclass, hooks on its submodules) is left
    as it is, with a ``UserWarning`` naming each one and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_kernels(kernels, backend)
    side = 1 if kernels == "fused" else 0
    timm_mod = _timm()
    report = ConvertSummary(model)
    for name, m in model.named_modules():
        pair = _PAIRS.get(type(m))
        if pair is not None:
            m.__class__ = pair[side]
            if hasattr(m, "backend"):
                m.backend = backend
            report.converted.append((name, pair[side].__name__))
        elif timm_mod is not None and timm_mod.is_candidate(m):
            why = timm_mod.unsupported(m) if side else None
            pair = timm_mod.TIMM_PAIRS.get(type(m))
            if why is not None or pair is None:
                if side:
                    report.skipped.append((name, type(m).__name__, why))
                continue
            m.__class__ = pair[side]
            if side:
                m.backend = backend
            else:
                m.__dict__.pop("backend", None)
            report.converted.append((name, f"{pair[side].__module__}.{pair[side].__name__}"))
    for m in model.modules():  # the models record what they were built with
        if hasattr(m, "kernels") and hasattr(m, "backend") and isinstance(m.kernels, str):
            m.kernels, m.backend = kernels, backend
    if report.skipped:
        lines = "\n".join(f"  {n or '<model>'} ({c}): {why}" for n, c, why in report.skipped)
        warnings.warn(f"convert: {len(report.skipped)} timm module(s) left unconverted "
                      f"(the fused ops cannot compute them exactly):\n{lines}", stacklevel=2)
    return report if summary else model
