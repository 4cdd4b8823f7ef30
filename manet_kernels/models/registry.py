"""Model names -> constructors."""

from __future__ import annotations

import difflib

from torch import nn

from manet_kernels.models.abn import ABNResNet
from manet_kernels.models.blocks import check_kernels
from manet_kernels.models.resnet import CIFAR_DEPTHS, IMAGENET_DEPTHS, ResNet

# prefix -> (attention, aw, abn, mixed attention in the attention branch)
PREFIXES = {
    "": (None, False, False, False),
    "se_": ("se", False, False, False),
    "cbam_": ("cbam", False, False, False),
    "abn_": (None, False, True, False),
    "manet_": (None, False, True, True),
    "aw_": (None, True, False, False),
    "aw_se_": ("se", True, False, False),
    "aw_cbam_": ("cbam", True, False, False),
}
BRNPA_SUFFIX = "_brnpa"
TIMM_PREFIX = "timm:"
DEPTHS = sorted(CIFAR_DEPTHS) + sorted(IMAGENET_DEPTHS)

_COMMON_OPTIONS = ("zero_init_residual",)
_FC_OPTIONS = _COMMON_OPTIONS + ("reduced_strides",)
_BRNPA_OPTIONS = _FC_OPTIONS + ("n_parts", "brnpa_variant")


def _names() -> dict[str, tuple[str, int, bool]]:
    out = {}
    for prefix, (_, _, abn, _) in PREFIXES.items():
        for depth in DEPTHS:
            out[f"{prefix}resnet{depth}"] = (prefix, depth, False)
            if not abn:  # ABN / MANet have their own heads
                out[f"{prefix}resnet{depth}{BRNPA_SUFFIX}"] = (prefix, depth, True)
    return out


_NAMES = _names()


def list_models() -> list[str]:
    """Every name ``create`` accepts, sorted."""
    return sorted(_NAMES)


def create(name: str, num_classes: int = 1000, *, in_channels: int = 3, kernels: str = "fused",
           backend: str = "auto", **options) -> nn.Module:
    """A model by name: ``[prefix]resnet<depth>[_brnpa]``.

    Prefixes: ``se_``, ``cbam_``, ``abn_``, ``manet_``, ``aw_``, ``aw_se_``, ``aw_cbam_``;
    depths 20/32/44/56/110 (CIFAR family, 3x3 stem, for ~32x32 images) and
    18/34/50/101/152 (ImageNet family); ``_brnpa``: BR-NPA head (not for abn/manet).
    ``kernels``: ``"fused"`` (``manet_kernels.nn``) or ``"reference"``
    (``manet_kernels.reference``), same ``state_dict`` either way; ``backend`` goes to
    the fused modules. Options: ``zero_init_residual=False`` (all);
    ``reduced_strides=False`` (all but abn/manet: last stage with stride 1);
    ``n_parts=3``, ``brnpa_variant="official"`` (``_brnpa`` models).

    ``timm:<name>``: ``timm.create_model(name, num_classes=..., in_chans=in_channels,
    **timm_args)`` converted with ``convert(model, kernels, backend)`` (option
    ``timm_args``: a dict of timm's keyword arguments; needs timm installed).
    """
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        check_kernels(kernels, backend)
        unknown = sorted(set(options) - {"timm_args"})
        if unknown:
            raise TypeError(f"create({name!r}) got unexpected option(s) {unknown}; "
                            "timm models take ['timm_args']")
        from manet_kernels.models.from_timm import create_timm  # imports timm

        return create_timm(name[len(TIMM_PREFIX):], num_classes, in_channels, kernels=kernels,
                           backend=backend, timm_args=options.get("timm_args"))
    if not isinstance(name, str) or name not in _NAMES:
        close = difflib.get_close_matches(str(name), list(_NAMES), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else \
            f"; names look like resnet20, cbam_resnet50, manet_resnet18, resnet50{BRNPA_SUFFIX}" \
            f" (see list_models()), or {TIMM_PREFIX}<timm model name>"
        raise ValueError(f"unknown model name {name!r}{hint}")
    check_kernels(kernels, backend)
    prefix, depth, brnpa = _NAMES[name]
    attention, aw, abn, mixed = PREFIXES[prefix]
    allowed = _COMMON_OPTIONS if abn else (_BRNPA_OPTIONS if brnpa else _FC_OPTIONS)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"create({name!r}) got unexpected option(s) {unknown}; "
                        f"{name} takes {list(allowed)}")
    common = dict(in_channels=in_channels, kernels=kernels, backend=backend)
    if abn:
        return ABNResNet(depth, num_classes, mixed_attention=mixed, **common, **options)
    return ResNet(depth, num_classes, attention=attention, aw=aw,
                  head="brnpa" if brnpa else "fc", **common, **options)
