"""timm models on the fused kernels: ``CbamModule`` and ``CondConv2d`` converted in place,
and ``create_timm`` for ``manet-train --arch timm:<name>``.

The converted classes subclass timm's and only replace ``forward``: attributes,
parameters (the very same tensors), buffers, hooks and ``state_dict`` keys stay timm's,
so timm checkpoints load before or after conversion. Importing this module imports timm
(``convert`` imports it only when timm is already imported).
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import Tensor, nn

try:
    import timm
    from timm.layers import cbam as _cbam
    from timm.layers import cond_conv2d as _condconv
    from timm.layers.activations import Sigmoid as _TimmSigmoid
    from timm.layers.norm_act import BatchNormAct2d as _BatchNormAct2d
    from timm.layers.padding import pad_same as _pad_same
except ImportError as e:  # the message names the package to install
    raise ModuleNotFoundError(
        f"timm models need the timm package ({e}); install it beside torch without "
        "replacing torch: pip install --no-deps timm torchvision==0.29.1 pyyaml "
        "huggingface_hub safetensors", name="timm") from e

from manet_kernels.ops.aw_conv2d import per_sample_conv2d
from manet_kernels.ops.mixed_attention import check_args, fused, spatial_norm_of

__all__ = ["CbamModule", "CondConv2d", "create_timm", "unsupported", "TIMM_PAIRS"]

_SIGMOIDS = (nn.Sigmoid, _TimmSigmoid)


class CbamModule(_cbam.CbamModule):
    """timm's ``CbamModule`` on the fused mixed-attention op (``avg_max`` pool order,
    spatial BatchNorm, no conv bias): ``channel.fc1``/``fc2`` (1x1 convs) are the MLP,
    ``spatial.conv.conv`` the k x k conv and ``spatial.conv.bn`` the BatchNorm, passed as
    they are. ``backend`` (set by ``convert``) picks the kernels; ``"reference"`` runs
    timm's own forward. Max ties: the gradient goes to one element (the fused op's
    rule), where timm's ``amax`` splits it among the tied elements."""

    backend = "auto"

    def forward(self, x: Tensor) -> Tensor:
        ch, conv, bn = self.channel, self.spatial.conv.conv, self.spatial.conv.bn
        w1, w2 = ch.fc1.weight.flatten(1), ch.fc2.weight.flatten(1)  # views: (Cr, C), (C, Cr)
        b1, b2 = ch.fc1.bias, ch.fc2.bias
        backend = check_args(x, w1, b1, w2, b2, conv.weight, conv.bias, self.backend)
        if backend == "reference":
            return super().forward(x)
        norm = spatial_norm_of(bn, self.training)
        y, *_ = fused(x, w1, b1, w2, b2, conv.weight, conv.bias, norm, backend, False)
        return y


class CondConv2d(_condconv.CondConv2d):
    """timm's ``CondConv2d`` with the convolution on ``per_sample_conv2d``: the routing
    product (``routing_weights @ weight``, and the bias) stays in PyTorch, the grouped-conv
    trick is gone. Dynamic "same" padding pads ``x`` as timm does, then convolves
    unpadded. ``backend="reference"`` runs timm's own forward."""

    backend = "auto"

    def forward(self, x: Tensor, routing_weights: Tensor) -> Tensor:
        if self.backend == "reference":
            return super().forward(x, routing_weights)
        weights = (routing_weights @ self.weight).view((x.shape[0],) + self.weight_shape)
        bias = None if self.bias is None else routing_weights @ self.bias
        padding = self.padding
        if self.dynamic_padding:
            x, padding = _pad_same(x, self.kernel_size, self.stride, self.dilation), 0
        return per_sample_conv2d(x, weights, bias, self.stride, padding, self.dilation,
                                 self.groups, backend=self.backend)


# exact timm class -> (timm class, fused class), as convert.py's pairs
TIMM_PAIRS = {}
for _fused in (CbamModule, CondConv2d):
    _pair = (_fused.__bases__[0], _fused)
    TIMM_PAIRS[_pair[0]] = TIMM_PAIRS[_pair[1]] = _pair

# timm modules convert() reports as skipped when it does not convert them
_SKIPPED_KINDS = {
    _cbam.LightCbamModule: "LightCbamModule pools avg+max into one map (channel) and "
                           "one plane (spatial); the fused op keeps them apart",
}


def _hooked(m: nn.Module) -> str | None:
    for name, sub in m.named_modules():
        if sub is not m and (sub._forward_hooks or sub._forward_pre_hooks
                             or sub._backward_hooks or sub._backward_pre_hooks):
            return f"its submodule {name!r} has hooks, which the fused forward would not call"
    return None


def _conv_is(conv: nn.Module, k: int | None = None, padding=None) -> bool:
    return (type(conv) is nn.Conv2d and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros"
            and (k is None or conv.kernel_size == (k, k))
            and (padding is None or conv.padding == padding))


def _cbam_unsupported(m: _cbam.CbamModule) -> str | None:
    ch, sp = m.channel, m.spatial
    if type(ch) is not _cbam.ChannelAttn or type(sp) is not _cbam.SpatialAttn:
        return (f"channel/spatial are {type(ch).__name__}/{type(sp).__name__}, not "
                "ChannelAttn/SpatialAttn")
    if type(ch.act) is not nn.ReLU:
        return f"channel activation {type(ch.act).__name__} (the fused MLP uses ReLU)"
    for where, gate in (("channel", ch.gate), ("spatial", sp.gate)):
        if type(gate) not in _SIGMOIDS:
            return f"{where} gate {type(gate).__name__} (the fused op gates with sigmoid)"
    if not (_conv_is(ch.fc1, 1, (0, 0)) and _conv_is(ch.fc2, 1, (0, 0))):
        return "channel fc1/fc2 are not plain 1x1 convs (stride 1, no padding, groups 1)"
    cna = sp.conv
    if type(cna).__name__ != "ConvNormAct" or getattr(cna, "aa", None) is not None:
        return f"spatial conv is {type(cna).__name__} with anti-aliasing, not ConvNormAct"
    conv, bn = cna.conv, cna.bn
    k = conv.kernel_size[0] if isinstance(conv, nn.Conv2d) else 0
    if not (_conv_is(conv, k, (k // 2, k // 2)) and k % 2 == 1 and conv.in_channels == 2
            and conv.out_channels == 1):
        return (f"spatial conv {conv} is not a 2->1 odd k x k nn.Conv2d with static "
                "padding k//2 (e.g. dynamic 'same' padding)")
    if type(bn) not in (nn.BatchNorm2d, _BatchNormAct2d) or bn.num_features != 1:
        return f"spatial norm {type(bn).__name__} (the fused op takes BatchNorm2d(1))"
    if type(bn) is _BatchNormAct2d and (type(bn.act) is not nn.Identity
                                        or type(bn.drop) is not nn.Identity):
        return "spatial BatchNormAct2d applies an activation or dropout"
    return None


def unsupported(m: nn.Module) -> str | None:
    """Why ``m`` (a timm module of a kind convert() knows) cannot be converted exactly,
    or None when it can."""
    kind = type(m)
    if kind in _SKIPPED_KINDS:
        return _SKIPPED_KINDS[kind]
    if kind is _cbam.CbamModule:
        return _cbam_unsupported(m) or _hooked(m)
    if kind is _condconv.CondConv2d:
        return None  # static and dynamic ("same") padding, groups, bias: all exact
    if isinstance(m, (_cbam.CbamModule, _condconv.CondConv2d)) and kind not in TIMM_PAIRS:
        return f"{kind.__name__} subclasses timm's {kind.__mro__[1].__name__}; its forward " \
               "may differ"
    return None


def is_candidate(m: nn.Module) -> bool:
    """A timm module that convert() converts or reports as skipped."""
    return type(m) in TIMM_PAIRS or type(m) in _SKIPPED_KINDS or isinstance(
        m, (_cbam.CbamModule, _condconv.CondConv2d))


# Arguments the training CLI sets itself: they come from the data, and a checkpoint
# rebuilds its model from the saved arguments (a download would not be reproducible).
RESERVED_ARGS = ("num_classes", "in_chans", "pretrained")


def create_timm(name: str, num_classes: int, in_channels: int = 3, *, kernels: str = "fused",
                backend: str = "auto", timm_args: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(name, num_classes=..., in_chans=..., **timm_args)``, converted
    (``manet_kernels.convert``) to ``kernels``; ``cam_layer`` is set (not registered as a
    submodule, so the ``state_dict`` keys stay timm's) to the module of the last feature
    map (timm's ``feature_info``) for Grad-CAM."""
    from manet_kernels.models.convert import convert

    if timm_args is not None and not isinstance(timm_args, dict):
        raise TypeError(f"timm_args must be a dict of timm.create_model keyword arguments, "
                        f"got {type(timm_args).__name__}")
    timm_args = dict(timm_args or {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"timm model name must be a non-empty string, got {name!r}")
    reserved = sorted(set(timm_args) & set(RESERVED_ARGS))
    if reserved:
        raise ValueError(f"timm_args must not set {reserved}: the number of classes and of "
                         "input channels come from the data, and training starts from "
                         "scratch")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.7)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        raise ValueError(f"unknown timm model {name!r}{hint}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                  in_chans=in_channels, **timm_args)
    except TypeError as e:
        raise TypeError(f"timm.create_model({name!r}, **{timm_args}): {e}") from e
    convert(model, kernels=kernels, backend=backend)
    info = getattr(model, "feature_info", None)
    if info:
        module = model.get_submodule(info[-1]["module"])
        object.__setattr__(model, "cam_layer", module)  # a plain attribute, not a child
    return model
