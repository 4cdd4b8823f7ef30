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
from torch import Tensor

from manet_kernels.ops import _common
from manet_kernels.ops._boundary import Boundary, drop_in_function
from manet_kernels.ops._common import (
    CPP_PASSES,
    ComposedStages,
    activation_format,
    check_dtype,
    check_same_device,
    check_shape,
    resolve_backend,
    stage_kernels,
)
from manet_kernels.reference import mixed_attention as _reference
from manet_kernels.reference import passes as _torch_passes
from manet_kernels.reference import stages as _ref_stages
from manet_kernels.reference.passes import acc_dtype

__all__ = ["mixed_attention", "MixedAttentionFunction", "SpatialNorm", "check_args", "fused",
           "spatial_norm_of"]


class SpatialNorm(NamedTuple):
    """BatchNorm2d(1) applied to the spatial conv output ``(N, 1, H, W)``.

    ``training``: batch statistics (``mixed_attention_spatial_norm``, which also updates
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` in place when given),
    else the running ones."""
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    training: bool
    eps: float
    num_batches_tracked: Tensor | None = None
    momentum: float | None = None


def spatial_norm_of(bn, training: bool) -> SpatialNorm:
    """The ``SpatialNorm`` that computes what the ``nn.BatchNorm2d(1)`` module ``bn`` does
    in the given mode: batch statistics in training (or without running ones), the
    running statistics updated when it tracks them, else the running statistics."""
    batch_stats = training or bn.running_mean is None
    update = training and bn.track_running_stats
    keep = update or not batch_stats
    return SpatialNorm(bn.weight, bn.bias, bn.running_mean if keep else None,
                       bn.running_var if keep else None, batch_stats, bn.eps,
                       bn.num_batches_tracked if update else None, bn.momentum)


# The CUDA kernels for the k x k conv (csrc/cuda/mixed_attention.cu, spatial_conv_*)
# compile and were checked against the contract by a NumPy emulation of their index
# math, but have not run on a GPU yet: until the cuda cases of
# tests/test_mixed_attention_passes.py pass on one, the CUDA composition of the stages
# keeps cuDNN's conv (which the H100 run verified).
CUDA_SPATIAL_CONV_VERIFIED = False


class _CudaPasses:
    """The verified CUDA passes: the compiled ones, with ATen's conv for the spatial conv
    while ``CUDA_SPATIAL_CONV_VERIFIED`` is False (read at each call)."""

    def __getattr__(self, name: str):
        if name.startswith("mixed_attention_spatial_conv") and not CUDA_SPATIAL_CONV_VERIFIED:
            return getattr(_torch_passes, name)
        return getattr(CPP_PASSES, name)


_CUDA_COMPOSED = ComposedStages(_CudaPasses())


def _stages(backend: str, device_type: str):
    """The stage namespace (reference/stages.py names) the forward and backward call."""
    if backend == "cuda" and not _common.CUDA_STAGES_VERIFIED:
        return _CUDA_COMPOSED
    return stage_kernels(backend, "mixed_attention", device_type)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _params(acc, *ts):
    """``ts`` in the acc dtype (None stays None); as given when they already are."""
    for t in ts:
        if t is not None and t.dtype != acc:
            return tuple(_cast(t, acc) for t in ts)
    return ts


# ---------------------------------------------------------------------------
# The op boundary: manet_kernels::mixed_attention and its backward. The tiny parts
# compute in the accumulation dtype, which the stage kernels check: autocast (AMP) must
# not lower them to half precision (``x`` itself may be half: the kernels take a half
# ``x`` with float32 parameters), so each body reruns itself with autocast off.

def _forward(
        x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
        conv_w: Tensor, conv_b: Tensor | None, bn_weight: Tensor | None, bn_bias: Tensor | None,
        bn_mean: Tensor | None, bn_var: Tensor | None, bn_count: Tensor | None, has_norm: bool,
        bn_training: bool, bn_eps: float, bn_momentum: float | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Three stages (four with BatchNorm in training mode): channel attention, spatial
    attention, (batch norm,) apply. Returns ``(y, mc, ms, im, ic, avg, mx, sa, sm, z,
    bn_stats)``; everything but ``y`` is small (N*C or N*H*W) and kept for the backward.
    In training mode with ``bn_count`` given, the spatial BatchNorm's running statistics
    (``bn_mean``, ``bn_var``, ``bn_count``) are updated in place, on the device: only
    the direct path passes it (the registered op is functional, see ``fused``)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return _forward(x, w1, b1, w2, b2, conv_w, conv_b, bn_weight, bn_bias, bn_mean,
                            bn_var, bn_count, has_norm, bn_training, bn_eps, bn_momentum, backend)
    batch = has_norm and bn_training
    if batch and x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        raise ValueError("spatial BatchNorm in training mode needs more than one value "
                         f"(N*H*W > 1), got input of shape {tuple(x.shape)}")
    st = _stages(backend, device)
    acc = acc_dtype(x.dtype)
    x = x.contiguous(memory_format=activation_format(x))
    w1, b1, w2, b2, conv_w, conv_b = _params(acc, w1, b1, w2, b2, conv_w, conv_b)
    mc, avg, mx, im = st.mixed_attention_channel_attn(x, w1, b1, w2, b2)
    bw, bb, bm, bv = _params(acc, bn_weight, bn_bias, bn_mean, bn_var)
    ms, z, sa, sm, ic = st.mixed_attention_spatial_attn(
        x, mc, conv_w, conv_b, bw, bb, None if batch else bm, None if batch else bv,
        bn_eps, batch)
    if batch:  # running statistics updated in place when given with their count
        upd = bn_count is not None
        ms, stats = st.mixed_attention_spatial_norm(
            z, bw, bb, bn_mean if upd else None, bn_var if upd else None, bn_count,
            bn_momentum, bn_eps)
    else:
        stats = z.new_empty(0)
    y = st.mixed_attention_apply(x, mc, ms)
    return y, mc, ms, im, ic, avg, mx, sa, sm, z, stats


def _small_grad(t: Tensor | None, acc) -> Tensor | None:
    return None if t is None else _cast(t, acc).contiguous()


def _backward(
        gy: Tensor | None, gmc: Tensor | None, gms: Tensor | None, x: Tensor, mc: Tensor,
        ms: Tensor, im: Tensor, ic: Tensor, avg: Tensor, mx: Tensor, sa: Tensor, sm: Tensor,
        z: Tensor, stats: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
        conv_w: Tensor, conv_b: Tensor | None, bn_weight: Tensor | None, bn_bias: Tensor | None,
        bn_mean: Tensor | None, bn_var: Tensor | None, has_norm: bool, bn_training: bool,
        bn_eps: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Four stages (five with BatchNorm in training mode), the forward's in reverse.
    Returns ``(dx, dw1, db1, dw2, db2, dconv_w, dconv_b, dbn_weight, dbn_bias)``, each in
    its parameter's dtype; the gradient of an absent (None) parameter is None."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return _backward(gy, gmc, gms, x, mc, ms, im, ic, avg, mx, sa, sm, z, stats, w1,
                             b1, w2, b2, conv_w, conv_b, bn_weight, bn_bias, bn_mean, bn_var,
                             has_norm, bn_training, bn_eps, backend)
    st = _stages(backend, device)
    acc = mc.dtype
    fmt = activation_format(x)
    x = x.contiguous(memory_format=fmt)
    # y's gradient is None when only the maps are used (gradients are not materialised)
    g = torch.zeros_like(x) if gy is None else _cast(gy, x.dtype).contiguous(memory_format=fmt)
    gmc, gms = _small_grad(gmc, acc), _small_grad(gms, acc)
    w1a, b1a, w2a, cwa = _params(acc, w1, b1, w2, conv_w)
    bw = _cast(bn_weight, acc)

    dms, dmc = st.mixed_attention_bwd_reduce(g, x, mc, ms)
    if has_norm and bn_training:
        dz, dbn_w, dbn_b = st.mixed_attention_spatial_norm_bwd(
            dms, gms, ms, z, stats, bw, bn_bias is not None, bn_eps)
        da_s, dm_s, dconv_w, dconv_b, _, _ = st.mixed_attention_spatial_attn_bwd(
            dz, None, None, z, sa, sm, cwa, conv_b is not None, None, False, None, None,
            bn_eps)
    else:
        bm, bv = _params(acc, bn_mean, bn_var)
        da_s, dm_s, dconv_w, dconv_b, dbn_w, dbn_b = st.mixed_attention_spatial_attn_bwd(
            dms, gms, ms, z, sa, sm, cwa, conv_b is not None, bw, bn_bias is not None, bm, bv,
            bn_eps)
    d_avg, d_mx, dw1, db1, dw2, db2 = st.mixed_attention_channel_attn_bwd(
        x, da_s, dm_s, ic, dmc, gmc, mc, avg, mx, w1a, b1a, w2a, b2 is not None)
    dx = st.mixed_attention_bwd_dx(g, mc, ms, da_s, dm_s, ic, d_avg, d_mx, im)
    return (dx, _cast(dw1, w1.dtype), _grad_or_none(db1, b1), _cast(dw2, w2.dtype),
            _grad_or_none(db2, b2), _cast(dconv_w, conv_w.dtype), _grad_or_none(dconv_b, conv_b),
            _grad_or_none(dbn_w, bn_weight), _grad_or_none(dbn_b, bn_bias))


def _grad_or_none(g: Tensor, p: Tensor | None) -> Tensor | None:
    """A stage's gradient for parameter ``p`` (None when ``p`` is absent), in its dtype."""
    return None if p is None else _cast(g, p.dtype)


def _forward_fake(x, w1, b1, w2, b2, conv_w, conv_b, bn_weight, bn_bias, bn_mean, bn_var,
                  bn_count, has_norm, bn_training, bn_eps, bn_momentum, backend):
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    nc = x.new_empty((n, c), dtype=acc)
    nhw = x.new_empty((n, h, w), dtype=acc)
    y = torch.empty_like(x, memory_format=activation_format(x))
    stats = x.new_empty((2,) if has_norm and bn_training else (0,), dtype=acc)
    return (y, nc, nhw, nc.to(torch.int32), nhw.to(torch.int32), nc.clone(), nc.clone(),
            nhw.clone(), nhw.clone(), nhw.clone(), stats)


def _backward_fake(gy, gmc, gms, x, mc, ms, im, ic, avg, mx, sa, sm, z, stats, w1, b1, w2, b2,
                   conv_w, conv_b, bn_weight, bn_bias, bn_mean, bn_var, has_norm, bn_training,
                   bn_eps, backend):
    dx = torch.empty_like(x, memory_format=activation_format(x))
    return (dx,) + tuple(None if p is None else torch.empty_like(p)
                         for p in (w1, b1, w2, b2, conv_w, conv_b, bn_weight, bn_bias))


def _save(inputs, outputs):
    (x, w1, b1, w2, b2, conv_w, conv_b, bn_weight, bn_bias, bn_mean, bn_var, bn_count, has_norm,
     bn_training, bn_eps, bn_momentum, backend) = inputs
    if bn_training:  # batch statistics: the running ones (updated in place) are unused
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
    ``nn.MixedAttention``, as ``fused``). Arguments as a module holds them pass one
    expression (``_usual``); anything else gets the checks that name what is wrong."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"x must have C, H, W >= 1, got shape {tuple(x.shape)}")
    backend = resolve_backend(backend, x.device, "mixed_attention_apply")
    check_dtype("x", x, backend)
    if not _usual(x.device, c, w1, b1, w2, b2, conv_w, conv_b):
        _check_params(x.device, c, w1, b1, w2, b2, conv_w, conv_b)
    return backend


def _usual(device, c, w1, b1, w2, b2, conv_w, conv_b) -> bool:
    """The usual case at once: floating-point tensors of the expected shapes on
    ``device`` (no error message needed; False sends them to ``_check_params``)."""
    if (type(w1) not in _TENSORS or w1.dim() != 2 or type(conv_w) not in _TENSORS
            or conv_w.dim() != 4):
        return False
    cr = w1.shape[0]
    k = conv_w.shape[-1]
    return (w1.shape[1] == c and type(w2) in _TENSORS and w2.shape == (c, cr)
            and (b1 is None or type(b1) in _TENSORS and b1.shape == (cr,))
            and (b2 is None or type(b2) in _TENSORS and b2.shape == (c,))
            and conv_w.shape == (1, 2, k, k) and k % 2 == 1
            and (conv_b is None or type(conv_b) in _TENSORS and conv_b.shape == (1,))
            and all(p is None or (p.device == device and p.is_floating_point())
                    for p in (w1, b1, w2, b2, conv_w, conv_b)))


_TENSORS = (Tensor, torch.nn.Parameter)


def _check_params(device, c, w1, b1, w2, b2, conv_w, conv_b) -> None:
    """Raises the error that names what is wrong with the parameters."""
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
    check_same_device(device, **params)
    for name, p in params.items():
        if p is not None and not p.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")


_NO_NORM = SpatialNorm(None, None, None, None, False, 0.0)


def _op_args(x, w1, b1, w2, b2, conv_w, conv_b, norm: SpatialNorm | None, backend: str):
    nb = norm if norm is not None else _NO_NORM
    momentum = None if nb.momentum is None else float(nb.momentum)
    return (x, w1, b1, w2, b2, conv_w, conv_b, nb.weight, nb.bias, nb.running_mean,
            nb.running_var, nb.num_batches_tracked, norm is not None, nb.training,
            float(nb.eps), momentum, backend)


def fused(x, w1, b1, w2, b2, conv_w, conv_b, norm: SpatialNorm | None, backend: str,
          maps: bool = True):
    """The fused op with autograd on checked arguments (``check_args``); returns
    ``(y, mc, ms, bn_stats)`` with the maps in ``x``'s dtype (``ms`` as ``(N, 1, H, W)``)
    and the spatial BatchNorm's batch ``[mean, biased var]`` (empty unless it trains);
    ``maps=False``: ``mc`` and ``ms`` as the op returns them (``(N, C)``, ``(N, H, W)``,
    acc dtype), for a caller that drops them.

    A training BatchNorm's running statistics are updated on the device: inside the
    BatchNorm stage on the direct path; after the registered op (which is functional:
    torch.compile traces the update and fuses it) otherwise."""
    args = _op_args(x, w1, b1, w2, b2, conv_w, conv_b, norm, backend)
    late = norm is not None and norm.training and norm.running_mean is not None \
        and not _MIXED_ATTENTION.eager(args)
    if late:
        args = _op_args(x, w1, b1, w2, b2, conv_w, conv_b, norm._replace(
            running_mean=None, running_var=None, num_batches_tracked=None), backend)
    out = _MIXED_ATTENTION(*args)
    y, mc, ms, stats = out[0], out[1], out[2], out[10]
    if late:
        with torch.no_grad():
            _ref_stages.bn_running_update(norm.running_mean, norm.running_var,
                                          norm.num_batches_tracked, stats.detach(),
                                          norm.momentum, ms.numel())
    if maps:
        mc, ms = _cast(mc, x.dtype), _cast(ms.unsqueeze(1), x.dtype)
    return y, mc, ms, stats


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
    y, mc, ms, _ = fused(x, w1, b1, w2, b2, conv_w, conv_b, None, backend, return_maps)
    return (y, mc, ms) if return_maps else y


def _function_args(ctx, x, w1, b1, w2, b2, conv_w, conv_b=None):
    backend = check_args(x, w1, b1, w2, b2, conv_w, conv_b, "auto")
    backend = "torch" if backend == "reference" else backend  # the pass contract, through the op
    return _MIXED_ATTENTION, _op_args(x, w1, b1, w2, b2, conv_w, conv_b, None, backend)


MixedAttentionFunction = drop_in_function(
    "MixedAttentionFunction", """Drop-in ``torch.autograd.Function``:
    ``MixedAttentionFunction.apply(x, w1, b1, w2, b2, conv_w, conv_b)`` returns ``y``
    using the automatic backend.""", _function_args)
