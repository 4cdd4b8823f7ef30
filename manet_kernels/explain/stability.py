"""Attention stability across trainings (MANet paper, §5.3.1).

Several models of one architecture, trained from different seeds, should point at
the same evidence. Each model's map for each image is scaled to 0..255, thresholded at
``>= 127``, and compared by IoU with the map of the most accurate model (the
reference). A stable mechanism gives IoUs near 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from manet_kernels.explain.cam import (
    attention_maps_of,
    cam_from_features,
    check_images,
    explain_forward,
    fc_of,
    grad_cam_from_forward,
    has_cam,
    has_grad_cam,
    is_part_output,
    logits_of,
    normalize_maps,
)
from manet_kernels.explain.cam import upsample as upsample_maps

STABILITY_METHODS = ("auto", "attention", "gradcam", "cam")


@dataclass
class StabilityResult:
    """``iou[m, i]``: model ``m``'s binary map on image ``i`` against the reference's.

    ``mean_iou[m]`` averages over images; ``reference`` indexes the most accurate model
    (its own row is all ones); ``accuracies`` are what chose it, from the checkpoints
    (``accuracy_source="checkpoint"``) or measured on the images (``"images"``).
    """

    iou: np.ndarray
    mean_iou: np.ndarray
    reference: int
    names: list[str]
    accuracies: list[float | None]
    accuracy_source: str
    method: str
    threshold: int = 127
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_iou_others(self) -> float:
        """Mean IoU over every model but the reference (NaN with one model)."""
        keep = [m for m in range(len(self.names)) if m != self.reference]
        return float(self.iou[keep].mean()) if keep and self.iou.shape[1] else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for JSON."""
        return {
            "method": self.method,
            "threshold": self.threshold,
            "reference": self.reference,
            "reference_name": self.names[self.reference],
            "names": list(self.names),
            "accuracies": [None if a is None else float(a) for a in self.accuracies],
            "accuracy_source": self.accuracy_source,
            "mean_iou": [float(v) for v in self.mean_iou],
            "mean_iou_others": self.mean_iou_others,
            "iou": self.iou.tolist(),
            **self.extra,
        }


def binarize(maps: Tensor, threshold: int = 127) -> Tensor:
    """``maps`` in [0, 1] -> bool: ``round(255 * map) >= threshold`` (the 8-bit image of
    the map, thresholded)."""
    if not isinstance(maps, Tensor):
        raise ValueError(f"maps must be a tensor, got {type(maps).__name__}")
    if not 0 <= threshold <= 256:
        raise ValueError(f"threshold must be in [0, 256], got {threshold}")
    return (maps.detach().float().clamp(0, 1) * 255.0).round() >= threshold


def iou(a: Tensor, b: Tensor) -> Tensor:
    """Per-image IoU of two boolean map stacks ``(N, ...)``: ``(N,)`` float64.
    Two empty maps agree completely: IoU 1."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.shape != b.shape:
        raise ValueError(f"a and b must be tensors of one shape, got "
                         f"{getattr(a, 'shape', type(a).__name__)} and "
                         f"{getattr(b, 'shape', type(b).__name__)}")
    if a.dim() < 1:
        raise ValueError("a and b need a leading image dimension")
    a, b = a.bool().reshape(a.shape[0], -1), b.bool().reshape(b.shape[0], -1)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def stability_from_maps(maps: Sequence[Tensor], reference: int, *,
                        names: Sequence[str] | None = None,
                        accuracies: Sequence[float | None] | None = None,
                        accuracy_source: str = "given", method: str = "maps",
                        threshold: int = 127) -> StabilityResult:
    """IoU of each model's thresholded maps (``maps[m]``: ``(N, h, w)`` in [0, 1])
    against ``maps[reference]``'s."""
    if len(maps) == 0:
        raise ValueError("maps must hold at least one model's maps")
    shape = maps[0].shape
    for m, t in enumerate(maps):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape != shape:
            raise ValueError(f"maps[{m}] must be (N, h, w) = {tuple(shape)} like maps[0], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not 0 <= reference < len(maps):
        raise ValueError(f"reference must index one of the {len(maps)} models, got {reference}")
    names = [f"model{m}" for m in range(len(maps))] if names is None else list(names)
    accuracies = [None] * len(maps) if accuracies is None else list(accuracies)
    if len(names) != len(maps) or len(accuracies) != len(maps):
        raise ValueError(f"names and accuracies must have one entry per model ({len(maps)})")
    ref = binarize(maps[reference], threshold)
    table = torch.stack([iou(binarize(t, threshold), ref) for t in maps]).numpy()
    mean = table.mean(1) if table.shape[1] else np.full(len(maps), np.nan)
    return StabilityResult(table, mean, reference, names, accuracies, accuracy_source,
                           method, threshold)


def resolve_method(model: nn.Module, output: Any, method: str) -> str:
    """``"auto"``: the model's own map (ABN/MANet attention, BR-NPA parts) if it has
    one, else Grad-CAM. Raises if the model cannot give the requested maps."""
    if method not in STABILITY_METHODS:
        raise ValueError(f"method must be one of {STABILITY_METHODS}, got {method!r}")
    has_att = attention_maps_of(output) is not None
    if method == "auto":
        method = "attention" if has_att else "gradcam"
    if method == "attention" and not has_att:
        raise ValueError(f"{type(model).__name__} produces no attention maps of its own "
                         "(not an ABN/MANet or BR-NPA model): use method='gradcam'")
    if method == "cam" and not has_cam(model):
        raise ValueError(f"{type(model).__name__} has no cam_layer + linear fc, so CAM is "
                         "not defined for it: use method='gradcam'")
    if method == "gradcam" and not has_grad_cam(model):
        raise ValueError(f"{type(model).__name__} has no cam_layer, so Grad-CAM is not "
                         "defined for it")
    return method


def model_maps(model: nn.Module, images: Tensor, method: str = "auto", *,
               batch_size: int = 64, upsample: bool = True) -> tuple[Tensor, Tensor, str]:
    """One model's explanation maps for ``images``, min-max scaled to [0, 1] per image.

    ``method``: ``"attention"`` (ABN/MANet map; for BR-NPA heads the norm-weighted
    average of the part maps, the BR-NPA paper's average map), ``"gradcam"``,
    ``"cam"``, or ``"auto"`` (see :func:`resolve_method`). Returns ``(maps (N, H, W)``
    at image size if ``upsample`` else at the map's own size, ``logits (N, K)``, the
    method used``)``.
    """
    check_images(images)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    p = next(model.parameters(), None)
    device = p.device if p is not None else images.device
    maps, logits, resolved = [], [], None
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        if resolved is None:
            probe = explain_forward(model, x[:1], need_features=False)
            resolved = resolve_method(model, probe.output, method)
        fwd = explain_forward(model, x, need_grad=resolved == "gradcam",
                                   need_features=resolved in ("gradcam", "cam"))
        out_logits = logits_of(fwd.output).detach()
        if resolved == "attention":
            att = attention_maps_of(fwd.output).detach().float()
            if is_part_output(fwd.output):
                m = att.mean(1) * fwd.output.features.detach().float().norm(dim=1)
            else:
                m = att[:, 0]
        else:
            t = out_logits.argmax(1)
            if resolved == "cam":
                m = cam_from_features(fwd.features, fc_of(model), t)
            else:
                m = grad_cam_from_forward(fwd, t).detach()
        m = normalize_maps(m.float())
        if upsample:
            m = upsample_maps(m, tuple(x.shape[2:]))
        maps.append(m.cpu())
        logits.append(out_logits.float().cpu())
    if resolved is None:
        raise ValueError("images must hold at least one image")
    return torch.cat(maps), torch.cat(logits), resolved


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


def _labels(labels: Sequence[int] | Tensor | None, n: int) -> Tensor | None:
    if labels is None:
        return None
    t = torch.as_tensor(labels).flatten()
    if t.is_floating_point() or t.numel() != n:
        raise ValueError(f"labels must be {n} integer class indices (one per image), got "
                         f"{t.numel()} of dtype {t.dtype}")
    return t.long().cpu()


def _pick_reference(accs: Sequence[float | None], measured: list[float] | None
                    ) -> tuple[int, list[float | None], str]:
    if all(a is not None for a in accs):
        chosen, source = list(accs), "checkpoint"
    elif measured is not None:
        chosen, source = list(measured), "images"
    else:
        raise ValueError("some models have no test accuracy: pass labels for the images so "
                         "the reference (most accurate) model can be chosen")
    # The first of equally accurate models, so the choice is reproducible.
    return int(np.argmax(np.asarray(chosen, dtype=np.float64))), chosen, source


def _stability(entries: Iterable[tuple[nn.Module, float | None, str]], images: Tensor,
               labels: Sequence[int] | Tensor | None, *, method: str, threshold: int,
               batch_size: int, upsample: bool) -> StabilityResult:
    check_images(images)
    lab = _labels(labels, images.shape[0])
    maps, accs, measured, names, resolved = [], [], [], [], None
    for model, acc, name in entries:
        m, logits, resolved = model_maps(model, images, method if resolved is None else resolved,
                                         batch_size=batch_size, upsample=upsample)
        maps.append(m)
        accs.append(None if acc is None else float(acc))
        names.append(name)
        if lab is not None:
            measured.append(_accuracy(logits, lab))
    if not maps:
        raise ValueError("at least one model is needed")
    ref, chosen, source = _pick_reference(accs, measured if lab is not None else None)
    result = stability_from_maps(maps, ref, names=names, accuracies=chosen,
                                 accuracy_source=source, method=resolved, threshold=threshold)
    result.extra["num_images"] = images.shape[0]
    if lab is not None:
        result.extra["image_accuracy"] = measured
    return result


def stability_of_models(models: Sequence[nn.Module], images: Tensor,
                        labels: Sequence[int] | Tensor | None = None, *,
                        accuracies: Sequence[float | None] | None = None,
                        names: Sequence[str] | None = None, method: str = "auto",
                        threshold: int = 127, batch_size: int = 64,
                        upsample: bool = True) -> StabilityResult:
    """Stability of ``models`` (one architecture) on ``images``.

    The reference is the model with the highest ``accuracies`` entry, or, where any
    entry is missing, the highest accuracy on ``labels`` (ties: the first). When labels
    are given, each model's accuracy on the images is also in
    ``extra["image_accuracy"]``. ``method``/``upsample``: see :func:`model_maps`.
    """
    accs = [None] * len(models) if accuracies is None else list(accuracies)
    names = [f"model{m}" for m in range(len(models))] if names is None else list(names)
    if len(accs) != len(models) or len(names) != len(models):
        raise ValueError(f"accuracies and names must have one entry per model ({len(models)})")
    return _stability(zip(models, accs, names), images, labels, method=method,
                      threshold=threshold, batch_size=batch_size, upsample=upsample)


def evaluate_stability(checkpoints: Sequence[str | os.PathLike], images: Tensor,
                       labels: Sequence[int] | Tensor | None = None, *,
                       method: str = "auto", kernels: str = "fused", backend: str = "auto",
                       device: str | torch.device = "cpu", threshold: int = 127,
                       batch_size: int = 64, upsample: bool = True,
                       loader: Callable[[str], tuple[nn.Module, dict]] | None = None
                       ) -> StabilityResult:
    """:func:`stability_of_models` on checkpoints written by ``manet-train``, loaded one
    at a time with ``manet_kernels.checkpoint.load_model`` (or ``loader(path) -> (model,
    checkpoint_dict)``). They must share one architecture (``arch`` and
    ``model_options``); their ``test_acc`` picks the reference unless one is missing
    (then ``labels`` must be given)."""
    if loader is None:
        from manet_kernels.checkpoint import load_model

        def loader(path: str) -> tuple[nn.Module, dict]:
            return load_model(path, kernels=kernels, backend=backend, map_location="cpu")

    paths = [str(p) for p in checkpoints]
    if not paths:
        raise ValueError("checkpoints must name at least one checkpoint file")
    archs: list[tuple[str, str]] = []

    def entries():
        for path in paths:
            model, ckpt = loader(path)
            arch = (str(ckpt["arch"]), repr(sorted((ckpt.get("model_options") or {}).items())))
            if archs and arch != archs[0]:
                raise ValueError(f"checkpoints must share one architecture: {paths[0]} is "
                                 f"{' '.join(archs[0])}, {path} is {' '.join(arch)}")
            archs.append(arch)
            yield model.to(device), ckpt.get("test_acc"), path

    result = _stability(entries(), images, labels, method=method, threshold=threshold,
                        batch_size=batch_size, upsample=upsample)
    result.extra["arch"] = archs[0][0]
    return result


def plot_stability(result: StabilityResult, path: str | os.PathLike) -> Path:
    """Box plot of each model's per-image IoU with the reference (marked), PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = len(result.names)
    fig = Figure(figsize=(max(4.0, 1.1 * m + 1.5), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if result.iou.shape[1]:
        box = ax.boxplot([result.iou[k] for k in range(m)], patch_artist=True, widths=0.6)
        for k, patch in enumerate(box["boxes"]):
            patch.set_facecolor("#f4a261" if k == result.reference else "#8ecae6")
    ax.scatter(range(1, m + 1), result.mean_iou, marker="D", color="black", zorder=3,
               label="mean")
    labels = []
    for k, name in enumerate(result.names):
        short = Path(name).parent.name + "/" + Path(name).name if os.sep in name else name
        acc = result.accuracies[k]
        tag = " (ref)" if k == result.reference else ""
        labels.append(f"{short}{tag}" + ("" if acc is None else f"\nacc {acc:.3f}"))
    ax.set_xticks(range(1, m + 1), labels, fontsize=7)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f"IoU with the reference (>= {result.threshold}/255)")
    ax.set_title(f"stability of {result.method} maps: mean IoU {result.mean_iou_others:.3f}\n"
                 "(models other than the reference)", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
