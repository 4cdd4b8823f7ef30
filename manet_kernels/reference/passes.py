"""Pure-PyTorch definitions of every fused pass.

This file is the contract the C++ / CUDA / Triton pass kernels implement, and
the oracle their unit tests compare with. Each function mirrors one schema in
``csrc/manet_kernels.cpp``. Conventions shared by every backend:

* ``x``, ``g``: ``(N, C, H, W)`` activations, NCHW- or channels_last-contiguous.
* ``acc`` dtype: ``float64`` when ``x`` is ``float64``, ``float32`` otherwise.
  Every small tensor passed in or returned is contiguous in ``acc`` dtype, and
  every reduction accumulates in it.
* index tensors are ``int32`` (BR-NPA's representative positions ``idx``: ``int64``);
  on ties the *first* maximum wins (lowest index), as ``torch.max(dim)`` documents.
* ``P = H * W``; positions are flattened row-major, ``p = h * W + w``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_x(t: Tensor, x: Tensor) -> Tensor:
    """``t`` cast to ``x``'s dtype, in ``x``'s memory format."""
    fmt = torch.channels_last if (not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)) else torch.contiguous_format
    return t.to(x.dtype).contiguous(memory_format=fmt)


def _first_max(v: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    # torch.max(dim) returns the first maximal index on every device.
    val, idx = torch.max(v, dim=dim)
    return val, idx.to(torch.int32)


def mixed_attention_channel_pool(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """F1: ``avg[n,c] = mean_p x``, ``mx[n,c] = max_p x``, ``im[n,c] = argmax_p x``."""
    n, c, h, w = x.shape
    xa = x.to(acc_dtype(x.dtype)).reshape(n, c, h * w)
    mx, im = _first_max(xa, 2)
    return xa.mean(2), mx, im


def mixed_attention_spatial_pool(x: Tensor, mc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """F2: with ``x1 = mc[n,c] * x``: ``sa = mean_c x1``, ``sm = max_c x1``,
    ``ic = argmax_c x1``; each ``(N, H, W)``."""
    x1 = x.to(mc.dtype) * mc[:, :, None, None]
    sm, ic = _first_max(x1, 1)
    return x1.mean(1), sm, ic


def mixed_attention_apply(x: Tensor, mc: Tensor, ms: Tensor) -> Tensor:
    """F3: ``y = x * mc[n,c] * ms[n,h,w]`` computed in acc dtype, returned in
    ``x``'s dtype and memory format."""
    y = x.to(mc.dtype) * mc[:, :, None, None] * ms[:, None]
    return _like_x(y, x)


def mixed_attention_bwd_reduce(g: Tensor, x: Tensor, mc: Tensor,
                               ms: Tensor) -> tuple[Tensor, Tensor]:
    """B1: ``dms[n,h,w] = sum_c g*mc*x`` and ``dmc[n,c] = sum_p g*ms*x``."""
    gx = g.to(mc.dtype) * x.to(mc.dtype)
    dms = (gx * mc[:, :, None, None]).sum(1)
    dmc = (gx * ms[:, None]).sum((2, 3))
    return dms, dmc


def mixed_attention_bwd_channel(x: Tensor, da_s: Tensor, dm_s: Tensor, ic: Tensor) -> Tensor:
    """B2: ``dmc[n,c] = sum_p (da_s[n,p] / C) * x[n,c,p]
    + sum_{p : ic[n,p] == c} dm_s[n,p] * x[n,c,p]``."""
    n, c, h, w = x.shape
    xa = x.to(da_s.dtype)
    dense = (xa * (da_s / c)[:, None]).sum((2, 3))
    picked = xa.gather(1, ic.long()[:, None]).squeeze(1)  # x[n, ic[n,p], p]
    sparse = torch.zeros_like(dense).scatter_add_(
        1, ic.long().reshape(n, h * w), (dm_s * picked).reshape(n, h * w))
    return dense + sparse


def mixed_attention_bwd_dx(g: Tensor, mc: Tensor, ms: Tensor, da_s: Tensor, dm_s: Tensor,
                           ic: Tensor, d_avg: Tensor, d_mx: Tensor, im: Tensor) -> Tensor:
    """B3: ``dx = mc*(g*ms + da_s/C + dm_s*[c == ic]) + d_avg/P + d_mx*[p == im]``,
    returned in ``g``'s dtype and memory format."""
    n, c, h, w = g.shape
    p = h * w
    chan = torch.arange(c, device=g.device)[None, :, None, None]
    inner = (g.to(mc.dtype) * ms[:, None] + (da_s / c)[:, None]
             + dm_s[:, None] * (chan == ic[:, None]).to(mc.dtype))
    pos = torch.arange(p, device=g.device).reshape(1, 1, h, w)
    dx = (mc[:, :, None, None] * inner + (d_avg / p)[:, :, None, None]
          + d_mx[:, :, None, None] * (pos == im[:, :, None, None]).to(mc.dtype))
    return _like_x(dx, g)


def mixed_attention_spatial_conv(sa: Tensor, sm: Tensor, weight: Tensor,
                                 bias: Tensor | None) -> Tensor:
    """Between F2 and F3: ``z = conv2d(cat[sa, sm], weight (1, 2, k, k), bias,
    padding=k//2)`` as ``(N, H, W)``; everything in the acc dtype."""
    k = weight.shape[-1]
    return F.conv2d(torch.stack([sa, sm], 1), weight, bias, padding=k // 2).squeeze(1)


def mixed_attention_spatial_conv_bwd(dz: Tensor, sa: Tensor, sm: Tensor, weight: Tensor,
                                     has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Its backward: ``(dsa, dsm, dweight, dbias)``; ``dbias`` is empty without a bias."""
    k = weight.shape[-1]
    dfeat, dw, db = torch.ops.aten.convolution_backward(
        dz[:, None], torch.stack([sa, sm], 1), weight, [1] if has_bias else None, [1, 1],
        [k // 2, k // 2], [1, 1], False, [0, 0], 1, [True, True, has_bias])
    return (dfeat[:, 0].contiguous(), dfeat[:, 1].contiguous(), dw,
            db if has_bias else dz.new_empty(0))


# ---------------------------------------------------------------------------
# BR-NPA (docs/design.md §3). f_i = x[n, :, i] is the C-vector at position i;
# small tensors are (B, H, W), (B, C), (B, K, C) or (B, K, H, W) in acc dtype.

def brnpa_norms(x: Tensor) -> Tensor:
    """``||f_i||``, shape ``(B, H, W)`` (no epsilon added)."""
    return x.to(acc_dtype(x.dtype)).pow(2).sum(1).sqrt()


def brnpa_step(x: Tensor, inv_nrm: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """One grouping step against the representative ``r_b = f_{idx[b]}`` (``idx``:
    ``(B,)`` int64 flat positions): ``s[b,i] = <f_i, r_b> * inv_nrm[b,i] *
    inv_nrm[b, idx[b]]`` ``(B, H, W)`` and ``sv[b] = sum_i s[b,i] f_i`` ``(B, C)``."""
    b, c, h, w = x.shape
    f = x.to(inv_nrm.dtype).reshape(b, c, h * w)
    inv = inv_nrm.reshape(b, h * w)
    r = f.gather(2, idx.long().view(b, 1, 1).expand(b, c, 1))  # (B, C, 1)
    s = (f * r).sum(1) * inv * inv.gather(1, idx.long().view(b, 1))
    return s.reshape(b, h, w), (f * s[:, None]).sum(2)


def brnpa_bwd_reduce(x: Tensor, inv_nrm: Tensor, dv: Tensor, dmap: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``dw[b,k,i] = <f_i, dv[b,k]> + dmap[b,k,i]`` ``(B, K, H, W)``,
    ``u[b,k] = sum_i dw[b,k,i] * inv_nrm[b,i] * f_i`` ``(B, K, C)`` and
    ``t[b] = sum_i inv_nrm[b,i] * f_i`` ``(B, C)``, from one read of ``x``."""
    b, c, h, w = x.shape
    f = x.to(inv_nrm.dtype).reshape(b, c, h * w)
    inv = inv_nrm.reshape(b, 1, h * w)
    # K from dv, not dmap.reshape(b, -1, ...): that cannot infer K when b == 0.
    dw = torch.einsum("bci,bkc->bki", f, dv) + dmap.reshape(b, dv.shape[1], h * w)
    fn = f * inv
    return dw.reshape(dmap.shape), torch.einsum("bki,bci->bkc", dw, fn), fn.sum(2)


def brnpa_bwd_dx(x: Tensor, a: Tensor, m: Tensor, c: Tensor) -> Tensor:
    """``df[b,:,i] = sum_j a[b,j,i] * m[b,j,:] - c[b,i] * f_i`` with ``a (B, J, H, W)``,
    ``m (B, J, C)``, ``c (B, H, W)``; returned in ``x``'s dtype and memory format."""
    f = x.to(m.dtype)
    df = torch.einsum("bjhw,bjc->bchw", a, m) - c[:, None] * f
    return _like_x(df, x)


# ---------------------------------------------------------------------------
# AW-convolution (docs/design.md §2). ``x (N, C1, H, W)``, ``g (N, C2, Ho, Wo)``;
# ``stride``, ``padding``, ``dilation`` are int pairs. Weights are in ``x``'s dtype
# (the caller casts); ``scale`` and ``bias`` are contiguous in acc dtype; gradients
# of weights/scales are returned in acc dtype, ``dx``/``y`` in ``x``'s dtype and
# memory format. Reductions accumulate in acc dtype.

def _per_sample(fn, n, *tensors):
    return torch.cat([fn(*(t[i:i + 1] if t is not None else None for t in tensors))
                      for i in range(n)]) if n else None


def per_sample_conv2d_fwd(x: Tensor, weights: Tensor, bias: Tensor | None,
                              stride: list[int], padding: list[int], dilation: list[int],
                              groups: int) -> Tensor:
    """``y[n] = conv2d(x[n], weights[n], bias[n])``; ``weights (N, C2, C1/g, kh, kw)``,
    ``bias (N, C2)`` or None."""
    acc = acc_dtype(x.dtype)
    n = x.shape[0]
    ys = [torch.nn.functional.conv2d(x[i:i + 1].to(acc), weights[i].to(acc),
                                     None if bias is None else bias[i], stride, padding,
                                     dilation, groups) for i in range(n)]
    if n == 0:
        return torch.empty(0, weights.shape[1], *_out_hw(x, weights, stride, padding, dilation),
                           dtype=x.dtype, device=x.device)
    return _like_x(torch.cat(ys), x)


def _out_hw(x, w, stride, padding, dilation):
    return tuple((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[-2 + i] - 1) - 1)
                 // stride[i] + 1 for i in range(2))


def per_sample_conv2d_bwd(g: Tensor, x: Tensor, weights: Tensor, stride: list[int],
                               padding: list[int], dilation: list[int], groups: int
                               ) -> tuple[Tensor, Tensor]:
    """``(dx, dweights)``: ``dx`` in ``x``'s dtype/format, ``dweights (N, C2, C1/g,
    kh, kw)`` in acc dtype."""
    acc = acc_dtype(x.dtype)
    dxs, dws = [], []
    for i in range(x.shape[0]):
        dx, dw, _ = torch.ops.aten.convolution_backward(
            g[i:i + 1].to(acc), x[i:i + 1].to(acc), weights[i].to(acc), None, stride, padding,
            dilation, False, [0, 0], groups, [True, True, False])
        dxs.append(dx)
        dws.append(dw)
    if not dxs:
        return torch.empty_like(x), torch.empty(weights.shape, dtype=acc, device=x.device)
    return _like_x(torch.cat(dxs), x), torch.stack(dws)


def aw_conv2d_fwd(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None,
                      stride: list[int], padding: list[int], dilation: list[int],
                      groups: int) -> Tensor:
    """``y[n] = conv2d(x[n], weight * scale[n][:, None], bias[n])`` with
    ``weight (C2, C1/g, kh, kw)``, ``scale (N, C2, kh, kw)`` (the per-sample factor
    ``1 + attn``, shared over input channels), ``bias (N, C2)`` or None."""
    w = weight.to(scale.dtype)[None] * scale[:, :, None]
    return per_sample_conv2d_fwd(x, w, bias, stride, padding, dilation, groups)


def aw_conv2d_bwd(g: Tensor, x: Tensor, weight: Tensor, scale: Tensor, stride: list[int],
                       padding: list[int], dilation: list[int], groups: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight (C2, C1/g, kh, kw), dscale (N, C2, kh, kw))``; with
    ``G_n`` the per-sample weight gradient: ``dweight = sum_n scale[n] * G_n`` and
    ``dscale[n] = sum_{c1} weight * G_n``."""
    wa = weight.to(scale.dtype)
    dx, gn = per_sample_conv2d_bwd(g, x, wa[None] * scale[:, :, None], stride, padding,
                                        dilation, groups)
    return dx, (gn * scale[:, :, None]).sum(0), (gn * wa[None]).sum(2)
