"""Fused mixed attention: public function, argument checks, forward/backward bodies.

Forward = 3 fused passes over ``x`` (docs/design.md §1) with the tiny parts
(shared MLP, k x k conv on the 2-channel map, optional BatchNorm, sigmoids) in
PyTorch between them; backward = 3 fused passes. The whole forward is one
registered op (``manet_kernels::mixed_attention``) and so is the whole backward
(``manet_kernels::mixed_attention_backward``), so torch.compile sees one opaque
node each way and ``torch.library.opcheck`` can check both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from manet_kernels import _ext
from manet_kernels.ops._boundary import Boundary, drop_in_function
from manet_kernels.ops._common import (
    CPP_PASSES,
    activation_format,
    check_dtype,
    check_same_device,
    check_shape,
    pass_kernels,
    resolve_backend,
)
from manet_kernels.reference import mixed_attention as _reference
from manet_kernels.reference import passes as _torch_passes
from manet_kernels.reference.passes import acc_dtype

__all__ = ["mixed_attention", "MixedAttentionFunction", "SpatialNorm", "check_args", "fused"]


class SpatialNorm(NamedTuple):
    """BatchNorm2d(1) applied to the spatial conv output, between passes."""
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    training: bool
    eps: float


def _passes(backend: str):
    return pass_kernels(backend, "mixed_attention")


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


# ---------------------------------------------------------------------------
# Tiny parts (size N*C or N*H*W), in the accumulation dtype.

def _mlp_fwd(v, w1, b1, w2, b2):
    h = F.linear(v, w1, b1)
    return F.linear(F.relu(h), w2, b2), h


def _mlp_bwd(dl, v, h, w1, w2):
    """Grads of ``w2 @ relu(w1 @ v + b1) + b2`` for the stacked rows ``v = [avg; max]``
    (2N rows) when both halves get the same upstream gradient ``dl`` (N rows), as the
    sum ``mlp(avg) + mlp(max)`` gives them: the products with ``dl`` are taken once."""
    n = dl.shape[0]
    r = F.relu(h)
    dr = dl @ w2
    dh = torch.ops.aten.threshold_backward(torch.cat([dr, dr]), h, 0)
    dw2 = dl.t() @ (r[:n] + r[n:])
    return dh @ w1, dh.t() @ v, dh.sum(0), dw2, 2 * dl.sum(0)  # dv, dw1, db1, dw2, db2


def _normalize(z, norm: SpatialNorm, stats):
    """The BatchNorm's normalised input and inverse std, from the batch statistics
    ``stats = [mean, biased var]`` in training mode or the running ones otherwise."""
    mean, var = (stats[0], stats[1]) if norm.training else (norm.running_mean[0],
                                                            norm.running_var[0])
    rstd = torch.rsqrt(var + norm.eps)
    return (z - mean) * rstd, rstd


# The CUDA kernels for the k x k conv (csrc/cuda/mixed_attention.cu, spatial_conv_*)
# compile and were checked against the contract by a NumPy emulation of their index
# math, but have not run on a GPU yet: until the cuda cases of tests/test_mixed_attention_passes.py
# pass on one, the fused op keeps cuDNN's conv there (which the H100 run verified).
CUDA_SPATIAL_CONV_VERIFIED = False


def _conv_passes(device: torch.device, backend: str):
    """Where the k x k conv on the [mean, max] map runs: the extension's kernel when it
    has one for the device (ATen's conv pays im2col/oneDNN setup on CPU that dwarfs
    2*k*k MACs per position; on GPU cuDNN's weight-gradient kernel alone took 0.086 ms
    of a 0.82 ms H100 step), else ATen's conv. The "torch" backend is the pure-PyTorch
    contract throughout."""
    if backend == "torch" or (device.type == "cuda" and not CUDA_SPATIAL_CONV_VERIFIED):
        return _torch_passes
    if _ext.has_kernel("mixed_attention_spatial_conv", device.type):
        return CPP_PASSES
    return _torch_passes


def _spatial_fwd(sa, sm, conv_w, conv_b, norm: SpatialNorm | None, backend: str):
    """``ms = sigmoid(BN(conv(cat[sa, sm])))``; also the conv output ``z`` and the batch
    statistics (mean, biased var) the backward and the running-stat update need."""
    z = _conv_passes(sa.device, backend).mixed_attention_spatial_conv(sa, sm, conv_w, conv_b)
    stats = z.new_empty(0)
    a = z
    if norm is not None:
        if norm.training:
            if z.numel() <= 1:
                raise ValueError("spatial BatchNorm in training mode needs more than one "
                                 f"value (N*H*W > 1), got input of shape {tuple(z.shape)}")
            stats = torch.stack([z.mean(), z.var(unbiased=False)])
        a = _normalize(z, norm, stats)[0]
        if norm.weight is not None:
            a = a * norm.weight[0]
        if norm.bias is not None:
            a = a + norm.bias[0]
    return torch.sigmoid(a), z, stats


def _no_autocast(fn):
    """The tiny parts between the passes compute in the accumulation dtype, which the
    pass kernels check: autocast (AMP) must not lower them to half precision. ``x``
    itself may be half: the kernels take a half ``x`` with float32 parameters."""
    def wrapper(*args):
        device = next(a for a in args if a is not None).device.type  # gy may be None
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return fn(*args)
        return fn(*args)
    return wrapper


@_no_autocast
def _forward_impl(x, w1, b1, w2, b2, conv_w, conv_b, norm: SpatialNorm | None, backend: str):
    kern = _passes(backend)
    acc = acc_dtype(x.dtype)
    x = x.contiguous(memory_format=activation_format(x))
    w1, b1, w2, b2 = (_cast(t, acc) for t in (w1, b1, w2, b2))
    avg, mx, im = kern.mixed_attention_channel_pool(x)
    o = _mlp_fwd(torch.cat([avg, mx]), w1, b1, w2, b2)[0]  # the shared MLP, both rows at once
    n = avg.shape[0]
    mc = torch.sigmoid(o[:n] + o[n:])
    sa, sm, ic = kern.mixed_attention_spatial_pool(x, mc)
    ms, z, stats = _spatial_fwd(sa, sm, conv_w.to(acc), _cast(conv_b, acc),
                                _norm_cast(norm, acc), backend)
    y = kern.mixed_attention_apply(x, mc, ms)
    return y, mc, ms, im, ic, avg, mx, sa, sm, z, stats


def _norm_cast(norm: SpatialNorm | None, acc) -> SpatialNorm | None:
    if norm is None:
        return None
    return SpatialNorm(*(_cast(t, acc) for t in norm[:4]), norm.training, norm.eps)


@_no_autocast
def _backward_impl(gy, gmc, gms, x, mc, ms, im, ic, avg, mx, sa, sm, z, stats,
                   w1, b1, w2, b2, conv_w, conv_b, norm: SpatialNorm | None, backend: str):
    kern = _passes(backend)
    acc = mc.dtype
    fmt = activation_format(x)
    x = x.contiguous(memory_format=fmt)
    # y's gradient is None when only the maps are used (gradients are not materialised)
    g = torch.zeros_like(x) if gy is None else gy.to(x.dtype).contiguous(memory_format=fmt)
    w1a, b1a, w2a, b2a = (_cast(t, acc) for t in (w1, b1, w2, b2))
    cwa = conv_w.to(acc)
    norm_a = _norm_cast(norm, acc)

    # B1: sum_c g*mc*x and sum_p g*ms*x in one pass.
    dms, dmc = kern.mixed_attention_bwd_reduce(g, x, mc, ms)
    if gms is not None:
        dms = dms + gms.to(acc)
    if gmc is not None:
        dmc = dmc + gmc.to(acc)

    # Tiny: back through sigmoid, BatchNorm and the conv.
    dz = torch.ops.aten.sigmoid_backward(dms, ms)
    dbn_w = dbn_b = None
    if norm_a is not None:
        zh, rstd = _normalize(z, norm_a, stats)
        if norm_a.weight is not None:
            dbn_w = (dz * zh).sum().reshape(1)
        if norm_a.bias is not None:
            dbn_b = dz.sum().reshape(1)
        dzh = dz * norm_a.weight[0] if norm_a.weight is not None else dz
        if norm_a.training:
            dz = rstd * (dzh - dzh.mean() - zh * (dzh * zh).mean())
        else:
            dz = dzh * rstd
    da_s, dm_s, dconv_w, dconv_b = _conv_passes(
        x.device, backend).mixed_attention_spatial_conv_bwd(dz, sa, sm, cwa, conv_b is not None)
    if conv_b is None:
        dconv_b = None

    # B2: the part of d(mc) that flows through the spatial pooling.
    dmc = dmc + kern.mixed_attention_bwd_channel(x, da_s, dm_s, ic)

    # Tiny: back through the channel sigmoid and the shared MLP (avg and max rows).
    dlogit = torch.ops.aten.sigmoid_backward(dmc, mc)
    rows = torch.cat([avg, mx], 0)
    h = F.linear(rows, w1a, b1a)
    dv, dw1, db1, dw2, db2 = _mlp_bwd(dlogit, rows, h, w1a, w2a)
    n = avg.shape[0]
    d_avg, d_mx = dv[:n].contiguous(), dv[n:].contiguous()

    # B3: dx.
    dx = kern.mixed_attention_bwd_dx(g, mc, ms, da_s, dm_s, ic, d_avg, d_mx, im)

    def like(grad, p):
        return None if p is None else grad.to(p.dtype)

    return (dx, like(dw1, w1), like(db1, b1), like(dw2, w2), like(db2, b2),
            like(dconv_w, conv_w), like(dconv_b, conv_b),
            like(dbn_w, norm.weight if norm else None), like(dbn_b, norm.bias if norm else None))


# ---------------------------------------------------------------------------
# The op boundary: manet_kernels::mixed_attention and its backward.

def _norm_from_args(bn_weight, bn_bias, bn_mean, bn_var, bn_training, bn_eps, has_norm):
    if not has_norm:
        return None
    return SpatialNorm(bn_weight, bn_bias, bn_mean, bn_var, bn_training, bn_eps)


def _forward(
        x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
        conv_w: Tensor, conv_b: Tensor | None, bn_weight: Tensor | None, bn_bias: Tensor | None,
        bn_mean: Tensor | None, bn_var: Tensor | None, has_norm: bool, bn_training: bool,
        bn_eps: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, mc, ms, im, ic, avg, mx, sa, sm, z, bn_stats)``; everything but
    ``y`` is small (N*C or N*H*W) and kept for the backward."""
    norm = _norm_from_args(bn_weight, bn_bias, bn_mean, bn_var, bn_training, bn_eps, has_norm)
    return _forward_impl(x, w1, b1, w2, b2, conv_w, conv_b, norm, backend)


def _forward_fake(x, w1, b1, w2, b2, conv_w, conv_b, bn_weight, bn_bias, bn_mean, bn_var,
                  has_norm, bn_training, bn_eps, backend):
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    nc = x.new_empty((n, c), dtype=acc)
    nhw = x.new_empty((n, h, w), dtype=acc)
    y = torch.empty_like(x, memory_format=activation_format(x))
    stats = x.new_empty((2,) if has_norm and bn_training else (0,), dtype=acc)
    return (y, nc, nhw, nc.to(torch.int32), nhw.to(torch.int32), nc.clone(), nc.clone(),
            nhw.clone(), nhw.clone(), nhw.clone(), stats)


def _backward(
        gy: Tensor | None, gmc: Tensor | None, gms: Tensor | None, x: Tensor, mc: Tensor,
        ms: Tensor, im: Tensor, ic: Tensor, avg: Tensor, mx: Tensor, sa: Tensor, sm: Tensor,
        z: Tensor, stats: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
        conv_w: Tensor, conv_b: Tensor | None, bn_weight: Tensor | None, bn_bias: Tensor | None,
        bn_mean: Tensor | None, bn_var: Tensor | None, has_norm: bool, bn_training: bool,
        bn_eps: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dw1, db1, dw2, db2, dconv_w, dconv_b, dbn_weight, dbn_bias)``;
    the gradient of an absent (None) parameter is an empty tensor."""
    norm = _norm_from_args(bn_weight, bn_bias, bn_mean, bn_var, bn_training, bn_eps, has_norm)
    return _backward_impl(gy, gmc, gms, x, mc, ms, im, ic, avg, mx, sa, sm, z, stats,
                          w1, b1, w2, b2, conv_w, conv_b, norm, backend)


def _backward_fake(gy, gmc, gms, x, mc, ms, im, ic, avg, mx, sa, sm, z, stats, w1, b1, w2, b2,
                   conv_w, conv_b, bn_weight, bn_bias, bn_mean, bn_var, has_norm, bn_training,
                   bn_eps, backend):
    dx = torch.empty_like(x, memory_format=activation_format(x))
    return (dx,) + tuple(None if p is None else torch.empty_like(p)
                         for p in (w1, b1, w2, b2, conv_w, conv_b, bn_weight, bn_bias))


def _save(inputs, outputs):
    (x, w1, b1, w2, b2, conv_w, conv_b, bn_weight, bn_bias, bn_mean, bn_var, has_norm,
     bn_training, bn_eps, backend) = inputs
    if bn_training:  # batch statistics: the running ones (updated in place later) are unused
        bn_mean = bn_var = None
    return ((x, *outputs[1:11], w1, b1, w2, b2, conv_w, conv_b, bn_weight, bn_bias, bn_mean,
             bn_var), (has_norm, bn_training, bn_eps, backend))


# gradients for x, w1, b1, w2, b2, conv_w, conv_b, bn_weight, bn_bias, from those of
# y, mc and ms
_MIXED_ATTENTION = Boundary("mixed_attention", _forward, _backward, forward_fake=_forward_fake,
                            backward_fake=_backward_fake, save=_save, grad_inputs=range(9),
                            grad_outputs=3)


# ---------------------------------------------------------------------------
# Public API.

def check_args(x, w1, b1, w2, b2, conv_w, conv_b, backend) -> str:
    """Checks the arguments; returns the concrete backend (internal API of the module
    ``nn.MixedAttention``, as ``fused``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"x must have C, H, W >= 1, got shape {tuple(x.shape)}")
    backend = resolve_backend(backend, x.device, "mixed_attention_apply")
    check_dtype("x", x, backend)
    if not isinstance(w1, Tensor) or w1.dim() != 2:
        raise ValueError(f"w1 must be a 2-D tensor (C_r, C), got "
                         f"{tuple(w1.shape) if isinstance(w1, Tensor) else type(w1).__name__}")
    cr = w1.shape[0]
    check_shape("w1", w1, (cr, c))
    check_shape("b1", b1, (cr,), optional=True)
    check_shape("w2", w2, (c, cr))
    check_shape("b2", b2, (c,), optional=True)
    if not isinstance(conv_w, Tensor) or conv_w.dim() != 4 or tuple(conv_w.shape[:2]) != (1, 2) \
            or conv_w.shape[2] != conv_w.shape[3]:
        raise ValueError("conv_w must have shape (1, 2, k, k), got "
                         f"{tuple(conv_w.shape) if isinstance(conv_w, Tensor) else conv_w}")
    if conv_w.shape[-1] % 2 == 0:
        raise ValueError(f"conv_w must have an odd kernel size k (padding k//2 keeps H, W), "
                         f"got k={conv_w.shape[-1]}")
    check_shape("conv_b", conv_b, (1,), optional=True)
    params = dict(w1=w1, b1=b1, w2=w2, b2=b2, conv_w=conv_w, conv_b=conv_b)
    check_same_device(x.device, **params)
    for name, p in params.items():
        if p is not None and not p.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
    return backend


def _op_args(x, w1, b1, w2, b2, conv_w, conv_b, norm: SpatialNorm | None, backend: str):
    nb = norm if norm is not None else SpatialNorm(None, None, None, None, False, 0.0)
    return (x, w1, b1, w2, b2, conv_w, conv_b, nb.weight, nb.bias, nb.running_mean,
            nb.running_var, norm is not None, nb.training, float(nb.eps), backend)


def fused(x, w1, b1, w2, b2, conv_w, conv_b, norm: SpatialNorm | None, backend: str):
    """The fused op with autograd on checked arguments (``check_args``); returns
    ``(y, mc, ms, bn_stats)`` with the maps in ``x``'s dtype (``ms`` as ``(N, 1, H, W)``)
    and the spatial BatchNorm's batch ``[mean, biased var]`` (empty unless it trains)."""
    y, mc, ms, *_, stats = _MIXED_ATTENTION(*_op_args(x, w1, b1, w2, b2, conv_w, conv_b, norm,
                                                      backend))
    return y, mc.to(x.dtype), ms.unsqueeze(1).to(x.dtype), stats


def mixed_attention(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                    conv_w: Tensor, conv_b: Tensor | None = None, *, backend: str = "auto",
                    return_maps: bool = False):
    """Channel attention then spatial attention, fused (CBAM / MANet).

    ``mc = sigmoid(mlp(avg_hw x) + mlp(max_hw x))`` with
    ``mlp(v) = w2 @ relu(w1 @ v + b1) + b2``; ``x1 = mc * x``;
    ``ms = sigmoid(conv2d(cat[mean_c x1, max_c x1], conv_w, conv_b, padding=k//2))``;
    ``y = ms * x1``.

    Args:
        x: ``(N, C, H, W)``; NCHW, channels_last or any strided view.
        w1, b1: ``(C_r, C)``, ``(C_r,)`` or None. w2, b2: ``(C, C_r)``, ``(C,)`` or None.
        conv_w: ``(1, 2, k, k)`` with k odd; conv_b: ``(1,)`` or None.
        backend: "auto", "reference", "cpu", "cuda" or "triton" (``"auto"`` honours
            ``$MANET_KERNELS_BACKEND``).
        return_maps: also return ``mc (N, C)`` and ``ms (N, 1, H, W)``.
    """
    backend = check_args(x, w1, b1, w2, b2, conv_w, conv_b, backend)
    if backend == "reference":
        return _reference.mixed_attention(x, w1, b1, w2, b2, conv_w, conv_b,
                                          return_maps=return_maps)
    y, mc, ms, _ = fused(x, w1, b1, w2, b2, conv_w, conv_b, None, backend)
    return (y, mc, ms) if return_maps else y


def _function_args(ctx, x, w1, b1, w2, b2, conv_w, conv_b=None):
    backend = check_args(x, w1, b1, w2, b2, conv_w, conv_b, "auto")
    backend = "torch" if backend == "reference" else backend  # the pass contract, through the op
    return _MIXED_ATTENTION, _op_args(x, w1, b1, w2, b2, conv_w, conv_b, None, backend)


MixedAttentionFunction = drop_in_function(
    "MixedAttentionFunction", """Drop-in ``torch.autograd.Function``:
    ``MixedAttentionFunction.apply(x, w1, b1, w2, b2, conv_w, conv_b)`` returns ``y``
    using the automatic backend.""", _function_args)
