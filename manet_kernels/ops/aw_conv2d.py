"""AW-convolution and per-sample convolution: public functions, checks, op bodies.

``aw_conv2d`` with ``attn`` broadcast over input channels runs the fused kernels,
which scale the shared weight by ``1 + attn[n]`` as it is loaded and never build the
``(N, C2, C1/g, kh, kw)`` per-sample weights (docs/design.md §2). ``attn`` of full
shape is already that size: it goes through ``per_sample_conv2d``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from manet_kernels.ops import _common
from manet_kernels.ops._boundary import Boundary, drop_in_function
from manet_kernels.ops._common import (
    activation_format,
    check_dtype,
    check_same_device,
    pass_kernels,
    resolve_backend,
)
from manet_kernels.reference import aw_conv2d as _reference
from manet_kernels.reference.passes import acc_dtype

__all__ = ["aw_conv2d", "per_sample_conv2d", "AWConv2dFunction", "PerSampleConv2dFunction"]

_CPU_DTYPES = (torch.float32, torch.float64)

def _cuda_v2(backend: str, x: Tensor) -> bool:
    """Whether the second CUDA kernels run (``_common.CUDA_AW_V2_VERIFIED``, read at each
    call: until their GPU tests pass, backend="cuda" runs the first, verified ones)."""
    return backend == "cuda" and _common.CUDA_AW_V2_VERIFIED and x.is_cuda


def _passes(backend: str, device: torch.device):
    """The pass kernels; on CUDA tensors the Triton backend keeps its first, GPU-verified
    kernels until the second ones pass their GPU tests (read at each call)."""
    if backend == "triton" and device.type == "cuda" and not _common.TRITON_AW_V2_VERIFIED:
        return pass_kernels(backend, "aw_conv2d_v1")
    return pass_kernels(backend, "aw_conv2d")


def _out_shape(x, kh, kw, c2, stride, padding, dilation):
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (x.shape[0], c2, ho, wo)


def _empty_out(x, shape):
    return torch.empty(shape, dtype=x.dtype, device=x.device).contiguous(
        memory_format=activation_format(x))


# ------------------------------------------------------------------------------- op bodies

def _aw_forward(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None,
                stride: list[int], padding: list[int], dilation: list[int], groups: int,
                backend: str) -> Tensor:
    """``y[n] = conv2d(x[n], weight * scale[n][:, None], bias)``, ``scale (N, C2, kh, kw)``."""
    x = x.contiguous(memory_format=activation_format(x))
    acc = acc_dtype(x.dtype)
    if x.shape[0] == 0:
        return _aw_fake(x, weight, scale, bias, stride, padding, dilation, groups, backend)
    b = None if bias is None else bias.to(acc)[None].expand(x.shape[0], -1).contiguous()
    passes = _passes(backend, x.device)
    fwd = passes.aw_conv2d_fwd_v2 if _cuda_v2(backend, x) else passes.aw_conv2d_fwd
    return fwd(x, weight.to(x.dtype).contiguous(), scale.to(acc).contiguous(), b, stride,
               padding, dilation, groups)


def _aw_fake(x, weight, scale, bias, stride, padding, dilation, groups, backend):
    return _empty_out(x, _out_shape(x, *weight.shape[2:], weight.shape[0], stride, padding,
                                    dilation))


def _aw_backward(g: Tensor, x: Tensor, weight: Tensor, scale: Tensor, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, backend: str,
                 has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dscale, dbias)``; ``dbias`` is ``(C2,)`` (empty without a bias)."""
    fmt = activation_format(x)
    x = x.contiguous(memory_format=fmt)
    g = g.to(x.dtype).contiguous(memory_format=fmt)
    acc = acc_dtype(x.dtype)
    if x.shape[0] == 0:
        return (torch.zeros_like(x), torch.zeros_like(weight), torch.zeros_like(scale),
                weight.new_zeros(weight.shape[0]) if has_bias else None)
    passes = _passes(backend, x.device)
    bwd = passes.aw_conv2d_bwd_v2 if _cuda_v2(backend, x) else passes.aw_conv2d_bwd
    dx, dw, ds = bwd(g, x, weight.to(x.dtype).contiguous(), scale.to(acc).contiguous(), stride,
                     padding, dilation, groups)
    db = g.sum((0, 2, 3), dtype=acc).to(weight.dtype) if has_bias else None
    return dx, dw.to(weight.dtype), ds.to(scale.dtype), db


def _aw_backward_fake(g, x, weight, scale, stride, padding, dilation, groups, backend,
                      has_bias):
    return (torch.empty_like(x, memory_format=activation_format(x)), torch.empty_like(weight),
            torch.empty_like(scale), weight.new_empty(weight.shape[0]) if has_bias else None)


def _ps_forward(x: Tensor, weights: Tensor, bias: Tensor | None, stride: list[int],
                padding: list[int], dilation: list[int], groups: int, backend: str) -> Tensor:
    """``y[n] = conv2d(x[n], weights[n], bias[n])``, ``bias (N, C2)`` or None."""
    x = x.contiguous(memory_format=activation_format(x))
    if x.shape[0] == 0:
        return _ps_fake(x, weights, bias, stride, padding, dilation, groups, backend)
    b = None if bias is None else bias.to(acc_dtype(x.dtype)).contiguous()
    return _passes(backend, x.device).per_sample_conv2d_fwd(
        x, weights.to(x.dtype).contiguous(), b, stride, padding, dilation, groups)


def _ps_fake(x, weights, bias, stride, padding, dilation, groups, backend):
    return _empty_out(x, _out_shape(x, *weights.shape[3:], weights.shape[1], stride, padding,
                                    dilation))


def _ps_backward(g: Tensor, x: Tensor, weights: Tensor, stride: list[int], padding: list[int],
                 dilation: list[int], groups: int, backend: str
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweights, dbias (N, C2))``."""
    fmt = activation_format(x)
    x = x.contiguous(memory_format=fmt)
    g = g.to(x.dtype).contiguous(memory_format=fmt)
    if x.shape[0] == 0:
        return (torch.zeros_like(x), torch.zeros_like(weights),
                weights.new_zeros(0, weights.shape[1]))
    dx, dw = _passes(backend, x.device).per_sample_conv2d_bwd(
        g, x, weights.to(x.dtype).contiguous(), stride, padding, dilation, groups)
    db = g.sum((2, 3), dtype=acc_dtype(x.dtype))
    return dx, dw.to(weights.dtype), db.to(weights.dtype)


def _ps_backward_fake(g, x, weights, stride, padding, dilation, groups, backend):
    return (torch.empty_like(x, memory_format=activation_format(x)), torch.empty_like(weights),
            weights.new_empty(x.shape[0], weights.shape[1]))


def _conv_flags(inputs):
    return tuple(inputs[-5:])  # stride, padding, dilation, groups, backend


_AW = Boundary("aw_conv2d", _aw_forward, _aw_backward, forward_fake=_aw_fake,
               backward_fake=_aw_backward_fake, grad_inputs=(0, 1, 2, 3),
               save=lambda i, o: (i[:3], (*_conv_flags(i), i[3] is not None)))
_PS = Boundary("per_sample_conv2d", _ps_forward, _ps_backward, forward_fake=_ps_fake,
               backward_fake=_ps_backward_fake, grad_inputs=(0, 1, 2),
               save=lambda i, o: (i[:2], _conv_flags(i)))


# ----------------------------------------------------------------------------- public API

def _pair(v, name: str, minimum: int) -> list[int]:
    vals = [v, v] if isinstance(v, int) else list(v) if isinstance(v, Sequence) else None
    if vals is None or len(vals) != 2 or not all(isinstance(i, int) and not isinstance(i, bool)
                                                 for i in vals):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(vals) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return vals


def _check_conv(x, c2, c1g, kh, kw, stride, padding, dilation, groups, wname):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C1, H, W), got shape {tuple(x.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride, padding, dilation = (_pair(stride, "stride", 1), _pair(padding, "padding", 0),
                                 _pair(dilation, "dilation", 1))
    c1 = x.shape[1]
    if c1 % groups or c2 % groups:
        raise ValueError(f"groups={groups} must divide both in_channels={c1} and "
                         f"out_channels={c2}")
    if c1g * groups != c1:
        raise ValueError(f"{wname} expects {c1g * groups} input channels (C1/groups={c1g}, "
                         f"groups={groups}) but x has {c1}")
    out = _out_shape(x, kh, kw, c2, stride, padding, dilation)
    if out[2] < 1 or out[3] < 1:
        raise ValueError(f"output would be empty: x {tuple(x.shape)}, kernel {(kh, kw)}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}")
    return stride, padding, dilation


def _backend_for(x, backend, *others):
    # On GPU "auto" means Triton: on an H100 (2026-11-23, bf16, batch 64) the Triton
    # kernels ran a 3x3 AW-conv forward+backward 5x faster than the CUDA ones
    # (benchmarks/results/profile_device_h100.txt).
    backend = resolve_backend(backend, x.device, "aw_conv2d_fwd", cuda_auto="triton")
    check_dtype("x", x, backend)
    if backend == "cpu" and x.dtype not in _CPU_DTYPES:
        raise TypeError(f"x must be float32 or float64 for backend='cpu', got {x.dtype}")
    for name, t in others:
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    check_same_device(x.device, **dict(others))
    return backend


def _cpu_autocast_to_float32(x) -> bool:
    """CPU autocast (AMP) hands the layer bfloat16/float16 activations, which the C++ CPU
    kernels do not take: they compute in float32 and the result returns in x's dtype."""
    return (isinstance(x, Tensor) and x.device.type == "cpu"
            and x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled("cpu"))


def _float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def _check_aw(x, weight, attn, bias, stride, padding, dilation, groups):
    """Validated ``(stride, padding, dilation)`` as pairs."""
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError("weight must be 4-D (C2, C1/groups, kh, kw), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else weight!r}")
    c2, c1g, kh, kw = weight.shape
    conv = _check_conv(x, c2, c1g, kh, kw, stride, padding, dilation, groups, "weight")
    n = x.shape[0]
    if not isinstance(attn, Tensor) or attn.dim() != 5 or tuple(attn.shape) not in (
            (n, c2, 1, kh, kw), (n, c2, c1g, kh, kw)):
        raise ValueError(f"attn must be (N, C2, 1, kh, kw) = {(n, c2, 1, kh, kw)} or "
                         f"(N, C2, C1/groups, kh, kw) = {(n, c2, c1g, kh, kw)}, got "
                         f"{tuple(attn.shape) if isinstance(attn, Tensor) else attn!r}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (c2,)):
        raise ValueError(f"bias must be None or ({c2},), got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else bias!r}")
    return conv


def _check_ps(x, weights, bias, stride, padding, dilation, groups):
    """Validated ``(stride, padding, dilation)`` as pairs."""
    if not isinstance(weights, Tensor) or weights.dim() != 5:
        raise ValueError("weights must be 5-D (N, C2, C1/groups, kh, kw), got "
                         f"{tuple(weights.shape) if isinstance(weights, Tensor) else weights!r}")
    _, c2, c1g, kh, kw = weights.shape
    conv = _check_conv(x, c2, c1g, kh, kw, stride, padding, dilation, groups, "weights")
    n = x.shape[0]
    if weights.shape[0] != n:
        raise ValueError(f"weights must have one kernel per sample: {n} samples in x, "
                         f"{weights.shape[0]} in weights")
    if bias is not None and (not isinstance(bias, Tensor)
                             or tuple(bias.shape) not in ((c2,), (n, c2))):
        raise ValueError(f"bias must be None, ({c2},) or ({n}, {c2}), got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else bias!r}")
    return conv


def _aw_route(x, weight, attn, bias, conv, groups, backend):
    """The boundary and its arguments: the fused AW op for ``attn`` shared over input
    channels, else the per-sample op (``attn`` of full shape is already as large as the
    per-sample weights)."""
    if attn.shape[2] != 1 or weight.shape[1] == 1:
        b = None if bias is None else bias[None].expand(x.shape[0], -1)
        return _PS, (x, weight[None] * (1 + attn), b, *conv, groups, backend)
    return _AW, (x, weight, (1 + attn).squeeze(2), bias, *conv, groups, backend)


def aw_conv2d(x: Tensor, weight: Tensor, attn: Tensor, bias: Tensor | None = None, stride=1,
              padding=0, dilation=1, groups: int = 1, *, backend: str = "auto") -> Tensor:
    """AW-convolution: ``y[n] = conv2d(x[n], weight * (1 + attn[n]), bias, ...)``.

    ``weight (C2, C1/groups, kh, kw)``; ``attn (N, C2, 1, kh, kw)`` (the paper's
    setting, shared over input channels: fused, the per-sample weights are never
    built) or ``(N, C2, C1/groups, kh, kw)``; ``bias (C2,)`` or None. ``stride``,
    ``padding``, ``dilation``: ints or pairs, as ``F.conv2d``.
    """
    conv = _check_aw(x, weight, attn, bias, stride, padding, dilation, groups)
    if _cpu_autocast_to_float32(x) and resolve_backend(backend, x.device,
                                                        "aw_conv2d_fwd") == "cpu":
        with torch.autocast("cpu", enabled=False):
            return aw_conv2d(x.float(), _float(weight), _float(attn), _float(bias), *conv,
                             groups, backend="cpu").to(x.dtype)
    backend = _backend_for(x, backend, ("weight", weight), ("attn", attn), ("bias", bias))
    if backend == "reference":
        return _reference.aw_conv2d(x, weight, attn, bias, *conv, groups)
    boundary, args = _aw_route(x, weight, attn, bias, conv, groups, backend)
    return boundary(*args)


def per_sample_conv2d(x: Tensor, weights: Tensor, bias: Tensor | None = None, stride=1,
                      padding=0, dilation=1, groups: int = 1, *,
                      backend: str = "auto") -> Tensor:
    """``y[n] = conv2d(x[n], weights[n], bias, ...)`` with ``weights (N, C2, C1/groups, kh,
    kw)`` and ``bias`` None, ``(C2,)`` or ``(N, C2)``."""
    conv = _check_ps(x, weights, bias, stride, padding, dilation, groups)
    if _cpu_autocast_to_float32(x) and resolve_backend(backend, x.device,
                                                        "per_sample_conv2d_fwd") == "cpu":
        with torch.autocast("cpu", enabled=False):
            return per_sample_conv2d(x.float(), _float(weights), _float(bias), *conv, groups,
                                     backend="cpu").to(x.dtype)
    backend = _backend_for(x, backend, ("weights", weights), ("bias", bias))
    if backend == "reference":
        return _reference.per_sample_conv2d(x, weights, bias, *conv, groups)
    if bias is not None and bias.dim() == 1:
        bias = bias[None].expand(x.shape[0], -1)
    return _PS(x, weights, bias, *conv, groups, backend)


# ------------------------------------------------------------------ drop-in autograd.Functions

def _function_backend(kernel, x, **others):
    """The drop-ins' automatic backend, ``x`` and ``others``; CPU autocast's half inputs
    are computed in float32 as the functions do (the Function casts its output back)."""
    if _cpu_autocast_to_float32(x) and resolve_backend("auto", x.device, kernel) == "cpu":
        return "cpu", x.float(), [_float(t) for t in others.values()]
    backend = _backend_for(x, "auto", *others.items())
    return ("torch" if backend == "reference" else backend), x, list(others.values())


def _aw_function_args(ctx, x, weight, attn, bias=None, stride=1, padding=0, dilation=1,
                      groups=1):
    conv = _check_aw(x, weight, attn, bias, stride, padding, dilation, groups)
    backend, x, (weight, attn, bias) = _function_backend("aw_conv2d_fwd", x, weight=weight,
                                                         attn=attn, bias=bias)
    boundary, args = _aw_route(x, weight, attn, bias, conv, groups, backend)
    ctx.factors = (weight, attn) if boundary is _PS else None
    return boundary, args


def _aw_function_grads(ctx, grads):
    """Back through the tiny parts ``1 + attn`` (or ``weight * (1 + attn)`` on the
    per-sample route) that the Function computed before the op."""
    if ctx.factors is None:
        dx, dw, dscale, db = grads[:4]
        return dx, dw, None if dscale is None else dscale.unsqueeze(2), db
    weight, attn = ctx.factors
    dx, dws, db = grads[:3]
    dw = None if dws is None else (dws * (1 + attn)).sum(0)
    da = None if dws is None else dws * weight[None]
    return dx, dw, da, None if db is None else db.sum(0)


AWConv2dFunction = drop_in_function(
    "AWConv2dFunction", """Drop-in ``torch.autograd.Function``: ``AWConv2dFunction.apply(x,
    weight, attn, bias=None, stride=1, padding=0, dilation=1, groups=1)`` (automatic
    backend).""", _aw_function_args, grads=_aw_function_grads)


def _ps_function_args(ctx, x, weights, bias=None, stride=1, padding=0, dilation=1, groups=1):
    conv = _check_ps(x, weights, bias, stride, padding, dilation, groups)
    backend, x, (weights, bias) = _function_backend("per_sample_conv2d_fwd", x,
                                                    weights=weights, bias=bias)
    ctx.shared_bias = bias is not None and bias.dim() == 1
    if ctx.shared_bias:
        bias = bias[None].expand(x.shape[0], -1)
    return _PS, (x, weights, bias, *conv, groups, backend)


def _ps_function_grads(ctx, grads):
    dx, dw, db = grads[:3]
    return dx, dw, (db.sum(0) if ctx.shared_bias and db is not None else db)


PerSampleConv2dFunction = drop_in_function(
    "PerSampleConv2dFunction", """Drop-in ``torch.autograd.Function``:
    ``PerSampleConv2dFunction.apply(x, weights, bias=None, stride=1, padding=0, dilation=1,
    groups=1)`` (automatic backend).""", _ps_function_args, grads=_ps_function_grads)
