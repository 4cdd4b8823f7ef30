"""Class activation maps: CAM (Zhou et al. 2016) and Grad-CAM (Selvaraju et al. 2017).

Both read the final feature map through a forward hook on ``model.cam_layer`` (every
model of ``manet_kernels.models`` has one). The model runs in eval mode and is put
back exactly as it was: each module's training flag, the parameters' ``requires_grad``,
their ``.grad`` (never written: gradients are taken with ``torch.autograd.grad`` on the
feature map only) and the hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TargetLike = int | Sequence[int] | Tensor | None


def logits_of(output: Any) -> Tensor:
    """The prediction logits of any model output (see ``manet_kernels.models.outputs``)."""
    from manet_kernels.models.outputs import logits_of as _logits_of
    return _logits_of(output)


def attention_maps_of(output: Any) -> Tensor | None:
    """``(N,1,h,w)`` ABN/MANet map, ``(N,P,h,w)`` BR-NPA part maps, or None."""
    from manet_kernels.models.outputs import attention_maps
    return attention_maps(output)


def is_part_output(output: Any) -> bool:
    """True for a BR-NPA head's output (part maps + features), whatever ``n_parts``."""
    from manet_kernels.models.outputs import BRNPAOutput
    return isinstance(output, BRNPAOutput)


def describe(x: Any) -> str:
    """Shape of a tensor or array, else the type's name (for error messages)."""
    shape = getattr(x, "shape", None)
    return str(tuple(shape)) if shape is not None else type(x).__name__


def _part_of(model: nn.Module, name: str, kind: type, missing: str) -> nn.Module:
    """``model.<name>`` if it is a ``kind``, else a ValueError: the model "has no <missing>"."""
    part = getattr(model, name, None)
    if not isinstance(part, kind):
        raise ValueError(f"model ({type(model).__name__}) has no {missing}")
    return part


def cam_layer_of(model: nn.Module) -> nn.Module:
    return _part_of(model, "cam_layer", nn.Module, "`cam_layer` module: CAM and Grad-CAM "
                    "need the layer whose output the classifier reads")


def fc_of(model: nn.Module) -> nn.Linear:
    return _part_of(model, "fc", nn.Linear, "linear `fc` after global average pooling, so "
                    "CAM is not defined for it (Grad-CAM is)")


def has_cam(model: nn.Module) -> bool:
    return isinstance(getattr(model, "cam_layer", None), nn.Module) and \
        isinstance(getattr(model, "fc", None), nn.Linear)


def has_grad_cam(model: nn.Module) -> bool:
    return isinstance(getattr(model, "cam_layer", None), nn.Module)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside, every module's own training flag restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def check_images(images: Any, model: nn.Module | None = None) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError("images must be a (N, C, H, W) tensor, got "
                         f"{describe(images)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got {images.dtype}")
    if model is not None:
        p = next(model.parameters(), None)
        if p is not None and p.device != images.device:
            raise ValueError(f"images are on {images.device} but the model is on {p.device}")
    return images


@dataclass
class ExplainForward:
    """One eval-mode forward: the model's output and the cam_layer's output.

    ``features`` is the hooked feature map, detached and made a leaf that requires
    grad when the forward ran with ``need_grad``, so Grad-CAM differentiates the
    logits with respect to it alone (no parameter gradients are built or stored).
    """

    output: Any
    features: Tensor | None


def explain_forward(model: nn.Module, images: Tensor, *, need_grad: bool = False,
                    need_features: bool = True) -> ExplainForward:
    """Run ``model(images)`` in eval mode, capturing ``model.cam_layer``'s output."""
    check_images(images, model)
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, out: Any) -> Tensor:
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise ValueError("model.cam_layer must output a (N, C, h, w) feature map, got "
                             f"{describe(out)}")
        if need_grad:
            out = out.detach().requires_grad_(True)
        captured.append(out)
        return out

    handle = cam_layer_of(model).register_forward_hook(hook) if need_features else None
    try:
        with eval_mode(model), torch.set_grad_enabled(need_grad):
            output = model(images)
    finally:
        if handle is not None:
            handle.remove()
    if need_features and not captured:
        raise ValueError("model.cam_layer was not called during the forward pass")
    # A layer called more than once (never in our models) is read at its last call:
    # that is the one nearest the classifier.
    return ExplainForward(output, captured[-1] if captured else None)


def resolve_target(target: TargetLike, logits: Tensor) -> Tensor:
    """``(N,)`` long class indices: the prediction when ``target`` is None."""
    n, k = logits.shape
    if target is None:
        return logits.detach().argmax(1)
    if isinstance(target, bool):
        raise ValueError(f"target must be a class index or N class indices, got {target!r}")
    if isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long, device=logits.device)
    else:
        t = torch.as_tensor(target, device=logits.device)
        if t.is_floating_point() or t.is_complex() or t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"target must be an int or {n} integer class indices (one per "
                             f"image), got shape {tuple(t.shape)} dtype {t.dtype}")
        t = t.long()
    if n and (int(t.min()) < 0 or int(t.max()) >= k):
        raise ValueError(f"target class indices must be in [0, {k}), got "
                         f"{int(t.min())}..{int(t.max())}")
    return t


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max scale each image's map to [0, 1]; a constant map becomes all zeros."""
    flat = maps.reshape(maps.shape[0], -1)
    if flat.shape[0] == 0 or flat.shape[1] == 0:
        return maps.clone()
    lo = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1), 0)
    return out.reshape(maps.shape)


def cam_from_features(features: Tensor, fc: nn.Linear, target: Tensor) -> Tensor:
    """Raw CAM: ``sum_c fc.weight[t, c] * features[:, c]``, ``(N, h, w)`` (no bias: it is a
    constant shift of the map)."""
    w = fc.weight.detach()[target].to(features.dtype)
    return torch.einsum("nc,nchw->nhw", w, features.detach())


def grad_cam_from_forward(fwd: ExplainForward, target: Tensor) -> Tensor:
    """Raw Grad-CAM: ``relu(sum_c mean_hw(dy_t/dA_c) * A_c)``, ``(N, h, w)``."""
    feats = fwd.features
    logits = logits_of(fwd.output)
    if feats is None or not feats.requires_grad:
        raise ValueError("Grad-CAM needs a forward run with need_grad=True")
    score = logits.gather(1, target[:, None]).sum()
    if not score.requires_grad:
        raise ValueError("the logits do not depend on model.cam_layer's output, so Grad-CAM "
                         "is not defined for this model")
    (grads,) = torch.autograd.grad(score, feats, allow_unused=True)
    if grads is None:
        raise ValueError("the target logits do not depend on model.cam_layer's output")
    weights = grads.mean((2, 3))
    return F.relu(torch.einsum("nc,nchw->nhw", weights, feats.detach()))


def cam(model: nn.Module, images: Tensor, target: TargetLike = None, *,
        normalize: bool = True) -> Tensor:
    """Class activation maps ``(N, h, w)`` at the feature map's resolution.

    The target class's ``model.fc`` weights applied to ``model.cam_layer``'s output
    (for ABN/MANet: the perception branch's classifier). ``target``: None (the
    predicted class), an int, or ``N`` class indices. ``normalize``: min-max to [0, 1]
    per image (else the raw weighted sum). Only for models whose classifier is global
    average pooling + ``nn.Linear`` (not BR-NPA heads: use :func:`grad_cam`).
    """
    fc = fc_of(model)
    cam_layer_of(model)
    fwd = explain_forward(model, images, need_grad=False)
    t = resolve_target(target, logits_of(fwd.output))
    if fwd.features.shape[1] != fc.in_features:
        raise ValueError(f"model.cam_layer outputs {fwd.features.shape[1]} channels but model.fc "
                         f"takes {fc.in_features}: cam_layer is not the layer fc reads")
    maps = cam_from_features(fwd.features, fc, t)
    return normalize_maps(maps) if normalize else maps


def grad_cam(model: nn.Module, images: Tensor, target: TargetLike = None, *,
             normalize: bool = True) -> Tensor:
    """Grad-CAM maps ``(N, h, w)`` at the feature map's resolution.

    Channel weights are the spatial means of the target logit's gradient with respect
    to ``model.cam_layer``'s output; the map is the ReLU of the weighted channel sum.
    ``target``/``normalize`` as in :func:`cam`. Works for any model with a
    ``cam_layer`` (plain, ABN/MANet perception logits, BR-NPA heads).
    """
    cam_layer_of(model)
    fwd = explain_forward(model, images, need_grad=True)
    t = resolve_target(target, logits_of(fwd.output))
    maps = grad_cam_from_forward(fwd, t).detach()
    return normalize_maps(maps) if normalize else maps


def upsample(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(N, h, w)`` maps to ``size`` (float32)."""
    if not isinstance(maps, Tensor) or maps.dim() != 3:
        raise ValueError("maps must be (N, h, w), got "
                         f"{describe(maps)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    m = maps.detach().float()
    if tuple(m.shape[1:]) == size or m.shape[0] == 0:
        return m.new_zeros(0, *size) if m.shape[0] == 0 else m.clone()
    # Bilinear weights are convex, so [0, 1] maps stay in [0, 1].
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
