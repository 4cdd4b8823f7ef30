"""Heat-map and part-map overlays, and the figure the training CLI writes at the end.

Everything here is numpy + PIL (no matplotlib import), so ``save_attention_maps`` costs
one forward (and one backward for Grad-CAM) on a few images plus a PNG write.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from manet_kernels.explain.brnpa import brnpa_rgb
from manet_kernels.explain.cam import (
    attention_maps_of,
    cam_from_features,
    check_images,
    describe,
    explain_forward,
    fc_of,
    grad_cam_from_forward,
    has_cam,
    has_grad_cam,
    is_part_output,
    logits_of,
    normalize_maps,
    upsample,
)

METHODS = ("attention", "cam", "gradcam")
_MIN_TILE = 128  # pixels: 32x32 inputs are shown 4x so the maps stay readable


def jet(values: np.ndarray | Tensor) -> np.ndarray:
    """Jet-like colormap (blue -> cyan -> yellow -> red) of values in [0, 1]:
    ``uint8`` array of shape ``values.shape + (3,)``. Values outside are clipped."""
    v = np.clip(np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values,
                           dtype=np.float32), 0.0, 1.0)
    # Three shifted tent functions, the classic piecewise-linear jet.
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * v - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], -1)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def to_display(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the dataset normalisation: ``(N, C, H, W)`` -> ``uint8 (N, H, W, 3)``.

    One channel is shown as grey; three as RGB; any other count as the grey mean of
    the channels. ``mean``/``std``: one value per channel (or one for all).
    """
    check_images(images)
    c = images.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
    std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
    for name, t in (("mean", mean_t), ("std", std_t)):
        if t.numel() not in (1, c):
            raise ValueError(f"{name} must have 1 or {c} values (one per image channel), "
                             f"got {t.numel()}")
    if bool((std_t == 0).any()):
        raise ValueError("std must be non-zero")
    x = images.detach().float().cpu() * std_t.reshape(1, -1, 1, 1) + mean_t.reshape(1, -1, 1, 1)
    if c != 3:
        x = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    x = (x.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``uint8 (N, h, w, 3)`` to ``size = (H, W)``."""
    if rgb.shape[1:3] == tuple(size):
        return rgb
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float()
    t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return (t.clamp(0, 255) + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _blend(base: np.ndarray, top: np.ndarray, alpha: float) -> np.ndarray:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = (1.0 - alpha) * base.astype(np.float32) + alpha * top.astype(np.float32)
    return (out + 0.5).astype(np.uint8)


def heatmap_overlay(images: np.ndarray, maps: Tensor, *, alpha: float = 0.5) -> np.ndarray:
    """Jet heat map of ``maps`` (``(N, h, w)`` in [0, 1], upsampled bilinearly) blended
    over ``images`` (``uint8 (N, H, W, 3)``, e.g. from :func:`to_display`)."""
    images = _check_display(images)
    if not isinstance(maps, Tensor) or maps.dim() != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"maps must be ({images.shape[0]}, h, w) to match images, got "
                         f"{describe(maps)}")
    heat = jet(upsample(maps, images.shape[1:3]).numpy())
    return _blend(images, heat, alpha)


def parts_overlay(part_maps: Tensor, features: Tensor, images: np.ndarray, *,
                  alpha: float = 0.7) -> np.ndarray:
    """BR-NPA parts 1-3 in red, green, blue, brightness by the feature norm
    (:func:`brnpa_rgb`), upsampled to the images' size and blended over them."""
    images = _check_display(images)
    if not isinstance(features, Tensor) or features.dim() != 4:
        raise ValueError("features must be the (N, C, h, w) feature map, got "
                         f"{describe(features)}")
    rgb = brnpa_rgb(part_maps, features.detach().float().norm(dim=1))
    if rgb.shape[0] != images.shape[0]:
        raise ValueError(f"part_maps hold {rgb.shape[0]} images but images hold {images.shape[0]}")
    return _blend(images, _resize_rgb(rgb, images.shape[1:3]), alpha)


def _check_display(images: Any) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3:
        raise ValueError("images must be a uint8 (N, H, W, 3) array (see to_display), got "
                         f"{getattr(images, 'dtype', type(images).__name__)} "
                         f"{getattr(images, 'shape', '')}")
    return images


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a ``uint8 (H, W, 3)`` or ``(H, W)`` array as PNG (parent folders made)."""
    from PIL import Image
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or \
            (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise ValueError(f"image must be uint8 (H, W[, 3|4]), got {image.dtype} {image.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")
    return path


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


_BAR = 10  # colour-bar height (pixels) in a figure's footer


def _colour_bar(draw, canvas, x: int, y: int, width: int, ticks: Sequence[str], font) -> None:
    """The jet scale from 0 to 1 across ``width`` pixels, ``ticks`` spread evenly under it."""
    from PIL import Image
    strip = jet(np.linspace(0.0, 1.0, width))[None].repeat(_BAR, axis=0)
    canvas.paste(Image.fromarray(np.ascontiguousarray(strip)), (x, y))
    for k, text in enumerate(ticks):
        frac = k / max(1, len(ticks) - 1)
        anchor = "lt" if k == 0 else "rt" if k == len(ticks) - 1 else "mt"
        draw.text((x + frac * (width - 1), y + _BAR + 2), text, fill=(0, 0, 0), font=font,
                  anchor=anchor)


def compose_grid(columns: list[tuple], captions: Sequence[str] | None = None,
                 *, pad: int = 4) -> np.ndarray:
    """Lay out ``columns`` (title, ``uint8 (N, H, W, 3)``[, ticks]) side by side, one row
    per image, titles on top and ``captions[i]`` under row ``i``'s first tile. A column
    with ``ticks`` (labels of its heat-map scale, e.g. ``("0", "0.5", "1")``) gets a
    jet colour bar under its last row."""
    from PIL import Image, ImageDraw
    n, h, w = columns[0][1].shape[:3]
    font = _font(12)
    head, cap = 18, (16 if captions is not None else 0)
    scaled = [(j, col[2]) for j, col in enumerate(columns) if len(col) > 2 and col[2]]
    foot = _BAR + 16 + pad if scaled else 0
    width = len(columns) * (w + pad) + pad
    body = head + n * (h + cap + pad)
    canvas = Image.new("RGB", (width, body + foot + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, (title, tiles, *_) in enumerate(columns):
        x = pad + j * (w + pad)
        draw.text((x + w / 2, head / 2), _fit(draw, title, font, w), fill=(0, 0, 0),
                  font=font, anchor="mm")
        for i in range(n):
            canvas.paste(Image.fromarray(tiles[i]), (x, head + i * (h + cap + pad)))
    if captions is not None:
        for i, text in enumerate(captions):
            y = head + i * (h + cap + pad) + h + cap / 2
            draw.text((pad, y), _fit(draw, text, font, width - 2 * pad), fill=(0, 0, 0),
                      font=font, anchor="lm")
    for j, ticks in scaled:
        _colour_bar(draw, canvas, pad + j * (w + pad), body, w, ticks, font)
    return np.asarray(canvas)


def _display_size(h: int, w: int) -> tuple[int, int]:
    scale = max(1, math.ceil(_MIN_TILE / max(1, min(h, w))))
    return h * scale, w * scale


def _class_text(idx: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= idx < len(class_names):
        return str(class_names[idx])
    return str(idx)


# The ABN/MANet map is a sigmoid output, drawn on its own 0..1 scale; CAM and Grad-CAM
# are min-max scaled per image, so their bar runs from each image's min to its max.
SIGMOID_TICKS = ("0", "0.25", "0.5", "0.75", "1")
RELATIVE_TICKS = ("min", "max")
ROWS_PER_SHEET = 16  # images per PNG: a 128-px-tile sheet stays under ~2400 px tall


def _columns(model: nn.Module, images: Tensor, methods: Sequence[str], base: np.ndarray
             ) -> tuple[list[tuple], Tensor]:
    """The figure's columns for one sheet of images, and the predicted classes."""
    want_cam = "cam" in methods and has_cam(model)
    want_grad = "gradcam" in methods and has_grad_cam(model)
    fwd = explain_forward(model, images, need_grad=want_grad,
                          need_features=want_cam or want_grad)
    preds = logits_of(fwd.output).detach().argmax(1)
    columns: list[tuple] = [("input", base)]
    if "attention" in methods:
        maps = attention_maps_of(fwd.output)
        if maps is not None and is_part_output(fwd.output):
            columns.append(("BR-NPA parts", parts_overlay(maps, fwd.output.features, base)))
        elif maps is not None:
            att = maps.detach().float()[:, 0].clamp(0, 1)
            columns.append(("attention", heatmap_overlay(base, att), SIGMOID_TICKS))
    if want_cam:
        raw = cam_from_features(fwd.features, fc_of(model), preds)
        columns.append(("CAM", heatmap_overlay(base, normalize_maps(raw.float())),
                        RELATIVE_TICKS))
    if want_grad:
        raw = grad_cam_from_forward(fwd, preds).detach()
        columns.append(("Grad-CAM", heatmap_overlay(base, normalize_maps(raw.float())),
                        RELATIVE_TICKS))
    return columns, preds


def _captions(preds: Tensor, labels: list[int] | None,
              class_names: Sequence[str] | None) -> list[str]:
    captions = []
    for i, pr in enumerate(preds.tolist()):
        text = f"pred {_class_text(pr, class_names)}"
        if labels is not None:
            text = f"true {_class_text(int(labels[i]), class_names)} / " + text
        captions.append(text)
    return captions


def sheet_names(n_images: int, rows_per_sheet: int, prefix: str = "") -> list[str]:
    """File names of the sheets for ``n_images``: ``<prefix>attention_maps.png`` when
    one sheet holds them, else ``<prefix>attention_maps_01.png``, ``_02``, ..."""
    count = math.ceil(n_images / rows_per_sheet)
    if count == 1:
        return [f"{prefix}attention_maps.png"]
    digits = max(2, len(str(count)))
    return [f"{prefix}attention_maps_{k + 1:0{digits}d}.png" for k in range(count)]


def save_attention_maps(model: nn.Module, images: Tensor, out_dir: str | os.PathLike, *,
                        mean: Sequence[float], std: Sequence[float],
                        labels: Sequence[int] | Tensor | None = None,
                        class_names: Sequence[str] | None = None,
                        methods: Sequence[str] = METHODS, prefix: str = "",
                        rows_per_sheet: int = ROWS_PER_SHEET) -> list[Path]:
    """Write PNG figures of the model's explanations and return their paths.

    One row per image: the input, then one overlay per method that applies to the
    model, like the papers' figures. ``methods``: any of ``"attention"`` (the ABN/MANet
    attention map on its raw sigmoid scale, or the BR-NPA part maps in RGB), ``"cam"``
    (models with a linear ``fc``) and ``"gradcam"`` (models with a ``cam_layer``);
    methods that do not apply are skipped. CAM and Grad-CAM explain the predicted
    class, min-max scaled per image. Heat-map columns carry a colour bar. ``images``:
    normalised ``(N, C, H, W)`` as the dataset yields them (moved to the model's
    device); ``mean``/``std`` undo the normalisation for display. At most
    ``rows_per_sheet`` images per file (each sheet one forward): the file is
    ``out_dir/<prefix>attention_maps.png``, or numbered sheets (:func:`sheet_names`).
    """
    if isinstance(methods, str):
        methods = (methods,)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {unknown}")
    check_images(images)
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image")
    if not isinstance(rows_per_sheet, int) or rows_per_sheet < 1:
        raise ValueError(f"rows_per_sheet must be a positive int, got {rows_per_sheet!r}")
    if labels is not None:
        labels = torch.as_tensor(labels).flatten().tolist()
        if len(labels) != images.shape[0]:
            raise ValueError(f"labels must hold {images.shape[0]} class indices (one per "
                             f"image), got {len(labels)}")
    p = next(model.parameters(), None)
    paths = []
    for k, name in enumerate(sheet_names(images.shape[0], rows_per_sheet, prefix)):
        part = images[k * rows_per_sheet:(k + 1) * rows_per_sheet]
        part = part.to(p.device) if p is not None else part
        base = to_display(part, mean, std)
        base = _resize_rgb(base, _display_size(*base.shape[1:3]))
        columns, preds = _columns(model, part, methods, base)
        sheet_labels = None if labels is None else \
            labels[k * rows_per_sheet:(k + 1) * rows_per_sheet]
        grid = compose_grid(columns, _captions(preds, sheet_labels, class_names))
        paths.append(save_png(grid, Path(out_dir) / name))
    return paths
