"""Tools to look at the attention maps the models explain with.

- ``cam`` / ``grad_cam``: class activation maps from ``model.cam_layer``;
- ``save_attention_maps`` and the overlays: the papers' figures as PNG;
- ``evaluate_stability``: the MANet paper's IoU stability across trainings;
- ``brnpa_rgb`` / ``sparsity``: the BR-NPA paper's part-map image and sparsity.

The command line is ``manet-explain`` (``python -m manet_kernels.explain``).
matplotlib is imported only by ``plot_stability``.
"""

from manet_kernels.explain.brnpa import brnpa_rgb, model_sparsity, sparsity
from manet_kernels.explain.cam import cam, grad_cam, normalize_maps, upsample
from manet_kernels.explain.overlay import (
    heatmap_overlay,
    jet,
    parts_overlay,
    save_attention_maps,
    save_png,
    to_display,
)
from manet_kernels.explain.stability import (
    StabilityResult,
    binarize,
    evaluate_stability,
    iou,
    model_maps,
    plot_stability,
    stability_from_maps,
    stability_of_models,
)

__all__ = ["brnpa_rgb", "sparsity", "model_sparsity", "cam", "grad_cam", "normalize_maps",
           "upsample", "jet", "to_display", "heatmap_overlay", "parts_overlay", "save_png",
           "save_attention_maps", "StabilityResult", "binarize", "iou", "stability_from_maps",
           "model_maps", "stability_of_models", "evaluate_stability", "plot_stability"]
